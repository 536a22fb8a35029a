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
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path

from service.redaction import redacted

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
DEFAULT_CORPORA = {"builtin:pydocs": "builtin:pydocs"}
"""The corpora evaluation jobs may name when the app config registers none: name -> source."""
REQUEST_TIMEOUT_S = 5.0
"""How long a request waits for a locked database before it answers 503 (it never blocks the loop)."""
PROGRESS_TIMEOUT_S = 1.0
"""How long a job's progress write waits for the lock before it skips that update."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0, message TEXT, result TEXT, error TEXT,
    created REAL NOT NULL, started REAL, finished REAL, owner TEXT, launcher TEXT
)"""
_COLUMNS_ADDED = (("owner", "TEXT"), ("launcher", "TEXT"))  # databases older than these columns get them
_ACTIVE = "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running')"
"""An owner's jobs the quota counts."""
PRIVATE_FIELDS = ("corpus_source", "heldout_corpus_source")
"""What the ingress adds to a job's request for its task (a registered corpus's server path):
kept in the record, never shown to callers."""
def resolve_corpus(name: str, corpora: dict[str, str]) -> str:
    """The corpus spec for an exposed corpus ``name`` (optionally ``name/train|heldout`` for a
    builtin one, or ``name#split``); ``ValueError`` naming only the exposed names otherwise."""
    from editing.corpora import SPLITS

    base, split = name, None
    if name not in corpora:
        if "#" in name:
            base, split = name.rsplit("#", 1)
        elif "/" in name:
            base, split = name.rsplit("/", 1)
    if base not in corpora or (split is not None and split not in SPLITS):
        exposed = ", ".join(sorted(corpora)) or "none"
        raise ValueError(f"this server exposes the corpora {exposed} (a builtin one also as NAME/train or "
                         f"NAME/heldout); the corpus named is not one of them")
    source = corpora[base]
    if split is None:
        return source
    return f"{source}/{split}" if source.startswith("builtin:") and "/" not in source else f"{source}#{split}"


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
            present = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in _COLUMNS_ADDED:
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _connect(self, timeout: float = 30.0) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @staticmethod
    def new_id(kind: str) -> str:
        return f"{kind[:4]}-{uuid.uuid4().hex[:16]}"

    def create(self, kind: str, request: dict, owner: str | None = None, launcher: str | None = None, *,
               job_id: str | None = None, limit: int | None = None) -> str | None:
        """A new ``queued`` record; with ``limit``, only if the owner has fewer than ``limit`` jobs
        queued or running — counted and inserted in one transaction, so concurrent submits of one
        key cannot pass the quota together (None when over it)."""
        job_id = job_id or self.new_id(kind)
        with self._connect(REQUEST_TIMEOUT_S) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if limit is not None and db.execute(_ACTIVE, (owner,)).fetchone()[0] >= limit:
                    db.execute("ROLLBACK")
                    return None
                db.execute("INSERT INTO jobs (id, kind, status, request, created, owner, launcher) "
                           "VALUES (?, ?, 'queued', ?, ?, ?, ?)", (job_id, kind, json.dumps(request), time.time(),
                                                                 owner, launcher))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return job_id

    def active(self, owner: str) -> int:
        """The owner's jobs that are queued or running (the quota counts these)."""
        with self._connect(REQUEST_TIMEOUT_S) as db:
            return db.execute(_ACTIVE, (owner,)).fetchone()[0]

    def progress(self, job_id: str, fraction: float, message: str) -> bool:
        """A job's progress; a write that finds the database locked is skipped (the next one
        will say more), never an error that stops the job."""
        try:
            with self._connect(PROGRESS_TIMEOUT_S) as db:
                db.execute("UPDATE jobs SET progress = ?, message = ? WHERE id = ?", (fraction, message, job_id))
            return True
        except sqlite3.OperationalError as err:
            logger.warning("job %s: progress not recorded (%s)", job_id, err)
            return False

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
        with self._connect(REQUEST_TIMEOUT_S) as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._public(row) if row else None

    def list(self, kind: str, limit: int = 100, owner: str | None = None) -> list[dict]:
        """The newest jobs of ``kind`` (only ``owner``'s when given)."""
        with self._connect(REQUEST_TIMEOUT_S) as db:
            if owner is None:
                rows = db.execute("SELECT * FROM jobs WHERE kind = ? ORDER BY created DESC LIMIT ?",
                                  (kind, limit)).fetchall()
            else:
                rows = db.execute("SELECT * FROM jobs WHERE kind = ? AND owner = ? ORDER BY created DESC LIMIT ?",
                                  (kind, owner, limit)).fetchall()
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
        return {"id": row["id"], "kind": row["kind"], "owner": row["owner"], "launcher": row["launcher"],
                "status": row["status"], "progress": row["progress"],
                "message": row["message"],
                "request": {k: v for k, v in json.loads(row["request"]).items() if k not in PRIVATE_FIELDS},
                "result": redacted(json.loads(row["result"])) if row["result"] else None, "error": row["error"],
                "created": row["created"], "started": row["started"], "finished": row["finished"]}


# --- the work (Ray tasks) ------------------------------------------------------------------------

def run_evaluation(job_id: str, request: dict) -> dict:
    """Evaluate a stored dictionary (and edits) as the CLI does; progress goes to the record."""
    import torch

    from dictionaries.statistics import max_activations
    from dictionaries.store import DictionaryStore
    from dictionaries.vectors import VectorStore
    from editing.edits import EditSpec, dictionaries_named, vectors_named
    from editing.evaluate import evaluate
    from editing.model import load_model

    torch.set_num_threads(1)
    jobs = JobStore()
    if not jobs.start(job_id):
        return {}
    jobs.progress(job_id, 0.0, "loading the model")
    store = DictionaryStore()
    edits = [EditSpec(**edit) for edit in request.get("edits", [])]
    names = {request["dictionary"]} | dictionaries_named(edits)
    loaded = load_model(request["model"], progress=False)  # a served model, checked at submission
    dictionaries = {name: store.load(name) for name in names}
    feature_max = {name: maxima for name in names if (maxima := max_activations(store.path(name))) is not None}
    vectors = {name: VectorStore().load(name) for name in vectors_named(edits)}
    report = evaluate(loaded, dictionaries, request["dictionary"], edits=edits, corpus=request["corpus_source"],
                      tokens=request["tokens"], targets=request.get("target_tokens") or None, vectors=vectors,
                      feature_max=feature_max, progress=lambda fraction, message: jobs.progress(job_id, fraction, message))
    report["corpus"] = request["corpus"]  # the name the caller used, not the server's source
    _finish_or_leave_it(jobs, job_id, report, "done")
    return report


def _finish_or_leave_it(jobs: JobStore, job_id: str, result: dict, message: str) -> None:
    """Record success from the task; if the database is locked, the ingress that watches the task
    records it from the task's return value instead."""
    try:
        jobs.finish(job_id, "succeeded", progress=1.0, message=message, result=result)
    except sqlite3.OperationalError as err:
        logger.warning("job %s: result not recorded by the task (%s); the ingress records it", job_id, err)


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
    jobs.progress(job_id, 0.0, "loading the model")
    specs = sweep_specs(request["architecture"], request["d_sae"], l1=request.get("l1"), k=request["k"],
                        seeds=request["seeds"], target_l0=request.get("target_l0"))
    config = TrainConfig(hook=request["hook"], specs=tuple(specs), tokens=request["tokens"],
                         corpus=request.get("corpus_source") or request.get("corpus", "builtin:pydocs/train"),
                         heldout_corpus=request.get("heldout_corpus_source") or request.get("heldout_corpus"),
                         batch_size=request["batch_size"], learning_rate=request.get("learning_rate"),
                         context_length=request["context_length"], seed=request["seed"],
                         dtype=request.get("dtype", "auto"))
    loaded = load_model(request["model"], progress=False)

    def progress(fraction: float, record: dict) -> None:
        if record["step"] % 5 == 0:
            jobs.progress(job_id, min(0.99, fraction), f"step {record['step']}, {record['tokens']} tokens")

    published = train_and_publish(loaded, config, name=request["name"], progress=False, on_progress=progress)
    result = {"dictionaries": published}
    _finish_or_leave_it(jobs, job_id, result, "published")
    return result
