"""Estimate the wall time of an experiment preset without running it.

    .venv/bin/python benchmarks/preset_time.py --preset scale-demo --experiment scale
    .venv/bin/python benchmarks/preset_time.py --preset ablations            # a comparison
    .venv/bin/python benchmarks/preset_time.py --preset demo --threads 1 --clock cpu   # on a busy machine

For every distinct run shape of the experiment (kind x model size) it builds the model, times
``--steps`` training steps (forward + backward + AdamW, after ``--warmup`` untimed ones) and one
validation batch, and adds up: steps x step time + evaluations x eval batches x batch time +
a per-run start-up cost (``--startup``, one process start with torch imports; measured on the
development machine at about 3 s), times the number of seeds. Data preparation (a few seconds,
once) and the report are left out. Run it on an idle machine to check a preset's stated time;
with ``--clock cpu --threads 1`` on a shared machine it gives the one-thread time instead.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from resstream import LM, ModelConfig  # noqa: E402
from resstream.runs.config import load_run_config  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def jobs(preset: str, experiment: str) -> tuple[list[tuple[str, dict, int, int]], int, object]:
    """(title, model section, steps, evaluations) per distinct run; the seed count; the base config."""
    cfg = load_run_config(preset=preset)
    if experiment == "scale":
        from resstream.compare.scale import ScaleOptions, plan_scale, run_config

        p = plan_scale(cfg, ScaleOptions())
        out = []
        for size in p.sizes:
            for label, residual in p.kinds:
                d = run_config(p, size, label, residual, p.seeds[0])
                out.append((f"{size.label} {label}", d["model"], size.steps, math.ceil(size.steps / d["train"]["eval_every"])))
        return out, len(p.seeds), p.base
    from resstream.compare.run import CompareOptions, plan

    base, kinds, seeds = plan(cfg, CompareOptions())
    evals = math.ceil(base.train.steps / base.train.eval_every)
    return ([(label, {**base.model, "residual": res}, base.train.steps, evals) for label, res in kinds], len(seeds), base)


def time_job(model_section: dict, base, n_steps: int, warmup: int, clock) -> tuple[float, float]:
    """(seconds per training step, seconds per validation batch)."""
    tc, vocab = base.train, base.data.vocab_size
    model = LM(ModelConfig.from_dict({**model_section, "vocab_size": vocab}, prefix="model."))
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    x = torch.randint(0, vocab, (tc.batch_size, tc.seq_len))
    times = []
    for i in range(warmup + n_steps):
        t0 = clock()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(clock() - t0)
    with torch.no_grad():
        model(x, x)
        t0 = clock()
        model(x, x)
        t_eval = clock() - t0
    return statistics.median(times), t_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--experiment", choices=("compare", "scale"), default="compare")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per run shape")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--startup", type=float, default=3.0, help="seconds to start one run's process")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs, n_seeds, base = jobs(args.preset, args.experiment)
    print(f"{args.preset} ({args.experiment}): {len(runs)} run shapes x {n_seeds} seeds; torch threads "
          f"{torch.get_num_threads()}, clock {args.clock}")
    total = 0.0
    for title, section, steps, evals in runs:
        t_step, t_eval = time_job(section, base, args.steps, args.warmup, CLOCKS[args.clock])
        run_s = steps * t_step + evals * base.train.eval_batches * t_eval + args.startup
        total += n_seeds * run_s
        print(f"  {title:45s} {t_step * 1e3:8.0f} ms/step x {steps:4d} steps + {evals} evals = {run_s:7.0f} s per run",
              flush=True)
    print(f"estimated total: {total / 60:.1f} min ({total:.0f} s)")


if __name__ == "__main__":
    main()
