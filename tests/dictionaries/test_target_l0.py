"""Schedules relative to the run's length, the target-L0 controller, and relu sweeps that never collapse."""

import json
import math

import pytest
import torch

from dictionaries.store import DictionaryStore
from dictionaries.training.ensemble import SaeSpec, sweep_specs
from dictionaries.training.pipeline import train_and_publish
from dictionaries.training.schedule import L0Controller, learning_rate, scaled_learning_rate, sparsity_warmup
from dictionaries.training.trainer import TrainConfig

HOOK = "blocks.1.hook_resid_post"


def test_schedules_are_fractions_of_the_run():
    for total in (100, 10_000):
        rates = [learning_rate(step, total, 1.0, warmup=0.05, decay=0.2) for step in range(total)]
        warm = round(total * 0.05)
        assert rates[0] == pytest.approx(1 / warm) and rates[warm - 1] == 1.0
        assert rates[int(total * 0.8) - 1] == 1.0 and rates[-1] == pytest.approx(1 / (total * 0.2))
        assert all(a >= b for a, b in zip(rates[warm:], rates[warm + 1:]))  # never rises after the warm-up
        assert sparsity_warmup(0, total, 0.05) == pytest.approx(1 / warm) and sparsity_warmup(warm, total, 0.05) == 1.0
    assert scaled_learning_rate(4096) == pytest.approx(4e-3) and scaled_learning_rate(16384) == pytest.approx(2e-3)
    assert scaled_learning_rate(4096, "topk") == pytest.approx(1.3e-2) and scaled_learning_rate(1024, "topk") == pytest.approx(2.6e-2)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(hook=HOOK, specs=(SaeSpec("topk", 64, k=4),), warmup=1.5)


def test_the_controller_steers_each_member_by_its_own_l0():
    controller = L0Controller([1.0, 1.0, 2.0], [40.0, 40.0, None], gain=0.1, damping=1.0, max_change=0.2)
    controller.update(torch.tensor([80.0, 20.0, 5.0]))  # first step: the integral term alone
    high, low, free = controller.coefficient.tolist()
    assert high == pytest.approx(2 ** 0.1) and low == pytest.approx(2 ** -0.1) and free == 2.0
    controller.update(torch.tensor([70.0, 40.0, 5.0]))  # L0 falling towards 40: the damping brakes
    e0, e1 = math.log(80 / 40), math.log(70 / 40)
    assert 0.1 * e1 > 0 > 0.1 * e1 + (e1 - e0) > -0.2  # the coefficient now eases off instead of rising on
    assert controller.coefficient[0] == pytest.approx(2 ** 0.1 * math.exp(0.1 * e1 + (e1 - e0)))
    assert controller.coefficient[1] == pytest.approx(2 ** -0.1 * math.exp(0.2))  # 20 → 40: a step of e^0.2 at most
    before = float(controller.coefficient[0])
    controller.update(torch.tensor([4000.0, 40.0, 5.0]))
    assert controller.coefficient[0] == pytest.approx(before * math.exp(0.2))


def test_target_l0_specs_and_labels():
    specs = sweep_specs("relu", [256], l1=[0.5], target_l0=[20, 40])
    assert [(s.l1, s.target_l0, s.label()) for s in specs] == [(0.5, 20, "relu-f256-target20"),
                                                              (0.5, 40, "relu-f256-target40")]
    with pytest.raises(ValueError, match="topk"):
        sweep_specs("topk", [256], target_l0=[20])
    with pytest.raises(ValueError, match="target_l0 must be in"):
        SaeSpec("jumprelu", 64, l1=1.0, target_l0=64)


def test_runs_asked_for_l0_40_end_within_ten_percent(pythia_tiny, tmp_path):
    """relu and jumprelu, one short pythia-tiny run: the held-out L0 of each lands within ±10% of 40,
    and the coefficient the controller ended on is in the provenance."""
    specs = tuple(sweep_specs("relu", [256], target_l0=[40]) + sweep_specs("jumprelu", [256], target_l0=[40]))
    config = TrainConfig(hook=HOOK, specs=specs, tokens=409_600, batch_size=2048)
    store = DictionaryStore(tmp_path / "store")
    published = train_and_publish(pythia_tiny, config, name="target", store=store, run_dir=tmp_path / "run",
                                  progress=False, heldout_windows_count=64, feature_windows=2)
    for entry in published:
        assert abs(entry["metrics"]["l0"] - 40) <= 4, (entry["name"], entry["metrics"]["l0"])
        assert entry["metrics"]["fvu"] < 0.5
        provenance = store.config(entry["name"]).provenance
        assert provenance["final_coefficient"] == entry["coefficient"] != 1.0
        assert provenance["spec"]["target_l0"] == 40
    last = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    # the log has the coefficient each step trained with; the final one is after that step's update (≤ e^0.2 away)
    assert [m["coefficient"] for m in last["members"]] == pytest.approx([e["coefficient"] for e in published], rel=0.25)


def test_a_relu_sweep_over_a_fourfold_range_never_collapses(pythia_tiny, tmp_path):
    """Coefficients 4× apart in one run: L0 falls monotonically with the coefficient and no member
    loses the input (held-out FVU ≤ 0.9)."""
    coefficients = (1.0, 2.0, 4.0)
    specs = tuple(SaeSpec("relu", 256, l1=l1) for l1 in coefficients)
    config = TrainConfig(hook=HOOK, specs=specs, tokens=409_600, batch_size=2048)
    published = train_and_publish(pythia_tiny, config, name="sweep", store=DictionaryStore(tmp_path / "store"),
                                  run_dir=tmp_path / "run", progress=False, heldout_windows_count=64, feature_windows=2)
    l0 = [entry["metrics"]["l0"] for entry in published]
    fvu = [entry["metrics"]["fvu"] for entry in published]
    assert l0[0] > l0[1] > l0[2] > 0, l0
    assert max(fvu) <= 0.9 and fvu[0] < fvu[1] < fvu[2], fvu
