"""A small hook layer in the style of baukit's ``nethook`` (baukit is not on the package
index this project installs from, so steerserve carries its own).

``Trace`` watches one module's output; ``TraceDict`` watches several, keyed by name. Both
are context managers that register their hooks on ``__enter__`` and always remove them on
``__exit__``, also when the body raises.

    with Trace(model, "blocks.2.hook_resid_post") as trace:
        model(input_ids)
    trace.output                                   # (B, T, d_model)

    def double(output, name):                      # edit_output(output, name) -> output
        return output * 2
    with TraceDict(model, ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"],
                   edit_output=double, stop=True) as traces:
        model(input_ids)                           # stops after layer 3

A target is a hook point name (``blocks.{L}.hook_resid_pre|post``), a dotted module path
of the model, or a module. Modules that return a tuple (GPT-NeoX layers before
transformers 5) are handled: ``edit_output`` sees and replaces the hidden state, the first
element, and the rest of the tuple passes through.

``stop=True`` raises :class:`StopForward` right after the last traced module (in forward
order) has run, and the context manager swallows it, so activation collection does not
pay for the layers above.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable

import torch

from editing.hookpoints import _HOOK_NAME, resolve_hook_point

EditFn = Callable[[torch.Tensor, str], torch.Tensor]


class StopForward(Exception):
    """Raised inside a forward hook to end the forward pass early; swallowed by the trace."""


def resolve_target(model: torch.nn.Module, target) -> tuple[str, torch.nn.Module]:
    """``(name, module)`` for a hook point name, a module path, or a module."""
    if isinstance(target, torch.nn.Module):
        for path, module in model.named_modules():
            if module is target:
                return path, module
        return type(target).__name__, target
    if _HOOK_NAME.match(target):
        point = resolve_hook_point(model, target)
        return target, point.module
    try:
        return target, model.get_submodule(target)
    except AttributeError:
        raise LookupError(f"{target!r} is neither a hook point (blocks.<L>.hook_resid_post|pre) nor a module of the model") from None


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class Trace:
    """Retain and/or edit one module's output for the duration of a ``with`` block."""

    def __init__(
        self,
        model: torch.nn.Module,
        target,
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
    ):
        self.name, self.module = resolve_target(model, target)
        self.retain_output = retain_output
        self.retain_input = retain_input
        self.clone = clone
        self.detach = detach
        self.edit_output = edit_output
        self.stop = stop
        self.output: torch.Tensor | None = None
        self.input: torch.Tensor | None = None
        self._handle = None

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.detach:
            tensor = tensor.detach()
        if self.clone:
            tensor = tensor.clone()
        return tensor

    def _hook(self, module, args, kwargs, output):
        if self.retain_input:
            hidden_in = args[0] if args else kwargs.get("hidden_states")
            self.input = self._keep(hidden_in)
        if self.edit_output is not None:
            output = _replace_hidden(output, self.edit_output(_hidden(output), self.name))
        if self.retain_output:
            self.output = self._keep(_hidden(output))
        if self.stop:
            raise StopForward(self.name)
        return output

    def __enter__(self) -> "Trace":
        if self._handle is not None:
            raise RuntimeError(f"Trace({self.name!r}) is already active")
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict):
    """An ordered mapping ``name -> Trace`` over several targets.

    The options are those of :class:`Trace` and apply to every target; ``stop=True`` stops
    after the target that runs last in the model's forward pass.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        targets: Iterable,
        *,
        retain_output: bool = True,
        retain_input: bool = False,
        clone: bool = False,
        detach: bool = False,
        edit_output: EditFn | None = None,
        stop: bool = False,
    ):
        super().__init__()
        targets = list(targets)
        module_order = {id(module): index for index, (_, module) in enumerate(model.named_modules())}
        resolved = [resolve_target(model, target) for target in targets]
        # the stop goes on the target that runs last; on a tie (two names, one module) the one
        # registered last, so every hook on that module runs before the stop
        last = max(range(len(resolved)), key=lambda i: (module_order.get(id(resolved[i][1]), -1), i)) if resolved else -1
        for index, target in enumerate(targets):
            trace = Trace(
                model,
                target,
                retain_output=retain_output,
                retain_input=retain_input,
                clone=clone,
                detach=detach,
                edit_output=edit_output,
                stop=stop and index == last,
            )
            self[trace.name] = trace

    def __enter__(self) -> "TraceDict":
        entered = []
        try:
            for trace in self.values():
                trace.__enter__()
                entered.append(trace)
        except BaseException:
            for trace in reversed(entered):
                trace.close()
            raise
        return self

    def close(self) -> None:
        for trace in reversed(list(self.values())):
            trace.close()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)
