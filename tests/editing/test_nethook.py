"""The baukit-style hook layer: retain, edit, stop, and always clean up."""

import pytest
import torch

from editing.hookpoints import HookPointError, hook_point_names, resolve_hook_point
from editing.nethook import Trace, TraceDict


@pytest.fixture()
def model(small_model):
    return small_model.model


@pytest.fixture()
def ids():
    return torch.tensor([[5, 17, 33, 9, 120, 64, 7, 300], [11, 12, 13, 14, 15, 16, 17, 18]])


def _no_hooks(model):
    """No hook of ours is left (transformers installs output-capturing hooks of its own)."""
    leftover = [name for name, m in model.named_modules()
                for hook in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
                if isinstance(getattr(hook, "__self__", None), Trace)]
    assert not leftover
    return True


@torch.no_grad()
def test_identity_edit_is_bit_identical(model, ids):
    clean = model(ids).logits
    names = hook_point_names(model)
    with TraceDict(model, names, edit_output=lambda out, name: out):
        hooked = model(ids).logits
    assert torch.equal(clean, hooked)
    assert _no_hooks(model)


@torch.no_grad()
def test_edit_changes_exactly_the_positions_it_touches(model, ids):
    clean = model(ids).logits

    direction = torch.linspace(-2.0, 2.0, model.config.hidden_size)  # not constant: LayerNorm would erase that

    def bump_position_3(output, name):
        output = output.clone()
        output[:, 3] += direction
        return output

    with Trace(model, "blocks.1.hook_resid_post", edit_output=bump_position_3):
        edited = model(ids).logits
    assert torch.equal(edited[:, :3], clean[:, :3])  # causal: earlier positions untouched
    assert (edited[:, 3:] - clean[:, 3:]).abs().amax(-1).min() > 0  # every later position moved


@torch.no_grad()
def test_retained_activations_match_hidden_states(model, ids):
    hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer
    with TraceDict(model, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]) as t:
        model(ids)
    assert torch.equal(t["blocks.0.hook_resid_pre"].output, hidden[0])
    assert torch.equal(t["blocks.1.hook_resid_pre"].output, hidden[1])
    assert torch.equal(t["blocks.1.hook_resid_post"].output, hidden[2])


@torch.no_grad()
def test_retain_input_of_a_layer(model, ids):
    layer = resolve_hook_point(model, "blocks.2.hook_resid_post").module
    with Trace(model, layer, retain_input=True) as trace, Trace(model, "blocks.1.hook_resid_post") as before:
        model(ids)
    assert torch.equal(trace.input, before.output)


@torch.no_grad()
def test_stop_skips_the_layers_above(model, ids):
    calls = []
    top = resolve_hook_point(model, "blocks.2.hook_resid_post").module
    head = model.get_output_embeddings()
    handles = [m.register_forward_hook(lambda *a, n=n: calls.append(n)) for n, m in (("top", top), ("head", head))]
    try:
        with TraceDict(model, ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"], stop=True) as traces:
            result = model(ids)
            pytest.fail(f"forward was not stopped: {type(result)}")
        assert calls == []
        assert traces["blocks.1.hook_resid_post"].output.shape == (2, 8, 32)
        with Trace(model, "blocks.1.hook_resid_pre", stop=True):
            model(ids)
        assert calls == []
        model(ids)
        assert calls == ["top", "head"]
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_stop_on_shared_module_runs_every_hook(model, ids):
    # blocks.1.hook_resid_pre and blocks.0.hook_resid_post are the same tensor
    with TraceDict(model, ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post"], stop=True) as traces:
        model(ids)
    assert torch.equal(traces["blocks.1.hook_resid_pre"].output, traces["blocks.0.hook_resid_post"].output)


def test_hooks_removed_after_an_exception(model, ids):
    with pytest.raises(ZeroDivisionError):
        with TraceDict(model, ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]):
            1 / 0
    assert _no_hooks(model)

    def broken(output, name):
        raise RuntimeError(f"edit failed at {name}")

    with pytest.raises(RuntimeError, match="edit failed at blocks.1.hook_resid_post"):
        with Trace(model, "blocks.1.hook_resid_post", edit_output=broken):
            model(ids)
    assert _no_hooks(model)


def test_unknown_hook_names_list_the_valid_ones(model):
    with pytest.raises(HookPointError, match=r"blocks\.7\.hook_resid_post.*valid: blocks\.0\.hook_resid_pre"):
        resolve_hook_point(model, "blocks.7.hook_resid_post")
    with pytest.raises(HookPointError, match="valid"):
        resolve_hook_point(model, "blocks.1.hook_resid_mid")
    with pytest.raises(LookupError, match="neither a hook point"):
        Trace(model, "not.a.module")


class _TupleBlock(torch.nn.Module):
    """Returns (hidden, extra) as GPT-NeoX layers did before transformers 5."""

    def forward(self, hidden):
        return hidden * 2, "extra"


def test_tuple_outputs_are_edited_on_the_hidden_state():
    container = torch.nn.Sequential(_TupleBlock())
    x = torch.ones(1, 2, 3)
    with Trace(container, container[0], edit_output=lambda out, name: out + 1) as trace:
        hidden, extra = container[0](x)
    assert extra == "extra"
    assert torch.equal(hidden, torch.full((1, 2, 3), 3.0))
    assert torch.equal(trace.output, hidden)
