"""The steerserve command, run as a user runs it."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_models_list_json(small_model_dir):
    result = _cli("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    names = [entry["name"] for entry in json.loads(result.stdout)]
    assert "pythia-tiny-test" in names and "pythia-tiny" in names


def test_models_build_refuses_unknown_names():
    result = _cli("models", "build", "gpt-5")
    assert result.returncode == 2
    assert "only built-in models" in result.stderr


def test_http_only_modules_do_not_import_torch():
    code = "import sys, clients.cli, clients.errors; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
