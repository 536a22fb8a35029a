"""Evaluation speed: a full evaluation pass (clean, spliced, zero-ablated and edited runs,
sharing the layers below the hook) against a plain clean forward over the same windows.

    .venv/bin/python bench/evaluate.py [--dictionary pythia-tiny-l2] [--tokens 32768] [--repeats 3]

Uses a dictionary from the store (train the default with `steerserve train --default`).
Prints tokens/s of each and their ratio, median of the repeats, measured alternately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dictionaries.store import DictionaryStore
from editing.edits import EditSpec
from editing.evaluate import evaluate, evaluation_windows
from editing.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dictionary", default="pythia-tiny-l2")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    store = DictionaryStore()
    config = store.config(args.dictionary)
    loaded = load_model(config.model_name or "pythia-tiny")
    dictionaries = {args.dictionary: store.load(args.dictionary)}
    windows = evaluation_windows(loaded, "builtin:pydocs/heldout", args.tokens, 128)
    edits = [EditSpec(dictionary=args.dictionary, feature=7, op="scale", value=4.0)]

    def clean_pass():
        with torch.no_grad():
            for start in range(0, len(windows), 8):
                loaded.model(input_ids=windows[start : start + 8])

    timings = {"clean forward": [], "evaluation (no edits)": [], "evaluation (1 edit)": []}
    clean_pass()
    for _ in range(args.repeats):
        for name, run in (("clean forward", clean_pass),
                          ("evaluation (no edits)", lambda: evaluate(loaded, dictionaries, args.dictionary, tokens=args.tokens)),
                          ("evaluation (1 edit)", lambda: evaluate(loaded, dictionaries, args.dictionary, edits=edits,
                                                                   tokens=args.tokens))):
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    n_tokens = windows.numel()
    base = n_tokens / statistics.median(timings["clean forward"])
    print(f"{n_tokens} tokens, {len(windows)} windows of 128, torch threads {torch.get_num_threads()}")
    for name, values in timings.items():
        rate = n_tokens / statistics.median(values)
        print(f"{name:<24} {rate:>10.0f} tokens/s   {rate / base:>6.3f} of a clean forward")


if __name__ == "__main__":
    main()
