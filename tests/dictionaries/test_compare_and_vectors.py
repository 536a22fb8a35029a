"""Dictionary comparison (MMCS both ways, Hungarian matching) and the steering-vector store."""

import os

import pytest
import torch

from dictionaries.compare import MAX_MMCS_CELLS, ComparisonError, compare
from dictionaries.config import DictionaryConfig, DictionaryError
from dictionaries.sae import Dictionary
from dictionaries.store import DictionaryStore
from dictionaries.vectors import SteeringVector, VectorNotFound, VectorStore

HOOK = "blocks.1.hook_resid_post"


def test_a_dictionary_compared_with_itself(default_dictionary):
    _, sae = default_dictionary
    comparison = compare(sae, sae)
    for side in (comparison.mmcs_decoder, comparison.mmcs_encoder):
        assert side["a_to_b"] == pytest.approx(1.0, abs=1e-5) and side["b_to_a"] == pytest.approx(1.0, abs=1e-5)
    d_sae = sae.config.d_sae
    assert comparison.matched_a.tolist() == list(range(d_sae)) and comparison.matched_b.tolist() == list(range(d_sae))
    assert float(comparison.decoder_cosine.min()) == pytest.approx(1.0, abs=1e-5)
    assert float(comparison.encoder_cosine.min()) == pytest.approx(1.0, abs=1e-5)
    assert len(comparison.pairs(0.99)) == d_sae


def test_a_permuted_copy_is_matched_back(default_dictionary):
    _, sae = default_dictionary
    permutation = torch.randperm(sae.config.d_sae, generator=torch.Generator().manual_seed(1))
    weights = sae.weights()
    shuffled = Dictionary.from_config(sae.config, {"W_enc": weights["W_enc"][:, permutation], "b_enc": weights["b_enc"][permutation],
                                                   "W_dec": weights["W_dec"][permutation], "b_dec": weights["b_dec"]})
    comparison = compare(sae, shuffled)
    assert (permutation[comparison.matched_b] == comparison.matched_a).all()  # feature i of a is feature i of b


def test_sweep_members_match_the_trainers_metrics(small_model, tmp_path):
    """Two members of one sweep: the asymmetric MMCS values are the ones the trainer wrote."""
    from dictionaries.training.ensemble import SaeSpec
    from dictionaries.training.pipeline import train_and_publish
    from dictionaries.training.trainer import TrainConfig

    store = DictionaryStore(tmp_path / "store")
    config = TrainConfig(hook=HOOK, specs=(SaeSpec("relu", 64, l1=1.0), SaeSpec("topk", 128, k=4)), tokens=4096,
                         batch_size=512, context_length=32)
    published = train_and_publish(small_model, config, name="pair", store=store, run_dir=tmp_path / "run",
                                  progress=False, heldout_windows_count=8, feature_windows=4)
    first, second = (entry["name"] for entry in published)
    comparison = compare(store.load(first), store.load(second))
    metrics = {name: store.info(name)["metrics"] for name in (first, second)}
    assert comparison.mmcs_decoder["a_to_b"] == pytest.approx(metrics[first]["mmcs"][second], abs=1e-6)
    assert comparison.mmcs_decoder["b_to_a"] == pytest.approx(metrics[second]["mmcs"][first], abs=1e-6)
    assert abs(comparison.mmcs_decoder["a_to_b"] - comparison.mmcs_decoder["b_to_a"]) > 1e-3  # not symmetric
    assert len(comparison.matched_a) == 64 and len(set(comparison.matched_b.tolist())) == 64  # one to one
    # the matching maximises the summed cosine: no greedy choice does better
    a, b = store.load(first).W_dec, store.load(second).W_dec
    cosine = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    greedy, used = 0.0, set()
    for i in range(64):
        j = next(int(j) for j in cosine[i].argsort(descending=True) if int(j) not in used)
        used.add(j)
        greedy += float(cosine[i, j])
    assert float(comparison.decoder_cosine.sum()) >= greedy - 1e-4


def test_dictionaries_that_cannot_be_compared():
    small = Dictionary.random(DictionaryConfig(architecture="relu", d_in=16, d_sae=32, hook=HOOK))
    other = Dictionary.random(DictionaryConfig(architecture="relu", d_in=24, d_sae=32, hook=HOOK))
    with pytest.raises(ComparisonError, match="different widths"):
        compare(small, other)

    class Huge:
        config = DictionaryConfig(architecture="relu", d_in=16, d_sae=MAX_MMCS_CELLS // 16 + 1, hook=HOOK)

    with pytest.raises(ComparisonError, match="more than this server compares"):
        compare(Huge(), small)


def test_vector_store_round_trip_and_refusals(tmp_path):
    store = VectorStore(tmp_path / "vectors")
    vector = SteeringVector("cat-vs-dog", "blocks.2.hook_resid_post", torch.randn(128), "pythia-tiny", "abc",
                            {"contrast": {"dictionary": "l2"}})
    store.put(vector)
    loaded = store.load("cat-vs-dog")
    assert torch.equal(loaded.vector, vector.vector) and loaded.hook == vector.hook
    assert loaded.provenance == vector.provenance and loaded.model_name == "pythia-tiny"
    assert store.names() == ["cat-vs-dog"] and "cat-vs-dog" in store and "../x" not in store
    version = store.version("cat-vs-dog")
    store.put(SteeringVector("cat-vs-dog", "blocks.1.hook_resid_pre", torch.ones(128)))
    assert store.version("cat-vs-dog") != version and store.load("cat-vs-dog").hook == "blocks.1.hook_resid_pre"
    assert not [p for p in os.listdir(tmp_path / "vectors") if p.startswith(".")]  # no temporary files left
    for values, hook, match in ((torch.zeros(8), "blocks.1.hook_resid_pre", "all zeros"),
                                (torch.tensor([1.0, float("nan")]), "blocks.1.hook_resid_pre", "non-finite"),
                                (torch.ones(2, 2), "blocks.1.hook_resid_pre", "one row"),
                                (torch.ones(4), "/etc/passwd", "hook")):
        with pytest.raises(DictionaryError, match=match):
            SteeringVector("bad", hook, values)
    with pytest.raises(DictionaryError, match="not allowed"):
        store.load("../../etc/passwd")
    with pytest.raises(VectorNotFound):
        store.load("nope")
    (tmp_path / "vectors" / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DictionaryError, match="not a readable safetensors"):
        store.load("broken")
    store.delete("cat-vs-dog")
    assert "cat-vs-dog" not in store
