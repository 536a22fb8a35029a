"""lm-evaluation-harness, installed from the package index into its own venv, run for real
against the app on loopback with a small local task (a jsonl and a task YAML written here;
nothing from a hub). Its ``local-completions`` model must give the same per-sample
log-likelihoods (1e-4) and accuracy as its own ``hf`` model on the same pythia-tiny
directory; with a preset (``model=pythia-tiny+PRESET``) the figures change and equal an
in-process scoring under the same edits."""

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest

from editing.edits import EditSpec
from editing.engine import GenerationRequest
from tests.lm_eval_venv import ensure_lm_eval_venv

DEFAULT = "pythia-tiny-l2"
PRESET_EDITS = [{"dictionary": DEFAULT, "feature": 11, "op": "set", "value": 6.0},
                {"dictionary": DEFAULT, "feature": 3, "op": "scale", "value": 3.0}]

# (context, choices, answer): short multiple-choice items in the register of the model's corpus
ITEMS = [
    ("Return the number of items in the", ["list", "file", "value", "module"], 0),
    ("If the file does not exist, the function raises an", ["exception", "object", "argument"], 0),
    ("This module provides a way to read and write", ["files", "numbers", "classes"], 0),
    ("The default value is", ["None", "True", "zero"], 0),
    ("Return True if the object is an instance of the", ["class", "module", "string"], 0),
    ("The optional argument", ["specifies", "returns", "raises"], 0),
    ("An iterator over the", ["elements", "modules", "errors"], 0),
    ("Raise a ValueError if the", ["argument", "module", "iterator"], 0),
    ("The string is encoded using the", ["encoding", "module", "iterator"], 0),
    ("This method is called when the", ["object", "string", "number"], 0),
    ("Return a new dictionary with the", ["keys", "files", "errors"], 0),
    ("The number of bytes read from the", ["stream", "class", "list"], 0),
]


@pytest.fixture(scope="module")
def lm_eval_python():
    return ensure_lm_eval_venv()


def write_task(directory) -> Path:
    """The task ``steer_mc``: a jsonl of ITEMS and a task YAML reading it with ``dataset_path: json``.
    ``python -c "from tests.service.test_lm_eval import write_task; write_task('steer_task')"``
    writes it for a run by hand (README)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "steer_mc.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in ITEMS))
    (directory / "steer_mc.yaml").write_text(f"""task: steer_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("lm-eval-task"))


def run_lm_eval(python: Path, task_dir: Path, out: Path, model: str, model_args: str) -> tuple[float, list[list[float]]]:
    """Run the harness; return its accuracy and each sample's choice log-likelihoods."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf-home"),
           "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "unused", "PYTHONPATH": ""}
    command = [str(python), "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
               "--tasks", "steer_mc", "--include_path", str(task_dir), "--batch_size", "4",
               "--output_path", str(out), "--log_samples"]
    if model == "hf":
        command += ["--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    [results] = glob.glob(str(out / "*" / "results_*.json"))
    [samples] = glob.glob(str(out / "*" / "samples_steer_mc_*.jsonl"))
    accuracy = json.loads(Path(results).read_text())["results"]["steer_mc"]["acc,none"]
    per_sample = {}
    for line in Path(samples).read_text().splitlines():
        sample = json.loads(line)
        per_sample[sample["doc_id"]] = [float(ll) for ll, _ in sample["filtered_resps"]]
    return accuracy, [per_sample[i] for i in range(len(ITEMS))]


def in_process(engine, edits) -> list[list[float]]:
    """Each choice's log-likelihood by the engine's own prompt scoring, with the harness's
    context/continuation split (the continuation is " " + choice, encoded after the context)."""
    tokenizer = engine.tokenizer
    requests, spans = [], []
    for context, choices, _ in ITEMS:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        for choice in choices:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            requests.append(GenerationRequest(tuple(whole), max_new_tokens=0, prompt_logprobs=True,
                                              edits=tuple(EditSpec(**e) for e in edits)))
            spans.append(len(context_ids))
    results = engine.generate(requests)
    scores = iter(sum(r.prompt_logprobs[start:]) for r, start in zip(results, spans))
    return [[next(scores) for _ in choices] for _, choices, _ in ITEMS]


def test_lm_eval_against_the_server_agrees_with_its_hf_model(server, engine, pythia_tiny, lm_eval_python, task_dir,
                                                               tmp_path):
    from clients.client import Client

    model_dir = pythia_tiny.info.path
    hf_accuracy, hf = run_lm_eval(lm_eval_python, task_dir, tmp_path / "hf", "hf",
                                  f"pretrained={model_dir},dtype=float32")
    remote = (f"base_url={server}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
              "tokenized_requests=True,num_concurrent=2,max_retries=1")
    accuracy, served = run_lm_eval(lm_eval_python, task_dir, tmp_path / "served", "local-completions",
                                   f"model=pythia-tiny,{remote}")
    assert accuracy == hf_accuracy
    for ours, theirs in zip(served, hf):
        assert ours == pytest.approx(theirs, abs=1e-4)
    for ours, theirs in zip(served, in_process(engine, [])):
        assert ours == pytest.approx(theirs, abs=1e-4)

    client = Client(server)
    client.put_preset("lm-eval-test", PRESET_EDITS, description="lm-eval test preset")
    try:
        steered_accuracy, steered = run_lm_eval(lm_eval_python, task_dir, tmp_path / "steered", "local-completions",
                                                f"model=pythia-tiny+lm-eval-test,{remote}")
    finally:
        client.delete_preset("lm-eval-test")
    expected = in_process(engine, PRESET_EDITS)
    for ours, theirs in zip(steered, expected):
        assert ours == pytest.approx(theirs, abs=1e-4)
    assert max(abs(a - b) for s, h in zip(steered, hf) for a, b in zip(s, h)) > 0.1  # the preset moves the figures
    right = sum(max(range(len(s)), key=s.__getitem__) == answer for s, (_, _, answer) in zip(steered, ITEMS))
    assert steered_accuracy == pytest.approx(right / len(ITEMS))
    print(f"\nlm-eval steer_mc acc: hf {hf_accuracy:.4f}, served {accuracy:.4f}, steered {steered_accuracy:.4f}")
