"""Checkpoints: safetensors + a small JSON, written atomically, verified on load.

Layout: RUN_DIR/checkpoints/step_000100/{model.safetensors, optimizer.safetensors, state.json}
(the other files of a run folder: runs/folder.py). A run whose parameters are split over
processes (FSDP, pipeline) writes a sharded checkpoint instead: every rank writes its part
with torch.distributed.checkpoint into model/ and optimizer/ (safetensors, see
parallel/checkpoint.py) and state.json says ``"format": "sharded"``.

A checkpoint folder is built under a temporary name, every file fsynced, then renamed into
place, so a run killed while saving keeps its previous good checkpoint. state.json holds
the SHA-256 of both tensor files; a truncated or corrupt checkpoint is detected, reported
in one line, and the previous good one is used. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from resstream.parallel.checkpoint import write_sharded
from resstream.runs.folder import fsync_dir

CKPT_DIR = "checkpoints"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
SHARDED = "sharded"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


# ----------------------------------------------------------------------------- hashes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- optimizer state


def optimizer_to_tensors(sd: dict) -> tuple[dict, dict]:
    """Flatten an optimizer state dict into named tensors plus JSON-able group settings."""
    tensors = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def _like(t: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """``t`` split like ``target`` when that is a DTensor of the same shape. Every process has
    read the same full tensor, so each keeps its own slice without communicating."""
    if isinstance(target, DTensor) and t.shape == target.shape:
        return distribute_tensor(t.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    return t


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Load what optimizer_to_tensors saved; state shaped like a DTensor parameter (a
    tensor-parallel model) is split like that parameter."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = _like(t, params[int(idx)] if int(idx) < len(params) else None)
    groups = meta["param_groups"]
    for g in groups:  # JSON turned tuples into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- save / load


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:06d}"


def save_checkpoint(run_dir: Path, step: int, model_sd: dict, opt_sd: dict, extra: dict, keep_last: int) -> Path:
    """Write checkpoint ``step`` (a model's and an optimizer's state dicts, full tensors)
    atomically and prune all but the last ``keep_last``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # Tied weights appear twice in the state dict; store each storage once.
    model_tensors, seen = {}, {}
    for k, v in model_sd.items():
        key = (v.data_ptr(), v.shape)
        if key in seen:
            continue
        seen[key] = k
        model_tensors[k] = v.detach().cpu().contiguous()
    opt_tensors, opt_meta = optimizer_to_tensors(opt_sd)
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng.cuda{i}"] = s
    for name, tensors in zip(TENSOR_FILES, (model_tensors, {**opt_tensors, **rng})):
        save_file(tensors, str(tmp / name))
    _seal(tmp, final, {"step": step, **extra, "optimizer": opt_meta}, keep_last)
    return final


def _seal(tmp: Path, final: Path, state: dict, keep_last: int) -> None:
    """fsync every file of ``tmp``, record their SHA-256 in state.json, rename ``tmp`` to
    ``final`` and prune all but the last ``keep_last`` checkpoints."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for path in files:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
    state = {**state, "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in files}}
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in {p.parent for p in files} | {tmp}:
        fsync_dir(d)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    for old in list_checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(run_dir: Path, step: int, module: torch.nn.Module, opt: torch.optim.Optimizer,
                            extra: dict, keep_last: int) -> Path:
    """Every rank calls it: each writes the parameters and optimizer state it holds into one
    temporary folder, then rank 0 seals it as save_checkpoint does (hashes, state.json, rename)."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    root = Path(run_dir) / CKPT_DIR
    final = step_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}"  # one name for every rank
    if main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    opt_meta = write_sharded(tmp, module, opt)
    _barrier()
    if main:
        _seal(tmp, final, {"step": step, **extra, "format": SHARDED, "optimizer": opt_meta}, keep_last)
    _barrier()
    return final


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def _tensor_files(path: Path, state: dict) -> list[str]:
    """The files whose hashes a checkpoint must record: both tensor files, or for a sharded
    one every file of its model/ and optimizer/ folders (a stray shard would be read too)."""
    if state.get("format") != SHARDED:
        return list(TENSOR_FILES)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "state.json")


def _verify(path: Path, state: dict, trust_unverified: bool, warn) -> None:
    """Every tensor file must match its recorded SHA-256. A checkpoint without the hashes is
    refused unless the user asks to trust it: deleting them must not turn verification off."""
    hashes = state.get("sha256")
    hashes = hashes if isinstance(hashes, dict) else {}
    files = _tensor_files(path, state)
    if state.get("format") == SHARDED and not files:
        raise CheckpointError(f"checkpoint {path} is sharded but holds no tensor files")
    missing = [n for n in files if not isinstance(hashes.get(n), str)]
    if missing and not trust_unverified:
        raise CheckpointError(f"checkpoint {path} has no recorded SHA-256 for {missing[0]}, so it cannot be verified; "
                              "pass --trust-unverified to load it anyway")
    if missing:
        warn(f"warning: loading {path} unverified (--trust-unverified): no SHA-256 recorded for {', '.join(missing)}")
    for name in files:
        if name in hashes and _sha256(path / name) != hashes[name]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its recorded SHA-256")


def nonfinite_tensor(tensors: dict) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def read_checkpoint(path: Path, trust_unverified: bool = False, warn=None) -> tuple[dict, dict | None, dict | None]:
    """Verify and read one checkpoint folder: (state, model tensors, optimizer tensors). A
    sharded checkpoint (state["format"] == "sharded") is verified here and read later, into
    whatever holds its tensors (parallel.checkpoint.read_sharded): (state, None, None)."""
    warn = warn or _stderr
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"checkpoint {path} has a damaged state.json (no step)")
        _verify(path, state, trust_unverified, warn)
        if state.get("format") == SHARDED:
            return state, None, None
        model_sd = load_file(str(path / "model.safetensors"))
        opt_sd = load_file(str(path / "optimizer.safetensors"))
    except CheckpointError:
        raise
    except Exception as e:  # OSError, JSON, or safetensors' own errors on truncation
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
    bad = nonfinite_tensor(model_sd) or nonfinite_tensor(opt_sd)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} holds non-finite values ({bad}); it is not a good checkpoint")
    return state, model_sd, opt_sd


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def latest_good_checkpoint(run_dir: Path, warn=None, trust_unverified: bool = False) -> tuple[Path, dict, dict, dict] | None:
    """The newest checkpoint that verifies and holds finite values; each bad one is reported
    (to stderr by default, never into generated text) and skipped."""
    warn = warn or _stderr
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return (path, *read_checkpoint(path, trust_unverified, warn))
        except CheckpointError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None


def load_model_state(model: torch.nn.Module, model_sd: dict) -> None:
    """Load tensors saved by save_checkpoint (tied weights stored once) into a model, plain or
    split into DTensors (each process keeps its slice of the full tensor)."""
    expected = model.state_dict()
    wrong = [k for k, v in model_sd.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"checkpoint does not fit the model: {k} is {tuple(model_sd[k].shape)} in the checkpoint, "
                              f"{tuple(expected[k].shape)} in the model (was the run's config.json edited?)")
    missing, unexpected = model.load_state_dict({k: _like(v, expected.get(k)) for k, v in model_sd.items()}, strict=False)
    tied = {"head.weight"} if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
