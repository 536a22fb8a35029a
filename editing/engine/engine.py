"""The engine: a model, its served dictionaries, request checks, and generation.

    engine = Engine(loaded.model, loaded.tokenizer, {"l2": dictionary})
    [result] = engine.generate([GenerationRequest("def main(", max_new_tokens=16,
                                                  edits=(EditSpec(dictionary="l2", feature=7, op="ablate"),),
                                                  include_baseline=True)])
    result.text, result.edit_report, result.baseline.text

Generation runs through the scheduler (:mod:`editing.engine.scheduler`): continuous
batching in which every row carries its own edits, applied inside the dictionary hooks by
row-indexed tensor operations (:mod:`editing.engine.edit_tables`); rows without edits are
not touched, so an unedited request is the plain model. ``generate`` is a thin wrapper
that submits a list of requests and steps until they are done; a server keeps one
scheduler running and submits as requests arrive.

The engine takes plain parameters (:class:`GenerationRequest`); the HTTP layer converts
its wire format into them.
"""

from __future__ import annotations

import torch

from editing.edits import EditError, dictionaries_named, validate_edits, vectors_named
from editing.engine.requests import EngineError, GenerationRequest, GenerationResult
from editing.hookpoints import parse_hook_name
from editing.nethook import Trace


class Engine:
    def __init__(self, model, tokenizer, dictionaries: dict | None = None, *, max_positions: int | None = None,
                 vectors: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_positions = max_positions or int(model.config.max_position_embeddings)
        self.dictionaries: dict = {}
        self.feature_max: dict = {}  # name -> (d_sae,) recorded maximum activations, for dictionaries with statistics
        self.vectors: dict = {}  # name -> SteeringVector
        for name, dictionary in (dictionaries or {}).items():
            self.add_dictionary(name, dictionary)
        for vector in (vectors or {}).values():
            self.add_vector(vector)

    # --- dictionaries and steering vectors ------------------------------------------------------

    def _fits(self, what: str, hook: str, width: int) -> None:
        layer, _ = parse_hook_name(hook)
        n_layers, d_model = self.model.config.num_hidden_layers, self.model.config.hidden_size
        if layer >= n_layers or width != d_model:
            raise EditError(f"{what} ({hook}, width {width}) does not fit this {n_layers}-layer model of width "
                            f"{d_model}", what.split()[0])

    def add_dictionary(self, name: str, dictionary, *, feature_max=None) -> None:
        """Serve ``dictionary`` under ``name``; refused if it does not fit the model. ``feature_max``:
        its features' recorded maximum activations (from its statistics), for ``max_activation`` units."""
        self._fits(f"dictionary {name!r}", dictionary.config.hook, dictionary.config.d_in)
        self.dictionaries[name] = dictionary.to(self.device)
        if feature_max is not None:
            self.feature_max[name] = feature_max.float().cpu()
        else:
            self.feature_max.pop(name, None)

    def remove_dictionary(self, name: str) -> None:
        self.dictionaries.pop(name, None)
        self.feature_max.pop(name, None)

    def add_vector(self, vector) -> None:
        """Serve a :class:`~dictionaries.vectors.SteeringVector` under its name (replacing one of the
        same name for rows admitted from now on); refused if it does not fit the model."""
        self._fits(f"vector {vector.name!r}", vector.hook, vector.d)
        self.vectors[vector.name] = vector.to(self.device)

    def remove_vector(self, name: str) -> None:
        self.vectors.pop(name, None)

    def resources(self, request: GenerationRequest) -> tuple[dict, dict, dict]:
        """What a request's rows use, resolved at admission: ``(dictionaries, vectors, feature_max)``
        by name (dictionaries it edits, reads conditions from or reads out)."""
        names = dictionaries_named(request.edits) | ({request.return_features[0]} if request.return_features else set())
        vectors = {name: self.vectors.get(name) for name in vectors_named(request.edits)}
        for name, vector in vectors.items():
            if vector is None:  # removed (by another thread) since the request was checked
                raise EngineError(f"steering vector {name!r} was removed while the request waited", "edits")
        return ({name: self.dictionaries[name] for name in names}, vectors,
                {name: self.feature_max[name] for name in names if name in self.feature_max})

    # --- validation ---------------------------------------------------------------------------

    def _prompt_ids(self, prompt, index: int) -> list[int]:
        where = f"requests[{index}].prompt"
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise EngineError(f"{where}: token ids must be in [0, {vocab})", where)
        if not ids:
            raise EngineError(f"{where}: the prompt is empty", where)
        return ids

    def validate(self, request: GenerationRequest, index: int = 0) -> list[int]:
        """Check a request against the model and dictionaries; return its prompt's token ids."""
        where = f"requests[{index}]"
        ids = self._prompt_ids(request.prompt, index)
        if request.max_new_tokens < (0 if request.prompt_logprobs else 1):
            raise EngineError(f"{where}.max_new_tokens must be at least 1 (0 only when the prompt is scored)",
                              f"{where}.max_new_tokens")
        if not 0 <= request.top_logprobs <= self.model.config.vocab_size:
            raise EngineError(f"{where}.top_logprobs must be in [0, vocabulary size]", f"{where}.top_logprobs")
        if len(ids) + request.max_new_tokens > self.max_positions:
            raise EngineError(f"{where}: {len(ids)} prompt tokens + {request.max_new_tokens} new tokens exceed the "
                              f"model's {self.max_positions} positions", f"{where}.max_new_tokens")
        if not request.temperature >= 0:
            raise EngineError(f"{where}.temperature must be >= 0", f"{where}.temperature")
        if not 0 < request.top_p <= 1:
            raise EngineError(f"{where}.top_p must be in (0, 1]", f"{where}.top_p")
        if request.top_k < 0:
            raise EngineError(f"{where}.top_k must be >= 0", f"{where}.top_k")
        validate_edits(request.edits, self.dictionaries, f"{where}.edits", vectors=self.vectors,
                       feature_max=self.feature_max)
        if request.return_features is not None:
            name, top_k = request.return_features
            if name not in self.dictionaries:
                raise EngineError(f"{where}.return_features: unknown dictionary {name!r}", f"{where}.return_features.dictionary")
            if not 1 <= top_k <= self.dictionaries[name].config.d_sae:
                raise EngineError(f"{where}.return_features.top_k must be in [1, d_sae]", f"{where}.return_features.top_k")
        return ids

    # --- generation -----------------------------------------------------------------------------

    def scheduler(self, limits=None, observer=None):
        """A :class:`~editing.engine.scheduler.Scheduler` over this engine (continuous batching)."""
        from editing.engine.scheduler import Scheduler, SchedulerLimits

        return Scheduler(self, limits or SchedulerLimits(), observer)

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest], *, limits=None) -> list[GenerationResult]:
        """Generate all ``requests`` (submitted together, then stepped until every one is done).
        ``limits``: the scheduler's; by default every request is admitted at once."""
        from editing.engine.scheduler import SchedulerLimits

        if limits is None:
            rows = sum(2 if r.include_baseline else 1 for r in requests)
            limits = SchedulerLimits(max_running_rows=max(1, rows), max_queued_requests=max(1, len(requests)),
                                     max_tokens_in_flight=1 << 40)
        scheduler = self.scheduler(limits)
        handles = [scheduler.submit(request, index=index) for index, request in enumerate(requests)]
        scheduler.run_until_idle()
        for handle in handles:
            if handle.error is not None:
                raise handle.error
        return [handle.result for handle in handles]

    # --- inspection -------------------------------------------------------------------------------

    @torch.no_grad()
    def inspect(self, text: str, dictionary: str, top_k: int = 5) -> list[dict]:
        """The ``top_k`` active features of ``dictionary`` at each token of ``text``."""
        if dictionary not in self.dictionaries:
            raise EngineError(f"unknown dictionary {dictionary!r} (loaded: {', '.join(sorted(self.dictionaries)) or 'none'})",
                              "dictionary")
        ids = self._prompt_ids(text, 0)
        if len(ids) > self.max_positions:
            raise EngineError(f"text has {len(ids)} tokens; the model takes {self.max_positions}", "text")
        sae = self.dictionaries[dictionary]
        if not 1 <= top_k <= sae.config.d_sae:
            raise EngineError(f"top_k must be in [1, {sae.config.d_sae}]", "top_k")
        with Trace(self.model, sae.config.hook, stop=True) as trace:
            self.model(input_ids=torch.tensor([ids], device=self.device))
        acts = sae.encode(trace.output[0]).float()  # (T, d_sae)
        top = acts.topk(top_k, dim=-1)
        return [
            {"position": p, "token_id": ids[p], "token": self.tokenizer.decode([ids[p]]),
             "features": [{"feature": int(f), "activation": float(a)}
                          for f, a in zip(top.indices[p].tolist(), top.values[p].tolist()) if a > 0]}
            for p in range(len(ids))
        ]
