"""Schemathesis (an independent API fuzzer) against the running app's /openapi.json: every
operation, as a user and as an admin, with ``--checks all``; it must find 0 failures.

Bounded: ``EXAMPLES`` generated cases an operation in the fuzzing phase (plus schemathesis's
own examples and coverage cases), one seed, loopback only, a 30 s timeout a request.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import report
from tests.service.conftest import ADMIN_KEY, USER_KEY, auth, start_keyed_app

EXAMPLES = 100
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def fuzzed(server):
    from service.app import delete_app
    from service.model_server import Limits

    # the default body cap (64 KiB) is above what the schema lets a body hold; a short generation cap
    # keeps generated requests cheap; one job a key, on half a CPU (the run cancels them after)
    url = start_keyed_app(server, "fuzzed", limits=Limits(max_new_tokens=4, max_prompt_tokens=64, max_edits=4,
                                                         max_jobs_per_key=1, max_upload_bytes=1 << 20, job_cpus=0.5))
    yield url
    for kind in ("evaluations", "trainings"):  # what the fuzzer started: cancel it
        for job in requests.get(f"{url}/v1/{kind}", headers=auth(ADMIN_KEY), timeout=60).json()["data"]:
            requests.delete(f"{url}/v1/{kind}/{job['id']}", headers=auth(ADMIN_KEY), timeout=60)
    delete_app("fuzzed")


def _schemathesis(url: str, key: str, workdir: Path) -> tuple[int, str]:
    command = [str(Path(sys.executable).with_name("st")), "--config-file", str(CONFIG), "run", url + "/openapi.json",
               "--url", url, "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", "14",
               "--phases", "examples,coverage,fuzzing", "--generation-database", "none", "--workers", "2",
               "--request-timeout", "30", "--no-color", "-H", f"Authorization: Bearer {key}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=workdir)  # its cache goes there
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("role, key", [("user", USER_KEY), ("admin", ADMIN_KEY)])
def test_schemathesis_finds_nothing(fuzzed, role, key, tmp_path):
    code, output = _schemathesis(fuzzed, key, tmp_path)
    operations = re.search(r"Selected: (\d+)/(\d+)", output)
    cases = re.search(r"(\d+) generated, (\d+) passed", output)
    report(f"schemathesis as {role}: {operations.group(1) if operations else '?'} operations, "
          f"{cases.group(1) if cases else '?'} cases generated, {cases.group(2) if cases else '?'} passed "
          f"({EXAMPLES} examples an operation in fuzzing, plus examples and coverage cases)")
    assert code == 0, output[-8000:]
    assert operations and operations.group(1) == operations.group(2)  # every operation
    assert cases and cases.group(1) == cases.group(2)
