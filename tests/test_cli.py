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


def test_a_reader_that_stops_early_is_not_an_error(small_model_dir):
    """`steerserve ... | head`: output into a pipe whose reader has gone ends quietly with 141
    (as a process ended by SIGPIPE), not with a traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "clients.cli", "models", "list"], cwd=REPO, stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == "", result.stderr


def test_http_only_modules_do_not_import_torch():
    code = "import sys, clients.cli, clients.errors; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_dict_import_list_show_rm(tmp_path):
    from tests.dictionaries.test_importers import _write_saelens

    _write_saelens(tmp_path / "peer", "topk")
    env = {"STEERSERVE_HOME": str(tmp_path / "home")}
    result = _cli("dict", "import", str(tmp_path / "peer"), "--format", "saelens", "--name", "l3-topk",
                  "--model", "pythia-70m-deduped", env=env)
    assert result.returncode == 0, result.stderr
    assert "imported saelens topk dictionary as 'l3-topk': 48 features" in result.stdout

    listing = _cli("dict", "list", env=env)
    assert "l3-topk" in listing.stdout and "blocks.3.hook_resid_post" in listing.stdout
    shown = json.loads(_cli("dict", "show", "l3-topk", "--json", env=env).stdout)
    assert shown["config"]["k"] == 4 and shown["config"]["provenance"]["imported_from"] == "saelens"
    assert "topk dictionary, 48 features" in _cli("dict", "show", "l3-topk", env=env).stdout

    again = _cli("dict", "import", str(tmp_path / "peer"), "--format", "saelens", "--name", "l3-topk", env=env)
    assert again.returncode == 2 and "--force" in again.stderr
    bad = _cli("dict", "import", str(tmp_path / "peer"), "--format", "saelens", "--name", "../up", env=env)
    assert bad.returncode == 2 and "is not allowed" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("dict", "show", "nope", env=env)
    assert missing.returncode == 2 and "no dictionary named 'nope'" in missing.stderr

    assert _cli("dict", "rm", "l3-topk", env=env).returncode == 0
    assert "no dictionaries" in _cli("dict", "list", env=env).stdout
