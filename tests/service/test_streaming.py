"""Streaming text deltas: their concatenation is the final text, and no stop string leaks."""

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


def test_engine_reports_each_step(pythia_tiny):
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    steps = []
    results = engine.generate([GenerationRequest("a", max_new_tokens=5), GenerationRequest("b", max_new_tokens=3,
                                                                                          include_baseline=True)],
                              on_step=lambda progress: steps.append([(list(t), f) for t, f, _ in progress]))
    assert len(steps) == 5 and all(len(s) == 2 for s in steps)  # one entry a request, baselines excluded
    assert steps[-1][0][0] == results[0].tokens and steps[2][1] == (results[1].tokens, "length")
    assert [len(s[0][0]) for s in steps] == [1, 2, 3, 4, 5]
