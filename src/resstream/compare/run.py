"""`resstream compare`: train every residual kind x seed under identical conditions.

Fairness: every run shares the model shape, data, token budget, hyperparameters and seed
set; seed s gives every kind the same batches in the same order and the same non-residual
initial weights, so differences between kinds can be tested per seed (paired). Each run is
a separate process (so its peak memory is its own) writing an ordinary run folder under
OUT/runs/; re-running the same command skips finished runs and resumes partial ones.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from resstream.compare.sizes import build_on_meta
from resstream.config import MAX_SEEDS, ConfigError, apply_overrides
from resstream.residual.config import parse_specs, spec_label
from resstream.runs.config import RunConfig


@dataclass
class JobOptions:
    """What every experiment over kinds x seeds takes (compare, scale, sweep); None: the config's."""

    residuals: str | None = None  # residual specs "kind,kind:key=value,key=value,..."
    seeds: int | None = None
    tokens: int | None = None
    out: Path | None = None
    force: bool = False
    progress: bool = True
    baseline: str | None = None  # an entry of residuals (its spec or label); None: the first


@dataclass
class CompareOptions(JobOptions):
    steps: int | None = None
    auto_seeds: bool = False  # add seeds until the paired tests decide (compare/decide.py)
    max_seeds: int | None = None  # the cap of auto_seeds; None: compare.max_seeds


def choose_baseline(kinds: list[tuple[str, dict]], baseline: str | None) -> str:
    """The label of the kind the others are compared with: ``baseline`` given as a spec
    ("kind:key=value") or a label ("kind-key=value"); None: the first."""
    if baseline is None:
        return kinds[0][0]
    labels = [label for label, _ in kinds]
    label = spec_label(baseline)
    if label not in labels:
        raise ConfigError(f"--baseline: '{baseline}' is not one of the compared kinds ({', '.join(labels)}); name one of them")
    return label


def plan(cfg: RunConfig, opts: CompareOptions) -> tuple[RunConfig, list[tuple[str, dict]], list[int]]:
    """Resolve kinds, seeds and the token budget into one base config."""
    if opts.residuals is not None and not opts.residuals.strip():
        raise ConfigError("--residuals: empty; name at least one residual kind (`resstream kinds` lists them)")
    kinds = parse_specs(opts.residuals if opts.residuals is not None else list(cfg.compare.residuals))
    n_seeds = opts.seeds if opts.seeds is not None else cfg.compare.seeds
    if not 1 <= n_seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds: must be in [1, {MAX_SEEDS}], got {n_seeds}")
    overrides = []
    if opts.steps is not None:
        if opts.steps < 1:
            raise ConfigError(f"--steps: must be >= 1, got {opts.steps}")
        overrides.append(f"train.steps={opts.steps}")
    if opts.tokens is not None:
        per_step = cfg.train.batch_size * cfg.train.seq_len
        if opts.tokens < per_step:
            raise ConfigError(f"--tokens: {opts.tokens} is less than one step ({per_step} tokens)")
        overrides.append(f"train.steps={math.ceil(opts.tokens / per_step)}")
    base = RunConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))
    for _, residual in kinds:  # every kind's model builds (on the meta device) before any run starts
        build_on_meta({**base.model, "residual": residual}, base.data.vocab_size)
    seeds = [base.train.seed + i for i in range(n_seeds)]
    return base, kinds, seeds


def _check_jobs(jobs: list[tuple[str, Path, dict]], vocab_size: int) -> None:
    """Every run's config is valid and fits in memory: refused before the output folder is made."""
    from resstream.train.setup import check_run_memory, resolve_device

    for _title, _run_dir, run_cfg in jobs:
        cfg = RunConfig.from_dict(run_cfg)
        check_run_memory(cfg.train, cfg.model_config(vocab_size), 1, resolve_device(cfg.train.device))


def compare(cfg: RunConfig, opts: CompareOptions, log=print) -> dict:
    """Train every (kind, seed), measure depth use, and write summary.json and the report."""
    from resstream.compare.collect import collect
    from resstream.compare.decide import run_until_decided
    from resstream.compare.jobs import claim_output, publish, run_jobs
    from resstream.compare.report import format_table, write_report
    from resstream.compare.stats import summarize
    from resstream.data import prepare
    from resstream.runs.init import resolve_init_from

    base, kinds, seeds = plan(cfg, opts)
    base = resolve_init_from(base)  # a pretrained model's shape and tokenizer, so the data is prepared with it
    baseline = choose_baseline(kinds, opts.baseline if opts.baseline is not None else base.compare.baseline)
    cap = opts.max_seeds if opts.max_seeds is not None else base.compare.max_seeds
    if opts.auto_seeds and not 2 <= cap <= MAX_SEEDS:
        raise ConfigError(f"--max-seeds: must be in [2, {MAX_SEEDS}], got {cap}")
    out = opts.out or Path(f"compare-{base.name}")
    # Data first (once, in this process, so every child finds it cached): a corpus that cannot
    # be read is refused before the output folder is touched.
    data = prepare(base.data, log=log)

    def jobs_for(seeds: list[int]) -> list[tuple[str, Path, dict]]:
        jobs = []
        for seed in seeds:
            for label, residual in kinds:
                run_cfg = apply_overrides(base.to_dict(), [f"train.seed={seed}", f"name={json.dumps(f'{label}-s{seed}')}"])
                run_cfg["model"]["residual"] = residual
                jobs.append((f"{label} seed {seed}", out / "runs" / f"{label}-s{seed}", run_cfg))
        return jobs

    _check_jobs(jobs_for(seeds[:1]), data.vocab_size)  # seeds change no shape: one seed's runs suffice
    claim_output(out, {"base": {k: v for k, v in base.to_dict().items() if k not in ("compare", "scale")},
                       "kinds": kinds, "seeds": {"auto": [len(seeds), cap]} if opts.auto_seeds else seeds}, opts.force)

    def train_seeds(seeds: list[int]) -> None:
        run_jobs(jobs_for(seeds), opts.progress, log)

    auto = None
    if opts.auto_seeds:
        seeds, auto = run_until_decided(out, kinds, seeds, cap, baseline, train_seeds, log)
    else:
        train_seeds(seeds)
    summary = summarize(collect(out, base, kinds, seeds, data, baseline))
    if auto:
        summary["setup"]["seeds_auto"] = auto
    publish(out, summary, write_report, format_table(summary), log)
    return summary
