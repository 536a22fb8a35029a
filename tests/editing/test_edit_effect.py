"""The edit effect on planted cases: ablating a feature that drives a token lowers that token's
log-probability where the feature fired, a no-op edit reports exactly zero, and the figures
equal an independent plain-hook computation."""

import json

import pytest
import torch

from dictionaries.config import DictionaryConfig
from dictionaries.sae import Dictionary
from editing.edit_effect import edit_effect, target_ids
from editing.edits import EditError, EditSpec
from editing.evaluate import evaluate, evaluation_windows
from editing.hookpoints import resolve_hook_point

LAST = "blocks.3.hook_resid_post"  # pythia-tiny's last layer: nothing after it but the final LayerNorm and head


@pytest.fixture(scope="module")
def planted(pythia_tiny):
    """Feature 0 fires where a random direction r·x > 0 (about half the tokens) and its decoder
    row pushes the residual towards token " list" through the final LayerNorm and unembedding;
    features 1-3 never fire."""
    model = pythia_tiny.model
    [target] = pythia_tiny.tokenizer(" list", add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    direction = model.get_output_embeddings().weight[target].detach() * model.gpt_neox.final_layer_norm.weight.detach()
    direction = direction - direction.mean()
    reader = torch.randn(128, generator=generator)
    weights = {"W_enc": torch.zeros(128, 4), "b_enc": torch.tensor([0.0, -1e3, -1e3, -1e3]),
               "W_dec": torch.randn(4, 128, generator=generator), "b_dec": torch.zeros(128)}
    weights["W_enc"][:, 0] = reader / reader.norm()
    weights["W_dec"][0] = 3.0 * direction / direction.norm()
    config = DictionaryConfig(architecture="relu", d_in=128, d_sae=4, hook=LAST)
    return Dictionary.from_config(config, weights), target


@pytest.fixture(scope="module")
def windows(pythia_tiny):
    return evaluation_windows(pythia_tiny, "builtin:pydocs/heldout", 1024, 64)


@torch.no_grad()
def plain_effect(model, sae, windows, target):
    """Independent: plain hooks write h − f₀·W_dec[0]; the aimed positions are where f₀ > 0."""
    module = resolve_hook_point(model, LAST).module
    seen = {}

    def hook(m, args, output):
        f0 = torch.relu((output - sae.b_dec) @ sae.W_enc[:, 0] + sae.b_enc[0])  # (W, T)
        seen["fires"] = f0 > 0
        return output - f0[..., None] * sae.W_dec[0]

    clean = model(windows).logits.float().log_softmax(-1)
    handle = module.register_forward_hook(hook)
    try:
        edited = model(windows).logits.float().log_softmax(-1)
    finally:
        handle.remove()
    fires = seen["fires"]
    moved = edited[..., target] - clean[..., target]  # (W, T)
    kl = (clean.exp() * (clean - edited)).sum(-1)[:, :-1]
    return float(moved[fires].mean()), int(fires.sum()), kl, fires


def test_ablating_a_feature_that_drives_a_token_lowers_it(pythia_tiny, planted, windows):
    sae, target = planted
    effect = edit_effect(pythia_tiny, {"p": sae}, [EditSpec(dictionary="p", feature=0, op="ablate")], windows)
    assert target in [t["token_id"] for t in effect["targets"]]  # the default targets: its logit-lens tokens
    explicit = edit_effect(pythia_tiny, {"p": sae}, [EditSpec(dictionary="p", feature=0, op="ablate")], windows,
                           targets=[" list"])
    expected, aimed, kl, fires = plain_effect(pythia_tiny.model, sae, windows, target)
    assert explicit["targets"] == [{"token_id": target, "token": " list"}] and explicit["targets_from"] == "given"
    assert explicit["target_effect"]["mean"] < -0.5  # the token the feature drives loses log-probability
    assert explicit["target_effect"]["mean"] == pytest.approx(expected, abs=1e-4)
    assert explicit["aimed_positions"] == aimed and 0.2 < aimed / windows.numel() < 0.8
    # an edit on the last layer cannot reach other positions (no attention after it): zero collateral there
    side = explicit["side_effect"]
    assert side["kl_other_positions"]["positions"] == int((~fires[:, :-1]).sum())
    assert side["kl_other_positions"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert side["kl_heldout"]["mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert side["kl_heldout"]["mean"] > 0 and side["delta_ce_heldout"]["se"] > 0


def test_an_earlier_layer_has_side_effects_elsewhere(pythia_tiny, windows):
    """On layer 1 the change reaches later positions through attention: KL there is positive,
    and the ratio relates the two."""
    config = DictionaryConfig(architecture="relu", d_in=128, d_sae=64, hook="blocks.1.hook_resid_post")
    sae = Dictionary.random(config, seed=2)
    effect = edit_effect(pythia_tiny, {"r": sae}, [EditSpec(dictionary="r", feature=5, op="ablate")], windows)
    other = effect["side_effect"]["kl_other_positions"]
    assert effect["aimed_positions"] > 0 and other["positions"] > 0 and other["mean"] > 0
    assert effect["ratio"] == pytest.approx(abs(effect["target_effect"]["mean"]) / other["mean"])


@pytest.mark.parametrize("edit", [EditSpec(dictionary="p", feature=0, op="scale", value=1.0),
                                  EditSpec(dictionary="p", feature=2, op="ablate")],  # feature 2 never fires
                         ids=["scale-by-one", "ablate-a-dead-feature"])
def test_a_no_op_edit_reports_zero(pythia_tiny, planted, windows, edit):
    sae, _ = planted
    effect = edit_effect(pythia_tiny, {"p": sae}, [edit], windows)
    assert effect["aimed_positions"] == 0 and effect["target_effect"]["mean"] == 0.0
    assert effect["target_effect_all_positions"]["mean"] == 0.0
    side = effect["side_effect"]
    assert side["kl_heldout"]["mean"] == 0.0 and side["delta_ce_heldout"]["mean"] == 0.0
    assert side["kl_other_positions"]["mean"] == 0.0 and effect["ratio"] is None


def test_the_evaluator_reports_it_and_targets_are_checked(pythia_tiny, planted):
    sae, _ = planted
    report = evaluate(pythia_tiny, {"p": sae}, "p", edits=[EditSpec(dictionary="p", feature=0, op="ablate")],
                      tokens=512, context_length=64, targets=[" list"])
    assert report["edit_effect"]["target_effect"]["mean"] < -0.5
    assert "edit_effect" not in evaluate(pythia_tiny, {"p": sae}, "p", tokens=512, context_length=64)
    with pytest.raises(EditError) as caught:
        target_ids(pythia_tiny.tokenizer, [" list", "not one token at all"])
    assert caught.value.param == "target_tokens[1]"


def test_cli_eval_with_a_target(default_dictionary, capsys):
    from clients.cli import main

    name, _ = default_dictionary
    assert main(["eval", "--dictionary", name, "--edit", f"{name}:3:ablate", "--target", " list", "--tokens", "512",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["edit_effect"]["targets"][0]["token"] == " list" and "kl_div_score" in report["core"]
    assert main(["eval", "--dictionary", name, "--edit", f"{name}:3:ablate", "--tokens", "512"]) == 0
    text = capsys.readouterr().out
    assert "target effect" in text and "KL score" in text and "ratio" in text
