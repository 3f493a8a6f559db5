"""`resstream scale`: residual kinds x model sizes x seeds, then scaling-law fits per kind and
the compute multiplier of each kind against the baseline (Kimi Team, Attention Residuals,
arXiv:2603.15031, Sec. 5.1 and Fig. 4).

Fairness as in `compare`: at a size every kind trains the same shape, tokens and
hyperparameters, and seed s gives every kind the same data order and the same non-residual
initial weights. Each run is its own process and an ordinary run folder under
OUT/runs/SIZE/LABEL-sSEED; re-running the same command skips finished runs and resumes
partial ones. The learning rate and batch are the base config's at every size.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from resstream.compare.run import JobOptions, choose_baseline, plan
from resstream.compare.sizes import (Size, build_on_meta, build_sizes, parse_counts, parse_shapes, shape_for_params,
                                     shaped)
from resstream.config import ConfigError, apply_overrides
from resstream.runs.config import RunConfig


@dataclass
class ScaleOptions(JobOptions):
    sizes: str | None = None  # "4x64,6x96,8x128"; default scale.sizes
    params: str | None = None  # "200k,1M": target parameter counts instead of sizes
    tokens_per_param: float | None = None


@dataclass
class ScalePlan:
    base: RunConfig
    kinds: list[tuple[str, dict]]
    seeds: list[int]
    sizes: list[Size]
    baseline: str
    tokens_per_param: float | None  # the token rule: this x N per run, or
    tokens: int | None  # the same tokens for every size


def plan_scale(cfg: RunConfig, opts: ScaleOptions) -> ScalePlan:
    """Resolve kinds, seeds, sizes and token budgets; every error before anything is trained."""
    from resstream.compare.run import CompareOptions

    base, kinds, seeds = plan(cfg, CompareOptions(residuals=opts.residuals, seeds=opts.seeds))
    baseline = choose_baseline(kinds, opts.baseline if opts.baseline is not None else base.compare.baseline)
    sc = base.scale
    if opts.sizes and opts.params:
        raise ConfigError("pass either --sizes or --params, not both")
    if opts.tokens is not None and opts.tokens_per_param is not None:
        raise ConfigError("pass either --tokens or --tokens-per-param, not both")
    if opts.tokens_per_param is not None and opts.tokens_per_param <= 0:
        raise ConfigError(f"--tokens-per-param: must be > 0, got {opts.tokens_per_param}")
    model, vocab = dict(base.model), base.data.vocab_size
    if opts.params or (not opts.sizes and sc.params):
        counts = parse_counts(opts.params or ",".join(sc.params))
        shapes = list(dict.fromkeys(shape_for_params(model, vocab, c) for c in counts))
    elif opts.sizes or sc.sizes:
        shapes = parse_shapes(opts.sizes or ",".join(sc.sizes))
    else:
        raise ConfigError("name the model sizes: --sizes 4x64,6x96,8x128 (or --params 200k,1M, or scale.sizes in the config)")
    if len(shapes) < 2:
        raise ConfigError("a scaling study needs at least two sizes (a fit needs two computes)")
    per_step = base.train.batch_size * base.train.seq_len
    tokens = opts.tokens if opts.tokens is not None else (None if opts.tokens_per_param is not None else sc.tokens)
    if tokens is not None and tokens < per_step:
        raise ConfigError(f"--tokens: {tokens} is less than one step ({per_step} tokens)")
    tpp = opts.tokens_per_param if opts.tokens_per_param is not None else sc.tokens_per_param
    sizes = build_sizes(model, vocab, shapes, per_step, tpp, tokens)
    for size in sizes:  # every kind builds at every size before any run starts
        for _, residual in kinds:
            build_on_meta({**shaped(model, size.n_layers, size.d_model), "residual": residual}, vocab)
    return ScalePlan(base, kinds, seeds, sizes, baseline, None if tokens is not None else tpp, tokens)


def run_config(p: ScalePlan, size: Size, label: str, residual: dict, seed: int) -> dict:
    """The RunConfig dict of one run: the base at this size, with its steps and evaluations."""
    every = max(1, math.ceil(size.steps / p.base.scale.evals))
    name = f"{size.label}-{label}-s{seed}"
    d = apply_overrides(p.base.to_dict(), [f"train.seed={seed}", f"train.steps={size.steps}",
                                           f"train.eval_every={every}", f"name={json.dumps(name)}"])
    d["model"] = shaped(d["model"], size.n_layers, size.d_model)
    d["model"]["residual"] = residual
    return d


def run_dir(out: Path, size: Size, label: str, seed: int) -> Path:
    return out / "runs" / size.label / f"{label}-s{seed}"


def fingerprint(p: ScalePlan) -> dict:
    base = {k: v for k, v in p.base.to_dict().items() if k not in ("compare", "scale")}
    return {"experiment": "scale", "base": base, "kinds": p.kinds, "seeds": p.seeds,
            "sizes": [s.to_dict() for s in p.sizes], "evals": p.base.scale.evals}


def scale(cfg: RunConfig, opts: ScaleOptions, log=print) -> dict:
    """Train every (size, kind, seed), fit the scaling laws, write summary.json and the report."""
    from resstream.compare.jobs import claim_output, publish, run_jobs
    from resstream.compare.scale_analysis import analyse, collect_points
    from resstream.compare.scale_report import format_scale, write_scale_report
    from resstream.data import prepare

    p = plan_scale(cfg, opts)
    out = opts.out or Path(f"scale-{p.base.name}")
    claim_output(out, fingerprint(p), opts.force)
    log(describe_plan(p))
    data = prepare(p.base.data, log=log)  # once, here, so every child finds it cached
    jobs = [(f"{size.label} {label} seed {seed}", run_dir(out, size, label, seed), run_config(p, size, label, residual, seed))
            for seed in p.seeds for size in p.sizes for label, residual in p.kinds]
    run_jobs(jobs, opts.progress, log)

    points = collect_points(out, p, run_dir)
    summary = analyse(points, p, data.stats, p.base.scale.bootstrap)
    publish(out, summary, write_scale_report, format_scale(summary), log)
    return summary


def describe_plan(p: ScalePlan) -> str:
    runs = len(p.sizes) * len(p.kinds) * len(p.seeds)
    lines = [f"scale: {len(p.kinds)} kinds x {len(p.sizes)} sizes x {len(p.seeds)} seeds = {runs} runs"]
    for s in p.sizes:
        lines.append(f"  {s.label:>8s}: N {s.params:,} (non-embedding), {s.tokens:,} tokens ({s.steps} steps), "
                     f"C = 6ND = {s.compute:.3g} FLOP")
    return "\n".join(lines)
