"""Evaluation and training jobs: records in SQLite, work in Ray tasks, never in the request path.

    queued ─► running ─► succeeded | failed | cancelled

Records live in ``$STEERSERVE_HOME/jobs.sqlite`` (WAL mode; each process opens its own
connection). A job runs as a Ray task with its own CPU, so serving stays responsive; the
task writes its progress into the record. When the app starts, jobs left ``queued`` or
``running`` by a previous run are marked ``failed`` with the reason; finished jobs and their
results stay. The ingress keeps the task of each job it started, to cancel it and, for a
training job with ``deploy: true``, to deploy the new dictionary when it succeeds.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from pathlib import Path

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, message TEXT, result TEXT, error TEXT,
    created REAL NOT NULL, started REAL, finished REAL
)"""


def jobs_path() -> Path:
    home = os.environ.get("STEERSERVE_HOME") or Path.home() / ".cache" / "steerserve"
    return Path(home).expanduser() / "jobs.sqlite"


class JobStore:
    def __init__(self, path: Path | None = None):
        self.path = Path(path or jobs_path())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def create(self, kind: str, request: dict) -> str:
        job_id = f"{kind[:4]}-{uuid.uuid4().hex[:16]}"
        with self._connect() as db:
            db.execute("INSERT INTO jobs (id, kind, status, request, created) VALUES (?, ?, 'queued', ?, ?)",
                       (job_id, kind, json.dumps(request), time.time()))
        return job_id

    def start(self, job_id: str) -> bool:
        """queued → running; False if the job was cancelled or failed meanwhile."""
        with self._connect() as db:
            return bool(db.execute("UPDATE jobs SET status = 'running', started = ? WHERE id = ? AND status = 'queued'",
                                   (time.time(), job_id)).rowcount)

    def update(self, job_id: str, **fields) -> None:
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def finish(self, job_id: str, status: str, **fields) -> bool:
        """Move an unfinished job to a final state; False if it had already finished."""
        fields = {"status": status, "finished": time.time(), **fields}
        if fields.get("result") is not None:
            fields["result"] = json.dumps(fields["result"])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._connect() as db:
            changed = db.execute(f"UPDATE jobs SET {columns} WHERE id = ? AND status IN ('queued', 'running')",
                                 (*fields.values(), job_id)).rowcount
        return bool(changed)

    def get(self, job_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._public(row) if row else None

    def list(self, kind: str, limit: int = 100) -> list[dict]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE kind = ? ORDER BY created DESC LIMIT ?", (kind, limit)).fetchall()
        return [self._public(row) for row in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        with self._connect() as db:
            rows = db.execute("SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status").fetchall()
        return {(row["kind"], row["status"]): row["n"] for row in rows}

    def mark_interrupted(self) -> int:
        """Jobs a previous run of the service left unfinished: failed, with the reason."""
        with self._connect() as db:
            return db.execute(
                "UPDATE jobs SET status = 'failed', finished = ?, error = ? WHERE status IN ('queued', 'running')",
                (time.time(), "the service restarted while this job was queued or running")).rowcount

    @staticmethod
    def _public(row: sqlite3.Row) -> dict:
        return {"id": row["id"], "kind": row["kind"], "status": row["status"], "progress": row["progress"],
                "message": row["message"], "request": json.loads(row["request"]),
                "result": json.loads(row["result"]) if row["result"] else None, "error": row["error"],
                "created": row["created"], "started": row["started"], "finished": row["finished"]}


# --- the work (Ray tasks) ------------------------------------------------------------------------

def run_evaluation(job_id: str, request: dict) -> dict:
    """Evaluate a stored dictionary (and edits) as the CLI does; progress goes to the record."""
    import torch

    from dictionaries.store import DictionaryStore
    from editing.edits import EditSpec
    from editing.evaluate import evaluate
    from editing.model import load_model

    torch.set_num_threads(1)
    jobs = JobStore()
    if not jobs.start(job_id):
        return {}
    jobs.update(job_id, message="loading the model")
    store = DictionaryStore()
    edits = [EditSpec(**edit) for edit in request.get("edits", [])]
    names = {request["dictionary"]} | {edit.dictionary for edit in edits}
    model = request.get("model") or store.config(request["dictionary"]).model_name or "pythia-tiny"
    loaded = load_model(model, progress=False)
    dictionaries = {name: store.load(name) for name in names}
    report = evaluate(loaded, dictionaries, request["dictionary"], edits=edits, corpus=request["corpus"],
                      tokens=request["tokens"],
                      progress=lambda fraction, message: jobs.update(job_id, progress=fraction, message=message))
    jobs.finish(job_id, "succeeded", progress=1.0, message="done", result=report)
    return report


def run_training(job_id: str, request: dict) -> dict:
    """Train (a sweep of) dictionaries and publish them to the store; progress goes to the record."""
    import torch

    from dictionaries.training.ensemble import sweep_specs
    from dictionaries.training.pipeline import train_and_publish
    from dictionaries.training.trainer import TrainConfig
    from editing.model import load_model

    torch.set_num_threads(1)
    jobs = JobStore()
    if not jobs.start(job_id):
        return {}
    jobs.update(job_id, message="loading the model")
    specs = sweep_specs(request["architecture"], request["d_sae"], l1=request.get("l1"), k=request["k"],
                        seeds=request["seeds"], target_l0=request.get("target_l0"))
    config = TrainConfig(hook=request["hook"], specs=tuple(specs), tokens=request["tokens"],
                         corpus=request.get("corpus", "builtin:pydocs/train"),
                         heldout_corpus=request.get("heldout_corpus"),
                         batch_size=request["batch_size"], learning_rate=request.get("learning_rate"),
                         context_length=request["context_length"], seed=request["seed"],
                         dtype=request.get("dtype", "auto"))
    loaded = load_model(request["model"], progress=False)

    def progress(fraction: float, record: dict) -> None:
        if record["step"] % 5 == 0:
            jobs.update(job_id, progress=min(0.99, fraction), message=f"step {record['step']}, {record['tokens']} tokens")

    published = train_and_publish(loaded, config, name=request["name"], progress=False, on_progress=progress)
    result = {"dictionaries": published}
    jobs.finish(job_id, "succeeded", progress=1.0, message="published", result=result)
    return result
