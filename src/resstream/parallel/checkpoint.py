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

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

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


def write_sharded(folder: Path, module: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Write this rank's part into ``folder`` (collective: every rank calls it with the same
    folder). Returns the optimizer settings to keep beside it (JSON-able)."""
    model_sd = {n: p.detach() for n, p in canonical_params(module).items()}
    opt_sd = _optimizer_tensors(module, opt)
    if not _distributed() or dist.get_rank() == 0:
        opt_sd["rng.cpu"] = torch.get_rng_state()
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
    dcp.load(params, storage_reader=HuggingFaceStorageReader(str(folder / MODEL_DIR)), no_dist=not _distributed())
    if opt is None:
        return
    _adamw_state(opt)
    tensors = _optimizer_tensors(module, opt)
    tensors["rng.cpu"] = torch.empty_like(torch.get_rng_state())
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(folder / OPTIM_DIR)), no_dist=not _distributed())
    for group, saved in zip(opt.param_groups, meta["param_groups"], strict=True):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    torch.set_rng_state(tensors["rng.cpu"])
