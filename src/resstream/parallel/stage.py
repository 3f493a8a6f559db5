"""What one pipeline stage runs, and the per-rank store behind cross-stage caching.

A ``StageBody`` is the part of the LM between two cuts: the embedding (first stage), the
sublayers [lo, hi) joined by the residual stream, the final norm and head (last stage). Its
inputs are the tensors its cut carries (``Hop.sent``), its outputs those of the next cut.
Everything else a stage needs comes from its rank's ``RankStore``::

    rank r:   stage r ──────────────── stage r+P ──────────────── stage r+2P ...
                 │  keep b_k (leaf copy)     │ read b_k                │ read b_k
                 └──────────► RankStore[microbatch] ◄────────────────┘
    backward: the later stages' gradients of b_k pile up on the leaf copy; the stage that
    kept it adds them to the gradient of b_k it sends back, once (``_AddKeptGrad``).

The store is what the AttnRes paper (arXiv:2603.15031, section 4.1) calls the cache shared
by a rank's virtual stages. Stored tensors are detached leaves, so a later stage's backward
stops there instead of running into an earlier stage's graph (each stage's backward must
traverse its own graph once, when its schedule slot comes).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from resstream.model.lm import LM
from resstream.parallel.plan import Entry, StagePlan
from resstream.residual.base import Boundary, ResidualStream, outside_autocast


class RankStore:
    """History tensors a pipeline rank holds, by microbatch, shared by its virtual stages.
    ``mb`` is the microbatch the rank is working on (set by the stage before each call)."""

    def __init__(self) -> None:
        self.mb = 0
        self._by_mb: dict[int, dict[str, Tensor]] = {}

    def put(self, name: str, t: Tensor) -> None:
        self._by_mb.setdefault(self.mb, {})[name] = t

    def get(self, name: str) -> Tensor:
        return self._by_mb[self.mb][name]

    def release(self, mb: int) -> None:
        self._by_mb.pop(mb, None)

    def __len__(self) -> int:
        return len(self._by_mb)


class _Box:
    """Holds the leaf copy, so autograd does not take it for an input of ``_AddKeptGrad``."""

    def __init__(self, leaf: Tensor) -> None:
        self.leaf = leaf


class _AddKeptGrad(torch.autograd.Function):
    """Identity on t; in backward adds the gradient that later stages on this rank left on
    t's leaf copy in the store. Runs after them: their backward precedes this stage's."""

    @staticmethod
    def forward(ctx, t: Tensor, box: _Box) -> Tensor:
        ctx.box = box
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: Tensor):
        extra, ctx.box.leaf.grad = ctx.box.leaf.grad, None
        return (g if extra is None else g + extra), None


def keep(store: RankStore, name: str, t: Tensor) -> Tensor:
    """Put t in the store for this rank's later stages; returns what this stage uses instead
    of t (with gradients, t wrapped so its backward collects the later stages' gradients)."""
    if not (torch.is_grad_enabled() and t.requires_grad):
        store.put(name, t)
        return t
    leaf = t.detach().requires_grad_()
    store.put(name, leaf)
    return _AddKeptGrad.apply(t, _Box(leaf))


class StageBody(nn.Module):
    """Stage ``plan.index`` of ``n_stages``. Parameter names are those of the LM
    (``embed.*``, ``sublayers.{l}.*``, ``final_norm.*``, ``head.*``); the residual stream is
    used but not registered: its parameters are replicated on every rank, shared by the
    rank's stages and synchronised once per step (``parallel.grads``), not by a stage wrapper."""

    def __init__(self, model: LM, plan: StagePlan, n_stages: int, store: RankStore) -> None:
        super().__init__()
        self.plan, self.store = plan, store
        self.is_first, self.is_last = plan.index == 0, plan.index == n_stages - 1
        if self.is_first:
            self.embed = model.embed
        self.sublayers = nn.ModuleDict({str(l): model.sublayers[l] for l in range(plan.lo, plan.hi)})
        if self.is_last:
            self.final_norm, self.head = model.final_norm, model.head
        object.__setattr__(self, "stream", model.residual)  # not a submodule, see above

    def forward(self, *inputs: Tensor):
        """As LM.forward between the cuts: every stream call outside autocast (depth mixing in
        full precision), the sublayers under it."""
        stream: ResidualStream = self.stream
        full = functools.partial(outside_autocast, inputs[0].device.type)
        if self.is_first:
            emb = self.embed(inputs[0])
            with full():
                state = stream.init(emb)
        else:
            with full():
                state = stream.from_boundary(self._arrive(inputs), self.plan.lo)
        for l in range(self.plan.lo, self.plan.hi):
            with full():
                x = stream.read(state, l)
            with stream.input_hooks(state, l, x):
                y = self.sublayers[str(l)](x)
            with full():
                state = stream.write(state, l, y)
        with full():
            out = stream.finish(state) if self.is_last else self._depart(stream.stage_boundary(state, self.plan.hi))
        return self.head(self.final_norm(out)) if self.is_last else out

    def _arrive(self, inputs: tuple[Tensor, ...]) -> Boundary:
        hop = self.plan.hop_in
        got = dict(zip(hop.sent, inputs, strict=True))
        for name in hop.keep:
            got[name] = keep(self.store, name, got[name])
        for name in hop.from_store:
            got[name] = self.store.get(name)
        return Boundary(fresh={e.name: got[e.name] for e in hop.entries if not e.history},
                        history={e.name: got[e.name] for e in hop.entries if e.history})

    def _depart(self, boundary: Boundary) -> tuple[Tensor, ...]:
        out = boundary.tensors()
        expected = {e.name for e in self.plan.hop_out.entries}
        if out.keys() != expected:  # the probe and the real stream disagree: a kind's bug
            raise RuntimeError(f"stage {self.plan.index}: boundary entries {sorted(out)} differ from the plan's {sorted(expected)}")
        for name in self.plan.keep_produced:
            out[name] = keep(self.store, name, out[name])
        return tuple(out[name].contiguous() for name in self.plan.hop_out.sent)


@torch.no_grad()
def probe_cuts(stream: ResidualStream, cuts: list[int], d_model: int, device: torch.device,
               emb_dtype: torch.dtype, out_dtype: torch.dtype) -> dict[int, tuple[Entry, ...]]:
    """The entries of the stream's boundary before each sublayer in ``cuts``, with their shapes
    past [B, T] and dtypes, from a dry run of the stream alone on a [2, 3, D] input: an
    embedding of ``emb_dtype`` and sublayer outputs of ``out_dtype`` (what training feeds it;
    the stream itself runs outside autocast, as in LM.forward)."""
    B, T = 2, 3
    found: dict[int, tuple[Entry, ...]] = {}
    with outside_autocast(device.type):
        state = stream.init(torch.full((B, T, d_model), 0.5, dtype=emb_dtype, device=device))
        for l in range(max(cuts) + 1):
            if l in cuts:
                b = stream.stage_boundary(state, l)
                entries = []
                for hist, part in ((False, b.fresh), (True, b.history)):
                    for name, t in part.items():
                        if tuple(t.shape[:2]) != (B, T):
                            raise RuntimeError(f"residual kind '{stream.kind}': boundary entry '{name}' has shape "
                                               f"{tuple(t.shape)}, not [B, T, ...]")
                        entries.append(Entry(name, tuple(t.shape[2:]), t.dtype, hist))
                found[l] = tuple(entries)
            x = stream.read(state, l)
            state = stream.write(state, l, torch.full(x.shape, 0.25, dtype=out_dtype, device=device))
    return found
