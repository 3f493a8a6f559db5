"""The lean inference paths (``ResidualStream.inference``, what LM.decode runs): each against the
kind's float64 reference, with buffers reused across calls of different inputs, and the number
of operators a decoding step costs beyond PreNorm's."""
from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import KIND_CASES, case_id, randomize_residual, rel_err, tiny_cfg
from resstream import LM
from resstream.model.generate import DecodeCache, prefill
from resstream.residual import ResidualStream, compiled, get_kind, native

# the cases whose stream has its own lean path (the others, ablation variants included, decode
# through their training path)
LEAN = [c for c in KIND_CASES if type(LM(tiny_cfg(c[0], **c[1])).residual).inference is not ResidualStream.inference]


def _run_lean(model: LM, emb: torch.Tensor, scratch: dict) -> torch.Tensor:
    stream = model.residual.inference(scratch)
    state = stream.init(emb)
    for l, f in enumerate(model.sublayers):
        state = stream.write(state, l, f(stream.read(state, l)))
    return stream.finish(state).clone()  # the lean result lives in a reused buffer


def test_the_depth_mixing_kinds_have_a_lean_path():
    kinds = {k for k, _ in LEAN}
    assert {"attnres", "block_attnres", "depth_swa", "denseformer"} <= kinds


@pytest.mark.parametrize("n_layers", [3, 4])
@pytest.mark.parametrize("kind,opts", LEAN, ids=[case_id(c) for c in LEAN])
def test_lean_path_matches_reference(kind, opts, n_layers):
    model = LM(tiny_cfg(kind, n_layers=n_layers, **opts)).double()
    randomize_residual(model)
    params = dict(model.residual.named_parameters())
    reference = get_kind(kind).reference
    scratch: dict = {}
    with torch.inference_mode():
        for shape in [(2, 5), (2, 5), (1, 1), (2, 5)]:  # buffers made once per shape, then reused
            emb = model.embed(torch.randint(0, 61, shape))
            h = _run_lean(model, emb, scratch)
            h_ref, _ = reference(emb, list(model.sublayers), params, model.cfg.residual)
            assert rel_err(h, h_ref) < 1e-12, shape
    assert len(scratch) == 2


@pytest.mark.parametrize("mode", ["auto", "off"])  # float32 on a CPU: the native buffers, then PyTorch's
@pytest.mark.parametrize("kind,opts", LEAN, ids=[case_id(c) for c in LEAN])
def test_lean_path_float32_matches_training_path(kind, opts, mode):
    model = LM(tiny_cfg(kind, n_layers=3, **opts))
    randomize_residual(model)
    idx = torch.randint(0, 61, (3, 7))
    with torch.no_grad():
        full = model(idx)
    previous = compiled.get_mode()
    compiled.set_mode(mode)
    try:
        cache = DecodeCache(model, batch=3)
        steps = [prefill(model, idx[:, :4], cache)] + [model.decode(idx[:, t : t + 1], cache) for t in range(4, 7)]
    finally:
        compiled.set_mode(previous)
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5
    if kind != "denseformer":  # the AttnRes family's buffers (attnres/lean.py)
        buffers = {type(b).__name__ for b in cache.residual_scratch.values()}
        native_used = mode == "auto" and native.library()[0] is not None
        assert buffers == ({"_NativeBuffers"} if native_used else {"_Buffers"}), buffers


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(model: LM) -> collections.Counter:
    cache = DecodeCache(model, batch=1)
    prefill(model, torch.randint(0, 61, (1, 4)), cache)
    model.decode(torch.randint(0, 61, (1, 1)), cache)  # first step at batch 1: buffers and views made
    with _CountOps() as c:
        model.decode(torch.randint(0, 61, (1, 1)), cache)
    return c.ops


@pytest.mark.parametrize("mode", ["auto", "off"])
@pytest.mark.parametrize("kind,per_sublayer", [("attnres", 5), ("block_attnres", 5), ("depth_swa", 5), ("denseformer", 2)])
def test_decoding_step_costs_a_few_operators_per_sublayer(kind, per_sublayer, mode):
    """A steady decoding step: at most ``per_sublayer`` operators per sublayer beyond PreNorm's
    one add (AttnRes: a copy, RMSNorm and a matmul to write a source, a softmax and a matmul to
    read), plus a constant for the queries; no autograd Functions, views made once. With the
    native kernels (mode auto on a CPU) the AttnRes family's reads and logits are kernel calls:
    one operator per sublayer (the copy or add into the slot) where PreNorm has its add, and
    DenseFormer's weighted averages are kernel calls too (its copies of block outputs remain)."""
    if mode == "auto" and native.library()[0] is not None:  # DenseFormer: the copy into a slot
        per_sublayer = 1 if kind == "denseformer" else 0
    previous = compiled.get_mode()
    compiled.set_mode(mode)
    try:
        _check_ops(kind, per_sublayer)
    finally:
        compiled.set_mode(previous)


def _check_ops(kind: str, per_sublayer: int) -> None:
    base = _ops_per_step(LM(tiny_cfg("prenorm", n_layers=4)))
    ops = _ops_per_step(LM(tiny_cfg(kind, n_layers=4)))
    L = 8
    assert sum(ops.values()) - sum(base.values()) <= per_sublayer * L + 3, ops - base
