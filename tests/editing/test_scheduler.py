"""The continuous-batching scheduler: a request's result is its solo result whatever joins or
leaves the batch around it, and rows come and go exactly when they should."""

import pytest
import torch

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from editing.edits import EditError, EditSpec
from editing.engine import Engine, EngineError, GenerationRequest
from editing.engine.scheduler import QueueFullError, SchedulerLimits

PROMPTS = ["The function returns", "Return a new list of", "class", "If the file does not exist, the",
           "This module provides a way to read and write the files of an archive in the format used by"]


def _dictionary(arch, width, hook="blocks.2.hook_resid_post", seed=0):
    config = DictionaryConfig(architecture=arch, d_in=width, d_sae=256, hook=hook, k=16 if arch == "topk" else None)
    return Dictionary.random(config, seed=seed)


@pytest.fixture(scope="module", params=["pythia-tiny", "pythia-70m-shape"])
def engine(request, pythia_tiny, pythia_70m_shape):
    model, tokenizer = (pythia_tiny.model, pythia_tiny.tokenizer) if request.param == "pythia-tiny" else pythia_70m_shape
    width = model.config.hidden_size
    return Engine(model, tokenizer, {"relu": _dictionary("relu", width), "topk": _dictionary("topk", width, seed=1),
                                     "early": _dictionary("jumprelu", width, hook="blocks.1.hook_resid_pre", seed=2)})


def _edit(dictionary, feature, op, value=None, positions="all"):
    return EditSpec(dictionary=dictionary, feature=feature, op=op, value=value, positions=positions)


def _mixed_requests():
    """Different edits, lengths, sampling, baselines and read-outs."""
    return [
        GenerationRequest(PROMPTS[0], max_new_tokens=9, edits=(_edit("relu", 3, "set", 6.0),)),
        GenerationRequest(PROMPTS[1], max_new_tokens=3, temperature=0.8, top_p=0.9, seed=11),
        GenerationRequest(PROMPTS[4], max_new_tokens=12, include_baseline=True,
                          edits=(_edit("early", 5, "add", 3.0), _edit("topk", 7, "scale", 4.0, "generated"))),
        GenerationRequest(PROMPTS[2], max_new_tokens=1),
        GenerationRequest(PROMPTS[3], max_new_tokens=7, temperature=1.0, top_k=40, seed=3,
                          edits=(_edit("relu", 1, "ablate", positions="prompt"),), return_features=("topk", 3)),
        GenerationRequest(PROMPTS[0], max_new_tokens=5, ignore_eos=True, edits=(_edit("topk", 2, "set", 2.0),)),
        GenerationRequest(PROMPTS[4], max_new_tokens=4, temperature=0.7, seed=99, include_baseline=True),
    ]


def _assert_same(result, alone):
    assert result.tokens == alone.tokens
    assert result.finish_reason == alone.finish_reason
    torch.testing.assert_close(torch.tensor(result.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)
    assert [r["positions_edited"] for r in result.edit_report] == [r["positions_edited"] for r in alone.edit_report]
    for got, want in zip(result.edit_report, alone.edit_report):
        for a, b in zip(got["features"], want["features"]):
            assert a["positions"] == b["positions"] and a["changed_positions"] == b["changed_positions"]
            if b["mean_before"] is not None:
                assert a["mean_before"] == pytest.approx(b["mean_before"], abs=1e-4)
    if alone.features is not None:
        assert [p["token_id"] for p in result.features] == [p["token_id"] for p in alone.features]
        assert [[f["feature"] for f in p["features"]] for p in result.features] == \
               [[f["feature"] for f in p["features"]] for p in alone.features]
    if alone.baseline is not None:
        _assert_same(result.baseline, alone.baseline)


def _run_trace(scheduler, trace):
    """Submit each request at its arrival step; step until everything is done. Returns handles
    in trace order and the largest number of rows the batch ever held."""
    pending = sorted(enumerate(trace), key=lambda item: item[1][0])
    handles, step, widest = {}, 0, 0
    while pending or scheduler.has_work():
        while pending and pending[0][1][0] <= step:
            index, (_, request) = pending.pop(0)
            handles[index] = scheduler.submit(request)
        scheduler.step()
        widest = max(widest, scheduler.batch.n_rows)
        step += 1
        assert step < 1000
    return [handles[i] for i in range(len(trace))], widest


def test_results_equal_solo_results_under_churn(engine):
    requests = _mixed_requests()
    alone = [engine.generate([request])[0] for request in requests]
    # rows join at different steps, prompts are read in chunks of 3 positions, at most 4 rows run
    trace = [(arrival, request) for arrival, request in zip([0, 0, 1, 2, 2, 5, 6], requests)]
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=4, prefill_chunk_tokens=3))
    handles, widest = _run_trace(scheduler, trace)
    assert widest <= 4
    for handle, solo in zip(handles, alone):
        assert handle.error is None
        _assert_same(handle.result, solo)
    # and all at once, with a different order and room for everyone
    together = engine.generate(list(reversed(requests)))
    for result, solo in zip(reversed(together), alone):
        _assert_same(result, solo)


def test_a_request_admitted_mid_generation_is_correct(engine):
    long_runner = GenerationRequest(PROMPTS[3], max_new_tokens=20, ignore_eos=True, edits=(_edit("relu", 9, "set", 5.0),))
    late = GenerationRequest(PROMPTS[4], max_new_tokens=6, edits=(_edit("early", 1, "scale", 3.0),), include_baseline=True)
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=8, prefill_chunk_tokens=8))
    first = scheduler.submit(long_runner)
    for _ in range(7):
        scheduler.step()
    assert len(first.sequences[0].tokens) >= 5  # mid-generation
    second = scheduler.submit(late)
    scheduler.run_until_idle()
    _assert_same(first.result, engine.generate([long_runner])[0])
    _assert_same(second.result, engine.generate([late])[0])


def test_never_more_rows_than_the_limit(engine):
    requests = _mixed_requests()
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=2, prefill_chunk_tokens=16))
    handles, widest = _run_trace(scheduler, [(0, r) for r in requests])
    assert widest == 2
    for handle, request in zip(handles, requests):
        _assert_same(handle.result, engine.generate([request])[0])


def test_cancelled_rows_leave_within_one_step(engine):
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=8))
    keep = scheduler.submit(GenerationRequest(PROMPTS[0], max_new_tokens=30, ignore_eos=True))
    doomed = scheduler.submit(GenerationRequest(PROMPTS[1], max_new_tokens=30, ignore_eos=True, include_baseline=True,
                                                edits=(_edit("relu", 4, "set", 3.0),)))
    waiting = scheduler.submit(GenerationRequest(PROMPTS[2], max_new_tokens=30))
    done = []
    doomed.on_done = done.append
    for _ in range(3):
        scheduler.step()
    assert scheduler.batch.n_rows == 4
    scheduler.cancel(doomed)
    scheduler.step()
    assert scheduler.batch.n_rows == 2 and done == [doomed] and doomed.done and doomed.result is None
    assert not scheduler.batch.tables  # the only edited row left: its table went with it
    scheduler.cancel(waiting)  # already running too: also gone at the next step
    scheduler.step()
    assert scheduler.batch.n_rows == 1
    scheduler.run_until_idle()
    assert keep.result.tokens == engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=30, ignore_eos=True)])[0].tokens
    assert scheduler.tokens_in_flight == 0 and not scheduler.has_work()


def test_a_waiting_request_can_be_cancelled(engine):
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=1))
    running = scheduler.submit(GenerationRequest(PROMPTS[0], max_new_tokens=4))
    queued = scheduler.submit(GenerationRequest(PROMPTS[1], max_new_tokens=4))
    scheduler.step()
    assert scheduler.waiting == 1
    scheduler.cancel(queued)
    scheduler.run_until_idle()
    assert queued.done and queued.result is None and running.result is not None and scheduler.waiting == 0


def test_rows_end_at_once_on_length_eos_and_stop(pythia_tiny):
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    [free] = engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=12)])
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=8))
    by_length = scheduler.submit(GenerationRequest(PROMPTS[0], max_new_tokens=3))
    by_stop = scheduler.submit(GenerationRequest(PROMPTS[0], max_new_tokens=12, stop=(stop,)))
    rows = []
    for _ in range(12):
        scheduler.step()
        rows.append(scheduler.batch.n_rows)
    assert by_length.result.finish_reason == "length" and len(by_length.result.tokens) == 3
    assert by_stop.result.finish_reason == "stop" and stop not in by_stop.result.text
    assert free.text.startswith(by_stop.result.text) and len(by_stop.result.tokens) < 12
    # step i (from 0) gives every row its (i+1)-th token; a row is gone right after the step that ended it
    lengths = (3, len(by_stop.result.tokens))
    assert rows == [sum(n - 1 > i for n in lengths) for i in range(12)]
    # EOS: another token plays EOS; the row ends at it, without it
    eos_engine = Engine(pythia_tiny.model, _WithEos(pythia_tiny.tokenizer, free.tokens[2]))
    [ended] = eos_engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=12)])
    assert ended.finish_reason == "stop" and ended.tokens == free.tokens[:2]
    [ignored] = eos_engine.generate([GenerationRequest(PROMPTS[0], max_new_tokens=12, ignore_eos=True)])
    assert ignored.tokens == free.tokens


class _WithEos:
    """The same tokenizer with another token playing EOS."""

    def __init__(self, tokenizer, eos):
        self._tokenizer, self.eos_token_id = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)


def test_long_prompts_are_read_in_chunks_while_others_decode(pythia_tiny):
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    long_prompt = " ".join(PROMPTS * 6)
    short = GenerationRequest(PROMPTS[0], max_new_tokens=10)
    long = GenerationRequest(long_prompt, max_new_tokens=4)
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=4, prefill_chunk_tokens=16))
    first = scheduler.submit(short)
    scheduler.step()
    second = scheduler.submit(long)
    n_prompt = len(pythia_tiny.tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
    assert n_prompt > 16 * 10
    steps = 0
    while first.result is None:  # the short request decodes one token a step while the long prompt is read
        scheduler.step()
        steps += 1
    assert steps == 9 and 0 < second.sequences[0].prefilled == 16 * 9 < n_prompt
    scheduler.run_until_idle()
    _assert_same(first.result, engine.generate([short])[0])
    _assert_same(second.result, engine.generate([long])[0])


def test_queue_and_token_budgets(pythia_tiny):
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    limits = SchedulerLimits(max_running_rows=2, max_queued_requests=2, max_tokens_in_flight=40)
    scheduler = engine.scheduler(limits)
    request = GenerationRequest(PROMPTS[0], max_new_tokens=16)  # 3 + 16 = 19 tokens
    handles = [scheduler.submit(request) for _ in range(4)]  # 2 for the free rows, 2 queued
    with pytest.raises(QueueFullError) as refused:
        scheduler.submit(request)
    assert refused.value.retry_after >= 1
    scheduler.step()
    assert scheduler.waiting == 2 and scheduler.tokens_in_flight == 38 and scheduler.batch.n_rows == 2
    with pytest.raises(QueueFullError):
        scheduler.submit(request)
    scheduler.run_until_idle()
    assert len({tuple(h.result.tokens) for h in handles}) == 1 and scheduler.tokens_in_flight == 0
    # the token budget holds rows back: two rows of 19 fit in 40, a third waits although a row is free
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=3, max_tokens_in_flight=40))
    handles = [scheduler.submit(request) for _ in range(3)]
    scheduler.step()
    assert scheduler.waiting == 1 and scheduler.batch.n_rows == 2
    scheduler.run_until_idle()
    assert all(h.result.tokens == handles[0].result.tokens for h in handles) and scheduler.tokens_in_flight == 0
    with pytest.raises(EngineError) as too_big:
        scheduler.submit(GenerationRequest(PROMPTS[0], max_new_tokens=20, include_baseline=True))  # 2 × 23 > 40
    assert too_big.value.param.endswith("max_new_tokens")


def test_a_dictionary_undeployed_while_waiting_fails_only_its_request(pythia_tiny):
    width = pythia_tiny.model.config.hidden_size
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer, {"gone": _dictionary("relu", width)})
    scheduler = engine.scheduler(SchedulerLimits(max_running_rows=1))
    first = scheduler.submit(GenerationRequest(PROMPTS[0], max_new_tokens=3, edits=(_edit("gone", 1, "set", 2.0),)))
    second = scheduler.submit(GenerationRequest(PROMPTS[1], max_new_tokens=3, edits=(_edit("gone", 2, "set", 2.0),)))
    third = scheduler.submit(GenerationRequest(PROMPTS[2], max_new_tokens=3))
    scheduler.step()
    engine.remove_dictionary("gone")  # the running row keeps the weights it started with
    scheduler.run_until_idle()
    assert first.result.edit_report[0]["dictionary"] == "gone"
    assert isinstance(second.error, EditError) and second.error.param.endswith("edits[0].dictionary")
    assert third.result is not None
