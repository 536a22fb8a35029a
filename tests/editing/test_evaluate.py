"""The evaluator against independent computations."""

import math

import pytest
import torch

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from editing.edits import EditError, EditSpec
from editing.evaluate import evaluate, evaluation_windows, feature_effect
from editing.hookpoints import resolve_hook_point

HOOK = "blocks.2.hook_resid_post"


def _identity_dictionary(width, hook=HOOK):
    """relu(x) − relu(−x) = x: reconstructs every activation exactly."""
    eye = torch.eye(width)
    weights = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * width),
               "W_dec": torch.cat([eye, -eye], 0), "b_dec": torch.zeros(width)}
    return Dictionary.from_config(DictionaryConfig(architecture="relu", d_in=width, d_sae=2 * width, hook=hook), weights)


@pytest.fixture(scope="module")
def random_dictionary(pythia_tiny):
    config = DictionaryConfig(architecture="relu", d_in=128, d_sae=512, hook=HOOK)
    return Dictionary.random(config, seed=1)


def test_clean_and_zero_match_independent_computations(pythia_tiny, random_dictionary):
    report = evaluate(pythia_tiny, {"r": random_dictionary}, "r", tokens=2048, context_length=64)
    windows = evaluation_windows(pythia_tiny, "builtin:pydocs/heldout", 2048, 64)
    model = pythia_tiny.model
    with torch.no_grad():
        clean = model(windows, labels=windows).loss.item()  # transformers' own shifted-label loss
        module = resolve_hook_point(model, HOOK).module
        handle = module.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        try:
            zero = model(windows, labels=windows).loss.item()
        finally:
            handle.remove()
    assert abs(report["ce"]["clean"]["mean"] - clean) < 1e-5
    assert abs(report["ce"]["zero"]["mean"] - zero) < 1e-5
    assert math.isclose(report["ce"]["clean"]["perplexity"], math.exp(report["ce"]["clean"]["mean"]))
    assert report["tokens"] == 2048 and report["windows"] == 32 and report["ce"]["clean"]["se"] > 0
    # no edits: edited is clean, KL(clean || edited) is exactly 0; a random dictionary costs something
    assert report["ce"]["edited"]["mean"] == report["ce"]["clean"]["mean"]
    assert report["kl"]["edited"]["mean"] == 0.0
    assert report["kl"]["spliced"]["mean"] > 0 and report["ce"]["spliced"]["mean"] > report["ce"]["clean"]["mean"]


def test_exact_reconstruction_recovers_everything(pythia_tiny):
    identity = _identity_dictionary(128)
    report = evaluate(pythia_tiny, {"id": identity}, "id", tokens=1024, context_length=64)
    assert abs(report["ce"]["spliced"]["mean"] - report["ce"]["clean"]["mean"]) < 1e-6
    assert abs(report["ce_loss_recovered"]["mean"] - 1.0) < 1e-5
    assert report["fvu"]["mean"] < 1e-10 and report["kl"]["spliced"]["mean"] < 1e-6
    assert report["l0"]["mean"] > 0


def test_edited_run_matches_a_plain_hook(pythia_tiny, random_dictionary):
    edits = [EditSpec(dictionary="r", feature=5, op="set", value=10.0), EditSpec(dictionary="r", feature=9, op="ablate")]
    report = evaluate(pythia_tiny, {"r": random_dictionary}, "r", edits=edits, tokens=1024, context_length=64)
    windows = evaluation_windows(pythia_tiny, "builtin:pydocs/heldout", 1024, 64)

    def hook(module, args, output):
        f = random_dictionary.encode(output)
        edited = f.clone()
        edited[..., 5] = 10.0
        edited[..., 9] = 0.0
        return output + (edited - f) @ random_dictionary.W_dec

    module = resolve_hook_point(pythia_tiny.model, HOOK).module
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = pythia_tiny.model(windows, labels=windows).loss.item()
    finally:
        handle.remove()
    assert abs(report["ce"]["edited"]["mean"] - expected) < 1e-4
    assert report["kl"]["edited"]["mean"] > 0
    with pytest.raises(EditError, match="out of range"):
        evaluate(pythia_tiny, {"r": random_dictionary}, "r", edits=[EditSpec(dictionary="r", feature=512, op="ablate")],
                 tokens=64, context_length=64)


def test_trained_default_dictionary_recovers_most_of_the_loss(pythia_tiny, default_dictionary):
    name, dictionary = default_dictionary
    progress = []
    report = evaluate(pythia_tiny, {name: dictionary}, name, tokens=8192, progress=lambda f, m: progress.append(f))
    assert 0.0 <= report["ce_loss_recovered"]["mean"] <= 1.0
    assert report["ce_loss_recovered"]["mean"] > 0.5
    assert report["fvu"]["mean"] < 0.2 and report["l0"]["mean"] <= 24
    assert progress[-1] == 1.0 and progress == sorted(progress)


def test_feature_effect(pythia_tiny, random_dictionary):
    dead = Dictionary.from_config(random_dictionary.config,
                                  {**random_dictionary.weights(), "b_enc": random_dictionary.b_enc.clone()})
    dead.b_enc.data[3] = -1e4  # never fires
    effect = feature_effect(pythia_tiny, {"d": dead}, "d", 3, tokens=1024, context_length=64)
    assert effect["firing_positions"] == 0 and effect["ablation_delta_ce_all_positions"]["mean"] == 0.0
    live = feature_effect(pythia_tiny, {"d": dead}, "d", 4, tokens=1024, context_length=64)
    assert live["firing_positions"] > 0 and live["ablation_delta_ce_where_firing"]["mean"] is not None
    direction = dead.W_dec[4] - dead.W_dec[4].mean()
    final_norm = pythia_tiny.model.gpt_neox.final_layer_norm.weight
    logits = (direction * final_norm) @ pythia_tiny.model.get_output_embeddings().weight.T
    assert live["logit_lens"]["promoted"][0]["token_id"] == int(logits.argmax())
    assert live["logit_lens"]["suppressed"][0]["token_id"] == int(logits.argmin())
