"""Cost of the residual mixing alone, next to the cost of one MLP and one attention sublayer.

    .venv/bin/python benchmarks/mixing_cost.py --threads 1 --clock cpu

Runs each residual stream's init / read / write / finish over L = 2 n_layers sublayers whose
"outputs" are a cheap stand-in, y_l = x_l * a_l with a learnable scalar a_l (one elementwise
pass, so gradients reach every source), forward and backward. The stand-in's own cost is
measured alone and subtracted. Prints ms per step of the stream, the same for one MLP and one
attention sublayer of the model, and the stream's share of a PreNorm training step measured
in the same rounds. Same interleaving, clock and thread options as step_time.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
import step_time as ST  # noqa: E402
import torch  # noqa: E402
from resstream.model.layers import MLP, Attention  # noqa: E402
from resstream.residual import build_residual  # noqa: E402


def stream_entry(shape: H.Shape, v: H.Variant, device: torch.device, emb: torch.Tensor, stand_in_only: bool = False):
    cfg = H.model_config(shape, v)
    stream = build_residual(cfg.residual, cfg.n_sublayers, cfg.d_model).to(device)
    with torch.no_grad():  # random queries: zero queries would make every softmax uniform
        for p in stream.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    scales = torch.ones(cfg.n_sublayers, device=device, requires_grad=True)
    L = cfg.n_sublayers

    mode = H.MIXING_MODE[v.path]
    # the output's gradient: a real tensor, as a final norm would give (not sum()'s stride-0 one)
    probe = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1)).to(device)

    def run() -> None:
        previous = H.compiled.get_mode()
        H.compiled.set_mode(mode or previous)
        try:
            body()
        finally:
            H.compiled.set_mode(previous)

    def body() -> None:
        e = emb.detach().requires_grad_()
        if stand_in_only:  # the stand-in sublayers chained on a plain tensor: their own cost
            h = e
            for l in range(L):
                h = h * scales[l]
            h.backward(probe)
            return
        state = stream.init(e)
        for l in range(L):
            x = stream.read(state, l)
            state = stream.write(state, l, x * scales[l])
        stream.finish(state).backward(probe)

    return run


def sublayer_entry(module: torch.nn.Module, x: torch.Tensor):
    def run() -> None:
        module(x.detach().requires_grad_()).sum().backward()

    return run


def main() -> None:
    ap = ST.build_parser(__doc__.splitlines()[0])
    ap.set_defaults(memory=False, steps=15, residuals="prenorm,attnres,block_attnres,mhc")
    args = ap.parse_args()
    shape, variants, device = ST.setup(args)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(shape.batch, shape.seq, shape.d_model, generator=g).to(device)
    cfg = H.model_config(shape, H.Variant("prenorm"))
    variants = [v for v in variants if v.kind != H.REFERENCE]
    entries = [(f"{v.label} [{v.path}]", "stream", stream_entry(shape, v, device, emb)) for v in variants]
    entries.append(("stand-in only", "-", stream_entry(shape, variants[0], device, emb, stand_in_only=True)))
    entries.append(("one MLP sublayer", "-", sublayer_entry(MLP(cfg).to(device), emb)))
    entries.append(("one attention sublayer", "-", sublayer_entry(Attention(cfg).to(device), emb)))
    batch = H.make_batch(shape, device)
    pre = H.build_runner(shape, H.Variant("prenorm"), device, batch)
    entries.append(("PreNorm training step", "-", pre.step_fn))
    ST.print_header(shape, H.machine_info(device), pre.flavour, args.clock, args.allocator)
    timings = H.interleaved_timing(entries, args.steps, args.warmup, device, clock=args.clock)
    by = {t.label: t for t in timings}
    stand_in = by["stand-in only"].median
    step = by["PreNorm training step"].median
    print(f"\nL = {cfg.n_sublayers} sublayers; stand-in sublayers alone: {1e3 * stand_in:.1f} ms (subtracted below)\n")
    print("| what | fwd+bwd ms (median) | IQR ms | share of a PreNorm step |")
    print("|---|---|---|---|")
    for t in timings:
        if t.label == "stand-in only":
            continue
        ms = t.median - (stand_in if t.path == "stream" else 0.0)
        name = f"{t.label} mixing (all {cfg.n_sublayers} + final)" if t.path == "stream" else t.label
        print(f"| {name} | {1e3 * ms:.1f} | {1e3 * t.iqr:.1f} | {100 * ms / step:.1f}% |")


if __name__ == "__main__":
    main()
