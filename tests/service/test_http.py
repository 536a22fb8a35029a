"""The HTTP API of a real Ray Serve app, against the in-process engine."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from editing.edits import EditSpec
from editing.engine import GenerationRequest

DEFAULT = "pythia-tiny-l2"


def _post(url, path, body, **kwargs):
    return requests.post(url + path, json=body, timeout=120, **kwargs)


def test_unedited_greedy_is_the_plain_model(server, engine, pythia_tiny):
    body = {"prompt": "Return the number of", "max_new_tokens": 12}
    answer = _post(server, "/v1/generate", body)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    [local] = engine.generate([GenerationRequest("Return the number of", max_new_tokens=12)])
    ids = pythia_tiny.tokenizer("Return the number of", add_special_tokens=False)["input_ids"]
    plain = pythia_tiny.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=1,
                                       eos_token_id=None)[0, len(ids):].tolist()
    assert out["tokens"] == local.tokens == plain[: len(out["tokens"])]
    assert out["text"] == local.text == pythia_tiny.tokenizer.decode(out["tokens"])
    assert out["edit_report"] == [] and out["baseline"] is None and out["prompt_tokens"] == len(ids)


def test_edited_request_equals_the_engine(server, engine):
    edits = [{"dictionary": DEFAULT, "feature": 11, "op": "set", "value": 6.0},
             {"dictionary": "random-l1", "feature": 3, "op": "add", "value": 4.0, "positions": "generated"}]
    body = {"prompt": "If the file does not exist, the", "max_new_tokens": 10, "edits": edits,
            "include_baseline": True, "return_features": {"dictionary": DEFAULT, "top_k": 3}}
    out = _post(server, "/v1/generate", body).json()
    [local] = engine.generate([GenerationRequest(body["prompt"], max_new_tokens=10, include_baseline=True,
                                                 edits=tuple(EditSpec(**e) for e in edits),
                                                 return_features=(DEFAULT, 3))])
    assert out["tokens"] == local.tokens and out["text"] == local.text
    assert out["logprobs"] == pytest.approx(local.logprobs, abs=1e-5)
    assert out["baseline"] == {"text": local.baseline.text, "tokens": local.baseline.tokens}
    assert [r["positions_edited"] for r in out["edit_report"]] == [r["positions_edited"] for r in local.edit_report]
    assert out["edit_report"][1]["changed"] and len(out["features"]) == len(local.features)


def test_concurrent_requests_with_different_edits(server, engine):
    prompts = ["Return the number of", "class", "The default value is", "Raise an exception if",
               "def main(", "Return True if the", "This module provides", "An iterator over"]
    bodies = [{"prompt": p, "max_new_tokens": 8,
               "edits": [{"dictionary": DEFAULT, "feature": 5 + i, "op": "scale", "value": float(i + 1)}] if i % 2 else []}
              for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: _post(server, "/v1/generate", b), bodies))
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        [local] = engine.generate([GenerationRequest(body["prompt"], max_new_tokens=8,
                                                     edits=tuple(EditSpec(**e) for e in body["edits"]))])
        assert answer.json()["tokens"] == local.tokens, body


def test_streamed_completion_concatenates_to_the_plain_one(server):
    body = {"prompt": "The function returns", "max_tokens": 16, "temperature": 0.8, "seed": 7,
            "edits": [{"dictionary": DEFAULT, "feature": 2, "op": "ablate"}]}
    plain = _post(server, "/v1/completions", body).json()
    assert plain["object"] == "text_completion" and plain["usage"]["completion_tokens"] <= 16
    streamed = _post(server, "/v1/completions", {**body, "stream": True}, stream=True)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in streamed.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    scored = _post(server, "/v1/completions", {**body, "logprobs": 0, "stop": ["\n\n"]}).json()
    pieces = scored["choices"][0]["logprobs"]
    assert "".join(pieces["tokens"]) == scored["choices"][0]["text"]
    assert len(pieces["tokens"]) == len(pieces["token_logprobs"]) == scored["usage"]["completion_tokens"]
    assert "text_pieces" not in _post(server, "/v1/generate", {"prompt": "x", "max_new_tokens": 2}).json()


BAD = [
    ({"prompt": "x", "model": "gpt-7"}, 404, "model"),
    ({"prompt": "x", "edits": [{"dictionary": "nope", "feature": 1, "op": "ablate"}]}, 400, "edits[0].dictionary"),
    ({"prompt": "x", "edits": [{"dictionary": DEFAULT, "feature": 99999, "op": "ablate"}]}, 400, "edits[0].feature"),
    ({"prompt": "x", "edits": [{"dictionary": DEFAULT, "feature": 1, "op": "scale"}]}, 400, "edits[0]"),
    ({"prompt": "x", "edits": [{"dictionary": DEFAULT, "feature": 1, "op": "explode"}]}, 400, "edits[0].op"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "max_new_tokens": 65}, 400, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 0}, 400, "max_new_tokens"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "word " * 400}, 400, "prompt"),
    ({"prompt": "x", "edits": [{"dictionary": DEFAULT, "feature": i, "op": "ablate"} for i in range(9)]}, 400, "edits"),
    ({"prompt": "x", "return_features": {"dictionary": "nope", "top_k": 3}}, 400, "return_features.dictionary"),
    ({"prompt": "x", "surprise": 1}, 400, "surprise"),
    ({}, 400, "prompt"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_requests_get_4xx_naming_the_field(server, body, status, param):
    answer = _post(server, "/v1/generate", body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] and error["message"]
    assert requests.get(server + "/healthz", timeout=30).json()["status"] == "ok"


@pytest.mark.parametrize("raw, param", [
    ('{"prompt": "x", "temperature": NaN}', "temperature"),
    ('{"prompt": "x", "edits": [{"dictionary": "pythia-tiny-l2", "feature": 1, "op": "set", "value": Infinity}]}',
     "edits[0].value"),
    ('{"prompt": "x", ', None),
    ('[1, 2]', None),
])
def test_non_finite_numbers_and_malformed_json(server, raw, param):
    answer = requests.post(server + "/v1/generate", data=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param


def test_size_cap_and_unknown_resources(server):
    huge = requests.post(server + "/v1/generate", data=json.dumps({"prompt": "y" * 20000}),
                         headers={"Content-Type": "application/json"}, timeout=30)
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "request_too_large"
    assert requests.get(server + "/v1/dictionaries/nope", timeout=30).status_code == 404
    missing = requests.get(server + f"/v1/dictionaries/{DEFAULT}/features/5000", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "feature"
    assert requests.get(server + f"/v1/dictionaries/{DEFAULT}/features/x", timeout=30).status_code == 400
    inspect = _post(server, "/v1/inspect", {"text": "hello", "dictionary": "nope"})
    assert inspect.status_code == 404
    assert requests.get(server + "/healthz", timeout=30).status_code == 200


def test_descriptions(server, pythia_tiny):
    [model] = requests.get(server + "/v1/models", timeout=30).json()["data"]
    assert model["id"] == "pythia-tiny" and model["sha256"] == pythia_tiny.info.sha256
    assert model["dictionaries"] == [DEFAULT, "random-l1"]
    listed = {d["name"]: d for d in requests.get(server + "/v1/dictionaries", timeout=30).json()["data"]}
    assert listed[DEFAULT]["metrics"]["fvu"] < 0.15 and listed["random-l1"]["architecture"] == "jumprelu"
    detail = requests.get(server + f"/v1/dictionaries/{DEFAULT}", timeout=30).json()
    assert detail["config"]["format"] == "steerserve.dictionary/1" and "l0" in detail["metrics"]
    feature = requests.get(server + f"/v1/dictionaries/{DEFAULT}/features/3", timeout=30).json()
    context = feature["top_contexts"][0]
    assert context["text"] == "".join(t["token"] for t in context["tokens"])
    assert max(t["activation"] for t in context["tokens"]) == pytest.approx(context["max_activation"], abs=1e-5)
    assert len(feature["logit_lens"]["promoted"]) == 10
    inspect = _post(server, "/v1/inspect", {"text": "Return the number", "dictionary": DEFAULT, "top_k": 3}).json()
    assert [t["token"] for t in inspect["tokens"]] == ["Return", " the", " number"]
    schema = requests.get(server + "/openapi.json", timeout=30).json()
    body = schema["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "edits" in body["properties"] and "EditSpec" in schema["components"]["schemas"]
