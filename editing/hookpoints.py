"""Hook points: the TransformerLens/SAELens names users know, resolved to modules.

    blocks.{L}.hook_resid_post   output hidden state of the GPT-NeoX layer L
    blocks.{L}.hook_resid_pre    its input: the output of layer L-1, or for L = 0 the
                                 embedding output (``gpt_neox.emb_dropout``)

GPT-NeoX adds attention and MLP to the residual in parallel, so there is no
``hook_resid_mid``. Each hook point is the *output* of one module, which keeps the hook
layer simple: ``blocks.{L}.hook_resid_pre`` and ``blocks.{L-1}.hook_resid_post`` are the
same tensor. Layers are found by counting the model's ``ModuleList``, not by a path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictionaries.config import HOOK_NAME as _HOOK_NAME  # one definition of the hook-name grammar


class HookPointError(LookupError):
    """An unknown hook point name; the message lists the valid ones."""


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int
    kind: str  # "resid_pre" | "resid_post"
    module: torch.nn.Module  # the hook point is this module's output
    module_path: str


def transformer_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of transformer blocks: the ``ModuleList`` with one entry a layer."""
    n_layers = model.config.num_hidden_layers
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return path, module
    raise HookPointError(f"{type(model).__name__}: found no ModuleList of {n_layers} layers")


def _embedding_output(model: torch.nn.Module, layers_path: str) -> tuple[str, torch.nn.Module]:
    """The module whose output is the input of layer 0 (GPT-NeoX: ``emb_dropout``)."""
    parent_path = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    parent = model.get_submodule(parent_path)
    for attribute in ("emb_dropout", "embed_in"):
        if hasattr(parent, attribute):
            return f"{parent_path}.{attribute}".lstrip("."), getattr(parent, attribute)
    raise HookPointError(f"{type(model).__name__}: no embedding module found beside {layers_path}")


def hook_point_names(model: torch.nn.Module) -> list[str]:
    n_layers = model.config.num_hidden_layers
    return [f"blocks.{layer}.hook_{kind}" for layer in range(n_layers) for kind in ("resid_pre", "resid_post")]


def parse_hook_name(name: str) -> tuple[int, str]:
    """``"blocks.2.hook_resid_post"`` → ``(2, "resid_post")``; no model needed."""
    match = _HOOK_NAME.match(name)
    if not match:
        raise HookPointError(f"hook point {name!r}: expected 'blocks.<layer>.hook_resid_post' or 'blocks.<layer>.hook_resid_pre'")
    return int(match.group(1)), match.group(2)


def resolve_hook_point(model: torch.nn.Module, name: str) -> HookPoint:
    """Resolve a hook point name on a loaded GPT-NeoX model."""
    valid = hook_point_names(model)
    if name not in valid:
        shown = ", ".join(valid[:6]) + (f", ... ({len(valid)} in all)" if len(valid) > 6 else "")
        raise HookPointError(f"unknown hook point {name!r} for this {len(valid) // 2}-layer model; valid: {shown}")
    layer, kind = parse_hook_name(name)
    layers_path, layers = transformer_layers(model)
    if kind == "resid_post":
        return HookPoint(name, layer, kind, layers[layer], f"{layers_path}.{layer}")
    if layer > 0:
        return HookPoint(name, layer, kind, layers[layer - 1], f"{layers_path}.{layer - 1}")
    path, module = _embedding_output(model, layers_path)
    return HookPoint(name, layer, kind, module, path)


def hook_width(model: torch.nn.Module, name: str) -> int:
    """Width of the activation at a hook point (the residual stream: ``hidden_size``)."""
    resolve_hook_point(model, name)
    return int(model.config.hidden_size)
