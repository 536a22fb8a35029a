"""Corpora: the built-in split is deterministic and disjoint; file corpora; token windows."""

import json

import pytest

from editing.corpora import CorpusError, open_corpus, split_of, stdlib_source_files, token_windows


def _ids(spec):
    return [doc.id for doc in open_corpus(spec).documents()]


def test_pydocs_split_is_deterministic_disjoint_and_complete():
    train, heldout, everything = _ids("builtin:pydocs/train"), _ids("builtin:pydocs/heldout"), _ids("builtin:pydocs")
    assert train == _ids("builtin:pydocs/train")  # same order every time
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(everything)
    assert len(heldout) > 20 and len(train) > 10 * len(heldout) // 2
    assert any(i.startswith("pydoc_data.topics:") for i in everything)
    assert all(split_of(i) == "heldout" for i in heldout)


def test_pydocs_reads_no_third_party_or_test_files():
    ids = _ids("builtin:pydocs")
    assert not [i for i in ids if "site-packages" in i or "dist-packages" in i or "/test/" in i or "/tests/" in i]


def test_stdlib_walk_skips_site_packages_and_tests_and_sorts(tmp_path):
    for rel in ["b.py", "a/z.py", "a/b.py", "site-packages/x.py", "dist-packages/y.py", "test/t.py",
                "pkg/tests/u.py", "idlelib/idle_test/v.py", "test_w.py", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text('"""doc"""\n')
    found = [p.relative_to(tmp_path).as_posix() for p in stdlib_source_files(tmp_path)]
    assert found == ["a/b.py", "a/z.py", "b.py"]


def test_unknown_specs_are_refused(tmp_path):
    with pytest.raises(CorpusError, match="unknown built-in"):
        open_corpus("builtin:nope")
    with pytest.raises(CorpusError, match="unknown split"):
        open_corpus("builtin:pydocs/validation")
    with pytest.raises(CorpusError, match="no such file"):
        open_corpus(str(tmp_path / "missing.txt"))


def test_file_corpora(tmp_path):
    (tmp_path / "one.txt").write_text("alpha beta")
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("second")
    (docs / "sub" / "a.txt").write_text("third")
    (docs / "a.txt").write_text("first")
    lines = tmp_path / "rows.jsonl"
    lines.write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two", "x": 1}) + "\n")

    assert [d.text for d in open_corpus(str(tmp_path / "one.txt"))] == ["alpha beta"]
    assert [d.id for d in open_corpus(str(docs))] == ["a.txt", "b.txt", "sub/a.txt"]
    assert [d.text for d in open_corpus(str(lines))] == ["row one", "row two"]
    both = _ids(f"{lines}#train") + _ids(f"{lines}#heldout")
    assert sorted(both) == sorted(_ids(str(lines)))


def test_malformed_jsonl_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: .*'text'"):
        list(open_corpus(str(bad)))
    bad.write_text("{not json\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:1: not valid JSON"):
        list(open_corpus(str(bad)))


def test_token_windows_order(small_model):
    tokenizer = small_model.tokenizer
    corpus = open_corpus("builtin:pydocs/heldout")
    plain = token_windows(corpus, tokenizer, 16, max_windows=200)
    assert plain.shape == (200, 16)
    # corpus order: the windows are the token stream cut into consecutive pieces
    first_doc = next(corpus.documents()).text
    first_ids = tokenizer(first_doc, add_special_tokens=False)["input_ids"]
    assert plain.flatten()[: min(len(first_ids), 64)].tolist() == first_ids[:64]

    a = token_windows(corpus, tokenizer, 16, seed=1, shuffle_buffer=64, max_windows=200)
    b = token_windows(corpus, tokenizer, 16, seed=1, shuffle_buffer=64, max_windows=200)
    c = token_windows(corpus, tokenizer, 16, seed=2, shuffle_buffer=64, max_windows=200)
    assert a.equal(b)
    assert not a.equal(c)
    everything = token_windows(corpus, tokenizer, 16)
    shuffled = token_windows(corpus, tokenizer, 16, seed=3)
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, shuffled.tolist()))


def test_a_single_document_is_split_by_its_text(tmp_path):
    lines = [f"line {i}: " + "word " * (i % 7) for i in range(400)]
    (tmp_path / "one.txt").write_text("\n".join(lines))
    whole = open_corpus(str(tmp_path / "one.txt"))
    [train] = list(open_corpus(f"{tmp_path / 'one.txt'}#train"))
    [heldout] = list(open_corpus(f"{tmp_path / 'one.txt'}#heldout"))
    [text] = [d.text for d in whole]
    assert train.text + heldout.text == text  # disjoint and complete, consecutive text
    assert 0.08 < len(heldout.text) / len(text) < 0.13 and heldout.text.startswith("\n")
    assert (train.id, heldout.id) == ("one.txt#train", "one.txt#heldout")
    # a directory of one file is one document too; of two, the split is by documents again
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text(text)
    assert [d.text for d in open_corpus(f"{tmp_path / 'dir'}#heldout")] == [heldout.text]
    (tmp_path / "dir" / "b.txt").write_text("another document")
    assert sorted(_ids(f"{tmp_path / 'dir'}#train") + _ids(f"{tmp_path / 'dir'}#heldout")) == ["a.txt", "b.txt"]
