"""Named steering presets: stored lists of edits that any OpenAI client selects through the
model name, ``"model": "pythia-tiny+formal"``.

    store = PresetStore()                        # $STEERSERVE_HOME/presets/<name>.json
    store.put("formal", {"model": "pythia-tiny", "edits": [...], "description": "..."})
    store.get("formal")                          # the record, or None

A preset belongs to one served model (its edits name that model's dictionaries). Records are
JSON files written atomically (a temporary file in the same directory, fsynced, renamed), so
every ingress replica reads the same presets and a reader never sees half a file; nothing is
pickled. A request's own ``edits`` are applied after its preset's (:func:`merged_edits`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from dictionaries.store import write_atomic
from editing.home import steerserve_home
from service.protocol import ApiError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def validate_preset_name(name: str) -> str:
    if not NAME.match(name):
        raise ApiError(400, f"preset name {name!r}: use 1 to 64 of a-z 0-9 . _ - starting with a letter or digit",
                       param="name")
    return name


class PresetStore:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root or steerserve_home() / "presets")

    def _path(self, name: str) -> Path:
        return self.root / f"{validate_preset_name(name)}.json"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(path.stem for path in self.root.glob("*.json") if NAME.match(path.stem))

    def get(self, name: str) -> dict | None:
        try:
            return json.loads(self._path(name).read_text())
        except FileNotFoundError:
            return None

    def all(self) -> list[dict]:
        return [record for record in (self.get(name) for name in self.names()) if record is not None]

    def put(self, name: str, record: dict) -> dict:
        """Store ``record`` under ``name`` atomically; returns it with its name and timestamps."""
        previous = self.get(name)
        now = time.time()
        record = {**record, "name": name, "created": previous["created"] if previous else now, "updated": now}
        write_atomic(self._path(name), (json.dumps(record, indent=2) + "\n").encode())
        return record

    def delete(self, name: str) -> bool:
        try:
            self._path(name).unlink()
            return True
        except FileNotFoundError:
            return False


def merged_edits(preset: dict | None, edits: list) -> list:
    """The preset's edits, then the request's."""
    from editing.edits import EditSpec

    return [EditSpec.model_validate(edit) for edit in (preset or {}).get("edits", [])] + list(edits)


def preset_error(err: ApiError, preset: dict | None) -> ApiError:
    """An error about merged edits, told in the caller's terms: one in the preset's part is a
    conflict between the preset and what the model serves now (409, ``param`` ``model``); one in
    the request's part is renumbered to the request's own ``edits[i]``."""
    count = len((preset or {}).get("edits", []))
    match = re.match(r"^edits\[(\d+)\](.*)$", err.param or "")
    if not count or not match:
        return err
    index, rest = int(match.group(1)), match.group(2)
    if index < count:
        message = re.sub(r"^edits\[\d+\]", "", err.message).lstrip(".: ")
        return ApiError(409, f"preset {preset['name']!r} edits[{index}] no longer fits the model: {message}",
                        type="conflict_error", param="model")
    own = f"edits[{index - count}]"
    return ApiError(err.status, err.message.replace(f"edits[{index}]", own), type=err.type, param=own + rest,
                    headers=err.headers)
