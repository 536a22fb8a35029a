"""The native format: exact round trips, and every malformed file refused by name."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dictionaries.config import DictionaryError
from dictionaries.format import load_dictionary, save_dictionary
from tests.dictionaries.helpers import make


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_is_exact(tmp_path, arch, dtype):
    original = make(arch, dtype=dtype, normalization={"kind": "scale", "factor": 2.0})
    save_dictionary(original, tmp_path / "d", metrics={"fvu": 0.1})
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.config == original.config
    for key, tensor in original.weights().items():
        assert torch.equal(loaded.weights()[key], tensor), key
    x = torch.randn(3, 16)
    assert torch.equal(loaded.encode(x), original.encode(x))
    assert torch.equal(loaded(x), original(x))
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["format"] == "steerserve.dictionary/1"
    assert set(load_file(tmp_path / "d" / "sae.safetensors")) == set(original.weight_shapes)
    assert json.loads((tmp_path / "d" / "metrics.json").read_text()) == {"fvu": 0.1}


def test_tied_and_bias_free_relu_round_trip(tmp_path):
    original = make("relu", tied=True, decoder_bias=False)
    save_dictionary(original, tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.config.tied and not loaded.config.decoder_bias
    assert torch.equal(loaded.W_enc, loaded.W_dec.T) and not loaded.b_dec.any()


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "d"
    save_dictionary(make("jumprelu"), path)
    return path


def _rewrite_weights(path, **changes):
    weights = load_file(path / "sae.safetensors")
    weights.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        weights.pop(key)
    save_file(weights, path / "sae.safetensors")
    config = json.loads((path / "config.json").read_text())
    config["weights_sha256"] = ""  # test the content checks, not the hash check
    (path / "config.json").write_text(json.dumps(config))


def test_truncated_weights(saved):
    data = (saved / "sae.safetensors").read_bytes()
    (saved / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DictionaryError, match="sae.safetensors: SHA-256"):
        load_dictionary(saved)
    _rewrite_config(saved, weights_sha256="")
    with pytest.raises(DictionaryError, match="sae.safetensors: not a readable safetensors file"):
        load_dictionary(saved)


def _rewrite_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"W_dec": torch.zeros(48, 15)}, r"'W_dec' has shape \[48, 15\]; expected \[d_sae=48, d_in=16\]"),
        ({"b_enc": torch.full((48,), float("nan"))}, "'b_enc' has 48 non-finite"),
        ({"threshold": None}, "missing key.*threshold"),
        ({"extra": torch.zeros(2)}, "unexpected key.*extra"),
        ({"W_enc": torch.zeros(16, 48, dtype=torch.float16)}, "'W_enc' is float16; config.json says dtype float32"),
        ({"threshold": -torch.ones(48)}, "'threshold' has negative"),
    ],
)
def test_bad_weights_are_named(saved, changes, message):
    _rewrite_weights(saved, **changes)
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(saved)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"format": "saelens"}, "'format'"),
        ({"d_sae": 47}, r"'W_enc' has shape \[16, 48\]"),
        ({"architecture": "gated"}, "'architecture'"),
        ({"hook": "layers.1"}, "'hook'"),
        ({"tied": True}, "tied"),
    ],
)
def test_bad_config_is_named(saved, changes, message):
    _rewrite_config(saved, **changes)
    with pytest.raises(DictionaryError, match=message):
        load_dictionary(saved)


def test_unparseable_or_missing_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(DictionaryError, match="config.json: not valid JSON"):
        load_dictionary(saved)
    (saved / "config.json").unlink()
    with pytest.raises(DictionaryError, match="config.json: file is missing"):
        load_dictionary(saved)


def test_nothing_is_unpickled(saved, tmp_path):
    # a pickle named like our weights file is not a safetensors file and is refused, not run
    import pickle

    (saved / "sae.safetensors").write_bytes(pickle.dumps({"W_enc": torch.zeros(1)}))
    _rewrite_config(saved, weights_sha256="")
    with pytest.raises(DictionaryError, match="not a readable safetensors file"):
        load_dictionary(saved)
