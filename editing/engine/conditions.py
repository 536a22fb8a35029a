"""Conditional edits: where each row's conditions hold, at every position of a forward.

A row's distinct conditions (``when`` on its edits) are numbered ``0..K-1`` when it is
admitted (:func:`condition_index`). During a forward, the dictionary table a condition reads
writes whether it holds at each of the row's positions into the board (on the residual as
it arrives at that hook point, before any edit there); tables and vector tables at the same
hook point or a later one read it by index. The board is reset at the first hook point of
every forward, so nothing carries over from one forward to the next.

    holds   (R, T, K) bool     R: the forward's rows, T: its positions
"""

from __future__ import annotations

import torch


def condition_index(edits) -> dict:
    """The row's distinct conditions, numbered in the order its edits name them."""
    index: dict = {}
    for edit in edits:
        if edit.when is not None and edit.when not in index:
            index[edit.when] = len(index)
    return index


class ConditionBoard:
    def __init__(self, device: torch.device):
        self.device = device
        self.width = 0  # K: the most conditions a row of the batch has had
        self.holds: torch.Tensor | None = None  # (R, T, K) for the current forward

    def reserve(self, width: int) -> None:
        self.width = max(self.width, width)

    def begin(self, rows: int, steps: int) -> None:
        """A new forward over ``rows`` rows of ``steps`` positions."""
        self.holds = torch.zeros(rows, steps, self.width, dtype=torch.bool, device=self.device) if self.width else None

    def write(self, rows: torch.Tensor, holds: torch.Tensor, mine: torch.Tensor) -> None:
        """``holds (R'', T, K')`` for the forward's rows ``rows``; only entries where ``mine (R'', K')``."""
        width = holds.shape[-1]
        current = self.holds.index_select(0, rows)[..., :width]  # (R'', T, K')
        self.holds[rows, :, :width] = torch.where(mine.unsqueeze(1), holds, current)

    def read(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``index (R', X)`` condition numbers (-1: none, always holds) → ``(R', T, X)`` bool."""
        held = self.holds.index_select(0, rows)  # (R', T, K)
        gathered = held.gather(-1, index.clamp(min=0).unsqueeze(1).expand(-1, held.shape[1], -1))  # (R', T, X)
        return gathered | (index < 0).unsqueeze(1)
