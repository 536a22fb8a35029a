"""First-use set-up for ``steerserve serve``: build pythia-tiny and train the default
dictionary when they are missing (with progress bars); later starts reuse them."""

from __future__ import annotations

import os

from service.app import AppArgs, ModelArgs


def default_app_args() -> AppArgs:
    """pythia-tiny with its default dictionary, using this machine's cores."""
    from dictionaries.training.pipeline import DEFAULT_NAME

    return AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT_NAME], torch_threads=os.cpu_count())])


def ensure_defaults(args: AppArgs) -> None:
    from dictionaries.store import DictionaryStore
    from dictionaries.training.pipeline import DEFAULT_NAME, default_config, train_and_publish
    from editing.model import load_model

    store = DictionaryStore()
    for model in args.models:
        missing = [name for name in model.dictionaries if name not in store]
        loaded = load_model(model.name, progress=True) if (model.name == "pythia-tiny" or missing) else None
        for name in missing:
            if name != DEFAULT_NAME or model.name != "pythia-tiny":
                raise SystemExit(f"error: dictionary {name!r} is not in the store ({store.root}); "
                                 "train it (steerserve train) or import it (steerserve dict import)")
            print(f"training the default dictionary {DEFAULT_NAME} (about a minute, once)")
            train_and_publish(loaded, default_config(), name=DEFAULT_NAME, store=store, progress=True)
        if DEFAULT_NAME in model.dictionaries and DEFAULT_NAME not in missing and not _default_is_current(store):
            print(f"note: the stored {DEFAULT_NAME} was trained with an earlier default recipe; it keeps serving. "
                  "`steerserve train --default` retrains it (the README's example outputs use the current recipe)")


def _default_is_current(store) -> bool:
    """Whether the stored default dictionary was trained with today's ``default_config()``."""
    import dataclasses
    import json

    from dictionaries.training.pipeline import DEFAULT_NAME, default_config

    wanted = json.loads(json.dumps(dataclasses.asdict(default_config()), default=list))
    return store.config(DEFAULT_NAME).provenance.get("config") == wanted
