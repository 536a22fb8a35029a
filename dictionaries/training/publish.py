"""Turn trained ensemble members into native dictionaries with metrics and feature statistics.

For each member: a :class:`~dictionaries.sae.Dictionary` (its input scale stored as the
``scale`` normalisation), ``metrics.json`` measured on held-out tokens (fvu, l0, dead
fraction with its window, the training-window dead fraction, and SAEBench's core metrics:
KL score, cosine, L2 ratio, relative reconstruction bias, L1, alive and frequent features
with a log-density histogram under ``core``), and per-feature
statistics measured on held-out windows:

    features.safetensors   density [F], mean_activation [F] (over firing tokens),
                           context_tokens [F, C, L] (-1 = none), context_acts [F, C, L],
                           context_max [F, C], lens_promoted / lens_suppressed [F, 10] token ids
                           with lens_*_values: the logit lens of each decoder row
    features.json          how they were measured (corpus, windows, context span)

A sweep also reports MMCS between its members (mean over features of the best decoder
cosine similarity in the other member).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from editing.core_metrics import flat, heldout_core_metrics
from editing.corpora import open_corpus, token_windows
from editing.lens import logit_lens
from editing.nethook import Trace

CONTEXTS = 5
BEFORE, AFTER = 8, 4
LENS_K = 10


def member_dictionary(ensemble, n: int, scale: float, *, hook: str, model_name: str, model_sha256: str,
                      provenance: dict) -> Dictionary:
    spec = ensemble.specs[n]
    config = DictionaryConfig(
        architecture=spec.architecture, d_in=ensemble.d_in, d_sae=spec.d_sae, k=spec.k, hook=hook,
        model_name=model_name, model_sha256=model_sha256, normalization={"kind": "scale", "factor": scale},
        tied=spec.tied, decoder_bias=spec.decoder_bias, dtype="float32", provenance=provenance,
    )
    weights = {key: value.float().cpu() for key, value in ensemble.member_weights(n).items()}
    return Dictionary.from_config(config, weights)


@torch.no_grad()
def heldout_windows(loaded, corpus: str, context_length: int, windows: int) -> torch.Tensor:
    return token_windows(open_corpus(corpus), loaded.tokenizer, context_length, max_windows=windows)  # (W, T)


@torch.no_grad()
def hook_activations(loaded, hook: str, windows: torch.Tensor, batch: int = 16):
    """Yield ``(start, acts (b, T, d))`` for consecutive window batches."""
    device = next(loaded.model.parameters()).device
    for start in range(0, len(windows), batch):
        with Trace(loaded.model, hook, stop=True) as trace:
            loaded.model(input_ids=windows[start : start + batch].to(device))
        yield start, trace.output.float()


@torch.no_grad()
def heldout_metrics(dictionaries: list[Dictionary], loaded, hook: str, windows: torch.Tensor) -> list[dict]:
    """fvu, l0, mse, dead fraction and the core metrics of each dictionary on the same held-out tokens."""
    sums = [dict(error=0.0, l0=0.0, fired=None) for _ in dictionaries]
    total, sum_x, sum_x2 = 0, 0.0, 0.0
    for _, acts in hook_activations(loaded, hook, windows):
        x = acts.reshape(-1, acts.shape[-1])  # (N, d)
        total += len(x)
        sum_x = sum_x + x.double().sum(0)
        sum_x2 += float(x.double().pow(2).sum())
        for dictionary, acc in zip(dictionaries, sums):
            dictionary = dictionary.to(x.device)
            f = dictionary.encode(x)
            _, state = dictionary.normalize(x)
            acc["error"] += float((dictionary.decode(f, state) - x).double().pow(2).sum())
            acc["l0"] += float((f > 0).sum())
            fired = (f > 0).any(0)
            acc["fired"] = fired if acc["fired"] is None else acc["fired"] | fired
    variance = sum_x2 - float(sum_x.pow(2).sum()) / total  # Σ‖x − μ‖²
    core = heldout_core_metrics(dictionaries, loaded, hook, windows)
    return [{"fvu": acc["error"] / variance, "mse": acc["error"] / total, "l0": acc["l0"] / total,
             "dead_fraction": float((~acc["fired"]).float().mean()), "dead_window_tokens": total,
             **flat(report), "core": report}
            for acc, report in zip(sums, core)]


@torch.no_grad()
def feature_statistics(dictionary: Dictionary, loaded, windows: torch.Tensor, corpus: str) -> dict[str, bytes]:
    """``features.safetensors`` and ``features.json`` contents for one dictionary."""
    hook, d_sae = dictionary.config.hook, dictionary.config.d_sae
    context_length = windows.shape[1]
    count = torch.zeros(d_sae)
    act_sum = torch.zeros(d_sae)
    best_values = torch.full((CONTEXTS, d_sae), -1.0)
    best_index = torch.zeros(CONTEXTS, d_sae, dtype=torch.long)  # global token index w·T + p
    for start, acts in hook_activations(loaded, hook, windows):
        f = dictionary.encode(acts).float().cpu().reshape(-1, d_sae)  # (b·T, F)
        count += (f > 0).sum(0)
        act_sum += f.sum(0)
        top = f.topk(min(CONTEXTS, len(f)), dim=0)  # (C, F)
        values = torch.cat([best_values, top.values])
        indices = torch.cat([best_index, top.indices + start * context_length])
        keep = values.topk(CONTEXTS, dim=0)
        best_values, best_index = keep.values, indices.gather(0, keep.indices)

    span = BEFORE + 1 + AFTER
    context_tokens = torch.full((d_sae, CONTEXTS, span), -1, dtype=torch.int32)
    context_acts = torch.zeros(d_sae, CONTEXTS, span)
    needed = sorted({int(i) // context_length for i in best_index[best_values > 0]})
    window_acts = {}
    for w in needed:  # re-encode only the windows that hold a top context
        (_, acts), = hook_activations(loaded, hook, windows[w : w + 1])
        window_acts[w] = dictionary.encode(acts[0]).float().cpu()  # (T, F)
    for c in range(CONTEXTS):
        for feature in (best_values[c] > 0).nonzero().squeeze(-1).tolist():
            index = int(best_index[c, feature])
            w, p = divmod(index, context_length)
            lo, hi = max(0, p - BEFORE), min(context_length, p + AFTER + 1)
            offset = BEFORE - (p - lo)
            context_tokens[feature, c, offset : offset + hi - lo] = windows[w, lo:hi].to(torch.int32)
            context_acts[feature, c, offset : offset + hi - lo] = window_acts[w][lo:hi, feature]

    promoted, promoted_values, suppressed, suppressed_values = logit_lens(dictionary.W_dec, loaded.model, LENS_K)
    tensors = {
        "density": count / (len(windows) * context_length),
        "mean_activation": torch.where(count > 0, act_sum / count.clamp(min=1), 0.0),
        "context_tokens": context_tokens, "context_acts": context_acts,
        "context_max": best_values.T.clamp(min=0).contiguous(),
        "lens_promoted": promoted, "lens_promoted_values": promoted_values,
        "lens_suppressed": suppressed, "lens_suppressed_values": suppressed_values,
    }
    meta = {"corpus": corpus, "windows": len(windows), "context_length": context_length,
            "tokens": len(windows) * context_length, "contexts_per_feature": CONTEXTS,
            "context_before": BEFORE, "context_after": AFTER, "lens_k": LENS_K,
            "context_center": BEFORE}
    return {"features.safetensors": save({k: v.contiguous() for k, v in tensors.items()}),
            "features.json": (json.dumps(meta, indent=2) + "\n").encode()}


@torch.no_grad()
def mmcs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over ``a``'s rows of the best cosine similarity with a row of ``b`` (decoders ``(F, d)``)."""
    a = a.float() / a.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    b = b.float() / b.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    best = torch.cat([(chunk @ b.T).max(dim=-1).values for chunk in a.split(2048)])
    return float(best.mean())
