"""Deep fuzzing: random config overrides, and for every accepted config a real (tiny) run and a
generation from it. Reports tracebacks, and non-finite values in anything an accepted config
produced (metrics, status, checkpoints, logits of the generated text's model).

    python tools/fuzz_runs.py [--cases 1000] [--seed 0] [--out fuzz-report.json]

Each case draws 1-4 overrides over a tiny base run (d_model 32, 2 layers, 3 steps). Values are
drawn per field type: in half of the cases from edge values (bounds, zero, one, huge, nan, inf,
wrong types, junk text), in the other half from plausible ranges (more configs get to run).
Outcomes:

    refused    one clean line (ConfigError / CheckpointError / ValueError), as the CLI prints it
    trained    a run that trained (at most STOP_AFTER steps: train.steps may be huge), evaluated,
               checkpointed and generated; every value finite
    diverged   a run that reported its divergence honestly (status "diverged", finite checkpoints)
    traceback  anything else: a bug (the report keeps the type, message and innermost frame)
    nonfinite  an accepted config that produced a non-finite value anywhere: a bug

Runs in one process on one thread; a case that hangs is not caught (none should).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import random
import shutil
import sys
import tempfile
import time
import traceback
import typing
from pathlib import Path

import torch

from resstream.config import ConfigError, apply_overrides
from resstream.residual import available_kinds
from resstream.runs import generate_from_run
from resstream.runs.checkpoint import CheckpointError, list_checkpoints
from resstream.runs.config import RunConfig, run_config_fields
from resstream.runs.folder import read_metrics, read_status
from resstream.train import train

BASE = {
    "name": "fuzz",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64},
    "data": {"corpus": "kjv", "vocab_size": 320, "max_bytes": 120_000},
    "train": {"steps": 3, "batch_size": 4, "seq_len": 32, "eval_every": 3, "eval_batches": 1, "save_every": 2,
              "log_every": 1, "keep_last": 2},
}
STOP_AFTER = 4
SKIP = {"train.compile", "name", "data.corpus", "data.tokenizer", "data.text_field", "data.cache_dir"}  # slow or I/O-only
INTS = [0, 1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 64, 65, 257, -1, 10**6, 10**9, 2**63 - 1, 2**63, 10**20]
FLOATS = [0.0, -0.0, 1e-320, 1e-30, 1e-8, 1e-3, 0.1, 0.5, 0.999, 1.0, 1.0001, 2.0, 9.99, 10.0, 10.01, 1e30, 1e308,
          -1.0, float("nan"), float("inf"), float("-inf")]
STRINGS = {"train.schedule": ["cosine", "linear", "constant", "step"], "train.device": ["cpu", "auto", "cuda", "mps", "tpu"],
           "train.dtype": ["auto", "float32", "fp32", "bf16", "bfloat16", "float16"],
           "model.residual.kind": [*available_kinds(), "nope"]}


def draw_value(rng: random.Random, key: str, tp, plausible: bool) -> str:
    """An override value (TOML text) for ``key`` of annotation ``tp``; ``plausible``: no junk and
    no edge values, so that more configs are accepted and run."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    roll = 1.0 if plausible else rng.random()
    if roll < 0.08:
        return rng.choice(["\"x\"", "true", "[1, 2]", "none", "{", "1e", "\"\"", "-"])
    if key in STRINGS:
        return json.dumps(rng.choice(STRINGS[key]))
    if base is bool:
        return rng.choice(["true", "false"])
    if base is int:
        return str(rng.choice(INTS) if roll < 0.6 else rng.randint(1, 64))
    if base is float:
        v = rng.choice(FLOATS) if roll < 0.6 else 10 ** rng.uniform(-6, 1)
        return {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan" if v != v else repr(v))
    if typing.get_origin(base) is tuple:
        return json.dumps(rng.sample(available_kinds(), 2))
    return json.dumps(rng.choice(["", "a", "kjv", "prenorm"]))


def draw_overrides(rng: random.Random, fields: dict) -> list[str]:
    """1-4 overrides; half of the cases draw plausible values only (see draw_value)."""
    keys = [k for k in fields if k not in SKIP]
    picked = rng.sample(keys, rng.randint(1, 4))
    if rng.random() < 0.5:  # keep the kinds in play
        picked.append("model.residual.kind")
    plausible = rng.random() < 0.5
    return [f"{k}={draw_value(rng, k, fields[k], plausible)}" for k in dict.fromkeys(picked)]


def _finite_run(run: Path) -> str | None:
    """The first non-finite value an accepted run wrote, or None."""
    for row in read_metrics(run):
        for k, v in row.items():
            if isinstance(v, float) and not math.isfinite(v):
                return f"metrics.jsonl step {row.get('step')}: {k}={v}"
    st = read_status(run) or {}
    for k, v in st.items():
        if isinstance(v, float) and not math.isfinite(v):
            return f"status.json: {k}={v}"
    from safetensors.torch import load_file

    for ckpt in list_checkpoints(run):
        for name in ("model.safetensors", "optimizer.safetensors"):
            for k, t in load_file(str(ckpt / name)).items():
                if t.is_floating_point() and not torch.isfinite(t).all():
                    return f"{ckpt.name}/{name}: {k}"
    return None


def run_case(overrides: list[str], work: Path) -> tuple[str, str]:
    """(outcome, detail) of one case."""
    try:
        cfg = RunConfig.from_dict(apply_overrides(BASE, overrides))
    except ConfigError as e:
        return "refused", str(e)
    run = work / "run"
    try:
        # at most STOP_AFTER steps whatever train.steps says (then it ends as "interrupted")
        res = train(cfg, run, progress=False, log=lambda s: None, stop_after=STOP_AFTER)
        bad = _finite_run(run) if run.exists() else None
        if bad:
            return "nonfinite", bad
        if res.status == "diverged":
            return "diverged", f"last good step {res.last_good_step}"
        if res.status not in ("finished", "interrupted") or not all(
                v is None or math.isfinite(v) for v in (res.val_loss, res.val_bpb)):
            return "nonfinite", f"status {res.status}, val_loss {res.val_loss}"
        text = generate_from_run(run, "In the beginning", max_new_tokens=4, temperature=1.0, seed=0, out=io.StringIO())
        return "trained", f"{res.status} at step {res.step}, val_bpb {res.val_bpb}, generated {text!r}"
    except (ConfigError, CheckpointError, ValueError) as e:
        msg = str(e)
        return ("refused", msg) if msg and "\n" not in msg else ("traceback", f"multi-line {type(e).__name__}: {msg!r}")
    except Exception as e:  # noqa: BLE001 - the point is to catch everything
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return "traceback", f"{type(e).__name__}: {str(e)[:300]} at {frame.filename}:{frame.lineno}"
    finally:
        shutil.rmtree(run, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fuzz-report.json")
    p.add_argument("--verbose", action="store_true", help="print every case before running it")
    args = p.parse_args()
    torch.set_num_threads(1)
    rng, fields = random.Random(args.seed), run_config_fields()
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}  # refusals by the field (or phrase) their message starts with
    bugs, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cases):
            overrides = draw_overrides(rng, fields)
            if args.verbose:
                print(f"[{i}] {overrides}", file=sys.stderr, flush=True)
            outcome, detail = run_case(overrides, Path(tmp))
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "refused":
                reason = detail.split(":")[0].split("=")[0][:60]
                reasons[reason] = reasons.get(reason, 0) + 1
            if outcome in ("traceback", "nonfinite"):
                bugs.append({"case": i, "overrides": overrides, "outcome": outcome, "detail": detail})
                print(f"[{i}] {outcome}: {overrides} -> {detail}", file=sys.stderr)
            if (i + 1) % 50 == 0:
                print(f"{i + 1}/{args.cases} cases, {time.time() - t0:.0f} s: {counts}", file=sys.stderr)
    report = {"cases": args.cases, "seed": args.seed, "counts": counts, "bugs": bugs, "wall_s": time.time() - t0,
              "refusals": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("cases", "seed", "counts", "wall_s")}))
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
