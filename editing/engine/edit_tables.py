"""One dictionary's per-row edits, conditions and feature read-outs inside the running batch, kept by slot.

A :class:`DictionaryTable` holds, for each slot (row) of the batch, that row's edits on one
dictionary as tensors: the union ``S`` of the features its rows edit or read conditions
from (the columns), and for every row, feature and *layer* ``l`` (the row's ``l``-th edit on
that feature, in request order) the affine map ``f' = a·f + b``, which position kinds
(prompt, generated) it applies to, and its condition (an index into the row's conditions,
-1 for none). When rows join, move or leave, the table is updated (a row written, rows
moved with the batch's permutation, columns or layers added, columns dropped); a step only
gathers the rows of its window, so the hook has no Python loop over rows:

    rows   = the window's slots that have edits on this dictionary          (R',)
    f      = encode_S(h[rows])                                               (R', T, |S|)  only S for relu/jumprelu
    for l in layers:                                                         (usually one)
        f  = where(applies_l & condition_l holds & real token, a_l·f + b_l, f)
    h'     = h + index_add(rows, (f' − f)·W_dec[S])                          other rows are not touched

Conditions read here are evaluated first, on the residual as it arrives at the hook point,
and written to the batch's :class:`~editing.engine.conditions.ConditionBoard`; when nothing
at the hook point changed the residual before this table's edits, that same encode serves
the edits (one encode for both). ``value_unit: "max_activation"`` is resolved to raw values
when the row is written. Rows without edits are never touched, so they are the plain model.
What the edits did (positions, mean activation before/after, norm of the change, and for
each conditional edit the positions where its condition held) is summed into per-slot
tensors as the row runs, and read out into the edit report when it finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.edits import EditSpec
from editing.engine.slot_table import SlotTable

PAD, PROMPT, GENERATED = 0, 1, 2
KINDS = {"all": (0, 1), "prompt": (0,), "generated": (1,)}  # [prompt, generated] positions an edit applies to
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


def select_state(state, index: torch.Tensor):
    """A :class:`~dictionaries.sae.NormState` for a subset of its rows (per-token normalisations)."""
    return type(state)(*(part.index_select(0, index) if isinstance(part, torch.Tensor) else part for part in state))


class DictionaryTable(SlotTable):
    def __init__(self, name: str, dictionary, device: torch.device):
        super().__init__(device)
        self.name, self.dictionary = name, dictionary
        self.hook = dictionary.config.hook
        self.window: Window | None = None
        self.board = None  # the batch's ConditionBoard, set with the window
        self.features = torch.zeros(0, dtype=torch.long, device=device)  # (|S|,)
        self.column: dict[int, int] = {}
        self.lookup = torch.full((dictionary.config.d_sae,), -1, dtype=torch.long, device=device)  # feature -> column
        self.subset = None
        self.decoder_norms = None
        f32 = dict(dtype=torch.float32, device=device)
        # edits: (slots, |S|, L), layer l = the row's l-th edit on that feature
        self.a = torch.ones(0, 0, 0, **f32)
        self.b = torch.zeros(0, 0, 0, **f32)
        self.cond = torch.full((0, 0, 0), -1, dtype=torch.long, device=device)  # the row's condition number
        self.present = torch.zeros(2, 0, 0, 0, dtype=torch.bool, device=device)  # [prompt, generated]: applies there
        self.active = torch.zeros(2, 0, 0, 0, dtype=torch.bool, device=device)  # ... and changes something
        self.uses = torch.zeros(0, 0, dtype=torch.bool, device=device)  # (slots, |S|): the row names the feature
        self.edited = torch.zeros(0, dtype=torch.bool, device=device)  # (slots,)
        # conditions read from this dictionary: (slots, K), K the batch's condition numbers
        self.cond_feature = torch.full((0, 0), -1, dtype=torch.long, device=device)  # -1: not read here
        self.cond_above = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.cond_threshold = torch.zeros(0, 0, **f32)
        self.conditioned = torch.zeros(0, dtype=torch.bool, device=device)  # (slots,)
        self.stats = torch.zeros(_STATS, 0, 0, **f32)  # (5, slots, |S|)
        self.edit_stats = torch.zeros(2, 0, 0, 0, **f32)  # (2, slots, |S|, L): eligible, fired positions (conditional)
        self.row_stats = torch.zeros(2, 0, **f32)  # (2, slots): positions edited, Σ ‖Δh‖
        self.readout_k = torch.zeros(0, dtype=torch.long, device=device)  # (slots,), 0 = no read-out
        self.readout_values: torch.Tensor | None = None  # (slots, positions, k)
        self.readout_indices: torch.Tensor | None = None
        self.readout_written = torch.zeros(0, dtype=torch.long, device=device)  # (slots,)
        self._encoded = None  # (incoming hidden, rows, f, state) from this forward's condition pass

    # --- rows joining, moving, leaving ------------------------------------------------------

    @property
    def layers(self) -> int:
        return int(self.a.shape[-1])

    _BY_SLOT = {"a": (0, 1.0), "b": (0, 0.0), "cond": (0, -1), "present": (1, False), "active": (1, False),
                "uses": (0, False), "edited": (0, False), "cond_feature": (0, -1), "cond_above": (0, False),
                "cond_threshold": (0, 0.0), "conditioned": (0, False), "stats": (1, 0.0), "edit_stats": (1, 0.0),
                "row_stats": (1, 0.0), "readout_k": (0, 0), "readout_written": (0, 0)}

    def _grow_slots(self, slots: int) -> int | None:
        new = super()._grow_slots(slots)
        if new is not None and self.readout_values is not None:
            self._pad("readout_values", 0, new, 0.0)
            self._pad("readout_indices", 0, new, 0)
        return new

    def _grow_layers(self, layers: int) -> None:
        for name, fill in (("a", 1.0), ("b", 0.0), ("cond", -1), ("present", False), ("active", False),
                           ("edit_stats", 0.0)):
            self._pad(name, -1, layers, fill)

    def _grow_conditions(self, width: int) -> None:
        for name, fill in (("cond_feature", -1), ("cond_above", False), ("cond_threshold", 0.0)):
            self._pad(name, 1, width, fill)

    def _set_columns(self, features: list[int]) -> None:
        """Columns become ``features`` (sorted); existing columns keep their values."""
        old = self.column
        keep = torch.tensor([old.get(f, -1) for f in features], dtype=torch.long, device=self.device)
        present = keep >= 0

        def remap(name, dim, fill):
            tensor = getattr(self, name)
            moved = tensor.movedim(dim, -1)
            out = torch.full((*moved.shape[:-1], len(features)), fill, dtype=tensor.dtype, device=self.device)
            if bool(present.any()):
                out[..., present] = moved.index_select(-1, keep[present])
            setattr(self, name, out.movedim(-1, dim).contiguous())

        for name, fill in (("a", 1.0), ("b", 0.0), ("cond", -1), ("present", False), ("active", False),
                           ("edit_stats", 0.0)):
            remap(name, -2, fill)
        remap("uses", -1, False)
        remap("stats", -1, 0.0)
        self.features = torch.tensor(features, dtype=torch.long, device=self.device)
        self.column = {feature: j for j, feature in enumerate(features)}
        self.lookup.fill_(-1)
        self.lookup[self.features] = torch.arange(len(features), device=self.device)
        # the columns' weights, gathered once for every step until S changes
        self.subset = self.dictionary.subset(self.features) if features else None
        self.decoder_norms = self.subset.W_dec.float().norm(dim=-1) if features else None  # (|S|,)

    def add_row(self, slot: int, edits: list[EditSpec], readout_k: int = 0, positions: int = 0, *,
                conditions: dict | None = None, sources: dict | None = None, feature_max=None) -> None:
        """Write a joining row into ``slot``: its ``edits`` on this dictionary (applied in the order
        given), its read-out (``positions``: how many positions it may need), the numbers of all its
        ``conditions`` and the ``sources`` (conditions read from this dictionary, by number);
        ``feature_max``: the dictionary's recorded maximum activations (``max_activation`` units)."""
        conditions, sources = conditions or {}, sources or {}
        self._grow_slots(slot + 1)
        self.clear(slot)
        wanted = sorted({edit.feature for edit in edits} | {condition.feature for condition in sources})
        if any(feature not in self.column for feature in wanted):
            self._set_columns(sorted(set(self.column) | set(wanted)))
        chains: dict[int, list[EditSpec]] = {}
        for edit in edits:
            chains.setdefault(edit.feature, []).append(edit)
        layers = max((len(chain) for chain in chains.values()), default=0)
        self._grow_layers(layers)
        if edits:
            width, depth = len(self.column), self.layers
            a, b = [[[1.0] * depth for _ in range(width)] for _ in range(2)]
            cond = [[-1] * depth for _ in range(width)]
            present = [[[False] * depth for _ in range(width)] for _ in range(2)]
            for feature, chain in chains.items():
                j = self.column[feature]
                for layer, edit in enumerate(chain):
                    value = edit.value
                    if edit.value_unit == "max_activation":  # resolved once, here
                        value = edit.value * float(feature_max[feature])
                    a[j][layer], b[j][layer] = edit.affine(value)
                    cond[j][layer] = conditions[edit.when] if edit.when is not None else -1
                    for kind in KINDS[edit.positions]:
                        present[kind][j][layer] = True
            self.a[slot], self.b[slot] = torch.tensor(a, device=self.device), torch.tensor(b, device=self.device)
            self.cond[slot] = torch.tensor(cond, dtype=torch.long, device=self.device)
            self.present[:, slot] = torch.tensor(present, device=self.device)
            self.active[:, slot] = self.present[:, slot] & ((self.a[slot] != 1) | (self.b[slot] != 0))
            self.edited[slot] = True
        if sources:
            self._grow_conditions(max(sources.values()) + 1)
            for condition, number in sources.items():
                self.cond_feature[slot, number] = condition.feature
                self.cond_above[slot, number] = condition.above is not None
                self.cond_threshold[slot, number] = condition.threshold
            self.conditioned[slot] = True
        if wanted:
            self.uses[slot, [self.column[f] for f in wanted]] = True
        if readout_k:
            self.readout_k[slot] = readout_k
            self._reserve_readout(positions, readout_k)
        self._selections.clear()

    def move(self, destination: torch.Tensor, source: torch.Tensor) -> None:
        super().move(destination, source)
        if self.readout_values is not None:  # read-outs are per slot too, but sized apart
            self.readout_values[destination] = self.readout_values[source]
            self.readout_indices[destination] = self.readout_indices[source]

    def in_use(self) -> bool:
        return bool(self.edited.any()) or bool(self.conditioned.any()) or bool((self.readout_k > 0).any())

    def drop_unused_features(self) -> None:
        """After rows left: stop encoding features no remaining row edits or reads."""
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

    def _rows(self, which: str, window: Window) -> tuple:
        """The window's rows that have edits (``"edits"``), conditions read here (``"conditions"``),
        either (``"encode"``) or a read-out (``"readout"``): their positions in the forward, their
        slots, and whether any of them has a conditional edit; cached until the layout changes."""
        key = (which, window.lo, window.hi, window.layout)
        if key not in self._selections:
            hi = max(window.lo, min(window.hi, self.capacity))
            edited, conditioned = self.edited[window.lo : hi], self.conditioned[window.lo : hi]
            wanted = {"edits": edited, "conditions": conditioned, "encode": edited | conditioned,
                      "readout": self.readout_k[window.lo : hi] > 0}[which]
            relative = wanted.nonzero().flatten()
            slots = relative + window.lo
            conditional = which == "edits" and bool((self.cond.index_select(0, slots) >= 0).any())
            self._selections[key] = (relative, slots, conditional)
        return self._selections[key]

    def _encode(self, x: torch.Tensor):
        """The columns' activations ``(R, T, |S|)`` (float32) of ``x (R, T, d)`` and its NormState."""
        dictionary = self.dictionary
        x_normed, state = dictionary.normalize(x)
        if dictionary.config.architecture == "topk":
            f = dictionary.activation(dictionary.pre_activations(x_normed))[..., self.features]
        else:
            f = dictionary.activation(dictionary.pre_activations(x_normed, self.subset), self.subset)
        return f.float(), state

    def read_conditions(self, incoming: torch.Tensor) -> None:
        """Write whether the conditions read from this dictionary hold (on ``incoming``, the
        residual as it arrived at the hook point) into the board; keep the encode for the edits."""
        self._encoded = None
        window = self.window
        if not len(self._rows("conditions", window)[0]):
            return
        rows, slots, _ = self._rows("encode", window)
        f, state = self._encode(incoming.index_select(0, rows))  # (R'', T, |S|)
        self._encoded = (incoming, rows, f, state)
        feature = self.cond_feature.index_select(0, slots)  # (R'', K')
        column = self.lookup[feature.clamp(min=0)].clamp(min=0)
        values = f.gather(-1, column.unsqueeze(1).expand(-1, f.shape[1], -1))  # (R'', T, K')
        threshold = self.cond_threshold.index_select(0, slots).unsqueeze(1)
        holds = torch.where(self.cond_above.index_select(0, slots).unsqueeze(1), values > threshold, values < threshold)
        self.board.write(rows, holds, feature >= 0)

    def apply(self, hidden: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
        """This table's part of the hook: ``hidden (R, T, d)`` of the window → edited ``hidden``;
        ``incoming`` is the residual as it arrived at the hook point."""
        window = self.window
        if self.readout_values is not None:
            self._read_out(hidden, window)
        rows, slots, conditional = self._rows("edits", window)
        if not len(rows):
            return hidden
        if self._encoded is not None and hidden is incoming:  # nothing changed it: reuse the condition pass
            _, encoded_rows, f, state = self._encoded
            if len(encoded_rows) != len(rows):
                index = torch.searchsorted(encoded_rows, rows)
                f, state = f.index_select(0, index), select_state(state, index)
        else:
            f, state = self._encode(hidden.index_select(0, rows))  # (R', T, |S|)
        kind = 0 if window.phase == PROMPT else 1
        a, b = self.a.index_select(0, slots), self.b.index_select(0, slots)  # (R', |S|, L)
        active = self.active[kind].index_select(0, slots)
        real = window.real.index_select(0, rows).unsqueeze(-1) if window.real is not None else None  # (R', T, 1)
        if conditional:
            present, cond = self.present[kind].index_select(0, slots), self.cond.index_select(0, slots)
            n_real = real.sum(1) if real is not None else f.shape[1]  # (R', 1) or T
        edited, applied, counts = f, None, []
        for layer in range(a.shape[-1]):
            applies = active[..., layer].unsqueeze(1)  # (R', 1, |S|)
            if conditional:
                applies = applies & self.board.read(rows, cond[..., layer])  # (R', T, |S|)
            if real is not None:  # never at padding
                applies = applies & real
            edited = torch.where(applies, a[..., layer].unsqueeze(1) * edited + b[..., layer].unsqueeze(1), edited)
            applied = applies if applied is None else applied | applies
            if conditional:  # where each conditional edit could apply, and where it did
                counts.append(torch.stack([present[..., layer] * n_real, applies.expand_as(f).sum(1)]))  # (2, R', |S|)
        applied = applied.expand_as(f)  # (R', T, |S|)
        feature_delta = edited - f  # exactly 0 where no edit applied
        hidden_delta = self.dictionary.delta(feature_delta.to(self.dictionary.dtype), self.subset, state)  # (R', T, d)
        self._accumulate(slots, f, edited, feature_delta, hidden_delta, applied, state.out_scale)
        if conditional:
            self.edit_stats.index_add_(1, slots, torch.stack(counts, -1).float())
        return hidden.index_add(0, rows, hidden_delta.to(hidden.dtype))

    def forget(self) -> None:
        self._encoded = None

    def _accumulate(self, slots, f, edited, feature_delta, hidden_delta, applied, out_scale) -> None:
        if isinstance(out_scale, torch.Tensor):
            out_scale = out_scale.float()  # (R', T, 1)
        weight = applied.float()  # (R', T, |S|)
        per_feature = torch.stack([
            weight, f * weight, edited * weight, (feature_delta != 0).float(),
            feature_delta.abs() * self.decoder_norms * out_scale,
        ]).sum(2)  # (5, R', |S|)
        any_applied = applied.any(-1).float()  # (R', T)
        per_row = torch.stack([any_applied, hidden_delta.float().norm(dim=-1) * any_applied]).sum(2)  # (2, R')
        self.stats.index_add_(1, slots, per_feature)
        self.row_stats.index_add_(1, slots, per_row)

    def _read_out(self, hidden: torch.Tensor, window: Window) -> None:
        """Top features at every position of the read-out rows, before this dictionary's edits."""
        rows, slots, _ = self._rows("readout", window)
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
        eligible, fired = self.edit_stats[:, slot].cpu().tolist()  # each (|S|, L)
        b = self.b[slot].cpu().tolist()
        positions, delta_norm_sum = self.row_stats[:, slot].cpu().tolist()
        per_feature = []
        for feature in sorted({edit.feature for edit in edits}):
            j = self.column[feature]
            n = count[j]
            chain = [edit for edit in edits if edit.feature == feature]
            entry = {
                "feature": feature,
                "ops": [edit.label() for edit in chain],
                "positions": int(n),
                "mean_before": before[j] / n if n else None,
                "mean_after": after[j] / n if n else None,
                "mean_delta_norm": contribution[j] / n if n else None,
                "changed_positions": int(changed_count[j]),
            }
            conditional = [{"op": edit.label(), "when": edit.when.model_dump(exclude_none=True),
                            "eligible_positions": int(eligible[j][layer]), "fired_positions": int(fired[j][layer])}
                           for layer, edit in enumerate(chain) if edit.when is not None]
            if conditional:
                entry["conditions"] = conditional
            resolved = [{"op": edit.label(), "raw_value": b[j][layer]}
                        for layer, edit in enumerate(chain) if edit.value_unit == "max_activation"]
            if resolved:
                entry["resolved_values"] = resolved
            per_feature.append(entry)
        positions = int(positions)
        changed = any(entry["changed_positions"] for entry in per_feature)
        result = {
            "dictionary": self.name,
            "hook": self.hook,
            "positions_edited": positions,
            "mean_delta_norm": delta_norm_sum / positions if positions else 0.0,
            "features": per_feature,
            "changed": changed,
        }
        if not changed:
            result["note"] = ("the edits changed nothing: the edited features were already at their target "
                              "value (e.g. ablating features that never fired), or no condition held, at every "
                              "edited position")
        return result

    def read_features(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)``, each ``(positions, k)``, of the read-out row in ``slot``."""
        n, k = int(self.readout_written[slot]), int(self.readout_k[slot])
        return self.readout_values[slot, :n, :k].cpu(), self.readout_indices[slot, :n, :k].cpu()


def static_tables(dictionaries: dict, edits: list[EditSpec], rows: int, device: torch.device, *,
                  vectors: dict | None = None, feature_max: dict | None = None) -> list:
    """Hook-point editors applying the same ``edits`` (feature, vector and conditional edits) to
    every one of ``rows`` rows at every position (a full forward counted as prompt: the
    evaluator's edited run), in hook order; enter them with
    :func:`~editing.engine.editors.edit_hooks`."""
    from editing.edits import dictionaries_named
    from editing.engine.conditions import ConditionBoard, condition_index
    from editing.engine.editors import point_editors
    from editing.engine.vector_tables import VectorTable

    vectors, feature_max = vectors or {}, feature_max or {}
    conditions = condition_index(edits)
    board = ConditionBoard(device)
    board.reserve(len(conditions))
    tables, vector_tables = [], {}
    for name in sorted(dictionaries_named(edits)):
        table = DictionaryTable(name, dictionaries[name], device)
        mine = [edit for edit in edits if edit.dictionary == name]
        sources = {condition: k for condition, k in conditions.items() if condition.dictionary == name}
        for row in range(rows):
            table.add_row(row, mine, conditions=conditions, sources=sources, feature_max=feature_max.get(name))
        tables.append(table)
    for edit in edits:
        if edit.op == "vector":
            vector_tables.setdefault(vectors[edit.vector].hook, []).append(edit)
    for hook, mine in list(vector_tables.items()):
        table = vector_tables[hook] = VectorTable(hook, device)
        for row in range(rows):
            table.add_row(row, mine, vectors, conditions)
    return point_editors(tables, list(vector_tables.values()), board, Window(0, rows, PROMPT))
