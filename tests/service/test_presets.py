"""Steering presets: stored edit lists selected as ``"model": "BASE+PRESET"`` by any client."""

import json

import pytest
import requests

from editing.edits import EditSpec
from editing.engine import GenerationRequest
from tests.conftest import TEST_HOME

DEFAULT = "pythia-tiny-l2"
EDITS = [{"dictionary": DEFAULT, "feature": 11, "op": "set", "value": 6.0},
         {"dictionary": "random-l1", "feature": 3, "op": "add", "value": 2.0}]


@pytest.fixture
def preset(server):
    from clients.client import Client

    client = Client(server)
    client.put_preset("test-formal", EDITS, description="a test preset")
    yield client
    try:
        client.delete_preset("test-formal")
    except Exception:
        pass


def test_a_preset_steers_any_openai_request(server, engine, preset):
    stored = json.loads((TEST_HOME / "presets" / "test-formal.json").read_text())  # plain JSON, never pickled
    assert stored["edits"][0]["feature"] == 11 and stored["model"] == "pythia-tiny"
    ids = engine.tokenizer("Return the number of", add_special_tokens=False)["input_ids"]
    own = [{"dictionary": DEFAULT, "feature": 2, "op": "ablate"}]
    body = {"model": "pythia-tiny+test-formal", "prompt": "Return the number of", "max_tokens": 0, "echo": True,
            "logprobs": 1, "edits": own}
    answer = requests.post(server + "/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["model"] == "pythia-tiny+test-formal"
    [steered] = engine.generate([GenerationRequest(tuple(ids), max_new_tokens=0, prompt_logprobs=True,
                                                   edits=tuple(EditSpec(**e) for e in EDITS + own))])
    assert out["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(steered.prompt_logprobs[1:], abs=1e-5)
    plain = requests.post(server + "/v1/completions", json={**body, "model": "pythia-tiny", "edits": []}, timeout=120).json()
    assert plain["choices"][0]["logprobs"]["token_logprobs"] != out["choices"][0]["logprobs"]["token_logprobs"]
    generated = requests.post(server + "/v1/generate", json={"model": "pythia-tiny+test-formal", "prompt": "class",
                                                             "max_new_tokens": 5}, timeout=120).json()
    [local] = engine.generate([GenerationRequest("class", max_new_tokens=5, edits=tuple(EditSpec(**e) for e in EDITS))])
    assert generated["tokens"] == local.tokens and len(generated["edit_report"]) == 2
    models = {m["id"]: m for m in preset.models()}
    assert models["pythia-tiny+test-formal"]["parent"] == "pythia-tiny" and "pythia-tiny" in models
    assert [p["name"] for p in preset.presets()] == ["test-formal"]
    assert preset.preset("test-formal")["description"] == "a test preset"


def test_preset_errors(server, preset):
    def status(method, path, body=None):
        answer = requests.request(method, server + path, json=body, timeout=60)
        return answer.status_code, answer.json()["error"]["param"] if answer.status_code >= 400 else None

    completion = {"prompt": "x", "max_tokens": 1}
    assert status("POST", "/v1/completions", {**completion, "model": "pythia-tiny+nope"}) == (404, "model")
    assert status("POST", "/v1/generate", {"prompt": "x", "model": "pythia-tiny+nope"}) == (404, "model")
    assert status("POST", "/v1/completions", {**completion, "model": "gpt-7+test-formal"}) == (404, "model")
    assert status("GET", "/v1/presets/nope") == (404, "name")
    assert status("DELETE", "/v1/presets/nope") == (404, "name")
    assert status("PUT", "/v1/presets/pythia-tiny", {"edits": EDITS}) == (409, "name")  # a model's name
    assert status("PUT", "/v1/presets/Bad+Name", {"edits": EDITS}) == (400, "name")
    assert status("PUT", "/v1/presets/x", {"edits": []}) == (400, "edits")
    assert status("PUT", "/v1/presets/x", {"edits": EDITS, "model": "gpt-7"}) == (404, "model")
    undeployed = [{"dictionary": "not-deployed", "feature": 1, "op": "ablate"}]
    assert status("PUT", "/v1/presets/x", {"edits": undeployed}) == (400, "edits[0].dictionary")
    too_far = [{"dictionary": DEFAULT, "feature": 5000, "op": "ablate"}]
    assert status("PUT", "/v1/presets/x", {"edits": too_far}) == (400, "edits[0].feature")
    # a preset whose dictionary is no longer served (written behind the API's back, as after an undeploy)
    from service.presets import PresetStore

    PresetStore(TEST_HOME / "presets").put("stale", {"model": "pythia-tiny", "edits": undeployed, "description": ""})
    try:
        assert status("POST", "/v1/completions", {**completion, "model": "pythia-tiny+stale"}) == (409, "model")
        assert status("POST", "/v1/generate", {"prompt": "x", "model": "pythia-tiny+stale"}) == (409, "model")
    finally:
        PresetStore(TEST_HOME / "presets").delete("stale")
    # the request's own edits keep their own numbering after the preset's
    bad_own = {**completion, "model": "pythia-tiny+test-formal",
               "edits": [{"dictionary": DEFAULT, "feature": 5000, "op": "ablate"}]}
    assert status("POST", "/v1/completions", bad_own) == (400, "edits[0].feature")
    schema = requests.get(server + "/openapi.json", timeout=30).json()
    for method, statuses in (("put", ("400", "404", "409")), ("get", ("404",)), ("delete", ("404",))):
        declared = schema["paths"]["/v1/presets/{name}"][method]["responses"]
        assert all(declared[s]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
                   for s in statuses)


def test_presets_need_the_admin_role_with_keys(server):
    """With API keys configured, PUT and DELETE need an admin key, GET a user key."""
    from ray import serve

    from service.app import AppArgs, ModelArgs, build_app
    from service.model_server import Limits

    args = AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT], torch_threads=1)],
                   api_keys=[{"key": "user-key", "role": "user", "name": "u"}, {"key": "admin-key", "role": "admin", "name": "a"}],
                   limits=Limits(max_new_tokens=8))
    serve.run(build_app(args), name="presets-keys", route_prefix="/keyed")
    base = server + "/keyed"
    try:
        user, admin = {"Authorization": "Bearer user-key"}, {"Authorization": "Bearer admin-key"}
        body = {"edits": [EDITS[0]]}
        assert requests.put(base + "/v1/presets/keyed", json=body, headers=user, timeout=60).status_code == 403
        assert requests.put(base + "/v1/presets/keyed", json=body, timeout=60).status_code == 401
        assert requests.put(base + "/v1/presets/keyed", json=body, headers=admin, timeout=60).status_code == 200
        assert requests.get(base + "/v1/presets/keyed", headers=user, timeout=60).status_code == 200
        assert requests.delete(base + "/v1/presets/keyed", headers=user, timeout=60).status_code == 403
        assert requests.delete(base + "/v1/presets/keyed", headers=admin, timeout=60).status_code == 200
    finally:
        serve.delete("presets-keys")


def test_an_evaluation_job_reports_the_edit_effect_of_a_preset(server, pythia_tiny, default_dictionary, preset):
    """``model: BASE+PRESET`` on an evaluation: the preset's edits, then the request's, with the
    edit effect on the given target tokens; equal to the in-process evaluator."""
    import time

    from editing.evaluate import evaluate

    own = [{"dictionary": DEFAULT, "feature": 3, "op": "ablate"}]
    body = {"dictionary": DEFAULT, "tokens": 1024, "model": "pythia-tiny+test-formal", "edits": own,
            "target_tokens": [" list", " the"]}
    created = requests.post(server + "/v1/evaluations", json=body, timeout=30)
    assert created.status_code == 202, created.text
    deadline = time.time() + 300
    while time.time() < deadline:  # bounded polling of loopback
        record = requests.get(f"{server}/v1/evaluations/{created.json()['id']}", timeout=30).json()
        if record["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    assert record["status"] == "succeeded", record["error"]
    effect = record["result"]["edit_effect"]
    assert [e["feature"] for e in effect["edits"]] == [11, 3, 3] and effect["targets_from"] == "given"
    assert [t["token"] for t in effect["targets"]] == [" list", " the"]
    dictionaries = {DEFAULT: default_dictionary[1], "random-l1": preset_dictionary()}
    local = evaluate(pythia_tiny, dictionaries, DEFAULT, tokens=1024, targets=[" list", " the"],
                     edits=[EditSpec(**e) for e in EDITS + own])["edit_effect"]
    assert effect["target_effect"]["mean"] == pytest.approx(local["target_effect"]["mean"], abs=1e-5)
    assert effect["side_effect"]["kl_heldout"]["mean"] == pytest.approx(local["side_effect"]["kl_heldout"]["mean"],
                                                                        rel=1e-4)
    bad = requests.post(server + "/v1/evaluations", json={**body, "model": "pythia-tiny+nope"}, timeout=30)
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"


def preset_dictionary():
    from dictionaries.store import DictionaryStore

    return DictionaryStore().load("random-l1")


def test_cli_manages_presets(server, capsys):
    from clients.cli import main

    conditional = f"{DEFAULT}:5:set:2@generated,unit=max,when=random-l1:3>0.5"
    assert main(["preset", "put", "cli-demo", "--edit", f"{DEFAULT}:11:set:6", "--edit", f"{DEFAULT}:3:ablate@prompt",
                 "--edit", conditional, "--description", "from the CLI", "--server", server]) == 0
    assert '"model": "pythia-tiny+cli-demo"' in capsys.readouterr().out
    assert main(["preset", "list", "--server", server]) == 0
    listed = capsys.readouterr().out
    assert "pythia-tiny+cli-demo" in listed and f"{DEFAULT}:3:ablate@prompt" in listed and "from the CLI" in listed
    assert conditional in listed  # units and conditions are listed in the form --edit takes
    assert main(["preset", "show", "cli-demo", "--server", server]) == 0
    from editing.edits import EditSpec

    shown = json.loads(capsys.readouterr().out)["edits"][1]
    assert EditSpec(**shown) == EditSpec(dictionary=DEFAULT, feature=3, op="ablate", positions="prompt")
    assert main(["preset", "rm", "cli-demo", "--server", server]) == 0
    assert main(["preset", "rm", "cli-demo", "--server", server]) == 2  # a 404: one line, no traceback
    assert "no preset named" in capsys.readouterr().err
