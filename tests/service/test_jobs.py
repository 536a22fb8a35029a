"""Evaluation and training jobs over HTTP: results, deploy on success, cancel, restarts."""

import time

import pytest
import requests

from dictionaries.store import DictionaryStore
from editing.evaluate import evaluate
from service.jobs import JobStore
from tests.service.conftest import SERVER

DEFAULT = "pythia-tiny-l2"


def _wait(url, kind, job_id, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:  # bounded polling of loopback
        record = requests.get(f"{url}/v1/{kind}/{job_id}", timeout=30).json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            return record
        time.sleep(0.5)
    pytest.fail(f"{kind} job {job_id} did not finish in {seconds} s")


def _deployed(url, record, seconds=120):
    """A finished training job's record once its deploy (which runs right after the task returns) is in."""
    deadline = time.time() + seconds
    while "deployments" not in (record["result"] or {}) and time.time() < deadline:
        time.sleep(0.5)
        record = requests.get(f"{url}/v1/trainings/{record['id']}", timeout=30).json()
    return record


def test_an_evaluation_job_equals_the_in_process_evaluator(server, pythia_tiny, default_dictionary):
    created = requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, "tokens": 2048,
                                                              "edits": [{"dictionary": DEFAULT, "feature": 5,
                                                                         "op": "scale", "value": 3.0}]}, timeout=30)
    assert created.status_code == 202 and created.json()["status"] == "queued"
    record = _wait(server, "evaluations", created.json()["id"])
    assert record["status"] == "succeeded", record["error"]
    assert record["progress"] == 1.0
    from editing.edits import EditSpec

    local = evaluate(pythia_tiny, {DEFAULT: default_dictionary[1]}, DEFAULT, tokens=2048,
                     edits=[EditSpec(dictionary=DEFAULT, feature=5, op="scale", value=3.0)])
    remote = record["result"]
    for run in ("clean", "spliced", "zero", "edited"):
        assert remote["ce"][run]["mean"] == pytest.approx(local["ce"][run]["mean"], abs=1e-5)
    assert remote["ce_loss_recovered"]["mean"] == pytest.approx(local["ce_loss_recovered"]["mean"], abs=1e-5)
    assert remote["fvu"]["mean"] == pytest.approx(local["fvu"]["mean"], abs=1e-6)
    listed = requests.get(server + "/v1/evaluations", timeout=30).json()["data"]
    assert record["id"] in [job["id"] for job in listed]


def test_bad_job_requests(server):
    missing = requests.post(server + "/v1/evaluations", json={"dictionary": "nope"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "dictionary"
    feature = requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, "edits": [
        {"dictionary": DEFAULT, "feature": 99999, "op": "ablate"}]}, timeout=30)
    assert feature.status_code == 400 and feature.json()["error"]["param"] == "edits[0].feature"
    assert requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, "tokens": 10}, timeout=30).status_code == 400
    assert requests.get(server + "/v1/evaluations/eval-nope", timeout=30).status_code == 404
    hook = requests.post(server + "/v1/trainings", json={"name": "x1", "hook": "layers.1"}, timeout=30)
    assert hook.status_code == 400 and hook.json()["error"]["param"] == "hook"
    name = requests.post(server + "/v1/trainings", json={"name": "../x", "hook": "blocks.1.hook_resid_post"}, timeout=30)
    assert name.status_code == 400 and name.json()["error"]["param"] == "name"
    dtype = requests.post(server + "/v1/trainings", json={"name": "x2", "hook": "blocks.1.hook_resid_post",
                                                          "dtype": "float16"}, timeout=30)
    assert dtype.status_code == 400 and dtype.json()["error"]["param"] == "dtype"
    target = requests.post(server + "/v1/trainings", json={"name": "x3", "hook": "blocks.1.hook_resid_post",
                                                           "architecture": "topk", "target_l0": [40]}, timeout=30)
    assert target.status_code == 400 and target.json()["error"]["param"] == "target_l0"
    for field in ("corpus", "heldout_corpus"):  # corpora the server exposes, never its file paths
        path = requests.post(server + "/v1/trainings", json={"name": "x4", "hook": "blocks.1.hook_resid_post",
                                                             field: "/etc/passwd"}, timeout=30)
        assert path.status_code == 400 and path.json()["error"]["param"] == field


def test_a_training_job_deploys_its_dictionary(server):
    store = DictionaryStore()
    if "job-trained" in store:
        requests.delete(server + "/v1/dictionaries/job-trained/deploy", timeout=120)
        store.delete("job-trained")
    body = {"name": "job-trained", "hook": "blocks.1.hook_resid_post", "architecture": "topk", "d_sae": [64],
            "k": [4], "tokens": 8192, "batch_size": 512, "deploy": True}
    created = requests.post(server + "/v1/trainings", json=body, timeout=30)
    assert created.status_code == 202, created.text
    record = _wait(server, "trainings", created.json()["id"])
    assert record["status"] == "succeeded", record["error"]
    record = _deployed(server, record)
    assert record["result"]["deployments"][0]["deployed"] is True
    assert record["result"]["dictionaries"][0]["metrics"]["l0"] <= 4
    answer = requests.post(server + "/v1/generate", json={"prompt": "Return the", "max_new_tokens": 4, "edits": [
        {"dictionary": "job-trained", "feature": 1, "op": "set", "value": 3.0}]}, timeout=60)
    assert answer.status_code == 200 and answer.json()["edit_report"][0]["dictionary"] == "job-trained"
    requests.delete(server + "/v1/dictionaries/job-trained/deploy", timeout=120)


def test_a_training_job_trains_on_a_registered_corpus_without_showing_its_path(server):
    """An admin-registered corpus is named in training jobs as in evaluation jobs; what the
    dictionary records of it (provenance, held-out metrics, feature statistics) reaches callers
    without the server's paths, as does the job record."""
    from tests.conftest import TEST_HOME
    from tests.service.conftest import REGISTERED

    name, store = "job-notes", DictionaryStore()
    if name in store:
        requests.delete(server + f"/v1/dictionaries/{name}/deploy", timeout=120)
        store.delete(name)
    body = {"name": name, "hook": "blocks.1.hook_resid_post", "architecture": "topk", "d_sae": [64], "k": [4],
            "tokens": 4096, "batch_size": 512, "context_length": 32, "corpus": "notes", "deploy": True}
    created = requests.post(server + "/v1/trainings", json=body, timeout=30)
    assert created.status_code == 202, created.text
    record = _wait(server, "trainings", created.json()["id"])
    assert record["status"] == "succeeded", record["error"]
    assert record["request"]["corpus"] == "notes" and "corpus_source" not in record["request"]
    record = _deployed(server, record)
    assert record["result"]["deployments"][0]["deployed"] is True
    # trained on the registered file (split by windows), measured on its held-out part
    stored = store.info(name)
    assert stored["config"]["provenance"]["config"]["corpus"] == f"{REGISTERED / 'notes.txt'}#train"
    assert stored["metrics"]["heldout_corpus"] == f"{REGISTERED / 'notes.txt'}#heldout"
    assert stored["metrics"]["l0"] <= 4 and stored["metrics"]["dead_window_tokens"] > 0
    detail = requests.get(server + f"/v1/dictionaries/{name}", timeout=30)
    feature = requests.get(server + f"/v1/dictionaries/{name}/features/1", timeout=30)
    for answer in (detail, feature, requests.get(server + f"/v1/trainings/{record['id']}", timeout=30)):
        assert answer.status_code == 200 and str(TEST_HOME) not in answer.text and "notes.txt" not in answer.text
    assert detail.json()["metrics"]["heldout_corpus"] == "<server path>"
    assert detail.json()["config"]["provenance"]["config"]["corpus"] == "<server path>"
    for field, value in (("corpus", "/etc/passwd"), ("corpus", "notes/../x"), ("heldout_corpus", "nope")):
        refused = requests.post(server + "/v1/trainings", json={**body, "name": "x5", field: value}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field
        assert str(REGISTERED) not in refused.text
    requests.delete(server + f"/v1/dictionaries/{name}/deploy", timeout=120)


def test_cancel_keeps_the_service_serving(server):
    created = requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, "tokens": 2_000_000}, timeout=30)
    job_id = created.json()["id"]
    cancelled = requests.delete(server + f"/v1/evaluations/{job_id}", timeout=60)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert _wait(server, "evaluations", job_id)["status"] == "cancelled"
    assert requests.get(server + "/healthz", timeout=30).json()["status"] == "ok"
    assert requests.post(server + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}, timeout=60).status_code == 200


def test_cli_runs_jobs_on_the_server(server):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=600, env={**os.environ})

    evaluated = cli("eval", "--dictionary", DEFAULT, "--tokens", "1024", "--server", server, "--wait", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "job" in evaluated.stdout and '"ce_loss_recovered"' in evaluated.stdout
    queued = cli("eval", "--dictionary", DEFAULT, "--tokens", "1024", "--server", server)
    assert queued.returncode == 0 and "follow it with" in queued.stdout
    trained = cli("train", "--server", server, "--wait", "--hook", "blocks.1.hook_resid_post", "--arch", "topk",
                  "--d-sae", "32", "--k", "2", "--tokens", "4096", "--batch-size", "512", "--name", "cli-job")
    assert trained.returncode == 0, trained.stderr
    assert '"cli-job"' in trained.stdout and "cli-job" in DictionaryStore()
    bad = cli("eval", "--dictionary", "nope", "--server", server)
    assert bad.returncode == 2 and "no dictionary named 'nope'" in bad.stderr


def test_jobs_survive_a_restart(server):
    from ray import serve

    from service.app import build_app

    finished = [job for job in requests.get(server + "/v1/evaluations", timeout=30).json()["data"]
                if job["status"] == "succeeded"]
    assert finished
    orphan = JobStore().create("evaluation", {"dictionary": DEFAULT, "tokens": 128})
    JobStore().start(orphan)  # as if it were running when the service stopped
    serve.run(build_app(SERVER["args"]), name="steerserve-test", route_prefix="/")
    kept = requests.get(server + f"/v1/evaluations/{finished[0]['id']}", timeout=30).json()
    assert kept["status"] == "succeeded" and kept["result"] == finished[0]["result"]
    failed = requests.get(server + f"/v1/evaluations/{orphan}", timeout=30).json()
    assert failed["status"] == "failed" and "restarted" in failed["error"]
    metrics = requests.get(server + "/metrics", timeout=30).text
    assert 'steerserve_jobs{kind="evaluation",state="succeeded"}' in metrics
