"""Steering-vector edits at one hook point inside the running batch, kept by slot.

A :class:`VectorTable` holds, for each slot (row), that row's vector edits at one hook point
(op ``vector``): edit ``e`` of the row is the vector ``value·v`` (or, with
``value_unit: "residual_norm"``, ``value·v/‖v‖`` to be multiplied by the residual's norm at
each position), which position kinds it applies to, and its condition (a number into the
row's conditions, -1 for none). Rows join, move and leave as in the dictionary tables; a
step gathers its window's rows and adds everything in one batched product:

    rows   = the window's slots that have vector edits here                        (R',)
    c      = applies_e · holds_e · real · (‖h‖ if relative_e else 1)               (R', T, E)
    h'     = h + index_add(rows, c @ V[rows])                                      V: (R', E, d)

Rows without vector edits are never touched. The report gives, for each edit, the positions
where it was added and the mean norm of what it added there, and for the row the mean norm
of the total change.
"""

from __future__ import annotations

import torch

from editing.edits import EditSpec
from editing.engine.edit_tables import KINDS, PROMPT, Window
from editing.engine.slot_table import SlotTable


class VectorTable(SlotTable):
    def __init__(self, hook: str, device: torch.device):
        super().__init__(device)
        self.hook, self.name = hook, hook
        self.window: Window | None = None
        self.board = None
        f32 = dict(dtype=torch.float32, device=device)
        self.vectors = torch.zeros(0, 0, 0, **f32)  # (slots, E, d): value·v, or value·v/‖v‖ when relative
        self.norms = torch.zeros(0, 0, **f32)  # (slots, E): ‖vectors‖
        self.relative = torch.zeros(0, 0, dtype=torch.bool, device=device)  # (slots, E): times ‖h‖
        self.cond = torch.full((0, 0), -1, dtype=torch.long, device=device)  # (slots, E)
        self.present = torch.zeros(2, 0, 0, dtype=torch.bool, device=device)  # (2, slots, E): [prompt, generated]
        self.edited = torch.zeros(0, dtype=torch.bool, device=device)  # (slots,)
        self.stats = torch.zeros(3, 0, 0, **f32)  # (3, slots, E): eligible positions, fired positions, Σ ‖added‖
        self.row_stats = torch.zeros(2, 0, **f32)  # (2, slots): positions changed, Σ ‖Δh‖

    _BY_SLOT = {"vectors": (0, 0.0), "norms": (0, 0.0), "relative": (0, False), "cond": (0, -1),
                "present": (1, False), "edited": (0, False), "stats": (1, 0.0), "row_stats": (1, 0.0)}
    _BY_EDIT = {"vectors": (1, 0.0), "norms": (1, 0.0), "relative": (1, False), "cond": (1, -1),
                "present": (2, False), "stats": (2, 0.0)}

    def _grow(self, slots: int, edits: int = 0, width: int = 0) -> None:
        self._grow_slots(slots)
        for name, (dim, fill) in self._BY_EDIT.items():
            self._pad(name, dim, edits, fill)
        self._pad("vectors", 2, width, 0.0)

    def add_row(self, slot: int, edits: list[EditSpec], vectors: dict, conditions: dict) -> None:
        """Write a joining row's vector edits at this hook point into ``slot``; ``vectors``: name ->
        :class:`~dictionaries.vectors.SteeringVector`, ``conditions``: the row's condition numbers."""
        width = max((vectors[edit.vector].d for edit in edits), default=0)
        self._grow(slot + 1, len(edits), width)
        self.clear(slot)
        for e, edit in enumerate(edits):
            v = vectors[edit.vector].vector.to(self.device, torch.float32)  # (d,)
            relative = edit.value_unit == "residual_norm"
            row = edit.value * (v / v.norm() if relative else v)
            self.vectors[slot, e, : len(row)] = row
            self.norms[slot, e] = row.norm()
            self.relative[slot, e] = relative
            self.cond[slot, e] = conditions[edit.when] if edit.when is not None else -1
            for kind in KINDS[edit.positions]:
                self.present[kind, slot, e] = True
        self.edited[slot] = bool(edits)
        self._selections.clear()

    def in_use(self) -> bool:
        return bool(self.edited.any())

    # --- the hook ---------------------------------------------------------------------------

    def _rows(self, window: Window) -> tuple:
        key = (window.lo, window.hi, window.layout)
        if key not in self._selections:
            hi = max(window.lo, min(window.hi, self.capacity))
            relative = self.edited[window.lo : hi].nonzero().flatten()
            slots = relative + window.lo
            conditional = bool((self.cond.index_select(0, slots) >= 0).any())
            scaled = bool(self.relative.index_select(0, slots).any())
            self._selections[key] = (relative, slots, conditional, scaled)
        return self._selections[key]

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden (R, T, d)`` of the window → ``hidden`` plus each row's vectors where they apply."""
        window = self.window
        rows, slots, conditional, scaled = self._rows(window)
        if not len(rows):
            return hidden
        kind = 0 if window.phase == PROMPT else 1
        steps = hidden.shape[1]
        present = self.present[kind].index_select(0, slots)  # (R', E)
        applies = present.unsqueeze(1).expand(-1, steps, -1)  # (R', T, E)
        if conditional:
            applies = applies & self.board.read(rows, self.cond.index_select(0, slots))
        real = window.real.index_select(0, rows).unsqueeze(-1) if window.real is not None else None  # (R', T, 1)
        if real is not None:  # never at padding
            applies = applies & real
        coefficient = applies.float()  # (R', T, E)
        if scaled:
            norm = hidden.index_select(0, rows).float().norm(dim=-1, keepdim=True)  # (R', T, 1)
            coefficient = coefficient * torch.where(self.relative.index_select(0, slots).unsqueeze(1), norm, 1.0)
        vectors = self.vectors.index_select(0, slots)[..., : hidden.shape[-1]]  # (R', E, d)
        delta = torch.bmm(coefficient, vectors)  # (R', T, d)
        eligible = present * (real.sum(1) if real is not None else steps)  # (R', E)
        added = (coefficient * self.norms.index_select(0, slots).unsqueeze(1)).sum(1)  # (R', E)
        self.stats.index_add_(1, slots, torch.stack([eligible.float(), applies.float().sum(1), added]))
        any_applied = applies.any(-1).float()  # (R', T)
        self.row_stats.index_add_(1, slots, torch.stack([any_applied, delta.norm(dim=-1) * any_applied]).sum(2))
        return hidden.index_add(0, rows, delta.to(hidden.dtype))

    # --- results ----------------------------------------------------------------------------

    def report(self, slot: int, edits: list[EditSpec]) -> dict:
        """What the row's vector edits at this hook point did."""
        eligible, fired, added = self.stats[:, slot].cpu().tolist()
        positions, delta_norm_sum = self.row_stats[:, slot].cpu().tolist()
        entries = []
        for e, edit in enumerate(edits):
            entry = {"vector": edit.vector, "op": edit.label(), "positions": int(fired[e]),
                     "mean_added_norm": added[e] / fired[e] if fired[e] else None}
            if edit.when is not None:
                entry |= {"when": edit.when.model_dump(exclude_none=True), "eligible_positions": int(eligible[e]),
                          "fired_positions": int(fired[e])}
            entries.append(entry)
        positions = int(positions)
        result = {"dictionary": None, "vectors": entries, "hook": self.hook, "positions_edited": positions,
                  "mean_delta_norm": delta_norm_sum / positions if positions else 0.0, "features": [],
                  "changed": positions > 0}
        if not positions:
            result["note"] = "the vector edits changed nothing: no condition held at any edited position"
        return result
