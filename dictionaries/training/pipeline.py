"""Train a sweep and publish every member into the store, with metrics and feature statistics.

    results = train_and_publish(loaded, config, name="l2-relu", progress=True)

A sweep of one configuration is stored under ``name``; a sweep of several under
``name-<label>`` (``l2-relu-relu-f1024-l1-3``). ``default_config()`` is the reproducible
default dictionary for ``pythia-tiny`` that ``make serve`` deploys.

Corpora: without ``heldout_corpus`` the run trains on the corpus's ``#train`` split and
measures on its ``#heldout`` split (a single-document corpus is split by text, see
:mod:`editing.corpora`). Both are checked before training starts: a corpus that gives no
window of ``context_length`` tokens is refused then, not after the budget is spent. The
trainer keeps the finished run's checkpoint, so if publishing fails anyway, running the
same command again with ``resume`` publishes it without training again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dictionaries.store import DictionaryStore, validate_name
from dictionaries.training.ensemble import SaeSpec
from dictionaries.training.publish import feature_statistics, heldout_metrics, heldout_windows, member_dictionary, mmcs
from dictionaries.training.trainer import TrainConfig, Trainer
from editing.corpora import CorpusError, iter_token_windows, open_corpus
from editing.home import steerserve_home

DEFAULT_NAME = "pythia-tiny-l2"
HELDOUT_WINDOWS = 256  # 32k tokens of 128


def default_config() -> TrainConfig:
    """The default pythia-tiny dictionary: topk, k = 24, 1024 features on layer 2's output, with
    today's topk recipe written out (the scaled rate 1.3e-2·√(4096/1024), Adam β1 0.8, revival
    at 0.015), so that a later change of the trainer's defaults does not move the feature
    numbers the README, the page's examples and the tests use. Until issue 18 it was trained
    with Adam 2e-3, β1 0.9 and no revival: held-out fvu 0.078 with 0.4% dead (see the README,
    "The default dictionary")."""
    return TrainConfig(hook="blocks.2.hook_resid_post", specs=(SaeSpec("topk", 1024, k=24),),
                       tokens=1_200_000, batch_size=2048, learning_rate=2.6e-2, adam_betas=(0.8, 0.999),
                       revive_step=0.015, seed=0, heldout_corpus="builtin:pydocs/heldout")


def member_names(name: str, specs: list[SaeSpec]) -> list[str]:
    if len(specs) == 1:
        return [validate_name(name)]
    names = [validate_name(f"{name}-{spec.label()}") for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("two sweep members would get the same name; vary seeds or sizes, not duplicates")
    return names


def heldout_corpus(corpus: str) -> str:
    for suffix in ("/train", "#train"):
        if corpus.endswith(suffix):
            return corpus[: -len(suffix)] + suffix.replace("train", "heldout")
    return corpus + "#heldout"


def split_corpora(corpus: str, heldout: str | None = None) -> tuple[str, str]:
    """``(training corpus, held-out corpus)`` for a run. A named ``heldout`` is used as given;
    otherwise a corpus without a split trains on its ``#train`` part (``builtin:pydocs/train``)
    so that the held-out part it is measured on stays unseen."""
    if heldout:
        return corpus, heldout
    if corpus.endswith(("/train", "#train", "/heldout", "#heldout")):
        return corpus, heldout_corpus(corpus)
    train = corpus + ("/train" if corpus.startswith("builtin:") else "#train")
    return train, heldout_corpus(train)


def check_corpora(loaded, config: TrainConfig, windows: int = HELDOUT_WINDOWS) -> torch.Tensor:
    """Refuse a run whose corpora cannot give a window of ``context_length`` tokens, before any
    training; returns the held-out windows ``(W, T)`` the published metrics are measured on."""
    length = config.context_length
    try:
        if next(iter_token_windows(open_corpus(config.corpus), loaded.tokenizer, length), None) is None:
            raise CorpusError(f"training corpus {config.corpus!r} gives no window of {length} tokens")
        return heldout_windows(loaded, config.heldout_corpus, length, windows)
    except CorpusError as err:
        raise CorpusError(f"{err}; nothing was trained. Give a larger corpus, a shorter context length, "
                          "or name a held-out corpus (--heldout-corpus)") from None


def train_and_publish(loaded, config: TrainConfig, *, name: str, store: DictionaryStore | None = None,
                      run_dir: Path | None = None, resume: bool = False, progress: bool = True,
                      heldout_windows_count: int = HELDOUT_WINDOWS, feature_windows: int = 64,
                      on_progress=None) -> list[dict]:
    """Train, measure and store; ``on_progress(fraction, record)`` is called after every step."""
    store = store or DictionaryStore()
    names = member_names(name, list(config.specs))
    train_corpus, heldout = split_corpora(config.corpus, config.heldout_corpus)
    config = dataclasses.replace(config, corpus=train_corpus, heldout_corpus=heldout)
    windows = check_corpora(loaded, config, heldout_windows_count)
    run_dir = Path(run_dir or steerserve_home() / "runs" / name)
    trainer = Trainer(loaded, config, run_dir)
    bar = tqdm(total=config.tokens, unit="tok", unit_scale=True, desc=f"train {name}", disable=not progress)

    def show(tokens: int, record: dict) -> None:
        bar.update(tokens)
        if on_progress is not None:
            on_progress(record["tokens"] / config.tokens, record)
        if record["step"] % 5 == 0:
            members = record["members"]
            mean = lambda key: sum(m[key] for m in members) / len(members)  # noqa: E731
            bar.set_postfix(loss=f"{mean('loss'):.4f}", l0=f"{mean('l0'):.1f}", fvu=f"{mean('fvu'):.3f}",
                            dead=f"{mean('dead'):.1%}")

    started = time.time()
    result = trainer.run(resume=resume, progress=show)
    bar.close()
    seconds = time.time() - started
    try:
        return _publish(loaded, config, result, names, store, run_dir, windows, seconds, feature_windows)
    except Exception as err:
        raise RuntimeError(f"training finished, but publishing failed ({err}); the trained weights are kept in "
                           f"{run_dir / 'checkpoint'}: run the same command again with --resume (resume=True) to "
                           "publish them without training again") from err


def _publish(loaded, config: TrainConfig, result, names: list[str], store: DictionaryStore, run_dir: Path,
             windows: torch.Tensor, seconds: float, feature_windows: int) -> list[dict]:

    members = []  # (spec, ensemble, index, training dead fraction)
    for ensemble, dead in zip(result.ensembles, result.dead):
        for n, spec in enumerate(ensemble.specs):
            members.append((spec, ensemble, n, float(dead[n].float().mean())))
    by_spec = {spec: i for i, (spec, *_) in enumerate(members)}  # i is also the member's index in the log
    ordered = [members[by_spec[spec]] for spec in config.specs]

    corpus = config.heldout_corpus
    provenance_base = {"trainer": "steerserve", "config": json.loads(json.dumps(asdict(config), default=list)),
                       "tokens_seen": result.tokens_seen, "seconds": round(seconds, 1), "input_scale": result.scale,
                       "run_dir": str(run_dir)}
    coefficients = {spec: float(c[n]) for ensemble, c in zip(result.ensembles, result.coefficients)
                    for n, spec in enumerate(ensemble.specs)}
    dictionaries = [member_dictionary(ensemble, n, result.scale, hook=config.hook, model_name=loaded.info.name,
                                      model_sha256=loaded.info.sha256,
                                      provenance={**provenance_base, "spec": asdict(spec),
                                                  "final_coefficient": None if spec.architecture == "topk"
                                                  else coefficients[spec]})
                    for spec, ensemble, n, _ in ordered]
    metrics = heldout_metrics(dictionaries, loaded, config.hook, windows)
    published = []
    for i, ((spec, _, _, train_dead), dictionary, member_metrics) in enumerate(zip(ordered, dictionaries, metrics)):
        member_metrics = {
            **member_metrics,
            "heldout_corpus": corpus,
            "train_dead_fraction": train_dead,
            "train_dead_window_tokens": min(config.dead_window, result.tokens_seen),
            "train_tokens": result.tokens_seen,
            "train_seconds": round(seconds, 1),
            "final_train_fvu": result.log[-1]["members"][by_spec[spec]]["fvu"] if result.log else None,
        }
        if len(dictionaries) > 1:
            member_metrics["mmcs"] = {names[j]: mmcs(dictionary.W_dec, other.W_dec)
                                      for j, other in enumerate(dictionaries) if j != i and other.config.d_in == dictionary.config.d_in}
        extra = feature_statistics(dictionary, loaded, windows[:feature_windows], corpus)
        store.put(names[i], dictionary, metrics=member_metrics, extra_files=extra)
        published.append({"name": names[i], "spec": asdict(spec), "metrics": member_metrics,
                          "coefficient": dictionary.config.provenance["final_coefficient"]})
    return published
