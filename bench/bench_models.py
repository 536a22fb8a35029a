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
