"""Pipeline traffic, naive vs cross-stage caching, next to the AttnRes paper's Eq. 7 and Eq. 8.

    .venv/bin/python benchmarks/pipeline_comm.py [--kind block_attnres] [--block-size 2]
        [--d-model 256] [--seq-len 128] [--microbatch 1] [--pp 2,4] [--virtual 1,2,4]

For each P (pipeline processes, one gloo launch of P processes on this machine) and V (virtual
stages per process), trains one step of an LM cut into C = P V stages of one transformer layer
each (n_layers = C), once with parallel.pp_cache=false and once with true, and reports what
the ranks' PipelineStages actually sent forward in that step (tensors and bytes, summed over
ranks; each is matched by one gradient sent back in backward), per microbatch.

With Block AttnRes and block_size 2 every stage completes one block: N_p = 1. "blocks" counts
the block sums b_1, b_2, ... that crossed a cut (what Eq. 7/8 count); the embedding b_0 crosses
too (every cut naive, the first P - 1 cached) and is in "tensors". Eq. 8 assumes a rank is
sent back the blocks it produced itself; ours keeps them, so cached = Eq. 8 - (V-1) P N_p.
Counts do not depend on the machine; the bytes scale with --d-model, --seq-len, --microbatch.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from resstream import LM, ModelConfig, ResidualConfig
from resstream.parallel.config import ParallelConfig
from resstream.parallel.mesh import build_mesh
from resstream.parallel.plan import cached_blocks, eq7, eq8, transfers
from resstream.parallel.runtime import make_runtime
from resstream.parallel.stage import probe_cuts


def measure(args, P: int, V: int, cache: bool) -> dict:
    C = P * V
    opts = {"block_size": args.block_size} if args.kind == "block_attnres" else {}
    cfg = ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=C, n_heads=4, max_seq_len=args.seq_len,
                      residual=ResidualConfig(kind=args.kind, **opts))
    # entries that exist before the first sublayer (the embedding's): not blocks, but they cross too
    stream = LM(cfg).residual
    born = {e.name for e in probe_cuts(stream, [0], args.d_model, torch.device("cpu"), torch.float32, torch.float32)[0]
            if e.history}
    torch.manual_seed(0)
    p = ParallelConfig(pp=P, virtual_stages=V, schedule="interleaved_1f1b" if V > 1 else "1f1b", microbatches=P,
                       pp_cache=cache)
    mesh = build_mesh(p, torch.device("cpu"))
    rt = make_runtime(LM(cfg), p, mesh, torch.device("cpu"), torch.float32, (args.microbatch, args.seq_len))
    x = torch.randint(0, 256, (args.microbatch * P, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    rt.start_step()
    rt.forward_backward(x[:, :-1], x[:, 1:], 1.0, True)
    t = rt.traffic()
    plan = rt.pipe.plan
    n, nbytes = transfers(plan, args.microbatch, args.seq_len)
    sent, sent_bytes = sum(t["pp_fwd_sent_tensors"]) / P, sum(t["pp_fwd_sent_bytes"]) / P  # per microbatch
    assert (sent, sent_bytes) == (n, nbytes), "measured traffic differs from the plan"
    return {"tensors": sent, "bytes": sent_bytes, "bwd_tensors": sum(t["pp_bwd_sent_tensors"]) / P,
            "blocks": transfers(plan, 1, 1, skip=frozenset(born), history_only=True)[0]}


def worker(rank: int, P: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=P)
    rows = [{"P": P, "V": V, "cache": cache, **measure(args, P, V, cache)} for V in args.virtual for cache in (False, True)]
    if rank == 0:
        Path(out, f"P{P}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="block_attnres")
    ap.add_argument("--block-size", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--microbatch", type=int, default=1)
    ap.add_argument("--pp", default="2,4")
    ap.add_argument("--virtual", default="1,2,4")
    args = ap.parse_args()
    args.virtual = [int(v) for v in args.virtual.split(",")]
    out = tempfile.mkdtemp()
    rows = []
    for P in (int(p) for p in args.pp.split(",")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(P, port, args, out), nprocs=P, join=True)
        rows += json.loads(Path(out, f"P{P}.json").read_text())
    n_p = 2 / args.block_size if args.kind == "block_attnres" else None
    print(f"kind {args.kind}, block_size {args.block_size}, one layer per stage (N_p = {n_p}); "
          f"per microbatch of [{args.microbatch}, {args.seq_len}] tokens, d_model {args.d_model}, fp32; "
          "forward (backward sends as many gradients)\n")
    print("| P | V | C | naive blocks | Eq. 7 | cached blocks | Eq. 8 | Eq. 8 - (V-1)P N_p | naive tensors | cached tensors "
          "| naive MiB | cached MiB | saved |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for naive, cached in zip(rows[::2], rows[1::2]):
        P, V = naive["P"], naive["V"]
        e7 = e8 = ours = "n/a"
        if n_p is not None:
            e7, e8, ours = (f"{f(P, V, n_p):g}" for f in (eq7, eq8, cached_blocks))
        mib = lambda r: r["bytes"] / 2**20  # noqa: E731
        print(f"| {P} | {V} | {P * V} | {naive['blocks']} | {e7} | {cached['blocks']} | {e8} | {ours} | {naive['tensors']:g} "
              f"| {cached['tensors']:g} | {mib(naive):.2f} | {mib(cached):.2f} | {1 - cached['bytes'] / naive['bytes']:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
