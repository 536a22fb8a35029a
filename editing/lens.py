"""The logit lens of dictionary directions, and running a GPT-NeoX from a hook point upwards.

``logit_lens`` maps each decoder row through the final LayerNorm (its mean removal and
gain) and the unembedding, and returns the most promoted and suppressed tokens.
``logits_from_hook`` finishes a forward pass from an activation at a hook point, so the
evaluator can compute the layers below once and share them between variants.
"""

from __future__ import annotations

import torch

from editing.hookpoints import parse_hook_name, transformer_layers


@torch.no_grad()
def logit_lens(directions: torch.Tensor, model, k: int = 10) -> tuple[torch.Tensor, ...]:
    """``directions (F, d)`` → (promoted ids, values, suppressed ids, values), each ``(F, k)``."""
    directions = directions.float()
    directions = directions - directions.mean(-1, keepdim=True)  # the final LayerNorm removes the mean
    norm = getattr(getattr(model, "gpt_neox", model), "final_layer_norm", None)
    if norm is not None:
        directions = directions * norm.weight.float().to(directions.device)
    unembed = model.get_output_embeddings().weight.float().to(directions.device)  # (V, d)
    promoted, suppressed = [], []
    for chunk in directions.split(1024):
        logits = chunk @ unembed.T  # (f, V)
        promoted.append(logits.topk(k, dim=-1))
        suppressed.append((-logits).topk(k, dim=-1))
    return (torch.cat([p.indices for p in promoted]).int().cpu(), torch.cat([p.values for p in promoted]).cpu(),
            torch.cat([s.indices for s in suppressed]).int().cpu(), -torch.cat([s.values for s in suppressed]).cpu())


@torch.no_grad()
def logits_from_hook(model, hook: str, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, T, V)`` of full, unpadded windows whose activation at ``hook`` is ``hidden (B, T, d)``."""
    layer, kind = parse_hook_name(hook)
    _, layers = transformer_layers(model)
    first = layer + 1 if kind == "resid_post" else layer
    batch, length, _ = hidden.shape
    position_ids = torch.arange(length, device=hidden.device).expand(batch, length)
    neox = model.gpt_neox
    position_embeddings = neox.rotary_emb(hidden, position_ids=position_ids)
    blocked = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
    mask = torch.zeros(length, length, dtype=hidden.dtype, device=hidden.device)
    mask = mask.masked_fill(blocked, torch.finfo(hidden.dtype).min).expand(batch, 1, length, length)  # causal, additive
    for block in layers[first:]:
        hidden = block(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return model.get_output_embeddings()(neox.final_layer_norm(hidden))
