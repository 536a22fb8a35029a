"""Serving throughput and latency through HTTP, next to the in-process engine on the same work.

    .venv/bin/python bench/serve.py [--levels 1 8 32] [--requests 64] [--new-tokens 16]

Starts the app (pythia-tiny + its default dictionary; both are built on first use) on a free
loopback port and sends a fixed workload — half the requests edit two features, half do
not, greedy, ``--new-tokens`` tokens each with EOS ignored — at each concurrency level from
that many client threads. Then it runs the same requests through the engine in-process, in
batches as large as the concurrency (capped at the server's batch size). Prints
requests/s, generated tokens/s and p50/p99 latency, and the HTTP/in-process throughput ratio.
Traffic goes to 127.0.0.1 only, and every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PROMPTS = ["Return the number of", "class", "The default value is", "Raise an exception if", "def main(",
           "Return True if the", "This module provides", "An iterator over"]


def workload(n: int, new_tokens: int, dictionary: str) -> list[dict]:
    bodies = []
    for i in range(n):
        edits = [{"dictionary": dictionary, "feature": (7 * i) % 1024, "op": "scale", "value": 4.0},
                 {"dictionary": dictionary, "feature": (13 * i + 5) % 1024, "op": "ablate"}] if i % 2 else []
        bodies.append({"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": new_tokens, "edits": edits})
    return bodies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from editing.engine import GenerationRequest
    from editing.edits import EditSpec
    from service.app import run
    from service.model_server import ModelConfig, ModelServer
    from service.setup import default_app_args, ensure_defaults

    app_args = default_app_args()
    ensure_defaults(app_args)
    dictionary = app_args.models[0].dictionaries[0]
    url = run(app_args, port=free_port(), name="steerserve-bench")
    max_batch = app_args.limits.max_batch_size
    session = requests.Session()

    def send(body: dict) -> tuple[float, int]:
        body = {**body}
        start = time.perf_counter()
        answer = session.post(url + "/v1/generate", json=body, timeout=300)
        answer.raise_for_status()
        return time.perf_counter() - start, len(answer.json()["tokens"])

    local = ModelServer(ModelConfig(name="pythia-tiny", dictionaries=(dictionary,), torch_threads=os.cpu_count()))
    print(f"{args.requests} requests a level, {args.new_tokens} new tokens each, half with 2 edited features; "
          f"server batch size {max_batch}; torch threads {os.cpu_count()}")
    print(f"{'concurrency':>11} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'in-proc tok/s':>14} {'ratio':>6}")
    for level in args.levels:
        bodies = workload(args.requests, args.new_tokens, dictionary)
        for body in bodies[: min(level, 4)]:  # warm the path
            send(body)
        start = time.perf_counter()
        with ThreadPoolExecutor(level) as pool:
            results = list(pool.map(send, bodies))
        elapsed = time.perf_counter() - start
        latencies = [r[0] for r in results]
        tokens = sum(r[1] for r in results)

        requests_local = [GenerationRequest(b["prompt"], max_new_tokens=b["max_new_tokens"],
                                            edits=tuple(EditSpec(**e) for e in b["edits"]), ignore_eos=False)
                          for b in bodies]
        batch = max(1, min(level, max_batch))
        start = time.perf_counter()
        local_tokens = 0
        for i in range(0, len(requests_local), batch):
            local_tokens += sum(len(r.tokens) for r in local.generate_batch(requests_local[i : i + batch]))
        local_elapsed = time.perf_counter() - start
        http_rate, local_rate = tokens / elapsed, local_tokens / local_elapsed
        print(f"{level:>11} {len(bodies) / elapsed:>7.2f} {http_rate:>8.1f} {1000 * statistics.median(latencies):>8.1f} "
              f"{1000 * percentile(latencies, 0.99):>8.1f} {local_rate:>14.1f} {http_rate / local_rate:>6.3f}", flush=True)
    from ray import serve

    serve.shutdown()


if __name__ == "__main__":
    main()
