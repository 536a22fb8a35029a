"""Upload and hot deployment on the running app: no restart, no failed requests in flight."""

import json
import threading

import pytest
import requests

from dictionaries.config import DictionaryConfig
from dictionaries.format import save_dictionary
from dictionaries.sae import Dictionary
from dictionaries.store import DictionaryStore
from editing.edits import EditSpec
from editing.engine import Engine, GenerationRequest


def _files(tmp_path, dictionary, name):
    path = tmp_path / name
    save_dictionary(dictionary, path)
    return {part: (part, (path / part).read_bytes()) for part in ("config.json", "sae.safetensors")}


def _random(seed, d_in=128, hook="blocks.3.hook_resid_post"):
    config = DictionaryConfig(architecture="relu", d_in=d_in, d_sae=128, hook=hook, model_name="pythia-tiny")
    return Dictionary.random(config, seed=seed)


@pytest.fixture()
def clean_store(server):
    """No test dictionaries deployed or stored before and after each test."""
    store = DictionaryStore()

    def clean():
        for name in ("hot-l3", "hot-other", "too-narrow"):
            requests.delete(server + f"/v1/dictionaries/{name}/deploy", timeout=120)
            if name in store:
                store.delete(name)

    clean()
    yield store
    clean()


def _generate(server, dictionary, **extra):
    return requests.post(server + "/v1/generate", json={"prompt": "Return the number of", "max_new_tokens": 6,
                                                        "edits": [{"dictionary": dictionary, "feature": 3, "op": "set",
                                                                   "value": 5.0}], **extra}, timeout=120)


def test_upload_deploy_use_undeploy(server, clean_store, tmp_path, pythia_tiny):
    hot = _random(11)
    assert _generate(server, "hot-l3").json()["error"]["param"] == "edits[0].dictionary"
    uploaded = requests.put(server + "/v1/dictionaries/hot-l3", files=_files(tmp_path, hot, "a"), timeout=120)
    assert uploaded.status_code == 200, uploaded.text
    assert _generate(server, "hot-l3").status_code == 400  # installed, not yet deployed
    deployed = requests.post(server + "/v1/dictionaries/hot-l3/deploy", timeout=120)
    assert deployed.status_code == 200 and deployed.json()["replicas"] >= 1, deployed.text

    answer = _generate(server, "hot-l3")
    assert answer.status_code == 200, answer.text
    local = Engine(pythia_tiny.model, pythia_tiny.tokenizer, {"hot-l3": DictionaryStore().load("hot-l3")})
    [expected] = local.generate([GenerationRequest("Return the number of", max_new_tokens=6,
                                                   edits=(EditSpec(dictionary="hot-l3", feature=3, op="set", value=5.0),))])
    assert answer.json()["tokens"] == expected.tokens
    assert "hot-l3" in [d["name"] for d in requests.get(server + "/v1/dictionaries", timeout=30).json()["data"]]

    gone = requests.delete(server + "/v1/dictionaries/hot-l3/deploy", timeout=120)
    assert gone.status_code == 200 and gone.json()["deployed"] is False
    refused = _generate(server, "hot-l3")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "edits[0].dictionary"


def test_a_corrupt_upload_leaves_the_serving_dictionary(server, clean_store, tmp_path):
    good = _random(12)
    assert requests.put(server + "/v1/dictionaries/hot-l3", files=_files(tmp_path, good, "good"), timeout=120).ok
    assert requests.post(server + "/v1/dictionaries/hot-l3/deploy", timeout=120).ok
    before = _generate(server, "hot-l3").json()["tokens"]

    files = _files(tmp_path, _random(13), "bad")
    files["sae.safetensors"] = ("sae.safetensors", files["sae.safetensors"][1][:200])  # truncated
    refused = requests.put(server + "/v1/dictionaries/hot-l3", files=files, timeout=120)
    assert refused.status_code == 400 and "refused" in refused.json()["error"]["message"]
    missing = requests.put(server + "/v1/dictionaries/hot-l3", files={"config.json": files["config.json"]}, timeout=120)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "sae.safetensors"
    bad_name = requests.put(server + "/v1/dictionaries/..%2Fx", files=_files(tmp_path, good, "c"), timeout=120)
    assert bad_name.status_code in (400, 404)

    assert _generate(server, "hot-l3").json()["tokens"] == before  # still the good one
    narrow = _random(14, d_in=64)
    assert requests.put(server + "/v1/dictionaries/too-narrow", files=_files(tmp_path, narrow, "n"), timeout=120).ok
    incompatible = requests.post(server + "/v1/dictionaries/too-narrow/deploy", timeout=120)
    assert incompatible.status_code == 400 and "d_in is 64" in incompatible.json()["error"]["message"]
    assert requests.post(server + "/v1/dictionaries/never-uploaded/deploy", timeout=120).status_code == 404


def test_a_stream_in_flight_survives_a_deploy(server, clean_store, tmp_path):
    assert requests.put(server + "/v1/dictionaries/hot-other", files=_files(tmp_path, _random(15), "o"), timeout=120).ok
    outcome = {}

    def stream():
        answer = requests.post(server + "/v1/completions", json={"prompt": "The default value is", "max_tokens": 48,
                                                                 "temperature": 0, "stream": True},
                               stream=True, timeout=120)
        lines = [line for line in answer.iter_lines(decode_unicode=True) if line]
        outcome["status"], outcome["lines"] = answer.status_code, lines

    worker = threading.Thread(target=stream)
    worker.start()
    deployed = requests.post(server + "/v1/dictionaries/hot-other/deploy", timeout=120)
    worker.join(timeout=120)
    assert deployed.status_code == 200
    assert outcome["status"] == 200 and outcome["lines"][-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in outcome["lines"][:-1])
    plain = requests.post(server + "/v1/completions", json={"prompt": "The default value is", "max_tokens": 48,
                                                            "temperature": 0}, timeout=120).json()
    assert text == plain["choices"][0]["text"]


def test_client_and_cli_push_deploy_undeploy(server, clean_store, tmp_path):
    import os
    import subprocess
    import sys

    from clients.client import Client
    from tests.conftest import REPO

    save_dictionary(_random(16), tmp_path / "cli")
    client = Client(server)
    assert client.push(str(tmp_path / "cli"), "hot-l3")["installed"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "clients.cli", *args, "--server", server], cwd=REPO,
                              capture_output=True, text=True, timeout=180, env={**os.environ})

    deployed = cli("deploy", "hot-l3")
    assert deployed.returncode == 0 and "is serving 'hot-l3'" in deployed.stdout, deployed.stderr
    assert _generate(server, "hot-l3").status_code == 200
    undeployed = cli("undeploy", "hot-l3")
    assert undeployed.returncode == 0 and "no longer serving" in undeployed.stdout
    pushed = cli("push", str(tmp_path / "cli"), "--name", "hot-other")
    assert pushed.returncode == 0 and "deploy it with" in pushed.stdout
    assert "steerserve_requests_total" in client.metrics()


def test_a_name_no_dictionary_may_have_is_a_400_for_deploy_and_undeploy(server):
    """Found by schemathesis: an undeploy of a name the store refuses (control characters) was a 500."""
    for method in ("POST", "DELETE"):
        for name in ("%F3%A1%B9%AC%07%1C%26Sh", "UPPER", "a..b"):
            answer = requests.request(method, f"{server}/v1/dictionaries/{name}/deploy", json={}, timeout=60)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "name", (method, name, answer.text)
    assert requests.get(server + "/healthz", timeout=60).json()["status"] == "ok"
