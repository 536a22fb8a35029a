"""The native on-disk format: a directory with ``config.json`` and ``sae.safetensors``.

``sae.safetensors`` uses SAELens' key names: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for jumprelu, ``threshold [d_sae]``.
Optional beside them: ``metrics.json`` and per-feature statistics (``features.json``,
``features.safetensors``).

Loading validates everything before a tensor is used, and says which file and key is
wrong: the format tag, every config field, the key set, each shape, the dtype, that every
value is finite, tied weights, a zero decoder bias where there should be none, and the
weights file's SHA-256. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from dictionaries.config import DictionaryConfig, DictionaryError
from dictionaries.sae import ARCHITECTURE_CLASSES, TORCH_DTYPES, Dictionary

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "sae.safetensors"
METRICS_FILE = "metrics.json"
OPTIONAL_FILES = (METRICS_FILE, "features.json", "features.safetensors", "README.md")



def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str | None = None) -> dict:
    what = what or Path(path).name
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DictionaryError(f"{what}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DictionaryError(f"{what}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DictionaryError(f"{what}: must be a JSON object, not {type(data).__name__}")
    return data


def read_safetensors(path: Path, what: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or a :class:`DictionaryError` naming the file."""
    what = what or Path(path).name
    if not Path(path).is_file():
        raise DictionaryError(f"{what}: file is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DictionaryError(f"{what}: not a readable safetensors file ({err})") from None


def validate_weights(config: DictionaryConfig, weights: dict[str, torch.Tensor], what: str = WEIGHTS_FILE) -> None:
    cls = ARCHITECTURE_CLASSES[config.architecture]
    expected = set(cls.weight_shapes)
    missing, extra = expected - set(weights), set(weights) - expected
    if missing:
        raise DictionaryError(f"{what}: missing key(s) {', '.join(sorted(missing))} for a {config.architecture} dictionary")
    if extra:
        raise DictionaryError(f"{what}: unexpected key(s) {', '.join(sorted(extra))} for a {config.architecture} dictionary")
    dims = {"d_in": config.d_in, "d_sae": config.d_sae}
    dtype = TORCH_DTYPES[config.dtype]
    for key, shape_spec in cls.weight_shapes.items():
        tensor = weights[key]
        shape = tuple(dims[d] for d in shape_spec.split(","))
        if tuple(tensor.shape) != shape:
            named = "[" + ", ".join(f"{d}={dims[d]}" for d in shape_spec.split(",")) + "]"
            raise DictionaryError(f"{what}: '{key}' has shape {list(tensor.shape)}; expected {named}")
        if tensor.dtype != dtype:
            raise DictionaryError(f"{what}: '{key}' is {str(tensor.dtype).removeprefix('torch.')}; config.json says dtype {config.dtype}")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise DictionaryError(f"{what}: '{key}' has {bad} non-finite value(s) (NaN or inf)")
    if config.tied and not torch.equal(weights["W_enc"], weights["W_dec"].T):
        raise DictionaryError(f"{what}: config.json says tied, but 'W_enc' is not the transpose of 'W_dec'")
    if not config.decoder_bias and bool(weights["b_dec"].any()):
        raise DictionaryError(f"{what}: config.json says decoder_bias false, but 'b_dec' is not all zeros")
    if "threshold" in weights and bool((weights["threshold"] < 0).any()):
        raise DictionaryError(f"{what}: 'threshold' has negative values")


def load_dictionary(path: Path | str, *, device: str | torch.device = "cpu", dtype: str | None = None) -> Dictionary:
    """Load and fully validate a native dictionary directory."""
    path = Path(path)
    if not path.is_dir():
        raise DictionaryError(f"{path}: not a dictionary directory")
    config = DictionaryConfig.from_json(read_json(path / CONFIG_FILE))
    weights_path = path / WEIGHTS_FILE
    if config.weights_sha256 and weights_path.is_file():
        actual = file_sha256(weights_path)
        if actual != config.weights_sha256:
            raise DictionaryError(f"{WEIGHTS_FILE}: SHA-256 {actual[:12]}… does not match config.json's weights_sha256 {config.weights_sha256[:12]}…")
    weights = read_safetensors(weights_path)
    validate_weights(config, weights)
    for optional in (METRICS_FILE, "features.json"):
        if (path / optional).is_file():
            read_json(path / optional)  # an object, or the dictionary is refused
    dictionary = Dictionary.from_config(config, weights)
    if dtype is not None:
        dictionary = dictionary.to(TORCH_DTYPES[dtype])
    return dictionary.to(device)


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def save_dictionary(dictionary: Dictionary, path: Path | str, *, metrics: dict | None = None) -> DictionaryConfig:
    """Write ``dictionary`` into the directory ``path`` (created; files fsynced).

    Callers that replace an existing dictionary go through the store, which writes into
    a fresh directory and swaps it in atomically.
    """
    from dataclasses import replace

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in dictionary.weights().items()}
    dtype_name = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    weights_path = path / WEIGHTS_FILE
    save_file(weights, str(weights_path), metadata={"format": "steerserve.dictionary/1"})
    with weights_path.open("rb+") as stream:
        os.fsync(stream.fileno())
    config = replace(dictionary.config, dtype=dtype_name, weights_sha256=file_sha256(weights_path))
    _fsync_write(path / CONFIG_FILE, (json.dumps(config.to_json(), indent=2) + "\n").encode())
    if metrics is not None:
        _fsync_write(path / METRICS_FILE, (json.dumps(metrics, indent=2) + "\n").encode())
    dictionary.config = config
    return config
