"""Importers: files laid out exactly as each peer library writes them, and that library's
own forward pass (re-implemented here from its documented math) as the reference."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dictionaries.config import DictionaryError
from dictionaries.importers import import_dictionary
from dictionaries.store import DictionaryStore

D_IN, D_SAE = 16, 48


def _rand(*shape, scale=0.3):
    return torch.randn(*shape) * scale


# --- SAELens -------------------------------------------------------------------------------

def _write_saelens(path, architecture="standard", flat=False, normalize="none", apply_b_dec=True, k=4):
    path.mkdir(parents=True)
    weights = {"W_enc": _rand(D_IN, D_SAE), "b_enc": _rand(D_SAE, scale=0.1), "W_dec": _rand(D_SAE, D_IN),
               "b_dec": _rand(D_IN, scale=0.1)}
    if architecture == "jumprelu":
        weights["threshold"] = torch.rand(D_SAE) * 0.2
    save_file(weights, path / "sae_weights.safetensors")
    if flat:
        cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
               "model_name": "pythia-70m-deduped", "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3,
               "hook_head_index": None, "activation_fn_str": "topk" if architecture == "topk" else "relu",
               "activation_fn_kwargs": {"k": k} if architecture == "topk" else {}, "apply_b_dec_to_input": apply_b_dec,
               "finetuning_scaling_factor": False, "normalize_activations": normalize, "context_size": 128,
               "prepend_bos": True, "dataset_path": "monology/pile-uncopyrighted", "sae_lens_training_version": "3.13.0"}
    else:
        cfg = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": apply_b_dec, "normalize_activations": normalize, "reshape_activations": "none",
               "metadata": {"model_name": "pythia-70m-deduped", "hook_name": "blocks.3.hook_resid_post",
                            "hook_head_index": None, "prepend_bos": True, "context_size": 128,
                            "sae_lens_version": "6.12.1", "sae_lens_training_version": "6.12.1"}}
        if architecture == "topk":
            cfg["k"] = k
    (path / "cfg.json").write_text(json.dumps(cfg))
    return weights


def _saelens_forward(w, x, architecture, normalize="none", apply_b_dec=True, k=4):
    """SAELens' inference path: process_sae_in → encode → decode → norm out."""
    out = lambda y: y  # noqa: E731
    if normalize == "constant_norm_rescale":
        coeff = D_IN**0.5 / x.norm(dim=-1, keepdim=True)
        x, out = x * coeff, (lambda y: y / coeff)
    elif normalize == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        x, out = (x - mu) / (std + 1e-5), (lambda y: y * std + mu)
    sae_in = x - w["b_dec"] * apply_b_dec
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        acts = torch.relu(hidden_pre)
    elif architecture == "jumprelu":
        acts = torch.relu(hidden_pre) * (hidden_pre > w["threshold"])
    else:
        top = torch.topk(hidden_pre, k, dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    return acts, out(acts @ w["W_dec"] + w["b_dec"])


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("normalize", ["none", "constant_norm_rescale", "layer_norm"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_v6(tmp_path, architecture, normalize, apply_b_dec):
    weights = _write_saelens(tmp_path / "sae", architecture, normalize=normalize, apply_b_dec=apply_b_dec)
    dictionary = import_dictionary(tmp_path / "sae", "saelens")
    assert dictionary.config.hook == "blocks.3.hook_resid_post"
    assert dictionary.config.model_name == "pythia-70m-deduped"
    x = torch.randn(4, 5, D_IN)
    acts, reconstruction = _saelens_forward(weights, x, architecture, normalize, apply_b_dec)
    torch.testing.assert_close(dictionary.encode(x), acts, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dictionary(x), reconstruction, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_saelens_flat_pre6_config(tmp_path, architecture):
    weights = _write_saelens(tmp_path / "sae", architecture, flat=True)
    dictionary = import_dictionary(tmp_path / "sae", "saelens", model="pythia-tiny", hook="blocks.1.hook_resid_pre")
    assert dictionary.config.architecture == ("topk" if architecture == "topk" else "relu")
    assert (dictionary.config.model_name, dictionary.config.hook) == ("pythia-tiny", "blocks.1.hook_resid_pre")
    assert dictionary.config.provenance["config_style"] == "flat"
    x = torch.randn(6, D_IN)
    torch.testing.assert_close(dictionary.encode(x), _saelens_forward(weights, x, architecture)[0], atol=1e-6, rtol=1e-6)


def test_saelens_refusals(tmp_path):
    _write_saelens(tmp_path / "gated", "gated")
    with pytest.raises(DictionaryError, match="architecture 'gated' is not supported"):
        import_dictionary(tmp_path / "gated", "saelens")
    _write_saelens(tmp_path / "scaled", normalize="expected_average_only_in")
    with pytest.raises(DictionaryError, match="expected_average_only_in"):
        import_dictionary(tmp_path / "scaled", "saelens")
    weights = _write_saelens(tmp_path / "bad-shape")
    weights["W_enc"] = weights["W_enc"][:, :40].contiguous()
    save_file(weights, tmp_path / "bad-shape" / "sae_weights.safetensors")
    with pytest.raises(DictionaryError, match=r"'W_enc' has shape \[16, 40\]; expected \[16, 48\]"):
        import_dictionary(tmp_path / "bad-shape", "saelens")
    (tmp_path / "bad-shape" / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(DictionaryError, match="SAELens sae_weights.safetensors: not a readable"):
        import_dictionary(tmp_path / "bad-shape", "saelens")


# --- sparsify ----------------------------------------------------------------------------------

def _write_sparsify(root, hookpoint="layers.2", **cfg_changes):
    path = root / hookpoint
    path.mkdir(parents=True)
    encoder = nn.Linear(D_IN, D_SAE)
    weights = {"encoder.weight": encoder.weight.detach().clone(), "encoder.bias": _rand(D_SAE, scale=0.1),
               "W_dec": _rand(D_SAE, D_IN), "b_dec": _rand(D_IN, scale=0.1)}
    save_file(weights, path / "sae.safetensors")
    cfg = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": D_SAE, "k": 4,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **cfg_changes}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path, weights


def _sparsify_forward(w, x, k=4):
    """sparsify: top-k of ReLU(encoder(x − b_dec)); decode as a weighted sum of W_dec rows."""
    pre = torch.relu(nn.functional.linear(x - w["b_dec"], w["encoder.weight"], w["encoder.bias"]))
    top_acts, top_indices = pre.topk(k, sorted=False)
    decoded = nn.functional.embedding_bag(top_indices, w["W_dec"], per_sample_weights=top_acts, mode="sum")
    dense = torch.zeros_like(pre).scatter(-1, top_indices, top_acts)
    return dense, decoded + w["b_dec"]


def test_sparsify(tmp_path):
    path, weights = _write_sparsify(tmp_path)
    dictionary = import_dictionary(path, "sparsify", model="EleutherAI/pythia-70m")
    assert dictionary.config.hook == "blocks.2.hook_resid_post" and dictionary.config.k == 4
    x = torch.randn(20, D_IN)
    acts, reconstruction = _sparsify_forward(weights, x)
    torch.testing.assert_close(dictionary.encode(x), acts, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dictionary(x), reconstruction, atol=1e-5, rtol=1e-5)


def test_sparsify_refusals(tmp_path):
    path, _ = _write_sparsify(tmp_path / "a", transcode=True)
    with pytest.raises(DictionaryError, match="transcoders are not supported"):
        import_dictionary(path, "sparsify")
    path, _ = _write_sparsify(tmp_path / "b", hookpoint="embed_out")
    with pytest.raises(DictionaryError, match="pass --hook"):
        import_dictionary(path, "sparsify")
    path, _ = _write_sparsify(tmp_path / "c", num_latents=50)
    with pytest.raises(DictionaryError, match=r"'encoder.weight' has shape \[48, 16\]; expected \[50, 16\]"):
        import_dictionary(path, "sparsify")


# --- dictionary_learning -----------------------------------------------------------------------

class _DLAutoEncoder(nn.Module):
    """dictionary_learning's AutoEncoder layout."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(_rand(D_IN, scale=0.1))
        self.encoder = nn.Linear(D_IN, D_SAE, bias=True)
        self.decoder = nn.Linear(D_SAE, D_IN, bias=False)

    def encode(self, x):
        return nn.ReLU()(self.encoder(x - self.bias))

    def decode(self, f):
        return self.decoder(f) + self.bias


class _DLTopK(nn.Module):
    """dictionary_learning's AutoEncoderTopK layout (k and threshold are buffers)."""

    def __init__(self, k=4):
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.decoder = nn.Linear(D_SAE, D_IN, bias=False)
        self.encoder = nn.Linear(D_IN, D_SAE)
        self.b_dec = nn.Parameter(_rand(D_IN, scale=0.1))

    def encode(self, x):
        post_relu = nn.functional.relu(self.encoder(x - self.b_dec))
        top = post_relu.topk(int(self.k), sorted=False, dim=-1)
        return torch.zeros_like(post_relu).scatter_(-1, top.indices, top.values)

    def decode(self, f):
        return self.decoder(f) + self.b_dec


class _DLJumpRelu(nn.Module):
    """dictionary_learning's JumpReluAutoEncoder: features scaled by decoder row norms."""

    def __init__(self):
        super().__init__()
        self.W_enc = nn.Parameter(_rand(D_IN, D_SAE))
        self.b_enc = nn.Parameter(_rand(D_SAE, scale=0.1))
        self.W_dec = nn.Parameter(_rand(D_SAE, D_IN))
        self.b_dec = nn.Parameter(_rand(D_IN, scale=0.1))
        self.threshold = nn.Parameter(torch.rand(D_SAE) * 0.1)

    def encode(self, x):
        pre_jump = x @ self.W_enc + self.b_enc
        return nn.ReLU()(pre_jump * (pre_jump > self.threshold)) * self.W_dec.norm(dim=1)

    def decode(self, f):
        return (f / self.W_dec.norm(dim=1)) @ self.W_dec + self.b_dec


def _write_dl(path, module, dict_class, **trainer_changes):
    path.mkdir(parents=True)
    torch.save(module.state_dict(), path / "ae.pt")
    trainer = {"dict_class": dict_class, "trainer_class": "StandardTrainer", "activation_dim": D_IN,
               "dict_size": D_SAE, "lr": 1e-3, "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 4,
               "submodule_name": "resid_post_layer_4", "seed": 0, **trainer_changes}
    (path / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": D_IN, "io": "out",
                                                                                   "n_ctxs": 3000, "ctx_len": 128}}))


@pytest.mark.parametrize("module_class, dict_class, arch", [(_DLAutoEncoder, "AutoEncoder", "relu"),
                                                            (_DLTopK, "AutoEncoderTopK", "topk"),
                                                            (_DLJumpRelu, "JumpReluAutoEncoder", "jumprelu")])
def test_dictionary_learning(tmp_path, module_class, dict_class, arch):
    module = module_class()
    _write_dl(tmp_path / "ae", module, dict_class, **({"k": 4} if arch == "topk" else {}))
    dictionary = import_dictionary(tmp_path / "ae", "dictionary_learning")
    config = dictionary.config
    assert (config.architecture, config.hook, config.model_name) == (arch, "blocks.4.hook_resid_post",
                                                                       "EleutherAI/pythia-70m-deduped")
    x = torch.randn(3, 7, D_IN)
    with torch.no_grad():
        acts = module.encode(x)
        torch.testing.assert_close(dictionary.encode(x), acts, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dictionary.decode(dictionary.encode(x)), module.decode(acts), atol=1e-5, rtol=1e-5)


def test_dictionary_learning_refusals(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil").mkdir()
    torch.save({"bias": Payload()}, tmp_path / "evil" / "ae.pt")
    _write_dl(tmp_path / "cfg", _DLAutoEncoder(), "AutoEncoder")
    (tmp_path / "evil" / "config.json").write_bytes((tmp_path / "cfg" / "config.json").read_bytes())
    with pytest.raises(DictionaryError, match="not a loadable weights-only state dict"):
        import_dictionary(tmp_path / "evil", "dictionary_learning")

    _write_dl(tmp_path / "gated", _DLAutoEncoder(), "GatedAutoEncoder")
    with pytest.raises(DictionaryError, match="dict_class 'GatedAutoEncoder' is not supported"):
        import_dictionary(tmp_path / "gated", "dictionary_learning")
    _write_dl(tmp_path / "nohook", _DLAutoEncoder(), "AutoEncoder", submodule_name="mlp_out_layer_2")
    with pytest.raises(DictionaryError, match="pass --hook"):
        import_dictionary(tmp_path / "nohook", "dictionary_learning")
    with pytest.raises(DictionaryError, match="unknown import format"):
        import_dictionary(tmp_path / "cfg", "neuronpedia")


def test_imported_dictionaries_install_in_the_store(tmp_path):
    path, weights = _write_sparsify(tmp_path / "sp")
    store = DictionaryStore(tmp_path / "store")
    store.put("sparsify-l2", import_dictionary(path, "sparsify"))
    loaded = store.load("sparsify-l2")
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(loaded.encode(x), _sparsify_forward(weights, x)[0], atol=1e-6, rtol=1e-6)
    assert store.config("sparsify-l2").provenance["imported_from"] == "sparsify"
