"""One dictionary's work inside a batched forward: per-row edits and feature read-outs.

A :class:`DictionaryHook` is built once a batch from every row's edits on one dictionary.
The edits become tensors gathered by row index (the rows that have edits, the union ``S``
of edited features, and the affine ``f' = a·f + b`` of each row and feature for prompt and
for generated positions), so the hook has no Python loop over rows:

    h_rows = h[rows]                                       # (R', T, d)
    f      = encode_S(h_rows)                              # (R', T, |S|)  only S for relu/jumprelu
    f'     = a·f + b                                       # per row, feature and position kind
    h'     = h + index_add(rows, (f' − f)·W_dec[S])        # other rows are not touched

The engine tells the hook which positions of the current call are pads, prompt or
generated tokens (``kinds``), and from which position they are new (so a forward without
a KV cache, which recomputes old positions, does not count them twice in the report).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from editing.edits import EditSpec

PAD, PROMPT, GENERATED = 0, 1, 2


@dataclass
class StepContext:
    """What the engine knows about the positions of the current forward call."""

    kinds: torch.Tensor  # (R, T) int8: PAD / PROMPT / GENERATED
    new_from: int  # positions >= new_from are seen for the first time
    phase: int | None = None  # PROMPT or GENERATED when every non-pad position is of that kind


class DictionaryHook:
    def __init__(self, name: str, dictionary, row_edits: dict[int, list[EditSpec]], readout_rows: dict[int, int],
                 device: torch.device):
        self.name = name
        self.dictionary = dictionary
        self.context: StepContext | None = None
        dtype = torch.float32

        rows = sorted(row_edits)
        features = sorted({edit.feature for edits in row_edits.values() for edit in edits})
        column = {feature: j for j, feature in enumerate(features)}
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)  # (R',)
        self.features = torch.tensor(features, dtype=torch.long, device=device)  # (|S|,)
        # a, b for [prompt, generated] positions: (2, R', |S|); identity where a row has no edit.
        # Built as Python lists (once a batch), then one tensor each.
        a_table = [[[1.0] * len(features) for _ in rows] for _ in range(2)]
        b_table = [[[0.0] * len(features) for _ in rows] for _ in range(2)]
        for i, row in enumerate(rows):
            for edit in row_edits[row]:  # applied in the order given: f' = a2·(a1·f + b1) + b2
                a, b = edit.affine()
                j = column[edit.feature]
                for kind in {"all": (0, 1), "prompt": (0,), "generated": (1,)}[edit.positions]:
                    a_table[kind][i][j], b_table[kind][i][j] = a * a_table[kind][i][j], a * b_table[kind][i][j] + b
        self.a = torch.tensor(a_table, dtype=dtype, device=device).reshape(2, len(rows), len(features))
        self.b = torch.tensor(b_table, dtype=dtype, device=device).reshape(2, len(rows), len(features))
        self.active = (self.a != 1) | (self.b != 0)  # (2, R', |S|) which edits do something where

        # the edited features' weights, gathered once for every step of the batch
        self.subset = dictionary.subset(self.features) if features else None
        self.decoder_norms = self.subset.W_dec.float().norm(dim=-1) if features else None  # (|S|,)
        # what each call saw, reduced into the report once at the end (keeps the hook short)
        self._seen: list[tuple] = []
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

        # feature read-out: rows -> top_k, computed before this dictionary's edits
        self.readout_rows = torch.tensor(sorted(readout_rows), dtype=torch.long, device=device)
        self.readout_k = max(readout_rows.values(), default=0)
        self.readout_values: list[torch.Tensor] = []  # each (R'', T_new, k)
        self.readout_indices: list[torch.Tensor] = []

    # --- the hook -----------------------------------------------------------------------

    def __call__(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        """``edit_output`` for the hook layer: ``hidden (R, T, d)`` → edited ``hidden``."""
        context = self.context
        if self.readout_k:
            self._read_out(hidden, context)
        if not len(self.rows):
            return hidden
        kinds = context.kinds.index_select(0, self.rows)  # (R', T)
        rows_hidden = hidden.index_select(0, self.rows)  # (R', T, d)
        dictionary = self.dictionary
        x_normed, state = dictionary.normalize(rows_hidden)
        if dictionary.config.architecture == "topk":
            f = dictionary.activation(dictionary.pre_activations(x_normed))[..., self.features]
        else:
            f = dictionary.activation(dictionary.pre_activations(x_normed, self.subset), self.subset)
        f = f.float()  # (R', T, |S|)

        if context.phase is not None:  # one kind of position: no per-position select
            table = 0 if context.phase == PROMPT else 1
            a, b = self.a[table].unsqueeze(1), self.b[table].unsqueeze(1)  # (R', 1, |S|)
            active = self.active[table].unsqueeze(1) & (kinds != PAD).unsqueeze(-1)  # (R', T, |S|), never at pads
        else:
            is_prompt = (kinds == PROMPT).unsqueeze(-1)  # (R', T, 1)
            a = torch.where(is_prompt, self.a[0].unsqueeze(1), self.a[1].unsqueeze(1))  # (R', T, |S|)
            b = torch.where(is_prompt, self.b[0].unsqueeze(1), self.b[1].unsqueeze(1))
            active = torch.where(is_prompt, self.active[0].unsqueeze(1), self.active[1].unsqueeze(1))
            active &= (kinds != PAD).unsqueeze(-1)
        edited = a * f + b
        feature_delta = torch.where(active, edited - f, 0.0)  # (R', T, |S|)
        hidden_delta = dictionary.delta(feature_delta.to(dictionary.dtype), self.subset, state)  # (R', T, d)

        self._accumulate(f, edited, feature_delta, hidden_delta, active, state, context.new_from)
        return hidden.index_add(0, self.rows, hidden_delta.to(hidden.dtype))

    def _accumulate(self, f, edited, feature_delta, hidden_delta, active, state, new_from: int) -> None:
        out_scale = state.out_scale
        if isinstance(out_scale, torch.Tensor):
            out_scale = out_scale[:, new_from:].float()  # (R', T_new, 1)
        norms = hidden_delta[:, new_from:].float().norm(dim=-1)  # (R', T_new)
        self._seen.append((f[:, new_from:], edited.expand_as(f)[:, new_from:], feature_delta[:, new_from:],
                           active[:, new_from:], out_scale, norms))

    def _reduce(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row and feature: count, Σ before, Σ after, changed positions, Σ |Δf|·‖W_dec‖·scale;
        per row: positions edited, Σ ‖Δh‖."""
        if self._stats is None:
            feature_stats = torch.zeros(5, len(self.rows), len(self.features), device=self.rows.device)
            row_stats = torch.zeros(2, len(self.rows), device=self.rows.device)
            for f, edited, feature_delta, active, out_scale, norms in self._seen:
                weight = active.float()
                feature_stats += torch.stack([
                    weight, f * weight, edited * weight, (feature_delta != 0).float(),
                    feature_delta.abs() * self.decoder_norms * out_scale,
                ]).sum(2)
                any_active = active.any(-1).float()  # (R', T_new)
                row_stats += torch.stack([any_active, norms * any_active]).sum(2)
            self._stats, self._seen = (feature_stats.cpu(), row_stats.cpu()), []
        return self._stats

    def _read_out(self, hidden: torch.Tensor, context: StepContext) -> None:
        rows_hidden = hidden.index_select(0, self.readout_rows)[:, context.new_from:]  # (R'', T_new, d)
        acts = self.dictionary.encode(rows_hidden).float()  # (R'', T_new, d_sae)
        top = acts.topk(min(self.readout_k, acts.shape[-1]), dim=-1)
        self.readout_values.append(top.values)
        self.readout_indices.append(top.indices)

    # --- results --------------------------------------------------------------------------

    def report(self, row: int, edits: list[EditSpec]) -> dict:
        """The edit report of one row: what the edits did on this dictionary."""
        i = self.rows.tolist().index(row)
        features = self.features.tolist()
        feature_stats, row_stats = self._reduce()
        count, before, after, changed_count, contribution = feature_stats[:, i].tolist()
        per_feature = []
        for feature in sorted({edit.feature for edit in edits}):
            j = features.index(feature)
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
        positions, delta_norm_sum = row_stats[:, i].tolist()
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

    def features_of(self, row: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(values, indices)``, each ``(T_total, k)``, of one read-out row."""
        if not self.readout_values:
            return None
        i = self.readout_rows.tolist().index(row)
        values = torch.cat([v[i] for v in self.readout_values], dim=0)
        indices = torch.cat([ix[i] for ix in self.readout_indices], dim=0)
        return values.cpu(), indices.cpu()
