"""Hyper-Connections (hc) and Manifold-Constrained Hyper-Connections (mhc).

The residual becomes n parallel streams H = (h_1, .., h_n), each [B, T, D]. Every sublayer l
reads a weighted sum of the streams (width connection), and writes its output into every
stream with its own weight while the streams are mixed by an n x n matrix (depth connection
and residual mixing)::

    H_0 = (emb, .., emb)                              n copies of the embedding
           │
           ├──► x_l = sum_j pre_j h_j ──► f_l(x_l) = y_l          (read: width connection)
           │                                   │
           ▼                                   ▼
    h_i' = sum_j res_ij h_j      +      post_i y_l                (write: mix, then add)
           │
    H_L ──► sum_i h_i ──► final norm ──► head

hc, Zhu et al., "Hyper-Connections", ICLR 2025 (arXiv:2409.19606), Eqs. 1-5 and 10-14.
Paper notation: pre = A_m, post = B, res = A_r^T (the paper's A_r[j, i] carries stream j
into stream i). Static coefficients are parameters per sublayer; the dynamic variant adds
    B[j] += s_b tanh(norm(h_j) . W_b),  A_m[j] += s_a tanh(norm(h_j) . W_m),
    A_r[j, :] += s_a tanh(norm(h_j) W_r)                        (per stream j, per token)
Init (Eq. 14): A_m = e_{l mod n}, B = 1, A_r = I, W = 0, s_a = s_b = 0.01. All streams then
stay equal to PreNorm's h_l, sublayer l reads exactly h_l, and the head sees n h_L: after
the scale-invariant final norm, the same logits as PreNorm (up to the norm epsilon).

mhc, Xie et al. (DeepSeek), "mHC: Manifold-Constrained Hyper-Connections", arXiv:2512.24880,
Eqs. 3 and 7-9. Coefficients come from the whole flattened state v = RMSNorm(vec(H)) [nD]:
    pre  = sigmoid(a_pre v phi_pre + b_pre)                     [n]     non-negative read
    post = 2 sigmoid(a_post v phi_post + b_post)                [n]     non-negative write
    res  = SinkhornKnopp(a_res mat(v phi_res) + b_res)          [n, n]  doubly stochastic
Sinkhorn-Knopp: M = exp(logits), then sinkhorn_iters times normalise columns, then rows, in
float32 at least. The paper gives a = 0.01 and leaves b's init open; ours puts mhc near
hc's Eq. 14 init: b_pre = +8 on stream l mod n and -8 elsewhere (pre = e_{l mod n} within
sigmoid(-8) = 3.4e-4 per entry), b_post = 0 (post = 1 exactly), b_res = 0 on the diagonal
and -8 off it (res: 3.4e-4 off the diagonal, 1 - (n-1) 3.4e-4 on it), phi = 0. Since the
streams start equal and res's rows sum to 1 (the last normalisation is the rows'), the
model starts exactly as PreNorm up to the norm epsilon, like hc. Near such a permutation
matrix Sinkhorn converges slowly: once the logits move, 20 iterations leave column sums off
by up to ~1e-4 (logit noise 0.05) to ~5e-2 (noise 0.5); rows are exact.

Fast path (checked against ``reference.py``): streams are one tensor [B, T, n, D]; the
coefficients of sublayer l are computed as soon as its input streams exist (in ``init``
and ``write``), x_l and the mixed streams come from one matmul [1+n, n] @ [n, D] per token
and the write is one fused matmul-add. Sinkhorn runs on all tokens at once with the token
axes last and a hand-written backward; static mhc projects every sublayer's matrix in one
call per forward. Few, large kernels matter most on a shared CPU (see ``_sum_over``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from resstream.residual.base import ResidualStream, State, register, stats_dtype

# mhc's static logits: +-INIT_LOGIT puts sigmoid and Sinkhorn within (n-1) 3.4e-4 of hc's init.
INIT_LOGIT = 8.0
# hc's s_a, s_b and mhc's a_pre, a_post, a_res at init (HC Algorithm 2; mHC Table 5).
INIT_SCALE = 0.01


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp projection of exp(logits) [..., n, n] towards a doubly stochastic
    matrix: ``iters`` times normalise columns, then rows. Runs in float32 at least."""
    z = logits.to(stats_dtype(logits)).movedim((-2, -1), (0, 1)).contiguous()  # [n, n, ...]
    return _SinkhornKnopp.apply(z, iters).movedim((0, 1), (-2, -1))


class _ScaledProjection(torch.autograd.Function):
    """p = (v @ W) / RMS(v) over the last axis of v [..., F], W [F, K] (RMSNorm, then a
    projection, in mHC section 4.3's order). The hand-written backward returns dv in one
    fused matmul-add; autograd's graph (norm backward, matmul backward, their sum) makes
    four more passes over the streams, which dominate this kind's cost on a CPU."""

    @staticmethod
    def forward(ctx, v: Tensor, W: Tensor, eps: float) -> Tensor:
        v2 = v.reshape(-1, v.shape[-1])                                     # [N, F]
        ms = torch.linalg.vector_norm(v2, dim=-1, keepdim=True).square() / v2.shape[-1]
        rstd = torch.rsqrt(ms + eps)                                        # [N, 1]
        raw = v2 @ W                                                        # [N, K]
        ctx.save_for_backward(v2, W, rstd, raw)
        ctx.v_shape = v.shape
        return (raw * rstd).view(*v.shape[:-1], W.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, None]:
        v2, W, rstd, raw = ctx.saved_tensors
        g = g.reshape(raw.shape)
        g_raw = g * rstd
        # d rstd / dv = -rstd^3 v / F, so dv = g_raw W^T - (sum_k g_k raw_k) rstd^3 / F v
        coef = (g * raw).sum(-1, keepdim=True) * rstd.pow(3) / v2.shape[-1]
        dv = torch.addmm(v2 * -coef, g_raw, W.t())
        return dv.view(ctx.v_shape), v2.t() @ g_raw, None


def _sum_over(m: Tensor, axis: int) -> Tensor:
    """Sum over a tiny axis as n - 1 adds of token-sized slices (keepdim). A torch reduction
    of a 32k-element tensor goes multi-threaded; on a 2-core CPU shared with other jobs each
    such call was measured at ~12 ms (waiting for the second core) against ~10 us here."""
    parts = m.unbind(axis)
    s = parts[0]
    for part in parts[1:]:
        s = s + part
    return s.unsqueeze(axis)


def _normalise(m: Tensor, iters: int) -> tuple[Tensor, list]:
    """The iterations on m [n, n, ...], with each step's (output, sums, axis) for backward."""
    steps = []
    for _ in range(iters):
        for axis in (0, 1):  # columns sum to 1, then rows
            s = _sum_over(m, axis)
            m = m / s
            steps.append((m, s, axis))
    return m, steps


class _SinkhornKnopp(torch.autograd.Function):
    """Sinkhorn-Knopp on [n, n, ...] with a hand-written backward.

    Token axes last, so every operation is an elementwise one over token-sized slices.
    Autograd's graph of 2 * iters broadcast divisions costs several times the few kernels
    per step below. The steps are kept for backward (2 * iters * n^2 floats per token; mHC's
    fused kernel recomputes them instead, which costs more kernels here).
    """

    @staticmethod
    def forward(ctx, z: Tensor, iters: int) -> Tensor:
        # Subtracting each column's max cannot change the result (the first column
        # normalisation divides it out again) but keeps exp finite.
        col_max = z[0]
        for row in z.unbind(0)[1:]:
            col_max = torch.maximum(col_max, row)
        m0 = torch.exp(z - col_max)
        out, steps = _normalise(m0, iters)
        # Intermediates live on ctx; the output goes through save_for_backward (no cycle).
        ctx.intermediates = (m0, steps[:-1], steps[-1][1])
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        m0, steps, last_sum = ctx.intermediates
        g = g.contiguous()  # arrives transposed (movedim)
        for o, s, axis in reversed(steps + [(out, last_sum, 1)]):
            # o = m / s with s = m.sum(axis): dm = (g - sum_axis(g * o)) / s
            g = (g - _sum_over(g * o, axis)) / s
        return g * m0, None  # d exp(z) = exp(z) dz; the max shift has no effect on the output


class _Streams(ResidualStream):
    """The n-stream wiring shared by hc and mhc; subclasses supply the coefficients.

    State: ``x`` the input of the next sublayer, ``carry`` its mixed streams res @ H,
    ``post`` its write weights, ``l`` its index, ``static`` what a forward computes once
    from the parameters; after the last sublayer, ``H`` the final streams.
    """

    identity_at_init = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.n = self.rcfg.n_streams
        self.dynamic = self.rcfg.dynamic
        self.eps = self.rcfg.key_norm_eps

    def static_coefficients(self, dt: torch.dtype) -> dict:
        """What a forward computes once from the parameters (dt: the coefficients' dtype),
        as per-sublayer tuples: indexing a parameter per sublayer would cost a zero-filled
        parameter-sized gradient per sublayer in backward; unbind's backward is one stack."""
        return {}

    def coefficients(self, static: dict, H: Tensor, l: int) -> tuple[Tensor, Tensor]:
        """The width matrix C [.., n+1, n] and the write weights post [.., n] of sublayer l,
        from its input streams H [B, T, n, D]; '..' is [B, T] (dynamic) or nothing (static).
        Row 0 of C is pre (sublayer input x = sum_j C[0, j] h_j), rows 1..n are res
        (carried stream i = sum_j C[1+i, j] h_j)."""
        raise NotImplementedError

    def _prepare(self, state: State, H: Tensor, l: int) -> State:
        C, post = self.coefficients(state["static"], H, l)
        *lead, n, D = H.shape
        # One batched matmul over tokens, [1+n, n] @ [n, D] each (torch.matmul's broadcasting
        # path for a static C was 5x slower on a CPU).
        C = C.to(H.dtype).expand(*lead, 1 + n, n).reshape(-1, 1 + n, n)
        mix = torch.bmm(C, H.reshape(-1, n, D)).view(*lead, 1 + n, D)
        x, carry = mix.split([1, n], dim=-2)  # split, not slicing: no zero-filled gradients
        # x is copied out so that the sublayer, which saves its input for backward, does not
        # keep the whole mix alive (1 + n times x's size, per sublayer).
        x = x.squeeze(-2).contiguous()
        # A static post is copied per token: a stride-0 batch sends baddbmm down a slow path.
        post = post.to(H.dtype).expand(*lead, n).contiguous()
        return {**state, "l": l, "x": x, "carry": carry, "post": post}

    def init(self, emb: Tensor) -> State:
        H = emb.unsqueeze(-2).expand(*emb.shape[:-1], self.n, emb.shape[-1])  # [B, T, n, D]
        return self._prepare({"static": self.static_coefficients(stats_dtype(emb))}, H, 0)

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, None]:
        assert state["l"] == l, f"read({l}) but the state is prepared for sublayer {state['l']}"
        return state["x"], None

    def write(self, state: State, l: int, y: Tensor) -> State:
        carry, post = state["carry"], state["post"]
        *lead, n, D = carry.shape
        # H = carry + post (outer) y as one fused batched matmul-add per token: its backward
        # is two batched matmuls instead of broadcast products and reductions.
        H = torch.baddbmm(carry.flatten(0, -3), post.view(-1, n, 1), y.reshape(-1, 1, D)).view(*lead, n, D)
        if l + 1 < self.n_sublayers:
            return self._prepare(state, H, l + 1)
        return {**state, "l": None, "x": None, "carry": None, "post": None, "H": H}

    def finish_weighted(self, state: State) -> tuple[Tensor, None]:
        return state["H"].sum(-2), None


@register("hc")
class HyperConnections(_Streams):
    """Hyper-Connections, static or dynamic (``residual.dynamic``), n = ``residual.n_streams``.

    Parameters (under ``residual.``), per sublayer l: ``static_pre`` [L, n] (A_m),
    ``static_post`` [L, n] (B), ``static_res`` [L, n, n] (A_r, paper orientation: [j, i]
    carries stream j into stream i); dynamic only: ``dynamic_proj`` [L, D, n+2] (columns
    W_b, W_m, W_r[:, 0..n-1]), ``dynamic_scale`` [L, 2] (s_a, s_b), ``norm_weight`` [L, D]
    (the RMSNorm of each stream before the projection; the paper uses a LayerNorm).
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        L, n, D = self.n_sublayers, self.n, self.d_model
        self.static_pre = nn.Parameter(torch.empty(L, n))
        self.static_post = nn.Parameter(torch.empty(L, n))
        self.static_res = nn.Parameter(torch.empty(L, n, n))
        if self.dynamic:
            self.dynamic_proj = nn.Parameter(torch.empty(L, D, n + 2))
            self.dynamic_scale = nn.Parameter(torch.empty(L, 2))
            self.norm_weight = nn.Parameter(torch.empty(L, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Eq. 14: the PreNorm-equivalent init. Sublayer l reads stream l mod n only.
        with torch.no_grad():
            self.static_pre.zero_()
            self.static_pre[torch.arange(self.n_sublayers), torch.arange(self.n_sublayers) % self.n] = 1.0
            self.static_post.fill_(1.0)
            self.static_res.copy_(torch.eye(self.n).expand_as(self.static_res))
            if self.dynamic:
                self.dynamic_proj.zero_()
                self.dynamic_scale.fill_(INIT_SCALE)
                self.norm_weight.fill_(1.0)

    def static_coefficients(self, dt: torch.dtype) -> dict:
        # The paper's alpha = [A_m | A_r] [n, 1 + n] per sublayer; C = alpha^T.
        alpha = torch.cat([self.static_pre.unsqueeze(-1), self.static_res], dim=-1)  # [L, n, 1+n]
        static = {"C": alpha.transpose(-1, -2).unbind(0), "post": self.static_post.unbind(0)}
        if self.dynamic:
            # The norm weight folds into the projection: (g * h/rms) . w = (h . (g * w)) / rms.
            W = self.norm_weight.to(dt).unsqueeze(-1) * self.dynamic_proj.to(dt)  # [L, D, 1 + 1 + n]
            static.update(W=W.unbind(0), scale=self.dynamic_scale.to(dt).unbind(0))
        return static

    def coefficients(self, static: dict, H: Tensor, l: int) -> tuple[Tensor, Tensor]:
        C, post = static["C"][l], static["post"][l]
        if not self.dynamic:
            return C, post
        W = static["W"][l]                                                   # [D, 2 + n]
        p = _ScaledProjection.apply(H.to(W.dtype), W, self.eps)              # per stream: [B, T, n, 2 + n]
        p_post, p_alpha = p.split([1, 1 + self.n], dim=-1)
        s_a, s_b = static["scale"][l]
        return (
            C + s_a * torch.tanh(p_alpha).transpose(-1, -2),  # alpha^T: [.., 1+n, n]
            post + s_b * torch.tanh(p_post).squeeze(-1),
        )


@register("mhc")
class ManifoldHyperConnections(_Streams):
    """mHC, n = ``residual.n_streams``, ``residual.sinkhorn_iters`` Sinkhorn-Knopp iterations;
    ``residual.dynamic=False`` keeps only the static logits b.

    Parameters (under ``residual.``), per sublayer l: ``static_pre`` [L, n] (b_pre),
    ``static_post`` [L, n] (b_post), ``static_res`` [L, n, n] (b_res, [i, j]: stream j into
    stream i); dynamic only: ``dynamic_proj`` [L, nD, 2n + n^2] (phi: columns pre, post, then
    res row-major; rows index vec(H) stream-major) and ``dynamic_scale`` [L, 3] (a_pre,
    a_post, a_res). The RMSNorm of vec(H) has no weight of its own (it would fold into phi).
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        L, n, D = self.n_sublayers, self.n, self.d_model
        self.iters = self.rcfg.sinkhorn_iters
        self.static_pre = nn.Parameter(torch.empty(L, n))
        self.static_post = nn.Parameter(torch.empty(L, n))
        self.static_res = nn.Parameter(torch.empty(L, n, n))
        if self.dynamic:
            self.dynamic_proj = nn.Parameter(torch.empty(L, n * D, 2 * n + n * n))
            self.dynamic_scale = nn.Parameter(torch.empty(L, 3))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Near hc's Eq. 14 (see the module docstring): read ~ e_{l mod n}, write = 1, mix ~ I.
        L, n = self.n_sublayers, self.n
        with torch.no_grad():
            self.static_pre.fill_(-INIT_LOGIT)
            self.static_pre[torch.arange(L), torch.arange(L) % n] = INIT_LOGIT
            self.static_post.zero_()
            self.static_res.copy_((torch.eye(n) - 1.0).mul(INIT_LOGIT).expand_as(self.static_res))
            if self.dynamic:
                self.dynamic_proj.zero_()
                self.dynamic_scale.fill_(INIT_SCALE)

    def static_coefficients(self, dt: torch.dtype) -> dict:
        if self.dynamic:  # the nonlinearities act after the per-token terms are added
            names = ("static_pre", "static_post", "static_res", "dynamic_proj", "dynamic_scale")
            return {name: getattr(self, name).to(dt).unbind(0) for name in names}
        # Static: every sublayer's coefficients at once, Sinkhorn included, once per forward.
        pre = torch.sigmoid(self.static_pre.to(dt)).unsqueeze(-2)                # [L, 1, n]
        C = torch.cat([pre, sinkhorn(self.static_res.to(dt), self.iters)], dim=-2)  # [L, 1+n, n]
        return {"C": C.unbind(0), "post": (2 * torch.sigmoid(self.static_post.to(dt))).unbind(0)}

    def coefficients(self, static: dict, H: Tensor, l: int) -> tuple[Tensor, Tensor]:
        if not self.dynamic:
            return static["C"][l], static["post"][l]
        n = self.n
        phi = static["dynamic_proj"][l]                                            # [nD, 2n + n^2]
        v = H.flatten(-2).to(phi.dtype)                                            # vec(H): [B, T, nD]
        p_pre, p_post, p_res = _ScaledProjection.apply(v, phi, self.eps).split([n, n, n * n], dim=-1)
        a_pre, a_post, a_res = static["dynamic_scale"][l]
        pre = torch.sigmoid(a_pre * p_pre + static["static_pre"][l])
        post = 2 * torch.sigmoid(a_post * p_post + static["static_post"][l])
        res_logits = (a_res * p_res).unflatten(-1, (n, n)) + static["static_res"][l]
        return torch.cat([pre.unsqueeze(-2), sinkhorn(res_logits, self.iters)], dim=-2), post
