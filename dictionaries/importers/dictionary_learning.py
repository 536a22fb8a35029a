"""saprmarks/dictionary_learning: ``ae.pt`` (a state dict) + ``config.json``.

``ae.pt`` is read with ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers, so no code in the file can run. Supported classes
(``config.json``'s ``trainer.dict_class``):

    AutoEncoder          bias, encoder.weight [D, d], encoder.bias, decoder.weight [d, D]
                         f = ReLU(encoder(x − bias)), x̂ = decoder(f) + bias          → relu
    AutoEncoderTopK      b_dec, encoder.*, decoder.weight, k, threshold
                         f = TopK(ReLU(encoder(x − b_dec)))                          → topk
    JumpReluAutoEncoder  W_enc, b_enc, W_dec, b_dec, threshold; no b_dec on the input;
                         its features are scaled by ‖W_dec[i]‖ → folded into the
                         weights so that our features equal its features             → jumprelu

The hook point comes from ``trainer.submodule_name`` (``resid_post_layer_3``) or
``trainer.layer``, or ``--hook``; the model from ``trainer.lm_name``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dictionaries.config import DictionaryConfig, DictionaryError
from dictionaries.format import read_json
from dictionaries.importers.common import build, dtype_name, expect_shape, hook_or_fail, require

CONFIG = "config.json"
WEIGHTS = "ae.pt"
_SUBMODULE = re.compile(r"^resid_(post|pre)_layer_(\d+)$")


def _hook_from(trainer: dict) -> str | None:
    match = _SUBMODULE.match(str(trainer.get("submodule_name", "")))
    if match:
        return f"blocks.{match.group(2)}.hook_resid_{match.group(1)}"
    return None


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DictionaryError(f"dictionary_learning {WEIGHTS}: file is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickled code refused by weights_only, ...
        raise DictionaryError(f"dictionary_learning {WEIGHTS}: not a loadable weights-only state dict ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DictionaryError(f"dictionary_learning {WEIGHTS}: expected a state dict of tensors")
    return state


def import_dictionary_learning(path: Path, *, model: str | None = None, hook: str | None = None):
    cfg = read_json(path / CONFIG, f"dictionary_learning {CONFIG}")
    trainer = cfg.get("trainer") or {}
    state = _load_state_dict(path / WEIGHTS)
    what = f"dictionary_learning {WEIGHTS}"
    dict_class = trainer.get("dict_class", "AutoEncoder")
    d_in, d_sae = trainer.get("activation_dim"), trainer.get("dict_size")
    if not isinstance(d_in, int) or not isinstance(d_sae, int):
        raise DictionaryError(f"dictionary_learning {CONFIG}: 'trainer.activation_dim' and 'trainer.dict_size' must be integers")
    hook = hook_or_fail(hook or _hook_from(trainer), f"dictionary_learning {CONFIG} (trainer.submodule_name)")
    common = dict(d_in=d_in, d_sae=d_sae, hook=hook, model_name=model or trainer.get("lm_name") or "",
                  provenance={"imported_from": "dictionary_learning", "source": str(path), "dict_class": dict_class})

    if dict_class in ("AutoEncoder", "AutoEncoderTopK"):
        # the two nn.Linear layouts differ only in the name of the shared bias
        bias = "bias" if dict_class == "AutoEncoder" else "b_dec"
        require(what, state, bias, "encoder.weight", "encoder.bias", "decoder.weight")
        expect_shape(what, "encoder.weight", state["encoder.weight"], (d_sae, d_in))
        expect_shape(what, "encoder.bias", state["encoder.bias"], (d_sae,))
        expect_shape(what, "decoder.weight", state["decoder.weight"], (d_in, d_sae))
        expect_shape(what, bias, state[bias], (d_in,))
        native = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                  "W_dec": state["decoder.weight"].T, "b_dec": state[bias]}
        if dict_class == "AutoEncoder":
            config = DictionaryConfig(architecture="relu", dtype=dtype_name(what, state[bias]), **common)
        else:
            k = int(state["k"]) if "k" in state else trainer.get("k")
            if trainer.get("k") is not None and k != trainer["k"]:
                raise DictionaryError(f"{what}: 'k' is {k} but {CONFIG} says trainer.k = {trainer['k']}")
            config = DictionaryConfig(architecture="topk", k=k, dtype=dtype_name(what, state[bias]), **common)
    elif dict_class == "JumpReluAutoEncoder":
        require(what, state, "W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        expect_shape(what, "W_enc", state["W_enc"], (d_in, d_sae))
        expect_shape(what, "W_dec", state["W_dec"], (d_sae, d_in))
        norms = state["W_dec"].norm(dim=1)  # (d_sae,)
        if not bool((norms > 0).all()):
            raise DictionaryError(f"{what}: 'W_dec' has all-zero rows; its feature scaling is undefined")
        config = DictionaryConfig(architecture="jumprelu", apply_b_dec_to_input=False,
                                  dtype=dtype_name(what, state["W_enc"]), **common)
        native = {"W_enc": state["W_enc"] * norms, "b_enc": state["b_enc"] * norms,
                  "W_dec": state["W_dec"] / norms[:, None], "b_dec": state["b_dec"],
                  "threshold": state["threshold"] * norms}
    else:
        raise DictionaryError(
            f"dictionary_learning {CONFIG}: dict_class {dict_class!r} is not supported "
            "(AutoEncoder, AutoEncoderTopK, JumpReluAutoEncoder)"
        )
    return build(config, native, what)
