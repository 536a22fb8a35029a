"""Launching job tasks and seeing each through to a final state (a mixin of the ingress).

A job runs as a Ray task (``service.jobs.run_evaluation`` / ``run_training``); the ingress
that launched it keeps the task's reference and awaits it. Whatever happens to the task —
it returns, raises, is cancelled, or its worker dies — the watcher writes the final state,
retrying while the database is locked, so a job never stays ``running`` once its task is
gone. A record still ``queued``/``running`` whose launcher is this ingress but whose task it
no longer holds (the watcher itself could not write) is failed when it is next read.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from service.jobs import FINISHED
from service.protocol import ApiError
from service.redaction import redact_paths

logger = logging.getLogger(__name__)
FINISH_ATTEMPTS = 20
QUOTA_RETRY_S = 30


class JobLauncher:
    async def _launch(self, kind: str, work_name: str, request: dict, owner: str, deploy: bool = False) -> dict:
        """Record the job and start its task; past the owner's quota of queued and running jobs
        (counted as the record is inserted, so concurrent submits cannot pass it together), 429."""
        import ray

        from service import jobs
        from service.model_server import environment_for_workers

        # the id is held before the record exists: a listing that reads the new record meanwhile
        # must not take it for a job whose task is gone (see _reconciled)
        job_id = self.jobs.new_id(kind)
        self.tasks[job_id] = None
        try:
            created = await self._records(self.jobs.create, kind, request, owner, self.launcher_id, job_id=job_id,
                                          limit=self.limits.max_jobs_per_key)
        except BaseException:
            self.tasks.pop(job_id, None)
            raise
        if created is None:
            self.tasks.pop(job_id, None)
            limit = self.limits.max_jobs_per_key
            raise ApiError(429, f"you have {limit} jobs queued or running, the most a key may have: wait for one "
                                "to finish or cancel one", type="rate_limit_error",
                           headers={"Retry-After": str(QUOTA_RETRY_S)})
        task = ray.remote(num_cpus=self.limits.job_cpus, max_retries=0)(getattr(jobs, work_name)).options(
            runtime_env={"env_vars": environment_for_workers()}, name=f"steerserve-{job_id}")
        ref = task.remote(job_id, request)
        self.tasks[job_id] = ref
        asyncio.get_running_loop().create_task(self._watch(job_id, ref, deploy))
        return {"id": job_id, "kind": kind, "owner": owner, "status": "queued"}

    async def _watch(self, job_id: str, ref, deploy: bool) -> None:
        import ray

        try:
            try:
                result = await ref
            except (ray.exceptions.TaskCancelledError, asyncio.CancelledError):
                await self._finish(job_id, "cancelled", message="cancelled")
                return
            except Exception as err:  # the task raised, or its worker died (killed, out of memory)
                cause = getattr(err, "cause", None) or err
                reason = f"{type(cause).__name__}: {cause}" if cause is not err else f"{type(err).__name__}: {err}"
                await self._finish(job_id, "failed", error=redact_paths(reason)[:2000])
                return
            if result:  # the task's own record of success may have met a locked database
                await self._finish(job_id, "succeeded", progress=1.0, message="done", result=result)
            if deploy and result:
                await self._deploy_trained(job_id, result)
        finally:
            self.tasks.pop(job_id, None)

    async def _finish(self, job_id: str, status: str, **fields) -> None:
        """Write a final state, retrying while the database is locked."""
        for attempt in range(FINISH_ATTEMPTS):
            try:
                await asyncio.to_thread(self.jobs.finish, job_id, status, **fields)
                return
            except sqlite3.OperationalError as err:
                logger.warning("job %s: final state not written yet (%s)", job_id, err)
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
        logger.error("job %s: gave up writing its final state %s; it is failed when next read", job_id, status)

    async def _reconciled(self, record: dict) -> dict:
        """A record as it truly is: unfinished, launched here, and no task held for it means its
        task is gone and nothing will finish it — it failed."""
        if (record["status"] not in FINISHED and record.get("launcher") == self.launcher_id
                and record["id"] not in self.tasks):
            reason = "the job's task is gone and its end was not recorded"
            await self._records(self.jobs.finish, record["id"], "failed", error=reason)
            record = {**record, "status": "failed", "error": reason}
        return record

    async def _deploy_trained(self, job_id: str, result: dict) -> None:
        record = await self._records(self.jobs.get, job_id)
        deployed = []
        for entry in result["dictionaries"]:
            try:
                deployed.append(await self._deploy(entry["name"], record["request"]["model"], True))
            except ApiError as err:
                deployed.append({"dictionary": entry["name"], "deployed": False, "error": err.message})
        await self._records(self.jobs.update, job_id, result={**result, "deployments": deployed})
