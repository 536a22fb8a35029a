"""Feature search: the index on hand-made statistics (exact scores), on the default dictionary,
its cache, and GET /v1/dictionaries/{name}/features over HTTP with its 4xx cases."""

import pytest
import requests
import torch

from service.feature_search import FeatureIndex, FeatureIndexes, query_terms, token_spans

DEFAULT = "pythia-tiny-l2"
VOCAB = ["the", " file", " is", " open", " lineno", "[", "set", "]", " files"]


def _decode(ids):
    return "".join(VOCAB[int(i)] for i in ids)


def _stats():
    """Four features, two contexts of four tokens each (-1: no token), two promoted tokens."""
    tokens = torch.full((4, 2, 4), -1, dtype=torch.int32)
    acts = torch.zeros(4, 2, 4)
    tokens[0, 0] = torch.tensor([0, 1, 2, 3])  # "the file is open", firing on " file"
    acts[0, 0] = torch.tensor([0.0, 2.0, 0.5, 0.0])
    tokens[1, 0] = torch.tensor([0, 4, 2, 3])  # "the lineno is open", firing on " lineno"
    acts[1, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    tokens[2, 0] = torch.tensor([0, 1, 2, 3])  # holds " file" but fires on "the"
    acts[2, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    tokens[3, 0, :3] = torch.tensor([5, 6, 7])  # "[set]", firing on "set"
    acts[3, 0, :3] = torch.tensor([0.0, 3.0, 0.0])
    return {
        "density": torch.tensor([0.1, 0.2, 0.3, 0.4]),
        "mean_activation": torch.tensor([1.0, 0.5, 0.7, 2.0]),
        "context_tokens": tokens,
        "context_acts": acts,
        "context_max": acts.amax(-1),
        "lens_promoted": torch.tensor([[2, 3], [1, 2], [3, 2], [8, 2]], dtype=torch.int32),
        "lens_promoted_values": torch.tensor([[0.9, 0.8], [0.7, 0.6], [0.5, 0.4], [0.3, 0.2]]),
        "lens_suppressed": torch.zeros(4, 2, dtype=torch.int32),
        "lens_suppressed_values": torch.zeros(4, 2),
    }


def test_scores_follow_the_documented_formula():
    index = FeatureIndex.build(_stats(), _decode)
    found = index.search("file")
    scores = {hit["feature"]: hit["score"] for hit in found["data"]}
    # f1: its first promoted token is " file" (2·1.0); f0: fires on "file" at its maximum (1.0) in one
    # context (+0.1); f3: promotes " files", a prefix match at half weight (0.5·2·1.0); f2: holds
    # "file" where it does not fire (0 + 0.1).
    assert [hit["feature"] for hit in found["data"]] == [1, 0, 3, 2]
    assert scores == pytest.approx({1: 2.0, 0: 1.1, 3: 1.0, 2: 0.1})
    assert found["matched"] == 4 and found["terms"] == ["file"]
    by_feature = {hit["feature"]: hit for hit in found["data"]}
    assert by_feature[1]["promoted_matches"] == [" file"] and by_feature[1]["snippet"] is None
    snippet = by_feature[0]["snippet"]
    assert snippet["text"] == "the file is open" and snippet["match"] == [4, 8]
    assert snippet["activation"] == 2.0 and snippet["max_activation"] == 2.0 and snippet["context"] == 0
    assert [t["token"] for t in snippet["tokens"]] == ["the", " file", " is", " open"]
    assert by_feature[0]["density"] == pytest.approx(0.1) and by_feature[0]["mean_activation"] == 1.0
    assert [p["token"] for p in by_feature[3]["promoted"]] == [" files", " is"]


def test_more_matched_words_rank_first_and_limits_hold():
    index = FeatureIndex.build(_stats(), _decode)
    found = index.search("lineno FILE", limit=2)
    assert found["terms"] == ["lineno", "file"] and found["matched"] == 4
    assert found["data"][0]["feature"] == 1 and found["data"][0]["matched_terms"] == ["lineno", "file"]
    assert len(found["data"]) == 2
    assert index.search("zebra")["data"] == [] and index.search("zebra")["matched"] == 0


def test_punctuation_queries_and_words_inside_identifiers():
    index = FeatureIndex.build(_stats(), _decode)
    assert query_terms("[")[0] == ["["] and query_terms("col_off[set]")[0] == ["col", "off", "set"]
    bracket = index.search("[")
    assert [hit["feature"] for hit in bracket["data"]] == [3]
    assert bracket["data"][0]["score"] == pytest.approx(0.1)  # "[" is in its context, where it does not fire
    assert index.search("set")["data"][0]["score"] == pytest.approx(1.1)


def test_token_spans_across_split_characters():
    pieces = [b"caf", b"\xc3", b"\xa9", b" ok"]

    def decode(ids):
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    text, spans = token_spans([0, 1, 2, 3], decode)
    assert text == "café ok" and spans == [(0, 3), (3, 3), (3, 4), (4, 7)]


@pytest.fixture(scope="module")
def default_index(default_dictionary, pythia_tiny):
    from dictionaries.store import DictionaryStore
    from safetensors.torch import load_file

    path = DictionaryStore().path(DEFAULT) / "features.safetensors"
    return FeatureIndex.build(load_file(str(path)), lambda ids: pythia_tiny.tokenizer.decode([int(i) for i in ids]))


def _word_at_peak(index, feature):
    """The word of the feature's best context on which it fires most."""
    from service.feature_search import words_of

    t = index.tensors
    ids_row, acts_row = t["context_tokens"][feature, 0], t["context_acts"][feature, 0]
    keep = ids_row >= 0
    text, spans = token_spans(ids_row[keep].tolist(), index.decode)
    peak = int(acts_row[keep].argmax())
    start, end = spans[peak]
    return next((w for w, s, e in words_of(text) if s < end and e > start and len(w) >= 3), None)


def test_a_word_from_the_top_context_finds_the_feature(default_index):
    checked = 0
    for feature in range(0, default_index.tensors["context_max"].shape[0], 7):  # a spread of features, until 30
        if checked == 30:
            break
        if float(default_index.tensors["context_max"][feature, 0]) <= 0:
            continue
        word = _word_at_peak(default_index, feature)
        if word is None:
            continue
        found = default_index.search(word, limit=100)
        hits = {hit["feature"]: hit for hit in found["data"]}
        if found["matched"] > 100 and feature not in hits:
            continue  # a word so common that 100 others outrank it; the next check covers ranking
        assert feature in hits, (feature, word)
        hit = hits[feature]
        assert hit["snippet"]["activation"] == pytest.approx(hit["snippet"]["max_activation"])  # it fires most there
        assert word in hit["snippet"]["text"].casefold()
        checked += 1
    assert checked >= 20


def test_a_promoted_token_finds_the_feature(default_index):
    checked = 0
    for feature in range(0, 200, 7):
        token = default_index.decode([int(default_index.tensors["lens_promoted"][feature, 0])])
        word = token.strip().casefold()
        if len(word) < 3 or not word.isalpha():
            continue
        hits = {hit["feature"]: hit for hit in default_index.search(word, limit=100)["data"]}
        assert feature in hits, (feature, token)
        assert token in hits[feature]["promoted_matches"]
        assert hits[feature]["score"] >= 2 * 1.0  # the first promoted token counts 2·(1 − 0)
        checked += 1
    assert checked >= 5


def test_indexes_are_built_once_and_rebuilt_for_a_new_install(tmp_path, pythia_tiny):
    from safetensors.torch import save

    from dictionaries.config import DictionaryConfig
    from dictionaries.sae import Dictionary
    from dictionaries.store import DictionaryStore

    store = DictionaryStore(tmp_path / "store")
    config = DictionaryConfig(architecture="relu", d_in=128, d_sae=4, hook="blocks.1.hook_resid_post",
                              model_name="pythia-tiny")
    stats = {k: v.contiguous() for k, v in _stats().items()}
    store.put("tiny", Dictionary.random(config), extra_files={"features.safetensors": save(stats)})
    store.put("bare", Dictionary.random(config))
    indexes = FeatureIndexes(store)
    first = indexes.get("pythia-tiny", "tiny")
    assert indexes.get("pythia-tiny", "tiny") is first  # cached
    assert indexes.get("pythia-tiny", "bare") is None  # no statistics
    indexes.drop("tiny")
    assert indexes.get("pythia-tiny", "tiny") is not first  # rebuilt after a reload
    again = indexes.get("pythia-tiny", "tiny")
    store.put("tiny", Dictionary.random(config, seed=1), extra_files={"features.safetensors": save(stats)})
    assert indexes.get("pythia-tiny", "tiny") is not again  # a new install under the name
    assert first.d_sae == 4 and first.decode([int(t) for t in range(3)]) == pythia_tiny.tokenizer.decode([0, 1, 2])


# --- over HTTP -----------------------------------------------------------------------------------

def _search(server, name=DEFAULT, **params):
    return requests.get(f"{server}/v1/dictionaries/{name}/features", params=params, timeout=120)


def test_search_over_http_returns_the_features_statistics(server, default_index):
    answer = _search(server, q="lineno", limit=5)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list" and body["dictionary"] == DEFAULT and body["model"] == "pythia-tiny"
    assert body["query"] == "lineno" and body["terms"] == ["lineno"] and len(body["data"]) == 5
    assert body == {**body, "data": default_index.search("lineno", 5)["data"]}  # the same index, served
    hit = body["data"][0]
    page = requests.get(f"{server}/v1/dictionaries/{DEFAULT}/features/{hit['feature']}", timeout=60).json()
    assert hit["density"] == pytest.approx(page["density"]) and hit["mean_activation"] == pytest.approx(page["mean_activation"])
    assert [p["token"] for p in hit["promoted"]] == [p["token"] for p in page["logit_lens"]["promoted"]]
    context = page["top_contexts"][hit["snippet"]["context"]]
    assert hit["snippet"]["text"] == context["text"]
    assert [t["activation"] for t in hit["snippet"]["tokens"]] == pytest.approx([t["activation"] for t in context["tokens"]])
    assert "lineno" in hit["snippet"]["text"][slice(*hit["snippet"]["match"])].casefold()


def test_the_client_and_the_cli_search_features(server, default_index):
    import subprocess
    import sys

    from clients.client import Client
    from tests.conftest import REPO

    hits = Client(server).search_features(DEFAULT, "lineno", limit=3)
    assert hits == default_index.search("lineno", 3)["data"]
    cli = subprocess.run([sys.executable, "-m", "clients.cli", "features", DEFAULT, "--search", "lineno", "--limit", "3",
                          "--server", server], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    lines = [line for line in cli.stdout.splitlines() if "score" in line]
    assert [int(line.split()[0]) for line in lines] == [hit["feature"] for hit in hits]
    assert repr(hits[0]["snippet"]["text"]) in cli.stdout
    missing = subprocess.run([sys.executable, "-m", "clients.cli", "features", DEFAULT, "--server", server], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--search" in missing.stderr


def test_search_over_http_finds_a_feature_by_context_word_and_by_promoted_token(server, default_index):
    feature = 7
    word = _word_at_peak(default_index, feature)
    by_word = [hit["feature"] for hit in _search(server, q=word, limit=100).json()["data"]]
    assert feature in by_word
    promoted = requests.get(f"{server}/v1/dictionaries/{DEFAULT}/features/{feature}", timeout=60).json()
    token = next(p["token"] for p in promoted["logit_lens"]["promoted"] if p["token"].strip().isalpha())
    hits = {hit["feature"]: hit for hit in _search(server, q=token.strip(), limit=100).json()["data"]}
    assert feature in hits and token in hits[feature]["promoted_matches"]


@pytest.mark.parametrize("name, params, status, param", [
    ("nope", {"q": "file"}, 404, "name"),
    (DEFAULT, {}, 400, "q"),
    (DEFAULT, {"q": "   "}, 400, "q"),
    (DEFAULT, {"q": "x" * 201}, 400, "q"),
    (DEFAULT, {"q": "file", "limit": "0"}, 400, "limit"),
    (DEFAULT, {"q": "file", "limit": "101"}, 400, "limit"),
    (DEFAULT, {"q": "file", "limit": "many"}, 400, "limit"),
    (DEFAULT, {"q": "file", "sort": "asc"}, 400, "sort"),
    (DEFAULT, {"q": "file", "model": "gpt-7"}, 404, "model"),
    ("random-l1", {"q": "file"}, 409, "name"),
])
def test_search_refusals(server, name, params, status, param):
    answer = _search(server, name, **params)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"]
    if status == 409:
        assert "features.safetensors" in error["message"]
    assert requests.get(server + "/healthz", timeout=30).status_code == 200


def test_whoami_and_the_stored_listing_and_the_schema(server):
    assert requests.get(server + "/v1/whoami", timeout=30).json() == {"role": "admin", "name": None, "open": True}
    listed = requests.get(server + "/v1/dictionaries", timeout=30).json()["data"]
    assert all(entry["deployed"] for entry in listed)
    stored = requests.get(server + "/v1/dictionaries?stored=true", timeout=30).json()["data"]
    assert {e["name"] for e in stored} >= {e["name"] for e in listed}
    from dictionaries.store import DictionaryStore

    assert {e["name"] for e in stored} == set(DictionaryStore().names()) | {e["name"] for e in listed}
    assert all(e["deployed"] is False for e in stored if e["name"] not in {x["name"] for x in listed})
    schema = requests.get(server + "/openapi.json", timeout=30).json()
    search = schema["paths"]["/v1/dictionaries/{name}/features"]["get"]
    assert set(search["responses"]) == {"200", "400", "401", "404", "409", "429", "500", "503"}  # 500: every route
    assert {p["name"] for p in search["parameters"]} == {"name", "q", "limit", "model"}
    assert search["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("FeatureSearchResponse")
    assert search["responses"]["409"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorEnvelope")
    who = schema["paths"]["/v1/whoami"]["get"]
    assert set(who["responses"]) == {"200", "401", "429", "500"}
    # the page and its assets are pages, not API operations: outside the schema, in the access matrix
    assert "/" not in schema["paths"] and "/ui/{asset}" not in schema["paths"]


def test_the_page_and_its_assets(server):
    page = requests.get(server + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script type="module" src="ui/main.js">' in page.text
    script = requests.get(server + "/ui/main.js", timeout=30)
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    for bad in ("nope.js", ".hidden.js", "index.py"):
        missing = requests.get(server + "/ui/" + bad, timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "asset"
    assert requests.get(server + "/ui/..%2Ffeature_search.py", timeout=30).status_code == 404
    # nothing the page ships names another host
    from service.ui import ASSETS

    for asset in ASSETS.iterdir():
        text = asset.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset.name

