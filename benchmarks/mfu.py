"""Model FLOPs utilisation of residual kinds, against a matrix multiply timed in the same run.

    .venv/bin/python benchmarks/mfu.py                      # same flags as step_time.py, plus --gemm

Model FLOPs per token (PaLM appendix B, as nanoGPT's estimate_mfu):

    F = 6 N + 12 n_layers d_model T

N counts the parameters that take part in matmuls: the attention and MLP projections and the
LM head (tied to the embedding, so counted once; the embedding lookup is no matmul; norms and
residual parameters are left out). 6 N is forward + backward of the matmuls; 12 n_layers d T
is QK^T and AV, forward + backward, without discounting the causal mask. F is the same for
every residual kind, so a kind's extra work lowers its MFU.

Peak: the fp32 rate of one square matmul (--gemm, default 2048) timed as one more entry of
the interleaved rounds, so it sees the same threads, clock and machine drift as the steps.
MFU = F * tokens per second / that rate. Also printed: the matmul FLOPs of one training step
counted by torch.utils.flop_counter (what the kind actually multiplies, including its
own mixing matmuls), relative to F.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import json  # noqa: E402

import harness as H  # noqa: E402
import step_time as ST  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def model_flops_per_token(model: torch.nn.Module, shape: H.Shape) -> tuple[float, int]:
    """(6 N + 12 n_layers d T, N) with N the matmul parameters (see the module docstring)."""
    seen: set[int] = set()
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return 6 * n + 12 * shape.layers * shape.d_model * shape.seq, n


def counted_step_flops(runner: H.Runner) -> float:
    """Matmul FLOPs of one forward + backward, as torch's FlopCounterMode counts them."""
    model = runner.model
    idx, tgt = runner.batch
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, tgt)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def gemm_entry(n: int, device: torch.device, reps: int = 3):
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    return run, 2.0 * n**3 * reps


def main() -> None:
    ap = ST.build_parser(__doc__.splitlines()[0])
    ap.add_argument("--gemm", type=int, default=2048, help="side of the square fp32 matmul that sets the peak")
    ap.set_defaults(memory=False)
    args = ap.parse_args()
    shape, variants, device = ST.setup(args)
    batch = H.make_batch(shape, device)
    runners = [H.build_runner(shape, v, device, batch) for v in variants]
    info = H.machine_info(device)
    ST.print_header(shape, info, runners[0].flavour, args.clock, args.allocator)
    flops_tok, n_matmul = model_flops_per_token(runners[0].model, shape)
    counted = [counted_step_flops(r) for r in runners]
    gemm, gemm_flops = gemm_entry(args.gemm, device)
    entries = [(r.variant.label, r.variant.path, r.step_fn) for r in runners] + [(f"sgemm{args.gemm}", "-", gemm)]
    timings = H.interleaved_timing(entries, args.steps, args.warmup, device, clock=args.clock)
    peak_rounds = [gemm_flops / t for t in timings[-1].times]
    peak = sorted(peak_rounds)[len(peak_rounds) // 2]
    q1, _, q3 = H.Timing.quartiles(peak_rounds)
    print(f"\nmodel FLOPs/token F = 6N + 12*n_layers*d*T = 6*{n_matmul} + 12*{shape.layers}*{shape.d_model}*{shape.seq}"
          f" = {flops_tok / 1e6:.2f} MFLOP ({flops_tok * shape.tokens / 1e9:.1f} GFLOP/step)")
    print(f"peak: fp32 {args.gemm}^3 matmul, median {peak / 1e9:.1f} GFLOP/s (IQR {q1 / 1e9:.1f}-{q3 / 1e9:.1f}) over the same rounds\n")
    head = ["variant", "path", "ms/step", "tokens/s", "achieved GFLOP/s", "MFU", "counted matmul FLOPs / F"]
    print("| " + " | ".join(head) + " |\n|" + "|".join(["---"] * len(head)) + "|")
    rows = []
    for r, t, c in zip(runners, timings, counted):
        achieved = flops_tok * shape.tokens / t.median
        mfu = achieved / peak
        rows.append({"label": r.variant.label, "path": r.variant.path, "median_ms": 1e3 * t.median,
                     "tokens_per_s": shape.tokens / t.median, "achieved_flops": achieved, "mfu": mfu,
                     "counted_flops_per_step": c, "mfu_per_round": [flops_tok * shape.tokens / x / peak for x in t.times]})
        print(f"| {r.variant.label} | {r.variant.path} | {1e3 * t.median:.0f} | {shape.tokens / t.median:.0f} | "
              f"{achieved / 1e9:.1f} | {100 * mfu:.1f}% | {c / (flops_tok * shape.tokens):.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "shape": vars(shape), "flops_per_token": flops_tok,
                                               "matmul_params": n_matmul, "peak_flops": peak, "peak_rounds": peak_rounds,
                                               "clock": args.clock, "rows": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
