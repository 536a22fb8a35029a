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
        # a, b for [prompt, generated] positions: (2, R', |S|); identity where a row has no edit
        self.a = torch.ones(2, len(rows), len(features), dtype=dtype)
        self.b = torch.zeros(2, len(rows), len(features), dtype=dtype)
        for i, row in enumerate(rows):
            for edit in row_edits[row]:  # applied in the order given: f' = a2·(a1·f + b1) + b2
                a, b = edit.affine()
                kinds = {"all": (0, 1), "prompt": (0,), "generated": (1,)}[edit.positions]
                for kind in kinds:
                    j = column[edit.feature]
                    self.a[kind, i, j], self.b[kind, i, j] = a * self.a[kind, i, j], a * self.b[kind, i, j] + b
        self.a, self.b = self.a.to(device), self.b.to(device)
        self.active = (self.a != 1) | (self.b != 0)  # (2, R', |S|) which edits do something where

        # report accumulators, per edited row and feature
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.before_sum, self.after_sum = zeros(len(rows), len(features)), zeros(len(rows), len(features))
        self.count, self.changed = zeros(len(rows), len(features)), zeros(len(rows), len(features))
        self.contribution_sum = zeros(len(rows), len(features))
        self.positions_edited, self.delta_norm_sum = zeros(len(rows)), zeros(len(rows))
        self.decoder_norms = dictionary.W_dec[self.features].float().norm(dim=-1) if features else None  # (|S|,)

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
            f = dictionary.activation(dictionary.pre_activations(x_normed, self.features), self.features)
        f = f.float()  # (R', T, |S|)

        is_prompt = (kinds == PROMPT).unsqueeze(-1)  # (R', T, 1)
        is_generated = (kinds == GENERATED).unsqueeze(-1)
        a = torch.where(is_prompt, self.a[0].unsqueeze(1), self.a[1].unsqueeze(1))  # (R', T, |S|)
        b = torch.where(is_prompt, self.b[0].unsqueeze(1), self.b[1].unsqueeze(1))
        active = torch.where(is_prompt, self.active[0].unsqueeze(1), self.active[1].unsqueeze(1))
        active = active & (is_prompt | is_generated)  # never at pads
        edited = a * f + b
        feature_delta = torch.where(active, edited - f, torch.zeros_like(f))  # (R', T, |S|)
        hidden_delta = dictionary.delta(feature_delta.to(dictionary.dtype), self.features, state)  # (R', T, d)
        hidden_delta = torch.where(active.any(-1, keepdim=True), hidden_delta, torch.zeros_like(hidden_delta))

        self._accumulate(f, edited, feature_delta, hidden_delta, active, state, context.new_from)
        return hidden.index_add(0, self.rows, hidden_delta.to(hidden.dtype))

    def _accumulate(self, f, edited, feature_delta, hidden_delta, active, state, new_from: int) -> None:
        active = active[:, new_from:]  # (R', T_new, |S|)
        weight = active.double()
        self.count += weight.sum(1)
        self.before_sum += (torch.where(active, f[:, new_from:], 0.0).double()).sum(1)
        self.after_sum += (torch.where(active, edited[:, new_from:], 0.0).double()).sum(1)
        self.changed += (active & (feature_delta[:, new_from:] != 0)).double().sum(1)
        out_scale = state.out_scale
        if isinstance(out_scale, torch.Tensor):
            out_scale = out_scale[:, new_from:].float()  # (R', T_new, 1)
        contribution = feature_delta[:, new_from:].abs() * self.decoder_norms * out_scale
        self.contribution_sum += torch.where(active, contribution, 0.0).double().sum(1)
        any_active = active.any(-1)  # (R', T_new)
        self.positions_edited += any_active.double().sum(1)
        norms = hidden_delta[:, new_from:].float().norm(dim=-1)  # (R', T_new)
        self.delta_norm_sum += torch.where(any_active, norms, 0.0).double().sum(1)

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
        count = self.count[i].cpu()
        per_feature = []
        for feature in sorted({edit.feature for edit in edits}):
            j = features.index(feature)
            n = float(count[j])
            per_feature.append({
                "feature": feature,
                "ops": [edit.label() for edit in edits if edit.feature == feature],
                "positions": int(n),
                "mean_before": float(self.before_sum[i, j]) / n if n else None,
                "mean_after": float(self.after_sum[i, j]) / n if n else None,
                "mean_delta_norm": float(self.contribution_sum[i, j]) / n if n else None,
                "changed_positions": int(self.changed[i, j]),
            })
        positions = int(self.positions_edited[i])
        changed = any(entry["changed_positions"] for entry in per_feature)
        result = {
            "dictionary": self.name,
            "hook": self.dictionary.config.hook,
            "positions_edited": positions,
            "mean_delta_norm": float(self.delta_norm_sum[i]) / positions if positions else 0.0,
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
