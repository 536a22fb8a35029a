"""The ingress deployment: the HTTP API (``/v1/...``, ``/healthz``, ``/metrics``), access control,
jobs, uploads and hot deployment; it holds a ``DeploymentHandle`` to each model deployment.

    client ─HTTP─► Ingress ─DeploymentHandle─► ModelDeployment (one a model)
"""

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from service.access import AccessControl, keys_from_environment
from service.feature_search import FeatureIndexes
from service.http import METRICS, _request_body, _unwrap, app, counted
from service.jobs import FINISHED, JobStore, run_evaluation, run_training
from service.model_server import Limits
from service.protocol import (
    ApiError,
    CompletionRequest,
    EvaluationJobRequest,
    GenerateRequest,
    InspectRequest,
    TrainingJobRequest,
    validation_param,
)
from service.ui import stored_dictionaries  # also mounts the page's routes on the app


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, models: dict, limits: dict, api_keys: list[dict] | None = None,
                 registry_name: str | None = None):
        self.models = models  # name -> DeploymentHandle
        self.default_model = next(iter(models))
        self.limits = Limits(**limits)
        self.registry_name = registry_name
        self.access = AccessControl(api_keys if api_keys is not None else keys_from_environment())
        self.jobs = JobStore()
        self.jobs.mark_interrupted()  # what a previous run left running cannot be finished now
        self.tasks: dict = {}  # job id -> Ray ObjectRef of its task
        self.feature_indexes = FeatureIndexes()  # feature search, one index a dictionary (service/ui.py)

    def _allow(self, request: Request, role: str = "user") -> None:
        self.access.authorize(request.headers.get("authorization"), role)

    @staticmethod
    def _count_work(model: str, result: dict, edits) -> None:
        METRICS.inc("steerserve_generated_tokens_total", len(result["tokens"]), model=model)
        for edit in edits:
            METRICS.inc("steerserve_edits_applied_total", op=edit.op, model=model)

    # --- helpers ------------------------------------------------------------------------------------

    async def _body(self, request: Request, model_type):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body is {length} bytes; the limit is {self.limits.max_body_bytes}",
                           type="request_too_large")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body is over {self.limits.max_body_bytes} bytes", type="request_too_large")
        try:
            data = json.loads(raw)  # NaN and Infinity parse here and are refused, by field, below
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            return model_type.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            param = validation_param(tuple(first["loc"]))
            raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None

    def _handle(self, model: str | None):
        name = model or self.default_model
        if name not in self.models:
            raise ApiError(404, f"model {name!r} is not served (served: {', '.join(self.models)})",
                           type="not_found_error", param="model")
        return name, self.models[name]

    # --- endpoints ------------------------------------------------------------------------------------

    @app.get("/healthz")
    @counted("GET", "/healthz")
    async def healthz(self) -> dict:
        for name, handle in self.models.items():
            _unwrap(await handle.describe.remote())
        return {"status": "ok", "models": list(self.models)}

    @app.get("/metrics")
    @counted("GET", "/metrics")
    async def metrics(self, request: Request):
        self._allow(request, "admin")
        text = METRICS.render() + self._job_gauges()
        for handle in self.models.values():
            text += await handle.metrics_text.remote()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    @counted("GET", "/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._allow(request)
        cards = [_unwrap(await handle.describe.remote()) for handle in self.models.values()]
        return {"object": "list", "data": cards}

    @app.post("/v1/generate", openapi_extra=_request_body(GenerateRequest))
    @counted("POST", "/v1/generate")
    async def generate(self, request: Request):
        self._allow(request)
        body = await self._body(request, GenerateRequest)
        name, handle = self._handle(body.model)
        result = _unwrap(await handle.generate.remote(body))
        self._count_work(name, result, body.edits)
        return result

    @app.post("/v1/completions", openapi_extra=_request_body(CompletionRequest))
    @counted("POST", "/v1/completions")
    async def completions(self, request: Request):
        self._allow(request)
        body = await self._body(request, CompletionRequest)
        name, handle = self._handle(body.model)
        try:
            native = body.to_generate()
        except ValidationError as err:
            first = err.errors()[0]
            raise ApiError(400, first["msg"], param=validation_param(tuple(first["loc"]))) from None
        completion_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def usage_of(result: dict) -> dict:
            return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": len(result["tokens"]),
                    "total_tokens": result["prompt_tokens"] + len(result["tokens"])}

        if not body.stream:
            result = _unwrap(await handle.generate.remote(native, text_pieces=body.logprobs is not None))
            self._count_work(name, result, body.edits)
            logprobs = None
            if body.logprobs is not None:
                logprobs = {"tokens": result["text_pieces"], "token_logprobs": result["logprobs"]}
            return {"id": completion_id, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": result["text"], "index": 0, "logprobs": logprobs,
                                 "finish_reason": result["finish_reason"]}],
                    "usage": usage_of(result), "edit_report": result["edit_report"]}

        stream = handle.options(stream=True).generate_stream.remote(native)
        first = await stream.__anext__()
        if "error" in first:  # refused before anything was generated: a plain 4xx
            _unwrap(first)

        def chunk(text: str, result: dict | None = None) -> str:
            body = {"id": completion_id, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": text, "index": 0, "logprobs": None,
                                 "finish_reason": result["finish_reason"] if result else None}]}
            if result:
                body["usage"] = usage_of(result)
                body["edit_report"] = result["edit_report"]
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            item = first
            while True:
                if "final" in item:
                    self._count_work(name, item["final"], body.edits)
                    yield chunk(item["delta"], item["final"])
                    break
                yield chunk(item["delta"])
                item = await stream.__anext__()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/inspect", openapi_extra=_request_body(InspectRequest))
    @counted("POST", "/v1/inspect")
    async def inspect(self, request: Request):
        self._allow(request)
        body = await self._body(request, InspectRequest)
        _, handle = self._handle(body.model)
        return _unwrap(await handle.inspect.remote(body))

    @app.get("/v1/dictionaries")
    @counted("GET", "/v1/dictionaries")
    async def list_dictionaries(self, request: Request) -> dict:
        self._allow(request)
        entries = []
        for handle in self.models.values():
            entries += [entry | {"deployed": True} for entry in _unwrap(await handle.dictionaries.remote())]
        if request.query_params.get("stored") in ("true", "1"):  # also what is in the store, not deployed
            entries += await asyncio.to_thread(stored_dictionaries, entries)
        return {"object": "list", "data": entries}

    @app.get("/v1/dictionaries/{name}")
    @counted("GET", "/v1/dictionaries/{name}")
    async def get_dictionary(self, name: str, request: Request) -> dict:
        self._allow(request)
        return await self._first_with(name, lambda handle: handle.dictionary.remote(name))

    @app.get("/v1/dictionaries/{name}/features/{index}")
    @counted("GET", "/v1/dictionaries/{name}/features/{index}")
    async def get_feature(self, name: str, index: int, request: Request) -> dict:
        self._allow(request)
        return await self._first_with(name, lambda handle: handle.feature.remote(name, index))

    # --- hot deployment (admin) -------------------------------------------------------------------

    @app.put("/v1/dictionaries/{name}")
    @counted("PUT", "/v1/dictionaries/{name}")
    async def upload_dictionary(self, name: str, request: Request) -> dict:
        """Install a native dictionary (multipart parts ``config.json`` and ``sae.safetensors``,
        optionally ``metrics.json``) into the store, fully validated and atomically. A bad upload
        changes nothing: the dictionary already under that name keeps serving."""
        import tempfile
        from pathlib import Path

        from dictionaries.config import DictionaryError
        from dictionaries.store import DictionaryStore, validate_name

        self._allow(request, "admin")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limits.max_upload_bytes:
            raise ApiError(413, f"upload is {length} bytes; the limit is {self.limits.max_upload_bytes}",
                           type="request_too_large")
        try:
            validate_name(name)
        except DictionaryError as err:
            raise ApiError(400, str(err), param="name") from None
        try:
            form = await request.form()
        except Exception as err:
            raise ApiError(400, f"expected a multipart form with the parts config.json and sae.safetensors ({err})") from None
        parts = {key: value for key, value in form.multi_items() if hasattr(value, "read")}
        for required in ("config.json", "sae.safetensors"):
            if required not in parts:
                raise ApiError(400, f"the multipart form has no part named {required!r}", param=required)
        unknown = sorted(set(parts) - {"config.json", "sae.safetensors", "metrics.json"})
        if unknown:
            raise ApiError(400, f"unexpected part(s) {', '.join(unknown)}", param=unknown[0])
        with tempfile.TemporaryDirectory() as staging:
            for filename, upload in parts.items():
                Path(staging, filename).write_bytes(await upload.read())
            try:
                await asyncio.to_thread(DictionaryStore().put, name, staging)
            except DictionaryError as err:
                raise ApiError(400, f"dictionary refused: {err}", param="sae.safetensors" if "safetensors" in str(err)
                               else "config.json") from None
        info = DictionaryStore().info(name)
        return {"name": name, "installed": True, "config": info["config"],
                "note": "installed in the store; POST /v1/dictionaries/{name}/deploy serves it"}

    @app.post("/v1/dictionaries/{name}/deploy")
    @counted("POST", "/v1/dictionaries/{name}/deploy")
    async def deploy_dictionary(self, name: str, request: Request) -> dict:
        """Load a stored dictionary into every replica of its model, without a restart."""
        return await self._set_deployed(name, request, True)

    @app.delete("/v1/dictionaries/{name}/deploy")
    @counted("DELETE", "/v1/dictionaries/{name}/deploy")
    async def undeploy_dictionary(self, name: str, request: Request) -> dict:
        """Unload a dictionary from every replica; requests naming it afterwards get a 4xx."""
        return await self._set_deployed(name, request, False)

    async def _set_deployed(self, name: str, request: Request, deployed: bool) -> dict:
        self._allow(request, "admin")
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as err:
            raise ApiError(400, f"the body is not valid JSON ({err})") from None
        return await self._deploy(name, body.get("model") if isinstance(body, dict) else None, deployed)

    async def _deploy(self, name: str, model: str | None, deployed: bool) -> dict:
        from dictionaries.store import DictionaryStore

        model_name, handle = self._handle(model)
        if not self.registry_name:
            raise ApiError(503, "this app was built without a registry; hot deployment is off", type="server_error")
        if deployed:
            if name not in DictionaryStore():
                raise ApiError(404, f"no dictionary named {name!r} in the store", type="not_found_error", param="name")
            check = await handle.check_dictionary.remote(name)
            if check["errors"]:
                raise ApiError(400, f"dictionary {name!r} cannot be served by {model_name!r}: "
                                    + "; ".join(check["errors"]), param="name")
        from service.registry import registry

        actor = registry(self.registry_name)
        version = await actor.change.remote(model_name, name, deployed)
        deadline = time.time() + 120
        while True:
            progress = await actor.progress.remote(model_name, version)
            if progress["replicas"] and progress["acknowledged"] >= progress["replicas"]:
                break
            if time.time() > deadline:
                raise ApiError(503, f"not every replica of {model_name!r} confirmed within 120 s "
                                    f"({progress['acknowledged']}/{progress['replicas']})", type="server_error")
            await asyncio.sleep(0.1)
        self.feature_indexes.drop(name)  # the replicas reloaded it: search rebuilds from the store
        failures = {replica: errors[name] for replica, errors in progress["errors"].items() if name in errors}
        if deployed and failures:
            await actor.change.remote(model_name, name, False)  # roll back; nothing else changes
            raise ApiError(400, f"dictionary {name!r} failed to load: {next(iter(failures.values()))}", param="name")
        return {"dictionary": name, "model": model_name, "deployed": deployed, "replicas": progress["replicas"],
                "version": version}

    # --- jobs ------------------------------------------------------------------------------------------

    def _job_gauges(self) -> str:
        counts = self.jobs.counts()
        lines = ["# HELP steerserve_jobs Jobs by kind and state.", "# TYPE steerserve_jobs gauge"]
        for kind in ("evaluation", "training"):
            for state in ("queued", "running", "succeeded", "failed", "cancelled"):
                lines.append(f'steerserve_jobs{{kind="{kind}",state="{state}"}} {counts.get((kind, state), 0)}')
        return "\n".join(lines) + "\n"

    def _launch(self, kind: str, work, request: dict, after=None) -> dict:
        import ray

        from service.model_server import environment_for_workers

        job_id = self.jobs.create(kind, request)
        task = ray.remote(num_cpus=1, max_retries=0)(work).options(
            runtime_env={"env_vars": environment_for_workers()}, name=f"steerserve-{job_id}")
        ref = task.remote(job_id, request)
        self.tasks[job_id] = ref
        asyncio.get_running_loop().create_task(self._watch(job_id, ref, after))
        return {"id": job_id, "kind": kind, "status": "queued"}

    async def _watch(self, job_id: str, ref, after) -> None:
        import ray

        try:
            result = await ref
            if after is not None:
                await after(job_id, result)
        except (ray.exceptions.TaskCancelledError, asyncio.CancelledError):
            self.jobs.finish(job_id, "cancelled", message="cancelled")
        except Exception as err:
            cause = getattr(err, "cause", None) or err
            self.jobs.finish(job_id, "failed", error=f"{type(cause).__name__}: {cause}"[:2000])
        finally:
            self.tasks.pop(job_id, None)

    def _job(self, kind: str, job_id: str) -> dict:
        record = self.jobs.get(job_id)
        if record is None or record["kind"] != kind:
            raise ApiError(404, f"no {kind} job {job_id!r}", type="not_found_error", param="id")
        return record

    def _cancel(self, kind: str, job_id: str) -> dict:
        import ray

        record = self._job(kind, job_id)
        if record["status"] in FINISHED:
            return record
        ref = self.tasks.get(job_id)
        if ref is not None:
            ray.cancel(ref, force=True)
        self.jobs.finish(job_id, "cancelled", message="cancelled by the caller")
        return self._job(kind, job_id)

    @app.post("/v1/evaluations", status_code=202, openapi_extra=_request_body(EvaluationJobRequest))
    @counted("POST", "/v1/evaluations")
    async def create_evaluation(self, request: Request) -> dict:
        from dictionaries.store import DictionaryStore

        self._allow(request)
        body = await self._body(request, EvaluationJobRequest)
        store = DictionaryStore()
        if body.dictionary not in store:
            raise ApiError(404, f"no dictionary named {body.dictionary!r} in the store", type="not_found_error",
                           param="dictionary")
        for index, edit in enumerate(body.edits):
            if edit.dictionary not in store:
                raise ApiError(400, f"edits[{index}].dictionary: no dictionary named {edit.dictionary!r}",
                               param=f"edits[{index}].dictionary")
            if edit.feature >= store.config(edit.dictionary).d_sae:
                raise ApiError(400, f"edits[{index}].feature: {edit.feature} is out of range for {edit.dictionary!r}",
                               param=f"edits[{index}].feature")
        return self._launch("evaluation", run_evaluation, body.model_dump())

    @app.get("/v1/evaluations")
    @counted("GET", "/v1/evaluations")
    async def list_evaluations(self, request: Request) -> dict:
        self._allow(request)
        return {"object": "list", "data": self.jobs.list("evaluation")}

    @app.get("/v1/evaluations/{job_id}")
    @counted("GET", "/v1/evaluations/{job_id}")
    async def get_evaluation(self, job_id: str, request: Request) -> dict:
        self._allow(request)
        return self._job("evaluation", job_id)

    @app.delete("/v1/evaluations/{job_id}")
    @counted("DELETE", "/v1/evaluations/{job_id}")
    async def cancel_evaluation(self, job_id: str, request: Request) -> dict:
        self._allow(request)
        return self._cancel("evaluation", job_id)

    @app.post("/v1/trainings", status_code=202, openapi_extra=_request_body(TrainingJobRequest))
    @counted("POST", "/v1/trainings")
    async def create_training(self, request: Request) -> dict:
        from dictionaries.config import DictionaryError
        from dictionaries.store import validate_name

        self._allow(request, "admin")
        body = await self._body(request, TrainingJobRequest)
        try:
            validate_name(body.name)
        except DictionaryError as err:
            raise ApiError(400, str(err), param="name") from None
        if body.deploy and body.model not in self.models:
            raise ApiError(400, f"deploy: model {body.model!r} is not served here (served: {', '.join(self.models)})",
                           param="deploy")
        after = self._deploy_trained if body.deploy else None
        return self._launch("training", run_training, body.model_dump(), after)

    async def _deploy_trained(self, job_id: str, result: dict) -> None:
        model = self.jobs.get(job_id)["request"]["model"]
        deployed = []
        for entry in result["dictionaries"]:
            try:
                deployed.append(await self._deploy(entry["name"], model, True))
            except ApiError as err:
                deployed.append({"dictionary": entry["name"], "deployed": False, "error": err.message})
        self.jobs.update(job_id, result={**result, "deployments": deployed})

    @app.get("/v1/trainings")
    @counted("GET", "/v1/trainings")
    async def list_trainings(self, request: Request) -> dict:
        self._allow(request, "admin")
        return {"object": "list", "data": self.jobs.list("training")}

    @app.get("/v1/trainings/{job_id}")
    @counted("GET", "/v1/trainings/{job_id}")
    async def get_training(self, job_id: str, request: Request) -> dict:
        self._allow(request, "admin")
        return self._job("training", job_id)

    @app.delete("/v1/trainings/{job_id}")
    @counted("DELETE", "/v1/trainings/{job_id}")
    async def cancel_training(self, job_id: str, request: Request) -> dict:
        self._allow(request, "admin")
        return self._cancel("training", job_id)

    async def _first_with(self, name: str, call):
        last = None
        for handle in self.models.values():
            result = await call(handle)
            if "ok" in result:
                return result["ok"]
            last = result
            if result["error"]["error"]["param"] != "name":  # the dictionary is here; the error is about the call
                break
        return _unwrap(last)
