"""Model loading: metadata, dtype, and clear errors for what cannot be served."""

import pytest
import torch

from editing.model import ModelLoadError, list_models, load_model


def test_metadata_and_eval_mode(small_model):
    info = small_model.info
    assert not small_model.model.training
    assert (info.n_layers, info.d_model, info.vocab_size) == (3, 32, small_model.model.config.vocab_size)
    assert len(info.sha256) == 64 and info.dtype == "float32"


def test_bfloat16(small_model_dir):
    loaded = load_model(str(small_model_dir), dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.info.dtype == "bfloat16"
    with torch.no_grad():
        assert torch.isfinite(loaded.model(torch.tensor([[5, 6, 7]])).logits).all()


def test_non_gpt_neox_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="model_type is 'gpt2'.*GPT-NeoX"):
        load_model(str(tmp_path))


def test_missing_paths_and_unreachable_hub_ids(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="Hugging Face"):
        load_model("EleutherAI/surely-not-cached-model")  # HF_HUB_OFFLINE=1 in tests


def test_list_models_shows_builds(small_model_dir):
    names = {entry["name"]: entry for entry in list_models()}
    assert names["pythia-tiny-test"]["source"] == "built"
    assert "pythia-tiny" in names
