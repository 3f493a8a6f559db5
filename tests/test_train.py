"""Training harness: a run trains and writes what it should, resume is exact, checkpoints
survive corruption and interrupted saves, DDP equals single-process, bad input fails
cleanly with nothing written."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp_mp

from resstream.cli import main as cli_main
from resstream.config import TrainConfig, apply_overrides
from resstream.runs.config import RunConfig
from resstream.train import train
from resstream.runs.checkpoint import latest_good_checkpoint, list_checkpoints, read_checkpoint, save_checkpoint
from resstream.train.optim import lr_at, param_groups

BASE = {
    "name": "t",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
    "data": {"corpus": "kjv", "vocab_size": 320, "max_bytes": 120_000},
    "train": {"steps": 20, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "eval_every": 10, "eval_batches": 2,
              "save_every": 5, "log_every": 1, "keep_last": 3},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one data cache for the whole module: the tokenizer is trained once
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def cfg(**over) -> RunConfig:
    return RunConfig.from_dict(apply_overrides(BASE, [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in over.items()]))


def metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_run_folder_and_learns(tmp_path):
    res = train(cfg(**{"train.steps": 40, "train.eval_every": 20}), tmp_path / "run", progress=False, log=lambda s: None)
    run = tmp_path / "run"
    assert res.status == "finished" and res.step == 40
    meta = json.loads((run / "config.json").read_text())
    assert meta["run"]["train"]["steps"] == 40 and meta["model"]["vocab_size"] == 320
    assert (run / "tokenizer.json").is_file()
    rows = metrics(run)
    keys = {"step", "tokens", "train_loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"}
    assert keys <= rows[0].keys()
    bpb = [r["val_bpb"] for r in rows if "val_bpb" in r]
    assert len(bpb) == 2 and bpb[1] < bpb[0]
    assert [p.name for p in list_checkpoints(run)] == ["step_000030", "step_000035", "step_000040"]
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_resume_is_exact(tmp_path):
    c = cfg()
    train(c, tmp_path / "straight", progress=False, log=lambda s: None)
    first = train(c, tmp_path / "split", progress=False, log=lambda s: None, stop_after=10)
    assert first.status == "interrupted" and first.step == 10
    # a run that had logged past its last checkpoint: those rows are dropped on resume
    train(c, tmp_path / "split", resume=True, progress=False, log=lambda s: None)
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 21))
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-6, ra["step"]
    assert abs(a[-1]["val_bpb"] - b[-1]["val_bpb"]) < 1e-6


def test_corrupt_and_truncated_checkpoints_fall_back(tmp_path):
    run = tmp_path / "run"
    train(cfg(**{"train.steps": 15}), run, progress=False, log=lambda s: None)
    ckpts = list_checkpoints(run)
    assert len(ckpts) == 3
    with open(ckpts[-1] / "model.safetensors", "r+b") as f:  # flip bytes: corrupt
        f.seek(200)
        f.write(b"\x00\xff\x00\xff")
    (ckpts[-2] / "optimizer.safetensors").write_bytes((ckpts[-2] / "optimizer.safetensors").read_bytes()[:100])  # truncate
    warnings = []
    path, state, _, _ = latest_good_checkpoint(run, warn=warnings.append)
    assert path == ckpts[0] and state["step"] == 5
    assert len(warnings) == 2 and all("falling back" in w and "\n" not in w for w in warnings)
    # resume continues from the good one and finishes
    res = train(cfg(**{"train.steps": 15}), run, resume=True, progress=False, log=lambda s: None)
    assert res.status == "finished" and res.step == 15


def test_killed_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(cfg(**{"train.steps": 5}), run, progress=False, log=lambda s: None)
    good = list_checkpoints(run)
    import resstream.runs.checkpoint as ck

    def dying_save(tensors, path):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt  # the process is killed mid-write

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, 10, model.state_dict(), opt.state_dict(), {}, keep_last=2)
    assert list_checkpoints(run) == good  # the half-written one never became visible
    read_checkpoint(good[-1])


def test_optimizer_groups_and_schedule():
    from resstream import LM, ModelConfig, ResidualConfig

    model = LM(ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, residual=ResidualConfig(kind="block_attnres")))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].startswith(("residual.", "embed.")) and "norm" not in names[id(p)] for p in decay["params"])
    assert any(names[id(p)] == "residual.queries" for p in no_decay["params"])
    tc = TrainConfig(steps=100, lr=1.0, warmup_frac=0.1, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(0.1) and lr_at(9, tc) == pytest.approx(1.0)
    assert lr_at(99, tc) == pytest.approx(0.1)
    lrs = [lr_at(s, tc) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str, cache: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), RESSTREAM_CACHE=cache)
    torch.set_num_threads(1)
    from resstream.train.distributed import shutdown, init_distributed

    train(RunConfig.from_dict(cfg_dict), Path(out), progress=False, log=lambda s: None)
    shutdown(init_distributed("cpu"))


def test_ddp_two_processes_equal_single_process(tmp_path):
    c = cfg(**{"train.steps": 4, "train.save_every": 4, "train.eval_every": 4, "model.residual.kind": "block_attnres"})
    train(c, tmp_path / "single", progress=False, log=lambda s: None)  # also fills the data cache
    tmp_mp.spawn(_ddp_worker, args=(2, _free_port(), c.to_dict(), str(tmp_path / "ddp"), os.environ["RESSTREAM_CACHE"]),
                 nprocs=2, join=True)
    _, _, single, _ = latest_good_checkpoint(tmp_path / "single")
    _, _, ddp, _ = latest_good_checkpoint(tmp_path / "ddp")
    assert single.keys() == ddp.keys()
    for k in single:
        assert torch.allclose(single[k], ddp[k], atol=1e-5, rtol=1e-4), k
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli_main(args)
    return code, capsys.readouterr().err


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    cases = [
        (["train", "--out", str(out), "train.stepz=3"], "unknown config key 'train.stepz'"),
        (["train", "--out", str(out), "train.steps=-1"], "train.steps"),
        (["train", "--out", str(out), "model.residual.kind=nope"], "known kinds"),
        (["train", "--out", str(out), "data.corpus=/no/such/dir"], "/no/such/dir"),
        (["train", "--config", str(tmp_path / "missing.toml")], "not found"),
        (["train", "--out", str(out), "data.vocab_size=100"], "data.vocab_size"),
    ]
    for args, needle in cases:
        code, err = run_cli(args, capsys)
        assert code == 2, args
        assert needle in err and err.count("\n") == 1, (args, err)
        assert not out.exists(), args
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions do not bind; use a file as parent
        blocker = tmp_path / "file"
        blocker.write_text("")
        target = blocker / "run"
    else:
        target = ro / "run"
    code, err = run_cli(["train", "--out", str(target), *[f"{k}={v}" for k, v in [("data.max_bytes", 120000), ("data.vocab_size", 320)]]], capsys)
    assert code == 2 and "cannot write the run folder" in err


def test_cli_resume_refuses_changed_settings(tmp_path, capsys):
    run = tmp_path / "run"
    train(cfg(**{"train.steps": 2, "train.save_every": 2}), run, progress=False, log=lambda s: None)
    code, err = run_cli(["train", "--resume", str(run), "train.lr=1.0"], capsys)
    assert code == 2 and "cannot change 'train.lr'" in err
    code, err = run_cli(["train", "--out", str(run), "data.max_bytes=120000", "data.vocab_size=320"], capsys)
    assert code == 2 and "already holds a run" in err
    code, _ = run_cli(["train", "--resume", str(run), "train.steps=3", "--no-progress"], capsys)
    assert code == 0
    assert json.loads((run / "status.json").read_text())["last_good_step"] == 3


def test_generate_from_a_run_whose_data_cache_is_gone(tmp_path, monkeypatch, capsys):
    """Generation reads the run's own tokenizer.json: deleting the data cache does not matter."""
    import io
    import shutil

    from resstream.runs import generate_from_run

    run = tmp_path / "run"
    train(cfg(**{"train.steps": 2, "train.save_every": 2, "train.eval_every": 2}), run, progress=False, log=lambda s: None)
    shutil.rmtree(json.loads((run / "config.json").read_text())["data_dir"])
    out = io.StringIO()
    text = generate_from_run(run, "In the beginning", max_new_tokens=5, temperature=0, out=out)
    assert out.getvalue() == "In the beginning" + text + "\n"
    code, err = run_cli(["generate", str(tmp_path / "nothing"), "--prompt", "x"], capsys)
    assert code == 2 and "not a resstream run folder" in err


def test_compile_time_is_reported_apart(tmp_path, monkeypatch):
    """Seconds spent compiling inside a step (residual/compiled.py counts them) go to compile_s
    in status.json and the result, not into the step time behind tokens/s."""
    import resstream.train.loop as loop

    compiled_s = [0.0]
    real_step = loop._step

    def step(s, n):
        out = real_step(s, n)
        if n == 0:  # the first step compiles for 1 s
            time.sleep(1.0)
            compiled_s[0] += 1.0
        return out

    monkeypatch.setattr(loop, "_step", step)
    monkeypatch.setattr(loop, "compile_seconds", lambda: compiled_s[0])
    res = train(cfg(**{"train.steps": 4, "train.log_every": 4}), tmp_path / "run", progress=False, log=lambda s: None)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert res.compile_s == pytest.approx(1.0) and status["compile_s"] == pytest.approx(1.0)
    window_s = 4 * (4 * 32) / metrics(tmp_path / "run")[-1]["tokens_per_s"]  # 4 steps of 4 x 32 tokens
    assert window_s < 1.0  # four tiny steps, without the second of compilation


def test_tune_allocator_is_idempotent_and_says_what_it_did():
    from resstream import tune_allocator

    first = tune_allocator()
    assert tune_allocator() == first
    if os.uname().sysname == "Linux" and "MALLOC_MMAP_MAX_" not in os.environ:
        assert "glibc" in first


def test_whole_model_compile_first_step_is_reported_apart(tmp_path, monkeypatch):
    """With train.compile the first step of a call is compilation: its time goes to compile_s and
    it is not a timed step (stand-in: a 'compiled' model whose first call takes a second)."""
    import resstream.train.loop as loop

    def fake_compile(model):
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                time.sleep(1.0)
            return model(*a, **k)

        return run

    monkeypatch.setattr(loop.torch, "compile", fake_compile)
    run_cfg = cfg(**{"train.steps": 4, "train.log_every": 4})
    run_cfg.train.compile = True
    res = train(run_cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert res.compile_s >= 1.0
    window_s = 3 * (4 * 32) / metrics(tmp_path / "run")[-1]["tokens_per_s"]  # 3 timed steps of 4 x 32 tokens
    assert window_s < 1.0
