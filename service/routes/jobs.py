"""Job routes: evaluations (users) and trainings (admin) as Ray tasks with SQLite records."""

import asyncio

from fastapi import Request

from service.http import app, counted, METRICS, _request_body
from service.jobs import FINISHED, run_evaluation, run_training
from service.protocol import ApiError, EvaluationJobRequest, TrainingJobRequest


class JobRoutes:
    def _count_jobs(self) -> None:
        """Set the jobs gauge from the records (at each /metrics scrape)."""
        counts = self.jobs.counts()
        for kind in ("evaluation", "training"):
            for state in ("queued", "running", "succeeded", "failed", "cancelled"):
                METRICS.jobs.labels(kind=kind, state=state).set(counts.get((kind, state), 0))

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
        from dictionaries.vectors import VectorStore

        vectors = VectorStore()
        for index, edit in enumerate(body.edits):
            if edit.vector is not None and edit.vector not in vectors:
                raise ApiError(400, f"edits[{index}].vector: no steering vector named {edit.vector!r}",
                               param=f"edits[{index}].vector")
            named = [("", edit.dictionary, edit.feature)] if edit.dictionary is not None else []
            if edit.when is not None:
                named.append((".when", edit.when.dictionary, edit.when.feature))
            for where, dictionary, feature in named:
                if dictionary not in store:
                    raise ApiError(400, f"edits[{index}]{where}.dictionary: no dictionary named {dictionary!r}",
                                   param=f"edits[{index}]{where}.dictionary")
                if feature >= store.config(dictionary).d_sae:
                    raise ApiError(400, f"edits[{index}]{where}.feature: {feature} is out of range for {dictionary!r}",
                                   param=f"edits[{index}]{where}.feature")
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
