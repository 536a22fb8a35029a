"""Issue 14's fixes through the running app: exposed corpora and models only, versioned
redeploys, job owners and quotas, chunked bodies, uploads' metrics, the router's own errors
in the envelope, evaluations that refuse generated-position edits, one registry an app."""


import pytest
import requests

from dictionaries.config import DictionaryConfig
from dictionaries.format import save_dictionary
from dictionaries.sae import Dictionary
from dictionaries.store import DictionaryStore
from editing.edits import EditSpec
from editing.engine import Engine, GenerationRequest
from tests.service.conftest import ADMIN_KEY, OTHER_KEY, USER_KEY, auth, start_keyed_app

DEFAULT = "pythia-tiny-l2"


def _files(tmp_path, seed: int, name: str, metrics: str | None = None) -> dict:
    config = DictionaryConfig(architecture="relu", d_in=128, d_sae=128, hook="blocks.3.hook_resid_post",
                              model_name="pythia-tiny")
    save_dictionary(Dictionary.random(config, seed=seed), tmp_path / name)
    files = {part: (part, (tmp_path / name / part).read_bytes()) for part in ("config.json", "sae.safetensors")}
    if metrics is not None:
        files["metrics.json"] = ("metrics.json", metrics.encode())
    return files


# --- 1. only the corpora and models the server exposes ---------------------------------------------

@pytest.mark.parametrize("field, value", [("corpus", "/etc"), ("corpus", "/"), ("corpus", "/no/such/dir"),
                                          ("corpus", "../../etc/passwd"), ("corpus", "hf:some/dataset"),
                                          ("model", "/etc"), ("model", "EleutherAI/pythia-70m-deduped")])
def test_evaluations_name_only_exposed_corpora_and_models(server, field, value):
    answer = requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, field: value}, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field
    for leak in ("exist", "directory", "file", "/etc", "passwd", "no/such"):
        assert leak not in error["message"].replace("builtin:pydocs/heldout", ""), error["message"]


def test_corpus_messages_are_the_same_whatever_was_named(server):
    messages = {requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, "corpus": name},
                              timeout=60).json()["error"]["message"] for name in ("/etc", "/", "/nonexistent")}
    assert len(messages) == 1


def test_a_registered_corpus_is_named_never_shown(server):
    """A corpus the admin registered is evaluated by its name; neither the job record nor a failed
    job's error shows its path on the server."""
    from tests.service.conftest import REGISTERED
    from tests.service.test_jobs import _wait

    created = requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, "corpus": "notes",
                                                              "tokens": 1024}, timeout=60)
    assert created.status_code == 202, created.text
    record = _wait(server, "evaluations", created.json()["id"])
    assert record["status"] == "succeeded", record["error"]
    assert record["request"]["corpus"] == "notes" and record["result"]["corpus"] == "notes"
    assert record["result"]["ce"]["clean"]["mean"] > 0
    failed = _wait(server, "evaluations", requests.post(server + "/v1/evaluations", timeout=60, json={
        "dictionary": DEFAULT, "corpus": "vanished", "tokens": 1024}).json()["id"])
    assert failed["status"] == "failed" and "<server path>" in failed["error"], failed["error"]
    listed = requests.get(server + "/v1/evaluations", timeout=60).text
    for record in (record, failed):
        shown = requests.get(f"{server}/v1/evaluations/{record['id']}", timeout=60).text
        assert str(REGISTERED) not in shown and "corpus_source" not in shown
    assert str(REGISTERED) not in listed and "corpus_source" not in listed


def test_an_evaluation_refuses_generated_position_edits(server):
    answer = requests.post(server + "/v1/evaluations", timeout=60, json={
        "dictionary": DEFAULT, "edits": [{"dictionary": DEFAULT, "feature": 2, "op": "ablate", "positions": "generated"}]})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "edits[0].positions"


# --- 3. a redeploy serves exactly the stored version -----------------------------------------------

def test_a_redeploy_serves_the_new_weights_and_says_which(server, tmp_path, pythia_tiny):
    name, store = "redeployed", DictionaryStore()
    edit = {"dictionary": name, "feature": 3, "op": "set", "value": 6.0}

    def expected():
        engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer, {name: store.load(name)})
        [result] = engine.generate([GenerationRequest("Return the number of", max_new_tokens=8,
                                                      edits=(EditSpec(**edit),))])
        return result.tokens

    def served():
        return requests.post(server + "/v1/generate", json={"prompt": "Return the number of", "max_new_tokens": 8,
                                                            "edits": [edit]}, timeout=120).json()["tokens"]
    try:
        first = requests.put(f"{server}/v1/dictionaries/{name}", files=_files(tmp_path, 21, "a"), timeout=120).json()
        deployed = requests.post(f"{server}/v1/dictionaries/{name}/deploy", timeout=180).json()
        assert deployed["sha256"] == first["sha256"] and set(deployed["served"].values()) == {first["sha256"]}
        assert served() == expected()
        second = requests.put(f"{server}/v1/dictionaries/{name}", files=_files(tmp_path, 22, "b"), timeout=120).json()
        assert second["sha256"] != first["sha256"]
        described = requests.get(f"{server}/v1/dictionaries/{name}", timeout=60).json()
        assert described["sha256"] == first["sha256"]  # what is served, until the deploy
        redeployed = requests.post(f"{server}/v1/dictionaries/{name}/deploy", timeout=180).json()
        assert redeployed["sha256"] == second["sha256"] and set(redeployed["served"].values()) == {second["sha256"]}
        assert requests.get(f"{server}/v1/dictionaries/{name}", timeout=60).json()["sha256"] == second["sha256"]
        listed = {d["name"]: d for d in requests.get(server + "/v1/dictionaries", timeout=60).json()["data"]}
        assert listed[name]["sha256"] == second["sha256"]
        assert served() == expected()  # the new weights, not the old ones
    finally:
        requests.delete(f"{server}/v1/dictionaries/{name}/deploy", timeout=180)


# --- 6. limits and parsing ------------------------------------------------------------------------------

def test_a_chunked_body_is_cut_off_at_the_limit(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"y" * 1024
        yield b'"}'

    answer = requests.post(server + "/v1/generate", data=chunks(), headers={"Content-Type": "application/json"},
                           timeout=60)
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "request_too_large"


def test_a_metrics_file_that_is_a_list_is_refused_and_listing_still_works(server, tmp_path):
    refused = requests.put(f"{server}/v1/dictionaries/listy-metrics", timeout=120,
                           files=_files(tmp_path, 5, "m", metrics="[1, 2, 3]"))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "metrics.json"
    assert "listy-metrics" not in DictionaryStore()
    assert requests.get(server + "/v1/dictionaries", timeout=60).status_code == 200


def test_an_upload_that_is_not_multipart_or_has_unknown_parts(server, tmp_path):
    plain = requests.put(f"{server}/v1/dictionaries/not-multipart", data=b"{}", timeout=60)
    assert plain.status_code == 400
    files = _files(tmp_path, 6, "u")
    files["evil.py"] = ("evil.py", b"print(1)")
    unknown = requests.put(f"{server}/v1/dictionaries/unknown-part", files=files, timeout=60)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "evil.py"
    store = DictionaryStore()
    assert "unknown-part" not in store and not list((store.root / ".staging").glob("upload-unknown-part*"))


@pytest.mark.parametrize("path", ["/v1/dictionaries/..%2F..%2Fetc/features/0", "/nope", "/v1/dictionaries/a/b/c/d"])
def test_unknown_routes_answer_in_the_envelope(server, path):
    answer = requests.get(server + path, timeout=60)
    assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found_error"


def test_a_wrong_method_answers_405_with_every_allowed_method(server):
    answer = requests.patch(f"{server}/v1/dictionaries/{DEFAULT}", timeout=60)
    assert answer.status_code == 405 and set(answer.json()) == {"error"}
    assert set(answer.headers["Allow"].split(", ")) == {"GET", "PUT"}
    options = requests.options(f"{server}/v1/dictionaries/{DEFAULT}/deploy", timeout=60)
    assert options.status_code == 405 and set(options.headers["Allow"].split(", ")) == {"POST", "DELETE"}


def test_the_schema_documents_the_envelope_for_every_error(server):
    schema = requests.get(server + "/openapi.json", timeout=60).json()
    assert schema["components"]["schemas"]["ErrorEnvelope"]["required"] == ["error"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorEnvelope"), (method, path, status)
            assert "500" in operation["responses"], (method, path)


# --- 4. job owners and quotas; 7. one registry an app --------------------------------------------------

@pytest.fixture(scope="module")
def keyed(server):
    from service.app import delete_app
    from service.model_server import Limits

    url = start_keyed_app(server, "owners", limits=Limits(max_jobs_per_key=2, job_cpus=0.5))
    yield url
    delete_app("owners")


def test_jobs_have_owners_and_a_quota(keyed):
    alice, bob, root = auth(USER_KEY), auth(OTHER_KEY), auth(ADMIN_KEY)
    body = {"dictionary": DEFAULT, "tokens": 2_000_000}
    mine = [requests.post(keyed + "/v1/evaluations", json=body, headers=alice, timeout=60) for _ in range(3)]
    assert [m.status_code for m in mine] == [202, 202, 429]
    assert int(mine[2].headers["Retry-After"]) >= 1 and mine[2].json()["error"]["type"] == "rate_limit_error"
    ids = [m.json()["id"] for m in mine[:2]]
    try:
        listed = requests.get(keyed + "/v1/evaluations", headers=alice, timeout=60).json()["data"]
        assert set(ids) <= {j["id"] for j in listed} and {j["owner"] for j in listed} == {"alice"}
        seen_by_bob = requests.get(keyed + "/v1/evaluations", headers=bob, timeout=60).json()["data"]
        assert {j["owner"] for j in seen_by_bob} <= {"bob"} and not set(ids) & {j["id"] for j in seen_by_bob}
        assert requests.get(f"{keyed}/v1/evaluations/{ids[0]}", headers=bob, timeout=60).status_code == 404
        assert requests.delete(f"{keyed}/v1/evaluations/{ids[0]}", headers=bob, timeout=60).status_code == 404
        seen_by_admin = {j["id"] for j in requests.get(keyed + "/v1/evaluations", headers=root, timeout=60).json()["data"]}
        assert set(ids) <= seen_by_admin
        assert requests.get(f"{keyed}/v1/evaluations/{ids[0]}", headers=alice, timeout=60).json()["owner"] == "alice"
        other = requests.post(keyed + "/v1/evaluations", json=body, headers=bob, timeout=60)
        assert other.status_code == 202  # the quota is a key's own
        ids.append(other.json()["id"])
        requests.delete(f"{keyed}/v1/evaluations/{ids[-1]}", headers=root, timeout=60)  # an admin cancels anyone's
        assert requests.get(f"{keyed}/v1/evaluations/{ids[-1]}", headers=bob, timeout=60).json()["status"] == "cancelled"
    finally:
        for job_id in ids[:2]:
            requests.delete(f"{keyed}/v1/evaluations/{job_id}", headers=alice, timeout=60)
    again = requests.post(keyed + "/v1/evaluations", json={**body, "tokens": 1024}, headers=alice, timeout=60)
    assert again.status_code == 202  # cancelled jobs no longer count
    requests.delete(f"{keyed}/v1/evaluations/{again.json()['id']}", headers=alice, timeout=60)


def test_one_registry_an_app_even_when_built_again(keyed):
    import ray
    from ray import serve

    from service.app import AppArgs, ModelArgs, build_app
    from service.model_server import Limits
    from tests.service.conftest import KEYS

    registries = lambda: sorted(a for a in ray.util.list_named_actors(all_namespaces=True)  # noqa: E731
                                if a["namespace"] == "steerserve" and a["name"] == "registry-owners")
    assert len(registries()) == 1
    args = AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT], torch_threads=1, num_cpus=0.25)],
                   api_keys=KEYS, limits=Limits(max_jobs_per_key=2, job_cpus=0.5))
    serve.run(build_app(args), name="owners", route_prefix="/owners")  # built and deployed again
    assert len(registries()) == 1
    answer = requests.post(keyed + "/v1/generate", json={"prompt": "x", "max_new_tokens": 2}, headers=auth(USER_KEY),
                           timeout=120)
    assert answer.status_code == 200


# --- 7. a deploy waits for every running replica, not only those that spoke lately ---------------------

def test_a_deploy_waits_for_a_running_replica_that_has_not_acknowledged(server):
    import ray

    from service.registry import Registry

    actor = Registry.remote()
    try:
        version = ray.get(actor.change.remote("m", "d", "f" * 64))
        ray.get(actor.ack.remote("m", "busy", version - 1, {}, {}))  # a replica still loading: an old version
        ray.get(actor.ack.remote("m", "quick", version, {"d": "f" * 64}, {}))
        progress = ray.get(actor.progress.remote("m", version, ["busy", "quick", "silent"]))
        assert progress["waiting"] == ["busy", "silent"] and progress["acknowledged"] == 1
        assert progress["replicas"] == 3 and progress["served"] == {"quick": {"d": "f" * 64}}
    finally:
        ray.kill(actor)


# --- 7. an upload the client abandons leaves nothing behind ------------------------------------------

def test_an_abandoned_upload_leaves_no_staging(server, tmp_path):
    import socket
    import time
    from urllib.parse import urlparse

    store, parts = DictionaryStore(), _files(tmp_path, 7, "abandon")
    body, content_type = requests.models.RequestEncodingMixin._encode_files(parts, {})
    address = urlparse(server)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall((f"PUT /v1/dictionaries/abandoned HTTP/1.1\r\nHost: {address.netloc}\r\n"
                      f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:4096])
        time.sleep(1.0)  # the server has begun to receive it
    deadline = time.time() + 60
    while time.time() < deadline and list((store.root / ".staging").glob("upload-abandoned*")):
        time.sleep(0.5)
    assert not list((store.root / ".staging").glob("upload-abandoned*")) and "abandoned" not in store
