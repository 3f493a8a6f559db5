"""Training-step time of residual kinds next to a plain nanoGPT-style GPT, in one process.

    .venv/bin/python benchmarks/step_time.py              # as a user runs it: torch's threads, wall clock, default path
    .venv/bin/python benchmarks/step_time.py --sizes      # the trend at d_model 256, 512 and 1024
    .venv/bin/python benchmarks/step_time.py --paths default,eager,compiled   # also the eager mixing / the whole model compiled
    .venv/bin/python benchmarks/step_time.py --residuals prenorm,block_attnres:block_size=8,recompute=true --json out.json

Times forward + backward + AdamW step of each variant (interleaved rounds, warm-up discarded,
median and IQR over the timed rounds; one-time compilation counted apart), then measures each
variant's peak memory in a fresh child process. Variants are residual specs
``kind[:option=value,...]`` (the grammar of ``resstream compare --residuals``) and ``gpt``, the
floor (reference_gpt.py); every option of every kind also has a flag (``--block-size 4``)
applying to every variant whose kind has it. The allocator is tuned as ``resstream train``
tunes it (``--raw-allocator``: glibc's defaults, as a bare ``LM(cfg)`` loop gets). See
harness.py for the protocol and the paths.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402

# The issue-12 targets at the default shape (x PreNorm on the default path), printed as a check.
TARGETS = {"block_attnres": 1.05, "attnres": 1.12, "mhc": 1.30}
SIZES = (256, 512, 1024)


def build_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s = H.Shape()
    for name in ("layers", "d_model", "heads", "seq", "batch", "vocab"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(s, name))
    ap.add_argument("--steps", type=int, default=20, help="timed rounds (each times every variant once)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--residuals", default="gpt,prenorm,attnres,block_attnres,mhc",
                    help=f"comma-separated kind[:opt=value,opt=value] or gpt; kinds: {', '.join(H.available_kinds())}")
    ap.add_argument("--paths", default="default", help=f"comma-separated code paths: {', '.join(H.PATHS)} (harness.py)")
    ap.add_argument("--sizes", action="store_true", help=f"run at d_model {', '.join(map(str, SIZES))} and print the trend")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="measure peak memory (one fresh child process per variant; off with --sizes)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--clock", choices=sorted(H.CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (with --threads 1 on a busy machine)")
    ap.add_argument("--raw-allocator", action="store_true", help="leave glibc's malloc settings at their defaults")
    ap.add_argument("--json", default=None, help="write the results to this file")
    for f in H.residual_fields():  # every kind's options, applied to the variants whose kind has them
        flag = f.name.replace("_", "-")
        flag = "residual-" + flag if flag in ("layers", "d-model", "heads", "seq", "batch", "vocab") else flag
        ap.add_argument("--" + flag, dest="res_" + f.name, type=H.parse_value, default=None,
                        help=f"residual option {f.name} for every variant whose kind has it (default {f.default!r})")
    return ap


def setup(args: argparse.Namespace) -> tuple[H.Shape, list[H.Variant], "H.torch.device"]:
    """Threads, allocator, shape, variants and device of a run (shared by mfu.py and mixing_cost.py)."""
    if args.threads:
        H.torch.set_num_threads(args.threads)
    args.allocator = "glibc defaults" if getattr(args, "raw_allocator", False) else (H.tune_allocator() or "system default")
    shape = H.Shape(args.layers, args.d_model, args.heads, args.seq, args.batch, args.vocab)
    common = {f.name: getattr(args, "res_" + f.name) for f in H.residual_fields() if getattr(args, "res_" + f.name) is not None}
    paths = tuple(p.strip() for p in getattr(args, "paths", "default").split(","))
    bad = [p for p in paths if p not in H.PATHS]
    if bad:
        raise SystemExit(f"unknown path(s) {', '.join(bad)}; choose from {', '.join(H.PATHS)}")
    return shape, H.parse_variants(args.residuals, common, paths), H.pick_device(args.device)


def print_header(shape: H.Shape, info: dict, flavour: str, clock: str, allocator: str) -> None:
    for line in H.describe(info):
        print(line)
    print(f"allocator: {allocator} | depth-mixing compile mode: {H.compiled.get_mode()} (RESSTREAM_COMPILE_MIXING)")
    print(f"shape: {shape.layers} layers, d_model {shape.d_model}, {shape.heads} heads, seq {shape.seq}, batch {shape.batch}, "
          f"vocab {shape.vocab} ({shape.tokens} tokens/step) | AdamW {flavour} | fp32 | {clock} clock")


def baseline_index(variants: list[H.Variant], kind: str) -> dict[str, int]:
    """Per path, the entry ratios are taken against: ``kind`` on that path, else on the default path."""
    own = {v.path: i for i, v in reversed(list(enumerate(variants))) if v.kind == kind and not v.label_options}
    return {v.path: own.get(v.path, own.get("default")) for v in variants if own}


def time_shape(args, shape: H.Shape, variants: list[H.Variant], device, log=print) -> list[dict]:
    batch = H.make_batch(shape, device)
    runners = [H.build_runner(shape, v, device, batch) for v in variants]
    entries = [(r.variant.label, r.variant.path, r.step_fn) for r in runners]
    timings = H.interleaved_timing(entries, args.steps, args.warmup, device, baseline_index(variants, "prenorm"),
                                   log=log, clock=args.clock)
    to_gpt = baseline_index(variants, H.REFERENCE)
    rows = []
    for v, r, t in zip(variants, runners, timings):
        row = {"kind": v.kind, "label": v.label, "path": v.path_name(device), "options": v.options,
               "median_ms": 1e3 * t.median, "iqr_ms": 1e3 * t.iqr, "times_ms": [1e3 * x for x in t.times],
               "tokens_per_s": shape.tokens / t.median, "params": sum(p.numel() for p in r.model.parameters()),
               "compile_s": r.compile_s[0] + (max(0.0, r.first_steps_s[0] - r.first_steps_s[1]) if v.compiled else 0.0)}
        if t.ratios:
            q1, med, q3 = H.Timing.quartiles(t.ratios)
            row.update(ratio=med, ratio_iqr=q3 - q1)
        g = to_gpt.get(v.path)
        if g is not None:
            row["x_gpt"] = H.Timing.quartiles([a / b for a, b in zip(t.times, timings[g].times)])[1]
        rows.append(row)
    return rows


def fmt_table(rows: list[dict]) -> str:
    base_mem = {r["path"] == "compiled": r.get("memory", {}).get("alloc_mib") for r in rows if r["label"] == "prenorm"}
    head = ["variant", "path", "ms/step", "IQR ms", "x PreNorm (IQR)", "x gpt", "tokens/s", "compile s", "peak alloc MiB", "x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        alloc, b = r.get("memory", {}).get("alloc_mib"), base_mem.get(r["path"] == "compiled")
        lines.append("| " + " | ".join([
            r["label"], r["path"], f"{r['median_ms']:.0f}", f"{r['iqr_ms']:.0f}",
            f"{r['ratio']:.3f} ({r['ratio_iqr']:.3f})" if "ratio" in r else "-", f"{r['x_gpt']:.3f}" if "x_gpt" in r else "-",
            f"{r['tokens_per_s']:.0f}", f"{r['compile_s']:.1f}" if r["compile_s"] else "-",
            f"{alloc:.0f}" if alloc else r.get("memory", {}).get("error", "-"), f"{alloc / b:.3f}" if alloc and b else "-",
        ]) + " |")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        t = TARGETS.get(r["kind"])
        if t is not None and "ratio" in r and r["path"].startswith("default") and not r["options"]:  # the kind's defaults
            out.append(f"{r['label']}: {r['ratio']:.3f}x PreNorm (target <= {t}) {'met' if r['ratio'] <= t else 'NOT met'}")
        if r["label"] == "prenorm" and r["path"] == "default" and "x_gpt" in r:
            out.append(f"prenorm: {r['x_gpt']:.3f}x the nanoGPT-style floor (target <= 1.05) {'met' if r['x_gpt'] <= 1.05 else 'NOT met'}")
    return out


def run(args: argparse.Namespace) -> dict:
    shape, variants, device = setup(args)
    info = H.machine_info(device)
    flavour = H.make_optimizer(H.torch.nn.Linear(1, 1))[1]
    if not args.sizes:
        print_header(shape, info, flavour, args.clock, args.allocator)
        rows = time_shape(args, shape, variants, device)
        if args.memory:
            for v, row in zip(variants, rows):
                row["memory"] = H.measure_memory(shape, v, device, args.threads, tune=not args.raw_allocator)
        return {"machine": info, "shape": vars(shape), "steps": args.steps, "warmup": args.warmup, "clock": args.clock,
                "rows": rows}
    sizes = {}
    for d in SIZES:
        s = H.Shape(shape.layers, d, shape.heads, shape.seq, shape.batch, shape.vocab)
        print_header(s, info, flavour, args.clock, args.allocator)
        sizes[d] = time_shape(args, s, variants, device)
        print("\n" + fmt_table(sizes[d]) + "\n")
    return {"machine": info, "shape": vars(shape), "steps": args.steps, "warmup": args.warmup, "clock": args.clock,
            "sizes": {str(d): rows for d, rows in sizes.items()}}


def fmt_sizes(result: dict) -> str:
    sizes = result["sizes"]
    ds = list(sizes)
    head = ["variant", "path"] + [f"x PreNorm at d {d}" for d in ds] + [f"ms/step at d {d}" for d in ds]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for i, r in enumerate(sizes[ds[0]]):
        per = [sizes[d][i] for d in ds]
        lines.append("| " + " | ".join([r["label"], r["path"]] + [f"{p['ratio']:.3f}" if "ratio" in p else "-" for p in per]
                                       + [f"{p['median_ms']:.0f}" for p in per]) + " |")
    return "\n".join(lines)


def main() -> None:
    args = build_parser(__doc__.splitlines()[0]).parse_args()
    result = run(args)
    print()
    if "sizes" in result:
        print(fmt_sizes(result))
    else:
        print(fmt_table(result["rows"]))
        print("\n" + "\n".join(target_lines(result["rows"])))
    print(f"\nmedian over {args.steps} timed rounds after {args.warmup} warm-up rounds; 'x PreNorm' / 'x gpt': median of "
          "per-round ratios to PreNorm / to the nanoGPT-style floor on the same path (IQR in brackets); compile s: one-time "
          "compilation, not in ms/step. Peak alloc: torch tensor bytes at the step's peak (incl. parameters, grads, "
          "AdamW state), fresh process per variant.")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
