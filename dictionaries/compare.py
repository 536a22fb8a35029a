"""Compare two dictionaries feature by feature: MMCS both ways, a one-to-one matching, encoder-side too.

    comparison = compare(a, b)          # two Dictionary objects with the same d_in
    comparison.mmcs_decoder             # {"a_to_b": ..., "b_to_a": ...}
    comparison.pairs(threshold=0.7)     # matched pairs above a decoder cosine, best first

- **MMCS** (mean max cosine similarity) of ``a`` to ``b``: the mean over ``a``'s features of the
  best cosine between its decoder row and any decoder row of ``b``. It is not symmetric (a
  dictionary with twice the features covers a smaller one better than the other way round), so
  both directions are reported; ``a_to_b`` is the trainer's ``metrics.json`` ``mmcs[b]`` of ``a``.
- **Matching**: the one-to-one assignment of features that maximises the summed decoder cosine
  (the Hungarian method, ``scipy.optimize.linear_sum_assignment``; ``min(F_a, F_b)`` pairs), with
  its mean cosine; each pair also carries its encoder-side cosine.
- **Encoder side**: the same MMCS on encoder directions (the columns of ``W_enc``).

Cosines ignore the dictionaries' input normalisation (a per-dictionary scale does not change a
direction). Imports nothing else of the project.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_MMCS_CELLS = 1 << 28  # F_a·F_b: cosine matrices computed in chunks up to this size
MAX_MATCH_CELLS = 1 << 24  # F_a·F_b: the Hungarian matching (a dense float64 cost matrix) up to this size


class ComparisonError(ValueError):
    """Two dictionaries that cannot be compared (widths differ, or too large)."""


def _unit_rows(matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.float()
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _best(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """For each unit row of ``a``: the best cosine with a row of ``b`` and which row."""
    values, indices = [], []
    for part in a.split(chunk):
        best = (part @ b.T).max(dim=-1)  # (chunk,)
        values.append(best.values)
        indices.append(best.indices)
    return torch.cat(values), torch.cat(indices)


@dataclass
class Comparison:
    mmcs_decoder: dict
    mmcs_encoder: dict
    matched_a: torch.Tensor | None  # (P,) feature of a in each matched pair
    matched_b: torch.Tensor | None
    decoder_cosine: torch.Tensor | None  # (P,) the pair's decoder cosine
    encoder_cosine: torch.Tensor | None

    @property
    def matched(self) -> bool:
        return self.matched_a is not None

    def pairs(self, threshold: float = -1.0) -> list[tuple[int, int, float, float]]:
        """Matched pairs with decoder cosine ≥ ``threshold``, best first: ``(a, b, decoder, encoder)``."""
        keep = (self.decoder_cosine >= threshold).nonzero().flatten()
        keep = keep[self.decoder_cosine[keep].argsort(descending=True, stable=True)]
        return [(int(self.matched_a[i]), int(self.matched_b[i]), float(self.decoder_cosine[i]),
                 float(self.encoder_cosine[i])) for i in keep]


@torch.no_grad()
def compare(a, b) -> Comparison:
    """Compare dictionaries ``a`` and ``b`` (anything with ``W_dec (F, d)``, ``W_enc (d, F)`` and ``config``)."""
    if a.config.d_in != b.config.d_in:
        raise ComparisonError(f"the dictionaries have different widths (d_in {a.config.d_in} and {b.config.d_in}); "
                              "their features live in different spaces")
    cells = a.config.d_sae * b.config.d_sae
    if cells > MAX_MMCS_CELLS:
        raise ComparisonError(f"{a.config.d_sae} × {b.config.d_sae} features is more than this server compares "
                              f"({MAX_MMCS_CELLS} cosines)")
    dec_a, dec_b = _unit_rows(a.W_dec.detach().cpu()), _unit_rows(b.W_dec.detach().cpu())  # (F, d)
    enc_a, enc_b = _unit_rows(a.W_enc.detach().cpu().T), _unit_rows(b.W_enc.detach().cpu().T)
    mmcs_decoder = {"a_to_b": float(_best(dec_a, dec_b)[0].mean()), "b_to_a": float(_best(dec_b, dec_a)[0].mean())}
    mmcs_encoder = {"a_to_b": float(_best(enc_a, enc_b)[0].mean()), "b_to_a": float(_best(enc_b, enc_a)[0].mean())}
    if cells > MAX_MATCH_CELLS:
        return Comparison(mmcs_decoder, mmcs_encoder, None, None, None, None)
    from scipy.optimize import linear_sum_assignment

    cosine = dec_a @ dec_b.T  # (F_a, F_b)
    rows, columns = linear_sum_assignment(cosine.double().numpy(), maximize=True)
    matched_a, matched_b = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(columns, dtype=torch.long)
    decoder_cosine = cosine[matched_a, matched_b]
    encoder_cosine = (enc_a[matched_a] * enc_b[matched_b]).sum(-1)
    return Comparison(mmcs_decoder, mmcs_encoder, matched_a, matched_b, decoder_cosine, encoder_cosine)
