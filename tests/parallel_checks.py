"""Checks run inside every process of a gloo launch (tests/test_parallel_dist.py).

Each check trains a tiny LM for a few AdamW steps under a parallel layout and compares, step
by step, the loss and, at the end, every parameter with the same training in one process
(computed in the same process, from the same initial weights and batches).

The optimizer of these comparisons is SGD with momentum: linear in the gradients, so the
parameters after 3 steps compare the distributed gradients themselves (they agree with one
process's to ~1e-6 relative; summation order differs). AdamW normalises every gradient
element, so an element whose gradient is within float noise of zero can move by up to lr
(measured: up to 1e-4 after 3 steps at lr 3e-3); that is AdamW's conditioning, not the
parallel step's. The trainer's AdamW is exercised by the checkpoint check below (exact resume
on the same layout, the same loss on another) and by tests/test_parallel_train.py.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from resstream import LM, ModelConfig, ResidualConfig
from resstream.config import TrainConfig
from resstream.parallel.checkpoint import canonical_params, read_sharded, write_sharded
from resstream.parallel.config import ParallelConfig, check_layout
from resstream.parallel.mesh import build_mesh
from resstream.parallel.plan import transfers
from resstream.parallel.runtime import make_runtime
from resstream.train.optim import make_optimizer as trainer_optimizer
from resstream.train.optim import param_groups

B, T, VOCAB = 8, 16, 61
TC = TrainConfig(lr=3e-3, grad_clip=1.0, weight_decay=0.1)


def model_cfg(kind: str, n_layers: int, **opts) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, max_seq_len=T,
                       residual=ResidualConfig(kind=kind, **opts))


def initial_model(cfg: ModelConfig) -> LM:
    """Seeded weights, with random (non-zero) residual parameters so every residual path matters."""
    torch.manual_seed(0)
    model = LM(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.residual.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    xy = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    return xy[:, :-1], xy[:, 1:]


def make_optimizer(module, adamw: bool = False) -> torch.optim.Optimizer:
    """The trainer's parameter groups; SGD with momentum, or the trainer's AdamW."""
    if adamw:
        return trainer_optimizer(module, TC)
    return torch.optim.SGD(param_groups(module, TC.weight_decay), lr=0.05, momentum=0.9)


def single_process(model: LM, steps: range, opt_state: dict | None = None):
    """Losses of plain training and the model and optimizer afterwards."""
    opt = make_optimizer(model)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    losses = []
    for s in steps:
        x, y = batch(s)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TC.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model, opt


def parallel(model: LM, p: ParallelConfig, adamw: bool = False):
    mesh = build_mesh(p, torch.device("cpu"))
    check_layout(p, mesh.world, model.cfg.n_layers, B, 1, False)
    per = B // mesh.dp
    rt = make_runtime(model, p, mesh, torch.device("cpu"), torch.float32, (per // p.n_microbatches if p.pp > 1 else per, T))
    return rt, make_optimizer(rt.module, adamw)


def train_parallel(rt, opt, steps: range) -> list[float]:
    losses = []
    per = B // rt.replicas
    for s in steps:
        x, y = batch(s)
        rows = slice(rt.replica * per, (rt.replica + 1) * per)
        rt.start_step()
        loss = rt.forward_backward(x[rows], y[rows], 1.0, True)
        rt.finish_backward()
        rt.clip_grad_norm(TC.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(rt.mean_loss(loss))
    return losses


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def max_param_diff(module, ref: LM) -> float:
    """Largest |difference| over the parameters this rank holds, against the one-process model."""
    ref_params = canonical_params(ref)
    worst = 0.0
    for name, p in canonical_params(module).items():
        worst = max(worst, (full(p.detach()) - ref_params[name].detach()).abs().max().item())
    return worst


_REFERENCES: dict = {}


def reference(kind: str, opts: dict, n_layers: int, steps: int):
    """The one-process training of a model (computed once per process and model)."""
    key = (kind, tuple(sorted(opts.items())), n_layers, steps)
    if key not in _REFERENCES:
        cfg = model_cfg(kind, n_layers, **opts)
        losses, model, _ = single_process(initial_model(cfg), range(steps))
        _REFERENCES[key] = (losses, model)
    return _REFERENCES[key]


def check(kind: str, opts: dict, p: ParallelConfig, n_layers: int, steps: int = 3) -> dict:
    cfg = model_cfg(kind, n_layers, **opts)
    ref_losses, ref_model = reference(kind, opts, n_layers, steps)
    rt, opt = parallel(initial_model(cfg), p)
    losses = train_parallel(rt, opt, range(steps))
    out = {"loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)), "param_diff": max_param_diff(rt.module, ref_model),
           "losses": losses, "ref_losses": ref_losses}
    if p.pp > 1:
        out["traffic"] = rt.traffic()
        # totals over all ranks for one step: M microbatches through each of the dp pipelines
        n = p.n_microbatches * rt.replicas
        mb = (B // rt.replicas // p.n_microbatches, T)
        tensors, nbytes = transfers(rt.pipe.plan, *mb)
        out["plan"] = {"tensors": n * tensors, "bytes": n * nbytes,
                       "blocks": n * transfers(rt.pipe.plan, *mb, skip=frozenset({"b0"}), history_only=True)[0]}
    return out


LAYOUTS4 = {
    "pp4_v2_interleaved": ParallelConfig(pp=4, virtual_stages=2, schedule="interleaved_1f1b", microbatches=4),
    "pp2_dp2_1f1b": ParallelConfig(pp=2, schedule="1f1b", microbatches=2),
    "pp2_dp2_fsdp_gpipe": ParallelConfig(pp=2, schedule="gpipe", fsdp=True, microbatches=2),
}
KINDS = [("prenorm", {}), ("attnres", {}), ("block_attnres", {"block_size": 3}), ("mhc", {"n_streams": 2})]
# FSDP x PP, the layout beyond the required ones, runs for the kinds with the most residual state
FSDP_PP, FSDP_PP_KINDS = "pp2_dp2_fsdp_gpipe", ("block_attnres", "mhc")


def suite4(out: Path) -> dict:
    results = {}
    for kind, opts in KINDS:
        for name, p in LAYOUTS4.items():
            if name != FSDP_PP or kind in FSDP_PP_KINDS:
                results[f"{kind}/{name}"] = check(kind, opts, p, n_layers=8)
    # the paper's Fig. 3 setting: P = 4, V = 2, one block (S = 2 sublayers) per stage
    for cache in (True, False):
        p = ParallelConfig(pp=4, virtual_stages=2, schedule="interleaved_1f1b", microbatches=4, pp_cache=cache)
        results[f"fig3/cache={cache}"] = check("block_attnres", {"block_size": 2}, p, n_layers=8, steps=1)
    results["checkpoint"] = checkpoint_roundtrip(out)
    return results


def full_state(module, opt) -> dict[str, torch.Tensor]:
    """Full tensors of this rank's parameters and optimizer state, by checkpoint name."""
    params = canonical_params(module)
    names = {id(p): n for n, p in params.items()}
    out = {n: full(p.detach()).clone() for n, p in params.items()}
    out.update({f"{names[id(p)]}.{k}": full(v).clone() for p, st in opt.state.items() for k, v in st.items()})
    return out


def checkpoint_roundtrip(out: Path) -> dict:
    """AdamW, PP = 4 x V = 2: 2 steps, save. Read back on the same layout: the third step is
    bitwise the uninterrupted run's. Read on PP = 2 x DP = 2 with FSDP: every tensor arrives
    bitwise, and the third step's loss equals the uninterrupted run's."""
    from safetensors.torch import load_file, save_file

    cfg = model_cfg("block_attnres", 8, block_size=3)
    p1, p2 = LAYOUTS4["pp4_v2_interleaved"], LAYOUTS4[FSDP_PP]
    rt, opt = parallel(initial_model(cfg), p1, adamw=True)
    straight = train_parallel(rt, opt, range(3))
    straight_state = full_state(rt.module, opt)
    rt, opt = parallel(initial_model(cfg), p1, adamw=True)
    first = train_parallel(rt, opt, range(2))
    rank, folder = dist.get_rank(), out / "ckpt"
    save_file(full_state(rt.module, opt), str(out / f"saved{rank}.safetensors"))
    meta = write_sharded(folder, rt.module, opt)
    dist.barrier()
    saved = {}
    for r in range(dist.get_world_size()):
        saved.update(load_file(str(out / f"saved{r}.safetensors")))
    result = {}
    for name, p in (("same_layout", p1), ("other_layout", p2)):
        rt, opt = parallel(initial_model(cfg), p, adamw=True)
        read_sharded(folder, rt.module, opt, meta)
        loaded = full_state(rt.module, opt)
        result[f"{name}_read_exact"] = all(torch.equal(v, saved[k]) for k, v in loaded.items())
        third = train_parallel(rt, opt, range(2, 3))
        result[f"{name}_loss_diff"] = abs(third[0] - straight[2])
        if name == "same_layout":
            after = full_state(rt.module, opt)
            result["same_layout_bitwise"] = first + third == straight and all(torch.equal(v, straight_state[k]) for k, v in after.items())
    return result


def suite2(out: Path) -> dict:
    results = {}
    for kind, opts in KINDS:
        results[f"{kind}/fsdp"] = check(kind, opts, ParallelConfig(fsdp=True), n_layers=2)
        results[f"{kind}/pp2_gpipe"] = check(kind, opts, ParallelConfig(pp=2, schedule="gpipe", microbatches=4), n_layers=2)
    return results


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = (suite4 if world == 4 else suite2)(Path(out))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
