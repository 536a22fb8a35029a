"""The trainer: activation stream, cache, sweeps, resume, dead features, publishing."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from dictionaries.store import DictionaryStore
from dictionaries.training.activations import ActivationSource, ActivationSpec
from dictionaries.training.ensemble import Ensemble, SaeSpec
from dictionaries.training.pipeline import train_and_publish
from dictionaries.training.trainer import RATE_DECAY, TrainConfig, Trainer, resample_dead, revive
from editing.corpora import iter_token_windows, open_corpus

HOOK = "blocks.1.hook_resid_post"


def test_stream_equals_a_direct_forward(small_model, tmp_path):
    spec = ActivationSpec(hook=HOOK, tokens=3 * 32 * 4, context_length=32, windows_per_forward=4, shuffle_tokens=0)
    source = ActivationSource(small_model, spec, root=tmp_path)
    streamed = torch.cat(list(source.batches(64)))  # (384, 32)
    windows = torch.stack(list(iter_token_windows(open_corpus(spec.corpus), small_model.tokenizer, 32, seed=0,
                                                  max_windows=12)))
    with torch.no_grad():
        hidden = small_model.model(windows, output_hidden_states=True).hidden_states[2]  # output of layer 1
    assert torch.equal(streamed, hidden.reshape(-1, 32))


def test_shuffled_stream_is_a_fixed_permutation(small_model, tmp_path):
    plain = ActivationSpec(hook=HOOK, tokens=2000, context_length=32, shuffle_tokens=0)
    mixed = ActivationSpec(hook=HOOK, tokens=2000, context_length=32, shuffle_tokens=512)
    a = torch.cat(list(ActivationSource(small_model, plain, root=tmp_path).batches(100)))
    b = torch.cat(list(ActivationSource(small_model, mixed, root=tmp_path).batches(100)))
    c = torch.cat(list(ActivationSource(small_model, mixed, root=tmp_path).batches(100, skip=3)))
    assert len(a) == len(b) == 2000 and not torch.equal(a, b)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))  # same tokens, another order
    assert torch.equal(c, b[300:])


def test_cache_is_reused_and_identical(small_model, tmp_path):
    spec = ActivationSpec(hook=HOOK, tokens=5000, context_length=32, shuffle_tokens=1024)
    first = ActivationSource(small_model, spec, cache=True, root=tmp_path)
    assert not first.is_cached()
    fresh = torch.cat(list(first.batches(256)))
    assert first.is_cached()
    calls = []
    handle = small_model.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = torch.cat(list(ActivationSource(small_model, spec, cache=True, root=tmp_path).batches(256)))
    finally:
        handle.remove()
    assert calls == [] and torch.equal(fresh, again)
    other = ActivationSource(small_model, ActivationSpec(hook="blocks.0.hook_resid_post", tokens=5000, context_length=32),
                             cache=True, root=tmp_path)
    assert other.key() != first.key() and not other.is_cached()


def _config(specs, **changes):
    settings = dict(hook=HOOK, specs=tuple(specs), tokens=6144, batch_size=512, context_length=32,
                    learning_rate=3e-3, dead_window=2048, resample_every=2048)
    return TrainConfig(**{**settings, **changes})


@pytest.mark.parametrize("member", [SaeSpec("relu", 96, l1=2.0, seed=3), SaeSpec("topk", 96, k=6, seed=4),
                                    SaeSpec("jumprelu", 96, l1=0.5, seed=6)])
def test_a_sweep_member_equals_the_same_run_alone(small_model, tmp_path, member):
    sweep = [SaeSpec("relu", 96, l1=0.5, seed=1), member, SaeSpec("relu", 96, l1=8.0, seed=2),
             SaeSpec("topk", 96, k=3, seed=5), SaeSpec("relu", 64, l1=1.0), SaeSpec("jumprelu", 96, l1=2.0, seed=7)]
    together = Trainer(small_model, _config(sweep), tmp_path / "sweep").run()
    alone = Trainer(small_model, _config([member]), tmp_path / "alone").run()
    group = next(e for e in together.ensembles if member in e.specs)
    n = group.specs.index(member)
    for key, value in alone.ensembles[0].member_weights(0).items():
        torch.testing.assert_close(group.member_weights(n)[key], value, atol=2e-4, rtol=1e-3)
    assert len(together.ensembles) == 4  # relu-96, topk-96, relu-64, jumprelu-96 stacks


RELU_LAYOUTS = [dict(), dict(l1_mode="unit_norm"), dict(tied=True), dict(decoder_bias=False),
                dict(tied=True, decoder_bias=False, l1_mode="unit_norm")]


@pytest.mark.parametrize("layout", RELU_LAYOUTS, ids=lambda layout: ",".join(f"{k}={v}" for k, v in layout.items()) or "default")
def test_fused_relu_loss_equals_autograd(layout):
    """The hand-written forward/backward (ReluLoss) against plain autograd of the same formula, in float64."""
    ensemble = Ensemble([SaeSpec("relu", 64, l1=l1, seed=s, **layout) for s, l1 in enumerate((0.5, 2.0, 8.0))],
                        d_in=16, b_dec_init=torch.randn(16, generator=torch.Generator().manual_seed(1))).double()
    with torch.no_grad():
        ensemble.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x = torch.randn(100, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    results = {}
    for reference in (True, False):
        ensemble.zero_grad()
        out = ensemble.losses(x[:60], total_variance=(x - x.mean(0)).pow(2).sum(), reference=reference)
        (out["loss"] * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()  # members weighted apart
        results[reference] = out, {name: p.grad.clone() for name, p in ensemble.named_parameters()}
    (want, want_grads), (got, got_grads) = results[True], results[False]
    assert got["loss"].grad_fn is not None and 0 < float(got["l0"].min()) < 64
    for key in ("loss", "mse", "fvu", "l0"):
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=1e-12, atol=1e-12)
    assert torch.equal(got["fired"], want["fired"])
    assert set(got_grads) == set(want_grads) == {"W_dec", "b_enc"} | ({"b_dec"} if layout.get("decoder_bias", True) else set()) \
        | (set() if layout.get("tied") else {"W_enc"})
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_sparse_topk_loss_equals_dense_autograd():
    """The topk path (one dense encoder matmul, gathered pre-activations, embedding_bag decode,
    AuxK on the dead latents) against the dense formula with plain autograd, in float64."""
    ensemble = Ensemble([SaeSpec("topk", 64, k=k, seed=s) for s, k in enumerate((3, 5, 8))], d_in=16,
                        b_dec_init=torch.randn(16, generator=torch.Generator().manual_seed(1))).double()
    with torch.no_grad():
        ensemble.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x = torch.randn(100, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    dead = torch.rand(3, 64, generator=torch.Generator().manual_seed(4)) < 0.3
    dead[2] = False  # a member without dead latents has no AuxK term
    results = {}
    for reference in (True, False):
        ensemble.zero_grad()
        out = ensemble.losses(x[:60], dead, 0.5, (x - x.mean(0)).pow(2).sum(), reference=reference)
        ((out["loss"] + out["aux"]) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
        results[reference] = out, {name: p.grad.clone() for name, p in ensemble.named_parameters()}
    (want, want_grads), (got, got_grads) = results[True], results[False]
    assert float(got["aux"][0].detach()) > 0 and float(got["aux"][2].detach()) == 0
    for key in ("loss", "aux", "mse", "fvu", "l0"):
        torch.testing.assert_close(got[key].double(), want[key].double(), rtol=1e-12, atol=1e-12)
    assert torch.equal(got["fired"], want["fired"]) and torch.equal(got["counts"], want["counts"])
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_relu_loss_in_bfloat16_stays_close_to_float32():
    """The CUDA path runs the fused matmuls in bfloat16; on the CPU the same code gives gradients within bf16 rounding."""
    ensemble = Ensemble([SaeSpec("relu", 256, l1=1.0, seed=s) for s in range(2)], d_in=32,
                        b_dec_init=torch.randn(32, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(1))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        ensemble.zero_grad()
        out = ensemble.losses(x, dtype=dtype)
        out["loss"].sum().backward()
        results[dtype] = out["loss"].detach(), {name: p.grad.clone() for name, p in ensemble.named_parameters()}
    (loss32, grads32), (loss16, grads16) = results[torch.float32], results[torch.bfloat16]
    assert ((loss16 - loss32).abs() / loss32).max() < 1e-2
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32
        assert (grads16[name] - grad).norm() / grad.norm() < 2e-2, name


@pytest.mark.parametrize("spec", [SaeSpec("topk", 64, k=5), SaeSpec("jumprelu", 64, l1=1.0), SaeSpec("relu", 64, l1=1.0, tied=True)],
                         ids=lambda spec: spec.label())
def test_encode_gives_the_gradients_of_the_plain_formula(spec):
    """Ensemble.encode takes b_dec's gradient from a zero-valued term; values and gradients
    equal those of ``(x − b_dec) · W_enc + b_enc`` written out."""
    ensemble = Ensemble([spec, dataclasses.replace(spec, seed=1)], d_in=16,
                        b_dec_init=torch.randn(16, generator=torch.Generator().manual_seed(1))).double()
    x = torch.randn(50, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(2, 50, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for plain in (False, True):
        ensemble.zero_grad()
        if plain:
            pre = (x.unsqueeze(0) - ensemble.b_dec.unsqueeze(1)) @ ensemble.encoder + ensemble.b_enc.unsqueeze(1)
        else:
            pre, _ = ensemble.encode(x)
        (pre * weights).sum().backward()
        grads.append((pre.detach(), {name: p.grad.clone() for name, p in ensemble.named_parameters() if p.grad is not None}))
    (pre, got), (pre_plain, want) = grads
    torch.testing.assert_close(pre, pre_plain, rtol=1e-12, atol=1e-12)
    assert set(got) == set(want) and "b_dec" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)


def test_jumprelu_straight_through_gradients_are_finite_differences_of_the_kernel():
    """With a rectangle kernel, the L0 term's gradient to θ is exactly the central difference
    of the firing count with step ε; the jump's gradient to θ is −θ times the count near θ over ε."""
    from dictionaries.training.ensemble import JumpRelu, Step

    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(2, 500, 8, dtype=torch.float64, generator=generator)  # (N, B, F)
    threshold = torch.rand(2, 8, dtype=torch.float64, generator=generator).add_(0.2).requires_grad_()
    eps = 0.1
    Step.apply(pre, threshold, eps).sum().backward()

    def count(t):
        return (pre > t.unsqueeze(1)).sum(1).double()

    with torch.no_grad():
        central = (count(threshold + eps / 2) - count(threshold - eps / 2)) / eps
    torch.testing.assert_close(threshold.grad, central)
    assert threshold.grad.lt(0).any()

    threshold.grad = None
    pre.requires_grad_()
    weights = torch.randn(2, 500, 8, dtype=torch.float64, generator=generator)
    f = JumpRelu.apply(pre, threshold, eps)
    assert torch.equal(f, torch.where(pre > threshold.unsqueeze(1), pre, 0.0))
    (f * weights).sum().backward()
    with torch.no_grad():
        near = ((pre - threshold.unsqueeze(1)).abs() < eps / 2).double()
        torch.testing.assert_close(pre.grad, weights * (pre > threshold.unsqueeze(1)))
        torch.testing.assert_close(threshold.grad, -(threshold.unsqueeze(1) * near * weights).sum(1) / eps)


def test_jumprelu_training_trades_l0_for_reconstruction(small_model, tmp_path):
    """A larger L0 coefficient raises the thresholds and lowers l0; the store serves the result."""
    specs = [SaeSpec("jumprelu", 128, l1=l1) for l1 in (0.01, 1.0)]
    store = DictionaryStore(tmp_path / "store")
    published = train_and_publish(small_model, _config(specs, tokens=24576, learning_rate=1e-2), name="jr", store=store,
                                  run_dir=tmp_path / "run", progress=False, heldout_windows_count=16, feature_windows=8)
    weak, strong = (entry["metrics"] for entry in published)
    assert strong["l0"] < weak["l0"] and strong["fvu"] > weak["fvu"]
    assert 0 < weak["fvu"] < 1 and 0 < strong["l0"] < 128
    dictionary = store.load(published[1]["name"])
    assert dictionary.config.architecture == "jumprelu"
    assert float(dictionary.threshold.mean()) > specs[1].threshold  # the L0 penalty pushed the thresholds up from their start


def test_bfloat16_runs_follow_float32_runs(small_model, tmp_path):
    """dtype="bfloat16" (autocast for topk/jumprelu, the fused loss's casts for relu) trains the
    same dictionaries as float32 up to bfloat16 rounding."""
    specs = [SaeSpec("relu", 64, l1=1.0), SaeSpec("topk", 64, k=4), SaeSpec("jumprelu", 64, l1=0.5)]
    runs = {dtype: Trainer(small_model, _config(specs, dtype=dtype), tmp_path / dtype).run()
            for dtype in ("float32", "bfloat16")}
    with pytest.raises(ValueError, match="dtype"):
        _config(specs, dtype="float16")
    for a, b in zip(runs["float32"].ensembles, runs["bfloat16"].ensembles):
        assert b.W_dec.dtype == torch.float32
        assert (a.W_dec - b.W_dec).norm() / a.W_dec.norm() < 0.05, a.architecture
    for a, b in zip(runs["float32"].log[-1]["members"], runs["bfloat16"].log[-1]["members"]):
        assert abs(a["fvu"] - b["fvu"]) < 0.05 * a["fvu"]


def test_resume_equals_uninterrupted(small_model, tmp_path):
    specs = [SaeSpec("relu", 64, l1=1.0), SaeSpec("relu", 64, l1=4.0, seed=1), SaeSpec("topk", 64, k=4)]
    config = _config(specs, checkpoint_every=1536)
    straight = Trainer(small_model, config, tmp_path / "straight").run()

    class Stop(Exception):
        pass

    def stop_after_step_7(tokens, record):
        if record["step"] == 7:
            raise Stop

    interrupted = Trainer(small_model, config, tmp_path / "resumed")
    with pytest.raises(Stop):
        interrupted.run(progress=stop_after_step_7)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 6
    resumed = Trainer(small_model, config, tmp_path / "resumed").run(resume=True)
    assert resumed.tokens_seen == straight.tokens_seen == 6144
    for a, b in zip(straight.ensembles, resumed.ensembles):
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="different settings"):
        Trainer(small_model, _config(specs, checkpoint_every=1536, learning_rate=1e-2), tmp_path / "resumed").run(resume=True)


def test_dead_features_are_detected_and_resampled(small_model, tmp_path):
    ensemble = Ensemble([SaeSpec("relu", 32, l1=1.0), SaeSpec("relu", 32, l1=1.0, seed=1)], d_in=32)
    optimizer = torch.optim.Adam(ensemble.parameters())
    x = torch.randn(256, 32)
    with torch.no_grad():
        ensemble.b_enc[0, :5] = -1e3  # features 0..4 of member 0 can never fire
    out = ensemble.losses(x)
    out["loss"].sum().backward()
    optimizer.step()
    dead = ~out["fired"]
    assert dead[0, :5].all() and not dead[1].any()
    assert resample_dead(ensemble, optimizer, dead, x, torch.Generator().manual_seed(0)) == int(dead.sum())
    assert (ensemble.b_enc[0, :5] == 0).all()
    assert optimizer.state[ensemble.b_enc]["exp_avg"][0, :5].eq(0).all()
    assert ensemble.encode(x)[1][0, :, :5].gt(0).any(0).all()  # they fire again

    # In a run, a strong L1 with a high learning rate kills relu features; the trainer sees
    # them die (dead = no firing in the last dead_window tokens) and resamples them.
    run = Trainer(small_model, _config([SaeSpec("relu", 128, l1=100.0)], dead_window=1024, tokens=16384,
                                       learning_rate=3e-2), tmp_path).run()
    resampling = [i for i, r in enumerate(run.log) if r["resampled"]]
    assert resampling
    first = run.log[resampling[0]]
    assert first["resampled"] == round(first["members"][0]["dead"] * 128) > 0
    assert run.log[resampling[0] + 1]["members"][0]["dead"] < first["members"][0]["dead"]
    assert run.log[resampling[0] + 1]["members"][0]["l0"] > first["members"][0]["l0"]


def test_revive_raises_the_bias_of_rarely_firing_latents():
    """revive folds a batch's firing rates into the running average and raises the encoder bias
    of latents under `below` of their own member's mean rate (topk: k/F), and of nothing else."""
    ensemble = Ensemble([SaeSpec("topk", 8, k=2), SaeSpec("topk", 8, k=4, seed=1)], d_in=4)
    rate = torch.tensor([[0.25] * 8, [0.5] * 8])  # each member's mean: 2/8 and 4/8
    batch = torch.zeros(2, 8)
    batch[0, :4] = 0.5  # member 0: latents 0-3 fire, 4-7 stop
    batch[1, 1:] = 0.6  # member 1: only latent 0 stops
    before = ensemble.b_enc.detach().clone()
    revive(ensemble, rate, batch, 0.01, 0.8)
    want = RATE_DECAY * torch.tensor([[0.25] * 8, [0.5] * 8]) + (1 - RATE_DECAY) * batch
    torch.testing.assert_close(rate, want)
    raised = rate < 0.8 * torch.tensor([[0.25], [0.5]])  # the stopped ones are at 0.2 and 0.4: not under yet
    assert not raised.any() and torch.equal(ensemble.b_enc, before)
    for _ in range(3):  # the stopped latents' averages fall under 80% of the mean; the others' do not
        revive(ensemble, rate, batch, 0.01, 0.8)
    raised = torch.zeros(2, 8, dtype=torch.bool)
    raised[0, 4:] = True
    raised[1, 0] = True
    assert torch.equal(rate < 0.8 * torch.tensor([[0.25], [0.5]]), raised)
    delta = ensemble.b_enc.detach() - before
    assert torch.all(delta[~raised] == 0) and torch.all(delta[raised] > 0)
    stopped = rate.clone()
    revive(ensemble, rate, batch, 0.0, 0.8)  # step 0: averages still kept, biases left alone
    assert torch.equal(ensemble.b_enc.detach() - before, delta) and not torch.equal(rate, stopped)

    # relu: the first batch sets the averages (a run starts them unset), and the mean is the batch's L0 / F
    relu = Ensemble([SaeSpec("relu", 4, l1=1.0)], d_in=4)
    rate = torch.full((1, 4), torch.nan)
    first = torch.tensor([[0.4, 0.4, 0.2, 0.0]])  # mean 0.25
    revive(relu, rate, first, 0.01, 0.5)
    assert torch.equal(rate, first) and torch.equal(relu.b_enc.detach(), torch.tensor([[0.0, 0.0, 0.0, 0.01]]))


def test_revive_keeps_topk_latents_alive_at_a_high_rate(small_model, tmp_path):
    """At a learning rate where topk latents stop firing, the revived run keeps them in use:
    counted on the last 2,048 training tokens and on held-out text, against the same run without."""
    heldout = torch.cat(list(ActivationSource(small_model, ActivationSpec(
        hook=HOOK, tokens=4096, corpus="builtin:pydocs/heldout", context_length=32)).batches(4096)))
    dead = {}
    for step in (0.0, 0.015):
        run = Trainer(small_model, _config([SaeSpec("topk", 256, k=8)], tokens=32768, learning_rate=1e-2,
                                           revive_step=step), tmp_path / str(step)).run()
        ensemble = run.ensembles[0]
        with torch.no_grad():
            fired = ensemble.encode(heldout * run.scale)[1][0].gt(0).any(0)
        dead[step] = float(run.dead[0].float().mean()), float((~fired).float().mean())
    assert dead[0.0][0] > 0.2 and dead[0.0][1] > 0.2  # without: latents die (measured 42% and 40%)
    assert dead[0.015][0] < 0.05 and dead[0.015][1] < 0.05  # with: 2.0% and 1.6%


def test_revive_keeps_relu_features_alive_at_a_target_l0(small_model, tmp_path):
    """relu members trained to a small L0 leave many features silent; with revival fewer are,
    counted by the trainer (no firing in the last 2,048 tokens), at the same L0."""
    dead, l0 = {}, {}
    for step in (0.0, 0.003):
        run = Trainer(small_model, _config([SaeSpec("relu", 256, l1=0.01, target_l0=8)], tokens=32768,
                                           learning_rate=None, resample_every=None, revive_step=step),
                      tmp_path / str(step)).run()
        dead[step], l0[step] = float(run.dead[0].float().mean()), run.log[-1]["members"][0]["l0"]
    assert dead[0.0] > 0.3 and dead[0.003] < 0.7 * dead[0.0], dead  # measured 48% and 26%
    assert abs(l0[0.003] - l0[0.0]) < 1.0, l0


def test_published_dictionaries_load_through_the_store(small_model, tmp_path):
    store = DictionaryStore(tmp_path / "store")
    specs = [SaeSpec("relu", 64, l1=1.0), SaeSpec("topk", 64, k=4)]
    published = train_and_publish(small_model, _config(specs), name="small", store=store, run_dir=tmp_path / "run",
                                  progress=False, heldout_windows_count=16, feature_windows=8)
    assert [p["name"] for p in published] == ["small-relu-f64-l1-1", "small-topk-f64-k4"]
    for entry in published:
        dictionary = store.load(entry["name"])
        info = store.info(entry["name"])
        metrics = info["metrics"]
        assert 0 < metrics["fvu"] < 1.5 and metrics["l0"] > 0 and 0 <= metrics["dead_fraction"] <= 1
        assert metrics["dead_window_tokens"] == 16 * 32
        assert set(metrics["mmcs"]) == {p["name"] for p in published} - {entry["name"]}
        assert info["config"]["normalization"]["kind"] == "scale"
        assert info["config"]["model"]["sha256"] == small_model.info.sha256
        assert {"features.json", "features.safetensors", "metrics.json"} <= set(info["files"])
        features = load_file(store.path(entry["name"]) / "features.safetensors")
        assert features["density"].shape == (64,) and features["lens_promoted"].shape == (64, 10)
        # a top context's centre token carries the recorded maximum activation
        feature = int(features["density"].argmax())
        centre = json.loads((store.path(entry["name"]) / "features.json").read_text())["context_center"]
        assert abs(float(features["context_acts"][feature, 0, centre]) - float(features["context_max"][feature, 0])) < 1e-5
        x = torch.randn(4, 32)
        assert dictionary(x).shape == (4, 32)
    assert (tmp_path / "run" / "log.jsonl").read_text().count("\n") == 12
