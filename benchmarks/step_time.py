"""Training-step time of residual kinds, side by side in one process.

    .venv/bin/python benchmarks/step_time.py                       # defaults below
    .venv/bin/python benchmarks/step_time.py --residuals prenorm,block_attnres:block_size=8,recompute=true --json out.json

Times forward + backward + AdamW step for each variant (interleaved rounds, warm-up
discarded, median and IQR over the timed rounds), then measures each variant's peak memory
in a fresh child process. Variants are residual specs ``kind[:option=value,option=value]``
(the grammar of ``resstream compare --residuals``); every option of every kind also has a
flag (``--block-size 4``) applying to all variants whose kind has it. See harness.py for the
exact protocol and the memory methods.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alloc_env import ensure_allocator_env  # noqa: E402  (before torch is imported)

if __name__ == "__main__":
    ensure_allocator_env()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import harness as H  # noqa: E402


def build_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s = H.Shape()
    ap.add_argument("--layers", type=int, default=s.layers)
    ap.add_argument("--d-model", type=int, default=s.d_model)
    ap.add_argument("--heads", type=int, default=s.heads)
    ap.add_argument("--seq", type=int, default=s.seq)
    ap.add_argument("--batch", type=int, default=s.batch)
    ap.add_argument("--vocab", type=int, default=s.vocab)
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (each times every variant once)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--residuals", default="prenorm,attnres,block_attnres",
                    help=f"comma-separated kind[:opt=value,opt=value]; kinds: {', '.join(H.available_kinds())}")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="also time torch.compile'd models (slow to compile on a CPU)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="measure peak memory (one fresh child process per variant)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--clock", choices=sorted(H.CLOCKS), default="wall",
                    help="wall time, or this process's CPU time (use with --threads 1 on a busy machine)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    for f in H.residual_fields():  # every kind's options, applied to the variants whose kind has them
        ap.add_argument("--" + f.name.replace("_", "-"), dest="res_" + f.name, type=H.parse_value, default=None,
                        help=f"residual option {f.name} for every variant whose kind has it (default {f.default!r})")
    return ap


def setup(args: argparse.Namespace) -> tuple[H.Shape, list[H.Variant], "H.torch.device"]:
    shape = H.Shape(args.layers, args.d_model, args.heads, args.seq, args.batch, args.vocab)
    common = {f.name: getattr(args, "res_" + f.name) for f in H.residual_fields() if getattr(args, "res_" + f.name) is not None}
    variants = H.parse_variants(args.residuals, common)
    if args.compile:
        variants = variants + [H.Variant(v.kind, v.options, v.label_options, compiled=True) for v in variants]
    return shape, variants, H.pick_device(args.device)


def print_header(shape: H.Shape, info: dict, common: dict, flavour: str, clock: str) -> None:
    print(f"machine: {info['cpu']} | {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']} "
          f"| {info['cpu_capability']} | device {info['device']}{' (' + info['gpu'] + ')' if 'gpu' in info else ''}")
    print(f"torch {info['torch']} | python {info['python']} | git {info['git'] or '?'}")
    print("allocator: " + " ".join(f"{k}={v}" for k, v in info["allocator"].items()))
    print(f"shape: {shape.layers} layers, d_model {shape.d_model}, {shape.heads} heads, seq {shape.seq}, "
          f"batch {shape.batch}, vocab {shape.vocab} ({shape.tokens} tokens/step) | AdamW {flavour} | fp32 | {clock} clock")
    if common:
        print("residual options for every variant whose kind has them: " + ", ".join(f"{k}={v}" for k, v in common.items()))


def baseline_index(variants: list[H.Variant]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, v in enumerate(variants):
        if v.kind == "prenorm" and not v.label_options:
            out.setdefault(v.path, i)
    return out


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        H.torch.set_num_threads(args.threads)
    shape, variants, device = setup(args)
    batch = H.make_batch(shape, device)
    runners = [H.build_runner(shape, v, device, batch) for v in variants]
    info = H.machine_info(device)
    common = {k: v for k, v in vars(args).items() if k.startswith("res_") and v is not None}
    print_header(shape, info, {k[4:]: v for k, v in common.items()}, runners[0].flavour, args.clock)
    entries = [(r.variant.label, r.variant.path, r.step_fn) for r in runners]
    timings = H.interleaved_timing(entries, args.steps, args.warmup, device, baseline_index(variants), clock=args.clock)
    rows = []
    for v, r, t in zip(variants, runners, timings):
        row = {"kind": v.kind, "label": v.label, "path": v.path, "options": v.options,
               "median_ms": 1e3 * t.median, "iqr_ms": 1e3 * t.iqr, "times_ms": [1e3 * x for x in t.times],
               "tokens_per_s": shape.tokens / t.median, "params": sum(p.numel() for p in r.model.parameters())}
        if t.ratios:
            q1, med, q3 = H.Timing.quartiles(t.ratios)
            row.update(ratio=med, ratio_iqr=q3 - q1, ratio_of_medians=t.median / timings[baseline_index(variants)[v.path]].median)
        rows.append(row)
    del runners  # free the timed models before the memory children start
    if args.memory:
        for v, row in zip(variants, rows):
            row["memory"] = H.measure_memory(shape, v, device, args.threads)
    return {"machine": info, "shape": vars(shape), "steps": args.steps, "warmup": args.warmup, "clock": args.clock,
            "rows": rows}


def fmt_table(result: dict) -> str:
    rows = result["rows"]
    base_mem = {r["path"]: r.get("memory", {}) for r in rows if r["kind"] == "prenorm" and r["label"] == "prenorm"}
    head = ["variant", "path", "ms/step", "IQR ms", "x PreNorm (IQR)", "tokens/s", "peak alloc MiB", "x", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        ratio = f"{r['ratio']:.3f} ({r['ratio_iqr']:.3f})" if "ratio" in r else "-"
        m = r.get("memory", {})
        alloc = m.get("alloc_mib")
        b = base_mem.get(r["path"], {}).get("alloc_mib")
        mx = f"{alloc / b:.3f}" if alloc and b else "-"
        rss = m.get("rss_mib")
        lines.append("| " + " | ".join([
            r["label"], r["path"], f"{r['median_ms']:.0f}", f"{r['iqr_ms']:.0f}", ratio, f"{r['tokens_per_s']:.0f}",
            f"{alloc:.0f}" if alloc else m.get("error", "-"), mx, f"{rss:.0f}" if rss else "-",
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    args = build_parser(__doc__.splitlines()[0]).parse_args()
    result = run(args)
    print()
    print(fmt_table(result))
    print(f"\nmedian over {args.steps} timed rounds after {args.warmup} warm-up rounds; 'x PreNorm' is the median of "
          "per-round ratios (IQR in brackets). Peak alloc: torch tensor bytes at the step's peak (incl. parameters, "
          "grads, AdamW state), fresh process per variant; peak RSS: VmHWM growth over build + 2 steps, fresh process.")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
