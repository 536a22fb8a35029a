"""What every per-slot table of the running batch shares (a dictionary's edits, a hook point's
steering vectors): tensors with one entry a slot, declared once in ``_BY_SLOT`` as
``name -> (the slot dimension, the value of an empty slot)``, grown by doubling, cleared when a
row leaves and moved with the batch's permutation (:meth:`RunningBatch.reorder`)."""

from __future__ import annotations

import torch


class SlotTable:
    _BY_SLOT: dict[str, tuple[int, object]] = {}

    def __init__(self, device: torch.device):
        self.device = device
        self._selections: dict[tuple, tuple] = {}  # the window's rows, cached until the layout changes

    @property
    def capacity(self) -> int:
        return int(self.edited.shape[0])  # every table has an ``edited`` (slots,) tensor

    def _pad(self, name: str, dim: int, size: int, fill) -> None:
        tensor = getattr(self, name)
        if tensor.shape[dim] >= size:
            return
        shape = list(tensor.shape)
        shape[dim] = size - tensor.shape[dim]
        setattr(self, name, torch.cat([tensor, torch.full(shape, fill, dtype=tensor.dtype, device=self.device)], dim))

    def _grow_slots(self, slots: int) -> int | None:
        """Room for ``slots`` slots; the new capacity when it grew."""
        if slots <= self.capacity:
            return None
        new = max(slots, 2 * self.capacity, 4)
        for name, (dim, fill) in self._BY_SLOT.items():
            self._pad(name, dim, new, fill)
        return new

    def clear(self, slot: int) -> None:
        """Forget whatever ``slot`` held (its row left)."""
        if slot >= self.capacity:
            return
        for name, (dim, fill) in self._BY_SLOT.items():
            getattr(self, name).select(dim, slot).fill_(fill)
        self._selections.clear()

    def move(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        """Slots ``source`` move to slots ``destination`` (the batch's permutation)."""
        self._grow_slots(int(torch.cat([destination, source]).max()) + 1 if len(destination) else 0)
        for name, (dim, _) in self._BY_SLOT.items():
            tensor = getattr(self, name)
            if dim == 0:
                tensor[destination] = tensor[source]
            else:
                tensor[:, destination] = tensor[:, source]
        self._selections.clear()
