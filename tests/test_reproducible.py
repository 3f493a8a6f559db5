"""What the README promises about reproducibility: the same config on the same machine, torch
build and thread count trains to bit-identical losses (every logged number but the timings)."""
from __future__ import annotations

import json

import pytest

from resstream.config import apply_overrides
from resstream.runs.config import RunConfig
from resstream.train import train

BASE = {
    "name": "t",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, "residual": {"kind": "block_attnres", "block_size": 2}},
    "data": {"corpus": "kjv", "vocab_size": 320, "max_bytes": 120_000},
    "train": {"steps": 8, "batch_size": 4, "seq_len": 16, "eval_every": 4, "eval_batches": 2, "save_every": 50, "log_every": 1},
}
TIMING = {"tokens_per_s", "elapsed_s", "peak_mem_mb"}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_the_same_run_twice_is_bit_identical(tmp_path):
    rows = []
    for name in ("a", "b"):
        train(RunConfig.from_dict(apply_overrides(BASE, [])), tmp_path / name, progress=False, log=lambda *a: None)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows.append([{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines])
    assert rows[0] == rows[1] and any("val_loss" in r for r in rows[0])
