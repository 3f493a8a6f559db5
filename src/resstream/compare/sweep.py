"""`resstream sweep KEY=V1,V2,... [KEY2=...]`: a grid over config keys x residual kinds x seeds.

Fairness as in `compare`: every cell shares the base config except the swept keys, and seed s
gives every cell the same data order and the same non-residual initial weights. A key under
``model.residual.`` applies only to the kinds that have that option (their options class
accepts it); a kind without it runs once per value of the other keys, as a reference line
(the paper's Fig. 6 layout: Block AttnRes at several block sizes against PreNorm and Full).
Each run is its own process and an ordinary run folder under OUT/runs/POINT/LABEL-sSEED;
re-running the same command skips finished runs and resumes partial ones.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from resstream.compare.run import CompareOptions, JobOptions, choose_baseline, plan
from resstream.config import ConfigError, apply_overrides, parse_value
from resstream.residual.config import format_spec, option_names, spec_label
from resstream.runs.config import RunConfig

RESIDUAL = "model.residual."


@dataclass
class SweepOptions(JobOptions):
    axes: list[str] = field(default_factory=list)  # "KEY=V1,V2,..."; one value: a fixed override
    steps: int | None = None


@dataclass
class Cell:
    label: str  # the kind's label (its spec without the swept options)
    residual: dict
    point: dict  # swept key -> value, only the keys that apply to this kind
    overrides: list[str]  # the point's keys outside model.residual, as key=value

    @property
    def slug(self) -> str:
        return ",".join(f"{k.rpartition('.')[2]}={_text(v)}" for k, v in self.point.items()) or "unswept"


def _text(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def split_values(text: str) -> list[str]:
    """'1,2,[3,4],"a,b"' -> ['1', '2', '[3,4]', '"a,b"']: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def parse_axes(items: list[str]) -> list[tuple[str, list]]:
    """['train.lr=1e-3,3e-3'] -> [('train.lr', [0.001, 0.003])]."""
    axes = []
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key or not raw.strip():
            raise ConfigError(f"sweep: '{item}' is not KEY=V1,V2,...; e.g. model.residual.block_size=1,2,4,8")
        values = [parse_value(v) for v in split_values(raw)]
        if any(v == "" for v in values):
            raise ConfigError(f"sweep: '{item}' has an empty value")
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"sweep: '{item}' lists a value twice")
        if key in (k for k, _ in axes):
            raise ConfigError(f"sweep: '{key}' is swept twice; give all its values in one KEY=V1,V2,...")
        if key in ("train.seed", "name", "model.residual.kind"):
            raise ConfigError(f"sweep: '{key}' cannot be swept; use --seeds or --residuals")
        axes.append((key, values))
    if not any(len(v) > 1 for _, v in axes):
        raise ConfigError("sweep: name a key with at least two values, e.g. train.lr=1e-3,3e-3")
    return axes


def _applies(residual: dict, key: str) -> bool:
    """Whether the kind of ``residual`` has the option ``key`` (model.residual.<option>); its
    values are checked later, with the whole config, so a bad value fails in one line."""
    return key[len(RESIDUAL):] in option_names(residual["kind"])


def cells_for(kinds: list[tuple[str, dict]], axes: list[tuple[str, list]]) -> list[Cell]:
    """Every (kind, point) to train: a kind's grid has only the axes that apply to it."""
    cells = []
    for _, residual in kinds:
        own = [(k, vs) for k, vs in axes
               if not k.startswith(RESIDUAL) or _applies(residual, k)]
        base_res = {k: v for k, v in residual.items() if f"{RESIDUAL}{k}" not in dict(own)}
        for combo in itertools.product(*[vs for _, vs in own]):
            point = dict(zip([k for k, _ in own], combo))
            res = {**base_res, **{k[len(RESIDUAL):]: v for k, v in point.items() if k.startswith(RESIDUAL)}}
            over = [f"{k}={json.dumps(v)}" for k, v in point.items() if not k.startswith(RESIDUAL)]
            cells.append(Cell(spec_label(format_spec(base_res)), res, point, over))
    return cells


def plan_sweep(cfg: RunConfig, opts: SweepOptions):
    """(base config, kind labels in order, cells, seeds, baseline label, swept axes); every value
    is checked against the config before anything is trained. A key with one value is a fixed
    override (of the kinds that have it, for a model.residual key)."""
    all_axes = parse_axes(opts.axes)
    axes = [(k, vs) for k, vs in all_axes if len(vs) > 1]
    fixed = [(k, vs[0]) for k, vs in all_axes if len(vs) == 1]
    over = [f"{k}={json.dumps(v)}" for k, v in fixed if not k.startswith(RESIDUAL)]
    cfg = RunConfig.from_dict(apply_overrides(cfg.to_dict(), over))
    base, kinds, seeds = plan(cfg, CompareOptions(residuals=opts.residuals, seeds=opts.seeds,
                                                  steps=opts.steps, tokens=opts.tokens))
    for k, v in fixed:
        if k.startswith(RESIDUAL):
            kinds = [(label, {**res, k[len(RESIDUAL):]: v} if _applies(res, k) else res) for label, res in kinds]
    for k, vs in axes:
        if k.startswith(RESIDUAL) and not any(_applies(res, k) for _, res in kinds):
            raise ConfigError(f"sweep: '{k}' is not an option of any compared kind "
                              f"({', '.join(label for label, _ in kinds)})")
    baseline_spec = choose_baseline(kinds, opts.baseline if opts.baseline is not None else base.compare.baseline)
    cells = cells_for(kinds, axes)
    for c in cells:  # every cell's config must build: bad keys and values fail here, in one line
        RunConfig.from_dict(cell_config(base, c, seeds[0]))
    labels = list(dict.fromkeys(c.label for c in cells))
    if len(labels) < len(kinds):
        raise ConfigError("sweep: two kinds become the same once the swept options are removed; list each once")
    baseline = cells_for([k for k in kinds if k[0] == baseline_spec], axes)[0].label
    return base, labels, cells, seeds, baseline, axes


def cell_config(base: RunConfig, cell: Cell, seed: int) -> dict:
    name = f"{cell.label}-{cell.slug}-s{seed}".replace("/", "_")
    d = apply_overrides(base.to_dict(), cell.overrides + [f"train.seed={seed}", f"name={json.dumps(name)}"])
    d["model"]["residual"] = cell.residual
    return d


def cell_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / "runs" / cell.slug.replace("/", "_") / f"{cell.label}-s{seed}"


def sweep(cfg: RunConfig, opts: SweepOptions, log=print) -> dict:
    """Train every (cell, seed), then write summary.json and the sweep report."""
    from resstream.compare.jobs import claim_output, publish, run_jobs
    from resstream.compare.sweep_report import analyse_sweep, format_sweep, write_sweep_report
    from resstream.data import prepare

    base, labels, cells, seeds, baseline, axes = plan_sweep(cfg, opts)
    out = opts.out or Path(f"sweep-{base.name}")
    claim_output(out, {"experiment": "sweep", "base": {k: v for k, v in base.to_dict().items() if k not in ("compare", "scale")},
                       "axes": axes, "cells": [[c.label, c.residual, c.point] for c in cells], "seeds": seeds}, opts.force)
    log(f"sweep: {len(cells)} cells x {len(seeds)} seeds = {len(cells) * len(seeds)} runs")
    prepare(base.data, log=log)
    jobs = [(f"{c.label} {c.slug} seed {s}", cell_dir(out, c, s), cell_config(base, c, s)) for s in seeds for c in cells]
    run_jobs(jobs, opts.progress, log)

    summary = analyse_sweep(out, base, labels, cells, seeds, baseline, axes, cell_dir)
    publish(out, summary, write_sweep_report, format_sweep(summary), log)
    return summary
