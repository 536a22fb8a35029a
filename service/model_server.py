"""One served model and its dictionaries, as plain Python: what the model deployment runs.

Kept free of Ray so the same object serves the Ray deployment, the in-process benchmark and
the tests. It checks each request against the model and its loaded dictionaries (before it
is queued, so one bad request never reaches the batch), hands it to the engine's scheduler,
which runs in a thread of its own (:class:`~editing.engine.loop.EngineLoop`: continuous
batching), runs other model work (inspect, loading dictionaries) between two scheduler
steps, and builds the wire responses.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field, replace

import torch

from editing.edits import EditError
from editing.engine.scheduler import QueueFullError, SchedulerLimits
from service.protocol import ApiError, GenerateRequest, InspectRequest
from service.redaction import redacted
from service.steering import Steering

STOP_FINISH = {"stop": "stop", "length": "length"}


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int = 256
    """Cap on max_new_tokens / max_tokens."""
    max_prompt_tokens: int = 1024
    max_edits: int = 32
    max_body_bytes: int = 65_536
    max_upload_bytes: int = 1 << 30
    """Cap on a dictionary upload (PUT /v1/dictionaries/{name})."""
    max_running_rows: int = 32
    """Rows a replica's scheduler runs at once (a request's baseline is a row)."""
    max_queued_requests: int = 128
    """Requests a replica queues for admission; past it, 503 with Retry-After."""
    max_tokens_in_flight: int = 65_536
    """Σ prompt + max_new_tokens over a replica's running rows (bounds key/value memory)."""
    prefill_chunk_tokens: int = 256
    """Prompt positions one prefill forward reads (longer prompts are read in chunks)."""
    stream_interval_s: float = 0.0
    """Shortest gap between two messages of one stream (its first and last are never held):
    steps that come faster are sent together. 0: a message every step. Each message crosses
    two Ray hops (replica → ingress → proxy); for a fast model (pythia-tiny's ~2 ms steps)
    0.05 s made streamed throughput 24% higher on a 2-core machine."""
    max_jobs_per_key: int = 4
    """Evaluation and training jobs one API key may have queued or running at once; past it, 429."""
    job_cpus: float = 1.0
    """CPUs a job's Ray task reserves."""
    max_logprobs: int = 5
    """Cap on /v1/completions' ``logprobs`` (top-N alternatives a token)."""

    def scheduler_limits(self) -> SchedulerLimits:
        return SchedulerLimits(max_running_rows=self.max_running_rows, max_queued_requests=self.max_queued_requests,
                               max_tokens_in_flight=self.max_tokens_in_flight,
                               prefill_chunk_tokens=self.prefill_chunk_tokens)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "pythia-tiny"
    """``pythia-tiny``, a saved directory, or a Hugging Face id."""
    dictionaries: tuple[str, ...] = ()
    """Store names to load at start."""
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int | None = None
    """Threads for torch in the replica (Ray gives a 1-CPU replica one thread otherwise)."""
    extra: dict = field(default_factory=dict)


class ModelServer:
    def __init__(self, config: ModelConfig, limits: Limits = Limits(), observer=None,
                 versions: dict[str, str] | None = None):
        """``versions`` (name -> weights sha256): serve exactly these (a replica joining a running
        app, from the registry), reporting what failed in ``load_errors``; default: the configured
        dictionaries as the store holds them now."""
        from dictionaries.store import DictionaryStore
        from editing.engine import Engine
        from editing.engine.loop import EngineLoop
        from editing.model import load_model

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config, self.limits = config, limits
        self.loaded = load_model(config.name, device=config.device, dtype=config.dtype, progress=False)
        self.store = DictionaryStore()
        self.engine = Engine(self.loaded.model, self.loaded.tokenizer)
        self.warnings: dict[str, list[str]] = {}
        self.served: dict[str, dict] = {}  # name -> what is loaded: sha256, path, config, metrics, files
        self._features: dict[str, dict] = {}
        self.steering = Steering(self)
        self.load_errors: dict[str, str] = {}
        if versions is None:
            for name in config.dictionaries:
                self._install(name, *self._read(name))
        else:
            for name, sha256 in sorted(versions.items()):
                try:
                    self._install(name, *self._read(name, sha256))
                except Exception as err:  # reported with the registry acknowledgement; the replica serves the rest
                    self.load_errors[name] = str(err)
        self.loop = EngineLoop(self.engine.scheduler(limits.scheduler_limits(), observer))

    def between_steps(self, fn):
        """Run ``fn()`` in the engine's thread between two scheduler steps; wait for its result."""
        return self.loop.call(fn).result()

    # --- dictionaries (hot deployment) -------------------------------------------------------------

    def compatibility(self, name: str, path=None):
        from dictionaries.config import DictionaryConfig
        from dictionaries.format import CONFIG_FILE, read_json
        from dictionaries.store import check_compatibility

        info = self.loaded.info
        config = self.store.config(name) if path is None else DictionaryConfig.from_json(read_json(path / CONFIG_FILE))
        return check_compatibility(config, model_name=info.name, model_sha256=info.sha256,
                                   n_layers=info.n_layers, d_model=info.d_model)

    def _read(self, name: str, sha256: str | None = None):
        """``name`` as the store holds it now — or exactly version ``sha256``, stored or pinned —
        as (dictionary, warnings, description). The object directory is resolved once, so the
        weights, their hash and the description agree."""
        from dictionaries.format import file_sha256
        from dictionaries.store import DictionaryStore

        path = self.store.path(name) if sha256 is None else self.store.path_of_version(name, sha256)
        report = self.compatibility(name, path)
        report.raise_for_errors(f"dictionary {name!r}")
        # object directories never change: a version found by its hash needs no second reading
        served = {"sha256": sha256 or file_sha256(path / "sae.safetensors"), "path": path,
                  **DictionaryStore.describe(path)}
        return self.store.load_path(path, device=self.config.device), report.warnings, served

    def _install(self, name: str, dictionary, warnings: list[str], served: dict) -> None:
        from dictionaries.statistics import max_activations

        # the maxima from the same object directory as the weights (value_unit "max_activation")
        self.engine.add_dictionary(name, dictionary, feature_max=max_activations(served["path"]))
        self.warnings[name], self.served[name] = warnings, served
        self._features.pop(name, None)

    def versions(self) -> dict[str, str]:
        """The weights' SHA-256 of each dictionary this replica serves."""
        return {name: served["sha256"] for name, served in self.served.items()}

    def load_dictionary(self, name: str, sha256: str | None = None) -> None:
        """Load (or reload) ``name`` from the store — exactly version ``sha256`` when given;
        requests admitted from the next step on use it (rows already running keep the weights
        they started with)."""
        dictionary, warnings, served = self._read(name, sha256)
        self.between_steps(lambda: self._install(name, dictionary, warnings, served))

    def drop_dictionary(self, name: str) -> None:
        def drop():
            self.engine.remove_dictionary(name)
            self.warnings.pop(name, None)
            self.served.pop(name, None)
            self._features.pop(name, None)
        self.between_steps(drop)

    def sync(self, desired: dict[str, str]) -> dict:
        """Drop, load and reload dictionaries until exactly ``desired`` (name -> weights sha256)
        is served; return errors by name (a name that failed keeps what it served before)."""
        errors = {}
        for name in sorted(set(self.engine.dictionaries) - set(desired)):
            self.drop_dictionary(name)
        for name, sha256 in sorted(desired.items()):
            if name in self.engine.dictionaries and self.served[name]["sha256"] == sha256:
                continue
            try:
                self.load_dictionary(name, sha256)
            except Exception as err:  # reported to the deploying caller, the replica keeps serving
                errors[name] = str(err)
        return errors

    # --- checks --------------------------------------------------------------------------------

    def check(self, request: GenerateRequest):
        """The engine request for a wire request, or an :class:`ApiError` naming the field."""
        if request.max_new_tokens > self.limits.max_new_tokens:
            raise ApiError(400, f"max_new_tokens is {request.max_new_tokens}; this server allows at most "
                                f"{self.limits.max_new_tokens}", param="max_new_tokens")
        if len(request.edits) > self.limits.max_edits:
            raise ApiError(400, f"{len(request.edits)} edits; this server allows at most {self.limits.max_edits}",
                           param="edits")
        self.steering.sync_vectors(request.edits)
        ids = self.loaded.tokenizer(request.prompt, add_special_tokens=False)["input_ids"]
        engine_request = replace(request.to_engine(), prompt=tuple(ids))  # tokenized once, here
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server allows at most "
                                f"{self.limits.max_prompt_tokens}", param="prompt")
        try:
            self.engine.validate(engine_request)
        except EditError as err:
            raise ApiError(400, str(err).replace("requests[0].", "").replace("requests[0]", "request"),
                           param=(err.param or "").replace("requests[0].", "") or None) from None
        return engine_request

    # --- work ------------------------------------------------------------------------------------

    def submit(self, engine_request, *, on_update=None, on_done=None):
        """Queue a checked request; a full queue is a 503 with ``Retry-After``."""
        try:
            return self.loop.submit(engine_request, on_update=on_update, on_done=on_done)
        except QueueFullError as err:
            raise ApiError(503, f"the server is busy: {err}", type="overloaded_error",
                           headers={"Retry-After": str(err.retry_after)}) from None
        except EditError as err:
            raise self.request_error(err) from None

    def cancel(self, handle) -> None:
        self.loop.cancel(handle)

    @staticmethod
    def request_error(err: Exception) -> ApiError:
        """The envelope for a request's failure: the caller's mistake (400) or ours (500)."""
        if isinstance(err, EditError):
            return ApiError(400, str(err).replace("requests[0].", "").replace("requests[0]", "request"),
                            param=(err.param or "").replace("requests[0].", "") or None)
        return ApiError(500, f"internal error ({type(err).__name__}); the request was not completed", type="server_error")

    def generate(self, engine_request):
        """Run one request to the end in this thread (tests and tools; a server awaits ``submit``)."""
        import threading

        finished = threading.Event()
        handle = self.submit(engine_request, on_done=lambda _: finished.set())
        finished.wait()
        if handle.error is not None:
            raise self.request_error(handle.error)
        return handle.result

    def response(self, result) -> dict:
        """The native wire response of a result."""
        body = {
            "id": f"gen-{uuid.uuid4().hex[:16]}",
            "model": self.config.name,
            "text": result.text,
            "tokens": result.tokens,
            "logprobs": result.logprobs,
            "finish_reason": STOP_FINISH[result.finish_reason],
            "prompt_tokens": len(result.prompt_tokens),
            "edit_report": result.edit_report,
            "features": result.features,
            "baseline": {"text": result.baseline.text, "tokens": result.baseline.tokens} if result.baseline else None,
        }
        return body

    def text_pieces(self, result) -> list[str]:
        """One text delta a generated token, concatenating to ``result.text``: what streaming would
        have sent (completions' ``logprobs.tokens``)."""
        streamer, decode = DeltaStreamer(self.loaded.tokenizer, []), self.loaded.tokenizer.decode
        last = len(result.tokens)
        # each prefix clamped to the final text, which a stop string may have cut short
        pieces = [streamer.update(result.tokens[:i], None, decode(result.tokens[:i])[: len(result.text)])
                  for i in range(1, last)]
        if last:
            pieces.append(streamer.update(result.tokens, result.finish_reason, result.text))
        return pieces

    def inspect(self, request: InspectRequest) -> dict:
        try:
            tokens = self.between_steps(lambda: self.engine.inspect(request.text, request.dictionary, request.top_k))
        except EditError as err:
            raise ApiError(404 if "unknown dictionary" in str(err) else 400, str(err), param=err.param) from None
        return {"model": self.config.name, "dictionary": request.dictionary, "tokens": tokens}

    # --- descriptions --------------------------------------------------------------------------------

    def model_card(self) -> dict:
        info = self.loaded.info
        return {"id": self.config.name, "object": "model", "created": 0, "owned_by": "steerserve",
                "n_layers": info.n_layers, "d_model": info.d_model, "vocab_size": info.vocab_size,
                "sha256": info.sha256, "dtype": info.dtype, "device": info.device,
                "dictionaries": sorted(self.engine.dictionaries), "dictionary_sha256": self.versions(),
                "limits": asdict(self.limits)}

    def dictionary_summary(self, name: str) -> dict:
        """The dictionary as this replica serves it (not as the store may hold it by now)."""
        served = self.served[name]
        config = served["config"]
        return {"name": name, "model": self.config.name, "architecture": config["architecture"], "hook": config["hook"],
                "d_in": config["d_in"], "d_sae": config["d_sae"], "k": config.get("k"), "sha256": served["sha256"],
                "metrics": {k: v for k, v in (served["metrics"] or {}).items() if isinstance(v, (int, float))},
                "warnings": self.warnings.get(name, [])}

    def dictionary_detail(self, name: str) -> dict:
        self._require(name)
        served = self.served[name]
        # provenance and metrics record server paths (a run directory, a registered corpus): not for callers
        return {"name": name, "model": self.config.name, "sha256": served["sha256"],
                "config": redacted(served["config"]), "metrics": redacted(served["metrics"]), "files": served["files"],
                "warnings": self.warnings.get(name, [])}

    def _require(self, name: str) -> None:
        if name not in self.engine.dictionaries:
            raise ApiError(404, f"dictionary {name!r} is not loaded on model {self.config.name!r} "
                                f"(loaded: {', '.join(sorted(self.engine.dictionaries)) or 'none'})",
                           type="not_found_error", param="name")

    def feature(self, name: str, index: int) -> dict:
        """Density, top-activating contexts as text with per-token activations, logit lens."""
        self._require(name)
        d_sae = self.engine.dictionaries[name].config.d_sae
        if not 0 <= index < d_sae:
            raise ApiError(404, f"feature {index} is out of range for {name!r} (0..{d_sae - 1})",
                           type="not_found_error", param="feature")
        stats = self._feature_stats(name)
        decode = lambda ids: self.loaded.tokenizer.decode([int(t) for t in ids])  # noqa: E731
        body = {"dictionary": name, "feature": index, "hook": self.engine.dictionaries[name].config.hook}
        if stats is None:
            return body | {"statistics": None, "note": "this dictionary has no feature statistics (features.safetensors)"}
        tensors, meta = stats
        contexts = []
        for c in range(tensors["context_tokens"].shape[1]):
            ids = tensors["context_tokens"][index, c]
            if float(tensors["context_max"][index, c]) <= 0:
                continue
            keep = ids >= 0
            contexts.append({"max_activation": float(tensors["context_max"][index, c]),
                             "text": decode(ids[keep]),
                             "tokens": [{"token": decode([t]), "token_id": int(t), "activation": float(a)}
                                        for t, a in zip(ids[keep], tensors["context_acts"][index, c][keep])]})
        lens = lambda key: [{"token": decode([t]), "token_id": int(t), "value": float(v)}  # noqa: E731
                            for t, v in zip(tensors[key][index], tensors[key + "_values"][index])]
        return body | {"density": float(tensors["density"][index]),
                       "mean_activation": float(tensors["mean_activation"][index]),
                       "measured_on": redacted(meta), "top_contexts": contexts,
                       "logit_lens": {"promoted": lens("lens_promoted"), "suppressed": lens("lens_suppressed")}}

    def _feature_stats(self, name: str):
        if name not in self._features:
            from safetensors.torch import load_file

            path = self.served[name]["path"]  # the served version's own files
            if not (path / "features.safetensors").is_file():
                self._features[name] = None
            else:
                meta_path = path / "features.json"
                meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
                self._features[name] = (load_file(str(path / "features.safetensors")), meta)
        return self._features[name]


class DeltaStreamer:
    """Turns a growing token list into text deltas whose concatenation is the final text.

    Text is held back while it ends in an incomplete character (a byte-level token can split
    one) and, when stop strings are set, by one less than the longest stop string, so that
    nothing of a stop string is sent before the engine cuts the text there.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.emitted = ""

    def update(self, tokens: list[int], finish_reason: str | None, stopped_text: str | None) -> str:
        text = stopped_text if stopped_text is not None else self.tokenizer.decode(tokens)
        if finish_reason is None:
            if text.endswith("\ufffd"):
                return ""
            text = text[: len(text) - self.hold] if self.hold else text
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta


def environment_for_workers() -> dict:
    """Variables a Ray worker must share with the process that started the app. API keys are not
    among them: the ingress gets their digests as arguments (:func:`service.access.resolve_keys`),
    and a runtime_env is visible to anyone who can read Ray's state API or dashboard."""
    keys = ("STEERSERVE_HOME", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
            "TOKENIZERS_PARALLELISM", "HF_HOME", "OMP_WAIT_POLICY")
    return {key: os.environ[key] for key in keys if key in os.environ}
