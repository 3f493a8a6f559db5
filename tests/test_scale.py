"""`resstream scale`, `resstream sweep` and `compare --seeds auto`: sizes and their parameter
counts, the analysis on runs with known losses, and one tiny end-to-end study in real child
processes (resumed without retraining)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from resstream import LM, ModelConfig, ResidualConfig
from resstream.cli import main as cli_main
from resstream.compare.scale import ScaleOptions, plan_scale, scale
from resstream.compare.sizes import build_sizes, count_params, parse_counts, parse_shapes, shape_for_params, shaped
from resstream.config import ConfigError, apply_overrides
from resstream.runs import folder
from resstream.runs.config import RunConfig

BASE = {
    "name": "t",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"corpus": "kjv", "vocab_size": 320, "max_bytes": 120_000},
    "train": {"steps": 4, "batch_size": 4, "seq_len": 16, "eval_every": 2, "eval_batches": 1, "save_every": 50,
              "log_every": 1},
    "compare": {"residuals": ["prenorm", "attnres"], "seeds": 2},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def cfg(*over: str) -> RunConfig:
    return RunConfig.from_dict(apply_overrides(BASE, list(over)))


# ----------------------------------------------------------------------------- sizes


def test_sizes_parse_and_fail_in_one_line():
    assert parse_shapes("4x64, 6x96") == [(4, 64), (6, 96)]
    assert parse_counts("200k,1.5M,3000") == [200_000, 1_500_000, 3000]
    for bad in ("4y64", "x64", "0x64", ""):
        with pytest.raises(ConfigError, match="--sizes"):
            parse_shapes(bad)
    with pytest.raises(ConfigError, match="--params"):
        parse_counts("lots")
    with pytest.raises(ConfigError, match="multiple of the head width 16"):
        shaped(BASE["model"], 2, 40)


def test_non_embedding_count_matches_a_real_model():
    section = shaped({**BASE["model"], "residual": {"kind": "attnres"}}, 3, 48)
    n, total = count_params(section, 320)
    model = LM(ModelConfig(vocab_size=320, d_model=48, n_layers=3, n_heads=3, max_seq_len=32,
                           residual=ResidualConfig(kind="attnres")))
    assert total == model.num_params()
    assert n == model.num_params() - 320 * 48 - model.num_params(residual_only=True)
    untied = {**section, "tie_embeddings": False}
    assert count_params(untied, 320)[0] == n  # the head is not counted either


def test_sizes_by_target_params_and_token_rules():
    n_layers, d = shape_for_params(BASE["model"], 320, 60_000)
    n, _ = count_params(shaped(BASE["model"], n_layers, d), 320)
    assert abs(math.log(n / 60_000)) < 0.35 and d == 16 * n_layers  # keeps the base ratio d/L = 16
    sizes = build_sizes(BASE["model"], 320, [(3, 32), (1, 32)], 64, 2.0, None)
    assert [s.label for s in sizes] == ["1x32", "3x32"]  # sorted by N
    for s in sizes:
        assert s.tokens == s.steps * 64 and s.tokens >= 2 * s.params > s.tokens - 64
        assert s.compute == 6.0 * s.params * s.tokens
    fixed = build_sizes(BASE["model"], 320, [(1, 32), (3, 32)], 64, 2.0, 1000)
    assert {s.tokens for s in fixed} == {1024}


def test_plan_errors_before_training(tmp_path):
    with pytest.raises(ConfigError, match="at least two sizes"):
        plan_scale(cfg(), ScaleOptions(sizes="2x32"))
    with pytest.raises(ConfigError, match="name the model sizes"):
        plan_scale(cfg(), ScaleOptions())
    with pytest.raises(ConfigError, match="either --sizes or --params"):
        plan_scale(cfg(), ScaleOptions(sizes="1x32,2x32", params="1k,2k"))
    with pytest.raises(ConfigError, match="less than one step"):
        plan_scale(cfg(), ScaleOptions(sizes="1x32,2x32", tokens=10))
    p = plan_scale(cfg("scale.sizes=[\"1x32\",\"2x32\"]", "scale.tokens_per_param=0.5"), ScaleOptions())
    assert [s.label for s in p.sizes] == ["1x32", "2x32"] and p.tokens_per_param == 0.5


# ----------------------------------------------------------------------------- analysis on known losses


def _fake_run(run_dir: Path, bpb: float, tokens: int) -> None:
    run_dir.mkdir(parents=True)
    folder.write_status(run_dir, "finished", 1)
    folder.append_metrics(run_dir, {"step": 1, "tokens": tokens, "val_bpb": bpb, "tokens_per_s": 1.0})


def test_analysis_finds_a_known_compute_multiplier(tmp_path):
    """Kind k reaches at compute C exactly the baseline's loss at 2C (seed noise shared by
    both kinds): its multiplier is 2 at every size, interval included."""
    from resstream.compare.scale import run_dir
    from resstream.compare.scale_analysis import analyse, collect_points

    p = plan_scale(cfg(), ScaleOptions(sizes="1x32,2x32,3x32,4x32", residuals="prenorm,attnres", seeds=3))
    for size in p.sizes:
        for seed in p.seeds:
            noise = 1.0 + 0.01 * (seed - 1)
            _fake_run(run_dir(tmp_path, size, "prenorm", seed), 9.0 * size.compute ** -0.08 * noise, size.tokens)
            _fake_run(run_dir(tmp_path, size, "attnres", seed), 9.0 * (2 * size.compute) ** -0.08 * noise, size.tokens)
    s = analyse(collect_points(tmp_path, p, run_dir), p, {}, 300)
    k = s["kinds"]["attnres"]
    assert k["fit"]["alpha"] == pytest.approx(0.08, rel=1e-3)
    for size in p.sizes:
        assert k["multiplier_fit"][size.label] == pytest.approx(2.0, rel=1e-6)
        assert k["multiplier"][size.label] == pytest.approx(2.0, rel=2e-3)
        ci = k["ci"]["multiplier"][size.label]
        assert ci["lo"] <= 2.0 * 1.002 and ci["hi"] >= 2.0 / 1.002
        assert s["kinds"]["prenorm"]["multiplier"][size.label] == pytest.approx(1.0, rel=2e-3)
        assert k["stats"][size.label]["delta_vs_baseline"] < 0
    assert s["setup"]["bootstrap"]["distinct"] == 10
    json.dumps(s, allow_nan=False)


# ----------------------------------------------------------------------------- end to end


def test_run_jobs_trains_in_a_child_process_and_skips_finished_runs(tmp_path):
    from resstream.compare.jobs import run_jobs

    run = tmp_path / "r"
    job = [("one", run, cfg("train.steps=2").to_dict())]
    logs = []
    run_jobs(job, False, logs.append)
    assert folder.read_status(run)["status"] == "finished" and "training" in logs[0]
    run_jobs(job, False, logs.append)
    assert "finished already, skipping" in logs[1]
    # a run folder trained with another config is never taken for the planned run
    with pytest.raises(ConfigError, match="was trained with another config"):
        run_jobs([("one", run, cfg("train.steps=3").to_dict())], False, logs.append)
    assert folder.read_status(run)["status"] == "finished"


def test_force_moves_a_different_experiments_runs_aside(tmp_path):
    from resstream.compare.jobs import claim_output

    out = tmp_path / "x"
    claim_output(out, {"a": 1}, force=False)
    (out / "runs" / "r").mkdir(parents=True)
    (out / "runs" / "r" / "keep.txt").write_text("trained")
    claim_output(out, {"a": 1}, force=False)  # the same experiment: runs kept in place
    assert (out / "runs" / "r" / "keep.txt").exists()
    with pytest.raises(ConfigError, match="holds a different comparison"):
        claim_output(out, {"a": 2}, force=False)
    claim_output(out, {"a": 2}, force=True)
    aside = [p for p in out.iterdir() if p.name.startswith("runs.replaced-")]
    assert len(aside) == 1 and (aside[0] / "r" / "keep.txt").read_text() == "trained"
    assert not (out / "runs").exists() and json.loads((out / "comparison.json").read_text()) == {"a": 2}


def test_scale_end_to_end_and_resume(tmp_path, inline_jobs):
    out = tmp_path / "sc"
    opts = ScaleOptions(sizes="1x16,2x32", tokens_per_param=0.02, out=out, progress=False)
    summary = scale(cfg(), opts, log=lambda *a: None)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["1x16", "2x32"]
    for label in ("prenorm", "attnres"):
        k = summary["kinds"][label]
        assert k["fit"] is not None and all(r["status"] == "ok" for rs in k["runs"].values() for r in rs)
    assert summary["kinds"]["attnres"]["multiplier"]["2x32"] is not None
    md = (out / "report.md").read_text()
    assert "## Fits" in md and "Compute multiplier vs prenorm" in md and "![scaling](scaling.png)" in md
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert 'src="data:image/png;base64,' in (out / "report.html").read_text()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["setup"]["sizes"][0]["compute"] == summary["setup"]["sizes"][0]["compute"]
    # the same command again trains nothing and gives the same numbers
    logs = []
    again = scale(cfg(), opts, log=logs.append)
    assert sum("already, skipping" in line for line in logs) == 8
    assert again["kinds"]["attnres"]["fit"] == summary["kinds"]["attnres"]["fit"]
    with pytest.raises(ConfigError, match="holds a different comparison"):
        scale(cfg(), ScaleOptions(sizes="1x16,3x32", tokens_per_param=0.02, out=out), log=lambda *a: None)


def test_cli_scale_and_sweep_bad_input_is_one_line(tmp_path, capsys):
    cases = [
        (["scale", "--preset", "tiny", "--sizes", "4y64"], "--sizes: '4y64' is not N_LAYERSxD_MODEL"),
        (["scale", "--preset", "tiny", "--sizes", "2x64"], "at least two sizes"),
        (["sweep", "--preset", "tiny", "train.lr=1e-3"], "at least two values"),
        (["sweep", "--preset", "tiny", "train.seed=1,2"], "cannot be swept"),
        (["sweep", "--preset", "tiny", "train.nope=1,2"], "unknown config key 'train.nope'"),
        (["sweep", "--preset", "tiny", "model.residual.nope=1,2"], "not an option of any compared kind"),
    ]
    for argv, msg in cases:
        assert cli_main(argv + ["--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
        assert not (tmp_path / "o").exists()
