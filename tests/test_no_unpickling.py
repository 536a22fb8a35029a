"""A scan that fails the suite if the package could unpickle anything: no pickle-family modules
(imported directly or from a package, as ``from ray import cloudpickle``), no ``torch.load``
without ``weights_only=True`` (nor ``from torch import load``), no ``read_pickle``, no model
``from_pretrained`` that could fall back to a pickled checkpoint (``use_safetensors=True``),
no ``numpy.load(allow_pickle=True)``, no unsafe YAML, no ``eval``/``exec``. It reads the
source with ``ast`` (imports nothing)."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("editing", "dictionaries", "service", "clients", "bench")
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def findings(source: str, filename: str = "<source>") -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            found.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.ImportFrom):
            found += [f"{where}: imports {a.name} from {node.module}" for a in node.names
                      if a.name in UNPICKLING_MODULES or (node.module == "torch" and a.name == "load")]
        elif isinstance(node, ast.Call):
            called = _name(node.func)
            if called in ("eval", "exec", "builtins.eval", "builtins.exec", "compile"):
                found.append(f"{where}: calls {called}")
            elif called.endswith("torch.load"):
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            elif called.endswith("read_pickle"):
                found.append(f"{where}: calls {called}")
            elif called.endswith(".from_pretrained") and "Tokenizer" not in called:
                safe = _keyword(node, "use_safetensors")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append(f"{where}: {called} without use_safetensors=True")
            elif called in ("numpy.load", "np.load"):
                allow = _keyword(node, "allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where}: numpy.load with allow_pickle")
            elif called in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                found.append(f"{where}: {called} (use yaml.safe_load)")
    return found


def _sources():
    """The project's own modules; hidden folders under them are generated, not ours (the quality
    benchmark's ``bench/.peers-venv`` holds the peers' installed packages)."""
    for package in PACKAGES:
        yield from sorted(path for path in (REPO / package).rglob("*.py")
                          if not any(part.startswith(".") for part in path.relative_to(REPO).parts))


@pytest.mark.parametrize("snippet", [
    "import pickle", "from pickle import loads", "import cloudpickle as cp", "import torch\ntorch.load('x')",
    "import torch\ntorch.load('x', weights_only=False)", "eval(text)", "exec(code)", "import numpy as np\nnp.load(f, allow_pickle=True)",
    "import yaml\nyaml.load(stream)", "import joblib", "import shelve", "from marshal import loads",
    "from ray import cloudpickle", "from torch import load", "import pandas as pd\npd.read_pickle(p)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(p)",
    "GPTNeoXForCausalLM.from_pretrained(p, use_safetensors=False)",
])
def test_the_scan_catches(snippet):
    assert findings(snippet), snippet


def test_the_scan_lets_safe_loading_through():
    assert findings("import torch\ntorch.load('x', weights_only=True)\nimport yaml\nyaml.safe_load(s)\n"
                    "from safetensors.torch import load_file\nload_file('x')\n"
                    "AutoTokenizer.from_pretrained(p)\nGPTNeoXForCausalLM.from_pretrained(p, use_safetensors=True)") == []


def test_the_package_never_unpickles():
    found = []
    for path in _sources():
        found += findings(path.read_text(encoding="utf-8"), str(path.relative_to(Path(REPO))))
    assert len(list(_sources())) > 40
    assert not found, "\n".join(found)
