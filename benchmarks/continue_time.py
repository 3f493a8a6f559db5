"""Training-step time of continued training from a pretrained model, per residual kind, and
the wall time it implies for ``resstream compare --preset continue``.

    .venv/bin/python benchmarks/continue_time.py                            # SmolLM2, the preset's settings
    .venv/bin/python benchmarks/continue_time.py --threads 1 --clock cpu    # on a busy machine

Loads the model once (``resstream.pretrained.load``), upcycles it to each variant, and times
forward + backward + AdamW on random token windows of the preset's batch shape, interleaved
rounds after warm-up (median over rounds), plus a forward-only evaluation batch. The estimate
adds the preset's steps and evaluations for every (kind, seed); it leaves out model loading,
checkpoint writing and process start-up (a few seconds each per run on an idle machine).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from resstream.pretrained import load, upcycle  # noqa: E402
from resstream.residual.config import ResidualConfig, parse_specs  # noqa: E402
from resstream.runs.config import load_run_config  # noqa: E402
from resstream.train.optim import make_optimizer  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the preset's init_from)")
    ap.add_argument("--preset", default="continue")
    ap.add_argument("--residuals", default=None, help="comma-separated kind[:opt=value] (default: the preset's)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_run_config(preset=args.preset)
    tc = cfg.train
    base = load(args.model or cfg.init_from).model
    specs = args.residuals.split(",") if args.residuals else list(cfg.compare.residuals)
    variants = {}
    for label, res in parse_specs(specs):
        model = upcycle(base, ResidualConfig.from_dict(res)).train()
        variants[label] = (model, make_optimizer(model, tc))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, base.cfg.vocab_size, (tc.batch_size, tc.seq_len + 1), generator=g)
    now = CLOCKS[args.clock]
    times = {label: [] for label in variants}
    evals = {label: [] for label in variants}
    for r in range(args.warmup + args.rounds):
        for label, (model, opt) in variants.items():
            t0 = now()
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t1 = now()
            with torch.no_grad():
                model(x[:, :-1])
            t2 = now()
            if r >= args.warmup:
                times[label].append(t1 - t0)
                evals[label].append(t2 - t1)
    tokens = tc.batch_size * tc.seq_len
    n_evals = tc.steps // tc.eval_every + (tc.steps % tc.eval_every != 0)
    total = 0.0
    print(f"{args.clock} clock, {torch.get_num_threads()} threads, batch {tc.batch_size} x {tc.seq_len}")
    for label in variants:
        step, ev = statistics.median(times[label]), statistics.median(evals[label])
        run = tc.steps * step + n_evals * tc.eval_batches * ev
        total += run * cfg.compare.seeds
        print(f"{label:32s} {step * 1e3:9.0f} ms/step  {tokens / step:7.0f} tokens/s  eval batch {ev * 1e3:7.0f} ms  "
              f"run ~{run / 60:.1f} min")
    print(f"compare --preset {args.preset}: {cfg.compare.seeds} seeds x {len(variants)} kinds ~ {total / 60:.1f} min "
          "of training and evaluation")


if __name__ == "__main__":
    main()
