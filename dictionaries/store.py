"""The dictionary store: ``$STEERSERVE_HOME/dictionaries/``, by name.

Each name is a symbolic link to an immutable object directory:

    dictionaries/
      l2-relu-1k -> .objects/l2-relu-1k.5f0c…/      config.json, sae.safetensors, metrics.json, …
      .objects/

A ``put`` writes and fsyncs a new directory under ``.staging/``, loads it back through the
full validation, and only then, holding the store's lock (``.lock``), moves it under
``.objects/`` and swaps the link with one atomic ``rename``; the object the name pointed at
before is removed. Two puts of one name race safely: the last one to take the lock wins, whole,
and nothing of the other is left behind. A crash at any point
leaves either the old dictionary or the new one under the name, never a half-written or
mixed one; a dictionary that fails validation is never installed, and the one already
there keeps working. Names are ``[a-z0-9][a-z0-9._-]{0,63}``; anything else (path
separators, ``..``) is refused.

A served version is *pinned*: ``.deployed/<app key>-<model key>/<name>`` links to the object
directory an application's model serves under that name (the service writes it when a deploy
succeeds, removes it when a dictionary is undeployed or the application deleted). A pinned object outlives a later put of the name, so replicas
that restart serve exactly the deployed version (:meth:`path_of_version`), not whatever was
uploaded since; it is removed once neither a name nor a pin holds it.

The store imports nothing else of the project: it reads ``$STEERSERVE_HOME`` itself, and
the compatibility check takes the model's facts as plain values.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dictionaries.config import HOOK_NAME, DictionaryConfig, DictionaryError
from dictionaries.format import (
    CONFIG_FILE,
    METRICS_FILE,
    OPTIONAL_FILES,
    WEIGHTS_FILE,
    file_sha256,
    load_dictionary,
    read_json,
    save_dictionary,
)
from dictionaries.sae import Dictionary

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
OBJECTS = ".objects"
STAGING = ".staging"
DEPLOYED = ".deployed"
STALE_AFTER_S = 3600.0
"""Staging left this long (by a crash or a killed process) is garbage for :meth:`cleanup`."""


class DictionaryNotFound(DictionaryError, LookupError):
    """No dictionary of that name in the store."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise DictionaryError(
            f"dictionary name {name!r} is not allowed: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


def default_root() -> Path:
    home = os.environ.get("STEERSERVE_HOME") or Path.home() / ".cache" / "steerserve"
    return Path(home).expanduser() / "dictionaries"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part:
    a temporary file beside it, fsynced, renamed over ``path``, then the directory fsynced (a
    failure removes the temporary file and leaves ``path`` as it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with temporary.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class DictionaryStore:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()

    def _objects(self) -> Path:
        objects = self.root / OBJECTS
        objects.mkdir(parents=True, exist_ok=True)
        return objects

    def staging_dir(self, prefix: str) -> Path:
        """A fresh directory under ``.staging/`` (same file system as the objects): for a put, or
        for an upload being received. :meth:`cleanup` removes the ones left behind."""
        root = self.root / STAGING
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{prefix}.{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    @contextlib.contextmanager
    def _locked(self):
        """The store's lock (an ``flock`` on ``.lock``): swaps and cleanups, across processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # --- reading -----------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / CONFIG_FILE).is_file())

    def __contains__(self, name: str) -> bool:
        return NAME_PATTERN.match(name or "") is not None and (self.root / name / CONFIG_FILE).is_file()

    def path(self, name: str) -> Path:
        """The dictionary's directory (resolved, so a later ``put`` does not move it)."""
        validate_name(name)
        link = self.root / name
        if not (link / CONFIG_FILE).is_file():
            known = ", ".join(self.names()) or "none"
            raise DictionaryNotFound(f"no dictionary named {name!r} in {self.root} (have: {known})")
        return link.resolve()

    def config(self, name: str) -> DictionaryConfig:
        return DictionaryConfig.from_json(read_json(self.path(name) / CONFIG_FILE, f"{name}/{CONFIG_FILE}"))

    def info(self, name: str) -> dict:
        """Config, metrics (if any) and the files present, as plain JSON-able data."""
        return {"name": name, **self.describe(self.path(name))}

    @staticmethod
    def describe(path: Path) -> dict:
        """Config, metrics (if any) and files of one object directory."""
        metrics_path = path / METRICS_FILE
        return {
            "config": read_json(path / CONFIG_FILE),
            "metrics": read_json(metrics_path) if metrics_path.is_file() else None,
            "files": sorted(p.name for p in path.iterdir()),
        }

    def load(self, name: str, *, device: str | torch.device = "cpu", dtype: str | None = None) -> Dictionary:
        return load_dictionary(self.path(name), device=device, dtype=dtype)

    @staticmethod
    def load_path(path: Path, *, device: str | torch.device = "cpu", dtype: str | None = None) -> Dictionary:
        """Load one resolved object directory (from :meth:`path`)."""
        return load_dictionary(path, device=device, dtype=dtype)

    def version(self, name: str) -> str:
        """The stored version of ``name``: its weights' SHA-256 (what a deploy serves)."""
        return file_sha256(self.path(name) / WEIGHTS_FILE)

    def path_of_version(self, name: str, sha256: str) -> Path:
        """The object directory of ``name`` whose weights have ``sha256``: the stored one, or a
        pinned one a model serves (:meth:`pin`). ``DictionaryError`` when neither is."""
        validate_name(name)
        candidates = [self.root / name, *sorted((self.root / DEPLOYED).glob(f"*/{name}"))]
        for candidate in candidates:
            if (candidate / WEIGHTS_FILE).is_file() and file_sha256(candidate / WEIGHTS_FILE) == sha256:
                return candidate.resolve()
        raise DictionaryError(f"version {sha256[:12]}… of {name!r} is no longer in the store "
                              "(it was replaced meanwhile): deploy it again")

    # --- pins: the versions models serve ------------------------------------------------

    @staticmethod
    def _key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _pin_link(self, app: str, model: str, name: str) -> Path:
        validate_name(name)
        return self.root / DEPLOYED / f"{self._key(app)}-{self._key(model)}" / name

    def _pinned(self) -> set[Path]:
        return {link.resolve() for link in (self.root / DEPLOYED).glob("*/*") if link.is_symlink()}

    def _release(self, path: Path | None) -> None:
        """Remove object directory ``path`` when no name and no pin holds it (under the lock)."""
        if path is None or path.parent != self._objects().resolve():
            return
        if path not in {(self.root / n).resolve() for n in self.names()} | self._pinned():
            shutil.rmtree(path, ignore_errors=True)

    def pin(self, app: str, model: str, name: str, path: Path) -> None:
        """Record that application ``app``'s ``model`` serves object directory ``path`` (resolved,
        from :meth:`path`) as ``name``: it is kept until the pin moves or goes. A directory copied
        into the store by hand (not under ``.objects``) is not pinned."""
        path = Path(path).resolve()
        if path.parent != self._objects().resolve():
            return
        link = self._pin_link(app, model, name)
        with self._locked():
            link.parent.mkdir(parents=True, exist_ok=True)
            previous = link.resolve() if link.is_symlink() else None
            temporary = link.parent / f".link-{uuid.uuid4().hex[:8]}"
            os.symlink(os.path.relpath(path, link.parent), temporary)
            os.replace(temporary, link)
            _fsync_dir(link.parent)
            if previous != path:
                self._release(previous)

    def unpin(self, app: str, model: str, name: str) -> None:
        link = self._pin_link(app, model, name)
        with self._locked():
            if link.is_symlink():
                previous = link.resolve()
                link.unlink()
                self._release(previous)

    def unpin_app(self, app: str) -> None:
        """Drop every pin of application ``app`` (it was deleted)."""
        with self._locked():
            for folder in (self.root / DEPLOYED).glob(f"{self._key(app)}-*"):
                targets = [link.resolve() for link in folder.glob("*") if link.is_symlink()]
                shutil.rmtree(folder, ignore_errors=True)
                for target in targets:
                    self._release(target)

    def pins(self, app: str, model: str) -> dict[str, Path]:
        """The object directories application ``app``'s ``model`` serves, by name."""
        folder = self._pin_link(app, model, "x").parent
        return {link.name: link.resolve() for link in folder.glob("*") if link.is_symlink()} if folder.is_dir() else {}

    # --- writing -----------------------------------------------------------------------

    def put(self, name: str, source: Dictionary | Path | str, *, metrics: dict | None = None,
            extra_files: dict[str, bytes] | None = None) -> Path:
        """Install ``source`` (a :class:`Dictionary` or a native directory) under ``name``.

        The new files are validated in place before the name is switched over; on any
        error nothing under ``name`` changes.
        """
        validate_name(name)
        for filename in extra_files or {}:
            if filename not in OPTIONAL_FILES:
                raise DictionaryError(f"file {filename!r} is not part of a dictionary; allowed: {', '.join(OPTIONAL_FILES)}")
        staging = self.staging_dir(name)
        try:
            if isinstance(source, Dictionary):
                save_dictionary(source, staging, metrics=metrics)
            else:
                source = Path(source)
                load_dictionary(source)  # refuse a bad source before copying anything
                for filename in (CONFIG_FILE, WEIGHTS_FILE, *OPTIONAL_FILES):
                    if (source / filename).is_file():
                        shutil.copyfile(source / filename, staging / filename)
                if metrics is not None:
                    (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
            for filename, data in (extra_files or {}).items():
                (staging / filename).write_bytes(data)
            for child in staging.iterdir():
                with child.open("rb") as stream:
                    os.fsync(stream.fileno())
            _fsync_dir(staging)
            load_dictionary(staging)  # what is installed is exactly what was validated
            with self._locked():
                installed = self._objects() / staging.name
                staging.rename(installed)
                staging = installed
                self._swap(name, installed)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.root / name

    def _swap(self, name: str, staging: Path) -> None:
        link = self.root / name
        previous = link.resolve() if link.is_symlink() else None
        if link.exists() and not link.is_symlink():
            # a directory someone copied in by hand: move it under .objects first
            adopted = self._objects() / f"{name}.{uuid.uuid4().hex[:12]}"
            link.rename(adopted)
            previous = adopted
        temporary_link = self.root / f".link-{name}-{uuid.uuid4().hex[:8]}"
        os.symlink(Path(OBJECTS) / staging.name, temporary_link)
        try:
            os.replace(temporary_link, link)  # atomic: readers see the old or the new dictionary
        except BaseException:
            temporary_link.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        if previous is not None and previous != staging and previous.parent == self._objects():
            self._release(previous.resolve())  # kept while a model serves it (pinned)

    def write_file(self, name: str, filename: str, data: bytes) -> None:
        """Replace one optional file (``metrics.json``, features) of an installed dictionary atomically."""
        if filename not in OPTIONAL_FILES:
            raise DictionaryError(f"file {filename!r} is not an optional dictionary file; allowed: {', '.join(OPTIONAL_FILES)}")
        write_atomic(self.path(name) / filename, data)

    def delete(self, name: str) -> None:
        target = self.path(name)
        link = self.root / name
        with self._locked():
            if link.is_symlink():
                link.unlink()
                self._release(target)
            else:
                shutil.rmtree(link)

    def cleanup(self, stale_after: float = STALE_AFTER_S) -> list[str]:
        """Remove object directories no name points at (left by a crash mid-put), and staging
        directories older than ``stale_after`` seconds (younger ones may be a put in progress)."""
        if not self.root.is_dir():
            return []
        removed = []
        with self._locked():
            objects = self.root / OBJECTS
            in_use = {(self.root / n).resolve() for n in self.names()} | self._pinned()
            for candidate in sorted(objects.iterdir()) if objects.is_dir() else ():
                if candidate.resolve() not in in_use:
                    shutil.rmtree(candidate, ignore_errors=True)
                    removed.append(candidate.name)
            staging, now = self.root / STAGING, time.time()
            for candidate in sorted(staging.iterdir()) if staging.is_dir() else ():
                if now - candidate.stat().st_mtime >= stale_after:
                    shutil.rmtree(candidate, ignore_errors=True)
                    removed.append(f"{STAGING}/{candidate.name}")
            for stray in [*self.root.glob(".link-*"), *self.root.glob(f"{DEPLOYED}/*/.link-*")]:
                stray.unlink(missing_ok=True)
            for pin in self.root.glob(f"{DEPLOYED}/*/*"):
                if pin.is_symlink() and not pin.exists():  # its object is gone: the pin means nothing
                    pin.unlink()
        return removed


# --- compatibility ---------------------------------------------------------------------

@dataclass
class Compatibility:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_for_errors(self, name: str = "dictionary") -> None:
        if self.errors:
            raise DictionaryError(f"{name} does not fit the loaded model: " + "; ".join(self.errors))


def check_compatibility(config: DictionaryConfig, *, model_name: str, model_sha256: str, n_layers: int, d_model: int) -> Compatibility:
    """Whether a dictionary can be used on a model: hook point and width are errors,
    a different model name or weights hash is a warning (a fine-tune may still work)."""
    report = Compatibility()
    match = HOOK_NAME.match(config.hook)
    layer = int(match.group(1)) if match else -1
    if not 0 <= layer < n_layers:
        report.errors.append(f"hook point {config.hook!r} does not exist on a {n_layers}-layer model")
    if config.d_in != d_model:
        report.errors.append(f"d_in is {config.d_in} but the model's width at {config.hook} is {d_model}")
    if config.model_name and config.model_name != model_name:
        report.warnings.append(f"trained on model {config.model_name!r}, loaded model is {model_name!r}")
    if config.model_sha256 and model_sha256 and config.model_sha256 != model_sha256:
        report.warnings.append(
            f"trained on weights {config.model_sha256[:12]}…, loaded model's weights are {model_sha256[:12]}…"
        )
    return report
