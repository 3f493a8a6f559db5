"""``load(path)``: a Hugging Face folder, a GGUF file or a resstream model folder -> LoadedModel.

A path that does not exist but names a model fetched into the cache (``smollm2``) resolves
to the cached file. GGUF files carry their tokenizer as metadata; it is written once to a
tokenizer.json in the cache (named by its content hash), so data preparation can
re-tokenize a corpus with it like with any other tokenizer file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer

from resstream.config import ConfigError
from resstream.data import default_cache_dir, find_eot_id, load_tokenizer
from resstream.model.config import ModelConfig
from resstream.pretrained import folder, gguf_file, hf, wheels
from resstream.pretrained.loaded import LoadedModel


def resolve_path(path: Path | str) -> Path:
    """The path itself, or for a cached model's alias (``smollm2``) the cached file."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    cached = wheels.cached_path(str(path))
    if cached is not None:
        if not cached.is_file():
            raise ConfigError(f"'{path}' is not fetched yet; run `make pretrained` (or `resstream pretrained fetch`) first")
        return cached
    raise ConfigError(f"'{path}' not found, so it is not a resstream run folder nor a model; pass a run folder, a "
                      f"Hugging Face model folder, a .gguf file, a resstream model folder, or one of: {', '.join(wheels.ALIASES)}")


def cached_tokenizer_file(tok: Tokenizer | Path) -> Path:
    """A tokenizer.json in the cache holding ``tok`` (a Tokenizer, or a file copied byte for
    byte), named by its content hash and written once, atomically. Runs point their
    data.tokenizer here, so they outlive the model file they started from."""
    data = tok.read_bytes() if isinstance(tok, Path) else tok.to_str().encode("utf-8")
    path = default_cache_dir() / "pretrained" / "tokenizers" / f"{hashlib.sha256(data).hexdigest()[:20]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def _hf_eos(c: dict) -> int | None:
    eos = c.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def load(path: Path | str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model that is not a run folder (see ``resstream.runs.load_model``
    for either). The model is in eval mode on ``device`` in ``dtype``."""
    p = resolve_path(path)
    where = str(p)
    if p.is_file():
        reader = gguf_file.open_gguf(p)
        cfg = gguf_file.config_from_gguf(reader, where)
        model = gguf_file.load_gguf_weights(reader, cfg, where, dtype)
        tok = gguf_file.tokenizer_from_gguf(reader, where)
        tok_file = cached_tokenizer_file(tok)
        eot, source = gguf_file.gguf_eos_id(reader), "gguf"
        info = {"architecture": reader.fields["general.architecture"].contents()}
    elif folder.is_model_folder(p):
        model, meta = folder.read_model_folder(p, dtype)
        tok_file = p / "tokenizer.json"
        tok, eot, source = load_tokenizer(tok_file), meta.get("eot_id"), "resstream"
        info = {k: v for k, v in meta.items() if k not in ("model", "format", "version")}
    elif p.is_dir() and hf.is_hf_folder(p):
        c = hf.read_hf_config(p)
        cfg = hf.config_from_hf(c, where)
        tok_file = p / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"'{p}' has no tokenizer.json; resstream needs the model's own tokenizer in that format")
        model = hf.load_hf_weights(p, cfg, dtype)
        tok, eot, source = load_tokenizer(tok_file), _hf_eos(c), "hf"
        info = {"model_type": c["model_type"]}
    else:
        raise ConfigError(f"'{p}' is neither a .gguf file, a Hugging Face folder (config.json with model_type), "
                          "a resstream model folder (model.json) nor a run folder (config.json from resstream train)")
    if model.cfg.vocab_size < tok.get_vocab_size(with_added_tokens=True):
        raise ConfigError(f"'{p}': the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids but the model only "
                          f"{model.cfg.vocab_size} embeddings")
    eot = find_eot_id(tok, where=where) if eot is None else eot
    name = p.stem if p.is_file() else p.name
    return LoadedModel(model.to(device), tok, tok_file, eot, name, source, p, info=info)


def describe(path: Path | str) -> tuple[ModelConfig, Path]:
    """(ModelConfig, a cached copy of its tokenizer.json) of the model at ``path``, without
    loading its weights."""
    p = resolve_path(path)
    if p.is_file():
        reader = gguf_file.open_gguf(p)
        cfg = gguf_file.config_from_gguf(reader, str(p))
        return cfg, cached_tokenizer_file(gguf_file.tokenizer_from_gguf(reader, str(p)))
    if folder.is_model_folder(p):
        cfg = folder.read_model_config(p)
    elif p.is_dir() and hf.is_hf_folder(p):
        cfg = hf.config_from_hf(hf.read_hf_config(p), str(p))
    else:
        raise ConfigError(f"'{p}' is neither a .gguf file, a Hugging Face folder nor a resstream model folder")
    if not (p / "tokenizer.json").is_file():
        raise ConfigError(f"'{p}' has no tokenizer.json; resstream needs the model's own tokenizer in that format")
    return cfg, cached_tokenizer_file(p / "tokenizer.json")
