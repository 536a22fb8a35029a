"""Prompt scoring in the engine: the log-probability of every prompt token and the top-N
alternatives, from the prefill forwards, against a plain full forward of the model (with an
independent plain-hook computation of the edits) and against the request's solo run."""

import pytest
import torch

from editing.edits import EditError, EditSpec
from editing.engine import Engine, GenerationRequest
from editing.engine.scheduler import SchedulerLimits
from editing.hookpoints import resolve_hook_point
from tests.editing.test_engine import _apply, _dictionary

PROMPTS = ["The function returns", "Return a new list of", "class",
           "If the file does not exist, the function raises an exception and the caller must handle it",
           "This module provides a way to read and write the files of an archive in the format used by"]


@pytest.fixture(scope="module")
def engine(pythia_tiny):
    width = pythia_tiny.model.config.hidden_size
    dictionaries = {"relu": _dictionary("relu", width), "topk": _dictionary("topk", width, seed=1),
                    "early": _dictionary("jumprelu", width, hook="blocks.1.hook_resid_pre", seed=2)}
    return Engine(pythia_tiny.model, pythia_tiny.tokenizer, dictionaries)


def _ids(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def plain_log_probs(model, dictionaries, ids, edits=()):
    """One full forward with plain hooks that apply h + (f' − f)·W_dec (full encode) at every
    position: ``(T, V)`` next-token log-probabilities."""
    handles = []
    for name in sorted({e.dictionary for e in edits}):
        sae, mine = dictionaries[name], [e for e in edits if e.dictionary == name and e.positions != "generated"]

        def hook(module, args, output, sae=sae, mine=mine):
            hidden = output[0] if isinstance(output, tuple) else output
            f = sae.encode(hidden)
            delta = torch.zeros_like(hidden)
            for edit in mine:
                change = (_apply(f, [edit]) - f)[..., edit.feature]  # (1, T)
                delta += change[..., None] * sae.W_dec[edit.feature]
            return hidden + delta

        handles.append(resolve_hook_point(model, sae.config.hook).module.register_forward_hook(hook))
    try:
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    finally:
        for handle in handles:
            handle.remove()


def _expected(log_probs, ids):
    """log p(ids[i] | ids[:i]) for i ≥ 1."""
    return log_probs[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def test_prompt_logprobs_equal_a_plain_forward(engine, pythia_tiny):
    for prompt in PROMPTS[:4]:
        ids = _ids(engine, prompt)
        [result] = engine.generate([GenerationRequest(prompt, max_new_tokens=0, prompt_logprobs=True, top_logprobs=3)])
        assert result.tokens == [] and result.finish_reason == "length" and result.prompt_tokens == ids
        assert result.prompt_logprobs[0] is None and result.prompt_top_logprobs[0] is None
        assert len(result.prompt_logprobs) == len(ids) == len(result.prompt_top_logprobs)
        log_probs = plain_log_probs(pythia_tiny.model, {}, ids)
        torch.testing.assert_close(torch.tensor(result.prompt_logprobs[1:]), _expected(log_probs, ids), atol=1e-5, rtol=0)
        top = log_probs[:-1].topk(3, dim=-1)
        for position, alternatives in enumerate(result.prompt_top_logprobs[1:]):
            assert [t for t, _ in alternatives] == top.indices[position].tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in alternatives]), top.values[position], atol=1e-5, rtol=0)
            # the chosen token's log p and the best alternative's come from one tensor: equal when it is the argmax
            if alternatives[0][0] == ids[position + 1]:
                assert alternatives[0][1] == result.prompt_logprobs[position + 1]


def test_generated_tokens_get_their_top_alternatives(engine, pythia_tiny):
    ids = _ids(engine, PROMPTS[0])
    [result] = engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=5, prompt_logprobs=True, top_logprobs=4,
                                                  ignore_eos=True)])
    log_probs = plain_log_probs(pythia_tiny.model, {}, ids + result.tokens)
    expected = _expected(log_probs, ids + result.tokens)
    torch.testing.assert_close(torch.tensor(result.prompt_logprobs[1:] + result.logprobs), expected, atol=1e-5, rtol=0)
    assert len(result.top_logprobs) == 5
    for step, alternatives in enumerate(result.top_logprobs):
        top = log_probs[len(ids) - 1 + step].topk(4)
        assert [t for t, _ in alternatives] == top.indices.tolist()
        assert alternatives[0] == (result.tokens[step], result.logprobs[step])  # greedy: the chosen one is the best


@pytest.mark.parametrize("edits", [
    (EditSpec(dictionary="relu", feature=3, op="set", value=6.0),),
    (EditSpec(dictionary="topk", feature=7, op="scale", value=4.0), EditSpec(dictionary="early", feature=2, op="add", value=3.0)),
    (EditSpec(dictionary="relu", feature=1, op="ablate", positions="prompt"),
     EditSpec(dictionary="topk", feature=5, op="set", value=9.0, positions="generated")),  # never reaches the prompt
], ids=["relu-set", "two-layers", "positions"])
def test_edited_prompt_logprobs_equal_plain_hooks(engine, pythia_tiny, edits):
    ids = _ids(engine, PROMPTS[3])
    [result] = engine.generate([GenerationRequest(PROMPTS[3], max_new_tokens=0, prompt_logprobs=True, edits=edits)])
    log_probs = plain_log_probs(pythia_tiny.model, engine.dictionaries, ids, edits)
    torch.testing.assert_close(torch.tensor(result.prompt_logprobs[1:]), _expected(log_probs, ids), atol=1e-5, rtol=0)
    assert result.prompt_top_logprobs is None and result.top_logprobs is None
    [unedited] = engine.generate([GenerationRequest(PROMPTS[3], max_new_tokens=0, prompt_logprobs=True)])
    assert unedited.prompt_logprobs != result.prompt_logprobs


def test_scores_do_not_depend_on_the_batch_or_the_chunks(engine):
    """Scoring and plain rows with different edits, admitted a few at a time, prompts read in
    chunks of 7: every request's prompt scores equal its solo run's (1e-5)."""
    edit = EditSpec(dictionary="relu", feature=3, op="set", value=6.0)
    requests = [
        GenerationRequest(PROMPTS[4], max_new_tokens=0, prompt_logprobs=True, top_logprobs=2),
        GenerationRequest(PROMPTS[0], max_new_tokens=6, edits=(edit,)),
        GenerationRequest(PROMPTS[3], max_new_tokens=3, prompt_logprobs=True, edits=(edit,), include_baseline=True),
        GenerationRequest(PROMPTS[1], max_new_tokens=4, temperature=0.9, seed=4),
        GenerationRequest(PROMPTS[2], max_new_tokens=1, prompt_logprobs=True, top_logprobs=5),
        GenerationRequest(PROMPTS[4], max_new_tokens=2, prompt_logprobs=True,
                          edits=(EditSpec(dictionary="early", feature=9, op="ablate"),)),
    ]
    limits = SchedulerLimits(max_running_rows=3, max_queued_requests=16, prefill_chunk_tokens=7)
    together = engine.generate(requests, limits=limits)
    for request, batched in zip(requests, together):
        [alone] = engine.generate([request])
        assert batched.tokens == alone.tokens
        if request.prompt_logprobs:
            assert batched.prompt_logprobs[0] is None and len(batched.prompt_logprobs) == len(alone.prompt_logprobs)
            torch.testing.assert_close(torch.tensor(batched.prompt_logprobs[1:]), torch.tensor(alone.prompt_logprobs[1:]),
                                       atol=1e-5, rtol=0)
        else:
            assert batched.prompt_logprobs is None
        if request.top_logprobs:
            for got, want in zip(batched.prompt_top_logprobs[1:], alone.prompt_top_logprobs[1:]):
                assert [t for t, _ in got] == [t for t, _ in want]
    assert together[2].baseline.prompt_logprobs is not None  # the baseline row is scored without edits


def test_scoring_requests_are_checked(engine):
    with pytest.raises(EditError) as caught:
        engine.generate([GenerationRequest("x", max_new_tokens=0)])
    assert caught.value.param.endswith("max_new_tokens")
    with pytest.raises(EditError) as caught:
        engine.generate([GenerationRequest("x", prompt_logprobs=True, top_logprobs=-1)])
    assert caught.value.param.endswith("top_logprobs")


def test_a_scoring_request_retires_in_the_step_that_reads_its_last_chunk(engine):
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=4, prefill_chunk_tokens=8))
    ids = _ids(engine, PROMPTS[4])
    handle = scheduler.submit(GenerationRequest(PROMPTS[4], max_new_tokens=0, prompt_logprobs=True))
    steps = 0
    while not handle.done:
        scheduler.step()
        steps += 1
    assert steps == -(-len(ids) // 8)  # one prefill chunk a step, nothing after the last
    assert scheduler.batch.n_rows == 0 and scheduler.tokens_in_flight == 0
    assert handle.result.tokens == [] and len(handle.result.prompt_logprobs) == len(ids)
