"""Per-row sampling for a batch in which every request has its own settings.

Temperature, top-k, top-p, the seed and the row's own step (tokens it has generated so
far) are tensors with one entry a row, so one batch carries different settings per
request without a Python loop over rows. The random draw of a row is a counter-based hash
of ``(seed, step)``: it depends on nothing else, so a seeded request samples the same
tokens alone or in any batch, whenever it joined it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding [0, 2³²)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform(seeds: torch.Tensor, steps: torch.Tensor | int) -> torch.Tensor:
    """One number in (0, 1) a row, from that row's seed and step: ``(R,) float64``."""
    low = seeds & _MASK32
    high = (seeds >> 32) & _MASK32
    x = _mix32(_mix32(low ^ _mix32(high + 0x9E3779B9)) ^ ((steps * 0x632BE5AB + 0x85EBCA6B) & _MASK32))
    x2 = _mix32(x ^ 0x27D4EB2F)
    return ((x.double() * 2.0**32 + x2.double()) + 0.5) / 2.0**64


@dataclass(frozen=True)
class RowSampling:
    """Sampling settings of a batch, one entry a row."""

    temperature: torch.Tensor  # (R,) float; 0 = greedy
    top_k: torch.Tensor  # (R,) long; 0 = off
    top_p: torch.Tensor  # (R,) float; 1 = off
    seeds: torch.Tensor  # (R,) long
    steps: torch.Tensor  # (R,) long: tokens the row has generated before this draw

    def select(self, rows: torch.Tensor) -> "RowSampling":
        return RowSampling(*(t.index_select(0, rows) for t in (self.temperature, self.top_k, self.top_p,
                                                                self.seeds, self.steps)))


def sample(logits: torch.Tensor, settings: RowSampling) -> torch.Tensor:
    """Next token of each row: ``logits (R, V)`` → ``(R,)`` long."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)  # (R,)
    if not bool((settings.temperature > 0).any()):
        return greedy  # an all-greedy batch needs no sort
    temperature = settings.temperature.clamp(min=1e-5).unsqueeze(-1)  # (R, 1)
    sorted_logits, order = (logits / temperature).sort(dim=-1, descending=True)  # (R, V)
    probs = sorted_logits.softmax(dim=-1)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)  # (V,)
    top_k = torch.where(settings.top_k > 0, settings.top_k, vocab).unsqueeze(-1)  # (R, 1)
    keep = rank < top_k
    keep &= (probs.cumsum(dim=-1) - probs) < settings.top_p.unsqueeze(-1)  # the first token always stays
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = probs.double().cumsum(dim=-1)  # (R, V)
    target = uniform(settings.seeds, settings.steps).to(logits.device).unsqueeze(-1) * cdf[:, -1:]  # (R, 1)
    choice = torch.searchsorted(cdf, target).clamp(max=vocab - 1)  # (R, 1)
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(settings.temperature > 0, sampled, greedy)
