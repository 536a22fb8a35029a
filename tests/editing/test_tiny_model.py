"""pythia-tiny is built offline by the project's own code, saved, and reloads exactly."""

import dataclasses
import json
import math

import torch

from editing.corpora import open_corpus, token_windows
from editing.model import load_model, weights_sha256
from editing.tiny import TinySpec, build_tiny_model, heldout_loss


def test_small_build_card_and_offline_reload(small_model_dir, small_model):
    card = json.loads((small_model_dir / "card.json").read_text())
    assert card["architecture"] == "gpt_neox"
    assert card["weights_sha256"] == weights_sha256(small_model_dir) == small_model.info.sha256
    assert card["training_tokens"] == card["spec"]["steps"] * card["spec"]["batch_size"] * card["spec"]["context_length"]
    assert math.isclose(card["heldout"]["perplexity"], math.exp(card["heldout"]["cross_entropy"]))
    config = small_model.model.config
    assert config.model_type == "gpt_neox" and config.use_parallel_residual and config.rope_parameters["partial_rotary_factor"] == 0.25
    assert small_model.info.n_layers == 3 and small_model.info.d_model == 32

    # The reloaded model is the trained one: its held-out loss is the card's.
    spec = card["spec"]
    windows = token_windows(open_corpus("builtin:pydocs/heldout"), small_model.tokenizer, spec["context_length"],
                            max_windows=spec["max_eval_windows"])
    assert abs(heldout_loss(small_model.model, windows) - card["heldout"]["cross_entropy"]) < 1e-5
    # Training did something: well below the uniform-guess loss.
    assert card["heldout"]["cross_entropy"] < math.log(config.vocab_size) - 0.5

    again = load_model(str(small_model_dir))
    ids = windows[:4]
    with torch.no_grad():
        assert torch.equal(small_model.model(ids).logits, again.model(ids).logits)


def test_same_spec_builds_the_same_weights(tmp_path):
    spec = TinySpec(vocab_size=320, hidden_size=16, num_layers=1, num_heads=2, context_length=16,
                    batch_size=4, steps=5, warmup_steps=2, max_train_documents=10, max_eval_windows=4)
    first = build_tiny_model(tmp_path / "a", spec, progress=False)
    second = build_tiny_model(tmp_path / "b", spec, progress=False)
    assert first["weights_sha256"] == second["weights_sha256"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    # rebuilding in place replaces the directory whole and leaves no temporary behind
    build_tiny_model(tmp_path / "a", dataclasses.replace(spec, seed=1), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert json.loads((tmp_path / "a" / "card.json").read_text())["seed"] == 1


def test_tokenizer_round_trips_text(small_model):
    tokenizer = small_model.tokenizer
    text = "def f(x):\n    return x  # \u00e9t\u00e9 \u2014 ok"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
