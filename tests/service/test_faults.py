"""Faults, each ending with the service serving correctly: a model replica killed under load, a
job's task killed, the job database held locked, the disk failing during an upload, and two
uploads of one name racing. On a keyed app of its own, loopback only, bounded loops."""

import hashlib
import json
import os
import resource
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

from dictionaries.config import DictionaryConfig
from dictionaries.format import save_dictionary
from dictionaries.sae import Dictionary
from dictionaries.store import DictionaryStore
from tests.conftest import report
from tests.service.conftest import ADMIN_KEY, USER_KEY, auth, start_keyed_app

APP = "faults"
DEFAULT = "pythia-tiny-l2"
USER, ADMIN = auth(USER_KEY), auth(ADMIN_KEY)


@pytest.fixture(scope="module")
def faults(server):
    from service.app import delete_app
    from service.model_server import Limits

    url = start_keyed_app(server, APP, limits=Limits(max_new_tokens=256, max_prompt_tokens=128, max_jobs_per_key=2,
                                                    job_cpus=0.5))
    yield url
    delete_app(APP)


def _replicas(deployment: str) -> list[dict]:
    from ray.serve.context import _get_global_client

    app = _get_global_client().get_serve_details()["applications"][APP]
    return [r for r in app["deployments"][deployment]["replicas"] if r["state"] == "RUNNING"]


def _generate(url, edits=(), **extra):
    return requests.post(url + "/v1/generate", headers=USER, timeout=120,
                         json={"prompt": "Return the number of", "max_new_tokens": 6, "edits": list(edits), **extra})


def _until(predicate, seconds: float, pause: float = 0.5):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    return predicate()


# --- a model replica killed under load ----------------------------------------------------------------

def test_a_model_replica_killed_under_load(faults):
    import ray

    [replica] = _replicas("model-pythia-tiny")
    outcomes, lock, stop = [], threading.Lock(), threading.Event()

    def client(i: int) -> None:
        stream = i % 2 == 0
        # client 0 streams long answers, so that a request is almost surely mid-stream when the replica dies
        length = {"max_new_tokens": 256, "ignore_eos": True} if i == 0 else {"max_new_tokens": 32}
        while not stop.is_set():
            body = {"prompt": "The default value is", "stream": stream, **length}
            try:
                answer = requests.post(faults + "/v1/generate", json=body, headers=USER, stream=stream, timeout=120)
                if stream and answer.status_code == 200:
                    lines = [line for line in answer.iter_lines(decode_unicode=True) if line]
                    outcome = "cut silently" if not lines else "done" if lines[-1] == "data: [DONE]" else (
                        "error event" if "error" in json.loads(lines[-1][6:]) else "cut silently")
                else:
                    outcome = answer.status_code
            except requests.RequestException as err:
                outcome = f"hung or lost: {type(err).__name__}"
            except Exception as err:  # noqa: BLE001 - anything else is counted too, never dropped
                outcome = f"cut silently: {type(err).__name__}"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    _until(lambda: len(outcomes) >= 6, 120)
    ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"))  # through Ray's API
    # The load runs on until a new replica serves: ray.kill only asks for the death, which can land
    # later on a busy machine, so "some requests after the kill" may all precede it. A new replica
    # running means the old one died, with the six clients' requests in flight on it.
    back = _until(lambda: [r for r in _replicas("model-pythia-tiny") if r["replica_id"] != replica["replica_id"]], 240)
    replaced_at = len(outcomes)
    _until(lambda: len(outcomes) >= replaced_at + 6, 180)
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert back, "the replica did not come back"
    report(f"replica killed: {len(outcomes)} requests; outcomes {sorted(map(str, outcomes))}")
    assert not [o for o in outcomes if isinstance(o, str) and o.startswith(("hung", "cut"))], outcomes
    assert set(outcomes) <= {200, 503, "done", "error event"}, outcomes
    assert {503, "error event"} & set(outcomes), outcomes  # the ones in flight ended with a clear error
    assert set(outcomes[replaced_at:]) <= {200, "done"}, outcomes[replaced_at:]  # and the new replica serves
    assert _until(lambda: _generate(faults, [{"dictionary": DEFAULT, "feature": 3, "op": "ablate"}]).status_code == 200,
                  120)
    assert requests.get(faults + "/healthz", timeout=60).json()["status"] == "ok"


def test_a_restarted_replica_serves_the_deployed_version_not_a_newer_upload(faults, tmp_path, pythia_tiny):
    """Upload and deploy v1, upload v2 without deploying it, kill the replica: the one that comes back
    serves v1 (the store kept it, pinned), as the rest of the fleet would; deploying serves v2."""
    import ray

    from editing.edits import EditSpec
    from editing.engine import Engine, GenerationRequest

    store, name = DictionaryStore(), "fault-restart"
    edit = {"dictionary": name, "feature": 3, "op": "set", "value": 6.0}
    v1 = _parts(tmp_path, 5, "v1")
    assert requests.put(f"{faults}/v1/dictionaries/{name}", files=v1, headers=ADMIN, timeout=120).status_code == 200
    deployed = requests.post(f"{faults}/v1/dictionaries/{name}/deploy", headers=ADMIN, timeout=180).json()
    first, served_path = deployed["sha256"], store.path(name)
    [expected] = Engine(pythia_tiny.model, pythia_tiny.tokenizer, {name: store.load(name)}).generate(
        [GenerationRequest("Return the number of", max_new_tokens=6, edits=(EditSpec(**edit),))])
    assert _generate(faults, [edit]).json()["tokens"] == expected.tokens
    second = requests.put(f"{faults}/v1/dictionaries/{name}", files=_parts(tmp_path, 6, "v2"), headers=ADMIN,
                          timeout=120).json()["sha256"]
    assert second != first and served_path.is_dir()  # kept: it is what the fleet serves

    [replica] = _replicas("model-pythia-tiny")
    ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"))
    assert _until(lambda: [r for r in _replicas("model-pythia-tiny") if r["replica_id"] != replica["replica_id"]], 240)
    assert _until(lambda: _generate(faults, [edit]).status_code == 200, 120)
    card = requests.get(faults + "/v1/models", headers=USER, timeout=60).json()["data"][0]
    report(f"replica restarted after a newer upload: serves {card['dictionary_sha256'][name][:12]}, deployed "
          f"{first[:12]}, uploaded since {second[:12]}")
    assert card["dictionary_sha256"][name] == first
    assert _generate(faults, [edit]).json()["tokens"] == expected.tokens
    assert requests.get(f"{faults}/v1/dictionaries/{name}", headers=USER, timeout=60).json()["sha256"] == first
    redeployed = requests.post(f"{faults}/v1/dictionaries/{name}/deploy", headers=ADMIN, timeout=180).json()
    assert set(redeployed["served"].values()) == {second}
    assert not served_path.exists()  # no longer served, no longer named: gone
    assert requests.delete(f"{faults}/v1/dictionaries/{name}/deploy", headers=ADMIN, timeout=180).status_code == 200
    assert name in store and not _leftovers(store, name)


# --- a job's task killed ----------------------------------------------------------------------------------

def _task_pids(job_id: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"steerserve-{job_id}" in (proc / "cmdline").read_bytes().decode("utf-8", "replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_a_killed_job_task_fails_the_job_with_a_reason(faults):
    created = requests.post(faults + "/v1/evaluations", headers=USER, timeout=60,
                            json={"dictionary": DEFAULT, "tokens": 2_000_000})
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    record = lambda: requests.get(f"{faults}/v1/evaluations/{job_id}", headers=USER, timeout=60).json()  # noqa: E731
    assert _until(lambda: record()["status"] == "running" and _task_pids(job_id), 180)
    for pid in _task_pids(job_id):
        os.kill(pid, signal.SIGKILL)
    final = _until(lambda: (r := record())["status"] != "running" and r, 120)
    report(f"job task killed: {final['status']}: {final['error']}")
    assert final["status"] == "failed" and final["error"]  # with the reason
    assert _generate(faults).status_code == 200


# --- the job database held locked -------------------------------------------------------------------

def test_a_locked_job_database_leaves_other_endpoints_responsive(faults):
    from service.jobs import jobs_path

    holder = sqlite3.connect(jobs_path(), isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    submitted = {}
    try:
        writer = threading.Thread(target=lambda: submitted.setdefault("answer", requests.post(
            faults + "/v1/evaluations", headers=USER, json={"dictionary": DEFAULT, "tokens": 1024}, timeout=120)))
        writer.start()
        time.sleep(0.5)  # the job write is now waiting for the lock
        during = [requests.get(faults + "/healthz", timeout=60).status_code,
                  requests.get(faults + "/v1/models", headers=USER, timeout=60).status_code,
                  _generate(faults).status_code,
                  requests.get(f"{faults}/v1/dictionaries/{DEFAULT}/features/1", headers=USER, timeout=60).status_code]
        still_waiting = writer.is_alive()
        writer.join(timeout=120)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    answer = submitted["answer"]
    report(f"database locked: other endpoints answered {during} while the job write waited; it got "
          f"{answer.status_code}")
    assert during == [200, 200, 200, 200] and still_waiting
    assert answer.status_code == 503 and int(answer.headers["Retry-After"]) >= 1
    assert answer.json()["error"]["type"] == "overloaded_error"
    again = requests.post(faults + "/v1/evaluations", headers=USER, json={"dictionary": DEFAULT, "tokens": 1024},
                          timeout=60)
    assert again.status_code == 202
    requests.delete(f"{faults}/v1/evaluations/{again.json()['id']}", headers=USER, timeout=60)


# --- uploads: a failing disk, and two uploads racing ----------------------------------------------------

def _parts(tmp_path: Path, seed: int, name: str) -> dict:
    config = DictionaryConfig(architecture="relu", d_in=128, d_sae=256, hook="blocks.3.hook_resid_post",
                              model_name="pythia-tiny")
    save_dictionary(Dictionary.random(config, seed=seed), tmp_path / name)
    return {part: (part, (tmp_path / name / part).read_bytes()) for part in ("config.json", "sae.safetensors")}


def _leftovers(store: DictionaryStore, name: str) -> list[str]:
    in_use = store.path(name).name if name in store else None
    objects = [p.name for p in (store.root / ".objects").iterdir() if p.name.startswith(name + ".") and p.name != in_use]
    staging = store.root / ".staging"
    return objects + [p.name for p in staging.iterdir() if name in p.name] if staging.is_dir() else objects


def test_a_disk_failing_during_an_upload_changes_nothing(faults, tmp_path):
    store, name = DictionaryStore(), "fault-disk"
    assert requests.put(f"{faults}/v1/dictionaries/{name}", files=_parts(tmp_path, 1, "good"), headers=ADMIN,
                        timeout=120).status_code == 200
    assert requests.post(f"{faults}/v1/dictionaries/{name}/deploy", headers=ADMIN, timeout=180).status_code == 200
    edit = [{"dictionary": name, "feature": 3, "op": "set", "value": 6.0}]
    before, version = _generate(faults, edit).json()["tokens"], store.version(name)

    [ingress] = _replicas("Ingress")
    soft, hard = resource.prlimit(ingress["pid"], resource.RLIMIT_FSIZE)
    resource.prlimit(ingress["pid"], resource.RLIMIT_FSIZE, (64 * 1024, hard))  # the disk "fills" at 64 KiB a file
    try:
        failed = requests.put(f"{faults}/v1/dictionaries/{name}", files=_parts(tmp_path, 2, "bad"), headers=ADMIN,
                              timeout=120)
    finally:
        resource.prlimit(ingress["pid"], resource.RLIMIT_FSIZE, (soft, hard))
    report(f"disk failed during an upload: {failed.status_code} {failed.json()['error']['message']}")
    assert failed.status_code == 507 and failed.json()["error"]["type"] == "server_error"
    assert store.version(name) == version and not _leftovers(store, name)
    assert _generate(faults, edit).json()["tokens"] == before  # the previous dictionary serves unchanged
    served = requests.get(f"{faults}/v1/dictionaries/{name}", headers=USER, timeout=60).json()
    assert served["sha256"] == version


def test_two_uploads_of_one_name_race(faults, tmp_path):
    store, name = DictionaryStore(), "fault-race"
    uploads = {seed: _parts(tmp_path, seed, f"race{seed}") for seed in (3, 4)}
    answers, barrier = {}, threading.Barrier(2)

    def upload(seed):
        barrier.wait()
        answers[seed] = requests.put(f"{faults}/v1/dictionaries/{name}", files=uploads[seed], headers=ADMIN, timeout=120)

    threads = [threading.Thread(target=upload, args=(seed,)) for seed in uploads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert all(answer.status_code == 200 for answer in answers.values()), [a.text for a in answers.values()]
    installed = (store.path(name) / "sae.safetensors").read_bytes()
    winners = [seed for seed, parts in uploads.items() if parts["sae.safetensors"][1] == installed]
    assert len(winners) == 1  # one version, whole
    config = json.loads((store.path(name) / "config.json").read_text())
    assert config == json.loads(uploads[winners[0]]["config.json"][1])
    assert not _leftovers(store, name)  # the loser's files are gone
    report(f"upload race: both answered 200; seed {winners[0]} won, sha256 "
          f"{hashlib.sha256(installed).hexdigest()[:12]}, nothing of the other left")
    deployed = requests.post(f"{faults}/v1/dictionaries/{name}/deploy", headers=ADMIN, timeout=180).json()
    assert deployed["sha256"] == hashlib.sha256(installed).hexdigest()
    assert set(deployed["served"].values()) == {deployed["sha256"]}
    assert _generate(faults, [{"dictionary": name, "feature": 1, "op": "ablate"}]).status_code == 200


def test_a_job_whose_end_meets_a_locked_database_still_finishes(faults):
    """The task's own write of its result fails (the lock outlasts its 30 s wait); the job must not
    stay ``running``: the ingress records the result from the task's return value once it can."""
    from service.jobs import jobs_path

    created = requests.post(faults + "/v1/evaluations", headers=USER, timeout=60,
                            json={"dictionary": DEFAULT, "tokens": 4096})
    job_id = created.json()["id"]
    record = lambda: requests.get(f"{faults}/v1/evaluations/{job_id}", headers=USER, timeout=60)  # noqa: E731
    assert _until(lambda: record().json()["status"] == "running", 180)
    holder = sqlite3.connect(jobs_path(), isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        time.sleep(40)  # the task finishes its windows meanwhile; its progress and result writes meet the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    final = _until(lambda: (r := record().json())["status"] not in ("queued", "running") and r, 120)
    report(f"job end met a locked database: {final['status']}")
    assert final["status"] == "succeeded" and final["result"]["ce"]["clean"]["mean"] > 0
