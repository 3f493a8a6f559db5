"""Decode latency and prefill throughput per residual kind next to a nanoGPT-style GPT.

    .venv/bin/python benchmarks/decode.py            # as a user runs it: torch's threads, wall clock, batch 1, 8, 32
    .venv/bin/python benchmarks/decode.py --sizes    # the trend at d_model 256, 512 and 1024
    .venv/bin/python benchmarks/decode.py --residuals prenorm,block_attnres:block_size=8 --batches 1

For each batch size: prefill a prompt of --prompt-len tokens into a fresh cache (tokens/s),
then decode --new-tokens tokens one step at a time (ms per step, the model step only, no
sampling; the prompt excluded). Every kind gets the same non-residual weights (random
residual parameters, as after training) and runs in this one process, the kinds taking turns
at every step, after a warm-up round; medians over rounds (prefill) and over every step of
every round (decode), ratios are medians of paired per-step ratios. ``gpt`` is the plain
PreNorm GPT of reference_gpt.py, the floor. "ops/step" counts the aten operators of one
steady decoding step at batch 1 (views included): at batch 1 each costs microseconds whatever
its size, so the ratio follows it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from resstream import LM, ModelConfig, ResidualConfig  # noqa: E402
from resstream.model.generate import DecodeCache, prefill  # noqa: E402
from resstream.residual import parse_specs  # noqa: E402

TARGETS = {"block_attnres": 1.10, "attnres": 1.15}  # issue 12, batch 1 at 8 x 256
SIZES = (256, 512, 1024)


class Decoder:
    """One model behind one interface: fresh cache, prefill, one decoding step."""

    def __init__(self, label: str, residual: dict | None, args, d_model: int, base_state: dict | None) -> None:
        self.label = label
        cfg = ModelConfig(vocab_size=args.vocab, d_model=d_model, n_layers=args.layers, n_heads=args.heads,
                          max_seq_len=args.prompt_len + args.new_tokens,
                          residual=ResidualConfig(**(residual or {"kind": "prenorm"})))
        torch.manual_seed(0)
        self.ref = residual is None
        self.model = (H.GPT(cfg) if self.ref else LM(cfg)).eval()
        if base_state is not None and not self.ref:
            self.model.load_state_dict(base_state, strict=False)
            with torch.no_grad():  # non-trivial mixing weights, as after training
                for p in self.model.residual.parameters():
                    p.add_(torch.randn_like(p) * 0.1)

    def new_cache(self, batch: int):
        return self.model.new_cache(batch, self.model.cfg.max_seq_len) if self.ref else DecodeCache(self.model, batch)

    def prefill(self, idx, cache):
        return self.model.decode(idx, cache, last_only=True) if self.ref else prefill(self.model, idx, cache, last_only=True)

    def step(self, idx, cache):
        return self.model.decode(idx, cache)


@torch.no_grad()
def one_round(models: list[Decoder], prompt, new, clock):
    """Seconds of each model's prefill, and of each of its decode steps, the models taking turns."""
    caches = {m.label: m.new_cache(prompt.shape[0]) for m in models}
    pre, steps = {}, {m.label: [] for m in models}
    for m in models:
        t0 = clock()
        m.prefill(prompt, caches[m.label])
        pre[m.label] = clock() - t0
    for t in range(new.shape[1]):
        for m in (models if t % 2 == 0 else models[::-1]):
            t0 = clock()
            m.step(new[:, t : t + 1], caches[m.label])
            steps[m.label].append(clock() - t0)
    return pre, steps


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(m: Decoder, prompt, new) -> int:
    cache = m.new_cache(1)
    m.prefill(prompt[:1], cache)
    m.step(new[:1, :1], cache)  # the first step makes the lean path's buffers for this batch size
    with CountOps() as c:
        m.step(new[:1, 1:2], cache)
    return c.n


def measure(args, d_model: int, batch: int, models: list[Decoder]) -> list[dict]:
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, args.vocab, (batch, args.prompt_len), generator=g)
    new = torch.randint(0, args.vocab, (batch, args.new_tokens), generator=g)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    pre = {m.label: [] for m in models}
    dec = {m.label: [] for m in models}
    for r in range(args.rounds + 1):
        p, s = one_round(models if r % 2 == 0 else models[::-1], prompt, new, clock)
        if r > 0:  # round 0 warms up
            for m in models:
                pre[m.label].append(p[m.label])
                dec[m.label].extend(s[m.label])
    base = next(m.label for m in models if m.label == "prenorm") if any(m.label == "prenorm" for m in models) else models[0].label
    rows = []
    for m in models:
        rows.append({
            "label": m.label, "d_model": d_model, "batch": batch, "ms_per_step": 1e3 * statistics.median(dec[m.label]),
            "x_prenorm": statistics.median(a / b for a, b in zip(dec[m.label], dec[base])),
            "prefill_tokens_per_s": batch * args.prompt_len / statistics.median(pre[m.label]),
            "prefill_x_prenorm": statistics.median(a / b for a, b in zip(pre[m.label], pre[base])),
            "ops_per_step": ops_per_step(m, prompt, new) if batch == 1 else None,
        })
    return rows


def build_models(args, d_model: int) -> list[Decoder]:
    specs = dict(parse_specs(",".join(s for s in args.residuals.split(",") if s.strip() != H.REFERENCE)))
    base = LM(ModelConfig(vocab_size=args.vocab, d_model=d_model, n_layers=args.layers, n_heads=args.heads,
                          max_seq_len=args.prompt_len + args.new_tokens)).state_dict()
    models = [Decoder("gpt (nanoGPT-style floor)", None, args, d_model, None)] if H.REFERENCE in args.residuals.split(",") else []
    return models + [Decoder(label, res, args, d_model, base) for label, res in specs.items()]


def print_table(rows: list[dict]) -> None:
    print("| kind | batch | decode ms/step | x PreNorm | aten ops/step (batch 1) | prefill tokens/s | prefill x PreNorm |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ops = "-" if r["ops_per_step"] is None else str(r["ops_per_step"])
        print(f"| {r['label']} | {r['batch']} | {r['ms_per_step']:.3f} | {r['x_prenorm']:.3f} | {ops} | "
              f"{r['prefill_tokens_per_s']:,.0f} | {r['prefill_x_prenorm']:.3f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--residuals", default="gpt,prenorm,attnres,block_attnres,depth_swa,denseformer",
                    help="comma-separated kind[:opt=value,opt=value] or gpt (the floor); ratios are to prenorm")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--sizes", action="store_true", help=f"also at d_model {', '.join(map(str, SIZES))} (batch 1 only)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time; cpu: CPU time of this process (all its threads)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for line in H.describe(H.machine_info(torch.device("cpu"))):
        print(line)
    print(f"decode: eager, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds, {args.clock} clock")
    sizes = SIZES if args.sizes else (args.d_model,)
    for d in sizes:
        models = build_models(args, d)
        batches = [1] if args.sizes else [int(b) for b in args.batches.split(",")]
        rows = [r for b in batches for r in measure(args, d, b, models)]
        print(f"\nd_model {d}:")
        print_table(rows)
        for r in rows:
            kind = r["label"].split(" ")[0]
            if r["batch"] == 1 and kind in TARGETS and d == 256 and args.layers == 8:
                t = TARGETS[kind]
                print(f"{kind}: batch 1 decode {r['x_prenorm']:.3f}x PreNorm (target <= {t}) {'met' if r['x_prenorm'] <= t else 'NOT met'}")


if __name__ == "__main__":
    main()
