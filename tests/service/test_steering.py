"""Find and steer through HTTP: search by example, contrast, steering vectors, conditional and calibrated
edits, dictionary comparison — against the in-process computations, with their 4xx cases."""

import json
import subprocess
import sys

import pytest
import requests
import torch

from dictionaries.statistics import max_activations
from dictionaries.store import DictionaryStore
from editing.edits import EditSpec
from editing.engine import Engine, GenerationRequest
from tests.conftest import REPO

DEFAULT = "pythia-tiny-l2"
TEMPLATES = ["Return the {} of the object.", "If the {} is not given, raise an error.", "The {} must be a string.",
             "This function takes one {} and returns a list.", "Set the {} to None before calling it.",
             "A new {} is created for each call.", "The default {} is used when none is given.",
             "Pass the {} to the constructor.", "Each {} is checked in turn.", "Use the {} as the key."]


def _post(url, path, body, **kwargs):
    return requests.post(url + path, json=body, timeout=120, **kwargs)


def _healthy(url):
    assert requests.get(url + "/healthz", timeout=60).json()["status"] == "ok"


def _error(answer, status, param):
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"], error
    return error


@pytest.fixture(scope="module")
def local(pythia_tiny, served_dictionaries):
    """An in-process engine like the server's: its dictionaries, with their statistics."""
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer)
    for name, sae in served_dictionaries.items():
        engine.add_dictionary(name, sae, feature_max=max_activations(DictionaryStore().path(name)))
    return engine


@pytest.fixture(scope="module")
def vectors(server):
    """Clean up the steering vectors this module stores."""
    from dictionaries.vectors import VectorStore

    names = ["file-vs-value", "uploaded", "to-delete"]
    yield names
    store = VectorStore()
    for name in names:
        if name in store:
            store.delete(name)


def test_contrast_finds_the_features_and_its_vector_steers(server, local, pythia_tiny, vectors):
    body = {"dictionary": DEFAULT, "a": {"texts": [t.format("file") for t in TEMPLATES]},
            "b": {"texts": [t.format("value") for t in TEMPLATES]}, "direction": "a", "top_k": 5,
            "save_vector": "file-vs-value"}
    answer = _post(server, "/v1/contrast", body)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    # the same numbers as the computation in-process
    from editing.contrast import Contrast, activations

    sae, tokenizer = local.dictionaries[DEFAULT], pythia_tiny.tokenizer
    expected = Contrast(sae, "text")
    for side in ("a", "b"):
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in body[side]["texts"]]
        expected.add(side, *activations(pythia_tiny.model, sae.config.hook, ids, pythia_tiny.tokenizer.pad_token_id))
    ranked = expected.ranked(5, "a")
    assert [f["feature"] for f in out["features"]] == [f["feature"] for f in ranked]
    assert out["features"][0]["effect_size"] == pytest.approx(ranked[0]["effect_size"], rel=1e-4)
    top = out["features"][0]
    assert top["z"] > 3 and top["mean_a"] > 5 * top["mean_b"]  # a feature of ' file', significant
    assert out["sets"]["a"]["texts"] == 10 and out["unit"] == "text"
    assert torch.allclose(torch.tensor(out["vector"]["values"]), expected.difference_of_means(), atol=1e-4)
    # stored as a steering vector; adding it steers towards ' file'
    saved = requests.get(server + "/v1/vectors/file-vs-value", timeout=60).json()
    assert saved["hook"] == sae.config.hook and saved["provenance"]["contrast"]["dictionary"] == DEFAULT
    assert saved["values"] == pytest.approx(out["vector"]["values"], abs=1e-6)
    token = tokenizer(" file", add_special_tokens=False)["input_ids"][0]
    steered = _post(server, "/v1/generate", {"prompt": "If the", "max_new_tokens": 12, "include_baseline": True,
                                             "edits": [{"op": "vector", "vector": "file-vs-value", "value": 4.0}]}).json()
    assert steered["tokens"].count(token) >= 3 > steered["baseline"]["tokens"].count(token), steered["text"]
    [report] = steered["edit_report"]
    assert report["dictionary"] is None and report["vectors"][0]["mean_added_norm"] == pytest.approx(
        4.0 * saved["norm"], rel=1e-4)


def test_contrast_with_a_corpus_the_server_exposes(server):
    answer = _post(server, "/v1/contrast", {"dictionary": "random-l1", "a": {"texts": ["def main(argv):", "import os"]},
                                            "b": {"corpus": "builtin:pydocs/heldout", "tokens": 256},
                                            "include_vector": False, "top_k": 3})
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert out["sets"]["b"]["tokens"] == 256 and out["sets"]["b"]["texts"] == 2 and "vector" not in out
    assert len(out["features"]) == 3 and out["hook"] == "blocks.1.hook_resid_pre"


CONTRAST_BAD = [
    ({"dictionary": "nope", "a": {"texts": ["x y"]}, "b": {"texts": ["y z"]}}, 404, "dictionary"),
    ({"dictionary": DEFAULT, "a": {"corpus": "/etc/passwd"}, "b": {"texts": ["y"]}}, 400, "a.corpus"),
    ({"dictionary": DEFAULT, "a": {"corpus": "hf:wikitext"}, "b": {"texts": ["y"]}}, 400, "a.corpus"),
    ({"dictionary": DEFAULT, "a": {"texts": ["x"], "corpus": "builtin:pydocs"}, "b": {"texts": ["y"]}}, 400, "a"),
    ({"dictionary": DEFAULT, "a": {}, "b": {"texts": ["y"]}}, 400, "a"),
    ({"dictionary": DEFAULT, "a": {"texts": ["x"] * 257}, "b": {"texts": ["y"]}}, 400, "a.texts"),
    ({"dictionary": DEFAULT, "a": {"texts": ["word " * 300]}, "b": {"texts": ["y"]}}, 400, "a.texts[0]"),
    ({"dictionary": DEFAULT, "a": {"texts": ["one text"]}, "b": {"texts": ["y", "z"]}}, 400, "a"),
    ({"dictionary": DEFAULT, "a": {"corpus": "builtin:pydocs", "tokens": 10**6}, "b": {"texts": ["y"]}}, 400, "a.tokens"),
    ({"dictionary": DEFAULT, "a": {"texts": ["x"]}, "b": {"texts": ["y"]}, "top_k": 0}, 400, "top_k"),
    ({"dictionary": DEFAULT, "a": {"texts": ["x"]}, "b": {"texts": ["y"]}, "save_vector": "../up"}, 400, "save_vector"),
]


@pytest.mark.parametrize("body, status, param", CONTRAST_BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(CONTRAST_BAD)])
def test_contrast_refusals(server, body, status, param):
    _error(_post(server, "/v1/contrast", body), status, param)
    _healthy(server)


def test_oversized_contrast_bodies_and_token_totals(server, served_dictionaries):
    big = {"dictionary": DEFAULT, "a": {"texts": ["word " * 200] * 20}, "b": {"texts": ["y"]}}
    answer = _post(server, "/v1/contrast", big)  # over this server's body cap
    assert answer.status_code == 413 and answer.json()["error"]["type"] == "request_too_large"
    # a set's token total is capped too (reached with a larger body cap): checked on the replica's side
    from types import SimpleNamespace

    from service.protocol import MAX_CONTRAST_TOKENS, ApiError, ContrastSet
    from service.steering import Steering

    tokenizer = type("Words", (), {"__call__": lambda self, text, **_: {"input_ids": text.split()}})()
    stub = SimpleNamespace(loaded=SimpleNamespace(tokenizer=tokenizer), limits=SimpleNamespace(max_prompt_tokens=1024))
    side = ContrastSet(texts=["w " * 1000] * (MAX_CONTRAST_TOKENS // 1000 + 1))
    with pytest.raises(ApiError) as caught:
        Steering(stub)._side_texts(side, "b")
    assert caught.value.status == 400 and caught.value.param == "b.texts"
    _healthy(server)


def test_search_by_example(server, local, pythia_tiny):
    from editing.search import search_span

    text = "Return the number of arguments passed to the function."
    start = text.index("arguments")
    body = {"text": text, "dictionary": DEFAULT, "span": {"start": start, "end": start + 9}, "top_k": 5}
    answer = _post(server, "/v1/search", body)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    expected = search_span(pythia_tiny.model, pythia_tiny.tokenizer, local.dictionaries[DEFAULT], text,
                           (start, start + 9), feature_max=local.feature_max[DEFAULT], top_k=5)
    assert [h["feature"] for h in out["features"]] == [h["feature"] for h in expected["features"]]
    assert out["ranked_by"] == "relative" and out["span"]["text"] == " arguments"
    first = out["features"][0]
    assert first["relative"] == pytest.approx(first["activation"] / first["typical_max"], rel=1e-5)
    plain = _post(server, "/v1/search", {**body, "dictionary": "random-l1"}).json()  # no statistics
    assert plain["ranked_by"] == "activation" and "no feature statistics" in plain["note"]


SEARCH_BAD = [
    ({"text": "hello", "dictionary": "nope", "span": {"start": 0, "end": 2}}, 404, "dictionary"),
    ({"text": "hello", "dictionary": DEFAULT, "span": {"start": 0, "end": 99}}, 400, "span.end"),
    ({"text": "hello", "dictionary": DEFAULT, "span": {"start": 3, "end": 3}}, 400, "span.end"),
    ({"text": "hello", "dictionary": DEFAULT, "span": {"start": 0, "end": 9, "unit": "token"}}, 400, "span.end"),
    ({"text": "hello", "dictionary": DEFAULT, "span": {"start": -1, "end": 2}}, 400, "span.start"),
    ({"text": "hello", "dictionary": DEFAULT, "span": {"start": 0, "end": 2, "unit": "line"}}, 400, "span.unit"),
    ({"text": "hello", "dictionary": DEFAULT, "span": {"start": 0, "end": 2}, "top_k": 101}, 400, "top_k"),
    ({"text": "word " * 300, "dictionary": DEFAULT, "span": {"start": 0, "end": 2}}, 400, "text"),
    ({"text": "hello", "dictionary": DEFAULT}, 400, "span"),
]


@pytest.mark.parametrize("body, status, param", SEARCH_BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(SEARCH_BAD)])
def test_search_refusals(server, body, status, param):
    _error(_post(server, "/v1/search", body), status, param)
    _healthy(server)


def test_conditional_and_calibrated_edits_through_http(server, local):
    maxima = local.feature_max[DEFAULT]
    feature = int(maxima.argmax())
    edits = [{"dictionary": DEFAULT, "feature": feature, "op": "set", "value": 1.5, "value_unit": "max_activation",
              "when": {"dictionary": "random-l1", "feature": 3, "above": 0.05}},
             {"dictionary": "random-l1", "feature": 7, "op": "scale", "value": 3.0,
              "when": {"dictionary": "random-l1", "feature": 3, "below": 0.05}}]
    body = {"prompt": "If the file does not exist, the", "max_new_tokens": 8, "edits": edits}
    answer = _post(server, "/v1/generate", body)
    assert answer.status_code == 200, answer.text
    out = answer.json()
    [alone] = local.generate([GenerationRequest(body["prompt"], max_new_tokens=8,
                                                edits=tuple(EditSpec(**e) for e in edits))])
    assert out["tokens"] == alone.tokens and out["logprobs"] == pytest.approx(alone.logprobs, abs=1e-5)
    early, late = out["edit_report"]
    [condition] = early["features"][0]["conditions"]
    [calibrated] = late["features"][0]["conditions"]
    assert condition["eligible_positions"] == calibrated["eligible_positions"]
    assert condition["fired_positions"] + calibrated["fired_positions"] == condition["eligible_positions"]
    assert late["features"][0]["resolved_values"][0]["raw_value"] == pytest.approx(1.5 * float(maxima[feature]))


GENERATE_BAD = [
    ([{"dictionary": "random-l1", "feature": 1, "op": "ablate", "when": {"dictionary": DEFAULT, "feature": 1, "above": 0}}],
     "edits[0].when.dictionary"),  # a condition on a later layer
    ([{"dictionary": DEFAULT, "feature": 1, "op": "set", "value": 1, "value_unit": "max_activation"},
      {"dictionary": "random-l1", "feature": 1, "op": "set", "value": 1, "value_unit": "max_activation"}],
     "edits[1].value_unit"),  # no statistics
    ([{"dictionary": DEFAULT, "feature": 1, "op": "ablate", "when": {"dictionary": "nope", "feature": 1, "above": 0}}],
     "edits[0].when.dictionary"),
    ([{"dictionary": DEFAULT, "feature": 1, "op": "ablate", "when": {"dictionary": DEFAULT, "feature": 5000, "above": 0}}],
     "edits[0].when.feature"),
    ([{"dictionary": DEFAULT, "feature": 1, "op": "ablate", "when": {"dictionary": DEFAULT, "feature": 1}}], "edits[0].when"),
    ([{"dictionary": DEFAULT, "feature": 1, "op": "scale", "value": 2, "value_unit": "max_activation"}], "edits[0]"),
    ([{"op": "vector", "vector": "no-such-vector", "value": 1.0}], "edits[0].vector"),
    ([{"op": "vector", "vector": "../../etc/passwd", "value": 1.0}], "edits[0].vector"),
    ([{"op": "vector", "value": 1.0}], "edits[0]"),
]


@pytest.mark.parametrize("edits, param", GENERATE_BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(GENERATE_BAD)])
def test_new_edit_fields_refused_by_name(server, edits, param):
    _error(_post(server, "/v1/generate", {"prompt": "x", "max_new_tokens": 2, "edits": edits}), 400, param)
    _healthy(server)


def test_vectors_store_use_and_delete(server, local, pythia_tiny, vectors):
    values = torch.randn(128, generator=torch.Generator().manual_seed(3)).tolist()
    stored = requests.put(server + "/v1/vectors/uploaded", json={"hook": "blocks.1.hook_resid_pre", "values": values,
                                                                 "description": "random"}, timeout=60)
    assert stored.status_code == 200, stored.text
    assert stored.json()["d"] == 128 and stored.json()["provenance"]["description"] == "random"
    listed = {v["name"] for v in requests.get(server + "/v1/vectors", timeout=60).json()["data"]}
    assert "uploaded" in listed
    body = {"prompt": "The function returns", "max_new_tokens": 8,
            "edits": [{"op": "vector", "vector": "uploaded", "value": 2.0, "value_unit": "residual_norm",
                       "positions": "generated"}]}
    out = _post(server, "/v1/generate", body).json()
    from dictionaries.vectors import SteeringVector

    local.add_vector(SteeringVector("uploaded", "blocks.1.hook_resid_pre", torch.tensor(values)))
    [alone] = local.generate([GenerationRequest(body["prompt"], max_new_tokens=8, edits=(EditSpec(**body["edits"][0]),))])
    assert out["tokens"] == alone.tokens and out["logprobs"] == pytest.approx(alone.logprobs, abs=1e-5)
    # replacing a vector is seen by the next request; deleting it makes requests naming it a 400
    requests.put(server + "/v1/vectors/uploaded", json={"hook": "blocks.1.hook_resid_pre",
                                                        "values": [-v for v in values]}, timeout=60)
    assert _post(server, "/v1/generate", body).json()["tokens"] != out["tokens"]
    assert requests.delete(server + "/v1/vectors/uploaded", timeout=60).json()["deleted"] is True
    _error(_post(server, "/v1/generate", body), 400, "edits[0].vector")
    _healthy(server)


def test_vectors_through_completions_and_presets(server, local, vectors):
    """The OpenAI route (the one lm-evaluation-harness scores with) and presets serve the stored
    version of a vector too: its first use, a replacement and a deletion are seen at once."""
    from dictionaries.vectors import SteeringVector

    values = torch.randn(128, generator=torch.Generator().manual_seed(5)).tolist()
    put = lambda vals: requests.put(server + "/v1/vectors/to-delete", timeout=60,  # noqa: E731
                                    json={"hook": "blocks.2.hook_resid_pre", "values": vals})
    assert put(values).status_code == 200
    edit = {"op": "vector", "vector": "to-delete", "value": 3.0}
    text = "Return the number of items in the list."
    ids = tuple(local.tokenizer(text, add_special_tokens=False)["input_ids"])
    body = {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1, "edits": [edit]}

    def scored(vals):
        local.add_vector(SteeringVector("to-delete", "blocks.2.hook_resid_pre", torch.tensor(vals)))
        [alone] = local.generate([GenerationRequest(ids, max_new_tokens=0, prompt_logprobs=True,
                                                    edits=(EditSpec(**edit),))])
        return alone.prompt_logprobs[1:]

    answer = _post(server, "/v1/completions", body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(scored(values), abs=1e-5)
    # a preset holding the vector edit: stored, listed, and scoring as the edit itself does
    preset = requests.put(server + "/v1/presets/with-vector", json={"edits": [edit]}, timeout=60)
    assert preset.status_code == 200, preset.text
    try:
        via_preset = _post(server, "/v1/completions", {**body, "edits": [], "model": "pythia-tiny+with-vector"}).json()
        assert via_preset["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(scored(values), abs=1e-5)
        assert put([-v for v in values]).status_code == 200  # replaced: the next request sees it
        replaced = _post(server, "/v1/completions", body).json()
        assert replaced["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(scored([-v for v in values]),
                                                                                        abs=1e-5)
        assert requests.delete(server + "/v1/vectors/to-delete", timeout=60).status_code == 200
        _error(_post(server, "/v1/completions", body), 400, "edits[0].vector")
        assert _post(server, "/v1/completions", {**body, "edits": [],
                                                 "model": "pythia-tiny+with-vector"}).status_code == 409
    finally:
        requests.delete(server + "/v1/presets/with-vector", timeout=60)
    # a preset is checked as its use will be: an unknown vector, a condition on a later hook
    _error(requests.put(server + "/v1/presets/bad", json={"edits": [edit]}, timeout=60), 400, "edits[0].vector")
    later = [{"dictionary": "random-l1", "feature": 1, "op": "ablate",
              "when": {"dictionary": DEFAULT, "feature": 2, "above": 0.0}}]
    assert requests.put(server + "/v1/presets/bad", json={"edits": later}, timeout=60).status_code == 400
    _healthy(server)


VECTOR_BAD = [
    ("uploaded", {"hook": "blocks.1.hook_resid_pre", "values": [1.0] * 64}, 400, "values"),
    ("uploaded", {"hook": "blocks.9.hook_resid_pre", "values": [1.0] * 128}, 400, "hook"),
    ("uploaded", {"hook": "blocks.1.hook_mlp_out", "values": [1.0] * 128}, 400, "hook"),
    ("uploaded", {"hook": "blocks.1.hook_resid_pre", "values": [0.0] * 128}, 400, "values"),
    ("uploaded", {"hook": "blocks.1.hook_resid_pre", "values": []}, 400, "values"),
    ("Bad..Name", {"hook": "blocks.1.hook_resid_pre", "values": [1.0] * 128}, 400, "name"),
    ("uploaded", {"hook": "blocks.1.hook_resid_pre", "values": [1.0] * 128, "model": "gpt-7"}, 404, "model"),
]


@pytest.mark.parametrize("name, body, status, param", VECTOR_BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(VECTOR_BAD)])
def test_vector_refusals(server, vectors, name, body, status, param):
    _error(requests.put(server + f"/v1/vectors/{name}", json=body, timeout=60), status, param)
    _healthy(server)


def test_unknown_vectors(server):
    _error(requests.get(server + "/v1/vectors/nope", timeout=60), 404, "name")
    _error(requests.delete(server + "/v1/vectors/nope", timeout=60), 404, "name")
    _error(requests.get(server + "/v1/vectors/UPPER", timeout=60), 400, "name")


@pytest.fixture(scope="module")
def sweep(small_model):
    """Two members of one sweep in the server's store (they need no model to be compared)."""
    from dictionaries.training.ensemble import SaeSpec
    from dictionaries.training.pipeline import train_and_publish
    from dictionaries.training.trainer import TrainConfig

    store = DictionaryStore()
    config = TrainConfig(hook="blocks.1.hook_resid_post", specs=(SaeSpec("relu", 64, l1=1.0), SaeSpec("topk", 128, k=4)),
                         tokens=4096, batch_size=512, context_length=32)
    published = train_and_publish(small_model, config, name="compare-sweep", store=store, progress=False,
                                  heldout_windows_count=8, feature_windows=4)
    names = [entry["name"] for entry in published]
    yield names, {name: store.info(name)["metrics"] for name in names}
    for name in names:
        store.delete(name)


def test_compare_a_dictionary_with_itself(server):
    out = requests.get(server + f"/v1/dictionaries/{DEFAULT}/compare/{DEFAULT}?threshold=0.999&limit=1000", timeout=120).json()
    for side in ("decoder", "encoder"):
        assert out["mmcs"][side]["a_to_b"] == pytest.approx(1.0, abs=1e-5)
        assert out["mmcs"][side]["b_to_a"] == pytest.approx(1.0, abs=1e-5)
    matching = out["matching"]
    assert matching["pairs"] == 1024 and matching["mean_decoder_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert matching["above_threshold"] == 1024 and len(matching["data"]) == 1000
    assert all(pair["a"] == pair["b"] for pair in matching["data"])  # the identity matching
    rest = requests.get(server + f"/v1/dictionaries/{DEFAULT}/compare/{DEFAULT}?threshold=0.999&offset=1000",
                        timeout=120).json()["matching"]["data"]
    assert len(rest) == 24 and all(pair["a"] == pair["b"] for pair in rest)


def test_compare_sweep_members_matches_the_trainers_metrics(server, sweep):
    (first, second), metrics = sweep
    out = requests.get(server + f"/v1/dictionaries/{first}/compare/{second}?threshold=0.2&limit=5", timeout=120).json()
    decoder = out["mmcs"]["decoder"]
    assert decoder["a_to_b"] == pytest.approx(metrics[first]["mmcs"][second], abs=1e-6)
    assert decoder["b_to_a"] == pytest.approx(metrics[second]["mmcs"][first], abs=1e-6)
    assert decoder["a_to_b"] != pytest.approx(decoder["b_to_a"], abs=1e-3)
    assert first in out["mmcs"]["meaning"]["a_to_b"].split()[2]
    matching = out["matching"]
    assert matching["pairs"] == 64 and len(matching["data"]) <= 5
    cosines = [pair["decoder_cosine"] for pair in matching["data"]]
    assert cosines == sorted(cosines, reverse=True) and all(c >= 0.2 for c in cosines)
    assert out["warnings"] == [] and out["a"]["d_sae"] == 64 and out["b"]["d_sae"] == 128
    # the CLI prints a summary
    result = subprocess.run([sys.executable, "-m", "clients.cli", "compare", first, second, "--server", server,
                             "--threshold", "0.2", "--limit", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{first} -> {second} {decoder['a_to_b']:.4f}" in result.stdout
    assert f"{second} -> {first} {decoder['b_to_a']:.4f}" in result.stdout and "Hungarian" in result.stdout


COMPARE_BAD = [
    ("nope", DEFAULT, "", 404, "a"),
    (DEFAULT, "nope", "", 404, "b"),
    (DEFAULT, DEFAULT, "?threshold=1.5", 400, "threshold"),
    (DEFAULT, DEFAULT, "?threshold=nan", 400, "threshold"),
    (DEFAULT, DEFAULT, "?threshold=abc", 400, "threshold"),
    (DEFAULT, DEFAULT, "?limit=0", 400, "limit"),
    (DEFAULT, DEFAULT, "?offset=-1", 400, "offset"),
    (DEFAULT, DEFAULT, "?model=gpt-7", 404, "model"),
]


@pytest.mark.parametrize("a, b, query, status, param", COMPARE_BAD, ids=[f"{c[4]}-{i}" for i, c in enumerate(COMPARE_BAD)])
def test_compare_refusals(server, a, b, query, status, param):
    _error(requests.get(server + f"/v1/dictionaries/{a}/compare/{b}{query}", timeout=60), status, param)
    _healthy(server)


def test_compare_dictionaries_of_different_widths(server, sweep):
    (first, _), _ = sweep
    error = _error(requests.get(server + f"/v1/dictionaries/{DEFAULT}/compare/{first}", timeout=60), 400, "b")
    assert "different widths" in error["message"]


def test_every_new_route_documents_its_errors(server):
    schema = requests.get(server + "/openapi.json", timeout=60).json()
    routes = {("/v1/search", "post"): (400, 404, 413), ("/v1/contrast", "post"): (400, 403, 404, 413),
              ("/v1/vectors", "get"): (401, 500), ("/v1/vectors/{name}", "get"): (400, 404),
              ("/v1/vectors/{name}", "put"): (400, 403, 413), ("/v1/vectors/{name}", "delete"): (403, 404),
              ("/v1/dictionaries/{a}/compare/{b}", "get"): (400, 404)}
    for (path, method), statuses in routes.items():
        operation = schema["paths"][path][method]
        for status in statuses:
            content = operation["responses"][str(status)]["content"]["application/json"]["schema"]
            assert content == {"$ref": "#/components/schemas/ErrorEnvelope"}, (path, method, status)
    assert "error" in schema["components"]["schemas"]["ErrorEnvelope"]["properties"]
    for model in ("SearchRequest", "ContrastRequest", "ContrastSet", "Span", "VectorUpload", "Condition"):
        assert model in schema["components"]["schemas"], model
    edit = schema["components"]["schemas"]["EditSpec"]["properties"]
    assert {"when", "value_unit", "vector"} <= set(edit) and "vector" in json.dumps(edit["op"])


def test_concurrent_mixed_requests_get_their_solo_results(server, local, vectors):
    """Vector, conditional and calibrated edits beside plain requests, sent at once: each request is
    what the engine gives it alone."""
    from concurrent.futures import ThreadPoolExecutor

    from dictionaries.vectors import SteeringVector

    values = torch.randn(128, generator=torch.Generator().manual_seed(9)).tolist()
    assert requests.put(server + "/v1/vectors/to-delete", json={"hook": "blocks.2.hook_resid_post", "values": values},
                        timeout=60).status_code == 200
    local.add_vector(SteeringVector("to-delete", "blocks.2.hook_resid_post", torch.tensor(values)))
    when = {"dictionary": DEFAULT, "feature": 680, "above": 1.0}
    edit_sets = [[], [{"op": "vector", "vector": "to-delete", "value": 3.0}], [],
                 [{"op": "vector", "vector": "to-delete", "value": 0.5, "value_unit": "residual_norm", "when": when}],
                 [{"dictionary": DEFAULT, "feature": 403, "op": "set", "value": 2.0, "value_unit": "max_activation",
                   "when": when}], [],
                 [{"dictionary": "random-l1", "feature": 5, "op": "add", "value": 2.0,
                   "when": {"dictionary": "random-l1", "feature": 9, "below": 0.01}, "positions": "generated"}]]
    prompts = ["Return the number of", "Open the file and read the", "class", "If the value is not given, the",
               "This function takes one", "The default value is", "Raise an exception if the"]
    bodies = [{"prompt": p, "max_new_tokens": 10, "edits": e} for p, e in zip(prompts, edit_sets)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: _post(server, "/v1/generate", b), bodies))
    for body, answer in zip(bodies, answers):
        assert answer.status_code == 200, answer.text
        [alone] = local.generate([GenerationRequest(body["prompt"], max_new_tokens=10,
                                                    edits=tuple(EditSpec(**e) for e in body["edits"]))])
        assert answer.json()["tokens"] == alone.tokens, body
        assert answer.json()["logprobs"] == pytest.approx(alone.logprobs, abs=1e-4)


def test_evaluation_jobs_take_the_new_edits(server, vectors):
    import time

    def wait(job_id):
        deadline = time.time() + 300
        while time.time() < deadline:  # bounded polling of loopback
            record = requests.get(f"{server}/v1/evaluations/{job_id}", timeout=30).json()
            if record["status"] in ("succeeded", "failed", "cancelled"):
                return record
            time.sleep(0.5)
        pytest.fail("the evaluation did not finish")

    values = [1.0] * 128
    assert requests.put(server + "/v1/vectors/uploaded", json={"hook": "blocks.1.hook_resid_pre", "values": values},
                        timeout=60).status_code == 200
    edits = [{"op": "vector", "vector": "uploaded", "value": 0.5},
             {"dictionary": DEFAULT, "feature": 403, "op": "set", "value": 1.0, "value_unit": "max_activation",
              "when": {"dictionary": "random-l1", "feature": 3, "above": 0.0}}]
    created = requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, "tokens": 256, "edits": edits},
                            timeout=30)
    assert created.status_code == 202, created.text
    record = wait(created.json()["id"])
    assert record["status"] == "succeeded", record["error"]
    assert record["result"]["kl"]["edited"]["mean"] > 0 and len(record["result"]["edits"]) == 2
    for edit, param in (({"op": "vector", "vector": "nope", "value": 1.0}, "edits[0].vector"),
                        ({"dictionary": DEFAULT, "feature": 1, "op": "ablate",
                          "when": {"dictionary": "nope", "feature": 1, "above": 0}}, "edits[0].when.dictionary"),
                        ({"dictionary": DEFAULT, "feature": 1, "op": "ablate",
                          "when": {"dictionary": DEFAULT, "feature": 99999, "above": 0}}, "edits[0].when.feature")):
        _error(requests.post(server + "/v1/evaluations", json={"dictionary": DEFAULT, "edits": [edit]}, timeout=30),
               400, param)
    requests.delete(server + "/v1/vectors/uploaded", timeout=60)


def test_the_cli_commands(server, vectors, tmp_path):
    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "clients.cli", *args, "--server", server], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    found = cli("search", "Open the file and read the first line.", "--dictionary", DEFAULT, "--span", "4:8")
    assert "span ' the' (tokens 1..1)" in found and "of its max" in found
    (tmp_path / "a.txt").write_text("\n".join(t.format("file") for t in TEMPLATES))
    (tmp_path / "b.txt").write_text("\n".join(t.format("value") for t in TEMPLATES))
    contrast = cli("contrast", "--dictionary", DEFAULT, "--a-file", str(tmp_path / "a.txt"), "--b-file",
                   str(tmp_path / "b.txt"), "--top-k", "3", "--save-vector", "to-delete")
    assert "A 10 texts" in contrast and "saved as steering vector 'to-delete'" in contrast
    assert "to-delete" in cli("vectors", "list")
    steered = cli("generate", "If the value is not given, return the", "--max-new-tokens", "8",
                  "--edit", f"vector:to-delete:6,when={DEFAULT}:680>1", "--edit", f"{DEFAULT}:403:set:1@generated,unit=max")
    assert "vector:to-delete:6 when pythia-tiny-l2:680>1: added at" in steered and "403:set:1xmax" in steered
    bad = subprocess.run([sys.executable, "-m", "clients.cli", "contrast", "--dictionary", DEFAULT, "--server", server],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give set a" in bad.stderr


@pytest.fixture(scope="module")
def secure(server):
    from ray import serve

    from service.app import AppArgs, ModelArgs, build_app

    keys = [{"key": "steer-admin", "role": "admin"}, {"key": "steer-user", "role": "user"}]
    # no CPU reserved: the session's Ray has two, and evaluation jobs (one CPU each) must still fit
    app = build_app(AppArgs(models=[ModelArgs(name="pythia-tiny", dictionaries=[DEFAULT], torch_threads=1, num_cpus=0)],
                            api_keys=keys))
    serve.run(app, name="steer-secure", route_prefix="/steer-secure")
    yield server + "/steer-secure"
    serve.delete("steer-secure")


def test_reads_need_a_user_key_and_storing_vectors_an_admin(secure, vectors):
    user, admin = ({"Authorization": f"Bearer {key}"} for key in ("steer-user", "steer-admin"))
    search = {"text": "hello world", "dictionary": DEFAULT, "span": {"start": 0, "end": 5}}
    contrast = {"dictionary": DEFAULT, "a": {"texts": ["a b", "c d"]}, "b": {"texts": ["e f", "g h"]}}
    vector = {"hook": "blocks.2.hook_resid_post", "values": [1.0] * 128}
    assert requests.post(secure + "/v1/search", json=search, timeout=60).status_code == 401
    assert requests.post(secure + "/v1/search", json=search, headers=user, timeout=60).status_code == 200
    assert requests.post(secure + "/v1/contrast", json=contrast, headers=user, timeout=60).status_code == 200
    refused = requests.post(secure + "/v1/contrast", json={**contrast, "save_vector": "to-delete"}, headers=user, timeout=60)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert requests.put(secure + "/v1/vectors/to-delete", json=vector, headers=user, timeout=60).status_code == 403
    assert requests.get(secure + "/v1/vectors", headers=user, timeout=60).status_code == 200
    assert requests.get(secure + f"/v1/dictionaries/{DEFAULT}/compare/{DEFAULT}", headers=user,
                        timeout=120).status_code == 200
    assert requests.get(secure + f"/v1/dictionaries/{DEFAULT}/compare/{DEFAULT}", timeout=60).status_code == 401
    assert requests.put(secure + "/v1/vectors/to-delete", json=vector, headers=admin, timeout=60).status_code == 200
    assert requests.delete(secure + "/v1/vectors/to-delete", headers=user, timeout=60).status_code == 403
    assert requests.delete(secure + "/v1/vectors/to-delete", headers=admin, timeout=60).status_code == 200
    saved = requests.post(secure + "/v1/contrast", json={**contrast, "save_vector": "to-delete"}, headers=admin, timeout=60)
    assert saved.status_code == 200 and saved.json()["saved_vector"]["name"] == "to-delete"
