"""Importers: read a peer library's files and build a native :class:`Dictionary`.

    saelens               cfg.json + sae_weights.safetensors (v6 and the flat pre-6 config)
    sparsify              cfg.json + sae.safetensors (one hookpoint folder, e.g. ``layers.3``)
    dictionary_learning   config.json + ae.pt (read with ``torch.load(weights_only=True)``)

Every importer checks shapes and settings against each other instead of trusting them,
refuses variants it cannot reproduce exactly (transcoders, skip connections, gated SAEs,
...) with a message that says so, and records where the dictionary came from in
``provenance``. The imported dictionary encodes and decodes as the peer's own forward does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dictionaries.config import DictionaryError

if TYPE_CHECKING:
    from dictionaries.sae import Dictionary

FORMATS = ("saelens", "sparsify", "dictionary_learning")


def import_dictionary(path: Path | str, format: str, *, model: str | None = None, hook: str | None = None) -> "Dictionary":
    """Read ``path`` laid out as ``format`` writes it; ``model``/``hook`` override the files'."""
    path = Path(path)
    if not path.is_dir():
        raise DictionaryError(f"{path}: not a directory")
    if format == "saelens":
        from dictionaries.importers.saelens import import_saelens as importer
    elif format == "sparsify":
        from dictionaries.importers.sparsify import import_sparsify as importer
    elif format == "dictionary_learning":
        from dictionaries.importers.dictionary_learning import import_dictionary_learning as importer
    else:
        raise DictionaryError(f"unknown import format {format!r}; choose one of {', '.join(FORMATS)}")
    return importer(path, model=model, hook=hook)
