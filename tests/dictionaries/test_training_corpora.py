"""Training on a user's own text: a single-file corpus, a named held-out corpus, checks before
training, and a finished run that survives a failed publish."""

import json

import pytest

from dictionaries.store import DictionaryStore
from dictionaries.training import pipeline
from dictionaries.training.ensemble import SaeSpec
from dictionaries.training.pipeline import split_corpora, train_and_publish
from dictionaries.training.trainer import TrainConfig, Trainer
from editing.corpora import CorpusError, open_corpus

HOOK = "blocks.1.hook_resid_post"


def _text_file(path, documents: int = 60):
    """One .txt file made of the built-in corpus's first documents: a single document to a corpus."""
    texts = [doc.text for _, doc in zip(range(documents), open_corpus("builtin:pydocs/train"))]
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return str(path)


def _config(corpus, **changes):
    settings = dict(hook=HOOK, specs=(SaeSpec("topk", 64, k=4),), tokens=4096, batch_size=512, context_length=32,
                    corpus=corpus)
    return TrainConfig(**{**settings, **changes})


def _publish(model, config, tmp_path, **kwargs):
    return train_and_publish(model, config, name="mine", store=DictionaryStore(tmp_path / "store"),
                             run_dir=tmp_path / "run", progress=False, heldout_windows_count=16, feature_windows=4,
                             **kwargs)


def test_corpora_of_a_run():
    assert split_corpora("builtin:pydocs/train") == ("builtin:pydocs/train", "builtin:pydocs/heldout")
    assert split_corpora("builtin:pydocs") == ("builtin:pydocs/train", "builtin:pydocs/heldout")
    assert split_corpora("my.txt") == ("my.txt#train", "my.txt#heldout")  # never measured on what it trained on
    assert split_corpora("my.txt#train") == ("my.txt#train", "my.txt#heldout")
    assert split_corpora("my.txt", "other.txt") == ("my.txt", "other.txt")


def test_a_single_text_file_publishes_with_heldout_metrics(small_model, tmp_path):
    corpus = _text_file(tmp_path / "my.txt")
    [entry] = _publish(small_model, _config(corpus), tmp_path)
    metrics = entry["metrics"]
    assert metrics["heldout_corpus"] == corpus + "#heldout"
    assert metrics["dead_window_tokens"] == 16 * 32 and 0 < metrics["fvu"] < 1 and 0 < metrics["l0"] <= 4
    provenance = DictionaryStore(tmp_path / "store").config("mine").provenance
    assert provenance["config"]["corpus"] == corpus + "#train"


def test_a_named_heldout_corpus_is_used(small_model, tmp_path):
    corpus = _text_file(tmp_path / "train.txt")
    heldout = _text_file(tmp_path / "other.txt", documents=20)
    [entry] = _publish(small_model, _config(corpus, heldout_corpus=heldout), tmp_path)
    assert entry["metrics"]["heldout_corpus"] == heldout


def test_a_corpus_too_small_for_a_heldout_window_is_refused_before_training(small_model, tmp_path, monkeypatch):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("A few words of text, enough for a training window but not for a held-out one. " * 6)
    monkeypatch.setattr(Trainer, "run", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(CorpusError, match=r"tiny.txt#heldout.*no window of 32 tokens.*nothing was trained"):
        _publish(small_model, _config(str(tiny)), tmp_path)
    with pytest.raises(CorpusError, match=r"training corpus .*empty.txt.* no window"):
        (tmp_path / "empty.txt").write_text("two words")
        _publish(small_model, _config(str(tmp_path / "empty.txt"), heldout_corpus="builtin:pydocs/heldout"), tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_published_by_resuming_without_training(small_model, tmp_path, monkeypatch):
    config = _config(_text_file(tmp_path / "my.txt"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "feature_statistics", broken)
    with pytest.raises(RuntimeError, match=r"publishing failed \(disk full\).*checkpoint.*--resume"):
        _publish(small_model, config, tmp_path)
    monkeypatch.undo()
    steps = []
    [entry] = _publish(small_model, config, tmp_path, resume=True, on_progress=lambda fraction, record: steps.append(1))
    assert steps == []  # nothing trained again
    assert entry["metrics"]["train_tokens"] == 4096 and 0 < entry["metrics"]["fvu"] < 1
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == 8 and json.loads(log[-1])["tokens"] == 4096
