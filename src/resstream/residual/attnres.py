"""Attention Residuals, Full and Block (Kimi Team, "Attention Residuals", arXiv:2603.15031).

Full AttnRes: each sublayer l attends over the embedding and every earlier raw output
with its own pseudo-query w_l (one d-vector, no projections, no temperature)::

    v_0 = emb   v_1 = f_0   v_2 = f_1   ...   v_l = f_{l-1}
      │           │           │                 │
      └───────────┴─────┬─────┴─────────────────┘
                        ▼
        alpha_i = softmax_i( w_l · RMSNorm_{g_l}(v_i) )     (keys normalised, values raw)
        x_l     = sum_i alpha_i v_i   ──►  f_l(x_l) = Sublayer_l(PreNorm_l(x_l))

Block AttnRes with S sublayers per block: the sources of sublayer l are b_0 = emb, the
completed block sums b_1..b_n (b_n = sum of the S outputs of block n), and, unless l opens
its block, the running partial sum of its own block::

    block 1 (S sublayers)     block 2               sublayer l in block n+1
    f_0 + ... + f_{S-1} = b_1  f_S + ... = b_2  ...  sources: [b_0, b_1, .., b_n, partial]

A final mixture with its own query (row L) over every source feeds the final norm. All
queries start at zero, so every mixture starts as the mean of its sources; because each
sublayer and the head begin with a scale-invariant RMSNorm, the model then computes the
same logits as PreNorm (up to the norm epsilon).

Parameters (under ``residual.``): ``queries`` [L+1, D], zero init; ``key_norm_weight``
[L+1, D], init 1 (absent when ``key_norm_learnable=False``). The key-norm weight folds into
the query exactly: w · (g ⊙ k̂) = (w ⊙ g) · k̂, so the fast paths normalise each source once.

Fast paths (checked against ``reference.py`` in tests/test_fastpath.py, forward and every
gradient). The sources are never stacked into a history tensor: each is touched by a few
custom autograd Functions that save only the sources (which the stream keeps anyway) and
per-token statistics. On a CPU these mixing ops are memory-bound, so what counts is the
number of passes over [B, T, D] tensors, not FLOPs.
- Logit cache (``_NormedLogits``): when a source is written, its logits against every later
  query come from one [B,T,D] x [D,k] matmul, c = (v @ Q_later^T) / RMS(v). A read only
  gathers its column of each cache and takes a softmax over sources.
- Full: then one weighted sum per read (``_WeightedSum``: one in-place multiply-add per
  source forward; one dot and one scale per source backward).
- Block: the paper's two-phase schedule (Algorithm 1). Phase 1 (``_Phase1``), when a block
  opens, computes the inter-block mixtures of all S queries of the block at once. Phase 2
  (``_Phase2``) merges the running partial sum per sublayer, elementwise, with the
  online-softmax identity x_l = o_l + sigmoid(s_partial - lse_l) (partial - o_l).
- Gradient sums (``_GradSums``, ``_Source``): a source read by many mixtures would get a
  scaled copy of each reader's gradient, which autograd then adds up (two passes per reader).
  Instead the readers leave (weight, gradient) pairs and the source sums them once, one
  multiply-add per reader. Off under torch.compile, which fuses the plain path itself.
- ``residual.recompute``: the mixture x_l that sublayer l reads is not kept for backward
  (its norm would keep it: the model runs the sublayer under ``input_hooks``, which store it as
  a recipe) and is recomputed from the sources, bitwise the same, in backward. Saves one
  [B, T, D] per sublayer for about one more forward of the mixing.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import Tensor, nn

from resstream.residual.base import ResidualStream, State, register, stats_dtype


def source_rstd(v: Tensor, eps: float) -> Tensor:
    """1 / RMS(v) over the model dimension, in float32 or wider: [B, T]."""
    return torch.rsqrt(v.to(stats_dtype(v)).pow(2).mean(-1) + eps)


def source_logit(v: Tensor, rstd: Tensor, q: Tensor) -> Tensor:
    """q · RMSNorm(v) for one source, per token: [B, T]."""
    dt = stats_dtype(v)
    return (v.to(dt) @ q.to(dt)) * rstd


def mix_sources(values: list[Tensor], rstds: list[Tensor], q: Tensor) -> tuple[Tensor, Tensor]:
    """softmax over sources of q · RMSNorm(v_i), applied to the raw values.

    Returns the mixture [B, T, D] and the weights [B, T, n]. Loops over sources instead of
    stacking them, so no copy of the history is made.
    """
    logits = torch.stack([source_logit(v, r, q) for v, r in zip(values, rstds)], dim=-1)
    alpha = torch.softmax(logits, dim=-1)
    return weighted_sum(alpha, values), alpha


def weighted_sum(alpha: Tensor, values: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """sum_i alpha[..., i] * values[i]: alpha [B, T, n] (any float dtype), values n x [B, T, D]."""
    return _WeightedSum.apply(alpha, *values)


# ----------------------------------------------------------------------------- autograd kernels


def _mix(a: Tensor, values: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """sum_i a[..., i] v_i with one in-place multiply-add per source (no autograd; a in the values'
    dtype). The one forward formula of every mixture, so that recomputing one is bitwise exact."""
    h = values[0] * a[..., 0:1]
    for i in range(1, len(values)):
        h.addcmul_(values[i], a[..., i : i + 1])
    return h


def _merge(o: Tensor, p: Tensor, q: Tensor, lse: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Phase 2's forward (see _Phase2): returns x, r = 1/RMS(p), s = q · p r, gate = sigmoid(s - lse)."""
    dt = lse.dtype  # statistics dtype
    p_ = p.to(dt)
    r = torch.rsqrt(torch.linalg.vector_norm(p_, dim=-1).square() / p.shape[-1] + eps)  # [B, T]
    s = (p_ @ q.to(dt)) * r
    gate = torch.sigmoid(s - lse)
    return torch.lerp(o, p, gate.unsqueeze(-1).to(o.dtype)), r, s, gate


class _NormedLogits(torch.autograd.Function):
    """c[..., k] = Q[k] · v / RMS(v): one source v [B, T, D] against rows Q [k, D] -> [B, T, k].

    Computed in the statistics dtype (float32 or wider). Saves v, Q and the [B, T, k] / [B, T, 1]
    results; the backward is two matmuls and one fused pass over v:
    dv = (g r) @ Q - v (r^2 / D) sum_k g_k c_k,  dQ = (g r)^T @ v,  r = 1 / RMS(v).
    """

    @staticmethod
    def forward(ctx, v: Tensor, Q: Tensor, eps: float) -> Tensor:
        dt = stats_dtype(v)
        v_, Q_ = v.to(dt), Q.to(dt)
        # one reduction pass: ||v||^2 / D is the mean square
        r = torch.rsqrt(torch.linalg.vector_norm(v_, dim=-1, keepdim=True).square() / v.shape[-1] + eps)
        c = (v_ @ Q_.t()) * r
        ctx.save_for_backward(v, Q, r, c)
        return c

    @staticmethod
    def backward(ctx, gc: Tensor):
        v, Q, r, c = ctx.saved_tensors
        dt = r.dtype
        v_ = v.to(dt)
        gm = gc * r  # gradient of the un-normalised logits v @ Q^T
        gv = gQ = None
        if ctx.needs_input_grad[1]:
            gQ = (gm.reshape(-1, gm.shape[-1]).t() @ v_.reshape(-1, v.shape[-1])).to(Q.dtype)
        if ctx.needs_input_grad[0]:
            coef = (gc * c).sum(-1, keepdim=True) * r.square() / v.shape[-1]
            gv = (gm @ Q.to(dt)).addcmul_(v_, coef, value=-1).to(v.dtype)
        return gv, gQ, None


class _WeightedSum(torch.autograd.Function):
    """h = sum_i alpha[..., i] v_i over a tuple of sources, never stacking them.

    Saves alpha and the sources (alive anyway), not h. Backward: d alpha_i = <g, v_i> per
    token, d v_i = alpha_i g.
    """

    @staticmethod
    def forward(ctx, alpha: Tensor, *values: Tensor) -> Tensor:
        a = alpha.to(values[0].dtype)
        ctx.save_for_backward(a, *values)
        ctx.alpha_dtype = alpha.dtype
        return _mix(a, values)

    @staticmethod
    def backward(ctx, gh: Tensor):
        a, *values = ctx.saved_tensors
        galpha = None
        if ctx.needs_input_grad[0]:
            galpha = torch.stack([torch.linalg.vecdot(gh, v) for v in values], dim=-1).to(ctx.alpha_dtype)
        gvs = [gh * a[..., i : i + 1] if ctx.needs_input_grad[i + 1] else None for i in range(len(values))]
        return galpha, *gvs


class _GradSums:
    """AttnRes readers leave here, per source, the (weight, gradient) pairs that source
    gets from them; ``_Source`` then sums each source's gradient once, one multiply-add per
    reader, instead of autograd receiving a scaled copy per reader and adding it (two passes)."""

    def __init__(self) -> None:
        self.parts: dict[int, list[tuple[Tensor, Tensor]]] = {}


class _Source(torch.autograd.Function):
    """Identity on source i; in backward, adds the readers' parts left in ``sums`` to the
    gradient that reached it directly (through its logits). Autograd runs this after every
    reader of the source (they all take its output), so all parts are in by then."""

    @staticmethod
    def forward(ctx, v: Tensor, sums: _GradSums, i: int) -> Tensor:
        ctx.sums, ctx.i = sums, i
        ctx.set_materialize_grads(False)
        return v.view_as(v)

    @staticmethod
    def backward(ctx, g: Tensor | None):
        acc = None
        for a, gx in ctx.sums.parts.pop(ctx.i, []):
            acc = gx * a if acc is None else acc.addcmul_(gx, a)
        if g is not None:
            acc = g if acc is None else acc.add_(g)
        return acc, None, None


class _ReadFull(torch.autograd.Function):
    """A read over all sources (Full AttnRes's reads, both final mixtures): h = sum_i alpha[..., i]
    v_i, as ``_WeightedSum``, but leaving the sources' gradients alpha_i g in ``sums`` for
    ``_Source`` to add up."""

    @staticmethod
    def forward(ctx, alpha: Tensor, sums: _GradSums, *values: Tensor) -> Tensor:
        a = alpha.to(values[0].dtype)
        ctx.save_for_backward(a, *values)
        ctx.alpha_dtype, ctx.sums = alpha.dtype, sums
        return _mix(a, values)

    @staticmethod
    def backward(ctx, gh: Tensor):
        a, *values = ctx.saved_tensors
        galpha = torch.stack([torch.linalg.vecdot(gh, v) for v in values], dim=-1).to(ctx.alpha_dtype)
        for i in range(len(values)):
            ctx.sums.parts.setdefault(i, []).append((a[..., i : i + 1], gh))
        return galpha, None, *([None] * len(values))


class _Phase1(torch.autograd.Function):
    """Phase 1 of Block AttnRes: o_s = sum_j A[..., s, j] b_j for the S queries of a block at once.

    A [B, T, S, n]: softmax weights of the S queries over the n completed blocks. Each output
    is its own tensor, so the one the next norm keeps does not pin the others. Saves A and the
    blocks (alive anyway). Elementwise multiply-adds, not a batched matmul: on CPU a [S, n] @
    [n, D] product per token is several times slower than S * n fused multiply-adds.
    """

    @staticmethod
    def forward(ctx, A: Tensor, sums: _GradSums | None, *blocks: Tensor) -> tuple[Tensor, ...]:
        a = A.to(blocks[0].dtype)
        ctx.save_for_backward(a, *blocks)
        ctx.A_dtype, ctx.sums = A.dtype, sums
        ctx.set_materialize_grads(False)
        return tuple(_mix(a[..., s, :], blocks) for s in range(a.shape[-2]))

    @staticmethod
    def backward(ctx, *gos: Tensor | None):
        a, *blocks = ctx.saved_tensors
        sums = ctx.sums
        gA = torch.zeros_like(a)
        gbs: list[Tensor | None] = [None] * len(blocks)
        for s, g in enumerate(gos):
            if g is None:  # an output nobody read
                continue
            for j, b in enumerate(blocks):
                gA[..., s, j] = torch.linalg.vecdot(g, b)
                w = a[..., s, j : j + 1]
                if sums is not None:  # the block's _Source adds it up with its other readers'
                    sums.parts.setdefault(j, []).append((w, g))
                else:
                    gbs[j] = g * w if gbs[j] is None else gbs[j].addcmul_(g, w)
        return gA.to(ctx.A_dtype), None, *gbs


class _Phase2(torch.autograd.Function):
    """Phase 2 of Block AttnRes for one sublayer: merge the partial sum p into phase 1's result o.

    s = q · p / RMS(p) is the partial sum's logit, lse phase 1's log-sum-exp, and
    gate = sigmoid(s - lse) the partial sum's weight in the joint softmax:
        x = o + gate (p - o)                     (online-softmax merge, exact).
    o is not needed for backward, because dz = gate <g, p - x> for z = s - lse; then ds = dz,
    dlse = -dz, and through the RMS norm, with r = 1 / RMS(p):
        dp += ds r q - ds (r^2 s / D) p,   dq = sum over tokens of ds r p.
    Saves p, x and per-token scalars. With ``recompute`` it does not keep x (which the next
    norm then does not keep either, see BlockAttnRes.input_hooks) but phase 1's weights row
    ``a_row`` and the blocks, and recomputes o and x in backward.
    """

    @staticmethod
    def forward(ctx, o, p, q, lse, eps, recompute, a_row, *blocks):
        x, r, s, gate = _merge(o, p, q, lse, eps)
        ctx.recompute = recompute
        ctx.save_for_backward(p, q, r, s, gate, *((a_row, *blocks) if recompute else (x,)))
        return x

    @staticmethod
    def backward(ctx, gx: Tensor):
        p, q, r, s, gate, *rest = ctx.saved_tensors
        if ctx.recompute:
            a_row, *blocks = rest
            x = torch.lerp(_mix(a_row.to(p.dtype), blocks), p, gate.unsqueeze(-1).to(p.dtype))
        else:
            (x,) = rest
        dt = gate.dtype
        gp = gx * gate.unsqueeze(-1).to(gx.dtype)
        go = gx - gp
        dz = gate * (torch.linalg.vecdot(gx, p) - torch.linalg.vecdot(gx, x)).to(dt)  # [B, T]
        dr = dz * r  # gradient of p · q per token
        gq = (p.to(dt).reshape(-1, p.shape[-1]).t() @ dr.reshape(-1)).to(q.dtype)
        gp.addcmul_(dr.unsqueeze(-1).to(gp.dtype), q.to(gp.dtype))
        gp.addcmul_(p, (-dz * r.square() * s / p.shape[-1]).unsqueeze(-1).to(gp.dtype))
        return go, gp, gq, -dz, None, None, None, *([None] * (len(rest) - 1 if ctx.recompute else 0))


class _Recipe:
    """Stands in for a saved sublayer input: recomputes it on the first unpack of a backward
    and hands the same tensor to the other unpacks of that input, then lets it go."""

    def __init__(self, fn: Callable[[], Tensor]) -> None:
        self.fn, self.packs, self.value = fn, 0, None

    def unpack(self) -> Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = self.fn()
        x = self.value
        self.packs -= 1
        if self.packs <= 0:
            self.value = None
        return x


def _tensor_key(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), tuple(t.stride()))


def recompute_hooks(x: Tensor, fn: Callable[[], Tensor]) -> torch.autograd.graph.saved_tensors_hooks:
    """saved_tensors_hooks under which autograd saves ``x`` as a recipe (``fn`` recomputes it, no
    grad) instead of the tensor, so x is freed as soon as the code that read it lets it go."""
    key, recipe = _tensor_key(x), _Recipe(fn)

    def pack(t: Tensor):
        if _tensor_key(t) == key:
            recipe.packs += 1
            return recipe
        return t

    def unpack(obj):
        return obj.unpack() if obj is recipe else obj

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def normed_logit_columns(v: Tensor, Q: Tensor, eps: float) -> tuple[Tensor, ...]:
    """Logits of source v against each row of Q, one [B, T] column per row (unbind: cheap backward)."""
    return _NormedLogits.apply(v, Q, eps).unbind(-1)


# ----------------------------------------------------------------------------- the streams


class PseudoQueries(ResidualStream):
    """One pseudo-query and one key-norm weight per sublayer plus one for the final mixture:
    the parameters of every AttnRes-style kind (Full, Block, depth_swa)."""

    mixes_depth = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        rows = self.n_sublayers + 1  # one per sublayer, one for the final mixture
        self.eps = self.rcfg.key_norm_eps
        self.queries = nn.Parameter(torch.zeros(rows, self.d_model))
        if self.rcfg.key_norm_learnable:
            self.key_norm_weight = nn.Parameter(torch.ones(rows, self.d_model))
        else:
            self.register_parameter("key_norm_weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Zero queries are essential: uniform weights at init (paper, section 5).
        with torch.no_grad():
            self.queries.zero_()
            if self.key_norm_weight is not None:
                self.key_norm_weight.fill_(1.0)

    def effective_queries(self) -> Tensor:
        """w_l ⊙ g_l for every row: [L+1, D]."""
        if self.key_norm_weight is None:
            return self.queries
        return self.queries * self.key_norm_weight


class _AttnResParams(PseudoQueries):
    """Full and Block AttnRes: pseudo-queries plus the recompute path."""

    supports_recompute = True

    def input_hooks(self, state: State, l: int, x: Tensor) -> AbstractContextManager:
        """With ``recompute``: a context for running sublayer l on x = read(state, l), under which
        autograd keeps x as a recipe instead of a tensor (x is recomputed from the sources in
        backward, bitwise the same). Without, or when x is itself a source, a no-op context."""
        if not (self.rcfg.recompute and torch.is_grad_enabled() and x.requires_grad) or self._is_source(state, x):
            return nullcontext()
        return recompute_hooks(x, self._input_recipe(state, l))

    def _is_source(self, state: State, x: Tensor) -> bool:
        raise NotImplementedError

    def _input_recipe(self, state: State, l: int) -> Callable[[], Tensor]:
        raise NotImplementedError


@register("attnres")
class FullAttnRes(_AttnResParams):
    """Full Attention Residuals: sublayer l mixes the embedding and all l earlier outputs.

    State: ``values`` v_0 = emb, v_1 = f_0, ...; ``logits``: for each source i, its logit
    columns against the queries of rows i..L (see ``normed_logit_columns``).
    """

    def init(self, emb: Tensor) -> State:
        q = self.effective_queries()
        # Gradient sums by source (see _Source), unless no backward follows or the graph is
        # being compiled (the compiler fuses the plain path instead).
        sums = _GradSums() if torch.is_grad_enabled() and not torch.compiler.is_compiling() else None
        emb = self._source(emb, sums, 0)
        return {"values": (emb,), "logits": (normed_logit_columns(emb, q, self.eps),), "q": q, "sums": sums}

    @staticmethod
    def _source(v: Tensor, sums: _GradSums | None, i: int) -> Tensor:
        return v if sums is None else _Source.apply(v, sums, i)

    def _mix(self, state: State, row: int) -> tuple[Tensor, Tensor]:
        values = state["values"]
        z = torch.stack([cols[row - i] for i, cols in enumerate(state["logits"])], dim=-1)  # [B, T, n]
        alpha = torch.softmax(z, dim=-1)
        if len(values) == 1:  # a softmax over one source is exactly 1, with zero gradient
            return values[0], alpha
        if state["sums"] is None:
            return weighted_sum(alpha, values), alpha
        return _ReadFull.apply(alpha, state["sums"], *values), alpha

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        return self._mix(state, l)

    def write(self, state: State, l: int, y: Tensor) -> State:
        y = self._source(y, state["sums"], l + 1)
        cols = normed_logit_columns(y, state["q"][l + 1 :], self.eps)  # readers l+1..L
        return {**state, "values": state["values"] + (y,), "logits": state["logits"] + (cols,)}

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        return self._mix(state, self.n_sublayers)

    def source_names(self, l: int) -> list[str]:
        return ["emb"] + [f"f{i}" for i in range(l)]

    def _is_source(self, state: State, x: Tensor) -> bool:
        return any(x is v for v in state["values"])

    def _input_recipe(self, state: State, l: int) -> Callable[[], Tensor]:
        values = state["values"]
        cols = [c[l - i].detach() for i, c in enumerate(state["logits"])]  # views of kept caches

        def recompute() -> Tensor:  # the forward's ops on the same inputs: bitwise the same
            return _mix(torch.softmax(torch.stack(cols, dim=-1), dim=-1).to(values[0].dtype), values)

        return recompute


@register("block_attnres")
class BlockAttnRes(_AttnResParams):
    """Block Attention Residuals with S = ``residual.block_size`` sublayers per block.

    State: ``blocks`` (b_0 = emb and the completed block sums) with their logit columns
    ``logits`` (block j, written when sublayer j*S opens, against rows j*S..L), ``partial``
    (running sum of the open block), and ``phase1``: (outputs o_s, lse [B,T,S'], weights
    [B,T,S',n]) for every query of the open block, computed once when the block opened.
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.S = self.rcfg.block_size

    def init(self, emb: Tensor) -> State:
        q = self.effective_queries()
        sums = _GradSums() if torch.is_grad_enabled() and not torch.compiler.is_compiling() else None  # see Full
        emb = FullAttnRes._source(emb, sums, 0)
        state = {"blocks": (emb,), "logits": (normed_logit_columns(emb, q, self.eps),), "partial": None, "q": q,
                 "sums": sums}
        return {**state, "phase1": self._phase1(state, 0)}

    def _phase1(self, state: State, l0: int) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
        """Phase 1 for the block opening at sublayer l0: all its queries over the completed blocks."""
        n_q = min(self.S, self.n_sublayers - l0)
        blocks = state["blocks"]
        # z[b, t, s, j] = logit of block j for query l0 + s; block j's columns start at row j*S
        z = torch.stack(
            [torch.stack([cols[l0 + s - j * self.S] for j, cols in enumerate(state["logits"])], dim=-1) for s in range(n_q)],
            dim=-2,
        )
        lse = torch.logsumexp(z, dim=-1)  # [B, T, S']
        alpha = torch.exp(z - lse.unsqueeze(-1))  # [B, T, S', n]
        if len(blocks) == 1:  # first block: the embedding is the only completed source
            return (blocks[0],) * n_q, lse, alpha
        return _Phase1.apply(alpha, state["sums"], *blocks), lse, alpha

    def read(self, state: State, l: int) -> Tensor:
        # not read_weighted()[0]: the joint weights of phase 2 cost passes that training never uses
        i = l % self.S
        o, lse, alpha = state["phase1"]
        if i == 0:  # first sublayer of a block: completed blocks only
            return o[0]
        # Phase 2: merge the partial sum into the phase-1 softmax (online-softmax identity).
        p, q = state["partial"], state["q"][l]
        # with recompute, phase 2 keeps phase 1's weights row and the blocks instead of x
        extra = (alpha[..., i, :], *state["blocks"]) if self.rcfg.recompute else (None,)
        return _Phase2.apply(o[i], p, q, lse[..., i], self.eps, self.rcfg.recompute, *extra)

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        i = l % self.S
        _, lse, alpha = state["phase1"]
        if i == 0:
            return self.read(state, l), alpha[..., 0, :]
        p, q = state["partial"], state["q"][l]
        return self.read(state, l), self._phase2_weights(p, q, lse[..., i], alpha[..., i, :])

    def _phase2_weights(self, p: Tensor, q: Tensor, lse: Tensor, alpha: Tensor) -> Tensor:
        """The joint softmax weights [completed blocks..., partial] (diagnostics; the mixture
        itself never forms them)."""
        gate = torch.sigmoid(source_logit(p, source_rstd(p, self.eps), q) - lse).unsqueeze(-1)
        return torch.cat([alpha * (1 - gate), gate], dim=-1)

    def write(self, state: State, l: int, y: Tensor) -> State:
        i = l % self.S
        partial = y if i == 0 else state["partial"] + y
        if i < self.S - 1 and l < self.n_sublayers - 1:
            return {**state, "partial": partial}
        # The block is complete: it becomes a source for rows l+1..L, and phase 1 runs for the next block.
        partial = FullAttnRes._source(partial, state["sums"], len(state["blocks"]))
        cols = normed_logit_columns(partial, state["q"][l + 1 :], self.eps)
        state = {**state, "blocks": state["blocks"] + (partial,), "logits": state["logits"] + (cols,),
                 "partial": None, "phase1": None}
        if l + 1 < self.n_sublayers:
            state["phase1"] = self._phase1(state, l + 1)
        return state

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        L = self.n_sublayers  # block j's columns start at row min(j*S, L): the last may be short
        z = torch.stack([cols[L - min(j * self.S, L)] for j, cols in enumerate(state["logits"])], dim=-1)
        alpha = torch.softmax(z, dim=-1)
        if state["sums"] is None:
            return weighted_sum(alpha, state["blocks"]), alpha
        return _ReadFull.apply(alpha, state["sums"], *state["blocks"]), alpha

    def _is_source(self, state: State, x: Tensor) -> bool:
        return any(x is b for b in state["blocks"])

    def _input_recipe(self, state: State, l: int) -> Callable[[], Tensor]:
        i, blocks = l % self.S, state["blocks"]
        _, lse, alpha = state["phase1"]
        a = alpha[..., i, :].detach()  # small; the phase-1 outputs themselves are not kept
        if i == 0:
            return lambda: _mix(a.to(blocks[0].dtype), blocks)
        p, q, lse_i = state["partial"], state["q"][l].detach(), lse[..., i].detach()
        return lambda: _merge(_mix(a.to(p.dtype), blocks), p, q, lse_i, self.eps)[0]

    def source_names(self, l: int) -> list[str]:
        if l >= self.n_sublayers:
            return ["emb"] + [f"B{j + 1}" for j in range(-(-self.n_sublayers // self.S))]
        names = ["emb"] + [f"B{j + 1}" for j in range(l // self.S)]
        return names + ["partial"] if l % self.S else names
