"""Test session set-up: a private data home, offline hubs, and a small pythia-tiny build.

``$STEERSERVE_HOME`` points at ``.test-home/`` in the work tree (git-ignored), so tests
never touch a user's ``~/.cache/steerserve``. The small model is built once with the same
code as ``pythia-tiny`` and reused by later runs while its spec is unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_HOME = REPO / ".test-home"
os.environ["STEERSERVE_HOME"] = str(TEST_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from editing.tiny import TinySpec, build_tiny_model  # noqa: E402

# Same code path as pythia-tiny, a fraction of the size and steps: ~10 s to build.
SMALL_SPEC = TinySpec(
    vocab_size=512,
    hidden_size=32,
    num_layers=3,
    num_heads=2,
    context_length=32,
    batch_size=8,
    steps=40,
    warmup_steps=5,
    max_train_documents=80,
    max_eval_windows=24,
)


def ensure_small_model(name: str = "pythia-tiny-test", spec: TinySpec = SMALL_SPEC) -> Path:
    target = TEST_HOME / "models" / name
    card = target / "card.json"
    if card.is_file() and json.loads(card.read_text()).get("spec") == dataclasses.asdict(spec):
        return target
    build_tiny_model(target, spec, progress=False)
    return target


@pytest.fixture(scope="session")
def small_model_dir() -> Path:
    return ensure_small_model()


@pytest.fixture(scope="session")
def small_model(small_model_dir):
    from editing.model import load_model

    return load_model(str(small_model_dir))


@pytest.fixture(scope="session")
def pythia_tiny():
    """The real embedded model (built on first use: about 3.5 minutes, then cached)."""
    from editing.model import load_model

    return load_model("pythia-tiny", progress=False)


@pytest.fixture(scope="session")
def pythia_70m_shape(pythia_tiny):
    """A randomly initialised GPT-NeoX of Pythia-70M's shape, with pythia-tiny's tokenizer."""
    from editing.model import random_gpt_neox

    return random_gpt_neox(seed=0), pythia_tiny.tokenizer


@pytest.fixture(scope="session")
def default_dictionary(pythia_tiny):
    """The default pythia-tiny dictionary, trained by `steerserve train --default`'s code
    (about a minute) into the test home's store and reused while its config is unchanged."""
    import dataclasses

    from dictionaries.store import DictionaryStore
    from dictionaries.training.pipeline import DEFAULT_NAME, default_config, train_and_publish

    store = DictionaryStore()
    wanted = json.loads(json.dumps(dataclasses.asdict(default_config()), default=list))
    if DEFAULT_NAME not in store or store.config(DEFAULT_NAME).provenance.get("config") != wanted:
        train_and_publish(pythia_tiny, default_config(), name=DEFAULT_NAME, store=store, progress=False)
    return DEFAULT_NAME, store.load(DEFAULT_NAME)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


SUITE_REPORT: list[str] = []


def report(line: str) -> None:
    """Record ``line`` for the summary that ends every run: the adversarial suite's counts
    (operations fuzzed, requests under load, faults and what each ended with) show in
    ``make test``'s output, not only under ``-s``."""
    SUITE_REPORT.append(line)
    print("\n" + line)


def pytest_terminal_summary(terminalreporter):
    if SUITE_REPORT:
        terminalreporter.section("counts")
        for line in SUITE_REPORT:
            terminalreporter.write_line(line)
