"""The key/value cache of the running batch: preallocated slots with per-row lengths.

    cache = SlotCache(model.config, dtype, device)
    cache.reserve(rows=4, columns=40)
    mask, positions = cache.window(lo, hi, new_tokens=T)      # rows lo..hi-1 take T new tokens
    model.gpt_neox(input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    cache.advance(lo, hi, counts)                              # how many of the T were real, a row

Every layer's keys and values live in one tensor ``(rows, heads, columns, head_dim)``. A
row (a *slot*) writes its new keys at its own length, so rows of any length share a
forward without left padding; the attention mask built here gives each query the
columns ``≤`` its own position in its own row and hides everything else (columns past a
row's length hold stale values of an earlier occupant or padding; they get exactly zero
weight).

Why slots, and not TGI's concatenate/filter of left-padded caches: with left padding every
join that brings a longer row shifts the whole cache right, every leave copies the rows
that remain, and Hugging Face's ``DynamicCache`` concatenates the whole cache again on
every step. Here a step writes only the new columns, a join writes only its own slot, and
a leave copies only the rows that move into the freed slots (:meth:`move`). Capacity
grows by doubling (rows up to the scheduler's row limit, columns up to the model's
positions); the buffers are dropped when the batch empties, so an idle replica holds no
key/value memory.

The object is what the model's attention layers call: ``update(key, value, layer_idx)``
writes the new keys of the current window and returns views of the window's rows. The
scheduler runs two kinds of forward a step, decode rows (one token each) and prefill rows
(a chunk of their prompt each); each is a contiguous slot range.
"""

from __future__ import annotations

import torch


class SlotCache:
    def __init__(self, config, dtype: torch.dtype, device: torch.device, max_rows: int):
        self.max_rows = max_rows
        self.n_layers = int(config.num_hidden_layers)
        self.n_heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.n_heads
        self.max_columns = int(config.max_position_embeddings)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []  # each (rows, heads, columns, head_dim)
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(0, dtype=torch.long, device=device)  # (rows,) tokens cached a slot
        self._window: tuple[int, int, torch.Tensor, torch.Tensor, int] | None = None

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def columns(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for ``rows`` slots of ``columns`` positions (doubling, so growth is rare)."""
        if rows <= self.rows and columns <= self.columns:
            return
        new_rows = self.rows if rows <= self.rows else max(rows, min(self.max_rows, max(2 * self.rows, 4)))
        new_columns = self.columns if columns <= self.columns else max(columns, min(self.max_columns, max(2 * self.columns, 64)))
        shape = (new_rows, self.n_heads, new_columns, self.head_dim)
        for store in (self.keys, self.values):
            for layer in range(self.n_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if store and len(store) > layer:
                    old = store[layer]
                    grown[: old.shape[0], :, : old.shape[2]] = old
                    store[layer] = grown
                else:
                    store.append(grown)
        lengths = torch.zeros(new_rows, dtype=torch.long, device=self.device)
        lengths[: self.rows] = self.lengths
        self.lengths = lengths

    def release(self) -> None:
        """Drop the buffers (the batch is empty)."""
        self.keys, self.values = [], []
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)

    # --- one forward ----------------------------------------------------------------------

    def window(self, lo: int, hi: int, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the rows ``lo..hi-1`` for the next forward, each taking ``new_tokens`` positions
        after its own length. Returns the additive attention mask ``(R, 1, T, W)`` and the
        position ids ``(R, T)``."""
        lengths = self.lengths[lo:hi]  # (R,)
        width = int(lengths.max()) + new_tokens if hi > lo else new_tokens
        self.reserve(hi, width)
        query = lengths.unsqueeze(1) + torch.arange(new_tokens, device=self.device)  # (R, T) own column
        visible = torch.arange(width, device=self.device).view(1, 1, width) <= query.unsqueeze(-1)  # (R, T, W)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        self._window = (lo, hi, query, torch.arange(lo, hi, device=self.device).unsqueeze(1), width)
        return mask.unsqueeze(1), query.clamp(max=self.max_columns - 1)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Called by each attention layer: write ``key``/``value (R, H, T, D)`` at the window's
        columns, return this layer's keys and values of the window ``(R, H, W, D)``."""
        lo, hi, columns, rows, width = self._window
        self.keys[layer_idx][rows, :, columns] = key.transpose(1, 2).to(self.dtype)  # (R, T, H, D) at (row, column)
        self.values[layer_idx][rows, :, columns] = value.transpose(1, 2).to(self.dtype)
        return self.keys[layer_idx][lo:hi, :, :width], self.values[layer_idx][lo:hi, :, :width]

    def advance(self, lo: int, hi: int, counts: torch.Tensor | int) -> None:
        """After the forward: ``counts`` of the new positions were real tokens (the rest padding)."""
        self.lengths[lo:hi] += counts
        self._window = None

    # --- rows joining and leaving ------------------------------------------------------------

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        """Copy slots ``source`` into slots ``destination`` (both ``(n,)``; a permutation step)."""
        if not len(destination) or not self.keys:
            return
        width = int(self.lengths.index_select(0, source).max())
        for store in (self.keys, self.values):
            for layer in range(self.n_layers):
                store[layer][destination, :, :width] = store[layer][source, :, :width]
        self.lengths[destination] = self.lengths[source]
