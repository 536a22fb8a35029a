"""Evaluate a dictionary, and a set of edits, by what they cost in next-token loss.

    report = evaluate(loaded, dictionaries, "pythia-tiny-l2", edits=[...], tokens=32768)

One pass over deterministic windows of a corpus split (default ``builtin:pydocs/heldout``)
computes, on identical windows:

    clean      the model as it is
    spliced    the hook's activation replaced by the dictionary's reconstruction x̂
    zero       the hook's activation replaced by zeros
    edited     the requested edits applied as the engine applies them (if any edits)

with CE (nats a token) and perplexity of each; ``ce_loss_recovered = (CE_zero −
CE_spliced)/(CE_zero − CE_clean)``; KL(clean ‖ spliced) and KL(clean ‖ edited) per token,
averaged; and the dictionary's fvu = Σ‖x − x̂‖²/Σ‖x − μ‖², l0 and dead fraction over the
same tokens; and SAEBench's core metrics (:mod:`editing.core_metrics`: KL score, cosine,
L2 ratio, relative reconstruction bias, L1, alive and frequent features, log-density
histogram) under ``core``. Every figure comes with its standard error over windows. The layers below
the hook run once a batch; clean, spliced and zero share them (:func:`logits_from_hook`).

With edits, ``edit_effect`` reports what they cost beside what they do (target effect, side
effect, their ratio; :mod:`editing.edit_effect`) on the same windows.

``feature_effect`` gives one feature's logit lens and the change in next-token loss when it
is ablated, at the positions where it fires.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from editing.core_metrics import CoreMetrics
from editing.corpora import open_corpus, token_windows
from editing.engine.edit_tables import static_tables
from editing.engine.editors import edit_hooks
from editing.edits import EditError, EditSpec, validate_edits
from editing.lens import logit_lens, logits_from_hook
from editing.nethook import Trace
from editing.stats import mean_se as _mean_se, ratio_se as _ratio_se

Progress = Callable[[float, str], None]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities at every predicting position: ``(B, T-1, V)``."""
    return logits[:, :-1].float().log_softmax(-1)


def _token_ce(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy a position: ``(B, T-1)``."""
    return -log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def _token_kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) a position, from log-probabilities: ``(B, T-1)``."""
    return (clean.exp() * (clean - other)).sum(-1)


def evaluation_windows(loaded, corpus: str, tokens: int, context_length: int) -> torch.Tensor:
    windows = max(1, tokens // context_length)
    return token_windows(open_corpus(corpus), loaded.tokenizer, context_length, max_windows=windows)  # (W, T)


@torch.no_grad()
def evaluate(loaded, dictionaries: dict, dictionary: str, *, edits: list[EditSpec] | tuple = (),
             corpus: str = "builtin:pydocs/heldout", tokens: int = 32768, context_length: int = 128,
             batch_windows: int = 8, progress: Progress | None = None, targets: list[str] | None = None,
             vectors: dict | None = None, feature_max: dict | None = None) -> dict:
    """The evaluation report (plain JSON-able data); see the module docstring. ``targets``: the
    edit effect's target tokens (default: the edited features' top logit-lens tokens); ``vectors``
    (name -> SteeringVector) and ``feature_max`` (name -> recorded maximum activations) serve
    vector edits and ``max_activation`` units."""
    if dictionary not in dictionaries:
        raise EditError(f"unknown dictionary {dictionary!r} (loaded: {', '.join(sorted(dictionaries)) or 'none'})",
                        "dictionary")
    edits = validate_edits(edits, dictionaries, vectors=vectors, feature_max=feature_max)
    resources = {"vectors": vectors, "feature_max": feature_max}
    for index, edit in enumerate(edits):
        if edit.positions == "generated":
            raise EditError(f"edits[{index}].positions: an evaluation scores given text, which has no generated "
                            "positions; use 'all' or 'prompt'", f"edits[{index}].positions")
    sae = dictionaries[dictionary]
    model, device = loaded.model, next(loaded.model.parameters()).device
    hook = sae.config.hook
    windows = evaluation_windows(loaded, corpus, tokens, context_length)
    started = time.time()
    per_window = {key: [] for key in ("clean", "spliced", "zero", "edited", "kl_spliced", "kl_edited", "fvu", "l0")}
    sum_x, sum_x2, sum_err, n_tokens, l0_sum = 0.0, 0.0, 0.0, 0, 0.0
    fired = torch.zeros(sae.config.d_sae, dtype=torch.bool, device=device)
    core = CoreMetrics(sae.config.d_sae)
    for start in range(0, len(windows), batch_windows):
        ids = windows[start : start + batch_windows].to(device)  # (b, T)
        with Trace(model, hook, stop=True) as trace:
            model(input_ids=ids)
        x = trace.output  # (b, T, d): the layers below run once
        x_normed, state = sae.normalize(x)
        f = sae.activation(sae.pre_activations(x_normed))  # (b, T, F)
        reconstruction = sae.decode(f, state).to(x.dtype)
        clean = _log_probs(logits_from_hook(model, hook, x))  # (b, T-1, V), each once
        spliced = _log_probs(logits_from_hook(model, hook, reconstruction))
        zero = _log_probs(logits_from_hook(model, hook, torch.zeros_like(x)))
        edited = _log_probs(_edited_logits(model, dictionaries, edits, ids, **resources)) if edits else clean

        for name, log_probs in (("clean", clean), ("spliced", spliced), ("zero", zero), ("edited", edited)):
            per_window[name] += _token_ce(log_probs, ids).mean(-1).tolist()
        kl_spliced = _token_kl(clean, spliced).mean(-1)  # (b,)
        per_window["kl_spliced"] += kl_spliced.tolist()
        core.add(x, reconstruction, f, kl_zero=_token_kl(clean, zero).mean(-1), kl_spliced=kl_spliced)
        per_window["kl_edited"] += _token_kl(clean, edited).mean(-1).tolist() if edits else [0.0] * len(ids)
        xf, errors = x.float(), (reconstruction.float() - x.float())
        window_var = (xf - xf.mean(1, keepdim=True)).pow(2).sum((1, 2))
        per_window["fvu"] += (errors.pow(2).sum((1, 2)) / window_var).tolist()
        per_window["l0"] += (f > 0).float().sum(-1).mean(-1).tolist()
        sum_x = sum_x + xf.double().sum((0, 1))
        sum_x2 += float(xf.double().pow(2).sum())
        sum_err += float(errors.double().pow(2).sum())
        n_tokens += x.shape[0] * x.shape[1]
        l0_sum += float((f > 0).sum())
        fired |= (f > 0).flatten(0, 1).any(0)
        if progress is not None:
            progress(min(1.0, (start + len(ids)) / len(windows)), f"{start + len(ids)}/{len(windows)} windows")

    seconds = time.time() - started
    ce = {name: _mean_se(per_window[name]) for name in ("clean", "spliced", "zero", "edited")}
    recovered = _ratio_se([z - s for z, s in zip(per_window["zero"], per_window["spliced"])],
                          [z - c for z, c in zip(per_window["zero"], per_window["clean"])])
    variance = sum_x2 - float(sum_x.pow(2).sum()) / n_tokens
    report = {
        "dictionary": dictionary,
        "hook": hook,
        "corpus": corpus,
        "windows": len(windows),
        "context_length": context_length,
        "tokens": n_tokens,
        "predicted_tokens": len(windows) * (context_length - 1),
        "ce": {name: {"mean": m, "se": se, "perplexity": math.exp(m)} for name, (m, se) in ce.items()},
        "ce_loss_recovered": {"mean": recovered[0], "se": recovered[1]},
        "kl": {"spliced": dict(zip(("mean", "se"), _mean_se(per_window["kl_spliced"]))),
               "edited": dict(zip(("mean", "se"), _mean_se(per_window["kl_edited"])))},
        "fvu": {"mean": sum_err / variance, "se": _mean_se(per_window["fvu"])[1]},
        "l0": {"mean": l0_sum / n_tokens, "se": _mean_se(per_window["l0"])[1]},
        "dead_fraction": float((~fired).float().mean()),
        "dead_window_tokens": n_tokens,
        "core": core.report(),
        "edits": [edit.model_dump() for edit in edits],
        "seconds": round(seconds, 3),
        "tokens_per_second": n_tokens / seconds if seconds else None,
    }
    if not edits:
        report["ce"]["edited"]["note"] = "no edits: the edited run is the clean run"
    else:
        from editing.edit_effect import edit_effect

        report["edit_effect"] = edit_effect(loaded, dictionaries, edits, windows, targets=targets,
                                            batch_windows=batch_windows, **resources)
        report["seconds"] = round(time.time() - started, 3)
    return report


def _edited_logits(model, dictionaries: dict, edits: list[EditSpec], ids: torch.Tensor, *,
                   vectors: dict | None = None, feature_max: dict | None = None) -> torch.Tensor:
    """A full forward with the engine's edit hooks on every row (every position counts as prompt)."""
    editors = static_tables(dictionaries, edits, len(ids), ids.device, vectors=vectors, feature_max=feature_max)
    with edit_hooks(model, editors):
        return model(input_ids=ids).logits


@torch.no_grad()
def feature_effect(loaded, dictionaries: dict, dictionary: str, feature: int, *,
                   corpus: str = "builtin:pydocs/heldout", tokens: int = 16384, context_length: int = 128,
                   batch_windows: int = 8, top: int = 10) -> dict:
    """One feature's logit lens and the change in next-token loss when it is ablated,
    over the positions where it fires."""
    [edit] = validate_edits([EditSpec(dictionary=dictionary, feature=feature, op="ablate")], dictionaries)
    sae = dictionaries[dictionary]
    promoted, promoted_values, suppressed, suppressed_values = logit_lens(sae.W_dec[feature : feature + 1], loaded.model, top)
    decode = loaded.tokenizer.decode
    windows = evaluation_windows(loaded, corpus, tokens, context_length)
    model, device = loaded.model, next(loaded.model.parameters()).device
    deltas_firing, deltas_all, firing, activation_sum = [], [], 0, 0.0
    for start in range(0, len(windows), batch_windows):
        ids = windows[start : start + batch_windows].to(device)
        with Trace(model, sae.config.hook) as trace:
            clean = model(input_ids=ids).logits
        acts = sae.encode_subset(trace.output, torch.tensor([feature], device=device))[..., 0]  # (b, T)
        ablated = _edited_logits(model, dictionaries, [edit], ids)
        delta = _token_ce(_log_probs(ablated), ids) - _token_ce(_log_probs(clean), ids)  # (b, T-1)
        fires = acts[:, :-1] > 0
        deltas_firing += delta[fires].tolist()
        deltas_all += delta.mean(-1).tolist()
        firing += int(fires.sum())
        activation_sum += float(acts[:, :-1][fires].sum())
    predicted = len(windows) * (context_length - 1)
    mean_firing, se_firing = _mean_se(deltas_firing) if deltas_firing else (None, None)
    return {
        "dictionary": dictionary,
        "feature": feature,
        "corpus": corpus,
        "predicted_tokens": predicted,
        "firing_positions": firing,
        "density": firing / predicted,
        "mean_activation": activation_sum / firing if firing else None,
        "ablation_delta_ce_where_firing": {"mean": mean_firing, "se": se_firing},
        "ablation_delta_ce_all_positions": dict(zip(("mean", "se"), _mean_se(deltas_all))),
        "logit_lens": {
            "promoted": [{"token_id": int(t), "token": decode([int(t)]), "value": float(v)}
                         for t, v in zip(promoted[0], promoted_values[0])],
            "suppressed": [{"token_id": int(t), "token": decode([int(t)]), "value": float(v)}
                           for t, v in zip(suppressed[0], suppressed_values[0])],
        },
    }
