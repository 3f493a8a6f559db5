"""Decode latency and prefill throughput per residual kind, as ratios to PreNorm.

Batch 1: prefill a prompt of --prompt-len tokens into a fresh KV cache (tokens/s), then decode
--new-tokens tokens one at a time (ms/token; the model step only, no sampling). Every kind
gets the same non-residual weights and runs in this one process, interleaved kind by kind in
each round, after a warm-up round; medians over rounds (prefill) and over every step of every
round (decode). Eager PyTorch, no compilation.

    python benchmarks/decode.py --residuals prenorm,attnres,block_attnres:block_size=4 --layers 8 --d-model 256

Residuals are specs ``kind[:option=value,option=value]`` (the grammar of ``resstream compare``);
``--block-size`` applies to every kind with a block_size option that does not set its own.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resstream import LM, ModelConfig, ResidualConfig
from resstream.model.generate import DecodeCache, prefill
from resstream.residual import get_kind, parse_specs


def build(residual: dict, args, base_state: dict | None) -> LM:
    res = dict(residual)
    if "block_size" in get_kind(res["kind"]).option_defaults():
        res.setdefault("block_size", args.block_size)
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=args.prompt_len + args.new_tokens, residual=ResidualConfig(**res))
    torch.manual_seed(0)
    model = LM(cfg).eval()
    if base_state is not None:
        model.load_state_dict(base_state, strict=False)
    with torch.no_grad():  # non-trivial mixing weights, as after training
        for p in model.residual.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@torch.no_grad()
def one_round(models: dict[str, LM], order: list[str], prompt: torch.Tensor, new: torch.Tensor, clock):
    """Seconds of each kind's prefill, and of each of its decode steps. The kinds take turns at
    every step, so a slow spell on this shared machine hits all of them alike."""
    caches, prefill_s, step_s = {}, {}, {k: [] for k in order}
    for k in order:
        caches[k] = DecodeCache(models[k], batch=1)
        t0 = clock()
        prefill(models[k], prompt, caches[k], last_only=True)
        prefill_s[k] = clock() - t0
    for t in range(new.shape[1]):
        for k in (order if t % 2 == 0 else order[::-1]):
            t0 = clock()
            models[k].decode(new[:, t : t + 1], caches[k])
            step_s[k].append(clock() - t0)
    return prefill_s, step_s


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched (views included): at batch 1 and one token, each
    costs a roughly fixed few microseconds of CPU overhead whatever its size."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def ops_per_token(model: LM, prompt: torch.Tensor, token: torch.Tensor) -> int:
    cache = DecodeCache(model, batch=1)
    prefill(model, prompt, cache, last_only=True)
    with CountOps() as counter:
        model.decode(token, cache)
    return counter.n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--residuals", default="prenorm,attnres,block_attnres",
                    help="comma-separated kind[:opt=value,opt=value]; prenorm (plain) is the baseline if listed, else the first")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--block-size", type=int, default=4, help="Block AttnRes sublayers per block S")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time; cpu: CPU time of this process (all its threads), steadier when others share the cores")
    args = ap.parse_args(argv)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = dict(parse_specs(args.residuals))  # label -> residual table
    kinds = list(specs)
    if "prenorm" in kinds:  # the baseline goes first
        kinds.remove("prenorm")
        kinds.insert(0, "prenorm")

    base = build({"kind": "prenorm"}, args, None).state_dict()
    models = {k: build(specs[k], args, base) for k in kinds}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=g)
    new = torch.randint(0, args.vocab, (1, args.new_tokens), generator=g)

    prefills = {k: [] for k in kinds}
    steps = {k: [] for k in kinds}
    for r in range(args.rounds + 1):
        pre, dec = one_round(models, kinds if r % 2 == 0 else kinds[::-1], prompt, new, clock)
        if r > 0:  # round 0 warms up
            for k in kinds:
                prefills[k].append(pre[k])
                steps[k].extend(dec[k])

    print(f"decode benchmark: eager, torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, "
          f"layers={args.layers} d_model={args.d_model} heads={args.heads} vocab={args.vocab} "
          f"prompt={args.prompt_len} new={args.new_tokens} rounds={args.rounds} block_size={args.block_size} clock={args.clock}")
    # Ratios are medians of paired ratios (same round, same step), robust to drifting load.
    base_k = kinds[0]
    print(f"| kind | decode ms/token | decode vs {base_k} | aten ops/token | prefill tokens/s | prefill time vs {base_k} |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in kinds:
        dec_ratio = statistics.median(a / b for a, b in zip(steps[k], steps[base_k]))
        pre_ratio = statistics.median(a / b for a, b in zip(prefills[k], prefills[base_k]))
        dec, pre = statistics.median(steps[k]), statistics.median(prefills[k])
        n_ops = ops_per_token(models[k], prompt, new[:, :1])
        block = models[k].cfg.residual.to_dict().get("block_size")
        label = k + (f" (S={block})" if block is not None and "block_size" not in specs[k] else "")
        print(f"| {label} | {dec * 1e3:.3f} | {dec_ratio:.3f}x | {n_ops} | {args.prompt_len / pre:,.0f} | {pre_ratio:.3f}x |")

if __name__ == "__main__":
    main()
