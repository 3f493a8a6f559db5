"""The data room: sources, split by document, tokenizer, content-keyed cache, errors."""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from resstream.config import ConfigError, DataConfig
from resstream.data import (
    EOT,
    PreparedData,
    assign_val,
    cache_key,
    encode_documents,
    format_stats,
    load_corpus,
    load_hf_documents,
    prepare,
    shard_dtype,
    split_key,
    train_bpe,
)
from resstream.data import build as build_mod
from resstream.data.sources import kjv_corpus, stdlib_files

VOCAB = 320  # small: BPE training on ~100 kB stays well under a second


def _cfg(corpus, tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("val_fraction", 0.1)
    return DataConfig(corpus=str(corpus), cache_dir=str(tmp_path / "cache"), **kw)


def _split_docs(p: PreparedData, split: str) -> list[str]:
    """Decode a shard back into its documents by cutting at the end-of-text ids."""
    ids = np.asarray(getattr(p, split), dtype=np.int64)
    cuts = np.flatnonzero(ids == p.eot_id)
    parts = np.split(ids, cuts)
    docs = [parts[0]] + [part[1:] for part in parts[1:]]  # drop each separator
    return [p.tokenizer.decode(d.tolist()) for d in docs]


@pytest.fixture(scope="module")
def chapters() -> list[str]:
    """30 KJV chapters: real, distinct, varied-length English documents (~120 kB)."""
    return list(itertools.islice(kjv_corpus(), 30))


@pytest.fixture()
def text_folder(tmp_path: Path, chapters: list[str]) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, ch in enumerate(chapters):
        (folder / f"ch{i:03d}.txt").write_text(ch, encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------- sources


def test_kjv_is_chapters_and_max_bytes_keeps_a_prefix_of_whole_documents():
    full = list(kjv_corpus())
    assert len(full) == 1189  # chapters of the KJV, not the package's paragraph lines
    assert full[0].startswith("In the beginning God created the heaven and the earth.")
    assert full[0].rstrip().endswith("And the evening and the morning were the sixth day.")
    assert full[-1].rstrip().endswith("The grace of our Lord Jesus Christ [be] with you all. Amen.")
    cut = list(load_corpus(DataConfig(corpus="kjv", max_bytes=200_000)))
    assert cut == full[: len(cut)]
    size = sum(len(d.encode()) for d in cut)
    assert size <= 200_000 < size + len(full[len(cut)].encode())


def test_python_stdlib_excludes_tests_and_is_sorted():
    files = stdlib_files()
    root = files[0].parent
    rel = {f.relative_to(root).as_posix() for f in files}
    assert {"os.py", "json/__init__.py", "email/parser.py"} <= rel
    for f in files:
        assert not ({"test", "tests", "idle_test", "site-packages"} & set(f.parts)), f
    rel = [f.as_posix() for f in files]
    assert rel == sorted(rel)
    docs = list(load_corpus(DataConfig(corpus="python-stdlib", max_bytes=200_000)))
    assert len(docs) >= 5 and all(d for d in docs)
    assert docs[0] == files[0].read_text(encoding="utf-8")  # __future__.py: a file per document
    compile(docs[0], "first", "exec")


def test_local_folder_mixes_types_in_sorted_order_and_skips_the_rest(tmp_path: Path):
    d = tmp_path / "mix"
    (d / "sub").mkdir(parents=True)
    (d / ".hidden").mkdir()
    (d / "a.txt").write_text("alpha text")
    (d / "b.md").write_text("# beta\n")
    (d / "sub" / "c.py").write_text("x = 1\n")
    (d / "d.jsonl").write_text('{"body": "delta one", "id": 1}\n\n{"body": "delta two"}\n')
    pq.write_table(pa.table({"body": ["epsilon", None, "zeta"], "n": [1, 2, 3]}), d / "e.parquet")
    (d / "empty.txt").write_text("")
    (d / "notes.csv").write_text("ignored")
    (d / ".hidden" / "x.txt").write_text("ignored")
    docs = list(load_corpus(DataConfig(corpus=str(d), text_field="body")))
    assert docs == ["alpha text", "# beta\n", "delta one", "delta two", "epsilon", "zeta", "x = 1\n"]
    assert list(load_corpus(DataConfig(corpus=str(d / "*.txt")))) == ["alpha text"]
    assert list(load_corpus(DataConfig(corpus=str(d / "**" / "*.py")))) == ["x = 1\n"]
    assert list(load_corpus(DataConfig(corpus=str(d / "b.md")))) == ["# beta\n"]


def test_hf_loader_reads_local_jsonl_and_parquet(tmp_path: Path):
    jl = tmp_path / "x.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(["one", "two", "three"])))
    pqf = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["four", "five"], "n": [4, 5]}), pqf)
    hf_cache = str(tmp_path / "hf")
    c1 = load_hf_documents("json", None, "text", data_files=str(jl), cache_dir=hf_cache)
    c2 = load_hf_documents("parquet", None, "text", data_files=str(pqf), cache_dir=hf_cache)
    assert list(c1) == ["one", "two", "three"] == list(load_corpus(DataConfig(corpus=str(jl))))
    assert list(c2) == ["four", "five"] == list(load_corpus(DataConfig(corpus=str(pqf))))
    assert list(c1) == list(c1)  # re-iterable: prepare reads a source three times
    assert c1.identity != c2.identity
    with pytest.raises(ConfigError, match=r"no column 'body' \(columns: text, n\); set data.text_field"):
        load_hf_documents("json", None, "body", data_files=str(jl), cache_dir=hf_cache)
    with pytest.raises(ConfigError, match="could not load hf:json"):
        load_hf_documents("json", None, "text", data_files=str(tmp_path / "missing.jsonl"), cache_dir=hf_cache)


def test_hf_corpus_spec_goes_through_the_one_loader(tmp_path, monkeypatch):
    jl = tmp_path / "y.jsonl"
    jl.write_text('{"body": "first"}\n{"body": "second"}\n')
    seen = []

    def offline(name, config, text_field, data_files=None, cache_dir=None):
        seen.append((name, config, text_field))
        # What a hub dataset would give, served from a local file through the same function.
        return load_hf_documents("json", None, text_field, data_files=str(jl), cache_dir=str(tmp_path / "hf"))

    import resstream.data.hf as hf_mod

    monkeypatch.setattr(hf_mod, "load_hf_documents", offline)
    docs = list(load_corpus(DataConfig(corpus="hf:org/some-set:sub-config", text_field="body", max_bytes=6)))
    assert seen == [("org/some-set", "sub-config", "body")] and docs == ["first"]
    list(load_corpus(DataConfig(corpus="hf:plain", text_field="body")))
    assert seen[-1] == ("plain", None, "body")


# ----------------------------------------------------------------------------- split


def test_split_key_is_stable_and_seeded():
    assert split_key("In the beginning", 0) == split_key("In the beginning", 0)
    assert split_key("In the beginning", 0) != split_key("In the beginning", 1)
    # Fixed values: the split must not change across Python runs, machines or releases.
    assert split_key("abc", 0) == 0x91F0E346D8052BC1
    assert split_key("abc", -1) != split_key("abc", 0)


def test_assign_val_exact_share_and_at_least_one_each_side():
    keys = [split_key(f"doc {i}", 3) for i in range(200)]
    m = assign_val(keys, 0.05)
    assert m.sum() == 10
    assert np.array_equal(m, assign_val(keys, 0.05))
    assert assign_val(keys[:3], 0.01).sum() == 1  # rounds to 0, kept at 1
    assert assign_val(keys[:3], 0.99).sum() == 2  # rounds to 3, kept at n - 1
    # Content-keyed: shuffling the documents keeps every document on its side.
    perm = np.random.default_rng(0).permutation(200)
    m2 = assign_val([keys[i] for i in perm], 0.05)
    assert np.array_equal(m2, m[perm])


def test_prepare_splits_by_document_disjoint_covering_deterministic(tmp_path, text_folder, chapters):
    p = prepare(_cfg(text_folder, tmp_path))
    train, val = _split_docs(p, "train"), _split_docs(p, "val")
    assert len(val) == 3 and len(train) == 27 == p.stats["train"]["documents"]
    assert sorted(train + val) == sorted(chapters)  # every document, whole, exactly once
    assert not set(train) & set(val)
    assert train == [c for c in chapters if c in set(train)]  # corpus order kept inside a split
    again = prepare(_cfg(text_folder, tmp_path / "other"))
    assert _split_docs(again, "val") == val and again.dir.name == p.dir.name
    reseeded = prepare(_cfg(text_folder, tmp_path, split_seed=7))
    assert _split_docs(reseeded, "val") != val


# ----------------------------------------------------------------------------- tokenizer


def test_byte_level_bpe_round_trips_any_text(chapters):
    tok = train_bpe(chapters[:10], VOCAB)
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id(EOT) == 0
    samples = [
        chapters[11],
        "naïve café — 東京 🚀 \t\ttabs\r\n  spaces   ",
        "literal <|endoftext|> inside text",
        "def f(x):\n    return x ** 2  # ok\n\n\n",
    ]
    for text, ids in zip(samples, encode_documents(tok, samples)):
        assert tok.decode(ids.tolist()) == text
        assert 0 not in ids  # a literal "<|endoftext|>" is text, not the separator


def test_long_documents_encode_in_pieces_exactly_as_whole(chapters):
    tok = train_bpe(chapters[:10], VOCAB)
    long_doc = "\n".join(chapters[10:20]) + "\n\n  indented tail\n"
    whole = next(encode_documents(tok, [long_doc], piece_chars=None))
    pieces = next(encode_documents(tok, [long_doc], piece_chars=500))
    assert np.array_equal(whole, pieces)


def test_shard_dtype_fits_vocab():
    assert shard_dtype(4096) == np.uint16 and shard_dtype(65536) == np.uint16
    assert shard_dtype(65537) == np.uint32


def test_user_tokenizer_is_used_as_is_and_big_vocab_gets_uint32(tmp_path, text_folder):
    trained = prepare(_cfg(text_folder, tmp_path))
    assert trained.train.dtype == np.uint16
    reused = prepare(_cfg(text_folder, tmp_path, tokenizer=str(trained.tokenizer_path), vocab_size=999))
    assert reused.dir != trained.dir  # a different key: the tokenizer file is part of it
    assert reused.tokenizer_path.read_bytes() == trained.tokenizer_path.read_bytes()
    assert np.array_equal(reused.train, trained.train) and np.array_equal(reused.val, trained.val)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({f"zz{i}": 256 + i for i in range(70_000)})  # never produced, only widen the vocab
    big = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    big.add_special_tokens([EOT])
    big.save(str(tmp_path / "big.json"), pretty=False)
    p = prepare(_cfg(text_folder, tmp_path, tokenizer=str(tmp_path / "big.json")))
    assert p.tokenizer_path.read_bytes() == (tmp_path / "big.json").read_bytes()  # copied as is, not re-saved
    assert p.vocab_size == 70_257 and p.train.dtype == np.uint32 and p.eot_id == 70_256
    assert p.token_bytes_exact and p.token_bytes[p.train].sum() == p.stats["train"]["bytes"]


# ----------------------------------------------------------------------------- shards and cache


def test_token_bytes_count_exact_utf8_bytes(tmp_path):
    folder = tmp_path / "u"
    folder.mkdir()
    texts = ["naïve café — 東京 🚀\n" * 20, "plain ascii text " * 30, "<|endoftext|> kept as text", "Ωμέγα " * 25]
    for i, t in enumerate(texts):
        (folder / f"{i}.md").write_text(t, encoding="utf-8")
    p = prepare(_cfg(folder, tmp_path, val_fraction=0.25))
    assert p.token_bytes_exact and p.token_bytes[p.eot_id] == 0 and len(p.token_bytes) == p.vocab_size
    for split in ("train", "val"):
        ids = np.asarray(getattr(p, split))
        decoded = p.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        assert p.token_bytes[ids].sum() == p.stats[split]["bytes"] == len(decoded.encode("utf-8"))
        assert p.stats[split]["tokens"] == len(ids)
    assert sorted(_split_docs(p, "train") + _split_docs(p, "val")) == sorted(texts)


def test_cache_is_reused_without_tokenizing_and_keyed_by_content(tmp_path, text_folder, monkeypatch):
    logs: list[str] = []
    first = prepare(_cfg(text_folder, tmp_path), log=logs.append)
    assert any("trained byte-level BPE" in m for m in logs)
    assert sorted(os.listdir(first.dir)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]

    def boom(*a, **k):
        raise AssertionError("a cached prepare must not train or encode")

    monkeypatch.setattr(build_mod, "train_bpe", boom)
    monkeypatch.setattr(build_mod, "encode_documents", boom)
    second = prepare(_cfg(text_folder, tmp_path))
    assert second.dir == first.dir and np.array_equal(second.train, first.train)
    reopened = PreparedData.from_dir(first.dir)
    assert reopened.stats == first.stats and np.array_equal(reopened.val, first.val)

    moved = tmp_path / "moved"
    shutil.copytree(text_folder, moved)  # same content elsewhere: same cache
    assert prepare(_cfg(moved, tmp_path)).dir == first.dir
    monkeypatch.undo()

    f = moved / "ch005.txt"
    f.write_text(f.read_text().replace("the", "teh", 1))  # one edit: a new key
    changed = prepare(_cfg(moved, tmp_path))
    assert changed.dir != first.dir
    assert prepare(_cfg(text_folder, tmp_path, vocab_size=VOCAB + 8)).dir not in (first.dir, changed.dir)


def test_interrupted_prepare_leaves_no_cache(tmp_path, text_folder, monkeypatch):
    real = build_mod.encode_documents

    def dies_midway(tok, docs, **kw):
        for i, ids in enumerate(real(tok, docs, **kw)):
            if i == 20:
                raise KeyboardInterrupt
            yield ids

    monkeypatch.setattr(build_mod, "encode_documents", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(text_folder, tmp_path))
    assert os.listdir(tmp_path / "cache") == []  # neither a final folder nor a temp one
    monkeypatch.undo()

    # A kill -9 skips cleanup: day-old temp folders go at the next prepare, fresh ones stay
    # (they may belong to a build running in another process).
    old, fresh = tmp_path / "cache" / ".tmp-old-1", tmp_path / "cache" / ".tmp-fresh-1"
    old.mkdir(), fresh.mkdir()
    os.utime(old, (os.path.getmtime(old) - 2 * 86400,) * 2)
    assert prepare(_cfg(text_folder, tmp_path)).stats["val"]["documents"] == 3
    assert not old.exists() and fresh.exists()


def test_a_foreign_folder_at_the_cache_path_is_not_trusted(tmp_path, text_folder):
    cfg = _cfg(text_folder, tmp_path)
    final = tmp_path / "cache" / cache_key(cfg, load_corpus(cfg))
    final.mkdir(parents=True)
    (final / "train.bin").write_bytes(b"half")
    with pytest.raises(ConfigError, match="exists but is not a complete prepared folder; delete it"):
        prepare(cfg)


def test_format_stats_table(tmp_path, text_folder):
    p = prepare(_cfg(text_folder, tmp_path))
    lines = format_stats(p).splitlines()
    assert lines[0].split() == ["split", "documents", "bytes", "tokens", "bytes/token"]
    train = lines[1].split()
    s = p.stats["train"]
    assert train == ["train", f"{s['documents']:,}", f"{s['bytes']:,}", f"{s['tokens']:,}", f"{s['bytes_per_token']:.3f}"]
    assert 1.3 < s["bytes_per_token"] < 2.5  # English at a 320-id BPE: only 63 merges


# ----------------------------------------------------------------------------- errors


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda t: t / "nope", r"is not a built-in corpus \(kjv, python-stdlib\).*fix the name or path"),
        (lambda t: str(t / "*.nothing"), "no files match the pattern"),
        (lambda t: _write(t / "x.csv", "a,b"), r"unsupported type '.csv'"),
        (lambda t: (t / "emptydir").mkdir() or t / "emptydir", "holds no .txt/.md/.py/.jsonl/.parquet files"),
        (lambda t: _write(t / "e" / "a.txt", "") and t / "e", "has no documents"),
        (lambda t: _write(t / "one.txt", "just one"), "has only 1 document"),
        (lambda t: _write(t / "r.jsonl", '{"body": "x"}\n'), r"line 1 has no 'text' field \(keys: body\); set data.text_field"),
        (lambda t: _write(t / "r2.jsonl", '{"text": "x"}\n{oops\n'), "line 2 is not valid JSON"),
        (lambda t: _write(t / "r3.jsonl", '{"text": 5}\n'), "holds int, not text"),
        (lambda t: pq.write_table(pa.table({"body": ["x"]}), t / "p.parquet") or t / "p.parquet", r"has no column 'text' \(columns: body\)"),
        (lambda t: _write(t / "bad.txt", b"caf\xe9"), r"is not UTF-8 text \(bad byte at 3\)"),
        (lambda t: "hf:", "names no dataset"),
    ],
)
def test_bad_corpus_errors_are_one_line(tmp_path, make, pattern):
    corpus = make(tmp_path)
    with pytest.raises(ConfigError, match=pattern) as err:
        prepare(_cfg(corpus, tmp_path))
    assert "\n" not in str(err.value)


def test_bad_tokenizer_and_size_errors(tmp_path, text_folder):
    with pytest.raises(ConfigError, match="data.tokenizer: .* not found"):
        prepare(_cfg(text_folder, tmp_path, tokenizer=str(tmp_path / "missing.json")))
    _write(tmp_path / "junk.json", "{not json")
    with pytest.raises(ConfigError, match="is not a tokenizers JSON file"):
        prepare(_cfg(text_folder, tmp_path, tokenizer=str(tmp_path / "junk.json")))
    no_eot = train_bpe(["some text here"], 300)
    no_eot.save(str(tmp_path / "noeot.json"))
    data = json.loads((tmp_path / "noeot.json").read_text())
    data["added_tokens"] = []
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k != EOT}
    (tmp_path / "noeot.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="has no end-of-text token"):
        prepare(_cfg(text_folder, tmp_path, tokenizer=str(tmp_path / "noeot.json")))
    with pytest.raises(ConfigError, match=r"data.max_bytes: 10 is smaller than the first document"):
        prepare(_cfg(text_folder, tmp_path, max_bytes=10))
    with pytest.raises(ConfigError, match="has no meta.json"):
        PreparedData.from_dir(tmp_path)
    assert os.listdir(tmp_path / "cache") == []  # no failed prepare left anything behind
