"""Continued training from a pretrained model: the run takes its shape, tokenizer and weights
(``train --init-from``), resumes without it, and ``compare --init-from`` runs end to end."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrained_helpers import TEXT, hf_model, save_hf, tiny_tokenizer
from resstream.cli import main as cli_main
from resstream.config import ConfigError
from resstream.diagnostics.commands import analyze_model
from resstream.pretrained import load
from resstream.runs import load_run_model
from resstream.runs.config import RunConfig
from resstream.runs.init import resolve_init_from
from resstream.train import train

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    tok = tiny_tokenizer()
    folder = save_hf(hf_model("llama", tok, num_hidden_layers=2), tok, d / "tiny-llama")
    corpus = d / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"Verse {i}. " + TEXT[i * 5:] + TEXT[: i * 5])
    return d, folder, corpus


@pytest.fixture(autouse=True)
def _cache(world, monkeypatch):
    monkeypatch.setenv("RESSTREAM_CACHE", str(world[0] / "cache"))


def cfg(world, **over) -> RunConfig:
    _, folder, corpus = world
    d = {"init_from": str(folder), "model": {"residual": {"kind": "block_attnres", "block_size": 2}, "max_seq_len": 32},
         "data": {"corpus": str(corpus)},
         "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 2, "eval_batches": 1, "save_every": 2,
                   "log_every": 1, "lr": 1e-9, "warmup_frac": 0.0, "weight_decay": 0.0}}
    for k, v in over.items():
        section, _, key = k.partition(".")
        d.setdefault(section, {})[key] = v
    return RunConfig.from_dict(d)


def test_resolution_takes_the_models_shape_and_tokenizer(world):
    _, folder, _ = world
    r = resolve_init_from(cfg(world))
    src = load(folder).model.cfg
    assert r.model["d_model"] == src.d_model and r.model["vocab_size"] == src.vocab_size and r.model["max_seq_len"] == 32
    assert r.model["residual"]["kind"] == "block_attnres"
    assert open(r.data.tokenizer, "rb").read() == (folder / "tokenizer.json").read_bytes()
    assert resolve_init_from(r) == r  # idempotent: a saved, resolved config resolves to itself
    with pytest.raises(ConfigError, match="model.d_model: 128 differs"):
        resolve_init_from(cfg(world, **{"model.d_model": 128}))
    other = world[0] / "other.json"
    tiny_tokenizer(280).save(str(other))
    with pytest.raises(ConfigError, match="drop data.tokenizer"):
        resolve_init_from(cfg(world, **{"data.tokenizer": str(other)}))


def test_train_init_from_starts_at_the_pretrained_weights_and_resumes_without_them(world, tmp_path):
    _, folder, _ = world
    run = tmp_path / "run"
    result = train(cfg(world), run, progress=False, log=lambda s: None, stop_after=1)
    assert result.status == "interrupted"
    meta = json.loads((run / "config.json").read_text())
    assert meta["run"]["init_from"] == str(folder) and meta["model"]["residual"]["kind"] == "block_attnres"
    ckpt = load_file(str(next((run / "checkpoints").iterdir()) / "model.safetensors"))
    source = load(folder).model.state_dict()
    for name, t in source.items():  # one step at lr 1e-9 moves nothing visibly
        assert torch.allclose(ckpt[name], t, rtol=0, atol=1e-6), name
    assert ckpt["residual.queries"].abs().max() < 1e-6  # zero-initialised pseudo-queries: the identity start
    moved = folder.parent / "moved-away"
    folder.rename(moved)  # resuming needs only the run folder (and the cached data)
    try:
        assert train(RunConfig.from_dict(meta["run"]), run, resume=True, progress=False, log=lambda s: None).status == "finished"
    finally:
        moved.rename(folder)
    model, _, tok, _ = load_run_model(run)
    assert model.cfg.residual.kind == "block_attnres" and tok.get_vocab_size() == load(folder).tokenizer.get_vocab_size()
    result = analyze_model(run, batches=1, seq_len=16, log=lambda s: None)  # a run folder: its own validation split
    assert result["out_dir"] == str(run / "analysis") and (run / "analysis" / "report.html").is_file()
    assert json.loads((run / "analysis" / "depth.json").read_text())["setup"]["source"] == "run"


def test_compare_init_from_end_to_end(world, tmp_path, capsys):
    _, folder, corpus = world
    out = tmp_path / "cmp"
    args = ["compare", "--init-from", str(folder), "--residuals", "prenorm,block_attnres:block_size=2", "--seeds", "1",
            "--steps", "2", "--out", str(out), "--no-progress", f"data.corpus={json.dumps(str(corpus))}",
            "model.max_seq_len=32", "train.batch_size=2", "train.seq_len=16", "train.eval_every=1", "train.eval_batches=1",
            "train.save_every=2", "compare.depth_batches=1"]
    assert cli_main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["setup"]["init_from"] == str(folder)
    assert [r["status"] for k in summary["kinds"].values() for r in k["runs"]] == ["ok", "ok"]
    assert "Initialised from" in (out / "report.md").read_text()
    code = cli_main(["train", "--init-from", str(folder), "--preset", "demo", "--out", str(tmp_path / "x")])
    assert code == 2 and "differs from" in capsys.readouterr().err and not (tmp_path / "x").exists()
