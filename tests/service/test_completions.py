"""``/v1/completions`` as lm-evaluation-harness and the openai SDK use it: several prompts,
token-id prompts, ``echo``, ``logprobs: N`` and ``max_tokens: 0``, against the engine."""

import pytest
import requests
import torch

from editing.edits import EditSpec
from editing.engine import GenerationRequest

DEFAULT = "pythia-tiny-l2"
TEXTS = ["Return the number of items in the list", "class", "If the file does not exist, the function raises"]


def _post(url, body):
    return requests.post(url + "/v1/completions", json=body, timeout=120)


def _ids(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_echo_scores_every_prompt_of_a_batch(server, engine):
    edits = [{"dictionary": DEFAULT, "feature": 11, "op": "set", "value": 6.0}]
    prompts = [TEXTS[0], _ids(engine, TEXTS[1]), TEXTS[2]]
    answer = _post(server, {"prompt": [_ids(engine, t) for t in TEXTS], "max_tokens": 0, "echo": True, "logprobs": 2,
                            "edits": edits})
    assert answer.status_code == 200, answer.text
    out = answer.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"] == {"prompt_tokens": sum(len(_ids(engine, t)) for t in TEXTS), "completion_tokens": 0,
                            "total_tokens": sum(len(_ids(engine, t)) for t in TEXTS)}
    for text, choice in zip(TEXTS, out["choices"]):
        ids = _ids(engine, text)
        [local] = engine.generate([GenerationRequest(tuple(ids), max_new_tokens=0, prompt_logprobs=True, top_logprobs=2,
                                                     edits=tuple(EditSpec(**e) for e in edits))])
        logprobs = choice["logprobs"]
        assert choice["text"] == text and choice["finish_reason"] == "length"
        assert "".join(logprobs["tokens"]) == text and len(logprobs["tokens"]) == len(ids)
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["token_logprobs"][1:] == pytest.approx(local.prompt_logprobs[1:], abs=1e-5)
        assert logprobs["text_offset"] == [len("".join(logprobs["tokens"][:i])) for i in range(len(ids))]
        for position, top in enumerate(logprobs["top_logprobs"][1:], start=1):
            best = local.prompt_top_logprobs[position]
            assert 2 <= len(top) <= 3  # the two best and the chosen token
            assert max(top.values()) == pytest.approx(best[0][1], abs=1e-5)
            assert top[engine.tokenizer.decode([ids[position]])] == pytest.approx(local.prompt_logprobs[position], abs=1e-5)
        assert choice["edit_report"] and choice["edit_report"][0]["dictionary"] == DEFAULT
    # a string prompt, a list of strings and token ids are the same requests
    mixed = _post(server, {"prompt": [TEXTS[0], TEXTS[2]], "max_tokens": 0, "echo": True, "logprobs": 2,
                           "edits": edits}).json()
    assert [c["logprobs"]["token_logprobs"] for c in mixed["choices"]] == \
        [out["choices"][0]["logprobs"]["token_logprobs"], out["choices"][2]["logprobs"]["token_logprobs"]]
    single = _post(server, {"prompt": prompts[1], "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    assert len(single["choices"]) == 1 and single["choices"][0]["text"] == TEXTS[1]


def test_echo_with_generation_equals_the_plain_model(server, engine, pythia_tiny):
    """What lm-evaluation-harness's local-completions sends for a log-likelihood: echo,
    max_tokens 1, logprobs 1, temperature 0; the scores equal one plain forward of the model."""
    ids = _ids(engine, TEXTS[2])
    out = _post(server, {"prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0,
                         "seed": 1234}).json()
    [choice] = out["choices"]
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1  # the prompt and one generated token (or end-of-text)
    with torch.no_grad():
        plain = pythia_tiny.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
    expected = plain[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()
    assert logprobs["token_logprobs"][1:-1] == pytest.approx(expected, abs=1e-5)
    greedy = int(plain[-1].argmax())
    assert logprobs["token_logprobs"][-1] == pytest.approx(float(plain[-1, greedy]), abs=1e-5)
    assert max(logprobs["top_logprobs"][-1].values()) == logprobs["token_logprobs"][-1]  # greedy: chosen is best
    assert choice["text"].startswith(TEXTS[2])


def test_generated_logprobs_and_alternatives(server, engine):
    body = {"prompt": "The function returns", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    out = _post(server, body).json()
    [choice] = out["choices"]
    [local] = engine.generate([GenerationRequest("The function returns", max_new_tokens=6, top_logprobs=3)])
    logprobs = choice["logprobs"]
    assert choice["text"] == local.text and "".join(logprobs["tokens"][: len(local.tokens)]) == local.text
    assert logprobs["token_logprobs"][: len(local.tokens)] == pytest.approx(local.logprobs, abs=1e-5)
    for top, best in zip(logprobs["top_logprobs"], local.top_logprobs):
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx([v for _, v in best], abs=1e-5)


def test_openai_sdk_reads_echo_and_logprobs(server, engine):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    ids = _ids(engine, TEXTS[0])
    edits = [{"dictionary": DEFAULT, "feature": 3, "op": "ablate"}]
    completion = client.completions.create(model="pythia-tiny", prompt=TEXTS[0], max_tokens=0, echo=True, logprobs=5,
                                           extra_body={"edits": edits})
    [choice] = completion.choices
    [local] = engine.generate([GenerationRequest(tuple(ids), max_new_tokens=0, prompt_logprobs=True, top_logprobs=5,
                                                 edits=tuple(EditSpec(**e) for e in edits))])
    assert choice.text == TEXTS[0] and choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(local.prompt_logprobs[1:], abs=1e-5)
    assert len(choice.logprobs.tokens) == len(choice.logprobs.text_offset) == len(ids)
    assert all(5 <= len(top) <= 6 for top in choice.logprobs.top_logprobs[1:])
    several = client.completions.create(model="pythia-tiny", prompt=[ids, ids[:3]], max_tokens=2, temperature=0,
                                        logprobs=1)
    assert [c.index for c in several.choices] == [0, 1] and several.usage.prompt_tokens == len(ids) + 3
    [alone] = engine.generate([GenerationRequest(tuple(ids[:3]), max_new_tokens=2)])
    assert several.choices[1].text == alone.text
    assert several.choices[1].logprobs.token_logprobs[: len(alone.tokens)] == pytest.approx(alone.logprobs, abs=1e-5)


BAD = [
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[]]}, 400, "prompt"),
    ({"prompt": [1, -2]}, 400, "prompt"),
    ({"prompt": [[1, 2], [99999]], "echo": True, "max_tokens": 0}, 400, "prompt[1]"),
    ({"prompt": ["a", "b"], "stream": True}, 400, "stream"),
    ({"prompt": "a", "stream": True, "echo": True}, 400, "stream"),
    ({"prompt": ["x"] * 65}, 400, "prompt"),
    ({"prompt": [[7] * 300], "echo": True, "max_tokens": 0}, 400, "prompt"),
    ({"prompt": ["ok", "word " * 300]}, 400, "prompt[1]"),
    ({"prompt": "x", "edits": [{"dictionary": "nope", "feature": 1, "op": "ablate"}]}, 400, "edits[0].dictionary"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_completions_name_the_field(server, body, status, param):
    answer = _post(server, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def test_openapi_declares_the_error_envelope(server):
    schema = requests.get(server + "/openapi.json", timeout=30).json()
    responses = schema["paths"]["/v1/completions"]["post"]["responses"]
    for status in ("400", "404", "409", "503"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorEnvelope")
    assert "error" in schema["components"]["schemas"]["ErrorEnvelope"]["properties"]
