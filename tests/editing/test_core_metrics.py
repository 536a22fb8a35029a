"""SAEBench's core metrics against an independent computation: plain hooks that splice x̂ or
zeros into a full forward of the model, and the formulas written out over all tokens."""

import numpy as np
import pytest
import torch

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from dictionaries.training.publish import heldout_metrics
from editing.core_metrics import HISTOGRAM_EDGES, heldout_core_metrics
from editing.evaluate import evaluate, evaluation_windows
from editing.hookpoints import resolve_hook_point
from tests.editing.test_evaluate import HOOK, _identity_dictionary

TOKENS, CONTEXT = 2048, 64


@pytest.fixture(scope="module")
def random_dictionary():
    config = DictionaryConfig(architecture="topk", d_in=128, d_sae=512, k=16, hook=HOOK)
    return Dictionary.random(config, seed=4)


@torch.no_grad()
def independent(loaded, sae, windows):
    """The core metrics by the book, over every token of ``windows``."""
    model = loaded.model
    module = resolve_hook_point(model, HOOK).module
    captured = {}

    def run(replace=None):
        def hook(m, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            captured.setdefault("x", hidden.clone())
            return replace(hidden) if replace is not None else None
        handle = module.register_forward_hook(hook)
        try:
            return model(windows).logits[:, :-1].double().log_softmax(-1)
        finally:
            handle.remove()

    clean = run()
    x = captured["x"].double()  # (W, T, d)
    f = sae.encode(x.float()).double()  # (W, T, F)
    x_hat = sae.decode(f.float()).double()
    spliced = run(lambda h: x_hat.to(h.dtype))
    zero = run(lambda h: torch.zeros_like(h))
    kl = lambda other: (clean.exp() * (clean - other)).sum(-1).mean()  # noqa: E731 - over all tokens
    targets = windows[:, 1:].unsqueeze(-1)
    ce = lambda logp: float(-logp.gather(-1, targets).mean())  # noqa: E731 - next-token CE over all tokens
    xs, hs = x.reshape(-1, x.shape[-1]).numpy(), x_hat.reshape(-1, x.shape[-1]).numpy()
    norms, hat_norms = np.linalg.norm(xs, axis=1), np.linalg.norm(hs, axis=1)
    density = (f.reshape(-1, f.shape[-1]) > 0).double().mean(0).numpy()
    alive = density[density > 0]
    return {
        "kl_div_score": float((kl(zero) - kl(spliced)) / kl(zero)),
        "ce_loss_recovered": (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean)),
        "cossim": float(np.mean((xs * hs).sum(1) / (norms * hat_norms))),
        "l2_ratio": float(np.mean(hat_norms / norms)),
        "relative_reconstruction_bias": float(np.mean(hat_norms**2) / np.mean((xs * hs).sum(1))),
        "l1": float(np.abs(f.reshape(-1, f.shape[-1]).numpy()).sum(1).mean()),
        "frac_alive": float(np.mean(density > 0)),
        "freq_over_1_percent": float(np.mean(density > 0.01)),
        "freq_over_10_percent": float(np.mean(density > 0.10)),
        "histogram": np.histogram(np.clip(np.log10(alive), HISTOGRAM_EDGES[0], 0), bins=HISTOGRAM_EDGES)[0].tolist(),
        "dead": int(np.sum(density == 0)),
    }


def _check(core, expected):
    for key in ("kl_div_score", "cossim", "l2_ratio", "relative_reconstruction_bias", "l1"):
        assert core[key]["mean"] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
    for key in ("frac_alive", "freq_over_1_percent", "freq_over_10_percent"):
        assert core[key] == pytest.approx(expected[key]), key
    assert core["log_density_histogram"]["counts"] == expected["histogram"]
    assert core["log_density_histogram"]["dead"] == expected["dead"]


def test_core_metrics_equal_an_independent_computation(pythia_tiny, random_dictionary):
    report = evaluate(pythia_tiny, {"r": random_dictionary}, "r", tokens=TOKENS, context_length=CONTEXT)
    windows = evaluation_windows(pythia_tiny, "builtin:pydocs/heldout", TOKENS, CONTEXT)
    expected = independent(pythia_tiny, random_dictionary, windows)
    core = report["core"]
    _check(core, expected)
    assert core["tokens"] == TOKENS and 0 < core["kl_div_score"]["mean"] < 1
    assert report["ce_loss_recovered"]["mean"] == pytest.approx(expected["ce_loss_recovered"], rel=1e-4)
    for key in ("kl_div_score", "cossim", "l2_ratio", "relative_reconstruction_bias", "l1"):
        assert core[key]["se"] > 0, key
    # the publish step measures the same figures on the same windows, and CE recovered beside them
    [published] = heldout_core_metrics([random_dictionary], pythia_tiny, HOOK, windows)
    _check(published, expected)
    assert published["ce_loss_recovered"]["mean"] == pytest.approx(expected["ce_loss_recovered"], rel=1e-4)
    assert published["ce_loss_recovered"]["se"] > 0
    [metrics] = heldout_metrics([random_dictionary], pythia_tiny, HOOK, windows)
    assert metrics["ce_loss_recovered"] == pytest.approx(expected["ce_loss_recovered"], rel=1e-4)


def test_the_identity_dictionary_is_perfect(pythia_tiny):
    identity = _identity_dictionary(128)
    windows = evaluation_windows(pythia_tiny, "builtin:pydocs/heldout", 1024, CONTEXT)
    core = evaluate(pythia_tiny, {"id": identity}, "id", tokens=1024, context_length=CONTEXT)["core"]
    for key in ("cossim", "l2_ratio", "relative_reconstruction_bias", "kl_div_score"):
        assert core[key]["mean"] == pytest.approx(1.0, abs=1e-5), key
    assert core["frac_alive"] == 1.0  # every coordinate is positive somewhere and negative somewhere
    expected = independent(pythia_tiny, identity, windows)
    assert core["l1"]["mean"] == pytest.approx(expected["l1"], rel=1e-5)  # Σ|f| = ‖x‖₁
    # metrics.json from the trainer's publish step carries them, headline figures at the top level
    [metrics] = heldout_metrics([identity], pythia_tiny, HOOK, windows)
    assert metrics["cossim"] == pytest.approx(1.0, abs=1e-5) and metrics["l2_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["kl_div_score"] == pytest.approx(1.0, abs=1e-5) and metrics["frac_alive"] == 1.0
    assert sum(metrics["core"]["log_density_histogram"]["counts"]) == 256
