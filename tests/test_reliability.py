"""Runs that never lie about their state, and bad input that always gets one clean line.

Every case of issue 11 has a row here: config bounds, memory refusals, run-folder locks,
checkpoints that must verify and be finite, a finished run resumed, metrics after a resume,
a process killed (SIGKILL) in the middle of a checkpoint write, edited run folders.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resstream import LM, ModelConfig, ResidualConfig
from resstream.cli import main as cli_main
from resstream.config import ConfigError, apply_overrides
from resstream.runs.checkpoint import latest_good_checkpoint, list_checkpoints, read_checkpoint, save_checkpoint
from resstream.runs.config import RunConfig
from resstream.runs.lock import RunLock
from resstream.train import train

BASE = {
    "name": "r",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
    "data": {"corpus": "kjv", "vocab_size": 320, "max_bytes": 120_000},
    "train": {"steps": 20, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "eval_every": 10, "eval_batches": 2,
              "save_every": 5, "log_every": 4, "keep_last": 5},
}
BASE_ARGS = [f"{sec}.{k}={json.dumps(v)}" for sec, table in BASE.items() if isinstance(table, dict) for k, v in table.items()]
QUIET = {"progress": False, "log": lambda s: None}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def cfg(*overrides: str) -> RunConfig:
    return RunConfig.from_dict(apply_overrides(BASE, list(overrides)))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- bounds


@pytest.mark.parametrize("override, field", [
    ("model.init_std=-1", "model.init_std"), ("model.init_std=nan", "model.init_std"),
    ("model.init_std=inf", "model.init_std"), ("train.lr=1e38", "train.lr"), ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"), ("train.weight_decay=inf", "train.weight_decay"),
    ("train.weight_decay=1000", "train.weight_decay"), ("train.seed=-1", "train.seed"),
    ("train.seed=100000000000000000000", "train.seed"), ("model.rope_base=0.5", "model.rope_base"),
    ("model.norm_eps=2", "model.norm_eps"), ("train.beta2=1", "train.beta2"), ("train.dtype=fp16", "train.dtype"),
    ("train.device=cuda:x", "train.device"), ("data.vocab_size=10000000000", "data.vocab_size"),
])
def test_bad_values_name_their_field(override, field):
    with pytest.raises(ConfigError) as e:
        cfg(override)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_nested_error_path_is_not_doubled():
    for residual, field in (({"kind": "nope"}, "residual.kind"), ({"kind": "hc", "n_streams": 0}, "model.residual.n_streams")):
        with pytest.raises(ConfigError) as e:
            ModelConfig(vocab_size=10, residual=residual)
        assert str(e.value).startswith(field + ":") and "residual.model" not in str(e.value)


def test_bf16_names_are_accepted():
    from resstream.train.setup import resolve_dtype

    for name in ("bf16", "bfloat16"):
        assert resolve_dtype(cfg(f"train.dtype={name}").train.dtype, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("kind", ["block_attnres", "hc"])  # a two-phase mixer and a multi-stream one
def test_bf16_training_run_on_cpu(kind, tmp_path):
    """train.dtype=bf16 runs the trainer's autocast path on CPU: steps, evaluation, checkpoints."""
    res = train(cfg("train.dtype=\"bf16\"", f"model.residual.kind=\"{kind}\"", "train.steps=6", "train.eval_every=6"),
                tmp_path / "run", **QUIET)
    assert res.status == "finished" and res.val_bpb is not None and res.val_bpb < 12
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "bfloat16"


def test_input_longer_than_max_seq_len_is_a_clean_error():
    model = LM(ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_options_and_overrides_interleave():
    from resstream.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["train", "--config", "c.toml", "a=1", "--out", "X", "b=2", "--no-progress", "c=3"])
    assert args.config == "c.toml" and args.out == "X" and args.overrides == ["a=1", "b=2", "c=3"]
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["train", "a=1", "--out", "X", "--bogus"])


# ----------------------------------------------------------------------------- memory


def test_memory_refusals_name_the_field(monkeypatch):
    from resstream.model import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: (200 << 20, "this machine"))
    small = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    knobs = {"train.batch_size": (4, 8, {"activations": 1})}
    assert memory.check_memory(small, 4, 32, torch.device("cpu"), True, knobs) is not None
    cases = [(small.replace(d_model=4096), "model.d_model="), (small.replace(n_layers=5000), "model.n_layers="),
             (small.replace(max_seq_len=10**8), "model.max_seq_len=")]
    for big, field in cases:
        with pytest.raises(ConfigError, match=field):
            memory.check_memory(big, 4, 32, torch.device("cpu"), True, knobs)
    with pytest.raises(ConfigError, match="train.batch_size=100000"):
        memory.check_memory(small, 100000, 32, torch.device("cpu"), True, {"train.batch_size": (100000, 8, {"activations": 1})})
    hc = small.replace(residual=ResidualConfig(kind="hc", n_streams=10**9))  # tensor sizes past 64 bits
    with pytest.raises(ConfigError, match="model.residual.n_streams="):
        memory.check_memory(hc, 4, 32, torch.device("cpu"), True, knobs)


def test_closed_form_is_a_lower_bound_of_the_measurement():
    from helpers import KIND_CASES

    from resstream.model.memory import lower_bound, measure

    for kind in dict.fromkeys(kind for kind, _ in KIND_CASES):  # every kind, default options
        mcfg = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                           residual=ResidualConfig(kind=kind))
        lo, hi = lower_bound(mcfg, 4, 32, True), measure(mcfg, 4, 32, True)
        assert hi.params == LM(mcfg).num_params(), kind
        assert lo.params <= hi.params and lo.activation_bytes <= hi.activation_bytes, kind
        assert lo.buffer_bytes >= hi.buffer_bytes  # includes the float64 temporaries of the rotary tables


# ----------------------------------------------------------------------------- CLI refusals


@pytest.mark.parametrize("override, field", [
    ("model.max_seq_len=1000000000", "model.max_seq_len"), ("model.d_model=1000000", "model.d_model"),
    ("model.n_layers=100000", "model.n_layers"), ("train.lr=1e38", "train.lr"), ("train.seed=-1", "train.seed"),
    ("train.seed=100000000000000000000", "train.seed"), ("data.cache_dir=\"/proc/x\"", "data.cache_dir"),
    ("model.init_std=nan", "model.init_std"),
])
def test_cli_refusal_is_one_line_and_leaves_nothing(override, field, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(["train", "--out", str(out), *BASE_ARGS, override, "--no-progress"], capsys)
    assert code == 2 and err.startswith(f"resstream: error: {field}") and err.count("\n") == 1, err
    assert not out.exists()


def test_compare_refusals_leave_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = cli(["compare", "--out", str(out), "--corpus", str(tmp_path / "nonexistent"), *BASE_ARGS], capsys)
    assert code == 2 and "data.corpus" in err and err.count("\n") == 1 and not out.exists()
    code, _, err = cli(["compare", "--out", str(out), "--residuals", "", *BASE_ARGS], capsys)
    assert code == 2 and "--residuals" in err and not out.exists()
    code, _, err = cli(["compare", "--out", str(out), "--residuals", "prenorm,hc:n_streams=100000000", *BASE_ARGS], capsys)
    assert code == 2 and "model.residual.n_streams" in err and not out.exists()


# ----------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short finished run (checkpoints at steps 5 and 10), shared read-only: copy to edit."""
    run = tmp_path_factory.mktemp("trained") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("RESSTREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    train(cfg("train.steps=10"), run, **QUIET)
    mp.undo()
    return run


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


def test_finished_run_resumed_changes_nothing(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (run / "status.json", run / "metrics.jsonl", run / "config.json")}
    code, out, _ = cli(["train", "--resume", str(run), "--no-progress"], capsys)
    assert code == 0 and "already finished" in out
    assert before == {p.name: p.read_bytes() for p in (run / "status.json", run / "metrics.jsonl", run / "config.json")}
    assert status(run)["val_bpb"] is not None


def test_a_second_writer_is_refused(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    held = RunLock(run).acquire()
    try:
        code, _, err = cli(["train", "--resume", str(run), "train.steps=12", "--no-progress"], capsys)
        assert code == 2 and "in use by process" in err and err.count("\n") == 1
        code, _, err = cli(["train", "--out", str(run), *BASE_ARGS, "--no-progress"], capsys)
        assert code == 2 and "in use by process" in err
    finally:
        held.release()
    assert status(run)["status"] == "finished" and status(run)["last_good_step"] == 10


def test_unverified_checkpoints_are_refused_unless_trusted(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    for ckpt in list_checkpoints(run):  # "sha256": {} must not switch verification off
        state = json.loads((ckpt / "state.json").read_text())
        (ckpt / "state.json").write_text(json.dumps({**state, "sha256": {}}))
    code, out, err = cli(["generate", str(run), "--prompt", "In the", "--max-new-tokens", "3"], capsys)
    assert code == 2 and "--trust-unverified" in err.splitlines()[-1] and out == ""
    assert all(line.startswith(("warning:", "resstream: error:")) for line in err.splitlines())
    code, out, err = cli(["generate", str(run), "--prompt", "In the", "--max-new-tokens", "3", "--trust-unverified"], capsys)
    assert code == 0 and out.startswith("In the") and "unverified" in err
    code, _, err = cli(["train", "--resume", str(run), "train.steps=12", "--no-progress"], capsys)
    assert code == 2 and "nothing was changed" in err and status(run)["status"] == "finished"


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["model"].update(n_layers=10**9), "model.n_layers="),
    (lambda m: m["model"].update(vocab_size=10**12), "model.vocab_size="),
    (lambda m: m["model"]["residual"].update(kind="hc", n_streams=10**9), "model.residual.n_streams="),
    (lambda m: m["model"].update(d_model=64), "does not fit the model"),
    (lambda m: m.pop("model"), "'model' table is missing"),
    (lambda m: m["model"].update(init_std=float("nan")), "model.init_std"),
])
def test_generate_refuses_an_edited_run_folder(trained, tmp_path, capsys, edit, needle):
    run = _copy(trained, tmp_path / "run")
    meta = json.loads((run / "config.json").read_text())
    edit(meta)
    (run / "config.json").write_text(json.dumps(meta))
    code, out, err = cli(["generate", str(run), "--prompt", "In the", "--max-new-tokens", "3"], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1 and out == "", err
    (run / "config.json").write_text("[1, 2]")
    code, _, err = cli(["generate", str(run), "--prompt", "x"], capsys)
    assert code == 2 and "expected a JSON object" in err


def test_generate_arguments_and_warnings_stay_off_stdout(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    for bad in (["--temperature", "inf"], ["--temperature", "nan"], ["--top-p", "2"], ["--seed", "-1"]):
        code, out, err = cli(["generate", str(run), "--prompt", "x", *bad], capsys)
        assert code == 2 and err.count("\n") == 1 and out == "", bad
    newest = list_checkpoints(run)[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-64])  # truncated: falls back with a warning
    code, out, err = cli(["generate", str(run), "--prompt", "In the", "--max-new-tokens", "3", "--seed", "1"], capsys)
    assert code == 0 and "falling back" in err and "warning" not in out and out.startswith("In the")


# ----------------------------------------------------------------------------- non-finite values


def _poison_after(monkeypatch, at_step: int) -> None:
    """The optimizer writes an infinity into a weight at its ``at_step``-th step."""
    import resstream.train.setup as setup

    real = setup.make_optimizer

    def make(model, tc):
        opt = real(model, tc)
        step, count = opt.step, [0]

        def poisoned(*args, **kwargs):
            out = step(*args, **kwargs)
            count[0] += 1
            if count[0] == at_step:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("inf")
            return out

        opt.step = poisoned
        return opt

    monkeypatch.setattr(setup, "make_optimizer", make)


@pytest.mark.parametrize("poison_at", [7, 10])  # between checkpoints; right before one is written
def test_non_finite_weights_are_never_checkpointed(poison_at, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poison_after(monkeypatch, poison_at)
    res = train(cfg("train.steps=15"), run, **QUIET)
    assert res.status == "diverged" and res.last_good_step == 5
    assert status(run)["status"] == "diverged" and status(run)["last_good_step"] == 5
    assert [p.name for p in list_checkpoints(run)] == ["step_000005"]
    read_checkpoint(list_checkpoints(run)[0])  # verifies, and is finite


def test_a_non_finite_checkpoint_is_skipped(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 1, model.state_dict(), opt.state_dict(), {}, keep_last=5)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path, 2, model.state_dict(), opt.state_dict(), {}, keep_last=5)  # as an older version could have
    warnings = []
    path, state, _, _ = latest_good_checkpoint(tmp_path, warn=warnings.append)
    assert state["step"] == 1 and "non-finite" in warnings[0]


# ----------------------------------------------------------------------------- killed mid-save

CHILD = r"""
import json, os, signal, sys
from pathlib import Path
import resstream.runs.checkpoint as ck
from resstream.runs.config import RunConfig
from resstream.train import train

real = ck.fsync_dir
def dying(path):
    if Path(path).name.startswith(".tmp-step_000010"):  # step 10's files are written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    real(path)
ck.fsync_dir = dying
train(RunConfig.from_dict(json.loads(sys.argv[1])), Path(sys.argv[2]), progress=False, log=lambda s: None)
"""


def test_sigkill_during_save_resumes_exactly(tmp_path):
    """A process killed in the middle of writing checkpoint 10 (holding the run's lock, with a
    half-open logging window at step 5's checkpoint): the resume takes the lock over, removes
    the temporary folder, restarts from step 5 and ends with the uninterrupted run's weights
    and metrics, row for row."""
    c = cfg()
    straight = tmp_path / "straight"
    train(c, straight, **QUIET)
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(c.to_dict()), str(run)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert list((run / "checkpoints").glob(".tmp-step_000010-*")) and (run / ".lock").exists()
    assert status(run) == {"status": "running", "last_good_step": 5}
    res = train(c, run, resume=True, **QUIET)
    assert res.status == "finished" and not list((run / "checkpoints").glob(".tmp-*"))
    _, _, a, _ = latest_good_checkpoint(straight)
    _, _, b, _ = latest_good_checkpoint(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "tokens", "train_loss", "lr", "grad_norm", "val_loss", "val_bpb")
    rows_a = [{k: r.get(k) for k in keys} for r in metrics(straight)]
    rows_b = [{k: r.get(k) for k in keys} for r in metrics(run)]
    assert rows_a == rows_b
