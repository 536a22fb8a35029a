"""Load a GPT-NeoX causal language model by name, with its tokenizer and metadata.

    loaded = load_model("pythia-tiny")                      # built on first use
    loaded = load_model("/path/to/saved/model")             # any save_pretrained dir
    loaded = load_model("EleutherAI/pythia-70m-deduped")    # network or local HF cache
    loaded.model, loaded.tokenizer, loaded.info.n_layers

The model comes back in eval mode on the requested device and dtype. Only GPT-NeoX
(``model_type == "gpt_neox"``) is accepted: the hook points and the engine rely on its
layer layout.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from editing.home import models_dir

BUILTIN_MODELS = ("pythia-tiny",)


class ModelLoadError(ValueError):
    """The name resolves to nothing loadable, or to a model that is not GPT-NeoX."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    n_layers: int
    d_model: int
    vocab_size: int
    sha256: str  # of the weights files, in sorted order
    dtype: str
    device: str


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo


def weights_sha256(directory: Path) -> str:
    """SHA-256 over the model's weight files (``*.safetensors``, else ``*.bin``), sorted."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise ModelLoadError(f"{directory}: no weights file (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(names)}")
    return names[dtype]


def resolve_model_dir(name: str, *, build: bool = True, progress: bool = True) -> Path:
    """The local directory holding ``name``'s files, building ``pythia-tiny`` if needed."""
    if name in BUILTIN_MODELS:
        path = models_dir() / name
        if not (path / "config.json").is_file():
            if not build:
                raise ModelLoadError(f"model {name!r} is not built yet; run: steerserve models build {name}")
            from editing.tiny import build_tiny_model

            build_tiny_model(path, progress=progress)
        return path
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a saved model (no config.json)")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(
            f"model {name!r}: no such directory, not a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "and not a Hugging Face id of the form 'org/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as err:  # offline, unknown repo, no cache: all the caller's to fix
        raise ModelLoadError(f"model {name!r}: could not fetch it from the Hugging Face hub or its cache ({err})") from None


def check_gpt_neox(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type != "gpt_neox":
        raise ModelLoadError(
            f"{path}: model_type is {model_type!r}; steerserve serves GPT-NeoX (Pythia) models only"
        )
    return config


def load_model(
    name: str = "pythia-tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    progress: bool = True,
) -> LoadedModel:
    """Load a GPT-NeoX causal LM, its tokenizer and its :class:`ModelInfo`."""
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    path = resolve_model_dir(name, progress=progress)
    config = check_gpt_neox(path)
    torch_dtype = parse_dtype(dtype)
    model = GPTNeoXForCausalLM.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)  # never a pickled .bin
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    info = ModelInfo(
        name=name,
        path=str(path),
        n_layers=int(config["num_hidden_layers"]),
        d_model=int(config["hidden_size"]),
        vocab_size=int(config["vocab_size"]),
        sha256=weights_sha256(path),
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(device),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def list_models() -> list[dict]:
    """Models built under ``$STEERSERVE_HOME/models`` and GPT-NeoX models in the HF cache."""
    found = []
    root = models_dir()
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.name.startswith(".") or not (path / "config.json").is_file():
                continue
            card_path = path / "card.json"
            card = json.loads(card_path.read_text()) if card_path.is_file() else {}
            found.append({"name": path.name, "source": "built", "path": str(path),
                          "heldout_perplexity": card.get("heldout", {}).get("perplexity")})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir().repos, key=lambda r: r.repo_id):
            if repo.repo_type != "model":
                continue
            for revision in repo.revisions:
                config = Path(revision.snapshot_path) / "config.json"
                if config.is_file() and json.loads(config.read_text()).get("model_type") == "gpt_neox":
                    found.append({"name": repo.repo_id, "source": "hf-cache", "path": str(revision.snapshot_path)})
                    break
    except Exception:
        pass  # no HF cache is not an error for a listing
    for name in BUILTIN_MODELS:
        if not any(entry["name"] == name for entry in found):
            found.append({"name": name, "source": "built-in (not built yet)", "path": None})
    return found


def random_gpt_neox(*, hidden_size: int = 512, layers: int = 6, heads: int = 8, vocab_size: int = 50304,
                    seed: int = 0, device: str = "cpu"):
    """A randomly initialised GPT-NeoX, by default of Pythia-70M's shape (tests and benchmarks)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden_size, rotary_pct=0.25,
                           max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=0)
    return GPTNeoXForCausalLM(config).to(device).eval()
