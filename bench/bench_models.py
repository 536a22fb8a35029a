"""The models the benchmarks compare: the embedded ``pythia-tiny`` and a randomly initialised
GPT-NeoX of Pythia-70M's shape (with pythia-tiny's tokenizer; nothing is downloaded)."""

from __future__ import annotations

NAMES = ("pythia-70m-shape", "pythia-tiny")


def load_bench_model(name: str, device: str):
    """A :class:`~editing.model.LoadedModel` for ``name`` (one of :data:`NAMES`)."""
    from editing.model import LoadedModel, ModelInfo, load_model, random_gpt_neox

    tiny = load_model("pythia-tiny", device=device)
    if name == "pythia-tiny":
        return tiny
    if name != "pythia-70m-shape":
        raise ValueError(f"unknown benchmark model {name!r}; choose from {', '.join(NAMES)}")
    info = ModelInfo(name=name, path="", n_layers=6, d_model=512, vocab_size=50304, sha256="random-init-seed-0",
                     dtype="float32", device=device)
    return LoadedModel(model=random_gpt_neox(device=device), tokenizer=tiny.tokenizer, info=info)


def save_bench_model(name: str):
    """``name`` (the 70M shape) saved once as a model directory the app can serve, with
    pythia-tiny's tokenizer; written to a temporary directory first and renamed into place."""
    import shutil
    import tempfile
    from pathlib import Path

    from editing.home import models_dir
    from editing.model import load_model, random_gpt_neox

    if name != "pythia-70m-shape":
        raise ValueError(f"only pythia-70m-shape is saved as a directory, not {name!r}")
    target = models_dir() / f"bench-{name}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        random_gpt_neox().save_pretrained(staging)
        load_model("pythia-tiny").tokenizer.save_pretrained(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
