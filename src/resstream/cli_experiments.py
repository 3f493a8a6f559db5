"""The experiment commands over many runs beyond ``compare``: scaling-law sweeps over model
sizes and grids over config keys (see compare/scale.py, compare/sweep.py).

    resstream scale    [--preset scale-demo] [--sizes 4x64,6x96 | --params 200k,1M] [--tokens-per-param 20] ...
    resstream sweep    KEY=V1,V2,... [KEY2=...] [--preset demo | --config FILE] [--residuals a,b] [--seeds K] ...
"""
from __future__ import annotations

import json
from pathlib import Path

from resstream.config import ConfigError
from resstream.runs.config import load_run_config


def cmd_scale(args) -> int:
    from resstream.compare.scale import ScaleOptions, scale

    overrides = list(args.overrides) + ([f"data.corpus={json.dumps(args.corpus)}"] if args.corpus else [])
    cfg = load_run_config(args.config, overrides, preset=args.preset or (None if args.config else "scale-demo"))
    scale(cfg, ScaleOptions(
        residuals=args.residuals, sizes=args.sizes, params=args.params, seeds=args.seeds,
        tokens_per_param=args.tokens_per_param, tokens=args.tokens, out=Path(args.out) if args.out else None,
        force=args.force, progress=not args.no_progress, baseline=args.baseline,
    ))
    return 0


def cmd_sweep(args) -> int:
    from resstream.compare.sweep import SweepOptions, sweep

    if args.steps is not None and args.tokens is not None:
        raise ConfigError("pass either --steps or --tokens, not both")
    overrides = [f"data.corpus={json.dumps(args.corpus)}"] if args.corpus else []
    cfg = load_run_config(args.config, overrides, preset=args.preset or (None if args.config else "demo"))
    sweep(cfg, SweepOptions(
        axes=list(args.overrides), residuals=args.residuals, seeds=args.seeds, steps=args.steps, tokens=args.tokens,
        out=Path(args.out) if args.out else None, force=args.force, progress=not args.no_progress,
        baseline=args.baseline,
    ))
    return 0


def _scale_parser(sub) -> None:
    sc = sub.add_parser("scale", help="kinds x model sizes x seeds: scaling-law fits and the compute multiplier")
    sc.add_argument("--config", help="TOML config file (see configs/)")
    sc.add_argument("--preset", help="a built-in preset (default scale-demo)")
    sc.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-3")
    sc.add_argument("--residuals", help="comma-separated residual specs KIND[:key=value,...]")
    sc.add_argument("--baseline", help="the kind every other is compared with (default the first)")
    sc.add_argument("--sizes", help="model sizes N_LAYERSxD_MODEL, e.g. 4x64,6x96,8x128")
    sc.add_argument("--params", help="or target parameter counts (non-embedding), e.g. 200k,500k,1.5M")
    sc.add_argument("--seeds", type=int, help="seeds per kind and size")
    sc.add_argument("--tokens-per-param", type=float, help="tokens per run = this x parameters (default 20)")
    sc.add_argument("--tokens", type=int, help="or the same token budget for every size")
    sc.add_argument("--corpus", help="kjv, python-stdlib, a path or hf:NAME")
    sc.add_argument("--out", help="output folder (default scale-<name>)")
    sc.add_argument("--force", action="store_true", help="take over an output folder that holds a different experiment (its runs are moved aside, not deleted)")
    sc.add_argument("--no-progress", action="store_true")
    sc.set_defaults(fn=cmd_scale)


def _sweep_parser(sub) -> None:
    sw = sub.add_parser("sweep", help="a grid over config keys x kinds x seeds: KEY=V1,V2,... [KEY2=...]")
    sw.add_argument("--config", help="TOML config file (see configs/)")
    sw.add_argument("--preset", help="a built-in preset (default demo)")
    sw.add_argument("overrides", nargs="+", metavar="KEY=V1,V2,...",
                    help="swept keys, e.g. model.residual.block_size=1,2,4,8 or train.lr=1e-3,3e-3 (one value: a fixed override)")
    sw.add_argument("--residuals", help="comma-separated residual specs KIND[:key=value,...] (default compare.residuals)")
    sw.add_argument("--baseline", help="the kind every other is compared with (default the first)")
    sw.add_argument("--seeds", type=int, help="seeds per cell")
    sw.add_argument("--corpus", help="kjv, python-stdlib, a path or hf:NAME")
    sw.add_argument("--steps", type=int, help="optimizer steps per run")
    sw.add_argument("--tokens", type=int, help="token budget per run (sets the steps)")
    sw.add_argument("--out", help="output folder (default sweep-<name>)")
    sw.add_argument("--force", action="store_true", help="take over an output folder that holds a different experiment (its runs are moved aside, not deleted)")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(fn=cmd_sweep)


def add_experiment_commands(sub) -> None:
    _scale_parser(sub)
    _sweep_parser(sub)
