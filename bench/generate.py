"""Generation throughput: unedited vs steered, measured side by side in one run.

    .venv/bin/python bench/generate.py [--models pythia-70m-shape pythia-tiny] [--batches 1 8 32]
                                       [--new-tokens 16] [--repeats 3] [--d-sae 32768] [--device cpu]

For each model and batch size it times three workloads, interleaved round by round so
drift hits them alike: no edits, 1 edited feature a request, 8 edited features a request
(a relu dictionary of --d-sae features at the middle layer; each request edits its own
features). It prints generated tokens/s (median over repeats) and the steered/unsteered
ratios. ``pythia-70m-shape`` is a randomly initialised GPT-NeoX of Pythia-70M's shape;
``pythia-tiny`` is the embedded model (built on first use).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_models import load_bench_model  # bench/bench_models.py (a script's own folder is on sys.path)

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from editing.edits import EditSpec
from editing.engine import Engine, GenerationRequest

PROMPT = "Return the number of items in the container, counting nested values once"


def workload(batch: int, n_edits: int, d_sae: int, new_tokens: int) -> list[GenerationRequest]:
    requests = []
    for row in range(batch):
        edits = tuple(EditSpec(dictionary="main", feature=(row * 8 + j) * 97 % d_sae, op="scale", value=4.0)
                      for j in range(n_edits))
        requests.append(GenerationRequest(PROMPT, max_new_tokens=new_tokens, edits=edits, ignore_eos=True))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["pythia-70m-shape", "pythia-tiny"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--d-sae", type=int, default=32768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    print(f"device {args.device}, torch threads {torch.get_num_threads()}, {args.new_tokens} new tokens a request, "
          f"median of {args.repeats}, relu dictionary of {args.d_sae} features at the middle layer")
    print(f"{'model':<18} {'batch':>5} {'unedited tok/s':>15} {'1 feature':>10} {'8 features':>11} {'ratio 1':>8} {'ratio 8':>8}")
    for name in args.models:
        loaded = load_bench_model(name, args.device)
        model, tokenizer = loaded.model, loaded.tokenizer
        layer = model.config.num_hidden_layers // 2
        config = DictionaryConfig(architecture="relu", d_in=model.config.hidden_size, d_sae=args.d_sae,
                                  hook=f"blocks.{layer}.hook_resid_post")
        engine = Engine(model, tokenizer, {"main": Dictionary.random(config, seed=0)})
        for batch in args.batches:
            loads = {n: workload(batch, n, args.d_sae, args.new_tokens) for n in (0, 1, 8)}
            for requests in loads.values():  # warm-up
                engine.generate(requests)
            times = {n: [] for n in loads}
            for _ in range(args.repeats):
                for n, requests in loads.items():
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    results = engine.generate(requests)
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[n].append(time.perf_counter() - start)
                    assert sum(len(r.tokens) for r in results) == batch * args.new_tokens
            rate = {n: batch * args.new_tokens / statistics.median(t) for n, t in times.items()}
            print(f"{name:<18} {batch:>5} {rate[0]:>15.1f} {rate[1]:>10.1f} {rate[8]:>11.1f} "
                  f"{rate[1] / rate[0]:>8.3f} {rate[8] / rate[0]:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
