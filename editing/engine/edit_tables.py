"""One dictionary's per-row edits and feature read-outs inside the running batch, kept by slot.

A :class:`DictionaryTable` holds, for each slot (row) of the batch, that row's edits on one
dictionary as tensors: the union ``S`` of edited features, and for every row and feature
the affine map ``f' = a·f + b`` for prompt and for generated positions. When rows join,
move or leave, the table is updated (a row written, rows moved with the batch's
permutation, feature columns added or dropped); a step only gathers the rows of its
window, so the hook has no Python loop over rows:

    rows   = the window's slots that have edits on this dictionary          (R',)
    f      = encode_S(h[rows])                                               (R', T, |S|)  only S for relu/jumprelu
    f'     = a·f + b                                                         per row, feature, position kind
    h'     = h + index_add(rows, (f' − f)·W_dec[S])                          other rows are not touched

Rows without edits are never touched, so they are the plain model. What the edits did
(positions, mean activation before/after, norm of the change) is summed into per-slot
tensors as the row runs, and read out into the edit report when it finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.edits import EditSpec

PAD, PROMPT, GENERATED = 0, 1, 2
_STATS = 5  # per row and feature: positions, Σ before, Σ after, changed positions, Σ |Δf|·‖W_dec‖·scale


@dataclass(frozen=True)
class Window:
    """The rows and positions of the current forward, as the hooks need them."""

    lo: int  # the slots lo..hi-1, in this order, are the forward's rows
    hi: int
    phase: int  # PROMPT (a prefill chunk) or GENERATED (a decode step: each row's last token fed back)
    real: torch.Tensor | None = None  # (R, T) bool: real tokens, False at padding; None: all real
    counts: torch.Tensor | None = None  # (R,) real tokens a row (read-out offsets); None: T each
    layout: int = 0  # the batch's layout version (row selections are cached per version)


class DictionaryTable:
    def __init__(self, name: str, dictionary, device: torch.device):
        self.name, self.dictionary, self.device = name, dictionary, device
        self.window: Window | None = None
        self.features = torch.zeros(0, dtype=torch.long, device=device)  # (|S|,)
        self.column: dict[int, int] = {}
        self.subset = None
        self.decoder_norms = None
        f32 = dict(dtype=torch.float32, device=device)
        self.a = torch.ones(2, 0, 0, **f32)  # (2, slots, |S|): [prompt, generated]
        self.b = torch.zeros(2, 0, 0, **f32)
        self.active = torch.zeros(2, 0, 0, dtype=torch.bool, device=device)  # the edit changes something
        self.uses = torch.zeros(0, 0, dtype=torch.bool, device=device)  # (slots, |S|): the row names the feature
        self.edited = torch.zeros(0, dtype=torch.bool, device=device)  # (slots,)
        self.stats = torch.zeros(_STATS, 0, 0, **f32)  # (5, slots, |S|)
        self.row_stats = torch.zeros(2, 0, **f32)  # (2, slots): positions edited, Σ ‖Δh‖
        self.readout_k = torch.zeros(0, dtype=torch.long, device=device)  # (slots,), 0 = no read-out
        self.readout_values: torch.Tensor | None = None  # (slots, positions, k)
        self.readout_indices: torch.Tensor | None = None
        self.readout_written = torch.zeros(0, dtype=torch.long, device=device)  # (slots,)
        self._selections: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- rows joining, moving, leaving ------------------------------------------------------

    @property
    def capacity(self) -> int:
        return int(self.edited.shape[0])

    def _grow_rows(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        new = max(slots, 2 * self.capacity, 4)

        def grow(tensor, dim, fill):
            shape = list(tensor.shape)
            shape[dim] = new - tensor.shape[dim]
            return torch.cat([tensor, torch.full(shape, fill, dtype=tensor.dtype, device=self.device)], dim)

        self.a, self.b, self.active = grow(self.a, 1, 1.0), grow(self.b, 1, 0.0), grow(self.active, 1, False)
        self.uses, self.edited = grow(self.uses, 0, False), grow(self.edited, 0, False)
        self.stats, self.row_stats = grow(self.stats, 1, 0.0), grow(self.row_stats, 1, 0.0)
        self.readout_k, self.readout_written = grow(self.readout_k, 0, 0), grow(self.readout_written, 0, 0)
        if self.readout_values is not None:
            self.readout_values, self.readout_indices = grow(self.readout_values, 0, 0.0), grow(self.readout_indices, 0, 0)

    def _set_columns(self, features: list[int]) -> None:
        """Columns become ``features`` (sorted); existing columns keep their values."""
        old = self.column
        keep = torch.tensor([old.get(f, -1) for f in features], dtype=torch.long, device=self.device)
        present = keep >= 0

        def remap(tensor, fill):
            out = torch.full((*tensor.shape[:-1], len(features)), fill, dtype=tensor.dtype, device=self.device)
            if bool(present.any()):
                out[..., present] = tensor.index_select(-1, keep[present])
            return out

        self.a, self.b, self.active = remap(self.a, 1.0), remap(self.b, 0.0), remap(self.active, False)
        self.uses, self.stats = remap(self.uses, False), remap(self.stats, 0.0)
        self.features = torch.tensor(features, dtype=torch.long, device=self.device)
        self.column = {feature: j for j, feature in enumerate(features)}
        # the edited features' weights, gathered once for every step until S changes
        self.subset = self.dictionary.subset(self.features) if features else None
        self.decoder_norms = self.subset.W_dec.float().norm(dim=-1) if features else None  # (|S|,)

    def add_row(self, slot: int, edits: list[EditSpec], readout_k: int = 0, positions: int = 0) -> None:
        """Write a joining row's edits (applied in the order given) and read-out into ``slot``;
        ``positions``: how many positions its read-out may need."""
        self._grow_rows(slot + 1)
        self.clear(slot)
        wanted = sorted({edit.feature for edit in edits})
        if any(feature not in self.column for feature in wanted):
            self._set_columns(sorted(set(self.column) | set(wanted)))
        a, b = [[1.0] * len(self.column) for _ in range(2)], [[0.0] * len(self.column) for _ in range(2)]
        for edit in edits:  # f' = a2·(a1·f + b1) + b2
            scale, shift = edit.affine()
            j = self.column[edit.feature]
            for kind in {"all": (0, 1), "prompt": (0,), "generated": (1,)}[edit.positions]:
                a[kind][j], b[kind][j] = scale * a[kind][j], scale * b[kind][j] + shift
        if edits:
            self.a[:, slot] = torch.tensor(a, device=self.device)
            self.b[:, slot] = torch.tensor(b, device=self.device)
            self.active[:, slot] = (self.a[:, slot] != 1) | (self.b[:, slot] != 0)
            self.uses[slot, [self.column[f] for f in wanted]] = True
            self.edited[slot] = True
        if readout_k:
            self.readout_k[slot] = readout_k
            self._reserve_readout(positions, readout_k)
        self._selections.clear()

    def clear(self, slot: int) -> None:
        """Forget whatever ``slot`` held (its row left)."""
        if slot >= self.capacity:
            return
        self.a[:, slot], self.b[:, slot], self.active[:, slot] = 1.0, 0.0, False
        self.uses[slot], self.edited[slot] = False, False
        self.stats[:, slot], self.row_stats[:, slot] = 0.0, 0.0
        self.readout_k[slot], self.readout_written[slot] = 0, 0
        self._selections.clear()

    def move(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        """Slots ``source`` move to slots ``destination`` (the batch's permutation)."""
        self._grow_rows(int(torch.cat([destination, source]).max()) + 1 if len(destination) else 0)
        for name in ("edited", "uses", "readout_k", "readout_written"):
            tensor = getattr(self, name)
            tensor[destination] = tensor[source]
        for name in ("a", "b", "active", "stats", "row_stats"):
            tensor = getattr(self, name)
            tensor[:, destination] = tensor[:, source]
        if self.readout_values is not None:
            self.readout_values[destination] = self.readout_values[source]
            self.readout_indices[destination] = self.readout_indices[source]
        self._selections.clear()

    def in_use(self) -> bool:
        return bool(self.edited.any()) or bool((self.readout_k > 0).any())

    def drop_unused_features(self) -> None:
        """After rows left: stop encoding features no remaining row edits."""
        used = self.uses.any(0)  # (|S|,)
        if not bool(used.all()):
            self._set_columns([f for f, keep in zip(self.features.tolist(), used.tolist()) if keep])

    def _reserve_readout(self, positions: int, k: int) -> None:
        size = (self.capacity, positions, k)
        if self.readout_values is not None and all(have >= want for have, want in zip(self.readout_values.shape, size)):
            return
        old_values, old_indices = self.readout_values, self.readout_indices
        shape = (self.capacity, max(positions, old_values.shape[1] * 2 if old_values is not None else 0),
                 max(k, old_values.shape[2] if old_values is not None else 0))
        self.readout_values = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.readout_indices = torch.zeros(shape, dtype=torch.long, device=self.device)
        if old_values is not None:
            self.readout_values[: old_values.shape[0], : old_values.shape[1], : old_values.shape[2]] = old_values
            self.readout_indices[: old_values.shape[0], : old_values.shape[1], : old_values.shape[2]] = old_indices

    # --- the hook ---------------------------------------------------------------------------

    def _rows(self, which: str, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        """The window's rows that have edits (``which="edits"``) or a read-out (``"readout"``):
        their positions in the forward and their slots; cached until the batch's layout changes."""
        key = (which, window.lo, window.hi, window.layout)
        if key not in self._selections:
            hi = max(window.lo, min(window.hi, self.capacity))
            wanted = self.edited[window.lo : hi] if which == "edits" else self.readout_k[window.lo : hi] > 0
            relative = wanted.nonzero().flatten()
            self._selections[key] = (relative, relative + window.lo)
        return self._selections[key]

    def __call__(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """``edit_output`` for the hook layer: ``hidden (R, T, d)`` of the window → edited ``hidden``."""
        window = self.window
        if self.readout_values is not None:
            self._read_out(hidden, window)
        rows, slots = self._rows("edits", window)
        if not len(rows):
            return hidden
        dictionary = self.dictionary
        x_normed, state = dictionary.normalize(hidden.index_select(0, rows))  # (R', T, d)
        if dictionary.config.architecture == "topk":
            f = dictionary.activation(dictionary.pre_activations(x_normed))[..., self.features]
        else:
            f = dictionary.activation(dictionary.pre_activations(x_normed, self.subset), self.subset)
        f = f.float()  # (R', T, |S|)
        table = 0 if window.phase == PROMPT else 1
        a = self.a[table].index_select(0, slots).unsqueeze(1)  # (R', 1, |S|)
        b = self.b[table].index_select(0, slots).unsqueeze(1)
        active = self.active[table].index_select(0, slots).unsqueeze(1).expand_as(f)  # (R', T, |S|)
        if window.real is not None:  # never at padding
            active = active & window.real.index_select(0, rows).unsqueeze(-1)
        edited = a * f + b
        feature_delta = torch.where(active, edited - f, 0.0)  # (R', T, |S|)
        hidden_delta = dictionary.delta(feature_delta.to(dictionary.dtype), self.subset, state)  # (R', T, d)
        self._accumulate(slots, f, edited, feature_delta, hidden_delta, active, state.out_scale)
        return hidden.index_add(0, rows, hidden_delta.to(hidden.dtype))

    def _accumulate(self, slots, f, edited, feature_delta, hidden_delta, active, out_scale) -> None:
        if isinstance(out_scale, torch.Tensor):
            out_scale = out_scale.float()  # (R', T, 1)
        weight = active.float()  # (R', T, |S|)
        per_feature = torch.stack([
            weight, f * weight, edited * weight, (feature_delta != 0).float(),
            feature_delta.abs() * self.decoder_norms * out_scale,
        ]).sum(2)  # (5, R', |S|)
        any_active = active.any(-1).float()  # (R', T)
        per_row = torch.stack([any_active, hidden_delta.float().norm(dim=-1) * any_active]).sum(2)  # (2, R')
        self.stats.index_add_(1, slots, per_feature)
        self.row_stats.index_add_(1, slots, per_row)

    def _read_out(self, hidden: torch.Tensor, window: Window) -> None:
        """Top features at every position of the read-out rows, before this dictionary's edits."""
        rows, slots = self._rows("readout", window)
        if not len(rows):
            return
        steps = hidden.shape[1]
        written = self.readout_written.index_select(0, slots)  # (R'',)
        self._reserve_readout(int(written.max()) + steps, self.readout_values.shape[2])
        acts = self.dictionary.encode(hidden.index_select(0, rows)).float()  # (R'', T, d_sae)
        top = acts.topk(min(self.readout_values.shape[2], acts.shape[-1]), dim=-1)  # (R'', T, k)
        columns = written.unsqueeze(1) + torch.arange(steps, device=self.device)  # (R'', T)
        k = top.values.shape[-1]
        self.readout_values[slots.unsqueeze(1), columns, :k] = top.values
        self.readout_indices[slots.unsqueeze(1), columns, :k] = top.indices
        counts = window.counts.index_select(0, rows) if window.counts is not None else steps
        self.readout_written.index_add_(0, slots, torch.as_tensor(counts, device=self.device).expand(len(slots)))

    # --- results ----------------------------------------------------------------------------

    def report(self, slot: int, edits: list[EditSpec]) -> dict:
        """The edit report of the row in ``slot``: what its edits did on this dictionary."""
        count, before, after, changed_count, contribution = self.stats[:, slot].cpu().tolist()
        positions, delta_norm_sum = self.row_stats[:, slot].cpu().tolist()
        per_feature = []
        for feature in sorted({edit.feature for edit in edits}):
            j = self.column[feature]
            n = count[j]
            per_feature.append({
                "feature": feature,
                "ops": [edit.label() for edit in edits if edit.feature == feature],
                "positions": int(n),
                "mean_before": before[j] / n if n else None,
                "mean_after": after[j] / n if n else None,
                "mean_delta_norm": contribution[j] / n if n else None,
                "changed_positions": int(changed_count[j]),
            })
        positions = int(positions)
        changed = any(entry["changed_positions"] for entry in per_feature)
        result = {
            "dictionary": self.name,
            "hook": self.dictionary.config.hook,
            "positions_edited": positions,
            "mean_delta_norm": delta_norm_sum / positions if positions else 0.0,
            "features": per_feature,
            "changed": changed,
        }
        if not changed:
            result["note"] = ("the edits changed nothing: the edited features were already at their target "
                              "value (e.g. ablating features that never fired) at every edited position")
        return result

    def read_features(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)``, each ``(positions, k)``, of the read-out row in ``slot``."""
        n, k = int(self.readout_written[slot]), int(self.readout_k[slot])
        return self.readout_values[slot, :n, :k].cpu(), self.readout_indices[slot, :n, :k].cpu()


def static_tables(dictionaries: dict, edits: list[EditSpec], rows: int, device: torch.device) -> list[DictionaryTable]:
    """Tables applying the same ``edits`` to every one of ``rows`` rows at every position
    (a full forward counted as prompt: the evaluator's edited run), in layer order."""
    names = sorted({edit.dictionary for edit in edits}, key=lambda n: (dictionaries[n].config.layer, n))
    window = Window(0, rows, PROMPT)
    tables = []
    for name in names:
        table = DictionaryTable(name, dictionaries[name], device)
        mine = [edit for edit in edits if edit.dictionary == name]
        for row in range(rows):
            table.add_row(row, mine)
        table.window = window
        tables.append(table)
    return tables
