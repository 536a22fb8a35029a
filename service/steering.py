"""Find and steer, on a model replica: search by example, contrast, dictionary comparison and the
steering vectors that vector edits use.

Kept free of Ray like :class:`~service.model_server.ModelServer`, which owns one
:class:`Steering`. Model forwards (search, contrast) run in the engine's thread between two
scheduler steps, a chunk of texts at a time, so generation keeps going while a contrast runs.
Steering vectors live in the store (:mod:`dictionaries.vectors`); a request that names one is
served the stored version (a replaced file is reloaded, a deleted one is gone) — rows already
running keep the tensor they were admitted with. Comparisons read dictionaries from the store
(they need no model) and keep the last few results, so paging through matched pairs does not
repeat the matching.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from dictionaries.config import DictionaryError
from dictionaries.vectors import VectorStore
from editing.edits import EditError
from service.protocol import MAX_CONTRAST_TOKENS, ApiError, ContrastRequest, SearchRequest

CONTRAST_CHUNK = 16  # texts a forward, between two scheduler steps
CORPUS_CONTEXT = 128  # tokens a corpus window
CACHED_COMPARISONS = 4


def _not_found(message: str, param: str) -> ApiError:
    return ApiError(404, message, type="not_found_error", param=param)


class Steering:
    def __init__(self, server):
        self.server = server
        self.vectors = VectorStore()
        self._versions: dict[str, tuple] = {}
        self._comparisons: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # --- steering vectors ---------------------------------------------------------------------

    def sync_vectors(self, edits) -> None:
        """Serve the stored version of every vector ``edits`` name (an unknown one is left for the
        engine's check to refuse, naming the field)."""
        engine = self.server.engine
        for index, edit in enumerate(edits):
            if edit.vector is None:
                continue
            name = edit.vector
            version = self.vectors.version(name)
            if version is None:
                engine.remove_vector(name)
                self._versions.pop(name, None)
                continue
            if self._versions.get(name) == version and name in engine.vectors:
                continue
            try:
                engine.add_vector(self.vectors.load(name))
            except (DictionaryError, EditError) as err:
                raise ApiError(400, f"edits[{index}].vector: steering vector {name!r} cannot be used: {err}",
                               param=f"edits[{index}].vector") from None
            self._versions[name] = version

    # --- search by example ----------------------------------------------------------------------

    def _dictionary(self, name: str):
        engine = self.server.engine
        if name not in engine.dictionaries:
            raise _not_found(f"dictionary {name!r} is not loaded on model {self.server.config.name!r} "
                             f"(loaded: {', '.join(sorted(engine.dictionaries)) or 'none'})", "dictionary")
        return engine.dictionaries[name]

    def _token_count(self, text: str) -> int:
        return len(self.server.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def search(self, request: SearchRequest) -> dict:
        from editing.search import SpanError, search_span

        sae = self._dictionary(request.dictionary)
        limit = self.server.limits.max_prompt_tokens
        if self._token_count(request.text) > limit:
            raise ApiError(400, f"text: more than {limit} tokens; this server reads at most {limit}", param="text")
        loaded, span = self.server.loaded, request.span
        feature_max = self.server.engine.feature_max.get(request.dictionary)
        try:
            found = self.server.between_steps(lambda: search_span(
                loaded.model, loaded.tokenizer, sae, request.text, (span.start, span.end), unit=span.unit,
                feature_max=feature_max, top_k=request.top_k, rank_by=request.rank_by))
        except SpanError as err:
            raise ApiError(400, str(err), param=err.param) from None
        note = None
        if feature_max is None and request.rank_by == "relative":
            note = "this dictionary has no feature statistics: ranked by activation, not relative to a typical maximum"
        return {"model": self.server.config.name, "dictionary": request.dictionary, "hook": sae.config.hook,
                "text": request.text, **found} | ({"note": note} if note else {})

    # --- contrast ---------------------------------------------------------------------------------

    def _side_texts(self, side, param: str) -> list[list[int]]:
        tokenizer, limit = self.server.loaded.tokenizer, self.server.limits.max_prompt_tokens
        if side.corpus is not None:
            from editing.corpora import open_corpus, token_windows

            windows = token_windows(open_corpus(side.corpus), tokenizer, CORPUS_CONTEXT,
                                    max_windows=max(1, side.tokens // CORPUS_CONTEXT))
            return windows.tolist()
        texts, total = [], 0
        for index, text in enumerate(side.texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ApiError(400, f"{param}.texts[{index}]: the text has no tokens", param=f"{param}.texts[{index}]")
            if len(ids) > limit:
                raise ApiError(400, f"{param}.texts[{index}]: {len(ids)} tokens; this server reads at most {limit} "
                                    "a text", param=f"{param}.texts[{index}]")
            total += len(ids)
            texts.append(ids)
        if total > MAX_CONTRAST_TOKENS:
            raise ApiError(400, f"{param}.texts: {total} tokens in all; a contrast reads at most "
                                f"{MAX_CONTRAST_TOKENS} a set", param=f"{param}.texts")
        return texts

    def contrast(self, request: ContrastRequest) -> dict:
        from editing.contrast import Contrast, activations

        sae = self._dictionary(request.dictionary)
        hook = sae.config.hook
        model, tokenizer = self.server.loaded.model, self.server.loaded.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        sets = {"a": self._side_texts(request.a, "a"), "b": self._side_texts(request.b, "b")}
        result = Contrast(sae, request.unit)
        for side, texts in sets.items():
            for start in range(0, len(texts), CONTRAST_CHUNK):
                chunk = texts[start : start + CONTRAST_CHUNK]
                self.server.between_steps(lambda: result.add(side, *activations(model, hook, chunk, pad)))
        for side, acc in result.sides.items():
            if acc.n < 2:
                raise ApiError(400, f"{side}: a contrast needs at least 2 {request.unit}s a set; this one has {acc.n}",
                               param=side)
        features = result.ranked(request.top_k, request.direction)
        vector = result.difference_of_means()
        body = {"model": self.server.config.name, "dictionary": request.dictionary, "hook": hook, "unit": request.unit,
                "sets": result.sizes(), "ranked_by": {"both": "|effect_size|", "a": "effect_size (higher in a)",
                                                      "b": "-effect_size (higher in b)"}[request.direction],
                "effect_size": "Hedges' g (standardised mean difference, pooled sd) with its large-sample standard "
                               "error; z = g / se",
                "features": features}
        if request.include_vector or request.save_vector:
            body["vector"] = {"hook": hook, "norm": float(vector.norm()), "values": vector.tolist(),
                              "model": {"name": self.server.loaded.info.name, "sha256": self.server.loaded.info.sha256}}
        return body

    # --- dictionary comparison --------------------------------------------------------------------

    def _stored(self, name: str, param: str):
        store = self.server.store
        try:
            return store.path(name)
        except DictionaryError as err:
            raise _not_found(f"{param}: {err}", param) from None

    def compare(self, a: str, b: str, threshold: float, offset: int, limit: int) -> dict:
        from dictionaries.compare import ComparisonError, compare

        paths = (self._stored(a, "a"), self._stored(b, "b"))
        with self._lock:
            cached = self._comparisons.get(paths)
            if cached is not None:
                self._comparisons.move_to_end(paths)
        if cached is None:
            first, second = (self.server.store.load(name) for name in (a, b))
            try:
                with torch.no_grad():
                    cached = (compare(first, second), first.config, second.config)
            except ComparisonError as err:
                raise ApiError(400, f"b: {err}", param="b") from None
            with self._lock:
                self._comparisons[paths] = cached
                while len(self._comparisons) > CACHED_COMPARISONS:
                    self._comparisons.popitem(last=False)
        comparison, config_a, config_b = cached
        warnings = []
        if config_a.hook != config_b.hook:
            warnings.append(f"the dictionaries read different hook points ({config_a.hook} and {config_b.hook})")
        if config_a.model_name != config_b.model_name:
            warnings.append(f"the dictionaries were trained on different models ({config_a.model_name!r} and "
                            f"{config_b.model_name!r})")
        body = {
            "a": {"name": a, "hook": config_a.hook, "d_sae": config_a.d_sae, "architecture": config_a.architecture},
            "b": {"name": b, "hook": config_b.hook, "d_sae": config_b.d_sae, "architecture": config_b.architecture},
            "mmcs": {
                "decoder": comparison.mmcs_decoder, "encoder": comparison.mmcs_encoder,
                "meaning": {"a_to_b": f"mean over {a}'s {config_a.d_sae} features of the best cosine with any of "
                                      f"{b}'s features", "b_to_a": f"mean over {b}'s {config_b.d_sae} features of the "
                                                                   f"best cosine with any of {a}'s features"},
            },
            "warnings": warnings,
        }
        if not comparison.matched:
            body["matching"] = None
            body["note"] = (f"{config_a.d_sae} × {config_b.d_sae} features is too many for a one-to-one matching on "
                            "this server; MMCS is exact")
            return body
        pairs = comparison.pairs(threshold)
        body["matching"] = {
            "method": "Hungarian assignment (scipy.optimize.linear_sum_assignment) maximising the summed decoder cosine",
            "pairs": len(comparison.matched_a),
            "mean_decoder_cosine": float(comparison.decoder_cosine.mean()),
            "mean_encoder_cosine": float(comparison.encoder_cosine.mean()),
            "threshold": threshold, "above_threshold": len(pairs), "offset": offset, "limit": limit,
            "data": [{"a": i, "b": j, "decoder_cosine": dec, "encoder_cosine": enc}
                     for i, j, dec, enc in pairs[offset : offset + limit]],
        }
        return body
