"""Resuming a run from its newest good checkpoint, whatever layout wrote it and whatever
layout reads it: a sharded checkpoint (FSDP / pipeline run) is read by each rank into what it
holds; a plain one (one process or DDP) is loaded whole, and split by a sharded runtime."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from resstream.model.config import ModelConfig
from resstream.parallel.checkpoint import load_full, read_sharded
from resstream.runs.checkpoint import SHARDED, latest_good_checkpoint, load_model_state, optimizer_from_tensors
from resstream.train.optim import optimizer_index_names
from resstream.train.setup import Session


def _find(s: Session, trust_unverified: bool):
    """(path, state, model tensors, optimizer tensors) of the newest good checkpoint, or None.
    Under a sharded runtime rank 0 verifies the files and tells the others which one."""
    quiet = None if s.d.is_main else (lambda m: None)
    if not (s.rt.sharded and s.d.enabled):
        return latest_good_checkpoint(s.out, warn=quiet, trust_unverified=trust_unverified)
    found = latest_good_checkpoint(s.out, trust_unverified=trust_unverified) if s.d.is_main else None
    box = [None if found is None else str(found[0])]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None or s.d.is_main:
        return found
    path = Path(box[0])
    state = json.loads((path / "state.json").read_text())
    if state.get("format") == SHARDED:
        return path, state, None, None
    return path, state, load_file(str(path / "model.safetensors")), load_file(str(path / "optimizer.safetensors"))


def load_checkpoint(s: Session, trust_unverified: bool = False) -> dict | None:
    """Fill the session's model and optimizer (and the CPU RNG) from the newest good
    checkpoint; returns its state.json (step, logging window, ...), None when there is none."""
    found = _find(s, trust_unverified)
    if found is None:
        return None
    path, state, model_sd, opt_sd = found
    if model_sd is None:
        read_sharded(path, s.rt.module, s.opt, state["optimizer"])
        return state
    rng = opt_sd.pop("rng.cpu")
    opt_sd = {k: v for k, v in opt_sd.items() if not k.startswith("rng.")}
    if not s.rt.sharded:
        load_model_state(s.rt.module, model_sd)
        optimizer_from_tensors(s.opt, opt_sd, state["optimizer"])
    else:  # a plain checkpoint, split over this layout: optimizer state by parameter name
        names = optimizer_index_names(ModelConfig.from_dict(s.model_meta["model"]), s.cfg.train.weight_decay)
        by_name: dict[str, dict] = {}
        for key, t in opt_sd.items():
            _, idx, what = key.split(".", 2)
            by_name.setdefault(names[int(idx)], {})[what] = t
        load_full(s.rt.module, s.opt, model_sd, by_name, state["optimizer"])
    torch.set_rng_state(rng)
    return state
