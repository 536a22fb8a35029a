"""Issue 14's fixes that need no server: keys and workers, rates, the client's streams and
retries, job progress under a locked database, corpora, the prefill's LM head, uploads' parsing."""

import io
import json
import sqlite3

import pytest
import requests

from clients.client import Client, StreamError
from service.access import AccessControl, parse_keys, require_keys_off_loopback, resolve_keys
from service.protocol import ApiError


# --- 2. keys never reach a runtime_env; no open server off loopback -------------------------------

def test_keys_are_not_in_any_worker_environment(monkeypatch):
    from service.model_server import environment_for_workers

    monkeypatch.setenv("STEERSERVE_API_KEYS", "secret-key-000111:admin")
    monkeypatch.setenv("STEERSERVE_API_KEYS_FILE", "/run/secrets/keys.json")
    env = environment_for_workers()
    assert "STEERSERVE_API_KEYS" not in env and "STEERSERVE_API_KEYS_FILE" not in env
    assert "secret-key-000111" not in json.dumps(env)
    resolved = resolve_keys([{"key": "secret-key-000111", "role": "admin", "name": "root"}])
    assert "secret-key-000111" not in json.dumps(resolved) and len(resolved[0]["digest"]) == 64
    control = AccessControl(resolved)  # the ingress works from digests alone
    assert control.authorize("Bearer secret-key-000111", "admin").name == "root"


def test_the_built_app_carries_no_key(monkeypatch):
    from service.app import AppArgs, build_app

    monkeypatch.setenv("STEERSERVE_API_KEYS", "secret-key-222333:admin")
    app = build_app(AppArgs())
    seen = []

    def walk(node, depth=0):
        if depth > 6:
            return
        seen.append(repr(node))
        for child in (getattr(node, "__dict__", {}) or {}).values():
            walk(child, depth + 1)
        if isinstance(node, (list, tuple)):
            for child in node:
                walk(child, depth + 1)
        if isinstance(node, dict):
            for child in node.values():
                walk(child, depth + 1)

    walk(app)
    assert not any("secret-key-222333" in text for text in seen)
    assert any("digest" in text for text in seen)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_no_open_server_off_loopback(host):
    with pytest.raises(ValueError, match="only listen on loopback"):
        require_keys_off_loopback(host, [])
    require_keys_off_loopback(host, [{"digest": "0" * 64}])  # with keys, anywhere
    require_keys_off_loopback("127.0.0.1", [])


def test_run_refuses_an_open_server_off_loopback_before_starting_anything(monkeypatch):
    import ray

    from service.app import AppArgs, run

    monkeypatch.delenv("STEERSERVE_API_KEYS", raising=False)
    monkeypatch.delenv("STEERSERVE_API_KEYS_FILE", raising=False)
    was_running = ray.is_initialized()
    with pytest.raises(ValueError, match="loopback"):
        run(AppArgs(), host="0.0.0.0", port=1)
    assert ray.is_initialized() == was_running  # it raised before starting anything


def test_build_app_refuses_when_serve_listens_off_loopback(monkeypatch):
    import service.app as app_module

    monkeypatch.delenv("STEERSERVE_API_KEYS", raising=False)
    monkeypatch.delenv("STEERSERVE_API_KEYS_FILE", raising=False)
    monkeypatch.setattr(app_module, "serve_http_host", lambda: "0.0.0.0")  # as `serve run` of such a config
    with pytest.raises(ValueError, match="loopback"):
        app_module.build_app(app_module.AppArgs())
    app_module.build_app(app_module.AppArgs(api_keys=[{"key": "k" * 12, "role": "admin"}]))


def test_the_kuberay_manifest_takes_keys_from_a_secret_and_fences_the_dashboard():
    """Keys from a Secret; the dashboard reachable by the KubeRay operator only (it sends the Serve
    config there, so it cannot be on loopback), the world reaching the Serve port only."""
    import yaml

    from tests.conftest import REPO

    manifest, policy = yaml.safe_load_all((REPO / "deploy" / "kuberay.yaml").read_text())
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    ray_pods = policy["spec"]["podSelector"]["matchLabels"]
    open_rules = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [[p["port"] for p in rule["ports"]] for rule in open_rules] == [[8000]]  # the world: Serve only
    dashboard = [rule for rule in policy["spec"]["ingress"] if any(p["port"] == 8265 for p in rule.get("ports", []))]
    assert [source["podSelector"]["matchLabels"] for rule in dashboard for source in rule["from"]] == \
        [{"app.kubernetes.io/name": "kuberay-operator"}]
    among_ray = [rule for rule in policy["spec"]["ingress"] if "ports" not in rule]
    assert [source["podSelector"]["matchLabels"] for rule in among_ray for source in rule["from"]] == [ray_pods]
    assert all("namespaceSelector" not in source for rule in among_ray for source in rule["from"])
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert "STEERSERVE_API_KEYS" not in env and env["STEERSERVE_API_KEYS_FILE"]["value"].startswith("/")
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert any("secret" in v for v in volumes.values())
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["host"] == "0.0.0.0" and "api_keys" not in serve_config["applications"][0]["args"]


# --- 6. rates -----------------------------------------------------------------------------------

def test_a_rate_below_one_a_minute_still_lets_a_request_through():
    control = AccessControl([{"key": "slow-key-000", "rate_per_minute": 0.5}])
    assert control.authorize("Bearer slow-key-000", "user") is not None
    with pytest.raises(ApiError) as refused:
        control.authorize("Bearer slow-key-000", "user")
    assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 60


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), 0, -1, True, "10"])
def test_a_rate_that_is_not_a_positive_finite_number_is_refused(rate):
    with pytest.raises(ValueError, match="rate_per_minute"):
        parse_keys([{"key": "some-key-000", "rate_per_minute": rate}])


def test_key_names_are_unique():
    with pytest.raises(ValueError, match="already another key's"):
        parse_keys([{"key": "some-key-000", "name": "a"}, {"key": "some-key-111", "name": "a"}])


# --- 5. the client raises on a stream that did not finish -----------------------------------------

def _response(raw: bytes, status: int = 200) -> requests.Response:
    response = requests.models.Response()
    response.status_code, response.raw = status, io.BytesIO(raw)
    return response


def test_the_client_raises_on_a_stream_without_done():
    cut = _response(b'data: {"choices": [{"text": "Hello"}]}\n\n')
    with pytest.raises(StreamError, match="without \\[DONE\\]") as raised:
        list(Client._events(cut))
    assert raised.value.received == [{"choices": [{"text": "Hello"}]}]


def test_the_client_raises_on_an_error_event():
    broken = _response(b'data: {"choices": [{"text": "Hi"}]}\n\n'
                       b'data: {"error": {"type": "server_error", "message": "the stream broke", "param": null, '
                       b'"code": null}}\n\n')
    with pytest.raises(StreamError, match="the stream broke"):
        list(Client._events(broken))
    complete = _response(b'data: {"choices": [{"text": "Hi"}]}\n\ndata: [DONE]\n\n')
    assert list(Client._events(complete)) == [{"choices": [{"text": "Hi"}]}]


# --- 7. the client retries only what is safe to repeat ----------------------------------------------

def test_the_client_does_not_repeat_a_post_after_a_connection_error(monkeypatch):
    client = Client("http://127.0.0.1:9", retries=3, backoff=0.0)
    calls = []

    def refuse(method, url, **kwargs):
        calls.append(method)
        raise requests.ConnectionError("connection reset")

    monkeypatch.setattr(client.session, "request", refuse)
    with pytest.raises(requests.ConnectionError):
        client.evaluate("d")
    assert calls == ["POST"]
    calls.clear()
    with pytest.raises(requests.ConnectionError):
        client.job("evaluations", "eval-1")
    assert calls == ["GET"] * 4


def test_the_client_repeats_a_refused_post_after_retry_after(monkeypatch):
    client = Client("http://127.0.0.1:9", retries=2, backoff=0.0)
    answers = [_response(b'{"error": {}}', 503), _response(b'{"id": "eval-1"}', 202)]
    answers[0].headers["Retry-After"] = "0"
    monkeypatch.setattr(client.session, "request", lambda method, url, **kwargs: answers.pop(0))
    assert client.evaluate("d") == {"id": "eval-1"}


# --- 4. a progress write that meets a locked database is skipped, not fatal ---------------------------

def test_a_locked_database_does_not_stop_a_job(tmp_path):
    from service.jobs import JobStore

    jobs = JobStore(tmp_path / "jobs.sqlite")
    job_id = jobs.create("evaluation", {}, owner="alice")
    jobs.start(job_id)
    holder = sqlite3.connect(tmp_path / "jobs.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert jobs.progress(job_id, 0.5, "half") is False  # skipped, no exception
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert jobs.progress(job_id, 0.6, "more") is True
    assert jobs.get(job_id)["progress"] == 0.6 and jobs.active("alice") == 1 and jobs.active("bob") == 0


def test_an_old_database_gets_the_owner_column(tmp_path):
    from service.jobs import JobStore

    path = tmp_path / "jobs.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT "
                "NULL, progress REAL NOT NULL DEFAULT 0, message TEXT, result TEXT, error TEXT, created REAL NOT NULL, "
                "started REAL, finished REAL)")
    old.commit()
    old.close()
    jobs = JobStore(path)
    assert jobs.get(jobs.create("training", {}, owner="root"))["owner"] == "root"


# --- 1. corpora are the exposed ones, by name --------------------------------------------------------

def test_only_exposed_corpora_resolve():
    from service.jobs import DEFAULT_CORPORA, resolve_corpus

    assert resolve_corpus("builtin:pydocs", DEFAULT_CORPORA) == "builtin:pydocs"
    assert resolve_corpus("builtin:pydocs/heldout", DEFAULT_CORPORA) == "builtin:pydocs/heldout"
    assert resolve_corpus("notes#train", {"notes": "/srv/notes"}) == "/srv/notes#train"
    messages = set()
    for name in ("/etc", "/", "/nonexistent/path", "../x", "builtin:pydocs/secret", "hf:some/dataset", "notes"):
        with pytest.raises(ValueError) as refused:
            resolve_corpus(name, DEFAULT_CORPORA)
        messages.add(str(refused.value))
    assert len(messages) == 1  # one message whatever was named: nothing to learn about the file system
    assert "/etc" not in messages.pop()


# --- 6. the prefill keeps logits of the last prompt position only -------------------------------------

def test_the_prefill_computes_the_head_only_where_a_token_is_sampled(pythia_tiny):
    from editing.engine import Engine, GenerationRequest

    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    rows = []
    handle = pythia_tiny.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(tuple(args[0].shape)))
    try:
        prompts = ["Return the number of items in the list " * 4, "class", "The default value is None when " * 3]
        results = engine.generate([GenerationRequest(p, max_new_tokens=3, ignore_eos=True) for p in prompts])
    finally:
        handle.remove()
    prompt_tokens = sum(len(r.prompt_tokens) for r in results)
    assert all(len(shape) == 2 for shape in rows), rows  # (rows, d): never (rows, positions, d)
    assert sum(shape[0] for shape in rows) == sum(len(r.tokens) for r in results) == 9
    assert prompt_tokens > 9 * 3  # what keeping every prompt position would have cost


# --- 6. uploads: a metrics.json that is not an object is refused ---------------------------------------

def test_a_metrics_file_that_is_not_an_object_is_refused(tmp_path):
    from dictionaries.config import DictionaryConfig, DictionaryError
    from dictionaries.format import save_dictionary
    from dictionaries.sae import Dictionary
    from dictionaries.store import DictionaryStore

    config = DictionaryConfig(architecture="relu", d_in=16, d_sae=32, hook="blocks.0.hook_resid_post")
    save_dictionary(Dictionary.random(config, seed=0), tmp_path / "src")
    (tmp_path / "src" / "metrics.json").write_text("[1, 2, 3]")
    store = DictionaryStore(tmp_path / "store")
    with pytest.raises(DictionaryError, match="metrics.json: must be a JSON object"):
        store.put("listy", tmp_path / "src")
    assert store.names() == []


# --- 5. health reflects liveness, never waits for the model ----------------------------------------

def test_health_is_answered_while_the_engine_is_busy_and_fails_when_it_is_stuck():
    import threading
    import time

    from editing.engine.loop import EngineLoop

    class Idle:
        def has_work(self):
            return False

    loop = EngineLoop(Idle())
    release = threading.Event()
    try:
        busy = loop.call(release.wait)  # the engine's thread is inside a long piece of work
        time.sleep(0.3)
        answered = []
        checker = threading.Thread(target=lambda: answered.append(loop.alive(60.0)))
        checker.start()
        checker.join(timeout=30)
        assert answered == [True]  # answered without waiting for the work to end: it is alive
        assert not loop.alive(0.2)  # but a loop stuck longer than the bound is reported as such
        release.set()
        busy.result(timeout=30)
        deadline = time.monotonic() + 30
        while not loop.alive(0.2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.alive(0.2)
    finally:
        release.set()
        loop.stop()


# --- 4. a job quota that concurrent submits cannot pass together -----------------------------------

def test_concurrent_submits_of_one_key_never_pass_the_quota_together(tmp_path):
    import threading

    from service.jobs import JobStore

    store = JobStore(tmp_path / "jobs.sqlite")
    barrier, created = threading.Barrier(8), []

    def submit(owner):
        barrier.wait()
        created.append((owner, JobStore(store.path).create("evaluation", {}, owner, "here", limit=2)))

    threads = [threading.Thread(target=submit, args=("alice" if i % 4 else "bob",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    accepted = [owner for owner, job_id in created if job_id is not None]
    assert len(created) == 8 and sorted(accepted) == ["alice", "alice", "bob", "bob"]
    assert store.active("alice") == 2 and store.active("bob") == 2
    for job in store.list("evaluation", owner="alice"):
        store.finish(job["id"], "cancelled")
    assert store.create("evaluation", {}, "alice", "here", limit=2) is not None  # finished jobs no longer count
