"""Contrast two sets of texts through a dictionary: which features separate them, and the
difference-of-means direction in the residual stream.

    acc = Contrast(dictionary, unit="text")
    for chunk in chunks_of(set_a): acc.add("a", *activations(model, dictionary.config.hook, chunk))
    for chunk in chunks_of(set_b): acc.add("b", *activations(model, dictionary.config.hook, chunk))
    acc.ranked(top_k=20), acc.difference_of_means()

For every feature ``i`` the two sets' mean activations over their tokens are compared, with
one observation a text (``unit="text"``, the default: each text's mean activation over its
tokens; texts are the independent units) or a token (``unit="token"``: every token counts
alone; tokens of one text are correlated, so its standard error is optimistic, and a
difference at one token a text is diluted by every other token while a difference that
spreads over the tokens after it counts many times). With ``n``, mean ``m`` and variance
``s²`` of each set, the standardised effect size is Hedges' g:

    s_p = sqrt(((n_a − 1)·s_a² + (n_b − 1)·s_b²) / (n_a + n_b − 2))
    g   = J · (m_a − m_b) / s_p,      J = 1 − 3 / (4·(n_a + n_b) − 9)
    se  = sqrt((n_a + n_b) / (n_a·n_b) + g² / (2·(n_a + n_b)))      (Hedges & Olkin)

and ``z = g / se``. The difference-of-means vector is ``mean_a(h) − mean_b(h)`` of the residual
``h`` at the dictionary's hook over the same units; added back with the edit op ``vector`` it
steers towards set A (CAA / ActAdd style). Sums are kept in float64 as chunks arrive, so the
sets are never held in memory at once.
"""

from __future__ import annotations

import math

import torch

from editing.nethook import Trace

UNITS = ("text", "token")


@torch.no_grad()
def activations(model, hook: str, texts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual at ``hook`` for a chunk of tokenised texts: ``(hidden (N, T, d), real (N, T))``,
    right-padded (the model reads each text from position 0; padding is masked out)."""
    device = next(model.parameters()).device
    length = max(len(ids) for ids in texts)
    input_ids = torch.full((len(texts), length), pad_id, dtype=torch.long)
    real = torch.zeros(len(texts), length, dtype=torch.bool)
    for row, ids in enumerate(texts):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        real[row, : len(ids)] = True
    with Trace(model, hook, stop=True) as trace:
        model(input_ids=input_ids.to(device), attention_mask=real.long().to(device))
    return trace.output, real.to(device)


class _Side:
    def __init__(self, d_sae: int, d_model: int):
        f64 = dict(dtype=torch.float64)
        self.n = 0  # observations (tokens or texts)
        self.texts, self.tokens = 0, 0
        self.sum = torch.zeros(d_sae, **f64)
        self.sum_sq = torch.zeros(d_sae, **f64)
        self.active = torch.zeros(d_sae, **f64)  # observations with a positive activation
        self.hidden = torch.zeros(d_model, **f64)


class Contrast:
    def __init__(self, dictionary, unit: str = "text"):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}")
        self.dictionary, self.unit = dictionary, unit
        d_sae, d_in = dictionary.config.d_sae, dictionary.config.d_in
        self.sides = {"a": _Side(d_sae, d_in), "b": _Side(d_sae, d_in)}

    @torch.no_grad()
    def add(self, side: str, hidden: torch.Tensor, real: torch.Tensor) -> None:
        """A chunk of set ``side``: ``hidden (N, T, d)`` at the hook, ``real (N, T)`` its real tokens."""
        acc = self.sides[side]
        f = self.dictionary.encode(hidden).double()  # (N, T, F)
        weight = real.double().unsqueeze(-1)  # (N, T, 1)
        counts = real.sum(1).double()  # (N,)
        if self.unit == "token":
            values, hidden_sum = f * weight, (hidden.double() * weight).sum((0, 1))
            acc.sum += values.sum((0, 1))
            acc.sum_sq += (values * f).sum((0, 1))
            acc.active += ((f > 0) & real.unsqueeze(-1)).double().sum((0, 1))
            acc.n += int(counts.sum())
        else:
            means = (f * weight).sum(1) / counts.unsqueeze(-1)  # (N, F): one observation a text
            hidden_sum = ((hidden.double() * weight).sum(1) / counts.unsqueeze(-1)).sum(0)
            acc.sum += means.sum(0)
            acc.sum_sq += means.pow(2).sum(0)
            acc.active += (means > 0).double().sum(0)
            acc.n += len(counts)
        acc.hidden += hidden_sum
        acc.texts += len(counts)
        acc.tokens += int(counts.sum())

    def statistics(self) -> dict[str, torch.Tensor]:
        """Per feature: means, variances, effect size g, its standard error and z."""
        a, b = self.sides["a"], self.sides["b"]
        if a.n < 2 or b.n < 2:
            raise ValueError(f"each set needs at least 2 {self.unit}s (have {a.n} and {b.n})")
        stats = {}
        for name, side in (("a", a), ("b", b)):
            mean = side.sum / side.n
            stats[f"mean_{name}"] = mean
            stats[f"var_{name}"] = ((side.sum_sq - side.n * mean.pow(2)) / (side.n - 1)).clamp(min=0)
            stats[f"active_{name}"] = side.active / side.n
        n_a, n_b = a.n, b.n
        pooled = (((n_a - 1) * stats["var_a"] + (n_b - 1) * stats["var_b"]) / (n_a + n_b - 2)).sqrt()
        difference = stats["mean_a"] - stats["mean_b"]
        correction = 1 - 3 / (4 * (n_a + n_b) - 9)
        # a feature silent in both sets has no spread: its effect is 0, not 0/0
        g = torch.where(pooled > 0, correction * difference / pooled.clamp(min=1e-12), torch.zeros_like(difference))
        se = (torch.tensor((n_a + n_b) / (n_a * n_b), dtype=torch.float64) + g.pow(2) / (2 * (n_a + n_b))).sqrt()
        return stats | {"effect_size": g, "se": se, "z": g / se}

    def ranked(self, top_k: int = 20, direction: str = "both") -> list[dict]:
        """The ``top_k`` features by effect size: ``both`` by |g|, ``a`` higher in set A first, ``b`` in B."""
        stats = self.statistics()
        g = stats["effect_size"]
        key = {"both": g.abs(), "a": g, "b": -g}[direction]
        order = key.argsort(descending=True)[:top_k].tolist()
        return [{"feature": i, "effect_size": float(g[i]), "se": float(stats["se"][i]), "z": float(stats["z"][i]),
                 "p_two_sided": math.erfc(abs(float(stats["z"][i])) / math.sqrt(2)),
                 "mean_a": float(stats["mean_a"][i]), "mean_b": float(stats["mean_b"][i]),
                 "sd_a": float(stats["var_a"][i].sqrt()), "sd_b": float(stats["var_b"][i].sqrt()),
                 "active_fraction_a": float(stats["active_a"][i]), "active_fraction_b": float(stats["active_b"][i])}
                for i in order]

    def difference_of_means(self) -> torch.Tensor:
        """``mean_a(h) − mean_b(h)`` at the hook, ``(d,)`` float32."""
        a, b = self.sides["a"], self.sides["b"]
        return (a.hidden / a.n - b.hidden / b.n).float()

    def sizes(self) -> dict:
        return {side: {"texts": acc.texts, "tokens": acc.tokens, "observations": acc.n} for side, acc in self.sides.items()}
