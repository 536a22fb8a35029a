"""SAEBench's core metrics of a dictionary, accumulated over batches of token windows.

    metrics = CoreMetrics(d_sae)
    metrics.add(x, x_hat, f, kl_zero=kl_z, kl_spliced=kl_s)     # (b, T, d), (b, T, d), (b, T, F), (b,) each
    metrics.report()

With ``x`` the activation at the hook, ``x̂`` the dictionary's reconstruction and ``f`` its
features, over every token:

    kl_div_score                   (KL_zero − KL_spliced) / KL_zero   KL(clean ‖ ·) a token; 1 = as good as the model
    ce_loss_recovered              (CE_zero − CE_spliced) / (CE_zero − CE_clean), next-token CE beside the KL score
    cossim                         mean cos(x, x̂)
    l2_ratio                       mean ‖x̂‖ / ‖x‖
    relative_reconstruction_bias   E‖x̂‖² / E⟨x, x̂⟩   (1 = unbiased; < 1 shrinks)
    l1                             mean Σᵢ |fᵢ|
    frac_alive                     features that fired on at least one token
    freq_over_1_percent / _10_     features firing on more than 1% / 10% of tokens
    log_density_histogram          log10 firing density of the alive features (dead ones counted apart)

Standard errors are over windows (per-window means; ratios by the delta method), as the
evaluator's other figures. Cosine, L2 ratio and bias do not depend on the input
normalisation (a scalar), so they are measured on the activations as the model has them.

:func:`heldout_core_metrics` runs the whole measurement for dictionaries on one hook (the
trainer's publish step writes its result into ``metrics.json``).
"""

from __future__ import annotations

import math

import torch

from editing.stats import mean_se, ratio_se

HISTOGRAM_EDGES = [x / 2 for x in range(-16, 1)]  # log10 density from 1e-8 to 1, half-decade bins


def token_kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) a position, from log-probabilities ``(..., V)``."""
    return (clean.exp() * (clean - other)).sum(-1)


class CoreMetrics:
    def __init__(self, d_sae: int):
        self.windows: dict[str, list[float]] = {key: [] for key in (
            "cossim", "l2_ratio", "l1", "norm_hat_sq", "inner", "kl_zero", "kl_spliced",
            "ce_clean", "ce_zero", "ce_spliced")}
        self.fired = torch.zeros(d_sae, dtype=torch.float64)  # tokens each feature fired on
        self.tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, *, kl_zero: torch.Tensor | None = None,
            kl_spliced: torch.Tensor | None = None, ce: tuple | None = None) -> None:
        """One batch of windows: ``x, x_hat (b, T, d)``, ``f (b, T, F)``; ``kl_*`` per window ``(b,)``;
        ``ce``: next-token cross-entropy (clean, zero, spliced) per window, each ``(b,)``."""
        x, x_hat, f = x.double(), x_hat.double(), f.double()
        norm, norm_hat = x.norm(dim=-1), x_hat.norm(dim=-1)  # (b, T)
        inner = (x * x_hat).sum(-1)  # (b, T)
        cosine = inner / (norm * norm_hat).clamp(min=1e-30)
        self.windows["cossim"] += cosine.mean(-1).tolist()
        self.windows["l2_ratio"] += (norm_hat / norm.clamp(min=1e-30)).mean(-1).tolist()
        self.windows["l1"] += f.abs().sum(-1).mean(-1).tolist()
        self.windows["norm_hat_sq"] += norm_hat.pow(2).mean(-1).tolist()
        self.windows["inner"] += inner.mean(-1).tolist()
        if kl_zero is not None and kl_spliced is not None:
            self.windows["kl_zero"] += kl_zero.double().tolist()
            self.windows["kl_spliced"] += kl_spliced.double().tolist()
        if ce is not None:
            for key, values in zip(("ce_clean", "ce_zero", "ce_spliced"), ce):
                self.windows[key] += values.double().tolist()
        self.fired += (f > 0).flatten(0, 1).sum(0).cpu().double()
        self.tokens += f.shape[0] * f.shape[1]

    def report(self) -> dict:
        w = self.windows
        pair = lambda values: dict(zip(("mean", "se"), values))  # noqa: E731
        density = self.fired / max(self.tokens, 1)  # (F,)
        alive = density > 0
        logs = density[alive].log10()
        counts = torch.histogram(logs.clamp(min=HISTOGRAM_EDGES[0], max=0.0).float(),
                                 bins=torch.tensor(HISTOGRAM_EDGES)).hist if len(logs) else torch.zeros(len(HISTOGRAM_EDGES) - 1)
        report = {
            "cossim": pair(mean_se(w["cossim"])),
            "l2_ratio": pair(mean_se(w["l2_ratio"])),
            "relative_reconstruction_bias": pair(ratio_se(w["norm_hat_sq"], w["inner"])),
            "l1": pair(mean_se(w["l1"])),
            "frac_alive": float(alive.double().mean()),
            "freq_over_1_percent": float((density > 0.01).double().mean()),
            "freq_over_10_percent": float((density > 0.10).double().mean()),
            "log_density_histogram": {"edges": HISTOGRAM_EDGES, "counts": [int(c) for c in counts.tolist()],
                                      "dead": int((~alive).sum()),
                                      "note": "log10 of each alive feature's firing density; the first bin holds "
                                              "everything below its lower edge"},
            "tokens": self.tokens,
        }
        if w["kl_zero"]:
            report["kl_div_score"] = pair(ratio_se([z - s for z, s in zip(w["kl_zero"], w["kl_spliced"])], w["kl_zero"]))
            report["kl"] = {"zero": pair(mean_se(w["kl_zero"])), "spliced": pair(mean_se(w["kl_spliced"]))}
        if w["ce_clean"]:
            report["ce_loss_recovered"] = pair(ratio_se([z - s for z, s in zip(w["ce_zero"], w["ce_spliced"])],
                                                        [z - c for z, c in zip(w["ce_zero"], w["ce_clean"])]))
            report["ce"] = {key: pair(mean_se(w[f"ce_{key}"])) for key in ("clean", "zero", "spliced")}
        return report


def flat(report: dict) -> dict:
    """The headline figures as plain numbers (``metrics.json``'s top level)."""
    keys = ("kl_div_score", "ce_loss_recovered", "cossim", "l2_ratio", "relative_reconstruction_bias", "l1")
    values = {key: report[key]["mean"] for key in keys if key in report}
    values.update({key: report[key] for key in ("frac_alive", "freq_over_1_percent", "freq_over_10_percent")})
    return {key: value for key, value in values.items() if value is None or not math.isnan(value)}


@torch.no_grad()
def heldout_core_metrics(dictionaries: list, loaded, hook: str, windows: torch.Tensor, batch: int = 4) -> list[dict]:
    """The core metrics of each dictionary (all on ``hook``) over the same windows ``(W, T)``."""
    from editing.lens import logits_from_hook
    from editing.nethook import Trace

    model = loaded.model
    device = next(model.parameters()).device
    accumulators = [CoreMetrics(d.config.d_sae) for d in dictionaries]
    for start in range(0, len(windows), batch):
        ids = windows[start : start + batch].to(device)
        with Trace(model, hook, stop=True) as trace:
            model(input_ids=ids)
        x = trace.output  # (b, T, d)
        clean = logits_from_hook(model, hook, x)[:, :-1].float().log_softmax(-1)  # (b, T-1, V)
        zero = logits_from_hook(model, hook, torch.zeros_like(x))[:, :-1].float().log_softmax(-1)
        kl_zero = token_kl(clean, zero)
        targets = ids[:, 1:].unsqueeze(-1)
        ce = lambda logp: -logp.gather(-1, targets).squeeze(-1).mean(-1)  # noqa: E731  (b,)
        for dictionary, accumulator in zip(dictionaries, accumulators):
            dictionary = dictionary.to(device)
            x_normed, state = dictionary.normalize(x)
            f = dictionary.activation(dictionary.pre_activations(x_normed))  # (b, T, F)
            x_hat = dictionary.decode(f, state).to(x.dtype)
            spliced = logits_from_hook(model, hook, x_hat)[:, :-1].float().log_softmax(-1)
            accumulator.add(x, x_hat, f, kl_zero=kl_zero.mean(-1), kl_spliced=token_kl(clean, spliced).mean(-1),
                            ce=(ce(clean), ce(zero), ce(spliced)))
    return [accumulator.report() for accumulator in accumulators]
