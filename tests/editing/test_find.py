"""Contrast and search by example against independent computations, and a planted difference."""

import math

import pytest
import torch

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from dictionaries.statistics import max_activations
from dictionaries.vectors import SteeringVector
from editing.contrast import Contrast, activations
from editing.edits import EditSpec
from editing.engine import Engine, GenerationRequest
from editing.nethook import Trace
from editing.search import SpanError, search_span

HOOK = "blocks.2.hook_resid_post"
TEMPLATES = ["Return the {} of the object.", "If the {} is not given, raise an error.", "The {} must be a string.",
             "This function takes one {} and returns a list.", "Set the {} to None before calling it.",
             "A new {} is created for each call.", "The default {} is used when none is given.",
             "Pass the {} to the constructor.", "Each {} is checked in turn.", "Use the {} as the key."]
CALIBRATION = ["The {} is closed when the program ends.", "Open the {} and read it.", "Write the data to a {}.",
               "Each {} has a name.", "Close the {} after use."]
PLANTED, WORD, OTHER = 17, "file", "value"


def _ids(tokenizer, texts):
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@pytest.fixture(scope="module")
def planted(pythia_tiny):
    """A random relu dictionary with one planted feature that fires on ' file' and nowhere else:
    its encoder is the direction from other tokens' residuals to ' file''s, its bias halfway between
    them, both measured on calibration texts the contrast never sees."""
    tokenizer = pythia_tiny.tokenizer
    token = tokenizer(" " + WORD, add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    ids = _ids(tokenizer, [t.format(WORD) for t in CALIBRATION] + [t.format(OTHER) for t in CALIBRATION])
    hidden, real = activations(pythia_tiny.model, HOOK, ids)
    at_word = torch.zeros_like(real)
    for row, text in enumerate(ids):
        at_word[row, : len(text)] = torch.tensor(text) == token[0]
    direction = hidden[at_word].mean(0) - hidden[real & ~at_word].mean(0)
    direction = direction / direction.norm()
    low, high = (hidden[at_word] @ direction).min(), (hidden[real & ~at_word] @ direction).max()
    assert low > high  # separable on the calibration texts
    sae = Dictionary.random(DictionaryConfig(architecture="relu", d_in=128, d_sae=256, hook=HOOK), seed=0)
    sae.W_enc.data[:, PLANTED], sae.W_dec.data[PLANTED], sae.b_enc.data[PLANTED] = direction, direction, -(low + high) / 2
    return sae, token[0]


def _contrast(pythia_tiny, sae, unit, a=WORD, b=OTHER):
    result = Contrast(sae, unit)
    for side, word in (("a", a), ("b", b)):
        texts = _ids(pythia_tiny.tokenizer, [t.format(word) for t in TEMPLATES])
        result.add(side, *activations(pythia_tiny.model, HOOK, texts[:4]))  # in two chunks
        result.add(side, *activations(pythia_tiny.model, HOOK, texts[4:]))
    return result


def test_contrast_finds_a_planted_difference(pythia_tiny, planted):
    sae, _ = planted
    result = _contrast(pythia_tiny, sae, "text")
    for direction in ("a", "both"):
        top = result.ranked(5, direction)
        assert top[0]["feature"] == PLANTED
        assert top[0]["z"] > 3 and top[0]["p_two_sided"] < 0.01 and top[0]["effect_size"] > 2
        assert top[0]["mean_b"] == 0 and top[0]["active_fraction_a"] == 1.0
    assert result.sizes()["a"]["texts"] == 10 and result.sizes()["a"]["observations"] == 10


def test_contrast_statistics_match_an_independent_computation(pythia_tiny, planted):
    sae, _ = planted
    for unit in ("text", "token"):
        result = _contrast(pythia_tiny, sae, unit)
        per_side = {}
        for side, word in (("a", WORD), ("b", OTHER)):
            rows, residuals = [], []
            for text in _ids(pythia_tiny.tokenizer, [t.format(word) for t in TEMPLATES]):
                with torch.no_grad(), Trace(pythia_tiny.model, HOOK, stop=True) as trace:
                    pythia_tiny.model(torch.tensor([text]))
                f = sae.encode(trace.output[0]).double()  # (T, F)
                rows.append(f.mean(0, keepdim=True) if unit == "text" else f)
                residuals.append(trace.output[0].double().mean(0, keepdim=True) if unit == "text" else trace.output[0].double())
            per_side[side] = (torch.cat(rows), torch.cat(residuals))
        (fa, ha), (fb, hb) = per_side["a"], per_side["b"]
        n_a, n_b = len(fa), len(fb)
        pooled = (((n_a - 1) * fa.var(0) + (n_b - 1) * fb.var(0)) / (n_a + n_b - 2)).sqrt()
        g = (1 - 3 / (4 * (n_a + n_b) - 9)) * (fa.mean(0) - fb.mean(0)) / pooled
        for entry in result.ranked(10, "both"):
            i = entry["feature"]
            assert entry["effect_size"] == pytest.approx(float(g[i]), rel=1e-4)
            se = math.sqrt((n_a + n_b) / (n_a * n_b) + float(g[i]) ** 2 / (2 * (n_a + n_b)))
            assert entry["se"] == pytest.approx(se, rel=1e-4) and entry["z"] == pytest.approx(float(g[i]) / se, rel=1e-4)
            assert entry["mean_a"] == pytest.approx(float(fa[:, i].mean()), rel=1e-4, abs=1e-6)
        torch.testing.assert_close(result.difference_of_means().double(), ha.mean(0) - hb.mean(0), atol=1e-4, rtol=1e-5)


def test_the_difference_of_means_vector_steers_towards_the_token(pythia_tiny, planted):
    sae, token = planted
    vector = SteeringVector("file-vs-value", HOOK, _contrast(pythia_tiny, sae, "text").difference_of_means())
    engine = Engine(pythia_tiny.model, pythia_tiny.tokenizer, vectors={vector.name: vector})
    for prompt in ("Return the", "If the", "The function takes a"):
        [plain] = engine.generate([GenerationRequest(prompt, max_new_tokens=12)])
        [steered] = engine.generate([GenerationRequest(prompt, max_new_tokens=12, include_baseline=True,
                                                       edits=(EditSpec(op="vector", vector=vector.name, value=4.0),))])
        assert steered.baseline.tokens == plain.tokens
        assert steered.tokens.count(token) > plain.tokens.count(token) and steered.tokens.count(token) >= 3, steered.text


def test_search_by_example_ranks_first_the_feature_most_active_on_the_span(pythia_tiny, default_dictionary):
    from dictionaries.store import DictionaryStore

    name, sae = default_dictionary
    maxima = max_activations(DictionaryStore().path(name))
    text = "Return the number of arguments passed to the function."
    start = text.index("arguments")
    ids = pythia_tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad(), Trace(pythia_tiny.model, sae.config.hook, stop=True) as trace:
        pythia_tiny.model(torch.tensor([ids]))
    acts = sae.encode(trace.output[0]).float()  # (T, F)
    found = search_span(pythia_tiny.model, pythia_tiny.tokenizer, sae, text, (start, start + len("arguments")),
                        feature_max=maxima, top_k=5)
    first, last = found["span"]["tokens"]
    assert found["span"]["text"].strip() == "arguments" and last > first
    peak = acts[first:last].max(0).values
    relative = torch.where(maxima > 0, peak / maxima.clamp(min=1e-12), torch.zeros_like(peak))
    assert found["ranked_by"] == "relative" and found["features"][0]["feature"] == int(relative.argmax())
    assert [h["feature"] for h in found["features"]] == relative.topk(5).indices.tolist()
    assert found["features"][0]["relative"] == pytest.approx(float(relative.max()), rel=1e-5)
    by_activation = search_span(pythia_tiny.model, pythia_tiny.tokenizer, sae, text, (first, last), unit="token",
                                feature_max=maxima, rank_by="activation")
    assert by_activation["ranked_by"] == "activation" and by_activation["features"][0]["feature"] == int(peak.argmax())
    assert by_activation["span"] == found["span"]
    unscaled = search_span(pythia_tiny.model, pythia_tiny.tokenizer, sae, text, (first, last), unit="token")
    assert unscaled["ranked_by"] == "activation"  # no statistics: ranked by activation
    for span, unit, param in (((5, 5), "char", "span.end"), ((0, 999), "char", "span.end"), ((0, 99), "token", "span.end")):
        with pytest.raises(SpanError) as caught:
            search_span(pythia_tiny.model, pythia_tiny.tokenizer, sae, text, span, unit=unit)
        assert caught.value.param == param
