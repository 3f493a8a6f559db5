"""`resstream sweep` (axes, which kinds a key applies to, the report) and `compare --seeds auto`
(stops when the paired tests decide, or at the cap), with training runs executed in-process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from resstream.compare.decide import run_until_decided
from resstream.compare.sweep import SweepOptions, cells_for, parse_axes, plan_sweep, split_values, sweep
from resstream.config import ConfigError, apply_overrides
from resstream.runs import folder
from resstream.runs.config import RunConfig

BASE = {
    "name": "t",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32},
    "data": {"corpus": "kjv", "vocab_size": 320, "max_bytes": 120_000},
    "train": {"steps": 4, "batch_size": 4, "seq_len": 16, "eval_every": 2, "eval_batches": 1, "save_every": 50,
              "log_every": 1},
    "compare": {"residuals": ["prenorm", "block_attnres:block_size=2"], "seeds": 2},
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RESSTREAM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_values_split_at_top_level_commas_only():
    assert split_values('1,2, [3,4],"a,b"') == ["1", "2", "[3,4]", '"a,b"']
    assert parse_axes(["train.lr=1e-3,3e-3", "model.residual.block_size=2"]) == [
        ("train.lr", [0.001, 0.003]), ("model.residual.block_size", [2])]
    for bad, msg in ((["train.lr"], "not KEY=V1"), (["train.lr=1,1"], "twice"), (["train.lr=1"], "two values"),
                     (["train.lr=1,2", "train.lr=3,4"], "swept twice"), (["model.residual.kind=a,b"], "cannot be swept")):
        with pytest.raises(ConfigError, match=msg):
            parse_axes(bad)


def test_a_residual_key_applies_to_the_kinds_that_have_it():
    kinds = [("prenorm", {"kind": "prenorm"}), ("block_attnres-block_size=2", {"kind": "block_attnres", "block_size": 2})]
    cells = cells_for(kinds, [("model.residual.block_size", [1, 2, 4])])
    blocks = [c for c in cells if c.residual["kind"] == "block_attnres"]
    assert [c.residual["block_size"] for c in blocks] == [1, 2, 4]
    assert {c.label for c in blocks} == {"block_attnres"}  # the swept option leaves the label
    pre = [c for c in cells if c.residual["kind"] == "prenorm"]  # prenorm has no block_size: one reference cell
    assert len(pre) == 1 and pre[0].point == {} and pre[0].slug == "unswept" and pre[0].residual == {"kind": "prenorm"}
    lr = cells_for(kinds, [("train.lr", [1e-3, 3e-3])])
    assert len(lr) == 4 and lr[0].overrides == ["train.lr=0.001"]


def test_sweep_end_to_end(tmp_path, inline_jobs):
    cfg = RunConfig.from_dict(BASE)
    out = tmp_path / "sw"
    s = sweep(cfg, SweepOptions(axes=["train.lr=1e-3,1e-2", "train.warmup_frac=0.1"], out=out, progress=False),
              log=lambda *a: None)
    assert s["setup"]["axes"] == [["train.lr", [0.001, 0.01]]] or s["setup"]["axes"] == [("train.lr", [0.001, 0.01])]
    assert len(s["cells"]) == 4 and all(len(c["runs"]) == 2 for c in s["cells"])
    run_cfg = folder.read_run_config(out / "runs" / "lr=0.01" / "prenorm-s1")["run"]
    assert run_cfg["train"]["lr"] == 0.01 and run_cfg["train"]["warmup_frac"] == 0.1 and run_cfg["train"]["seed"] == 1
    for c in s["cells"]:
        if c["label"] != "prenorm":
            assert c["stats"]["n_pairs"] == 2  # compared with prenorm at the same lr
    best = s["best"]["prenorm"]
    means = {c["point"]["train.lr"]: c["stats"]["bpb_mean"] for c in s["cells"] if c["label"] == "prenorm"}
    assert best["point"]["train.lr"] == min(means, key=means.get)
    md = (out / "report.md").read_text()
    assert "Each kind at its own best point" in md and "![sweep](sweep.png)" in md
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    json.loads((out / "summary.json").read_text())


def _fake(out: Path, label: str, seed: int, bpb: float) -> None:
    d = out / "runs" / f"{label}-s{seed}"
    if not d.exists():
        d.mkdir(parents=True)
        folder.write_status(d, "finished", 1)
        folder.append_metrics(d, {"step": 1, "tokens": 1, "val_bpb": bpb})


@pytest.mark.parametrize("gap,stops_at,how", [(-0.1, 2, "decided"), (0.0, 5, "cap")])
def test_seeds_auto_stops_when_decided_or_at_the_cap(tmp_path, gap, stops_at, how):
    kinds = [("a", {"kind": "prenorm"}), ("b", {"kind": "prenorm"})]
    trained = []

    def train_seeds(seeds):
        for sd in seeds:
            _fake(tmp_path, "a", sd, 2.0 + 0.05 * sd)
            _fake(tmp_path, "b", sd, 2.0 + 0.05 * sd + gap + 0.001 * (-1) ** sd)
        trained.append(list(seeds))

    seeds, rec = run_until_decided(tmp_path, kinds, [0, 1], 5, "a", train_seeds, log=lambda *a: None)
    assert len(seeds) == stops_at and rec["stopped"] == how and trained[-1] == seeds
    assert rec["threshold"] < 0.05 and len(rec["looks"]) == stops_at - 1
    assert rec["undecided"] == ([] if how == "decided" else ["b"])


def test_compare_seeds_auto_records_the_procedure(tmp_path, inline_jobs):
    from resstream.compare import CompareOptions, compare

    cfg = RunConfig.from_dict(apply_overrides(BASE, ['compare.residuals=["prenorm","attnres"]', "train.steps=2"]))
    s = compare(cfg, CompareOptions(seeds=2, auto_seeds=True, max_seeds=3, out=tmp_path / "c", progress=False),
                log=lambda *a: None)
    auto = s["setup"]["seeds_auto"]
    assert auto["cap"] == 3 and len(s["setup"]["seeds"]) in (2, 3)
    assert len(s["setup"]["seeds"]) == 3 or auto["stopped"] == "decided"
    md = (tmp_path / "c" / "report.md").read_text()
    assert "--seeds auto" in md and "seeds for 80% power" in md
