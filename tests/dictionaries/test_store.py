"""The store: names, atomic installs, refusals that leave it unchanged, compatibility."""

import json
import os

import pytest
import torch

from dictionaries.config import DictionaryError
from dictionaries.format import save_dictionary
from dictionaries.store import DictionaryNotFound, DictionaryStore, check_compatibility
from tests.dictionaries.helpers import make


@pytest.fixture()
def store(tmp_path):
    return DictionaryStore(tmp_path / "store")


def _snapshot(store):
    """Every file in the store with its bytes, links resolved."""
    found = {}
    for dirpath, _, files in os.walk(store.root, followlinks=False):
        for name in files:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, store.root)] = open(path, "rb").read()
    links = {p.name: os.readlink(p) for p in store.root.iterdir() if p.is_symlink()} if store.root.exists() else {}
    return found, links


def test_put_list_load_info_delete(store):
    first = make("relu", seed=1)
    store.put("l1-relu", first, metrics={"fvu": 0.2})
    store.put("l1-topk", make("topk"))
    assert store.names() == ["l1-relu", "l1-topk"]
    assert "l1-relu" in store and "nope" not in store
    loaded = store.load("l1-relu")
    assert torch.equal(loaded.W_dec, first.W_dec)
    info = store.info("l1-relu")
    assert info["metrics"] == {"fvu": 0.2} and info["config"]["architecture"] == "relu"
    assert info["files"] == ["config.json", "metrics.json", "sae.safetensors"]
    store.delete("l1-relu")
    assert store.names() == ["l1-topk"]
    with pytest.raises(DictionaryNotFound, match="no dictionary named 'l1-relu'.*have: l1-topk"):
        store.load("l1-relu")
    assert len(list((store.root / ".objects").iterdir())) == 1  # the deleted object is gone


def test_replace_swaps_whole_dictionaries(store):
    store.put("d", make("relu", seed=1))
    old_path = store.path("d")
    replacement = make("jumprelu", seed=2)
    store.put("d", replacement)
    assert store.config("d").architecture == "jumprelu"
    assert torch.equal(store.load("d").threshold, replacement.threshold)
    assert not old_path.exists()
    assert len(list((store.root / ".objects").iterdir())) == 1


def test_put_from_a_native_directory(store, tmp_path):
    save_dictionary(make("topk"), tmp_path / "src", metrics={"l0": 5})
    store.put("copied", tmp_path / "src")
    assert store.info("copied")["metrics"] == {"l0": 5}


@pytest.mark.parametrize("name", ["", "UPPER", "../escape", "a/b", "a..b", ".hidden", "-dash", "x" * 65, "sp ace"])
def test_bad_names_are_refused(store, name):
    with pytest.raises(DictionaryError, match="not allowed"):
        store.put(name, make("relu"))
    assert not store.root.exists() or store.names() == []


def _corrupt(tmp_path, kind):
    src = tmp_path / f"bad-{kind}"
    save_dictionary(make("relu", seed=9), src)
    weights = src / "sae.safetensors"
    config = json.loads((src / "config.json").read_text())
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif kind == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        tensors["W_dec"][3, 2] = float("nan")
        save_file(tensors, weights)
        config["weights_sha256"] = ""
    elif kind == "shape":
        config["d_in"] = 17
    elif kind == "config":
        (src / "config.json").write_text("[1, 2")
        return src
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("kind, message", [("truncated", "SHA-256"), ("nan", "non-finite"), ("shape", "shape"),
                                           ("config", "not valid JSON")])
def test_a_bad_dictionary_never_replaces_a_good_one(store, tmp_path, kind, message):
    good = make("relu", seed=3)
    store.put("serving", good)
    before = _snapshot(store)
    with pytest.raises(DictionaryError, match=message):
        store.put("serving", _corrupt(tmp_path, kind))
    assert _snapshot(store) == before
    assert torch.equal(store.load("serving").W_enc, good.W_enc)


def test_an_interrupted_put_leaves_the_old_dictionary(store, monkeypatch):
    good = make("relu", seed=3)
    store.put("serving", good)
    before = _snapshot(store)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut before the swap")

    monkeypatch.setattr("dictionaries.store.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.put("serving", make("topk"))
    monkeypatch.undo()
    assert _snapshot(store) == before
    assert torch.equal(store.load("serving").W_enc, good.W_enc)


def test_cleanup_removes_orphans_of_a_crash(store):
    store.put("kept", make("relu"))
    orphan = store.root / ".objects" / "kept.deadbeef0000"
    orphan.mkdir()
    (orphan / "sae.safetensors").write_bytes(b"partial")
    assert store.cleanup() == ["kept.deadbeef0000"]
    assert store.names() == ["kept"] and store.load("kept") is not None


def test_compatibility_with_a_loaded_model(small_model):
    info = small_model.info
    facts = dict(model_name=info.name, model_sha256=info.sha256, n_layers=info.n_layers, d_model=info.d_model)
    fits = make("relu", d_in=32, model_name=info.name, model_sha256=info.sha256).config
    assert check_compatibility(fits, **facts).ok and not check_compatibility(fits, **facts).warnings

    wrong_width = make("relu", d_in=16).config
    report = check_compatibility(wrong_width, **facts)
    assert report.errors == ["d_in is 16 but the model's width at blocks.1.hook_resid_post is 32"]
    with pytest.raises(DictionaryError, match="does not fit the loaded model: d_in is 16"):
        report.raise_for_errors()

    too_deep = make("relu", d_in=32, hook="blocks.9.hook_resid_post").config
    assert "does not exist on a 3-layer model" in check_compatibility(too_deep, **facts).errors[0]

    other_model = make("relu", d_in=32, model_name="EleutherAI/pythia-70m", model_sha256="ab" * 32).config
    report = check_compatibility(other_model, **facts)
    assert report.ok and len(report.warnings) == 2
    assert "trained on model 'EleutherAI/pythia-70m'" in report.warnings[0]


def test_a_served_version_is_kept_while_it_is_pinned(store):
    """A deploy pins the object it serves: a later put of the name keeps it (a restarting replica
    finds it by version), until the pin moves or goes."""
    from dictionaries.format import WEIGHTS_FILE, file_sha256

    app, model = "registry-app", "pythia-tiny"
    first = make("relu", seed=1)
    store.put("l1", first)
    served, version = store.path("l1"), store.version("l1")
    store.pin(app, model, "l1", served)
    store.put("l1", make("relu", seed=2))  # uploaded, not deployed
    assert store.version("l1") != version and served.is_dir()
    assert store.path_of_version("l1", version) == served
    assert torch.equal(store.load_path(store.path_of_version("l1", version)).W_dec, first.W_dec)
    assert store.path_of_version("l1", store.version("l1")) == store.path("l1")
    assert store.pins(app, model) == {"l1": served} and store.pins("registry-other", model) == {}
    assert served.name in {p.name for p in (store.root / ".objects").iterdir()}
    store.cleanup(stale_after=0)  # a pinned object is in use
    assert served.is_dir()
    # the pin moves to the new version: the old object goes
    current = store.path("l1")
    store.pin(app, model, "l1", current)
    assert not served.exists()
    with pytest.raises(DictionaryError, match="replaced meanwhile"):
        store.path_of_version("l1", version)
    # a deleted name's object stays while pinned; unpinning releases it
    store.delete("l1")
    assert current.is_dir() and "l1" not in store
    assert file_sha256(store.path_of_version("l1", file_sha256(current / WEIGHTS_FILE)) / WEIGHTS_FILE)
    store.unpin(app, model, "l1")
    assert not current.exists() and not list((store.root / ".objects").iterdir())


def test_deleting_an_app_releases_its_pins(store):
    store.put("a", make("relu", seed=1))
    store.put("b", make("topk", seed=2))
    a, b = store.path("a"), store.path("b")
    store.pin("registry-x", "m1", "a", a)
    store.pin("registry-x", "m2", "b", b)
    store.pin("registry-y", "m1", "a", a)
    store.put("a", make("relu", seed=3))
    store.put("b", make("topk", seed=4))
    assert a.is_dir() and b.is_dir()
    store.unpin_app("registry-x")
    assert a.is_dir() and not b.exists()  # another app still serves a
    store.unpin_app("registry-y")
    assert not a.exists() and store.pins("registry-x", "m1") == {}
