"""The comparison report: report.md with its PNGs, and a self-contained report.html.

Reads only the summary dict (what summary.json holds), never a live model. The content is
built once as a list of blocks (diagnostics/document.py) and rendered as Markdown and HTML.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from resstream.compare.decide import decision_blocks, seeds_cell
from resstream.compare.stats import baseline_label, summarize
from resstream.diagnostics import plots
from resstream.diagnostics.document import Block, write_document
from resstream.residual import describe
from resstream.residual.config import distinct_options

# ----------------------------------------------------------------------------- number formats


def _fmt(x, spec: str, none: str = "–") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, spec)


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _bpb(s: dict) -> str:
    if s["bpb_mean"] is None:
        return "–"
    if s["bpb_std"] is None:
        return f"{s['bpb_mean']:.4f}"
    return f"{s['bpb_mean']:.4f} ± {s['bpb_std']:.4f}"


def _runs_cell(s: dict) -> str:
    n_failed = s["n_runs"] - s["n_ok"]
    return f"{s['n_ok']}/{s['n_runs']}" + (f" ({n_failed} failed)" if n_failed else "")


def failure_text(run: dict) -> str:
    """'failed at step N' (the step that failed, when the run says), else after its last good step."""
    if run.get("failed_step") is not None:
        text = f"failed at step {run['failed_step']}"
    elif run.get("last_good_step") is not None:
        text = f"failed after step {run['last_good_step']}"
    else:
        text = "failed"
    detail = run.get("error") or (run.get("reason") if run.get("reason") not in (None, "failed", "finished", "ok") else None)
    if detail:
        text += f" ({detail})"
    return text


# ----------------------------------------------------------------------------- tables

TABLE_HEADER = ["kind", "runs ok", "val bpb (mean ± std)", "Δ vs baseline", "p Welch", "p paired",
                "seeds for 80% power", "params", "params added", "tokens/s", "compile s", "peak mem MB", "wall s"]


def table_rows(summary: dict) -> list[list[str]]:
    """One row per kind with every number of the main table, as strings."""
    base = baseline_label(summary)
    rows = []
    for label, k in summary["kinds"].items():
        s = k["stats"]
        delta = "baseline" if label == base else _fmt(s["delta_vs_baseline"], "+.4f")
        rows.append([
            label, _runs_cell(s), _bpb(s), delta,
            "–" if label == base else fmt_p(s["p_welch"]),
            "–" if label == base else fmt_p(s["p_paired"]),
            "–" if label == base else seeds_cell(s),
            _fmt(k.get("params"), ","), _fmt(k.get("params_added"), "+,"),
            _fmt(s["tokens_per_s"], ",.0f"), _fmt(s.get("compile_s"), ",.1f"), _fmt(s["peak_mem_mb"], ",.0f"),
            _fmt(s["wall_s"], ",.1f"),
        ])
    return rows


def _ensure_stats(summary: dict) -> dict:
    if any("stats" not in k for k in summary["kinds"].values()):
        summarize(summary)
    return summary


def format_table(summary: dict) -> str:
    """The main table as aligned plain text for the terminal, with failed runs listed below."""
    _ensure_stats(summary)
    rows = [TABLE_HEADER] + table_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    right = set(range(2, len(TABLE_HEADER)))

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
    notes = _failure_notes(summary) + _p_notes(summary)
    return "\n".join(out + ([""] + notes if notes else []))


def _failure_notes(summary: dict) -> list[str]:
    return [
        f"{label} seed {r.get('seed')}: {failure_text(r)}; excluded from the statistics."
        for label, k in summary["kinds"].items()
        for r in k.get("runs", []) if r.get("status") != "ok"
    ]


def _p_notes(summary: dict) -> list[str]:
    base = baseline_label(summary)
    notes = []
    for label, k in summary["kinds"].items():
        if label == base:
            continue
        s = k["stats"]
        for name, key in (("Welch", "p_welch"), ("paired", "p_paired")):
            if s[key] is None and s.get(key + "_note"):
                notes.append(f"{label}: no {name} p-value: {s[key + '_note']}.")
    return notes


def _seed_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    seeds = sorted({r["seed"] for k in summary["kinds"].values() for r in k.get("runs", [])})
    rows = []
    for label, k in summary["kinds"].items():
        by_seed = {r["seed"]: r for r in k.get("runs", [])}
        cells = []
        for sd in seeds:
            r = by_seed.get(sd)
            if r is None:
                cells.append("–")
            elif r.get("status") == "ok" and r.get("final_val_bpb") is not None:
                cells.append(f"{r['final_val_bpb']:.4f}")
            else:
                cells.append(failure_text(r))
        rows.append([label] + cells)
    return ["kind"] + [f"seed {s}" for s in seeds], rows


# ----------------------------------------------------------------------------- content blocks


def _value(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"


def _residual_options(res: dict) -> dict:
    """The options that describe a kind (as given, or those a saved config sets apart)."""
    return distinct_options(res)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "kind"


def _setup_items(summary: dict) -> list[str]:
    st = summary.get("setup", {})
    m = st.get("model", {})
    items = []
    if m:
        shape = (f"{m.get('n_layers')} layers ({2 * m['n_layers'] if m.get('n_layers') else '?'} sublayers), "
                 f"d_model {m.get('d_model')}, {m.get('n_heads')} heads")
        if m.get("n_kv_heads") not in (None, m.get("n_heads")):
            shape += f" ({m['n_kv_heads']} KV heads)"
        shape += f", vocabulary {m.get('vocab_size')}, max sequence {m.get('max_seq_len')}"
        if m.get("mlp_hidden"):
            shape += f", MLP hidden {m['mlp_hidden']}"
        items.append("Model: " + shape)
    if st.get("init_from"):
        items.append(f"Initialised from: {st['init_from']} (every run starts from its weights and tokenizer; residual "
                     "parameters a kind adds start at that kind's init)")
    if "corpus" in st:
        items.append(f"Corpus: {st['corpus']}")
    if "tokens_per_run" in st:
        steps = f" in {st['steps']:,} steps" if st.get("steps") else ""
        items.append(f"Training tokens per run: {st['tokens_per_run']:,}{steps}")
    if isinstance(st.get("train"), dict):
        skip = {"steps", "seed", "log_every", "save_every", "keep_last", "device"}
        items.append("Training: " + ", ".join(f"{k} {_value(v)}" for k, v in st["train"].items() if k not in skip))
    for split, d in (st.get("data") or {}).items():
        if isinstance(d, dict):
            items.append(f"Data ({split}): " + ", ".join(f"{k} {_value(v)}" for k, v in d.items()))
    if st.get("seeds") is not None:
        items.append(f"Seeds: {', '.join(str(s) for s in st['seeds'])} (a seed fixes data order and sublayer init for every kind)")
    if st.get("machine"):
        items.append(f"Machine: {st['machine']}")
    versions = [f"{name} {st[name]}" for name in ("resstream", "torch") if st.get(name)]
    if versions:
        items.append("Versions: " + ", ".join(versions))
    for label, k in summary["kinds"].items():
        opts = ", ".join(f"{a}={b}" for a, b in _residual_options(k.get("residual") or {}).items())
        items.append(f"Kind {label}: residual {k.get('kind')}" + (f" ({opts})" if opts else "")
                     + f", {_fmt(k.get('params'), ',')} parameters ({_fmt(k.get('params_added'), '+,')} vs PreNorm)")
    return items


def _figures(summary: dict, out_dir: Path) -> list[Block]:
    kinds = summary["kinds"]
    figs = []
    curves = {l: [r["curve"] for r in k.get("runs", []) if r.get("status") == "ok" and r.get("curve")] for l, k in kinds.items()}
    failed = {l: [r["curve"] for r in k.get("runs", []) if r.get("status") != "ok" and r.get("curve")] for l, k in kinds.items()}
    if any(curves.values()) or any(failed.values()):
        p = plots.plot_val_curves(curves, out_dir / "val_curves.png", failed=failed)
        figs.append(Block("fig", "Validation bits per byte against training tokens: mean over seeds, band from the "
                          "best to the worst seed; failed runs dotted.", path=p))
    depth = {l: k["depth"] for l, k in kinds.items() if k.get("depth")}
    if depth:
        p = plots.plot_depth_rms({l: d["output_rms"] for l, d in depth.items()}, out_dir / "depth_rms.png",
                                 input_rms={l: d["input_rms"] for l, d in depth.items() if d.get("input_rms")})
        figs.append(Block("fig", "RMS of each sublayer's raw output (top) and of the input it reads from the residual "
                          "stream (bottom), attention left, MLP right, on validation tokens; PreNorm dilution shows as "
                          "growth with depth.", path=p))
        p = plots.plot_grad_norms({l: d["grad_norm"] for l, d in depth.items()}, out_dir / "grad_norm.png",
                                  grad_norm_output={l: d["grad_norm_output"] for l, d in depth.items() if d.get("grad_norm_output")})
        figs.append(Block("fig", "Gradient norm per sublayer: of its parameters (top) and at its output (bottom), "
                          "attention left, MLP right; flatter means depth is trained more evenly.", path=p))
        for l, d in depth.items():
            if d.get("mixing") is not None and d.get("source_names") is not None:
                p = plots.plot_mixing_heatmap(d["mixing"], d["source_names"], out_dir / f"mixing_{_slug(l)}.png",
                                              title=f"Depth-mixing weights: {l}", sums_to_one=d.get("mixing_sums_to_one"),
                                              legend=describe(kinds[l].get("kind")).get("source_legend"))
                figs.append(Block("fig", f"{l}: mean weight each sublayer input (rows) gives each earlier source "
                                  "(columns) on validation tokens.", path=p))
    return figs


def _how_to_read(summary: dict) -> list[Block]:
    n = [k["stats"]["n_ok"] for k in summary["kinds"].values()]
    n_txt = f"{min(n)}" if min(n) == max(n) else f"{min(n)} to {max(n)}"
    others = len(summary["kinds"]) - 1
    return [
        Block("h2", "How to read this"),
        Block("p", f"Each kind has {n_txt} finished seed{'' if n_txt == '1' else 's'}. The ± is the sample standard deviation "
                   "over seeds, i.e. the run-to-run noise of this setup (initialisation and data order), not an "
                   "error bar on a population. Δ is the kind's mean minus the baseline's mean; negative is better."),
        Block("p", "The paired p-value compares per-seed differences (same seed, same data order) and is the one "
                   "to read; Welch's ignores the pairing and is usually less sensitive here. A p-value says how surprising the "
                   f"observed difference would be if the two kinds were equally good on this setup. With {n_txt} "
                   "seeds a t-test has few degrees of freedom: a small p needs a difference that is large and "
                   "consistent across seeds, a large p does not show the kinds are equal, only that these runs "
                   "cannot tell them apart, and with n < 2 no test is possible."
                   + (f" With {others} kinds each tested against the baseline, the chance that at least one p "
                      f"falls below 0.05 when no kind truly differs is about {1 - 0.95 ** others:.0%}." if others > 1 else "")),
        Block("p", "Everything here holds for this model shape, corpus and token budget; small, short runs can rank "
                   "kinds differently from large ones. The depth plots come from the final weights on validation "
                   "batches: they show how each trained model uses its depth, not whether it is better."),
    ]


def build_blocks(summary: dict, out_dir: Path) -> list[Block]:
    _ensure_stats(summary)
    base = baseline_label(summary)
    blocks = [Block("h1", "resstream comparison report"), Block("h2", "Setup"), Block("ul", items=_setup_items(summary))]
    blocks += [
        Block("h2", "Results"),
        Block("p", f"Final validation bits per byte (lower is better). Baseline: {base}. Statistics use finished "
                   "runs only."),
        Block("table", header=TABLE_HEADER, items=table_rows(summary)),
    ]
    notes = _failure_notes(summary)
    if notes:
        blocks.append(Block("p", "Failed runs, excluded from every statistic above:"))
        blocks.append(Block("ul", items=notes))
    pn = _p_notes(summary)
    if pn:
        blocks.append(Block("ul", items=pn))
    header, rows = _seed_table(summary)
    blocks += [Block("h2", "Per seed"), Block("table", header=header, items=rows)]
    blocks += decision_blocks(summary)
    figs = _figures(summary, out_dir)
    if figs:
        blocks += [Block("h2", "Plots")] + figs
    return blocks + _how_to_read(summary)


def write_report(summary: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.md (PNGs beside it) and a self-contained report.html into ``out_dir``.

    Fills ``summary["kinds"][label]["stats"]`` via ``summarize`` when missing. Returns the two paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_document(build_blocks(summary, out_dir), out_dir)
