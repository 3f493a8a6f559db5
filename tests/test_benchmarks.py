"""The benchmarks keep working and their floor is what it claims: the nanoGPT-style reference GPT
has PreNorm's parameter count and decodes exactly as it runs forward; step_time.py and decode.py
run end to end at a tiny shape and print their tables (timings here mean nothing)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from helpers import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import decode as D  # noqa: E402
import step_time as ST  # noqa: E402
from reference_gpt import GPT  # noqa: E402
from resstream import LM, ModelConfig  # noqa: E402


def test_reference_gpt_is_prenorm_sized_and_decodes_like_its_forward():
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    gpt = GPT(cfg).eval()
    assert sum(p.numel() for p in gpt.parameters()) == sum(p.numel() for p in LM(cfg).parameters())
    idx = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        full = gpt(idx)
    cache = gpt.new_cache(2, 16)
    steps = [gpt.decode(idx[:, :5], cache)] + [gpt.decode(idx[:, t : t + 1], cache) for t in range(5, 9)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_step_time_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--layers", "1", "--d-model", "32", "--seq", "8", "--batch", "2",
                                      "--vocab", "64", "--steps", "1", "--warmup", "0", "--no-memory",
                                      "--residuals", "gpt,prenorm,block_attnres", "--paths", "default,eager"])
    ST.main()
    out = capsys.readouterr().out
    assert "machine:" in out and "gpt (nanoGPT-style floor)" in out and "default (native mixing)" in out and "| eager |" in out
    assert "| block_attnres | eager |" in out and "block_attnres: " in out and "target <= 1.05" in out


def test_decode_runs(capsys):
    D.main(["--layers", "1", "--d-model", "32", "--heads", "4", "--vocab", "64", "--prompt-len", "4", "--new-tokens", "3",
            "--rounds", "1", "--batches", "1,2", "--residuals", "gpt,prenorm,attnres"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "|---" not in line and "kind" not in line]
    assert len(rows) == 6 and any(r.startswith("| attnres | 2 |") for r in rows)
