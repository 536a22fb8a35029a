"""The engine against independent computations: plain model, plain hooks, other batches."""

import pytest
import torch

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from editing.edits import EditError, EditSpec
from editing.engine import Engine, EngineError, GenerationRequest
from editing.hookpoints import resolve_hook_point

PROMPTS = ["The function returns", "Return a new list of", "class", "If the file does not exist, the"]


def _dictionary(arch, d_in, hook="blocks.2.hook_resid_post", d_sae=512, seed=0):
    config = DictionaryConfig(architecture=arch, d_in=d_in, d_sae=d_sae, hook=hook, k=16 if arch == "topk" else None)
    return Dictionary.random(config, seed=seed)


@pytest.fixture(scope="module", params=["pythia-tiny", "pythia-70m-shape"])
def setup(request, pythia_tiny, pythia_70m_shape):
    model, tokenizer = (pythia_tiny.model, pythia_tiny.tokenizer) if request.param == "pythia-tiny" else pythia_70m_shape
    width = model.config.hidden_size
    dictionaries = {arch: _dictionary(arch, width) for arch in ("relu", "topk", "jumprelu")}
    dictionaries["early"] = _dictionary("relu", width, hook="blocks.1.hook_resid_pre", seed=5)
    return Engine(model, tokenizer, dictionaries), model, tokenizer


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _apply(f, edits):
    edited = f.clone()
    for edit in edits:
        column = edited[..., edit.feature]
        a, b = {"ablate": (0, 0), "scale": (edit.value, 0), "set": (0, edit.value), "add": (1, edit.value)}[edit.op]
        edited[..., edit.feature] = a * column + b
    return edited


@torch.no_grad()
def reference_generate(model, dictionaries, prompt_ids, edits, n):
    """Greedy decoding with no KV cache and plain forward hooks that apply
    h + (f' − f)·W_dec with the *full* encode, at the positions each edit names."""
    ids = list(prompt_ids)
    tokens, logprobs = [], []
    for _ in range(n):
        handles = []
        for name in sorted({e.dictionary for e in edits}):
            sae = dictionaries[name]
            mine = [e for e in edits if e.dictionary == name]

            def hook(module, args, output, sae=sae, mine=mine):
                hidden = output[0] if isinstance(output, tuple) else output  # (1, T, d)
                f = sae.encode(hidden)
                delta = torch.zeros_like(hidden)
                for edit in mine:
                    where = torch.zeros(hidden.shape[1], dtype=torch.bool)
                    if edit.positions in ("all", "prompt"):
                        where[: len(prompt_ids)] = True
                    if edit.positions in ("all", "generated"):
                        where[len(prompt_ids):] = True
                    change = (_apply(f, [edit]) - f)[..., edit.feature]  # (1, T)
                    delta[:, where] += change[:, where, None] * sae.W_dec[edit.feature]
                return hidden + delta

            handles.append(resolve_hook_point(model, sae.config.hook).module.register_forward_hook(hook))
        try:
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        finally:
            for handle in handles:
                handle.remove()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        ids.append(token)
    return tokens, logprobs


@torch.no_grad()
def test_no_edits_is_the_plain_model(setup):
    engine, model, tokenizer = setup
    for prompt in PROMPTS[:2]:
        ids = _ids(tokenizer, prompt)
        [result] = engine.generate([GenerationRequest(prompt, max_new_tokens=10)])
        expected = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=1,
                                  eos_token_id=None)[0, len(ids):].tolist()
        assert result.tokens == expected
        full = torch.tensor([ids + result.tokens])
        plain = model(full).logits[0].float().log_softmax(-1)  # (T, V)
        expected_logprobs = plain[len(ids) - 1 : -1].gather(-1, torch.tensor(result.tokens)[:, None]).squeeze(-1)
        # cached incremental decoding vs one full forward: equal to float32 rounding (2e-6 relative)
        torch.testing.assert_close(torch.tensor(result.logprobs), expected_logprobs, atol=1e-6, rtol=2e-6)
    # Edits in other rows never reach a row without edits: in the same batch shape, that row
    # is bit-identical to a run with no dictionaries at all.
    bare = Engine(model, tokenizer)
    plain_batch = bare.generate([GenerationRequest(PROMPTS[0], max_new_tokens=8), GenerationRequest(PROMPTS[1], max_new_tokens=8)])
    with_others = engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=8),
                                   GenerationRequest(PROMPTS[1], max_new_tokens=8,
                                                     edits=(EditSpec(dictionary="relu", feature=3, op="set", value=9.0),
                                                            EditSpec(dictionary="early", feature=1, op="add", value=4.0)))])
    assert with_others[0].tokens == plain_batch[0].tokens and with_others[0].logprobs == plain_batch[0].logprobs
    assert with_others[0].edit_report == []
    assert with_others[1].logprobs != plain_batch[1].logprobs


OPS = [("ablate", None), ("scale", 4.0), ("set", 6.0), ("add", -3.0)]


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("op, value", OPS)
def test_each_op_matches_an_independent_hook(setup, arch, op, value):
    engine, model, tokenizer = setup
    ids = _ids(tokenizer, PROMPTS[3])
    probe = engine.dictionaries[arch].encode(_hidden(model, ids, engine.dictionaries[arch].config.hook))
    firing = probe[0].gt(0).sum(0).argsort(descending=True)[:2].tolist()  # features that fire here
    edits = tuple(EditSpec(dictionary=arch, feature=f, op=op, value=value) for f in firing)
    [result] = engine.generate([GenerationRequest(PROMPTS[3], max_new_tokens=6, edits=edits)])
    tokens, logprobs = reference_generate(model, engine.dictionaries, ids, edits, 6)
    assert result.tokens == tokens
    torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), atol=2e-4, rtol=0)
    [report] = result.edit_report
    assert report["positions_edited"] == len(ids) + 5 and report["changed"]


def _hidden(model, ids, hook):
    from editing.nethook import Trace

    with torch.no_grad(), Trace(model, hook, stop=True) as trace:
        model(torch.tensor([ids]))
    return trace.output


def test_edits_on_two_layers_compose_in_layer_order(setup):
    engine, model, tokenizer = setup
    edits = (EditSpec(dictionary="relu", feature=5, op="set", value=8.0),
             EditSpec(dictionary="early", feature=9, op="add", value=5.0))
    ids = _ids(tokenizer, PROMPTS[0])
    [result] = engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=6, edits=edits)])
    tokens, logprobs = reference_generate(model, engine.dictionaries, ids, edits, 6)
    assert result.tokens == tokens
    torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), atol=2e-4, rtol=0)
    assert [r["dictionary"] for r in result.edit_report] == ["early", "relu"]


def test_batched_equals_alone(setup):
    engine, _, _ = setup
    mixed = [
        GenerationRequest(PROMPTS[0], max_new_tokens=7, edits=(EditSpec(dictionary="relu", feature=1, op="scale", value=3.0),)),
        GenerationRequest(PROMPTS[1], max_new_tokens=4),
        GenerationRequest(PROMPTS[2], max_new_tokens=9, edits=(EditSpec(dictionary="topk", feature=7, op="set", value=5.0),
                                                                 EditSpec(dictionary="early", feature=2, op="ablate"))),
        GenerationRequest(PROMPTS[3], max_new_tokens=5, include_baseline=True,
                          edits=(EditSpec(dictionary="jumprelu", feature=4, op="add", value=2.0, positions="generated"),)),
    ]
    together = engine.generate(mixed)
    for request, batched in zip(mixed, together):
        [alone] = engine.generate([request])
        assert batched.tokens == alone.tokens
        torch.testing.assert_close(torch.tensor(batched.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)
        assert len(batched.edit_report) == len(alone.edit_report)
    assert together[3].baseline.tokens == engine.generate([GenerationRequest(PROMPTS[3], max_new_tokens=5)])[0].tokens


def test_seeded_sampling_is_reproducible_and_batch_independent(setup):
    engine, _, _ = setup
    request = GenerationRequest(PROMPTS[0], max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    [first] = engine.generate([request])
    [second] = engine.generate([request])
    batched = engine.generate([GenerationRequest(PROMPTS[2], max_new_tokens=3, temperature=0.7, seed=9), request,
                               GenerationRequest(PROMPTS[1], max_new_tokens=12,
                                                 edits=(EditSpec(dictionary="relu", feature=0, op="ablate"),))])
    assert first.tokens == second.tokens == batched[1].tokens
    others = {tuple(engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=s)])[0].tokens)
              for s in range(4)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_touch_only_what_they_name(setup, positions):
    engine, model, tokenizer = setup
    ids = _ids(tokenizer, PROMPTS[3])
    edits = (EditSpec(dictionary="relu", feature=11, op="set", value=12.0, positions=positions),)
    [result] = engine.generate([GenerationRequest(PROMPTS[3], max_new_tokens=6, edits=edits)])
    tokens, logprobs = reference_generate(model, engine.dictionaries, ids, edits, 6)
    assert result.tokens == tokens
    torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), atol=2e-4, rtol=0)
    [unedited] = engine.generate([GenerationRequest(PROMPTS[3], max_new_tokens=6)])
    report = result.edit_report[0]
    if positions == "prompt":
        assert report["positions_edited"] == len(ids)
    else:
        assert report["positions_edited"] == 5  # the generated tokens fed back (the last one never is)
        assert result.logprobs[0] == unedited.logprobs[0]  # the first token comes from prompt positions only


def test_kv_cache_agrees_with_full_forwards(setup):
    """Cached incremental decoding against recomputing every position: tokens, log-probabilities
    (the reference recomputes the whole sequence with plain hooks) and feature read-outs (against
    ``inspect`` over every position the model was fed)."""
    engine, model, tokenizer = setup
    edits = (EditSpec(dictionary="topk", feature=3, op="set", value=4.0),)
    [edited] = engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=6, edits=edits)])
    tokens, logprobs = reference_generate(model, engine.dictionaries, _ids(tokenizer, PROMPTS[0]), edits, 6)
    assert edited.tokens == tokens
    torch.testing.assert_close(torch.tensor(edited.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=0)
    [read] = engine.generate([GenerationRequest(PROMPTS[2], max_new_tokens=6, return_features=("relu", 4),
                                                temperature=0.9, seed=5)])
    fed = _ids(tokenizer, PROMPTS[2]) + read.tokens[:-1]  # the last token is never fed back
    assert [t["token_id"] for t in read.features] == fed
    for position, seen in zip(read.features, engine.inspect(tuple(fed), "relu", top_k=4)):
        assert [f["feature"] for f in position["features"]] == [f["feature"] for f in seen["features"]]
        for a, b in zip(position["features"], seen["features"]):
            assert abs(a["activation"] - b["activation"]) < 1e-4


def test_report_says_when_nothing_changed(pythia_tiny):
    width = pythia_tiny.model.config.hidden_size
    dead = _dictionary("relu", width)
    dead.b_enc.data[7] = -1e4  # feature 7 can never fire
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer, {"d": dead})
    [result] = engine.generate([GenerationRequest("The value", max_new_tokens=4,
                                                  edits=(EditSpec(dictionary="d", feature=7, op="ablate"),))])
    [report] = result.edit_report
    assert report["changed"] is False and "changed nothing" in report["note"]
    assert report["features"][0]["mean_before"] == 0.0 and report["features"][0]["changed_positions"] == 0


def test_feature_readout_and_inspect_agree(setup):
    engine, _, tokenizer = setup
    [result] = engine.generate([GenerationRequest(PROMPTS[1], max_new_tokens=3, return_features=("topk", 5))])
    inspected = engine.inspect(PROMPTS[1], "topk", top_k=5)
    n_prompt = len(_ids(tokenizer, PROMPTS[1]))
    assert [t["kind"] for t in result.features] == ["prompt"] * n_prompt + ["generated"] * 2
    for read, seen in zip(result.features[:n_prompt], inspected):
        assert [f["feature"] for f in read["features"]] == [f["feature"] for f in seen["features"]]
        for a, b in zip(read["features"], seen["features"]):
            assert abs(a["activation"] - b["activation"]) < 1e-4


def test_stop_strings(pythia_tiny):
    # pythia-tiny only: the random 70M-shaped model emits ids past the tiny tokenizer's vocabulary
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    [free] = engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=10)])
    assert free.finish_reason == "length" and len(free.tokens) == 10
    stop = free.text[2:5]
    [stopped] = engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=10, stop=(stop,))])
    assert stopped.finish_reason == "stop" and stop not in stopped.text and free.text.startswith(stopped.text)


def test_bad_requests_name_the_field(setup):
    engine, _, _ = setup
    bad = [
        (GenerationRequest(""), "prompt"),
        (GenerationRequest("x", max_new_tokens=0), "max_new_tokens"),
        (GenerationRequest("x", max_new_tokens=5000), "max_new_tokens"),
        (GenerationRequest("x", top_p=0.0), "top_p"),
        (GenerationRequest("x", edits=(EditSpec(dictionary="nope", feature=1, op="ablate"),)), "edits[0].dictionary"),
        (GenerationRequest("x", edits=(EditSpec(dictionary="relu", feature=512, op="ablate"),)), "edits[0].feature"),
        (GenerationRequest("x", return_features=("relu", 0)), "return_features.top_k"),
    ]
    for request, param in bad:
        with pytest.raises(EditError) as caught:
            engine.generate([GenerationRequest("ok", max_new_tokens=2), request])
        assert caught.value.param.endswith(param), (param, caught.value.param)
    with pytest.raises(EngineError, match="unknown dictionary"):
        engine.inspect("x", "nope")


def test_edit_spec_validation():
    with pytest.raises(ValueError, match="'value' is required"):
        EditSpec(dictionary="d", feature=1, op="scale")
    with pytest.raises(ValueError, match="omitted for op 'ablate'"):
        EditSpec(dictionary="d", feature=1, op="ablate", value=1.0)
    for value in (float("nan"), float("inf"), 1e9):
        with pytest.raises(ValueError):
            EditSpec(dictionary="d", feature=1, op="set", value=value)
    with pytest.raises(ValueError):
        EditSpec(dictionary="d", feature=-1, op="ablate")
    from editing.edits import parse_edit

    assert parse_edit("l2:77:scale:4@generated") == EditSpec(dictionary="l2", feature=77, op="scale", value=4.0,
                                                              positions="generated")
    with pytest.raises(EditError, match="DICT:FEATURE:OP"):
        parse_edit("l2:77")
