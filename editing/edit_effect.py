"""What an edit costs beside what it does: its target effect, its side effect, and their ratio.

    effect = edit_effect(loaded, dictionaries, edits, windows, targets=[" list"])

Each window is run twice with the model's own full forward: clean, and with the edits as
the engine applies them (every position counts as prompt, as in the evaluator's edited
run). The positions the edit *aims at* are those whose residual it changed (where some
edited feature's value moved: for an ablation, where the feature fired). Then:

    target effect   mean over aimed positions and target tokens of
                    log p_edited(target) − log p_clean(target) at that position's prediction
    side effect     KL(clean ‖ edited) and ΔCE (next-token loss, edited − clean) at the positions
                    the edit did not aim at (their change came through attention from aimed
                    positions), and over every position of the held-out windows
    ratio           |target effect| / KL at the other positions: nats moved on the target per
                    nat of collateral KL ("2.1 nats at 0.03 nats of KL" is a ratio of 70)

The target tokens are given (token texts, each one token) or, by default, the top logit-lens
tokens of each edited feature (the tokens its decoder direction promotes most). Standard
errors are over windows (ratios of per-window sums to counts by the delta method). A no-op
edit changes no residual: it aims at nothing, and every effect is exactly zero.
"""

from __future__ import annotations

import contextlib

import torch

from editing.core_metrics import token_kl
from editing.edits import EditError, EditSpec
from editing.engine.edit_tables import static_tables
from editing.lens import logit_lens
from editing.nethook import Trace
from editing.stats import mean_se, ratio_se

LENS_TARGETS = 5  # default targets: this many promoted logit-lens tokens a feature


class _ChangeRecorder:
    """A hook point editor's ``edit_output`` that also records where it changed the residual."""

    def __init__(self, editor):
        self.editor, self.changed = editor, None

    def __call__(self, hidden: torch.Tensor, name: str) -> torch.Tensor:
        edited = self.editor(hidden, name)
        changed = (edited != hidden).any(-1)  # (b, T)
        self.changed = changed if self.changed is None else self.changed | changed
        return edited


def target_ids(tokenizer, texts: list[str], param: str = "target_tokens") -> list[int]:
    """Token ids of target texts, each of which must be exactly one token."""
    ids = []
    for index, text in enumerate(texts):
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise EditError(f"{param}[{index}]: {text!r} is {len(encoded)} tokens; a target must be exactly one token "
                            f"(mind the leading space: ' list' and 'list' differ)", f"{param}[{index}]")
        ids.append(encoded[0])
    return ids


def lens_targets(loaded, dictionaries: dict, edits: list[EditSpec], k: int = LENS_TARGETS) -> list[int]:
    """The union of each edited feature's top ``k`` promoted logit-lens tokens, in order (steering
    vectors have no feature: name targets for them)."""
    found: list[int] = []
    for edit in edits:
        if edit.feature is None:
            continue
        promoted, _, _, _ = logit_lens(dictionaries[edit.dictionary].W_dec[edit.feature : edit.feature + 1],
                                       loaded.model, k)
        found += [int(t) for t in promoted[0] if int(t) not in found]
    return found


def _ratio(sums: list[float], counts: list[float]) -> dict:
    total = sum(counts)
    if not total:
        return {"mean": 0.0, "se": 0.0, "positions": 0}
    mean, se = ratio_se(sums, counts)
    return {"mean": mean, "se": se, "positions": int(total)}


@torch.no_grad()
def edit_effect(loaded, dictionaries: dict, edits: list[EditSpec], windows: torch.Tensor, *,
                targets: list[str] | None = None, batch_windows: int = 8, vectors: dict | None = None,
                feature_max: dict | None = None) -> dict:
    """The target effect, side effect and their ratio of ``edits`` over ``windows (W, T)``
    (``vectors``, ``feature_max``: as :func:`editing.evaluate.evaluate` takes them)."""
    if not edits:
        raise EditError("an edit effect needs at least one edit", "edits")
    model, device = loaded.model, next(loaded.model.parameters()).device
    decode = loaded.tokenizer.decode
    ids_of_targets = target_ids(loaded.tokenizer, targets) if targets else lens_targets(loaded, dictionaries, edits)
    if not ids_of_targets:
        raise EditError("these edits name no feature to take target tokens from: give target_tokens", "target_tokens")
    target_index = torch.tensor(ids_of_targets, dtype=torch.long, device=device)
    sums = {key: [] for key in ("target", "aimed", "target_all", "kl_other", "ce_other", "other", "kl_all", "ce_all")}
    for start in range(0, len(windows), batch_windows):
        ids = windows[start : start + batch_windows].to(device)  # (b, T)
        clean = model(input_ids=ids).logits.float().log_softmax(-1)  # (b, T, V)
        editors = static_tables(dictionaries, edits, len(ids), device, vectors=vectors, feature_max=feature_max)
        recorders = [_ChangeRecorder(editor) for editor in editors]
        with contextlib.ExitStack() as stack:
            for recorder in recorders:
                stack.enter_context(Trace(model, recorder.editor.hook, retain_output=False, edit_output=recorder))
            edited = model(input_ids=ids).logits.float().log_softmax(-1)
        aimed = torch.zeros(ids.shape, dtype=torch.bool, device=device)
        for recorder in recorders:
            if recorder.changed is not None:
                aimed |= recorder.changed
        moved = (edited.index_select(-1, target_index) - clean.index_select(-1, target_index)).mean(-1)  # (b, T)
        sums["target"] += (moved * aimed).sum(-1).tolist()
        sums["aimed"] += aimed.sum(-1).float().tolist()
        sums["target_all"] += moved.mean(-1).tolist()
        kl = token_kl(clean[:, :-1], edited[:, :-1])  # (b, T-1): predictions of a next token
        following = ids[:, 1:].unsqueeze(-1)
        delta_ce = (clean[:, :-1].gather(-1, following) - edited[:, :-1].gather(-1, following)).squeeze(-1)  # (b, T-1)
        other = ~aimed[:, :-1]
        sums["kl_other"] += (kl * other).sum(-1).tolist()
        sums["ce_other"] += (delta_ce * other).sum(-1).tolist()
        sums["other"] += other.sum(-1).float().tolist()
        sums["kl_all"] += kl.mean(-1).tolist()
        sums["ce_all"] += delta_ce.mean(-1).tolist()
    target = _ratio(sums["target"], sums["aimed"])
    kl_other = _ratio(sums["kl_other"], sums["other"])
    pair = lambda values: dict(zip(("mean", "se"), values))  # noqa: E731
    return {
        "edits": [edit.model_dump(exclude_none=True) for edit in edits],
        "targets": [{"token_id": t, "token": decode([t])} for t in ids_of_targets],
        "targets_from": "given" if targets else f"logit lens (top {LENS_TARGETS} promoted tokens of each edited feature)",
        "windows": len(windows),
        "tokens": int(windows.numel()),
        "aimed_positions": target["positions"],
        "target_effect": target,
        "target_effect_all_positions": pair(mean_se(sums["target_all"])),
        "side_effect": {
            "kl_other_positions": kl_other,
            "delta_ce_other_positions": _ratio(sums["ce_other"], sums["other"]),
            "kl_heldout": pair(mean_se(sums["kl_all"])),
            "delta_ce_heldout": pair(mean_se(sums["ce_all"])),
        },
        "ratio": abs(target["mean"]) / kl_other["mean"] if kl_other["mean"] > 0 else None,
        "note": "target effect: mean change in log p of the targets (nats) where the edit changed the residual; "
                "side effect: KL(clean||edited) and CE change elsewhere, and on all held-out positions; "
                "ratio: |target effect| / KL at the other positions",
    }
