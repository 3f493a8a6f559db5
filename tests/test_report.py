"""Comparison statistics and the report, on a summary built from tiny real training runs."""
from __future__ import annotations

import copy
import json
import math
import re
import time

import numpy as np
import pytest
import torch
from scipy import stats as sst

from resstream import LM, ModelConfig, ResidualConfig
from resstream.compare.report import format_table, write_report
from resstream.compare.stats import baseline_label, mean_std, paired_test, summarize, welch_test
from resstream.diagnostics import measure_depth

# ----------------------------------------------------------------------------- fixture: tiny real runs

VOCAB = 48


def markov_tokens(n: int, seed: int) -> torch.Tensor:
    """Tokens from a fixed sparse Markov chain: learnable structure, so loss really falls."""
    g = torch.Generator().manual_seed(1234)
    nxt = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)  # each token has 3 likely successors
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    choice = torch.randint(0, 3, (n,), generator=g)
    noise = torch.rand(n, generator=g) < 0.1
    rand = torch.randint(0, VOCAB, (n,), generator=g)
    for i in range(1, n):
        out[i] = rand[i] if noise[i] else nxt[out[i - 1], choice[i]]
    return out


def batches_from(tokens: torch.Tensor, n: int, B: int, T: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(tokens) - T - 1, (B,), generator=g)
        x = torch.stack([tokens[s : s + T] for s in starts])
        y = torch.stack([tokens[s + 1 : s + T + 1] for s in starts])
        out.append((x, y))
    return out


def build_summary(kinds: dict[str, dict], seeds=(0, 1, 2), steps=12, eval_every=4, n_layers=2, d_model=32,
                  fail: tuple[str, int, int] | None = None, B=4, T=16) -> dict:
    """Train tiny models for real and assemble a summary in the lead's schema.

    ``fail``: (kind label, seed, step) at which that run is marked failed (training stops there).
    Bits per byte here are bits per token (the synthetic corpus has one byte per token).
    """
    train_tokens, val_tokens = markov_tokens(6000, 1), markov_tokens(2000, 2)
    val = batches_from(val_tokens, 2, B, T, seed=99)
    base_cfg = None
    summary = {"kinds": {}}
    for label, res in kinds.items():
        cfg = ModelConfig(vocab_size=VOCAB, d_model=d_model, n_layers=n_layers, n_heads=4, max_seq_len=T,
                          residual=ResidualConfig(**res))
        base_cfg = base_cfg or cfg
        runs, depths = [], []
        for seed in seeds:
            torch.manual_seed(seed)
            model = LM(cfg)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            data = batches_from(train_tokens, steps, B, T, seed=seed)  # same order for every kind
            curve, status, last_good, t0 = [], "ok", steps, time.perf_counter()
            for step, (x, y) in enumerate(data, start=1):
                if fail and fail[:2] == (label, seed) and step == fail[2]:
                    status, last_good = "failed", step - 1
                    break
                _, loss = model(x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if step % eval_every == 0:
                    with torch.no_grad():
                        v = float(np.mean([model(a, b)[1].item() for a, b in val])) / math.log(2)
                    curve.append([step * B * T, v])
            wall = time.perf_counter() - t0
            runs.append({"seed": seed, "status": status, "last_good_step": last_good,
                         "final_val_bpb": curve[-1][1] if status == "ok" else None,
                         "tokens_per_s": last_good * B * T / wall, "peak_mem_mb": None, "wall_s": wall,
                         "curve": curve, "run_dir": f"runs/{label}/seed{seed}"})
            if status == "ok":
                depths.append(measure_depth(model, val))
        params = model.num_params()
        summary["kinds"][label] = {"kind": res["kind"], "residual": dict(res), "params": params,
                                   "params_added": model.num_params(residual_only=True), "runs": runs,
                                   "depth": depths[0]}
    summary["setup"] = {"model": base_cfg.to_dict(), "corpus": "synthetic Markov chain", "tokens_per_run": steps * B * T,
                        "steps": steps, "seeds": list(seeds), "machine": "test CPU", "torch": torch.__version__,
                        "resstream": "0.1.0", "data": {"train": {"tokens": 6000}, "val": {"tokens": 2000}}}
    return summary


KINDS = {"prenorm": {"kind": "prenorm"}, "attnres": {"kind": "attnres"},
         "block_attnres-S2": {"kind": "block_attnres", "block_size": 2}}




@pytest.fixture(scope="module")
def summary() -> dict:
    return build_summary(KINDS, fail=("block_attnres-S2", 2, 7))


# ----------------------------------------------------------------------------- statistics


def test_mean_std_matches_numpy():
    v = [1.31, 1.27, 1.35, 1.29]
    m, s = mean_std(v)
    assert m == pytest.approx(np.mean(v)) and s == pytest.approx(np.std(v, ddof=1))
    assert mean_std([2.0]) == (2.0, None)
    assert mean_std([]) == (None, None)


def test_welch_matches_scipy_and_hand_computation():
    a, b = [1.20, 1.25, 1.22, 1.27], [1.30, 1.28, 1.36]
    r = welch_test(a, b)
    assert r["p"] == pytest.approx(sst.ttest_ind(a, b, equal_var=False).pvalue)
    # by hand: t = (ma - mb) / sqrt(va/na + vb/nb), Welch-Satterthwaite degrees of freedom
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert r["t"] == pytest.approx(t)
    assert r["p"] == pytest.approx(2 * sst.t.sf(abs(t), df))


def test_paired_matches_scipy_and_uses_shared_seeds_only():
    a = {0: 1.20, 1: 1.25, 2: 1.22, 3: 1.40}
    b = {0: 1.30, 1: 1.28, 2: 1.36, 7: 9.9}
    r = paired_test(a, b)
    assert r["n_pairs"] == 3
    assert r["p"] == pytest.approx(sst.ttest_rel([1.20, 1.25, 1.22], [1.30, 1.28, 1.36]).pvalue)
    d = np.array([1.20 - 1.30, 1.25 - 1.28, 1.22 - 1.36])
    assert r["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(3)))
    assert r["mean_diff"] == pytest.approx(d.mean())


def test_small_n_and_zero_variance_give_none_with_a_reason():
    r = welch_test([1.0], [1.1, 1.2])
    assert r["p"] is None and "2 runs" in r["note"]
    r = welch_test([1.0, 1.0], [1.0, 1.0])
    assert r["p"] is None and "zero spread" in r["note"]
    assert welch_test([1.0, 1.0], [1.1, 1.2])["p"] is not None  # one constant group is fine
    r = paired_test({0: 1.0}, {0: 1.1, 1: 1.2})
    assert r["p"] is None and "2 seeds" in r["note"]
    r = paired_test({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})  # identical differences
    assert r["p"] is None and "same" in r["note"]


def test_summarize_fills_stats_and_excludes_failed_run(summary):
    s = summarize(copy.deepcopy(summary))
    assert baseline_label(s) == "prenorm"
    base_vals = [r["final_val_bpb"] for r in summary["kinds"]["prenorm"]["runs"]]
    blk = s["kinds"]["block_attnres-S2"]
    st = blk["stats"]
    assert st["n_runs"] == 3 and st["n_ok"] == 2
    ok_vals = [r["final_val_bpb"] for r in blk["runs"] if r["status"] == "ok"]
    assert st["bpb_mean"] == pytest.approx(np.mean(ok_vals))
    assert st["bpb_std"] == pytest.approx(np.std(ok_vals, ddof=1))
    assert st["delta_vs_baseline"] == pytest.approx(np.mean(ok_vals) - np.mean(base_vals))
    assert st["p_welch"] == pytest.approx(sst.ttest_ind(ok_vals, base_vals, equal_var=False).pvalue)
    assert st["p_paired"] == pytest.approx(sst.ttest_rel(ok_vals, base_vals[:2]).pvalue)
    assert st["n_pairs"] == 2
    assert st["failed"] == [{"seed": 2, "status": "failed", "last_good_step": 6}]
    assert s["kinds"]["prenorm"]["stats"]["p_welch"] is None
    att = s["kinds"]["attnres"]["stats"]
    assert att["n_ok"] == 3 and att["p_paired"] is not None
    assert att["tokens_per_s"] == pytest.approx(np.mean([r["tokens_per_s"] for r in s["kinds"]["attnres"]["runs"]]))
    json.dumps(s, allow_nan=False)  # summary.json stays strict JSON


def test_baseline_falls_back_to_first_kind(summary):
    s = copy.deepcopy(summary)
    s["kinds"] = {k: v for k, v in s["kinds"].items() if k != "prenorm"}
    summarize(s)
    assert baseline_label(s) == "attnres"
    assert s["kinds"]["attnres"]["stats"]["delta_vs_baseline"] == 0.0


# ----------------------------------------------------------------------------- report


def test_report_files_table_and_failed_run(summary, tmp_path):
    s = copy.deepcopy(summary)
    md_path, html_path = write_report(s, tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    # every figure exists beside report.md and is referenced by it
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["depth_rms.png", "grad_norm.png", "mixing_attnres.png", "mixing_block_attnres-S2.png", "val_curves.png"]
    for name in pngs:
        assert f"![{name[:-4]}]({name})" in md
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the HTML is self-contained: every image inlined, nothing fetched from outside
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == len(pngs) and all(x.startswith("data:image/png;base64,") for x in srcs)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    # one table row per kind, with its numbers
    for label, k in s["kinds"].items():
        st = k["stats"]
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        assert f"{st['bpb_mean']:.4f}" in row
        assert f"<td>{label}</td>" in page
    assert "| prenorm | 3/3 |" in md and "| block_attnres-S2 | 2/3 (1 failed) |" in md
    # the failed run is marked and excluded, visibly
    assert "block_attnres-S2 seed 2: failed after step 6; excluded from the statistics." in md
    assert "failed after step 6" in page
    assert "How to read this" in md and "How to read this" in page


def test_failed_step_wording_when_known(summary, tmp_path):
    s = copy.deepcopy(summary)
    run = s["kinds"]["attnres"]["runs"][1]
    run.update(status="failed", failed_step=9, error="loss is NaN", final_val_bpb=None)
    text = format_table(s)
    assert "attnres seed 1: failed at step 9 (loss is NaN); excluded from the statistics." in text
    assert s["kinds"]["attnres"]["stats"]["n_ok"] == 2


def test_format_table_rows_and_notes(summary):
    s = copy.deepcopy(summary)
    text = format_table(s)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["kind", "runs", "ok"]
    for label, k in s["kinds"].items():
        row = next(line for line in lines if line.startswith(label + " "))
        assert f"{k['stats']['bpb_mean']:.4f} ± {k['stats']['bpb_std']:.4f}" in row
    assert "baseline" in next(line for line in lines if line.startswith("prenorm "))
    assert any("failed after step 6" in line for line in lines)


def test_report_without_depth_or_with_single_seed(tmp_path):
    s = build_summary({"prenorm": {"kind": "prenorm"}, "attnres": {"kind": "attnres"}}, seeds=(0,), steps=4,
                      eval_every=2, n_layers=1)
    for k in s["kinds"].values():
        k["depth"] = None
    md_path, _ = write_report(s, tmp_path)
    md = md_path.read_text()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["val_curves.png"]
    assert "attnres: no Welch p-value: needs >= 2 runs in each group (have 1 and 1)." in md
    assert "attnres: no paired p-value: needs >= 2 seeds shared with the baseline (have 1)." in md


def test_curves_on_different_token_grids_are_interpolated():
    from resstream.diagnostics.plots import _align

    x, ys = _align([[[0, 4.0], [10, 3.0], [20, 2.0]], [[5, 3.5], [25, 1.5]]])
    np.testing.assert_allclose(x, [10, 20])
    np.testing.assert_allclose(ys, [[3.0, 2.0], [3.0, 2.0]])
    x, ys = _align([[[1, 2.0], [2, 1.0]], [[1, 4.0], [2, 3.0]]])
    np.testing.assert_allclose(ys.mean(0), [3.0, 2.0])


def test_baseline_is_the_users_choice(summary):
    from resstream.compare.run import choose_baseline
    from resstream.config import ConfigError

    s = copy.deepcopy(summary)
    s.setdefault("setup", {})["baseline"] = "attnres"
    summarize(s)
    assert baseline_label(s) == "attnres"
    assert s["kinds"]["attnres"]["stats"]["delta_vs_baseline"] == 0.0
    assert s["kinds"]["prenorm"]["stats"]["p_welch"] is not None  # compared like any other kind
    kinds = [("prenorm", {"kind": "prenorm"}), ("block_attnres-block_size=4", {"kind": "block_attnres", "block_size": 4})]
    assert choose_baseline(kinds, None) == "prenorm"
    assert choose_baseline(kinds, "block_attnres:block_size=4") == "block_attnres-block_size=4"
    assert choose_baseline(kinds, "block_attnres-block_size=4") == "block_attnres-block_size=4"
    with pytest.raises(ConfigError, match="--baseline: 'attnres' is not one of the compared kinds"):
        choose_baseline(kinds, "attnres")
