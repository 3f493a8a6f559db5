"""Tensor parallelism: PreNorm vs Ladder, decoding (or a training step), and how much of the
row-parallel all-reduce each one hides.

    python benchmarks/tp_decode.py                       # TP = 2 processes over gloo, CPU
    python benchmarks/tp_decode.py --mode train          # forward + backward + AdamW steps
    python benchmarks/tp_decode.py --device cuda         # TP over nccl, one GPU per process

The script starts its own ``--tp`` processes (or runs under ``torchrun``). Every kind gets
the same weights and is split by resstream.parallel.tensor; the kinds take turns step by
step, so a slow spell on a shared machine hits them alike, and "x prenorm" is the median of
paired per-step ratios. Decoding: a ``--prompt-len`` prompt is prefilled into a fresh KV
cache, then ``--new-tokens`` tokens are decoded one at a time (the model step only).

Communication, from a separate profiled round per kind (torch.profiler; rank-averaged):
- in flight: from each all-reduce's launch on the main thread to the end of its execution
  (gloo's worker-thread event ``gloo:all_reduce``; on CUDA the nccl kernel), summed, as a
  share of the wall time;
- waiting: the time the main thread spends blocked in ``wait_tensor`` on them (CUDA: the
  time an nccl kernel runs with no other kernel beside it);
- hidden: 1 - waiting / in flight, the share of the all-reduce time during which the process
  computed something else. PreNorm reads each sublayer output at once, so it hides only the
  little Python work between launching and reading; Ladder reads it one sublayer later;
- beside a matmul: how many all-reduces had a main-thread matmul running while in flight
  (the next sublayer's, for Ladder).
In train mode the forward's all-reduces (async for Ladder) and the backward's (synchronous
for every kind) are reported apart. ``--trace DIR`` writes rank 0's chrome traces, where the
all-reduce on gloo's thread can be seen beside the next sublayer's matmuls.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile, record_function

from resstream import LM
from resstream.model.config import ModelConfig
from resstream.model.generate import DecodeCache, prefill
from resstream.parallel.tensor import make_mesh, parallelize
from resstream.residual.config import ResidualConfig

KINDS = ("prenorm", "ladder")


def build(kind: str, args, device: torch.device, mesh=None) -> LM:
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=args.prompt_len + args.new_tokens + 1 if args.mode == "decode" else args.seq,
                      residual=ResidualConfig(kind=kind))
    torch.manual_seed(0)  # the same weights for every kind and on every rank
    model = LM(cfg).to(device)
    return parallelize(model, mesh) if mesh is not None else model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the work


class Decoder:
    """One decoding session: prefill once, then ``step()`` decodes the next token."""

    def __init__(self, model: LM, prompt: torch.Tensor, new: torch.Tensor) -> None:
        self.model, self.new, self.t = model, new, 0
        self.cache = DecodeCache(model, batch=prompt.shape[0])
        prefill(model, prompt, self.cache, last_only=True)

    def step(self) -> None:
        self.model.decode(self.new[:, self.t : self.t + 1], self.cache, last_only=True)
        self.t += 1


class Trainer:
    """Forward (marked for the profiler) + backward + AdamW on a fixed batch."""

    def __init__(self, model: LM, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model.train(), x, y
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(self) -> None:
        with record_function("forward"):
            _, loss = self.model(self.x, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def make_session(model: LM, args, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    if args.mode == "decode":
        prompt = torch.randint(0, args.vocab, (batch, args.prompt_len), generator=g).to(device)
        new = torch.randint(0, args.vocab, (batch, args.new_tokens), generator=g).to(device)
        return Decoder(model, prompt, new)
    x, y = torch.randint(0, args.vocab, (2, batch, args.seq), generator=g).to(device)
    return Trainer(model, x, y)


def n_steps(args) -> int:
    return args.new_tokens if args.mode == "decode" else args.train_steps


def timed_rounds(models: dict, args, batch: int, device) -> dict[str, list[float]]:
    """Seconds per step of each kind, the kinds taking turns every step; round 0 warms up."""
    times = {k: [] for k in models}
    for r in range(args.rounds + 1):
        sessions = {k: make_session(m, args, batch, device) for k, m in models.items()}
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        ctx = torch.no_grad() if args.mode == "decode" else nullcontext()
        with ctx:
            for t in range(n_steps(args)):
                for k in (order if t % 2 == 0 else order[::-1]):
                    sync(device)
                    t0 = time.perf_counter()
                    sessions[k].step()
                    sync(device)
                    if r > 0:
                        times[k].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------- communication


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def _spans(events, test) -> list[tuple[float, float]]:
    return sorted((e.time_range.start, e.time_range.end) for e in events if test(e))


def _inside(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _overlap(a: float, b: float, merged: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in merged)


def comm_profile(model: LM, args, batch: int, device, trace: str | None) -> dict:
    """Milliseconds of one profiled run of n_steps: wall, and per all-reduce its time in
    flight, the time it was exposed, and whether compute ran beside it; train mode splits
    forward / backward (by launch time). CPU (gloo): in flight = from the launch on the main
    thread to the end of the gloo:all_reduce event on gloo's thread, exposed = the main
    thread's wait_tensor, compute = main-thread matmuls. CUDA (nccl; not run here): in flight =
    the nccl kernel, exposed = its time without any other kernel running, compute = the other
    kernels."""
    session = make_session(model, args, batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ctx = torch.no_grad() if args.mode == "decode" else nullcontext()
    dist.barrier()
    with ctx, profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(n_steps(args)):
            session.step()
        sync(device)
        wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    ev = prof.events()
    launches = _spans(ev, lambda e: e.name == "c10d::allreduce_")
    if device.type == "cuda":
        is_nccl = lambda e: "nccl" in e.name.lower()  # noqa: E731
        gpu = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        flights = _spans(gpu, lambda e: is_nccl(e) and "allreduce" in e.name.lower().replace("_", ""))
        compute = _merge(_spans(gpu, lambda e: not is_nccl(e)))
        exposed = [(a, (b - a) - _overlap(a, b, compute)) for a, b in flights]  # (when, how long)
    else:
        waits = [e for e in ev if e.name.endswith("wait_tensor")]
        main = waits[0].thread if waits else None
        done = _spans(ev, lambda e: e.name == "gloo:all_reduce")  # executed in launch order
        flights = [(l0, b1) for (l0, _), (_, b1) in zip(launches, done)]
        compute = _merge(_spans(ev, lambda e: e.name in MATMULS and e.thread == main))
        exposed = [(a, b - a) for a, b in _spans(ev, lambda e: e.name.endswith("wait_tensor") and e.thread == main)]
    fwd = _spans(ev, lambda e: e.name == "forward")
    out = {"wall": wall * 1e3}
    for part in ("fwd", "bwd"):
        mine = (lambda t: not fwd or _inside(t, fwd)) if part == "fwd" else (lambda t: bool(fwd) and not _inside(t, fwd))
        picked = [f for f, (l0, _) in zip(flights, launches) if mine(l0)]
        out[f"n_{part}"] = len(picked)
        out[f"flight_{part}"] = sum(b - a for a, b in picked) / 1e3
        out[f"wait_{part}"] = sum(d for t, d in exposed if mine(t)) / 1e3
        out[f"beside_{part}"] = sum(_overlap(a, b, compute) > 0 for a, b in picked)
    return out


# ----------------------------------------------------------------------------- report


def report(args, batch: int, times: dict, comm: dict, baseline: float | None, world: int) -> None:
    unit = "token" if args.mode == "decode" else "step"
    per = batch if args.mode == "decode" else batch * args.seq
    parts = ["fwd"] if args.mode == "decode" else ["fwd", "bwd"]
    print(f"\n{args.mode}, batch {batch}, TP = {world} (shares of the profiled run's wall time, rank mean):")
    head = " | ".join(f"{p} all-reduce in flight | {p} waiting | {p} hidden | {p} beside a matmul" for p in parts)
    print(f"| kind | ms/{unit} | x prenorm | tokens/s | {head} |")
    print("|---|---:|---:|---:|" + "---:|" * 4 * len(parts))
    for k, ts in times.items():
        med = statistics.median(ts)
        ratio = statistics.median(a / b for a, b in zip(ts, times["prenorm"]))
        c = comm[k]
        cells = []
        for p in parts:
            flight, wait = c[f"flight_{p}"], c[f"wait_{p}"]
            hid = f"{max(0.0, 1 - wait / flight):.0%}" if flight > 0 else "n/a"
            cells.append(f"{flight / c['wall']:.0%} | {wait / c['wall']:.0%} | {hid} | {c[f'beside_{p}']:.0f}/{c[f'n_{p}']:.0f}")
        print(f"| {k} | {med * 1e3:.2f} | {ratio:.3f} | {per / med:,.0f} | {' | '.join(cells)} |")
    if baseline is not None:
        print(f"| prenorm, 1 process (no TP) | {baseline * 1e3:.2f} | | {per / baseline:,.0f} |")


def worker(rank: int, args) -> None:
    if "RANK" not in os.environ:  # started by this script, not torchrun
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port), RANK=str(rank),
                          WORLD_SIZE=str(args.tp), LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = make_mesh(device.type, world)["tp"]
    models = {k: build(k, args, device, mesh) for k in KINDS}
    if rank == 0:
        print(f"tp_{args.mode}: torch {torch.__version__}, {args.device} ({'nccl' if device.type == 'cuda' else 'gloo'}), "
              f"TP = {world}, {args.threads} thread(s)/process, eager; layers={args.layers} d_model={args.d_model} "
              f"heads={args.heads} vocab={args.vocab} " + (f"prompt={args.prompt_len} new={args.new_tokens}" if args.mode == "decode"
              else f"seq={args.seq} steps={args.train_steps}") + f" rounds={args.rounds}")
    for batch in args.batches:
        times = timed_rounds(models, args, batch, device)
        comm_local = {k: comm_profile(m, args, batch, device, args.trace and rank == 0 and
                                      os.path.join(args.trace, f"tp_{args.mode}_{k}_b{batch}_rank0.json"))
                      for k, m in models.items()}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, comm_local)
        comm = {k: {f: statistics.mean(g[k][f] for g in gathered) for f in comm_local[k]} for k in KINDS}
        baseline = None
        if rank == 0 and not args.no_baseline:  # the others wait at the barrier meanwhile
            single = {"prenorm": build("prenorm", args, device)}
            baseline = statistics.median(timed_rounds(single, args, batch, device)["prenorm"])
        dist.barrier()
        if rank == 0:
            report(args, batch, times, comm, baseline, world)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["decode", "train"], default="decode")
    ap.add_argument("--tp", type=int, default=2, help="processes to start (ignored under torchrun)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,8 decode; 8 train)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128, help="train mode: sequence length")
    ap.add_argument("--train-steps", type=int, default=3, help="train mode: steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--trace", default=None, help="folder for rank 0's chrome traces")
    ap.add_argument("--no-baseline", action="store_true", help="skip the single-process PreNorm row")
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in (args.batches or ("1,8" if args.mode == "decode" else "8")).split(",")]
    if args.trace:
        os.makedirs(args.trace, exist_ok=True)
    if "RANK" in os.environ:
        worker(int(os.environ["RANK"]), args)
    else:
        mp.spawn(worker, args=(args,), nprocs=args.tp, join=True)


if __name__ == "__main__":
    main()
