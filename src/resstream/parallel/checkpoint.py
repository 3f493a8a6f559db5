"""Sharded checkpoints with torch.distributed.checkpoint (DCP), stored as safetensors.

Every rank writes the parameters and AdamW state it holds (FSDP shards, pipeline stages) into
``model/`` and ``optimizer/`` with DCP's Hugging Face storage: safetensors files whose header
records where each shard sits in the full tensor, so nothing is pickled. Reading builds the
same names from whatever the reader holds and DCP copies the overlapping pieces in: another
world size, another pipeline layout, or one process with the whole LM (no process group).

Names are the LM's; a tied head is saved and read as ``embed.weight`` (pipelines hold the
tied weight twice, on the first and the last stage). AdamW state is ``{name}.{key}``.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.tensor import DTensor, distribute_tensor

MODEL_DIR, OPTIM_DIR = "model", "optimizer"


def canonical_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's parameters by LM name, the tied head under ``embed.weight``."""
    tied = getattr(getattr(module, "cfg", None), "tie_embeddings", False)
    out: dict[str, nn.Parameter] = {}
    for name, p in module.named_parameters():
        out.setdefault("embed.weight" if tied and name == "head.weight" else name, p)
    return out


def _optimizer_tensors(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    names = {id(p): n for n, p in canonical_params(module).items()}
    return {f"{names[id(p)]}.{k}": v for p, st in opt.state.items() for k, v in st.items() if isinstance(v, Tensor)}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _alone_is_fine():
    """DCP warns that it assumes one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def write_sharded(folder: Path, module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Write this rank's part into ``folder`` (collective: every rank calls it with the same
    folder). Returns the optimizer settings to keep beside it (JSON-able)."""
    model_sd = {n: p.detach() for n, p in canonical_params(module).items()}
    opt_sd = _optimizer_tensors(module, opt)
    if not _distributed() or dist.get_rank() == 0:
        opt_sd["rng.cpu"] = torch.get_rng_state()
    with _alone_is_fine():
        for sub, sd in ((MODEL_DIR, model_sd), (OPTIM_DIR, opt_sd)):
            dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(folder / sub), save_distributed=True),
                     no_dist=not _distributed())
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    return {"param_groups": groups}


def _adamw_state(opt: torch.optim.Optimizer) -> None:
    """Empty AdamW state for every parameter, to be filled in place by a read."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def read_sharded(folder: Path, module: nn.Module, opt: torch.optim.Optimizer | None = None,
                 meta: dict | None = None) -> None:
    """Fill ``module`` (and ``opt`` with its settings ``meta``) from a sharded checkpoint, each
    rank reading what it holds; the CPU RNG state is restored too. Collective under a process
    group; also works in a single process on a whole LM."""
    params = {n: p.detach() for n, p in canonical_params(module).items()}
    with _alone_is_fine():
        dcp.load(params, storage_reader=HuggingFaceStorageReader(str(folder / MODEL_DIR)), no_dist=not _distributed())
    if opt is None:
        return
    _adamw_state(opt)
    tensors = _optimizer_tensors(module, opt)
    tensors["rng.cpu"] = torch.empty_like(torch.get_rng_state())
    with _alone_is_fine():
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / OPTIM_DIR)), no_dist=not _distributed())
    _group_settings(opt, meta)
    torch.set_rng_state(tensors["rng.cpu"])


def _group_settings(opt: torch.optim.Optimizer, meta: dict) -> None:
    for group, saved in zip(opt.param_groups, meta["param_groups"], strict=True):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})


@torch.no_grad()
def _copy_full(dst: Tensor, full: Tensor) -> None:
    """Copy a whole tensor into dst, or into dst's shard when dst is a DTensor."""
    full = full.to(device=dst.device, dtype=dst.dtype)
    if isinstance(dst, DTensor):
        dst.to_local().copy_(distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None).to_local())
    else:
        dst.copy_(full)


def load_full(module: nn.Module, opt: torch.optim.Optimizer, model_sd: dict[str, Tensor],
              opt_state: dict[str, dict[str, Tensor]], meta: dict) -> None:
    """Fill a (sharded or partial) module and its AdamW from whole tensors by LM name (a plain
    checkpoint of a one-process or DDP run): each rank keeps its shards of what it holds."""
    params = canonical_params(module)
    for name, p in params.items():
        _copy_full(p, model_sd[name])
    _adamw_state(opt)
    names = {id(p): n for n, p in params.items()}
    for p, st in opt.state.items():
        for key, t in st.items():
            _copy_full(t, opt_state[names[id(p)]][key])
    _group_settings(opt, meta)
