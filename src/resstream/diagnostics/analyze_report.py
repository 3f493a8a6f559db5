"""The depth analysis written out: depth.json, four figures, report.md and report.html.

``depth_findings`` turns the measurements into the numbers behind Csordás et al.'s claims
(first half vs second half of the layers), so the report states what this model shows
rather than what the paper found.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from resstream.diagnostics import analyze_plots
from resstream.diagnostics.document import Block, write_document

VANISH = 0.05  # "a skip no longer matters later" when it changes later outputs by less than this on average


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _median(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.median(vals)) if vals else None


def depth_findings(a: dict, threshold: float = VANISH) -> dict:
    """First half (layers 0..h-1, h = n_layers // 2) against the second half (h..n-1): means
    and medians over each half (a few large early layers can carry a mean alone)."""
    n, L = a["n_layers"], a["n_sublayers"]
    h = n // 2
    halves = {"first": range(0, 2 * h), "second": range(2 * h, L)}
    later = [_mean(row[s + 1:]) for s, row in enumerate(a["skip"]["effect_mean"])]  # None for the last sublayer
    later_max = [_mean(row[s + 1:]) for s, row in enumerate(a["skip"]["effect_max"])]
    vanish = next((k for k in range(n) if all(e is None or e < threshold for e in later[2 * k:])), None)
    out = {"half": h, "threshold": threshold, "skip_later_effect": later, "vanish_layer": vanish,
           "bpb": a["bpb"], "lens_bpb_embedding": a["lens"]["bpb"][0], "lens_bpb_middle": a["lens"]["bpb"][h],
           "lens_top1_middle": a["lens"]["top1"][h]}
    for name, subs in halves.items():
        layers = range(subs.start // 2, subs.stop // 2)
        out[f"rel_{name}"] = _mean(a["layer"]["rel_contribution"][k] for k in layers)
        out[f"rel_median_{name}"] = _median(a["layer"]["rel_contribution"][k] for k in layers)
        out[f"skip_later_{name}"] = _mean(later[s] for s in subs)
        out[f"skip_later_median_{name}"] = _median(later[s] for s in subs)
        out[f"skip_later_max_{name}"] = _mean(later_max[s] for s in subs)
        out[f"skip_kl_{name}"] = _mean(a["skip"]["kl"][s] for s in subs)
        out[f"skip_top1_{name}"] = _mean(a["skip"]["top1"][s] for s in subs)
    return out


def _verdict(mean_ratio: float, median_ratio: float) -> str:
    if mean_ratio < 1 and median_ratio < 1:
        return "holds here, by the mean and by the median"
    if mean_ratio < 1:
        return "holds here by the mean only: the median says the second half contributes as much or more"
    if median_ratio < 1:
        return "holds here by the median only"
    return "does not hold here"


def finding_items(f: dict, n: int) -> list[str]:
    h = f["half"]
    first, second = f"layers 0–{h - 1}", f"layers {h}–{n - 1}"
    ratio = f["rel_second"] / f["rel_first"] if f["rel_first"] else float("nan")
    mratio = f["rel_median_second"] / f["rel_median_first"] if f["rel_median_first"] else float("nan")
    items = [
        f"Relative contribution ||h_(k+1) − h_k|| / ||h_k|| per layer (mean over tokens), averaged over {first}: "
        f"{f['rel_first']:.3f} (median {f['rel_median_first']:.3f}); over {second}: {f['rel_second']:.3f} (median "
        f"{f['rel_median_second']:.3f}); second/first {ratio:.2f} (medians {mratio:.2f}). The paper's first finding "
        f"(the second half contributes less) {_verdict(ratio, mratio)}.",
        f"Skipping one sublayer changes the outputs of the later sublayers by {f['skip_later_first']:.1%} on average "
        f"(median over skipped sublayers {f['skip_later_median_first']:.1%}) when it lies in {first}, by "
        f"{f['skip_later_second']:.1%} (median {f['skip_later_median_second']:.1%}) when it lies in {second}. With "
        f"the paper's statistic, the largest change over tokens: {f['skip_later_max_first']:.3g} against "
        f"{f['skip_later_max_second']:.3g} (relative changes; rare tokens carry it).",
    ]
    if f["vanish_layer"] is None:
        items.append(f"No layer after which every skip changes later sublayers by less than {f['threshold']:.0%} on average.")
    else:
        items.append(f"From layer {f['vanish_layer']} on, skipping any sublayer changes later sublayers by less than "
                     f"{f['threshold']:.0%} on average (the paper: skipping second-half layers barely affects later computation).")
    items += [
        f"Effect of a skip on the next-token distribution: mean KL {f['skip_kl_first']:.3g} nats per token and top-1 "
        f"agreement {f['skip_top1_first']:.1%} for {first}; {f['skip_kl_second']:.3g} nats and {f['skip_top1_second']:.1%} "
        f"for {second}.",
        f"Logit lens: {f['lens_bpb_embedding']:.3f} bits per byte from the embedding alone, {f['lens_bpb_middle']:.3f} "
        f"after {first}, {f['bpb']:.3f} from the model; at the midpoint {f['lens_top1_middle']:.1%} of the "
        "predictions already agree with the final top-1.",
    ]
    return items


def _table(a: dict) -> tuple[list[str], list[list[str]]]:
    header = ["layer", "attn ||y||/||x||", "attn cos", "MLP ||y||/||x||", "MLP cos", "layer ||Δh||/||h||",
              "skip attn: KL", "skip MLP: KL", "lens bpb after"]
    rows = []
    s, k = a["sublayer"], a["skip"]
    for i in range(a["n_layers"]):
        at, ml = 2 * i, 2 * i + 1
        rows.append([str(i), f"{s['rel_contribution'][at]:.4g}", f"{s['cos'][at]:+.3f}", f"{s['rel_contribution'][ml]:.4g}",
                     f"{s['cos'][ml]:+.3f}", f"{a['layer']['rel_contribution'][i]:.4g}", f"{k['kl'][at]:.3g}",
                     f"{k['kl'][ml]:.3g}", f"{a['lens']['bpb'][i + 1]:.4f}"])
    return header, rows


def _setup(meta: dict, a: dict) -> list[str]:
    m = meta["model"]
    shape = (f"{m['n_layers']} layers ({2 * m['n_layers']} sublayers), d_model {m['d_model']}, {m['n_heads']} heads"
             f" ({m.get('n_kv_heads') or m['n_heads']} KV), residual {m['residual']['kind']}, vocabulary {m['vocab_size']}")
    return [f"Model: {meta['name']} ({meta['source']}: {meta['path']})", "Shape: " + shape,
            f"Parameters: {meta['params']:,}",
            f"Text: {meta['corpus']}, validation split, {a['n_batches']} batches of {meta['batch_size']} x "
            f"{meta['seq_len']} tokens ({a['n_tokens']:,} tokens, {a['n_bytes']:,.0f} bytes)",
            f"Bits per byte of the model on them: {a['bpb']:.4f}"
            + ("" if meta.get("bytes_exact", True) else " (approximate: the tokenizer is not byte-level)")]


_HOW = ("Definitions (Csordás, Manning & Potts 2025, 'Do Language Models Use Their Depth Efficiently?', "
        "written through the residual-stream contract): x_l is what sublayer l reads from the stream, y_l its raw "
        "output; under PreNorm x_l is the running sum, so ||y||/||x|| and cos(y, x) are the paper's relative "
        "contribution and cosine. Skipping sets y_s to zero and recomputes everything after it (under PreNorm the "
        "layer then passes its input through, as in the paper); the paper's heatmap uses the maximum change over "
        "tokens, kept in depth.json as skip.effect_max, while the figure shows the mean. The logit lens applies the "
        "final norm and head to the stream after each sublayer. One model, one text sample: no error bars.")


def write_analysis(a: dict, meta: dict, out_dir: Path | str) -> dict:
    """Write depth.json (measurements, findings, setup), the figures and the reports into
    ``out_dir``; returns {"findings", "files"}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    f = depth_findings(a)
    (out_dir / "depth.json").write_text(json.dumps({"setup": meta, "findings": f, "analysis": a}, indent=1,
                                                   allow_nan=False) + "\n")
    name = meta["name"]
    figs = [
        (analyze_plots.plot_contributions(a, out_dir / "contributions.png", f"How much each layer adds: {name}"),
         "Relative contribution and cosine of each sublayer's output with what it reads, by layer."),
        (analyze_plots.plot_skip_heatmap(a, out_dir / "skip_effects.png", f"Effect of skipping a sublayer on later ones: {name}"),
         "Mean relative change of every later sublayer's output when one sublayer's output is set to zero."),
        (analyze_plots.plot_skip_output(a, out_dir / "skip_output.png", f"Effect of skipping a sublayer on the output: {name}"),
         "KL divergence and top-1 agreement of the next-token distribution with one sublayer skipped."),
        (analyze_plots.plot_logit_lens(a, out_dir / "logit_lens.png", f"Logit lens: {name}"),
         "Bits per byte, KL to the final distribution and top-1 agreement when the head reads the stream early."),
    ]
    header, rows = _table(a)
    blocks = [Block("h1", f"resstream depth analysis: {name}"), Block("h2", "Setup"), Block("ul", items=_setup(meta, a)),
              Block("h2", "Findings"), Block("ul", items=finding_items(f, a["n_layers"])),
              Block("h2", "Per layer"), Block("table", header=header, items=rows), Block("h2", "Plots")]
    blocks += [Block("fig", caption, path=p) for p, caption in figs]
    blocks += [Block("h2", "How to read this"), Block("p", _HOW)]
    md, html = write_document(blocks, out_dir)
    return {"findings": f, "files": [str(out_dir / "depth.json"), *(str(p) for p, _ in figs), str(md), str(html)]}
