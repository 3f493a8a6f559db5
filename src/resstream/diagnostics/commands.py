"""``resstream analyze`` and ``resstream convert`` on any model path, measured on validation text.

A run folder is measured on its own validation split (unless ``corpus`` names another text);
any other model (GGUF file, Hugging Face or resstream model folder) on the validation split of
``corpus`` (default the King James Bible), re-tokenized with the model's own tokenizer and
cached like every prepared corpus.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from resstream.config import ConfigError, DataConfig
from resstream.residual.config import ResidualConfig

DEFAULT_CORPUS = "kjv"
Log = Callable[[str], None]


def open_with_data(path: Path | str, corpus: str | None = None, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, log: Log = print):
    """(LoadedModel, PreparedData, corpus name) for measuring the model at ``path``."""
    from resstream.data import prepare
    from resstream.runs import load_model, run_data

    loaded = load_model(path, device=device, dtype=dtype)
    if loaded.run_config is not None and corpus is None:
        return loaded, run_data(loaded.path, loaded.run_config), loaded.run_config.data.corpus
    corpus = corpus or DEFAULT_CORPUS
    data = prepare(DataConfig(corpus=corpus, tokenizer=str(loaded.tokenizer_file)), log=log)
    return loaded, data, corpus


def validation_batches(data, model, batches: int, batch_size: int, seq_len: int):
    """The first ``batches`` validation windows of [batch_size, seq_len] (seq_len capped at
    the model's max_seq_len), the windows training evaluates on."""
    from resstream.data.batches import val_batches

    for name, v in (("--batches", batches), ("--batch-size", batch_size), ("--seq-len", seq_len)):
        if v < 1:
            raise ConfigError(f"{name}: must be >= 1, got {v}")
    return val_batches(data.val, batches, batch_size, min(seq_len, model.cfg.max_seq_len))


def _meta(loaded, data, corpus: str, batch_size: int, seq_len: int) -> dict:
    return {"name": loaded.name, "source": loaded.source, "path": str(loaded.path), "model": loaded.model.cfg.to_dict(),
            "params": loaded.model.num_params(), "corpus": corpus, "batch_size": batch_size,
            "seq_len": min(seq_len, loaded.model.cfg.max_seq_len), "bytes_exact": bool(data.token_bytes_exact)}


def analyze_model(path: Path | str, out: Path | str | None = None, corpus: str | None = None, batches: int = 4,
                  batch_size: int = 1, seq_len: int = 256, log: Log = print) -> dict:
    """Measure how the model at ``path`` uses its depth and write the analysis report."""
    from resstream.diagnostics.analyze import analyze_depth
    from resstream.diagnostics.analyze_report import write_analysis

    loaded, data, corpus = open_with_data(path, corpus, log=log)
    vb = validation_batches(data, loaded.model, batches, batch_size, seq_len)
    default = loaded.path / "analysis" if loaded.source == "run" else Path(f"analysis-{loaded.name}")
    out_dir = Path(out) if out is not None else default
    log(f"analyze: {loaded.name}, {loaded.model.cfg.n_sublayers} sublayers, {sum(x.numel() for x, _ in vb):,} tokens")
    a = analyze_depth(loaded.model, vb, data.token_bytes)
    written = write_analysis(a, _meta(loaded, data, corpus, batch_size, seq_len), out_dir)
    return {"out_dir": str(out_dir), "analysis": a, **written}


@torch.no_grad()
def model_agreement(ref, other, batches, token_bytes: np.ndarray) -> dict:
    """How closely ``other`` computes ``ref``'s function on ``batches``: relative logit
    difference ||other - ref|| / ||ref|| over all logits, the largest absolute difference,
    top-1 agreement, and each model's validation bits per byte."""
    tb = torch.as_tensor(np.asarray(token_bytes), dtype=torch.float64)
    diff2 = ref2 = 0.0
    max_abs, agree, tokens, nbytes = 0.0, 0, 0, 0.0
    nats = [0.0, 0.0]
    for idx, targets in batches:
        a, b = ref(idx).double(), other(idx).double()
        diff2 += (b - a).pow(2).sum().item()
        ref2 += a.pow(2).sum().item()
        max_abs = max(max_abs, (b - a).abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        for i, logits in enumerate((a, b)):
            nats[i] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        tokens += targets.numel()
        nbytes += tb[targets].sum().item()
    bits = math.log(2) * max(nbytes, 1.0)
    return {"rel_logit_diff": math.sqrt(diff2 / max(ref2, 1e-300)), "max_abs_logit_diff": max_abs,
            "top1_agreement": agree / tokens, "bpb_before": nats[0] / bits, "bpb_after": nats[1] / bits,
            "delta_bpb": (nats[1] - nats[0]) / bits, "tokens": tokens}


def convert_model(path: Path | str, residual: ResidualConfig, out: Path | str, corpus: str | None = None,
                  batches: int = 4, batch_size: int = 1, seq_len: int = 256, log: Log = print) -> dict:
    """Upcycle the model at ``path`` to ``residual``'s kind, measure that it computes the same
    function on validation text (and that what differs is the norms' epsilon: see
    ``resstream.pretrained.convert``), and save it as a resstream model folder at ``out``."""
    from resstream.pretrained import eps_equivalent, save_model_folder, upcycle

    if out is None:
        raise ConfigError("--out: name the folder the converted model goes to")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError(f"'{out}' already exists; choose another --out (nothing is overwritten)")
    loaded, data, corpus = open_with_data(path, corpus, log=log)
    converted = upcycle(loaded.model, residual)
    vb = validation_batches(data, loaded.model, batches, batch_size, seq_len)
    agreement = model_agreement(loaded.model, converted, vb, data.token_bytes)
    # what is left once the norms' eps -> eps * n^2 is accounted for: float rounding
    eps_only = model_agreement(eps_equivalent(loaded.model, converted), converted, vb, data.token_bytes)
    agreement["rel_logit_diff_vs_eps_equivalent"] = eps_only["rel_logit_diff"]
    record = {"converted_from": str(loaded.path), "source_format": loaded.source,
              "conversion": {"residual": residual.to_dict(), "corpus": corpus, **agreement}}
    save_model_folder(out, converted, Path(loaded.tokenizer_file).read_text(encoding="utf-8"), loaded.eot_id, record)
    log(json.dumps(record["conversion"], indent=1))
    return {"out_dir": str(out), **record["conversion"]}
