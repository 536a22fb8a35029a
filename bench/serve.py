"""Serving benchmark: continuous batching through HTTP, the same scheduler in-process, and static
batching, on one trace of mixed lengths and mixed edits.

    .venv/bin/python bench/serve.py [--models pythia-tiny pythia-70m-shape] [--levels 1 8 32 64]
                                    [--per-client 4] [--seed 0] [--repeats 1] [--stream-interval 0]

For each model, the app (Ray Serve on a free loopback port) serves it with one dictionary:
pythia-tiny with its default dictionary, the Pythia-70M-shaped random model (saved once under
``$STEERSERVE_HOME/models/``) with a random 4096-feature relu dictionary at its middle layer.
A trace of ``per-client × concurrency`` greedy requests is drawn once per level: prompts from a
fixed list, ``max_new_tokens`` uniform in 8..128 with EOS ignored (exact lengths), half of them
editing two features. At each concurrency ``C`` the same trace runs four ways, each a closed
loop of ``C`` clients (a client sends its next request when its last one is answered), one
after the other — ``--repeats R`` runs the four R times interleaved and reports them over all
runs, with each repeat's ratios, so that a machine busy with something else for a while weighs
on every mode alike:

- **HTTP**: ``C`` client threads stream ``POST /v1/generate`` (server-sent events, one event a
  step) — time to first token and inter-token latency as the client sees them;
- **HTTP whole**: the same without streaming (one JSON answer a request) — what the relay of
  per-step messages through the ingress and proxy costs;
- **in-process**: the scheduler in this process, fed the same trace by ``C`` virtual clients;
- **static**: the batching the service had before continuous batching, simulated on the same
  engine: a batch of up to 16 waiting requests runs until its longest request is done (every
  row computes to that length) and answers all at once; the next batch starts after it.

Printed a level: requests/s, generated tokens/s, TTFT p50/p99, inter-token latency p50/p99, the
HTTP/in-process throughput ratio (streamed and whole) and continuous/static. Then the head-of-line
figure: the latency of a 4-token request sent while 16 requests of 128 tokens run, in milliseconds
and in decode steps of the running batch. The clients run on the same machine: each level also
prints the share of a core they used (on a small machine they compete with the server). Traffic
goes to 127.0.0.1 only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the app's CPU replicas wait passively (service/app.py); the in-process side must compare like with
# like. libgomp reads this when torch loads, so it is set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PROMPTS = ["Return the number of", "class", "The default value is", "Raise an exception if", "def main(",
           "Return True if the", "This module provides", "An iterator over"]
STATIC_BATCH = 16  # the @serve.batch size the service used before the scheduler
MODES = ("HTTP", "HTTP whole", "in-process", "static")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def trace(n: int, seed: int, dictionary: str, d_sae: int) -> list[dict]:
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        edits = [{"dictionary": dictionary, "feature": rng.randrange(d_sae), "op": "scale", "value": 4.0},
                 {"dictionary": dictionary, "feature": rng.randrange(d_sae), "op": "ablate"}] if i % 2 else []
        bodies.append({"prompt": rng.choice(PROMPTS), "max_new_tokens": rng.randint(8, 128), "edits": edits})
    return bodies


@dataclass
class Run:
    seconds: float = 0.0
    tokens: int = 0
    requests: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    cpu: float = 0.0  # CPU seconds this process (the clients) used

    @staticmethod
    def merge(runs: list["Run"]) -> "Run":
        """Several runs of one mode as one: their seconds, tokens and samples added up."""
        merged = Run()
        for run in runs:
            merged.seconds += run.seconds
            merged.tokens += run.tokens
            merged.requests += run.requests
            merged.cpu += run.cpu
            merged.ttft += run.ttft
            merged.itl += run.itl
            merged.latency += run.latency
        return merged

    def row(self) -> list[str]:
        ms = lambda v: f"{1000 * v:.1f}"  # noqa: E731
        return [f"{self.requests / self.seconds:.2f}", f"{self.tokens / self.seconds:.1f}",
                ms(percentile(self.ttft, 0.5)), ms(percentile(self.ttft, 0.99)),
                ms(percentile(self.itl, 0.5)), ms(percentile(self.itl, 0.99))]


# --- through HTTP -------------------------------------------------------------------------------------

def http_request(session: requests.Session, url: str, model: str, body: dict) -> tuple[int, float, list[float], float]:
    """Stream one request: (tokens, ttft, inter-token gaps, latency) as the client sees them."""
    start = time.perf_counter()
    answer = session.post(url + "/v1/generate", json={**body, "model": model, "stream": True, "ignore_eos": True},
                          stream=True, timeout=600)
    answer.raise_for_status()
    tokens, first, last, gaps = 0, None, None, []
    for line in answer.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(event["error"])
        now, count = time.perf_counter(), len(event["token_ids"])
        if count:
            if first is None:
                first, count = now - start, count - 1
            elif last is not None:
                gaps += [(now - last) / count] * count
            tokens += len(event["token_ids"])
            last = now
    return tokens, first, gaps, time.perf_counter() - start


def http_whole(session: requests.Session, url: str, model: str, body: dict) -> tuple[int, float, list[float], float]:
    """One request without streaming: the answer comes whole, so its first token arrives with its last."""
    start = time.perf_counter()
    answer = session.post(url + "/v1/generate", json={**body, "model": model, "ignore_eos": True}, timeout=600)
    answer.raise_for_status()
    latency = time.perf_counter() - start
    return len(answer.json()["tokens"]), latency, [], latency


def closed_loop(bodies: list[dict], concurrency: int, send) -> Run:
    """``concurrency`` client threads, each sending its next request when its last one returned."""
    work: queue.Queue = queue.Queue()
    for body in bodies:
        work.put(body)
    run, lock = Run(), threading.Lock()

    def client():
        session = requests.Session()
        while True:
            try:
                body = work.get_nowait()
            except queue.Empty:
                return
            tokens, ttft, gaps, latency = send(session, body)
            with lock:
                run.tokens += tokens
                run.requests += 1
                run.ttft.append(ttft)
                run.itl += gaps
                run.latency.append(latency)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.seconds, run.cpu = time.perf_counter() - start, time.process_time() - cpu
    return run


# --- in-process -----------------------------------------------------------------------------------------

def engine_request(body: dict, *, max_new_tokens: int | None = None):
    from editing.edits import EditSpec
    from editing.engine import GenerationRequest

    return GenerationRequest(body["prompt"], max_new_tokens=max_new_tokens or body["max_new_tokens"], ignore_eos=True,
                             edits=tuple(EditSpec(**edit) for edit in body["edits"]))


def in_process(engine, limits, bodies: list[dict], concurrency: int) -> Run:
    """The scheduler fed by ``concurrency`` virtual clients in a closed loop."""
    scheduler = engine.scheduler(limits)
    pending, run = list(bodies), Run()
    active: dict[int, dict] = {}

    def submit():
        body = pending.pop(0)
        state = {"start": time.perf_counter(), "first": None, "last": None}

        def on_update(updates, state=state):
            now, count = time.perf_counter(), sum(len(u.tokens) for u in updates)
            if not count:
                return
            if state["first"] is None:
                state["first"], count = now, count - 1
            elif state["last"] is not None:
                run.itl.extend([(now - state["last"]) / count] * count)
            state["last"] = now

        handle = scheduler.submit(engine_request(body), on_update=on_update)
        active[handle.id] = (handle, state)

    start = time.perf_counter()
    for _ in range(min(concurrency, len(pending))):
        submit()
    while active:
        scheduler.step()
        for key, (handle, state) in list(active.items()):
            if handle.done:
                del active[key]
                now = time.perf_counter()
                run.requests += 1
                run.tokens += len(handle.result.tokens)
                run.ttft.append(state["first"] - state["start"])
                run.latency.append(now - state["start"])
                if pending:
                    submit()
    run.seconds = time.perf_counter() - start
    return run


def static_batching(engine, bodies: list[dict], concurrency: int) -> Run:
    """Batches of up to 16 waiting requests, each run to its longest request's length, answered at its end."""
    from editing.engine.scheduler import SchedulerLimits

    pending, run = list(bodies), Run()
    waiting = [time.perf_counter() for _ in range(min(concurrency, len(pending)))]  # arrival times
    start = time.perf_counter()
    while waiting:
        batch_arrivals, waiting = waiting[:STATIC_BATCH], waiting[STATIC_BATCH:]
        batch = [pending.pop(0) for _ in batch_arrivals]
        longest = max(body["max_new_tokens"] for body in batch)
        scheduler = engine.scheduler(SchedulerLimits(max_running_rows=len(batch), max_tokens_in_flight=1 << 30))
        firsts: dict[int, float] = {}
        handles = []
        for body in batch:
            handle = scheduler.submit(engine_request(body, max_new_tokens=longest))
            handle.on_update = lambda updates, key=handle.id: firsts.setdefault(key, time.perf_counter())
            handles.append(handle)
        step_times = []
        while scheduler.step():
            step_times.append(time.perf_counter())
        end = time.perf_counter()
        for handle, body, arrived in zip(handles, batch, batch_arrivals):
            run.requests += 1
            run.tokens += body["max_new_tokens"]  # the rest of the row was computed for nothing
            run.ttft.append(firsts[handle.id] - arrived)
            run.latency.append(end - arrived)
        gaps = [b - a for a, b in zip(step_times, step_times[1:])]
        run.itl += gaps * len(batch)
        waiting += [end] * min(len(batch), len(pending) - len(waiting))  # their clients send again
    run.seconds = time.perf_counter() - start
    return run


# --- head of line ---------------------------------------------------------------------------------------

def head_of_line_http(url: str, model: str) -> tuple[float, float]:
    """Latency of a 4-token request sent while 16 requests of 128 tokens run, and the running
    batch's median decode step measured meanwhile."""
    long = {"prompt": PROMPTS[0], "max_new_tokens": 128, "edits": []}
    gaps: list[float] = []
    started = threading.Barrier(17)

    def runner():
        session = requests.Session()
        started.wait()
        _, _, g, _ = http_request(session, url, model, long)
        gaps.extend(g)

    threads = [threading.Thread(target=runner) for _ in range(16)]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(1.0)  # the 16 are decoding
    _, _, _, latency = http_request(requests.Session(), url, model, {"prompt": PROMPTS[1], "max_new_tokens": 4, "edits": []})
    for thread in threads:
        thread.join()
    return latency, percentile(gaps, 0.5)


def head_of_line_steps(engine, limits) -> int:
    """In-process: scheduler steps from the short request's submission to its answer."""
    scheduler = engine.scheduler(limits)
    for _ in range(16):
        scheduler.submit(engine_request({"prompt": PROMPTS[0], "max_new_tokens": 128, "edits": []}))
    for _ in range(8):
        scheduler.step()
    short = scheduler.submit(engine_request({"prompt": PROMPTS[1], "max_new_tokens": 4, "edits": []}))
    steps = 0
    while not short.done:
        scheduler.step()
        steps += 1
    scheduler.run_until_idle()
    return steps


# --- set-up -----------------------------------------------------------------------------------------------

def prepare(model: str):
    """(model name for the app, dictionary name, d_sae, loaded model) — built or stored on first use."""
    from bench_models import load_bench_model, save_bench_model
    from dictionaries.config import DictionaryConfig
    from dictionaries.sae import Dictionary
    from dictionaries.store import DictionaryStore
    from dictionaries.training.pipeline import DEFAULT_NAME

    if model == "pythia-tiny":
        from service.setup import default_app_args, ensure_defaults

        ensure_defaults(default_app_args())
        return "pythia-tiny", DEFAULT_NAME, 1024, load_bench_model("pythia-tiny", "cpu")
    path = save_bench_model(model)
    store, name = DictionaryStore(), "bench-70m-shape-l3"
    if name not in store:
        config = DictionaryConfig(architecture="relu", d_in=512, d_sae=4096, hook="blocks.3.hook_resid_post",
                                  model_name=str(path))
        store.put(name, Dictionary.random(config, seed=0))
    from editing.model import load_model

    return str(path), name, 4096, load_model(str(path), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pythia-tiny", "pythia-70m-shape"])
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--per-client", type=int, default=4, help="requests in the trace per client (at least 16 in all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the modes this many times, interleaved; figures are over all runs")
    parser.add_argument("--stream-interval", type=float, default=0.0,
                        help="the app's stream_interval_s: shortest gap between two messages of a stream")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import torch
    from ray import serve

    from dictionaries.store import DictionaryStore
    from editing.engine import Engine
    from service.app import AppArgs, ModelArgs, run
    from service.model_server import Limits

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    limits = Limits(max_new_tokens=128, max_running_rows=64, max_queued_requests=256,
                    stream_interval_s=args.stream_interval)
    prepared = {model: prepare(model) for model in args.models}
    app = AppArgs(models=[ModelArgs(name=name, dictionaries=[dictionary], torch_threads=threads)
                          for name, dictionary, _, _ in prepared.values()], limits=limits)
    url = run(app, port=free_port(), name="steerserve-bench")
    print(f"torch {torch.__version__}, {threads} threads, CPU; limits: {limits.max_running_rows} running rows, "
          f"prefill chunk {limits.prefill_chunk_tokens}; stream interval {limits.stream_interval_s} s; static batches of up to {STATIC_BATCH}")
    try:
        for model, (name, dictionary, d_sae, loaded) in prepared.items():
            engine = Engine(loaded.model, loaded.tokenizer, {dictionary: DictionaryStore().load(dictionary)})
            warm = trace(8, args.seed, dictionary, d_sae)
            closed_loop(warm, 4, lambda session, body: http_request(session, url, name, body))
            in_process(engine, limits.scheduler_limits(), warm, 4)
            print(f"\n{model} (dictionary {dictionary}; max_new_tokens 8-128, half the requests edit 2 features)")
            header = ["C", "mode", "req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"]
            print(" | ".join(header) + " | HTTP/in-proc | cont./static")
            rate = lambda result: result.tokens / result.seconds  # noqa: E731
            for level in args.levels:
                bodies = trace(max(16, args.per_client * level), args.seed + level, dictionary, d_sae)
                runs: dict[str, list[Run]] = {mode: [] for mode in MODES}
                for _ in range(args.repeats):  # the modes interleaved, so a slow spell of the machine hits all alike
                    runs["HTTP"].append(closed_loop(bodies, level, lambda session, body: http_request(session, url, name, body)))
                    runs["HTTP whole"].append(closed_loop(bodies, level, lambda session, body: http_whole(session, url, name, body)))
                    runs["in-process"].append(in_process(engine, limits.scheduler_limits(), bodies, level))
                    runs["static"].append(static_batching(engine, bodies, level))
                    assert len({run[-1].tokens for run in runs.values()}) == 1
                    assert runs["HTTP"][-1].tokens == sum(b["max_new_tokens"] for b in bodies)
                merged = {mode: Run.merge(results) for mode, results in runs.items()}
                local = merged["in-process"]
                gain = rate(local) / rate(merged["static"])
                for mode, result in merged.items():
                    extra = f" | {rate(result) / rate(local):.2f}" if mode.startswith("HTTP") else ""
                    extra += f" | {gain:.2f}" if mode == "HTTP" else ""
                    print(" | ".join([str(level), mode, *result.row()]) + extra, flush=True)
                if args.repeats > 1:
                    by_repeat = lambda a, b: " ".join(f"{rate(x) / rate(y):.2f}" for x, y in zip(runs[a], runs[b]))  # noqa: E731
                    print(f"  by repeat: HTTP/in-process {by_repeat('HTTP', 'in-process')}; HTTP whole/in-process "
                          f"{by_repeat('HTTP whole', 'in-process')}; continuous/static {by_repeat('in-process', 'static')}")
                http, whole = merged["HTTP"], merged["HTTP whole"]
                print(f"  (the load generator's own threads used {100 * http.cpu / http.seconds:.0f}% of a core during "
                      f"HTTP, {100 * whole.cpu / whole.seconds:.0f}% during HTTP whole, of the {threads} cores)")
            latency, step = head_of_line_http(url, name)
            steps = head_of_line_steps(engine, limits.scheduler_limits())
            print(f"head of line: a 4-token request beside 16 × 128-token requests answered in {1000 * latency:.0f} ms "
                  f"through HTTP = {latency / step:.1f} decode steps of {1000 * step:.1f} ms; in-process after {steps} steps")
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
