"""Streaming: per-step updates from the scheduler, and text deltas whose concatenation is the
final text with no stop string leaking."""

from editing.engine import Engine, GenerationRequest
from service.model_server import DeltaStreamer


def _stream(tokenizer, result, stops):
    streamer = DeltaStreamer(tokenizer, stops)
    deltas = []
    for i in range(1, len(result.tokens) + 1):
        last = i == len(result.tokens)
        deltas.append(streamer.update(result.tokens[:i], result.finish_reason if last else None,
                                      result.text if last else None))
    return deltas


def test_deltas_concatenate_to_the_text(pythia_tiny):
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    for prompt in ["Return the number of", "caf\u00e9 \u2014 na\u00efve", "def main("]:
        [result] = engine.generate([GenerationRequest(prompt, max_new_tokens=24, temperature=1.0, seed=3)])
        assert "".join(_stream(pythia_tiny.tokenizer, result, [])) == result.text


def test_stop_strings_are_held_back(pythia_tiny):
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    [free] = engine.generate([GenerationRequest("Return the number of", max_new_tokens=24)])
    stop = free.text[6:9]
    [stopped] = engine.generate([GenerationRequest("Return the number of", max_new_tokens=24, stop=(stop,))])
    assert stopped.finish_reason == "stop"
    deltas = _stream(pythia_tiny.tokenizer, stopped, [stop])
    assert "".join(deltas) == stopped.text and stop not in "".join(deltas)


def test_scheduler_reports_each_step(pythia_tiny):
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    scheduler = engine.scheduler()
    updates = {"a": [], "b": []}
    a = scheduler.submit(GenerationRequest("a", max_new_tokens=5), on_update=updates["a"].append)
    b = scheduler.submit(GenerationRequest("b", max_new_tokens=3, include_baseline=True), on_update=updates["b"].append)
    scheduler.run_until_idle()
    assert [len(step) for step in updates["a"]] == [1] * 5  # one update a step, for the one row
    assert [len(step) for step in updates["b"]] == [2] * 3  # the main row and its baseline
    for name, handle in (("a", a), ("b", b)):
        main = [u for step in updates[name] for u in step if not u.baseline]
        assert [t for u in main for t in u.tokens] == handle.result.tokens
        assert [u.finish_reason for u in main][-1] == handle.result.finish_reason == "length"
    baseline = [t for step in updates["b"] for u in step if u.baseline for t in u.tokens]
    assert baseline == b.result.baseline.tokens
