"""Pipeline cuts in one process: every residual kind's stage_boundary/from_boundary, the cut
plan with and without cross-stage caching, and the stage bodies run as a pipeline would run
them (detached inputs, per-rank stores, backward stage by stage) against the uncut model."""
from __future__ import annotations

import pytest
import torch

from helpers import KIND_CASES, case_id, randomize_residual, rel_err, tiny_cfg
from resstream import LM
from resstream.parallel.plan import cached_blocks, eq7, eq8, plan_pipeline, stage_layers, transfers
from resstream.parallel.stage import RankStore, StageBody, probe_cuts


def build_plan(model: LM, P: int, V: int, cache: bool):
    bounds = stage_layers(model.cfg.n_layers, P * V)
    cuts = probe_cuts(model.residual, [lo for lo, _ in bounds[1:]], model.cfg.d_model, torch.device("cpu"),
                      torch.float32, torch.float32)
    return plan_pipeline(cuts, bounds, P, cache)


def run_pipeline(model: LM, plan, idx: torch.Tensor, tgt: torch.Tensor, n_mb: int) -> torch.Tensor:
    """Forward every microbatch through the stages, then backward in reverse stage order, as
    torch.distributed.pipelining does: each stage's inputs are fresh leaves, its input
    gradients are their .grad after backward on its outputs. Returns the mean loss."""
    P = max(s.rank for s in plan) + 1
    stores = [RankStore() for _ in range(P)]
    bodies = [StageBody(model, s, len(plan), stores[s.rank]) for s in plan]
    lowest = {r: min(s.index for s in plan if s.rank == r) for r in range(P)}
    total = 0.0
    for mb, (x, y) in enumerate(zip(idx.chunk(n_mb), tgt.chunk(n_mb))):
        saved, carried = [], (x,)
        for body in bodies:
            inputs = carried if body.is_first else tuple(t.detach().requires_grad_() for t in carried)
            body.store.mb = mb
            out = body(*inputs)
            saved.append((inputs, out))
            carried = out
        loss = torch.nn.functional.cross_entropy(carried.flatten(0, 1), y.flatten()) / n_mb
        total += loss.item()
        grads = None
        for body, (inputs, out) in reversed(list(zip(bodies, saved))):
            if body.is_last:
                torch.autograd.backward(loss)
            else:
                torch.autograd.backward(out, grads)
            grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs) if not body.is_first else None
            if body.plan.index == lowest[body.plan.rank]:
                body.store.release(mb)
    assert all(len(s) == 0 for s in stores)
    return torch.tensor(total)


@pytest.mark.parametrize("case", KIND_CASES, ids=case_id)
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "naive"])
def test_stages_reproduce_the_model(case, cache):
    kind, opts = case
    torch.manual_seed(0)
    model = LM(tiny_cfg(kind, n_layers=5, **opts))
    randomize_residual(model)
    idx, tgt = torch.randint(0, 61, (4, 9)), torch.randint(0, 61, (4, 9))
    _, loss = model(idx, tgt)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plan = build_plan(model, P=2, V=2, cache=cache)  # 4 stages of 2, 1, 1, 1 layers
    got = run_pipeline(model, plan, idx, tgt, n_mb=2)
    assert abs(got.item() - loss.item()) < 1e-5
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert rel_err(p.grad, ref[n]) < 1e-5, n


def test_stage_layers_cover_the_model_in_whole_layers():
    assert stage_layers(8, 8) == [(2 * i, 2 * i + 2) for i in range(8)]
    assert stage_layers(5, 3) == [(0, 4), (4, 8), (8, 10)]
    for n, s in [(7, 4), (12, 5), (3, 3)]:
        b = stage_layers(n, s)
        assert b[0][0] == 0 and b[-1][1] == 2 * n and all(hi > lo and lo % 2 == 0 for lo, hi in b)
        assert all(b[i][1] == b[i + 1][0] for i in range(s - 1))


@pytest.mark.parametrize("P,V", [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (2, 4)])
def test_block_transfers_match_eq7_and_the_cached_count(P, V):
    """Block AttnRes with one block (S = 2 sublayers = one layer) per stage: N_p = 1. The naive
    cuts carry Eq. 7's blocks; the cached ones P(P-1)/2 + (V-1) P (P-1), which is Eq. 8 less
    the (V-1) P blocks a rank would receive back after producing them. The embedding b_0
    crosses too: every cut naive, the first P - 1 cuts cached."""
    model = LM(tiny_cfg("block_attnres", n_layers=P * V, block_size=2))
    emb = frozenset({"b0"})
    naive, cached = build_plan(model, P, V, cache=False), build_plan(model, P, V, cache=True)
    blocks = lambda plan: transfers(plan, 1, 1, skip=emb, history_only=True)[0]  # noqa: E731
    assert blocks(naive) == eq7(P, V, 1)
    assert blocks(cached) == cached_blocks(P, V, 1) == eq8(P, V, 1) - (V - 1) * P
    # the embedding crosses too, and nothing else (every cut is on a block boundary)
    assert transfers(naive, 1, 1)[0] - blocks(naive) == P * V - 1
    assert transfers(cached, 1, 1)[0] - blocks(cached) == P - 1
    n, nbytes = transfers(cached, 3, 5)
    assert nbytes == n * 3 * 5 * model.cfg.d_model * 4
    if (P, V) == (4, 2):  # the paper's Fig. 3 example: 28 naive, 22 by Eq. 8, 18 here
        assert (eq7(P, V, 1), eq8(P, V, 1), cached_blocks(P, V, 1)) == (28, 22, 18)


@pytest.mark.parametrize("P,V", [(2, 2), (4, 2), (4, 4)])
def test_full_attnres_transfers_match_the_formulas_with_two_outputs_per_stage(P, V):
    """Full AttnRes, one layer (2 sublayer outputs) per stage: N_p = 2."""
    model = LM(tiny_cfg("attnres", n_layers=P * V))
    outputs = lambda plan: transfers(plan, 1, 1, skip=frozenset({"v0"}), history_only=True)[0]  # noqa: E731
    assert outputs(build_plan(model, P, V, cache=False)) == eq7(P, V, 2)
    assert outputs(build_plan(model, P, V, cache=True)) == cached_blocks(P, V, 2)


def test_cached_plan_keeps_what_later_stages_read():
    model = LM(tiny_cfg("attnres", n_layers=4))
    plan = build_plan(model, P=2, V=2, cache=True)
    # stage 2 (rank 0) needs v0..v4; rank 0 produced v0..v2 in stage 0, so v3, v4 travel
    assert plan[2].hop_in.sent == ("v3", "v4") and set(plan[2].hop_in.from_store) == {"v0", "v1", "v2"}
    assert set(plan[0].keep_produced) == {"v0", "v1", "v2"}
    # stage 3 (rank 1) received v0..v2 in stage 1 and produced v3, v4 there
    assert plan[3].hop_in.sent == ("v5", "v6") and set(plan[1].hop_in.keep) == {"v0", "v1", "v2"}
    assert set(plan[1].keep_produced) == {"v3", "v4"}


def test_layouts_that_cannot_run_are_one_line():
    from resstream.config import ConfigError
    from resstream.parallel.config import ParallelConfig, check_layout

    interleaved = ParallelConfig(pp=4, virtual_stages=2, schedule="interleaved_1f1b")
    cases = [
        ((interleaved, 4, 4, 16, 1, False), "8 stages but model.n_layers = 4"),
        ((interleaved, 6, 8, 16, 1, False), "do not divide the 6 processes"),
        ((ParallelConfig(pp=2, microbatches=3), 4, 8, 16, 1, False), "make it a multiple of 6"),
        ((ParallelConfig(pp=4, virtual_stages=2, schedule="interleaved_1f1b", microbatches=9), 4, 8, 36, 1, False),
         "interleaved_1f1b needs a multiple of 2"),
        ((ParallelConfig(fsdp=True), 2, 8, 16, 1, True), "train.compile: not supported"),
    ]
    for args, needle in cases:
        with pytest.raises(ConfigError) as e:
            check_layout(*args)
        assert needle in str(e.value) and "\n" not in str(e.value), (args, str(e.value))
    check_layout(interleaved, 8, 8, 16, 1, False)  # 2 pipelines of 4 processes, 8 stages of one layer
