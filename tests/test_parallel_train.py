"""The trainer on parallel layouts, through train(): one run that changes layout at every
resume (1 process -> FSDP x PP on 4 processes -> PP = 4 -> 1 process), accumulating gradients
over 2 micro-steps, logs the same losses as an uninterrupted single-process run, logs the
pipeline's traffic, and its sharded checkpoints serve generation. Bad layouts end in one line."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from resstream.cli import main as cli_main
from resstream.config import apply_overrides
from resstream.runs.checkpoint import list_checkpoints
from resstream.runs.config import RunConfig
from resstream.runs.load import generate_from_run
from resstream.train import train

BASE = {
    "name": "p",
    "model": {"d_model": 32, "n_layers": 4, "n_heads": 4, "max_seq_len": 64, "residual": {"kind": "block_attnres", "block_size": 3}},
    "data": {"corpus": "kjv", "vocab_size": 320, "max_bytes": 120_000},
    "train": {"steps": 6, "batch_size": 8, "grad_accum": 2, "seq_len": 32, "eval_every": 2, "eval_batches": 2, "save_every": 2,
              "log_every": 1, "keep_last": 4},
}
FSDP_PP = ["parallel.pp=2", "parallel.fsdp=true", "parallel.schedule=1f1b", "parallel.microbatches=2"]
PP4 = ["parallel.pp=4", "parallel.schedule=gpipe", "parallel.microbatches=4"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def cfg(*overrides: str) -> RunConfig:
    return RunConfig.from_dict(apply_overrides(BASE, list(overrides)))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cache: str, out: str, phases: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), RESSTREAM_CACHE=cache)
    torch.set_num_threads(1)
    from resstream.train.distributed import init_distributed, shutdown

    for overrides, stop_after in phases:
        train(cfg(*overrides), Path(out), resume=True, progress=False, log=lambda s: None, stop_after=stop_after)
    shutdown(init_distributed("cpu"))


def test_a_run_moves_between_layouts_and_keeps_its_losses(tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    straight = train(cfg(), tmp_path / "straight", **quiet)
    run = tmp_path / "run"
    train(cfg(), run, stop_after=2, **quiet)  # plain checkpoint at step 2
    phases = [(FSDP_PP, 2), (PP4, 1)]  # plain -> FSDP x PP (steps 3-4) -> PP = 4 (step 5)
    mp.spawn(_worker, args=(4, _free_port(), os.environ["RESSTREAM_CACHE"], str(run), phases), nprocs=4, join=True)
    state = json.loads((list_checkpoints(run)[-1] / "state.json").read_text())
    assert state["step"] == 5 and state["format"] == "sharded" and state["world_size"] == 4
    text = generate_from_run(run, "In the beginning", max_new_tokens=4, temperature=0, out=open(os.devnull, "w"))
    assert isinstance(text, str)
    res = train(cfg(), run, resume=True, **quiet)  # one process reads the 4-process checkpoint
    assert res.status == "finished" and res.step == 6
    a, b = metrics(tmp_path / "straight"), metrics(run)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-5, (ra["step"], ra["train_loss"], rb["train_loss"])
        if "val_bpb" in ra:
            assert abs(ra["val_bpb"] - rb["val_bpb"]) < 1e-5, ra["step"]
    # pipeline steps log every rank's traffic, and only they do
    for rb in b[2:5]:
        assert len(rb["pp_fwd_sent_tensors"]) == 4 and sum(rb["pp_fwd_sent_tensors"]) == sum(rb["pp_bwd_recv_tensors"]) > 0
    assert "pp_fwd_sent_tensors" not in b[0] and "pp_fwd_sent_tensors" not in b[5]
    assert abs(straight.val_bpb - res.val_bpb) < 1e-5


def test_bad_layouts_are_one_line(tmp_path, capsys):
    cases = [
        (["parallel.pp=2"], "parallel.pp: 2 pipeline stages do not divide the 1 process;"),
        (["parallel.virtual_stages=2", "parallel.pp=2"], "needs parallel.schedule=interleaved_1f1b"),
        (["parallel.pp=1", "parallel.virtual_stages=2", "parallel.schedule=interleaved_1f1b"], "needs parallel.pp > 1"),
        (["parallel.schedule=zigzag"], "parallel.schedule: must be one of"),
        (["parallel.pp=1", "parallel.microbatches=4"], "parallel.microbatches: only used with parallel.pp > 1"),
        (["parallel.fsdp=1"], "parallel.fsdp: expected bool"),
    ]
    for overrides, needle in cases:
        code = cli_main(["train", "--out", str(tmp_path / "run"), *[f"{k}" for k in overrides]])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and err.count("\n") == 1, (overrides, err)
        assert not (tmp_path / "run").exists()
