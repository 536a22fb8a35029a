"""Vector edits, conditional edits and calibrated strengths in the engine, against an independent
computation: greedy decoding without a KV cache and plain forward hooks doing the same math with
full encodes, position by position."""

import pytest
import torch

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from dictionaries.statistics import max_activations
from dictionaries.vectors import SteeringVector
from editing.edits import Condition, EditError, EditSpec, hook_rank, parse_edit
from editing.engine import Engine, GenerationRequest
from editing.engine.scheduler import SchedulerLimits
from editing.hookpoints import resolve_hook_point

PROMPT = "If the file does not exist, the"
OTHER = ["The function returns", "Return a new list of", "class"]


def _dictionary(arch, d_in, hook="blocks.2.hook_resid_post", d_sae=512, seed=0):
    config = DictionaryConfig(architecture=arch, d_in=d_in, d_sae=d_sae, hook=hook, k=16 if arch == "topk" else None)
    return Dictionary.random(config, seed=seed)


def _vector(name, hook, width, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(name, hook, scale * torch.randn(width, generator=generator))


@pytest.fixture(scope="module", params=["pythia-tiny", "pythia-70m-shape"])
def setup(request, pythia_tiny, pythia_70m_shape):
    model, tokenizer = (pythia_tiny.model, pythia_tiny.tokenizer) if request.param == "pythia-tiny" else pythia_70m_shape
    width = model.config.hidden_size
    dictionaries = {"relu": _dictionary("relu", width), "topk": _dictionary("topk", width, seed=1),
                    "early": _dictionary("jumprelu", width, hook="blocks.1.hook_resid_pre", seed=5)}
    vectors = {"late": _vector("late", "blocks.2.hook_resid_post", width, 7, scale=2.0),
               "mid": _vector("mid", "blocks.1.hook_resid_pre", width, 8)}
    return Engine(model, tokenizer, dictionaries, vectors=vectors), model, tokenizer


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _hidden(model, ids, hook):
    from editing.nethook import Trace

    with torch.no_grad(), Trace(model, hook, stop=True) as trace:
        model(torch.tensor([ids]))
    return trace.output


@torch.no_grad()
def reference_logits(model, dictionaries, vectors, ids, n_prompt, edits, feature_max=None):
    """One full forward over ``ids`` with plain hooks: at each hook point (in forward order) the
    conditions read there (full encode of the residual as it arrives), then each dictionary's
    edits (full encode, in name order) at the positions they name where their condition holds,
    then the vector edits, scaled by the norm of the residual they are added to."""
    feature_max = feature_max or {}
    held = {}
    length = len(ids)
    kinds = {"all": torch.ones(length, dtype=torch.bool), "prompt": torch.arange(length) < n_prompt,
             "generated": torch.arange(length) >= n_prompt}

    def where(edit):
        mask = kinds[edit.positions].clone()
        if edit.when is not None:
            mask &= held[edit.when]
        return mask

    def hook_of(edit):
        return vectors[edit.vector].hook if edit.op == "vector" else dictionaries[edit.dictionary].config.hook

    points = sorted({hook_of(e) for e in edits} | {dictionaries[e.when.dictionary].config.hook for e in edits if e.when},
                    key=hook_rank)
    handles = []
    for point in points:
        def hook(module, args, output, point=point):
            h = output[0] if isinstance(output, tuple) else output  # (1, T, d)
            for condition in {e.when for e in edits if e.when and dictionaries[e.when.dictionary].config.hook == point}:
                acts = dictionaries[condition.dictionary].encode(h)[0, :, condition.feature]
                held[condition] = acts > condition.above if condition.above is not None else acts < condition.below
            for name in sorted({e.dictionary for e in edits if e.op != "vector" and hook_of(e) == point}):
                sae = dictionaries[name]
                f = sae.encode(h)
                edited = f.clone()
                for edit in [e for e in edits if e.dictionary == name]:
                    value = edit.value
                    if edit.value_unit == "max_activation":
                        value = edit.value * float(feature_max[name][edit.feature])
                    a, b = {"ablate": (0, 0), "scale": (value, 0), "set": (0, value), "add": (1, value)}[edit.op]
                    mask = where(edit)
                    edited[0, mask, edit.feature] = a * edited[0, mask, edit.feature] + b
                h = h + (sae.decode(edited) - sae.decode(f))
            added = torch.zeros_like(h)
            norm = h.norm(dim=-1, keepdim=True)  # (1, T, 1)
            for edit in [e for e in edits if e.op == "vector" and hook_of(e) == point]:
                v = vectors[edit.vector].vector
                step = edit.value * v if edit.value_unit == "raw" else edit.value * norm * v / v.norm()
                added = added + where(edit)[None, :, None] * step
            return h + added

        handles.append(resolve_hook_point(model, point).module.register_forward_hook(hook))
    try:
        return model(torch.tensor([ids])).logits[0].float()
    finally:
        for handle in handles:
            handle.remove()


def reference_generate(model, dictionaries, vectors, prompt_ids, edits, n, feature_max=None):
    ids, tokens, logprobs = list(prompt_ids), [], []
    for _ in range(n):
        logits = reference_logits(model, dictionaries, vectors, ids, len(prompt_ids), edits, feature_max)[-1]
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        ids.append(token)
    return tokens, logprobs


def _check(engine, model, tokenizer, edits, n=6, prompt=PROMPT, feature_max=None):
    [result] = engine.generate([GenerationRequest(prompt, max_new_tokens=n, edits=tuple(edits))])
    tokens, logprobs = reference_generate(model, engine.dictionaries, engine.vectors, _ids(tokenizer, prompt), edits, n,
                                          feature_max)
    assert result.tokens == tokens
    torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(logprobs), atol=2e-4, rtol=0)
    return result


def _vector_edit(name, value, **kwargs):
    return EditSpec(op="vector", vector=name, value=value, **kwargs)


@pytest.mark.parametrize("unit, value", [("raw", 3.0), ("residual_norm", 0.4)])
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_vector_edit_equals_adding_it_by_a_plain_hook(setup, unit, value, positions):
    engine, model, tokenizer = setup
    edits = [_vector_edit("late", value, value_unit=unit, positions=positions),
             _vector_edit("mid", -value, value_unit=unit)]
    result = _check(engine, model, tokenizer, edits)
    [mid, late] = result.edit_report  # layer order: blocks.1.hook_resid_pre before blocks.2.hook_resid_post
    assert mid["hook"] == "blocks.1.hook_resid_pre" and late["hook"] == "blocks.2.hook_resid_post"
    n_prompt = len(_ids(tokenizer, PROMPT))
    assert late["positions_edited"] == (n_prompt + 5 if positions == "all" else 5) and late["changed"]
    [entry] = late["vectors"]
    if unit == "raw":  # the norm of what was added: value·‖v‖ at every position
        assert entry["mean_added_norm"] == pytest.approx(value * engine.vectors["late"].norm, rel=1e-5)
        assert late["mean_delta_norm"] == pytest.approx(value * engine.vectors["late"].norm, rel=1e-4)
    else:
        assert entry["mean_added_norm"] > 0


def test_vector_and_feature_edits_compose_in_layer_order(setup):
    engine, model, tokenizer = setup
    edits = [EditSpec(dictionary="relu", feature=5, op="set", value=6.0), _vector_edit("late", 2.0),
             EditSpec(dictionary="early", feature=9, op="add", value=3.0), _vector_edit("mid", 1.5)]
    result = _check(engine, model, tokenizer, edits)
    assert [(r["dictionary"], r["hook"]) for r in result.edit_report] == [
        ("early", "blocks.1.hook_resid_pre"), (None, "blocks.1.hook_resid_pre"), ("relu", "blocks.2.hook_resid_post"),
        (None, "blocks.2.hook_resid_post")]


def _median_feature(engine, model, tokenizer, name, prompt=PROMPT):
    """A feature that fires at some positions of the prompt and not at others, and a threshold
    between its activations (so a condition on it holds at some positions only)."""
    sae = engine.dictionaries[name]
    acts = sae.encode(_hidden(model, _ids(tokenizer, prompt), sae.config.hook))[0]  # (T, F)
    fires = (acts > 0).float().mean(0)
    feature = int((fires - 0.5).abs().argmin())
    values = acts[:, feature].sort().values
    lo, hi = len(values) // 4, max(len(values) // 4 + 1, (3 * len(values)) // 4)
    gap = int((values[lo + 1 : hi + 1] - values[lo:hi]).argmax()) + lo  # the widest gap near the middle
    return feature, float((values[gap] + values[gap + 1]) / 2)


@pytest.mark.parametrize("source", ["relu", "early", "topk"])
def test_conditional_edit_equals_editing_only_where_it_holds(setup, source):
    engine, model, tokenizer = setup
    feature, threshold = _median_feature(engine, model, tokenizer, source)
    above = Condition(dictionary=source, feature=feature, above=threshold)
    below = Condition(dictionary=source, feature=feature, below=threshold)
    edits = [EditSpec(dictionary="relu", feature=11, op="set", value=8.0, when=above),
             EditSpec(dictionary="relu", feature=11, op="add", value=-2.0, when=below),  # a second layer on one feature
             EditSpec(dictionary="relu", feature=3, op="scale", value=4.0),
             _vector_edit("late", 2.5, when=below, positions="prompt")]
    result = _check(engine, model, tokenizer, edits)
    ids = _ids(tokenizer, PROMPT)
    holds = engine.dictionaries[source].encode(_hidden(model, ids, engine.dictionaries[source].config.hook))[0, :, feature] > threshold
    relu = next(r for r in result.edit_report if r["dictionary"] == "relu")
    f11 = next(f for f in relu["features"] if f["feature"] == 11)
    first, second = f11["conditions"]
    # on the prompt the condition is known in advance; the generated positions add to both counts
    assert first["eligible_positions"] == second["eligible_positions"] == len(ids) + 5
    assert first["fired_positions"] + second["fired_positions"] == len(ids) + 5  # above and below: one of them
    assert int(holds.sum()) <= first["fired_positions"] <= int(holds.sum()) + 5 and 0 < int(holds.sum()) < len(ids)
    vector = next(r for r in result.edit_report if r["dictionary"] is None)
    assert vector["vectors"][0]["fired_positions"] == int((~holds).sum())
    assert vector["vectors"][0]["eligible_positions"] == len(ids)


def test_condition_from_an_earlier_layer_on_a_vector_edit(setup):
    engine, model, tokenizer = setup
    feature, threshold = _median_feature(engine, model, tokenizer, "early")
    edits = [_vector_edit("late", 0.5, value_unit="residual_norm",
                          when=Condition(dictionary="early", feature=feature, above=threshold)),
             EditSpec(dictionary="early", feature=feature, op="set", value=0.0,  # edits at the condition's own
                      when=Condition(dictionary="early", feature=feature, above=threshold))]  # hook read before them
    result = _check(engine, model, tokenizer, edits)
    early, late = result.edit_report
    assert early["features"][0]["conditions"][0]["fired_positions"] == late["vectors"][0]["fired_positions"] > 0


def test_a_condition_that_never_holds_is_exactly_the_unedited_model(setup):
    engine, _, _ = setup
    never, never_early = Condition(dictionary="relu", feature=4, above=1e5), Condition(dictionary="early", feature=4, below=-1)
    edits = (EditSpec(dictionary="relu", feature=4, op="set", value=50.0, when=never),
             EditSpec(dictionary="early", feature=2, op="scale", value=9.0, when=never_early),
             _vector_edit("mid", 10.0, when=never_early), _vector_edit("late", 10.0, when=never))
    [plain] = engine.generate([GenerationRequest(PROMPT, max_new_tokens=8)])
    [guarded] = engine.generate([GenerationRequest(PROMPT, max_new_tokens=8, edits=edits)])
    assert guarded.tokens == plain.tokens and guarded.logprobs == plain.logprobs  # bit for bit
    assert all(not report["changed"] for report in guarded.edit_report)
    relu = next(r for r in guarded.edit_report if r["dictionary"] == "relu")
    assert relu["positions_edited"] == 0 and relu["features"][0]["conditions"][0]["fired_positions"] == 0


def test_a_condition_on_a_later_hook_is_refused(setup):
    engine, _, _ = setup
    later = Condition(dictionary="relu", feature=1, above=0.0)  # blocks.2.hook_resid_post
    for edit in (EditSpec(dictionary="early", feature=1, op="ablate", when=later), _vector_edit("mid", 1.0, when=later)):
        with pytest.raises(EditError, match="comes after the edit's hook point") as caught:
            engine.generate([GenerationRequest(PROMPT, max_new_tokens=2, edits=(edit,))])
        assert caught.value.param == "requests[0].edits[0].when.dictionary"
    bad = [(EditSpec(dictionary="relu", feature=1, op="ablate", when=Condition(dictionary="nope", feature=1, above=0)),
            "edits[0].when.dictionary"),
           (EditSpec(dictionary="relu", feature=1, op="ablate", when=Condition(dictionary="relu", feature=99999, above=0)),
            "edits[0].when.feature"),
           (_vector_edit("nope", 1.0), "edits[0].vector"),
           (EditSpec(dictionary="relu", feature=1, op="set", value=1.0, value_unit="max_activation"), "edits[0].value_unit")]
    for edit, param in bad:
        with pytest.raises(EditError) as caught:
            engine.generate([GenerationRequest(PROMPT, max_new_tokens=2, edits=(edit,))])
        assert caught.value.param.endswith(param), caught.value.param


def test_max_activation_units_equal_the_raw_value_the_statistics_imply(pythia_tiny, default_dictionary):
    from dictionaries.store import DictionaryStore

    name, sae = default_dictionary
    maxima = max_activations(DictionaryStore().path(name))
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    engine.add_dictionary(name, sae, feature_max=maxima)
    feature = int(maxima.argmax())
    for op, multiple in (("set", 2.0), ("add", -0.5)):
        calibrated = EditSpec(dictionary=name, feature=feature, op=op, value=multiple, value_unit="max_activation")
        raw = EditSpec(dictionary=name, feature=feature, op=op, value=multiple * float(maxima[feature]))
        [a] = engine.generate([GenerationRequest(PROMPT, max_new_tokens=8, edits=(calibrated,))])
        [b] = engine.generate([GenerationRequest(PROMPT, max_new_tokens=8, edits=(raw,))])
        assert a.tokens == b.tokens and a.logprobs == b.logprobs
        [resolved] = a.edit_report[0]["features"][0]["resolved_values"]
        assert resolved["raw_value"] == pytest.approx(multiple * float(maxima[feature]))
    # the recorded maximum is the statistics' top context activation
    from safetensors.torch import load_file

    stats = load_file(str(DictionaryStore().path(name) / "features.safetensors"))
    assert float(maxima[feature]) == pytest.approx(float(stats["context_max"][feature, 0]))
    _check(engine, pythia_tiny.model, pythia_tiny.tokenizer,
           [EditSpec(dictionary=name, feature=feature, op="set", value=1.5, value_unit="max_activation",
                     positions="generated")], feature_max={name: maxima})
    never_fired = int((maxima == 0).nonzero()[0]) if bool((maxima == 0).any()) else None
    if never_fired is not None:
        with pytest.raises(EditError, match="never fired") as caught:
            engine.generate([GenerationRequest(PROMPT, edits=(EditSpec(dictionary=name, feature=never_fired, op="set",
                                                                         value=1.0, value_unit="max_activation"),))])
        assert caught.value.param.endswith("edits[0].value_unit")


def test_mixed_batches_give_solo_results(setup):
    """Rows with vector and conditional edits beside plain rows, under churn (few rows, chunked
    prefill, rows joining and leaving): each request is its solo run; plain rows are untouched."""
    engine, model, tokenizer = setup
    feature, threshold = _median_feature(engine, model, tokenizer, "relu", OTHER[0])
    when = Condition(dictionary="relu", feature=feature, above=threshold)
    requests = [
        GenerationRequest(OTHER[0], max_new_tokens=7, edits=(_vector_edit("late", 2.0),)),
        GenerationRequest(OTHER[1], max_new_tokens=4),
        GenerationRequest(PROMPT, max_new_tokens=9, include_baseline=True,
                          edits=(EditSpec(dictionary="relu", feature=7, op="set", value=5.0, when=when),
                                 _vector_edit("late", 0.3, value_unit="residual_norm", when=when, positions="generated"))),
        GenerationRequest(OTHER[2], max_new_tokens=5, temperature=0.9, seed=4),
        GenerationRequest(OTHER[0], max_new_tokens=6, edits=(EditSpec(dictionary="topk", feature=3, op="add", value=2.0,
                                                                      when=Condition(dictionary="early", feature=1,
                                                                                     below=0.01)),)),
    ]
    for limits in (None, SchedulerLimits(max_running_rows=3, prefill_chunk_tokens=4)):
        together = engine.generate(requests, limits=limits)
        for request, batched in zip(requests, together):
            [alone] = engine.generate([request])
            assert batched.tokens == alone.tokens
            torch.testing.assert_close(torch.tensor(batched.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)
            assert [r["positions_edited"] for r in batched.edit_report] == [r["positions_edited"] for r in alone.edit_report]
    # plain rows beside edited ones are bit-for-bit the rows of a batch with no edits at all
    bare = Engine(model, tokenizer)
    plain = bare.generate([GenerationRequest(OTHER[1], max_new_tokens=6), GenerationRequest(OTHER[2], max_new_tokens=6)])
    mixed = engine.generate([GenerationRequest(OTHER[1], max_new_tokens=6),
                             GenerationRequest(OTHER[2], max_new_tokens=6, edits=requests[2].edits + requests[0].edits)])
    assert mixed[0].tokens == plain[0].tokens and mixed[0].logprobs == plain[0].logprobs
    assert mixed[0].edit_report == []


def test_the_evaluators_edited_run_takes_the_new_edits(setup):
    from editing.evaluate import _edited_logits

    engine, model, tokenizer = setup
    feature, threshold = _median_feature(engine, model, tokenizer, "early")
    edits = [EditSpec(dictionary="relu", feature=2, op="set", value=4.0,
                      when=Condition(dictionary="early", feature=feature, above=threshold)),
             _vector_edit("late", 0.2, value_unit="residual_norm"), _vector_edit("mid", 1.0, positions="prompt")]
    texts = [PROMPT, OTHER[0] + OTHER[1]]
    length = min(len(_ids(tokenizer, t)) for t in texts)
    ids = torch.tensor([_ids(tokenizer, t)[:length] for t in texts])
    logits = _edited_logits(model, engine.dictionaries, edits, ids, vectors=engine.vectors)
    for row in range(len(texts)):
        expected = reference_logits(model, engine.dictionaries, engine.vectors, ids[row].tolist(), length, edits)
        torch.testing.assert_close(logits[row].float(), expected, atol=2e-4, rtol=0)


def test_edit_spec_fields_and_the_cli_form():
    with pytest.raises(ValueError, match="'vector'"):
        EditSpec(op="vector", value=1.0)
    with pytest.raises(ValueError, match="not 'dictionary'"):
        EditSpec(op="vector", vector="v", value=1.0, dictionary="d", feature=1)
    with pytest.raises(ValueError, match="needs 'dictionary' and 'feature'"):
        EditSpec(op="set", value=1.0)
    with pytest.raises(ValueError, match="applies to set and add"):
        EditSpec(dictionary="d", feature=1, op="scale", value=2.0, value_unit="max_activation")
    with pytest.raises(ValueError, match="applies to op 'vector'"):
        EditSpec(dictionary="d", feature=1, op="set", value=2.0, value_unit="residual_norm")
    with pytest.raises(ValueError, match="exactly one of"):
        Condition(dictionary="d", feature=1, above=1.0, below=2.0)
    with pytest.raises(ValueError, match="exactly one of"):
        Condition(dictionary="d", feature=1)
    assert parse_edit("l2:7:set:2@generated,unit=max,when=l2:3>0.5") == EditSpec(
        dictionary="l2", feature=7, op="set", value=2.0, positions="generated", value_unit="max_activation",
        when=Condition(dictionary="l2", feature=3, above=0.5))
    assert parse_edit("vector:cat-dog:4,unit=norm,when=l1:9<-1") == EditSpec(
        op="vector", vector="cat-dog", value=4.0, value_unit="residual_norm",
        when=Condition(dictionary="l1", feature=9, below=-1.0))
    assert parse_edit("vector:12:ablate") == EditSpec(dictionary="vector", feature=12, op="ablate")
    for bad in ("l2:7:set:2,colour=red", "l2:7:set:2,when=l2:3", "vector:v", "l2:x:set:1"):
        with pytest.raises(EditError):
            parse_edit(bad)
    assert parse_edit("l2:7:set:2,unit=max,when=l2:3>0.5").label() == "l2:7:set:2xmax when l2:3>0.5"
