"""Corpora: named, deterministic streams of documents, and token windows cut from them.

A corpus is named by a *spec* string:

    builtin:pydocs            the English text that ships with CPython (all of it)
    builtin:pydocs/train      ... its training documents
    builtin:pydocs/heldout    ... its held-out documents (never overlapping train)
    path/to/file.txt          one document
    path/to/dir               every ``*.txt`` below it, one document each, in sorted order
    path/to/file.jsonl        one document per line, from its ``"text"`` field
    hf:NAME[@SPLIT]           a Hugging Face ``datasets`` dataset already on this machine
                              (``load_from_disk`` for a directory, else the local cache)

Any spec may end in ``#train`` or ``#heldout`` to take the same deterministic split
that ``builtin:pydocs`` uses: a document is held out when the SHA-256 of its id falls
in the held-out tenth, so the split never depends on order, machine or Python hash seed.
A corpus of a single document (one ``.txt`` file, say) cannot be split by documents: its
text is split instead, the last tenth (cut at a line break, else a space) held out, so
both halves hold consecutive text and never overlap.

``builtin:pydocs`` reads ``pydoc_data/topics.py`` and the docstrings of the stdlib's
``.py`` files with :mod:`ast`; nothing is imported. Paths are walked in sorted order and
``site-packages``, ``dist-packages`` and test folders are skipped, so every machine with
the same CPython version sees the same documents.

    >>> corpus = open_corpus("builtin:pydocs/heldout")
    >>> windows = token_windows(corpus, tokenizer, context_length=128, max_windows=64)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

HELDOUT_TENTHS = 1  # one document in ten goes to heldout
SPLITS = ("train", "heldout")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class CorpusError(ValueError):
    """A corpus spec that names nothing readable, or a file that is not what it says."""


@dataclass(frozen=True)
class Document:
    id: str  # stable across machines: a relative path, a topic key, a line number
    text: str


def split_of(doc_id: str) -> str:
    """The split (``train`` or ``heldout``) a document id belongs to; pure and stable."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return "heldout" if digest[0] % 10 < HELDOUT_TENTHS else "train"


def split_document(doc: Document, split: str) -> Document:
    """The ``split`` part of a lone document: its last tenth of text is held out, cut at a line
    break shortly before that point (else a space, else exactly there)."""
    text = doc.text
    point = len(text) - len(text) // 10
    earliest = point - len(text) // 50  # move the cut back by at most 2% of the text
    cut = text.rfind("\n", earliest, point)
    if cut < 0:
        cut = text.rfind(" ", earliest, point)
    if cut < 0:
        cut = point
    part = text[:cut] if split == "train" else text[cut:]
    return Document(f"{doc.id}#{split}", part)


@dataclass(frozen=True)
class Corpus:
    """A named, re-iterable stream of documents."""

    name: str
    _reader: Callable[[], Iterator[Document]]
    split: str | None = None  # None: every document

    def documents(self) -> Iterator[Document]:
        docs = (doc for doc in self._reader() if doc.text.strip())
        if self.split is None:
            yield from docs
            return
        first, second = next(docs, None), next(docs, None)
        if first is not None and second is None:  # one document: split its text
            yield split_document(first, self.split)
            return
        for doc in (d for d in (first, second) if d is not None):
            if split_of(doc.id) == self.split:
                yield doc
        for doc in docs:
            if split_of(doc.id) == self.split:
                yield doc

    def __iter__(self) -> Iterator[Document]:
        return self.documents()


def open_corpus(spec: str) -> Corpus:
    """Resolve a corpus spec (see the module docstring) to a :class:`Corpus`."""
    base, split = spec, None
    if "#" in spec:
        base, split = spec.rsplit("#", 1)
    elif spec.startswith("builtin:") and "/" in spec:
        base, split = spec.split("/", 1)
    if split is not None and split not in SPLITS:
        raise CorpusError(f"corpus {spec!r}: unknown split {split!r}; choose one of {', '.join(SPLITS)}")

    if base.startswith("builtin:"):
        if base != "builtin:pydocs":
            raise CorpusError(f"corpus {spec!r}: unknown built-in corpus; the built-in one is 'builtin:pydocs'")
        reader = _pydocs_documents
    elif base.startswith("hf:"):
        reader = _hf_reader(base[3:], spec)
    else:
        path = Path(base).expanduser()
        if path.is_dir():
            reader = lambda: _txt_dir_documents(path)  # noqa: E731
        elif path.suffix == ".jsonl" and path.is_file():
            reader = lambda: _jsonl_documents(path)  # noqa: E731
        elif path.suffix == ".txt" and path.is_file():
            reader = lambda: iter([Document(path.name, path.read_text(encoding="utf-8"))])  # noqa: E731
        elif path.exists():
            raise CorpusError(f"corpus {spec!r}: expected a .txt file, a .jsonl file or a directory of .txt files")
        else:
            raise CorpusError(f"corpus {spec!r}: no such file or directory, and not a 'builtin:' or 'hf:' corpus")
    return Corpus(name=spec, _reader=reader, split=split)


# --- builtin:pydocs ---------------------------------------------------------------------

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The stdlib's ``.py`` files, sorted, without third-party or test folders."""
    root = root or stdlib_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for filename in filenames:
            if filename.endswith(".py") and not filename.startswith("test_"):
                found.append(Path(dirpath) / filename)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _pydoc_topics(root: Path) -> dict[str, str]:
    path = root / "pydoc_data" / "topics.py"
    tree = ast.parse(path.read_bytes())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    raise CorpusError(f"{path}: no 'topics = {{...}}' assignment found")


def module_docstrings(source: bytes) -> list[str]:
    """Every docstring of a module (module, classes, functions), in source order."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append((getattr(node, "lineno", 0), doc))
    return [doc for _, doc in sorted(found, key=lambda item: item[0])]


def _pydocs_documents() -> Iterator[Document]:
    return iter(_pydocs_cached(str(stdlib_dir())))


@functools.lru_cache(maxsize=1)
def _pydocs_cached(root_str: str) -> tuple[Document, ...]:
    """Parsing the whole stdlib takes seconds; do it once a process."""
    return tuple(_read_pydocs(Path(root_str)))


def _read_pydocs(root: Path) -> Iterator[Document]:
    topics = _pydoc_topics(root)
    for key in sorted(topics):
        yield Document(f"pydoc_data.topics:{key}", topics[key])
    for path in stdlib_source_files(root):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("pydoc_data/"):
            continue
        try:
            docs = module_docstrings(path.read_bytes())
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately not valid Python 3
        if docs:
            yield Document(rel, "\n\n".join(docs))


# --- files ------------------------------------------------------------------------------

def _txt_dir_documents(root: Path) -> Iterator[Document]:
    for path in sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix()):
        yield Document(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8"))


def _jsonl_documents(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f"{path}:{lineno}: expected an object with a string 'text' field")
            yield Document(f"{path.name}:{lineno}", record["text"])


def _hf_reader(name: str, spec: str) -> Callable[[], Iterator[Document]]:
    name, _, split = name.partition("@")

    def read() -> Iterator[Document]:
        try:
            import datasets
        except ImportError:
            raise CorpusError(f"corpus {spec!r}: the 'datasets' library is not installed") from None
        if Path(name).is_dir():
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                data = data[split or "train"]
        else:
            os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
            data = datasets.load_dataset(name, split=split or "train")
        if "text" not in data.column_names:
            raise CorpusError(f"corpus {spec!r}: dataset has no 'text' column (columns: {data.column_names})")
        for index, text in enumerate(data["text"]):
            yield Document(f"{name}:{index}", text)

    return read


# --- token windows ----------------------------------------------------------------------

def _token_chunks(documents: Iterable[Document], tokenizer, batch_size: int = 64) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS, tokenized in batches."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def flush() -> Iterator[list[int]]:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield ids + ([eos] if eos is not None else [])

    for doc in documents:
        batch.append(doc.text)
        if len(batch) == batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def iter_token_windows(
    corpus: Corpus,
    tokenizer,
    context_length: int,
    *,
    seed: int | None = None,
    shuffle_buffer: int = 4096,
    max_windows: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield ``LongTensor [context_length]`` windows: documents are tokenized, joined with
    EOS, and cut into consecutive windows (the tail is dropped).

    ``seed=None`` keeps corpus order; with a seed, windows pass through a shuffling buffer
    of ``shuffle_buffer`` windows driven by a seeded generator, so the order is fixed for
    a given seed and corpus.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")

    def consecutive() -> Iterator[torch.Tensor]:
        pending: list[int] = []
        for ids in _token_chunks(corpus.documents(), tokenizer):
            pending.extend(ids)
            if len(pending) >= context_length:
                usable = len(pending) - len(pending) % context_length
                yield from torch.tensor(pending[:usable], dtype=torch.long).view(-1, context_length)
                pending = pending[usable:]

    source = consecutive()
    if seed is not None:
        source = _shuffled(source, shuffle_buffer, seed)
    for count, window in enumerate(source):
        if max_windows is not None and count >= max_windows:
            return
        yield window


def _shuffled(items: Iterator[torch.Tensor], buffer_size: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    buffer: list[torch.Tensor] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            index = int(torch.randint(len(buffer), (1,), generator=generator))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    order = torch.randperm(len(buffer), generator=generator).tolist()
    for index in order:
        yield buffer[index]


def token_windows(corpus: Corpus, tokenizer, context_length: int, **kwargs) -> torch.Tensor:
    """All windows of :func:`iter_token_windows` stacked: ``LongTensor [N, context_length]``."""
    windows = list(iter_token_windows(corpus, tokenizer, context_length, **kwargs))
    if not windows:
        raise CorpusError(f"corpus {corpus.name!r} gave no window of {context_length} tokens")
    return torch.stack(windows)
