"""Feature search: rank a dictionary's features by a text query over their recorded statistics.

    index = FeatureIndex.build(tensors, decode)    # once a dictionary, from features.safetensors
    result = index.search("lineno", limit=10)      # hits, best first

``tensors`` are the per-feature statistics the trainer records (``density``,
``mean_activation``, ``context_tokens``/``context_acts``/``context_max`` of the top
contexts, ``lens_promoted``/``lens_promoted_values``); ``decode`` turns token ids into text,
the tokenizer's own ``decode``, so texts read as they do on the feature endpoint.

**Words.** Text is cut into words, runs of letters and digits (``col_off[set]`` holds
``col``, ``off`` and ``set``), compared case-folded. A query with no letters or digits
searches runs of punctuation instead (``[`` or ``->``).

**Score.** For each query word, a feature scores the best of the index words it matches
(the word itself, or, at half weight, a longer word it begins):

    2 · (1 − 0.05·rank)            if one of its promoted logit-lens tokens is that word
    + activation on the word / the feature's maximum activation, in its best context
    + 0.1 for each of its top contexts holding the word

Hits are ranked by how many query words they match, then by the summed score, then by
index. The index is an inverted one (word → numpy arrays of features and weights) built
once; a query touches only the postings of its words.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

WORD = re.compile(r"[^\W_]+")
PUNCTUATION = re.compile(r"[^\w\s]+|_+")
MAX_TERMS = 16
MAX_PREFIX_WORDS = 256
"""A prefix query (``func``) expands to at most this many index words."""


def words_of(text: str, *, punctuation: bool = False) -> list[tuple[str, int, int]]:
    """``(word, start, end)`` of each word of ``text``, case-folded."""
    pattern = PUNCTUATION if punctuation else WORD
    return [(m.group().casefold(), m.start(), m.end()) for m in pattern.finditer(text)]


def query_terms(query: str) -> tuple[list[str], bool]:
    """The distinct words of a query (at most :data:`MAX_TERMS`), and whether they are punctuation."""
    words = [w for w, _, _ in words_of(query)]
    punctuation = not words
    if punctuation:
        words = [w for w, _, _ in words_of(query, punctuation=True)]
    return list(dict.fromkeys(words))[:MAX_TERMS], punctuation


def token_spans(ids: list[int], decode: Callable[[list[int]], str]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` and each token's ``(start, end)`` in it. Tokens that split a character
    (byte-level BPE) get the span of the text they complete."""
    text = decode(ids)
    pieces = [decode([t]) for t in ids]
    if "".join(pieces) == text:
        spans, at = [], 0
        for piece in pieces:
            spans.append((at, at + len(piece)))
            at += len(piece)
        return text, spans
    spans, previous = [], 0
    for i in range(1, len(ids) + 1):
        end = len(decode(ids[:i]).rstrip("\ufffd"))
        spans.append((previous, max(previous, end)))
        previous = max(previous, end)
    return text, spans


@dataclass
class _Postings:
    """One word's postings: parallel arrays over the features that hold it."""

    features: np.ndarray  # (P,) int64
    lens: np.ndarray  # (P,) float32: 1 − 0.05·rank of the promoted token, 0 if none
    context: np.ndarray  # (P,) float32: max over contexts of activation on the word / feature max
    contexts: np.ndarray  # (P,) int16: how many top contexts hold the word

    def score(self) -> np.ndarray:
        return 2.0 * self.lens + self.context + 0.1 * self.contexts


class FeatureIndex:
    """An inverted index over one dictionary's recorded feature statistics."""

    def __init__(self, tensors: dict, decode: Callable[[list[int]], str], postings: dict[str, _Postings]):
        self.tensors, self.decode, self.postings = tensors, decode, postings
        self.words = sorted(postings)
        self.d_sae = int(tensors["density"].shape[0])

    @classmethod
    def build(cls, tensors: dict, decode: Callable[[list[int]], str]) -> "FeatureIndex":
        tokens = tensors["context_tokens"].numpy()  # (F, C, T), -1 where a context has no token
        acts = tensors["context_acts"].float().numpy()  # (F, C, T)
        context_max = tensors["context_max"].float().numpy()  # (F, C)
        promoted = tensors["lens_promoted"].numpy()  # (F, K)
        pieces: dict[int, str] = {}

        def piece(token: int) -> str:
            if token not in pieces:
                pieces[token] = decode([token])
            return pieces[token]

        found: dict[str, dict[int, list]] = {}  # word -> feature -> [lens, context, contexts]
        for feature in range(tokens.shape[0]):
            peak = float(context_max[feature].max()) if context_max.shape[1] else 0.0
            for rank, token in enumerate(promoted[feature].tolist()):
                for punctuation in (False, True):
                    for word, _, _ in words_of(piece(token), punctuation=punctuation):
                        entry = found.setdefault(word, {}).setdefault(feature, [0.0, 0.0, 0])
                        entry[0] = max(entry[0], 1.0 - 0.05 * rank)
            if peak <= 0:
                continue
            for c in range(tokens.shape[1]):
                if context_max[feature, c] <= 0:
                    continue
                keep = tokens[feature, c] >= 0
                ids = tokens[feature, c][keep].tolist()
                token_acts = acts[feature, c][keep]
                text, spans = token_spans(ids, decode)
                best: dict[str, float] = {}
                for punctuation in (False, True):
                    for word, start, end in words_of(text, punctuation=punctuation):
                        activation = max((float(a) for a, (s, e) in zip(token_acts, spans) if s < end and e > start),
                                         default=0.0)
                        best[word] = max(best.get(word, 0.0), activation / peak)
                for word, weight in best.items():
                    entry = found.setdefault(word, {}).setdefault(feature, [0.0, 0.0, 0])
                    entry[1], entry[2] = max(entry[1], weight), entry[2] + 1
        postings = {}
        for word, by_feature in found.items():
            features = np.fromiter(by_feature, dtype=np.int64, count=len(by_feature))
            values = np.array(list(by_feature.values()), dtype=np.float64).reshape(-1, 3)
            postings[word] = _Postings(features, values[:, 0].astype(np.float32), values[:, 1].astype(np.float32),
                                       values[:, 2].astype(np.int16))
        return cls(tensors, decode, postings)

    # --- queries ----------------------------------------------------------------------------------

    def _matches(self, term: str) -> list[tuple[str, float]]:
        """Index words matching ``term``: itself at weight 1, longer words it begins at 0.5."""
        matches = [(term, 1.0)] if term in self.postings else []
        if len(term) >= 2:
            start = bisect.bisect_right(self.words, term)
            for word in self.words[start: start + MAX_PREFIX_WORDS]:
                if not word.startswith(term):
                    break
                matches.append((word, 0.5))
        return matches

    def search(self, query: str, limit: int = 20) -> dict:
        """``{"terms", "matched", "data"}``: the features matching ``query``, best first."""
        terms, _ = query_terms(query)
        total = np.zeros(self.d_sae, dtype=np.float64)
        matched_terms = np.zeros(self.d_sae, dtype=np.int64)
        words: set[str] = set()
        term_hits: dict[str, np.ndarray] = {}  # term -> (F,) bool: the features matching it
        for term in terms:
            term_score = np.zeros(self.d_sae, dtype=np.float64)
            for word, weight in self._matches(term):
                words.add(word)
                postings = self.postings[word]
                np.maximum.at(term_score, postings.features, weight * postings.score())
            total += term_score
            term_hits[term] = term_score > 0
            matched_terms += term_hits[term]
        hits = np.flatnonzero(matched_terms)
        order = np.lexsort((hits, -total[hits], -matched_terms[hits]))  # last key sorts first
        best = hits[order][:limit]
        return {"terms": terms, "matched": int(len(hits)),
                "data": [self._hit(int(f), float(total[f]), words, [t for t, hit in term_hits.items() if hit[f]])
                         for f in best]}

    def _hit(self, feature: int, score: float, words: set[str], matched_terms: list[str]) -> dict:
        t = self.tensors
        promoted = [{"token": self.decode([int(token)]), "token_id": int(token), "value": float(value)}
                    for token, value in zip(t["lens_promoted"][feature].tolist(), t["lens_promoted_values"][feature].tolist())]
        promoted_matches = [entry["token"] for entry in promoted
                            if any(w in words for p in (False, True)
                                   for w, _, _ in words_of(entry["token"], punctuation=p))]
        snippet, contexts = self._snippet(feature, words)
        return {"feature": feature, "score": round(score, 6),
                "density": float(t["density"][feature]), "mean_activation": float(t["mean_activation"][feature]),
                "max_activation": float(t["context_max"][feature].max()) if t["context_max"].shape[1] else 0.0,
                "matched_terms": matched_terms,
                "promoted_matches": promoted_matches, "context_matches": contexts,
                "snippet": snippet, "promoted": promoted}

    def _snippet(self, feature: int, words: set[str]) -> tuple[dict | None, int]:
        """The top context holding a query word where the feature fires most on it, and the count
        of top contexts holding one."""
        t = self.tensors
        best, best_activation, count = None, -1.0, 0
        for c in range(t["context_tokens"].shape[1]):
            if float(t["context_max"][feature, c]) <= 0:
                continue
            ids_row, acts_row = t["context_tokens"][feature, c], t["context_acts"][feature, c]
            keep = ids_row >= 0
            ids, token_acts = ids_row[keep].tolist(), acts_row[keep].tolist()
            text, spans = token_spans(ids, self.decode)
            found = [(start, end) for p in (False, True) for word, start, end in words_of(text, punctuation=p)
                     if word in words]
            if not found:
                continue
            count += 1
            for start, end in found:
                activation = max((a for a, (s, e) in zip(token_acts, spans) if s < end and e > start), default=0.0)
                if activation > best_activation:
                    best_activation = activation
                    best = {"context": c, "text": text, "match": [start, end], "activation": activation,
                            "max_activation": float(t["context_max"][feature, c]),
                            "tokens": [{"token": self.decode([i]), "token_id": i, "activation": a}
                                       for i, a in zip(ids, token_acts)]}
        return best, count


class FeatureIndexes:
    """Built indexes by dictionary: each built once, on its first search, and rebuilt when the
    dictionary is reloaded.

    An index is keyed by the dictionary's directory in the store (each install is a new,
    immutable directory, so a re-upload under the same name gets a new index); ``drop(name)``
    forgets a dictionary's indexes when it is deployed or undeployed. Tokenizers are loaded
    once a model, from the model's files (no weights).
    """

    def __init__(self, store=None):
        self.store = store
        self._indexes: dict[tuple[str, str, str], FeatureIndex | None] = {}
        self._tokenizers: dict[str, object] = {}
        self._locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def _store(self):
        from dictionaries.store import DictionaryStore

        if self.store is None:
            self.store = DictionaryStore()
        return self.store

    def _tokenizer(self, model: str):
        if model not in self._tokenizers:
            from transformers import AutoTokenizer

            from editing.model import resolve_model_dir

            self._tokenizers[model] = AutoTokenizer.from_pretrained(resolve_model_dir(model, build=False))
        return self._tokenizers[model]

    def get(self, model: str, name: str) -> FeatureIndex | None:
        """The index of ``name`` (served by ``model``), or None when it has no feature statistics.
        Blocking (the first call builds it): call it off the event loop."""
        path = Path(self._store().path(name)).resolve()
        key = (model, name, str(path))
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one build a dictionary, however many searches arrive at once
            if key not in self._indexes:
                self._indexes[key] = self._build(model, path)
            return self._indexes[key]

    def _build(self, model: str, path: Path) -> FeatureIndex | None:
        stats = path / "features.safetensors"
        if not stats.is_file():
            return None
        from safetensors.torch import load_file

        tokenizer = self._tokenizer(model)
        return FeatureIndex.build(load_file(str(stats)), lambda ids: tokenizer.decode([int(i) for i in ids]))

    def drop(self, name: str) -> None:
        with self._guard:
            for key in [key for key in self._indexes if key[1] == name]:
                self._indexes.pop(key, None)
                self._locks.pop(key, None)

    def built(self) -> list[tuple[str, str]]:
        """``(model, name)`` of the indexes held now."""
        return [(model, name) for model, name, _ in self._indexes]
