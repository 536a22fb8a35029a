"""Encode, decode, forward and subset-encode, checked against an independent computation."""

import pytest
import torch

from dictionaries.config import DictionaryConfig, DictionaryError
from dictionaries.sae import Dictionary
from tests.dictionaries.helpers import HOOK, make, reference_decode, reference_encode

ARCHS = ["relu", "topk", "jumprelu"]
NORMS = [{"kind": "none"}, {"kind": "scale", "factor": 0.5}, {"kind": "constant_norm_rescale"}, {"kind": "layer_norm", "eps": 1e-5}]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("normalization", NORMS, ids=lambda n: n["kind"])
def test_encode_decode_match_reference(arch, normalization):
    dictionary = make(arch, normalization=normalization)
    x = torch.randn(2, 7, 16) * 3  # leading dims (batch, position)
    f = dictionary.encode(x)
    expected_f, out_scale, shift = reference_encode(dictionary, x)
    assert f.shape == (2, 7, 48)
    torch.testing.assert_close(f.double(), expected_f, atol=1e-5, rtol=1e-5)
    assert torch.equal(f > 0, expected_f > 0) or arch == "jumprelu"  # jumprelu: ties at the threshold are measure-zero
    reconstruction = dictionary(x)
    torch.testing.assert_close(reconstruction.double(), reference_decode(dictionary, expected_f, out_scale, shift),
                               atol=1e-4, rtol=1e-5)
    _, state = dictionary.normalize(x)
    torch.testing.assert_close(dictionary.decode(f, state), reconstruction)


def test_topk_keeps_k_and_jumprelu_respects_threshold():
    topk = make("topk", k=3)
    x = torch.randn(50, 16)
    assert ((topk.encode(x) > 0).sum(-1) <= 3).all()
    jump = make("jumprelu")
    pre = jump.pre_activations(x)
    f = jump.encode(x)
    assert torch.equal(f > 0, (pre > jump.threshold) & (pre > 0))


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "topk"])
@pytest.mark.parametrize("normalization", NORMS[:3], ids=lambda n: n["kind"])
def test_subset_encode_equals_full_encode_columns(arch, normalization):
    dictionary = make(arch, d_sae=4096, normalization=normalization)
    features = torch.tensor([4095, 0, 17, 17, 2048])
    for shape in [(1, 16), (3, 11, 16)]:
        x = torch.randn(shape)
        full = dictionary.encode(x)[..., features]
        subset = dictionary.encode_subset(x, features)
        # Same math, a narrower matmul: BLAS may round the last bit differently.
        torch.testing.assert_close(subset, full, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision(arch, dtype):
    full = make(arch)
    half = Dictionary.from_config(
        DictionaryConfig(**{**full.config.__dict__, "dtype": dtype}),
        {k: v.to(getattr(torch, dtype)) for k, v in full.weights().items()},
    )
    x = torch.randn(4, 16)
    assert half.encode(x).dtype == getattr(torch, dtype)
    if arch == "relu":  # no discrete selection: the half result is close to the float one
        torch.testing.assert_close(half(x).float(), full(x), atol=0.1, rtol=0.05)


def test_delta_is_the_change_of_the_reconstruction():
    dictionary = make("relu", normalization={"kind": "constant_norm_rescale"})
    x = torch.randn(5, 16)
    x_normed, state = dictionary.normalize(x)
    f = dictionary.activation(dictionary.pre_activations(x_normed))
    features = torch.tensor([3, 9])
    edited = f.clone()
    edited[:, features] = torch.tensor([2.0, 0.0])
    expected = dictionary.decode(edited, state) - dictionary.decode(f, state)
    torch.testing.assert_close(dictionary.delta(edited[:, features] - f[:, features], features, state), expected,
                               atol=1e-5, rtol=1e-5)


def test_per_token_normalisation_needs_state_to_decode():
    dictionary = make("relu", normalization={"kind": "layer_norm"})
    with pytest.raises(DictionaryError, match="NormState"):
        dictionary.decode(torch.zeros(48))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architecture": "gated"}, "'architecture'"),
        ({"d_in": 0}, "'d_in'"),
        ({"architecture": "topk", "k": 0}, "'k'"),
        ({"architecture": "topk", "k": None}, "'k'"),
        ({"k": 3}, "'k' applies to topk"),
        ({"hook": "blocks.1.hook_mlp_out"}, "'hook'"),
        ({"dtype": "float64"}, "'dtype'"),
        ({"normalization": {"kind": "scale", "factor": float("nan")}}, "'normalization'"),
        ({"architecture": "topk", "k": 2, "tied": True}, "'tied'"),
    ],
)
def test_config_validation_names_the_field(changes, message):
    fields = {"architecture": "relu", "d_in": 8, "d_sae": 16, "hook": HOOK, **changes}
    with pytest.raises(DictionaryError, match=message):
        DictionaryConfig(**fields)
