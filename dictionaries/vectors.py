"""Steering vectors in the store, beside the dictionaries: ``$STEERSERVE_HOME/vectors/<name>.safetensors``.

A steering vector is one direction ``v [d_model]`` at a hook point; the edit op ``vector``
adds ``value·v`` (or ``value·‖h‖·v/‖v‖``) to the residual there. A file holds the tensor
``vector`` (float32) and string metadata:

    format      "steerserve.vector/1"
    hook        "blocks.2.hook_resid_post"
    model       {"name", "sha256"} of the model it was made on (JSON)
    provenance  where it came from, e.g. a contrast's two sets (JSON)

Writes are atomic (a temporary file in the same directory, fsynced, then renamed), names
follow the dictionary store's rule, and loading validates the format, the hook name, the
shape and that every value is finite. Nothing is unpickled. Imports nothing else of the
project but the dictionary store's name rule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from dictionaries.config import HOOK_NAME, DictionaryError
from dictionaries.store import validate_name, write_atomic

FORMAT = "steerserve.vector/1"
MAX_WIDTH = 65_536


class VectorNotFound(DictionaryError, LookupError):
    """No steering vector of that name in the store."""


@dataclass(frozen=True, eq=False)
class SteeringVector:
    name: str
    hook: str
    vector: torch.Tensor  # (d,) float32
    model_name: str = ""
    model_sha256: str = ""
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        check_vector(self.vector, self.hook)

    @property
    def d(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.float().norm())

    def to(self, device) -> "SteeringVector":
        return SteeringVector(self.name, self.hook, self.vector.to(device), self.model_name, self.model_sha256,
                              self.provenance)

    def describe(self, values: bool = False) -> dict:
        body = {"name": self.name, "hook": self.hook, "d": self.d, "norm": self.norm,
                "model": {"name": self.model_name, "sha256": self.model_sha256}, "provenance": self.provenance}
        if values:
            body["values"] = self.vector.float().cpu().tolist()
        return body


def check_vector(vector: torch.Tensor, hook: str) -> None:
    """A steering vector's own checks: a hook point name, one finite, non-zero row."""
    if not isinstance(hook, str) or not HOOK_NAME.match(hook):
        raise DictionaryError(f"hook {hook!r}: expected 'blocks.<layer>.hook_resid_post' or 'blocks.<layer>.hook_resid_pre'")
    if vector.dim() != 1 or not 1 <= vector.shape[0] <= MAX_WIDTH:
        raise DictionaryError(f"vector: expected one row of 1..{MAX_WIDTH} values, got shape {list(vector.shape)}")
    if not bool(torch.isfinite(vector).all()):
        raise DictionaryError("vector: has non-finite values (NaN or inf)")
    if not bool(vector.ne(0).any()):
        raise DictionaryError("vector: is all zeros; a steering vector needs a direction")


def default_root() -> Path:
    home = os.environ.get("STEERSERVE_HOME") or Path.home() / ".cache" / "steerserve"
    return Path(home).expanduser() / "vectors"


class VectorStore:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()

    def _file(self, name: str) -> Path:
        return self.root / f"{validate_name(name)}.safetensors"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(".safetensors")] for p in self.root.glob("*.safetensors") if not p.name.startswith("."))

    def __contains__(self, name: str) -> bool:
        try:
            return self._file(name).is_file()
        except DictionaryError:
            return False

    def version(self, name: str) -> tuple[int, int] | None:
        """What changes when the file is replaced: ``(mtime_ns, inode)``; None when absent."""
        try:
            stat = self._file(name).stat()
        except (FileNotFoundError, DictionaryError):
            return None
        return stat.st_mtime_ns, stat.st_ino

    def load(self, name: str) -> SteeringVector:
        path = self._file(name)
        if not path.is_file():
            raise VectorNotFound(f"no steering vector named {name!r} (have: {', '.join(self.names()) or 'none'})")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if set(handle.keys()) != {"vector"}:
                    raise DictionaryError(f"{path.name}: expected exactly one tensor 'vector', found {sorted(handle.keys())}")
                vector = handle.get_tensor("vector").float()
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise DictionaryError(f"{path.name}: not a readable safetensors file ({err})") from None
        if metadata.get("format") != FORMAT:
            raise DictionaryError(f"{path.name}: format is {metadata.get('format')!r}, expected {FORMAT!r}")
        try:
            model = json.loads(metadata.get("model", "{}"))
            provenance = json.loads(metadata.get("provenance", "{}"))
        except json.JSONDecodeError as err:
            raise DictionaryError(f"{path.name}: metadata is not valid JSON ({err})") from None
        return SteeringVector(name, metadata.get("hook", ""), vector, model.get("name", ""), model.get("sha256", ""),
                              provenance)

    def put(self, vector: SteeringVector) -> Path:
        """Write ``vector`` under its name atomically (replacing one of the same name)."""
        path = self._file(vector.name)
        check_vector(vector.vector, vector.hook)
        self.root.mkdir(parents=True, exist_ok=True)
        data = save({"vector": vector.vector.detach().float().cpu().contiguous()}, metadata={
            "format": FORMAT, "hook": vector.hook,
            "model": json.dumps({"name": vector.model_name, "sha256": vector.model_sha256}),
            "provenance": json.dumps(vector.provenance)})
        write_atomic(path, data)
        return path

    def delete(self, name: str) -> None:
        path = self._file(name)
        if not path.is_file():
            raise VectorNotFound(f"no steering vector named {name!r}")
        path.unlink()
