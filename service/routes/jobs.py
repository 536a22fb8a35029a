"""Job routes: evaluations (users) and trainings (admin) as Ray tasks with SQLite records.

Every job has an owner (the caller's key name): a user lists, reads and cancels only their
own jobs (someone else's is a 404, as if it did not exist), an admin sees all. A key may have
at most ``Limits.max_jobs_per_key`` jobs queued or running; past that, 429. Every database
call runs in a worker thread, never on the event loop, and gives up after a few seconds
with a 503 when the database stays locked, so a locked database slows only job routes.
"""

import asyncio
import logging
import re
import sqlite3

from fastapi import Request

from service.access import identity
from service.http import METRICS
from service.jobs import FINISHED, REQUEST_TIMEOUT_S, resolve_corpus
from service.launcher import JobLauncher
from service.protocol import SERVER_CORPUS, ApiError, EvaluationJobRequest, TrainingJobRequest, dictionary_name
from service.routes.table import route

logger = logging.getLogger(__name__)


class JobRoutes(JobLauncher):
    async def _records(self, fn, *args, **kwargs):
        """A job-store call in a worker thread; a database locked past the timeout is a 503."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except sqlite3.OperationalError as err:
            raise ApiError(503, f"the job records are busy ({err}); retry shortly", type="overloaded_error",
                           headers={"Retry-After": str(int(REQUEST_TIMEOUT_S))}) from None

    async def _count_jobs(self) -> None:
        """Set the jobs gauge from the records (at each /metrics scrape)."""
        counts = await self._records(self.jobs.counts)
        for kind in ("evaluation", "training"):
            for state in ("queued", "running", "succeeded", "failed", "cancelled"):
                METRICS.jobs.labels(kind=kind, state=state).set(counts.get((kind, state), 0))

    async def _job(self, request: Request, kind: str, job_id: str) -> dict:
        """The record, if the caller may see it (their own, or any for an admin); else 404."""
        owner, admin = identity(request.state.caller)
        record = await self._records(self.jobs.get, job_id)
        if record is None or record["kind"] != kind or not (admin or record["owner"] == owner):
            raise ApiError(404, f"no {kind} job {job_id[:64]!r}", type="not_found_error", param="id")
        return await self._reconciled(record)

    async def _list(self, request: Request, kind: str) -> dict:
        owner, admin = identity(request.state.caller)
        records = await self._records(self.jobs.list, kind, 100, None if admin else owner)
        return {"object": "list", "data": [await self._reconciled(record) for record in records]}

    async def _cancel(self, request: Request, kind: str, job_id: str) -> dict:
        import ray

        record = await self._job(request, kind, job_id)
        if record["status"] in FINISHED:
            return record
        ref = self.tasks.get(job_id)
        if ref is not None:
            ray.cancel(ref, force=True)
        await self._records(self.jobs.finish, job_id, "cancelled", message="cancelled by the caller")
        return await self._job(request, kind, job_id)

    @route("POST", "/v1/evaluations", role="user", errors=(400, 404, 409, 503), body=EvaluationJobRequest, ok=202)
    async def create_evaluation(self, request: Request) -> dict:
        from dictionaries.store import DictionaryStore
        from service.presets import merged_edits

        body = await self._body(request, EvaluationJobRequest)
        if body.model and "+" in body.model and body.model not in self.models:  # BASE+PRESET
            _, base, _, preset = self._steer(body.model)
            body = body.model_copy(update={"model": base, "edits": merged_edits(preset, body.edits)})
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
            if edit.positions == "generated":
                raise ApiError(400, f"edits[{index}].positions: an evaluation scores given text, which has no "
                                    "generated positions; use 'all' or 'prompt'", param=f"edits[{index}].positions")
        try:
            source = resolve_corpus(body.corpus, self.corpora)
        except ValueError as err:
            raise ApiError(400, f"corpus: {err}", param="corpus") from None
        model = body.model
        if model is None:  # the dictionary's own model when it is served here, else the default one
            trained_on = store.config(body.dictionary).model_name
            model = trained_on if trained_on in self.models else self.default_model
        elif model not in self.models:
            raise ApiError(400, f"model: evaluations run on the models this server serves ({', '.join(self.models)})",
                           param="model")
        work = {**body.model_dump(), "model": model, "corpus_source": source}
        return await self._launch("evaluation", "run_evaluation", work, identity(request.state.caller)[0])

    @route("GET", "/v1/evaluations", role="user", errors=(503,))
    async def list_evaluations(self, request: Request) -> dict:
        return await self._list(request, "evaluation")

    @route("GET", "/v1/evaluations/{job_id}", role="user", errors=(404, 503))
    async def get_evaluation(self, job_id: str, request: Request) -> dict:
        return await self._job(request, "evaluation", job_id)

    @route("DELETE", "/v1/evaluations/{job_id}", role="user", errors=(404, 503))
    async def cancel_evaluation(self, job_id: str, request: Request) -> dict:
        return await self._cancel(request, "evaluation", job_id)

    @route("POST", "/v1/trainings", role="admin", errors=(400, 503), body=TrainingJobRequest, ok=202)
    async def create_training(self, request: Request) -> dict:
        body = await self._body(request, TrainingJobRequest)
        dictionary_name(body.name)
        if body.model not in self.models:
            raise ApiError(400, f"model: trainings run on the models this server serves ({', '.join(self.models)})",
                           param="model")
        work = body.model_dump()
        for field in ("corpus", "heldout_corpus"):
            if work[field] is not None:
                work[field + "_source"] = self._training_corpus(work[field], field)
        return await self._launch("training", "run_training", work, identity(request.state.caller)[0],
                                  deploy=body.deploy)

    def _training_corpus(self, name: str, field: str) -> str:
        """The source a training corpus names: builtin and hf: corpora as given, else one this
        server exposes (the same names as evaluation jobs); a 400 naming ``field`` otherwise."""
        if re.fullmatch(SERVER_CORPUS, name):
            return name
        try:
            return resolve_corpus(name, self.corpora)
        except ValueError as err:
            raise ApiError(400, f"{field}: builtin:pydocs, hf: data sets, or: {err}", param=field) from None

    @route("GET", "/v1/trainings", role="admin", errors=(503,))
    async def list_trainings(self, request: Request) -> dict:
        return await self._list(request, "training")

    @route("GET", "/v1/trainings/{job_id}", role="admin", errors=(404, 503))
    async def get_training(self, job_id: str, request: Request) -> dict:
        return await self._job(request, "training", job_id)

    @route("DELETE", "/v1/trainings/{job_id}", role="admin", errors=(404, 503))
    async def cancel_training(self, job_id: str, request: Request) -> dict:
        return await self._cancel(request, "training", job_id)
