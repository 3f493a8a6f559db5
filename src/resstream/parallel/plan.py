"""Where a pipeline cuts the model and what each cut carries.

The model is cut between transformer layers into C = P * V stages; stage c runs on pipeline
rank c % P (the looped placement of torch's interleaved schedules). Each cut carries the
residual stream's ``Boundary`` (``ResidualStream.stage_boundary``): fresh entries always,
history entries (never changed once written) only to a rank that does not hold them yet.

Cross-stage caching (Attention Residuals, arXiv:2603.15031, section 4.1): a rank keeps every
history entry it has received or produced in one store shared by its virtual stages, so a
cut sends only what the receiving rank has not seen. With Block AttnRes, N_p blocks per
stage and cuts on block boundaries, the block transfers per microbatch are

    naive (pp_cache=false):  C(C-1)/2 * N_p                                   (paper Eq. 7)
    cached:                  P(P-1)/2 * N_p + (V-1) * P(P-1) * N_p

The paper's Eq. 8, P(P-1)/2 * N_p + (V-1) * P^2 * N_p, also resends each rank the N_p blocks
it produced itself in its previous virtual stage; a rank that produced a block has seen it,
so it is kept, which saves (V-1) * P * N_p more. Gradients take the same routes backwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def stage_layers(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Sublayer ranges [lo, hi) of each stage: whole transformer layers (attention + MLP), as
    even as possible, earlier stages taking the remainder (the last stage also runs the head)."""
    base, extra = divmod(n_layers, n_stages)
    bounds, lo = [], 0
    for s in range(n_stages):
        hi = lo + 2 * (base + (s < extra))
        bounds.append((lo, hi))
        lo = hi
    return bounds


@dataclass(frozen=True)
class Entry:
    """One tensor of a cut: [B, T, *shape] of ``dtype``; ``history``: never changes once written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    history: bool

    def nbytes(self, batch: int, seq: int) -> int:
        n = batch * seq
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Hop:
    """The cut into a stage. ``entries``: what the stage needs; ``sent``: names carried by the
    previous stage, in order; ``from_store``: the rest, read from this rank's store; ``keep``:
    received names this stage keeps in the store for this rank's later stages."""

    entries: tuple[Entry, ...]
    sent: tuple[str, ...]
    from_store: tuple[str, ...]
    keep: tuple[str, ...]

    def sent_entries(self) -> list[Entry]:
        by_name = {e.name: e for e in self.entries}
        return [by_name[n] for n in self.sent]


@dataclass(frozen=True)
class StagePlan:
    """Stage ``index`` of the pipeline: sublayers [lo, hi) on pipeline rank ``rank``.
    ``keep_produced``: history entries first written by this stage that later stages on the
    same rank read from the store. ``hop_in``: None for the first stage; ``hop_out``: the next
    stage's hop_in (None for the last)."""

    index: int
    rank: int
    lo: int
    hi: int
    hop_in: Hop | None
    hop_out: Hop | None
    keep_produced: tuple[str, ...]


def plan_pipeline(cuts: dict[int, tuple[Entry, ...]], bounds: list[tuple[int, int]], pp: int,
                  cache: bool) -> list[StagePlan]:
    """The plan of every stage. ``cuts[l]``: the entries of the boundary before sublayer l, for
    each stage's first sublayer l (but the first stage's)."""
    n = len(bounds)
    rank = [c % pp for c in range(n)]
    ins = [()] + [cuts[bounds[c][0]] for c in range(1, n)]
    outs = [cuts[bounds[c + 1][0]] for c in range(n - 1)] + [()]
    hist = lambda entries: {e.name for e in entries if e.history}  # noqa: E731
    holds = [hist(ins[c]) | hist(outs[c]) for c in range(n)]  # history a stage has in hand

    hops, from_store = [None] * n, [set() for _ in range(n)]
    for c in range(1, n):
        seen = set().union(*(holds[e] for e in range(c) if rank[e] == rank[c])) if cache else set()
        stored = tuple(e.name for e in ins[c] if e.history and e.name in seen)
        from_store[c] = set(stored)
        sent = tuple(e.name for e in ins[c] if e.name not in from_store[c])
        hops[c] = (sent, stored)

    # The first stage on a rank to hold an entry that a later stage there reads from the store
    # keeps it: received (it came in its hop) or produced (it first appears in its output).
    keep_in, keep_out = [set() for _ in range(n)], [set() for _ in range(n)]
    for c in range(n):
        for name in from_store[c]:
            owner = min(e for e in range(c) if rank[e] == rank[c] and name in holds[e])
            (keep_in if name in hist(ins[owner]) else keep_out)[owner].add(name)
    for c in range(n - 1):
        # a produced entry is new to the next rank, so it is sent: its gradient comes back there
        assert keep_out[c] <= set(hops[c + 1][0]), "a kept entry must travel on"

    def hop(c: int) -> Hop | None:
        if c == 0 or c >= n:
            return None
        sent, stored = hops[c]
        return Hop(ins[c], sent, stored, tuple(e.name for e in ins[c] if e.name in keep_in[c]))

    return [
        StagePlan(c, rank[c], *bounds[c], hop(c), hop(c + 1), tuple(e.name for e in outs[c] if e.name in keep_out[c]))
        for c in range(n)
    ]


def transfers(plan: list[StagePlan], batch: int, seq: int, skip: frozenset[str] = frozenset(),
              history_only: bool = False) -> tuple[int, int]:
    """(tensors, bytes) the cuts carry forward for one microbatch of [batch, seq] tokens (the
    backward sends one gradient per tensor received, the same again). ``skip``: names not
    counted; ``history_only``: count history entries only (AttnRes: outputs or block sums)."""
    sent = [e for s in plan if s.hop_in is not None for e in s.hop_in.sent_entries()
            if e.name not in skip and (e.history or not history_only)]
    return len(sent), sum(e.nbytes(batch, seq) for e in sent)


def eq7(P: int, V: int, n_p: float) -> float:
    """Paper Eq. 7: block transfers per microbatch without caching, C = P V stages."""
    C = P * V
    return C * (C - 1) / 2 * n_p


def eq8(P: int, V: int, n_p: float) -> float:
    """Paper Eq. 8: block transfers with the paper's cross-stage caching."""
    return P * (P - 1) / 2 * n_p + (V - 1) * P * P * n_p


def cached_blocks(P: int, V: int, n_p: float) -> float:
    """Block transfers with our caching (a rank also keeps the blocks it produced)."""
    return P * (P - 1) / 2 * n_p + (V - 1) * P * (P - 1) * n_p
