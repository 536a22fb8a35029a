"""The serving core through HTTP: cancellation on disconnect, admission control, limits in force,
and native streaming — on a second app with tight limits, on the session's Ray instance."""

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

DEFAULT = "pythia-tiny-l2"
LONG = {"prompt": "Return the number of", "max_new_tokens": 64}


def test_a_stream_interval_sends_fewer_messages_with_the_same_content(server):
    """An app whose streams send at most one message each 0.2 s: the first arrives at once, the
    rest carry several steps each, and everything still concatenates to the final answer."""
    from ray import serve

    from service.app import AppArgs, ModelArgs, build_app
    from service.model_server import Limits

    serve.run(build_app(AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT], torch_threads=1)],
                                limits=Limits(stream_interval_s=0.2))), name="paced", route_prefix="/paced")
    try:
        body = {"prompt": "The default value is", "max_new_tokens": 60, "ignore_eos": True, "stream": True}
        answer = requests.post(server + "/paced/v1/generate", json=body, stream=True, timeout=120)
        lines = [line for line in answer.iter_lines(decode_unicode=True) if line]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
        final = events[-1]
        assert len(final["tokens"]) == 60 and len(events) < 30  # 60 steps of a few ms: far fewer messages
        assert "tokens" not in events[0] and events[0]["token_ids"]  # the first tokens are not held back
        assert [t for e in events for t in e["token_ids"]] == final["tokens"]
        assert "".join(e["delta"] for e in events) == final["text"]
    finally:
        serve.delete("paced")


@pytest.fixture(scope="module")
def tight(server):
    """An app whose replica runs at most 2 rows and queues at most 2 requests."""
    from ray import serve

    from service.app import AppArgs, ModelArgs, build_app
    from service.model_server import Limits

    limits = Limits(max_new_tokens=1000, max_running_rows=2, max_queued_requests=2, max_tokens_in_flight=4096,
                    prefill_chunk_tokens=32)
    app = build_app(AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT], torch_threads=1)],
                            limits=limits))
    serve.run(app, name="tight", route_prefix="/tight")
    yield server + "/tight", limits
    serve.delete("tight")


def _metrics(url: str, *patterns: str) -> tuple[float | None, ...]:
    """Each pattern's value from one scrape of /metrics (two scrapes may straddle an export)."""
    text = requests.get(url + "/metrics", timeout=30).text
    found = [re.search(pattern, text, re.MULTILINE) for pattern in patterns]
    return tuple(float(match.group(1)) if match else None for match in found)


def _metric(url: str, pattern: str) -> float | None:
    return _metrics(url, pattern)[0]


def _wait_for(url: str, pattern: str | tuple[str, ...], predicate, seconds: float = 20.0):
    """Poll until ``predicate`` holds for the pattern's value (a tuple of patterns: their values
    from one scrape, as the predicate's arguments); returns the last value(s) seen."""
    patterns = pattern if isinstance(pattern, tuple) else (pattern,)
    deadline, values = time.time() + seconds, (None,) * len(patterns)
    while time.time() < deadline:
        values = _metrics(url, *patterns)
        if None not in values and predicate(*values):
            break
        time.sleep(0.2)
    return values if isinstance(pattern, tuple) else values[0]


RUNNING = r'^steerserve_running_rows\{model="pythia-tiny",phase="decode",replica="\w+"\} (\S+)'
CANCELLED = r'^steerserve_cancellations_total\{model="pythia-tiny",replica="\w+"\} (\S+)'


def test_configured_limits_are_in_force(tight):
    url, limits = tight
    [card] = [m for m in requests.get(url + "/v1/models", timeout=30).json()["data"] if "preset" not in m]
    assert card["limits"]["max_new_tokens"] == 1000 and card["limits"]["max_running_rows"] == 2 and card["limits"]["max_queued_requests"] == 2
    assert card["limits"]["max_tokens_in_flight"] == 4096 and card["limits"]["prefill_chunk_tokens"] == 32
    with ThreadPoolExecutor(4) as pool:  # 4 = 2 running + 2 queued: all served
        answers = list(pool.map(lambda _: requests.post(url + "/v1/generate", json=LONG, timeout=120), range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert len({tuple(a.json()["tokens"]) for a in answers}) == 1
    # every scheduler step ran at most 2 rows: the batch-size histogram has nothing above 2
    # (polled: the exported histogram can lag the answers)
    count_re = r'^steerserve_batch_size_count\{model="pythia-tiny",replica="\w+"\} (\S+)'
    bucket_re = r'^steerserve_batch_size_bucket\{le="2.0",model="pythia-tiny",replica="\w+"\} (\S+)'
    count, at_most_2 = _wait_for(url, (count_re, bucket_re), lambda count, le_2: count > 0 and le_2 == count, 30)
    assert count and at_most_2 == count, (count, at_most_2)


def test_a_full_queue_answers_503_with_retry_after(tight):
    url, _ = tight
    statuses, lock = [], threading.Lock()

    def send(_):
        answer = requests.post(url + "/v1/generate", json=LONG, timeout=120)
        with lock:
            statuses.append((answer.status_code, answer.headers.get("Retry-After"), answer.json()))

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(send, range(12)))
    refused = [s for s in statuses if s[0] == 503]
    served = [s for s in statuses if s[0] == 200]
    assert len(served) + len(refused) == 12 and served and refused
    for _, retry_after, body in refused:
        assert retry_after is not None and int(retry_after) >= 1
        assert body["error"]["type"] == "overloaded_error" and "busy" in body["error"]["message"]
    assert _wait_for(url, r'^steerserve_rejections_total\{model="pythia-tiny",replica="\w+"\} (\S+)',
                     lambda v: v >= len(refused)) >= len(refused)
    assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
    assert requests.post(url + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}, timeout=60).status_code == 200


@pytest.mark.parametrize("path, body", [  # 1000 tokens take seconds: closing after the first event is early
    ("/v1/completions", {"prompt": "The default value is", "max_tokens": 1000, "temperature": 0, "stream": True}),
    ("/v1/generate", {"prompt": "The default value is", "max_new_tokens": 1000, "stream": True,
                      "edits": [{"dictionary": DEFAULT, "feature": 3, "op": "ablate"}]}),
])
def test_a_client_that_leaves_frees_its_row(tight, path, body):
    url, _ = tight
    before = _metric(url, CANCELLED) or 0.0
    with requests.post(url + path, json=body, stream=True, timeout=60) as answer:
        assert answer.status_code == 200
        lines = answer.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line)
        assert first.startswith("data: ") and "[DONE]" not in first
    # the connection is closed mid-stream: the row leaves the batch, counted as a cancellation
    assert _wait_for(url, CANCELLED, lambda v: v >= before + 1) >= before + 1
    assert _wait_for(url, RUNNING, lambda v: v == 0) == 0


def test_native_streaming_with_a_baseline(server, engine):
    from editing.edits import EditSpec
    from editing.engine import GenerationRequest

    body = {"prompt": "If the file does not exist, the", "max_new_tokens": 20, "include_baseline": True,
            "edits": [{"dictionary": DEFAULT, "feature": 11, "op": "set", "value": 6.0}], "stream": True}
    answer = requests.post(server + "/v1/generate", json=body, stream=True, timeout=120)
    assert answer.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in answer.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    final = events[-1]
    assert "".join(e["delta"] for e in events) == final["text"]
    assert "".join(e["baseline_delta"] for e in events) == final["baseline"]["text"]
    assert [t for e in events for t in e["token_ids"]] == final["tokens"]
    assert [t for e in events for t in e["baseline_token_ids"]] == final["baseline"]["tokens"]
    assert len(events) >= 10  # token by token, a message a step (or a few steps when the reader lags)
    [local] = engine.generate([GenerationRequest(body["prompt"], max_new_tokens=20, include_baseline=True,
                                                 edits=tuple(EditSpec(**e) for e in body["edits"]))])
    assert final["tokens"] == local.tokens and final["baseline"]["tokens"] == local.baseline.tokens
    assert final["edit_report"][0]["changed"]
