"""The scaling report: report.md with its PNGs and a self-contained report.html, built from
the summary dict alone (what summary.json holds), as blocks (diagnostics/document.py)."""
from __future__ import annotations

from pathlib import Path

from resstream.compare.decide import seeds_cell
from resstream.compare.fit import MIN_POINTS_FLOOR
from resstream.compare.report import _bpb, _fmt, fmt_p
from resstream.diagnostics.document import Block, write_document


def _ci(x, ci: dict | None, spec: str) -> str:
    if x is None:
        return "–"
    if not ci or ci.get("lo") is None:
        return format(x, spec)
    return f"{format(x, spec)} [{format(ci['lo'], spec)}, {format(ci['hi'], spec)}]"


def _mult(x, ci: dict | None) -> str:
    text = _ci(x, ci, ".3g")
    if text == "–":
        return text
    text = text.replace(" [", "x [", 1) if "[" in text else text + "x"
    if ci and ci.get("n_undefined"):
        text += f" ({ci['n_undefined']} resamples undefined)"
    return text


def _pct(fr: float) -> str:
    return f"{fr:.0%}"


# ----------------------------------------------------------------------------- tables


def sizes_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["size", "layers", "d_model", "heads", "N (non-embedding)", "params (baseline, all)",
              "tokens D", "D / N", "steps", "C = 6ND (FLOP)"]
    rows = [[s["label"], str(s["n_layers"]), str(s["d_model"]), str(s["n_heads"]), f"{s['params']:,}",
             f"{s['params_total']:,}", f"{s['tokens']:,}", f"{s['tokens'] / s['params']:.2g}", str(s["steps"]),
             f"{s['compute']:.3g}"] for s in summary["setup"]["sizes"]]
    return header, rows


def fits_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["kind", "A [95% CI]", "alpha [95% CI]", "rms log-residual", "with floor: E", "A", "alpha"]
    rows = []
    for label, k in summary["kinds"].items():
        f, ci = k.get("fit"), k["ci"]
        row = [label, "no fit", "–", "–"] if not f else [
            label, _ci(f["A"], ci["fit"]["A"], ".4g"), _ci(f["alpha"], ci["fit"]["alpha"], ".4f"), f"{f['rmse_log']:.4f}"]
        ff = k.get("fit_floor")
        if ff:
            e = "0 (at its bound: no floor located)" if ff.get("E_at_bound") else _ci(ff["E"], ci["fit_floor"]["E"], ".4g")
            row += [e, _ci(ff["A"], ci["fit_floor"]["A"], ".4g"),
                    _ci(ff["alpha"], ci["fit_floor"]["alpha"], ".4f")]
        else:
            row += [f"needs >= {MIN_POINTS_FLOOR} sizes" if len(summary["setup"]["sizes"]) < MIN_POINTS_FLOOR else "did not converge", "–", "–"]
        rows.append(row)
    return header, rows


def multiplier_table(summary: dict, key: str = "multiplier") -> tuple[list[str], list[list[str]]]:
    sizes = summary["setup"]["sizes"]
    header = ["kind"] + [f"{s['label']} (C {s['compute']:.2g})" for s in sizes]
    skip = summary["setup"]["baseline"] if key == "multiplier_fit" else None  # 1 by definition
    rows = [[label] + [_mult(k[key].get(s["label"]), k["ci"][key].get(s["label"])) for s in sizes]
            for label, k in summary["kinds"].items() if label != skip]
    return header, rows


def results_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    base = summary["setup"]["baseline"]
    header = ["size", "kind", "runs ok", "val bpb (mean ± std)", "Δ vs baseline", "p paired", "seeds for 80% power",
              "params added"]
    rows = []
    for s in summary["setup"]["sizes"]:
        for label, k in summary["kinds"].items():
            st = k["stats"][s["label"]]
            is_base = label == base
            need = "–" if is_base else seeds_cell(st)
            rows.append([s["label"], label, f"{st['n_ok']}/{st['n_runs']}", _bpb(st),
                         "baseline" if is_base else _fmt(st["delta_vs_baseline"], "+.4f"),
                         "–" if is_base else fmt_p(st["p_paired"]), need,
                         _fmt(k["params_added"].get(s["label"]), "+,")])
    return header, rows


def format_scale(summary: dict) -> str:
    """Plain-text tables for the terminal: fits, then the compute multiplier."""
    out = []
    for title, (header, rows) in (("fits: L = A C^-alpha", fits_table(summary)),
                                  ("compute multiplier vs " + summary["setup"]["baseline"], multiplier_table(summary))):
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        out += [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows] + [""]
    return "\n".join(out).rstrip()


# ----------------------------------------------------------------------------- document


def _setup_items(summary: dict) -> list[str]:
    st = summary["setup"]
    m = ", ".join(f"{k} {v}" for k, v in st["model"].items() if k not in ("n_layers", "d_model", "n_heads", "residual"))
    tr = ", ".join(f"{k} {v}" for k, v in st["train"].items()
                   if k in ("batch_size", "seq_len", "lr", "warmup_frac", "schedule", "weight_decay", "min_lr_ratio"))
    items = [f"Sizes: n_layers x d_model with the base config's head width; other model settings: {m or 'defaults'}",
             f"Corpus: {st['corpus']}", f"Tokens: {st['tokens_rule']}",
             f"Training (the same at every size; the learning rate is not re-tuned per size): {tr}; "
             f"{st['evals']} evaluations per run",
             f"Loss: {st['loss']}", f"Compute: {st['compute']}",
             f"Seeds: {', '.join(map(str, st['seeds']))} (a seed fixes data order and sublayer init for every kind)",
             f"Machine: {st['machine']}; torch {st['torch']}, resstream {st['resstream']}"]
    for label, k in summary["kinds"].items():
        opts = ", ".join(f"{a}={b}" for a, b in k["residual"].items() if a != "kind")
        items.append(f"Kind {label}: residual {k['kind']}" + (f" ({opts})" if opts else ""))
    return items


def _headline(summary: dict) -> list[str]:
    st = summary["setup"]
    base, last = st["baseline"], st["sizes"][-1]["label"]
    out = []
    for label, k in summary["kinds"].items():
        if label == base:
            continue
        m, ci = k["multiplier"].get(last), k["ci"]["multiplier"].get(last)
        if m is not None:
            out.append(f"{label}: at the largest size ({last}) its loss would take the baseline's fit {_mult(m, ci)} "
                       f"the compute (95% bootstrap interval over seeds).")
    return out


def _how_to_read(summary: dict) -> list[Block]:
    st = summary["setup"]
    n_seeds, boot = len(st["seeds"]), st["bootstrap"]
    return [Block("h2", "How to read this"), Block("p",
        "Each kind's fit L = A C^-alpha is a least-squares line through every finished run in log-log space; "
        "the floor fit L = E + A C^-alpha adds a loss no compute removes and needs at least four sizes. The "
        "compute multiplier at a size is C_b / C, where the baseline's power-law fit reaches the kind's mean "
        "loss at C_b: above 1 the kind is worth that many times the baseline's compute (the paper's '1.25x'). "
        "The second multiplier table uses the kind's own fit instead of its measured mean. The baseline's own "
        "row shows how far its measured means sit from its fit, in compute: the scatter any multiplier carries."),
        Block("p", f"Intervals: a bootstrap over seeds ({boot['resamples']} resamples; each draws {n_seeds} seeds with "
                   f"replacement, the same draw for every kind, and refits). With {n_seeds} seeds only "
                   f"{boot['distinct']} different draws exist, so the intervals are coarse; they describe seed noise "
                   "at these sizes, not the uncertainty of extrapolating the fit. 'seeds for 80% power' is how many "
                   "seeds the paired test would need if the observed per-seed differences were the truth."),
        Block("p", "Small models trained on few tokens per parameter are far from the regime of the paper's fits "
                   "(hundreds of millions of parameters, hundreds of tokens per parameter); exponents and multipliers "
                   "here describe this regime and this corpus only.")]


def build_blocks(summary: dict, out_dir: Path) -> list[Block]:
    from resstream.compare.scale_figures import figures

    blocks = [Block("h1", "resstream scaling report"), Block("h2", "Setup"), Block("ul", items=_setup_items(summary))]
    h, r = sizes_table(summary)
    blocks += [Block("h2", "Sizes"), Block("table", header=h, items=r)]
    h, r = fits_table(summary)
    blocks += [Block("h2", "Fits"), Block("p", "Loss in bits per byte, C in FLOP."), Block("table", header=h, items=r)]
    blocks += [Block("h2", f"Compute multiplier vs {summary['setup']['baseline']}")]
    blocks += [Block("ul", items=_headline(summary))] if _headline(summary) else []
    h, r = multiplier_table(summary)
    blocks += [Block("p", "From each kind's measured mean loss at each size:"), Block("table", header=h, items=r)]
    h, r = multiplier_table(summary, "multiplier_fit")
    blocks += [Block("p", "From each kind's fitted loss at each size:"), Block("table", header=h, items=r)]
    h, r = results_table(summary)
    blocks += [Block("h2", "Results per size"), Block("table", header=h, items=r)]
    blocks += [Block("h2", "Plots")] + figures(summary, out_dir)
    return blocks + _how_to_read(summary)


def write_scale_report(summary: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_document(build_blocks(summary, out_dir), out_dir)

