"""The n-stream residual shared by hyper-connections (hc) and mHC (mhc).

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

hc.py and mhc.py supply the coefficients pre, post and res of each sublayer. Fast path
(checked against reference.py): streams are one tensor [B, T, n, D]; the coefficients of
sublayer l are computed as soon as its input streams exist (in ``init`` and ``write``), x_l
and the mixed streams come from one matmul [1+n, n] @ [n, D] per token and the write is one
fused matmul-add. Few, large kernels matter most on a shared CPU (see sinkhorn.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from resstream.config import ConfigBase, require
from resstream.residual.base import Boundary, ResidualStream, State, stats_dtype
from resstream.residual import native
from resstream.residual.compiled import native_kernels
from resstream.residual.hyper.native_streams import Pending, StreamRead, StreamWrite

# hc's s_a, s_b and mhc's a_pre, a_post, a_res at init (HC Algorithm 2; mHC Table 5).
INIT_SCALE = 0.01


@dataclass
class StreamOptions(ConfigBase):
    """n_streams: the expansion rate n; dynamic: input-dependent coefficients;
    stream_norm_eps: epsilon of the RMSNorm of the streams that feeds the dynamic coefficients."""

    n_streams: int = 4
    dynamic: bool = True
    stream_norm_eps: float = 1e-6

    # hc and mhc once borrowed AttnRes's key_norm_eps for their stream norm
    renamed: ClassVar[dict[str, str]] = {"key_norm_eps": "stream_norm_eps"}

    def validate(self) -> None:
        require(self.n_streams >= 1, f"model.residual.n_streams: must be >= 1, got {self.n_streams}")
        require(0 < self.stream_norm_eps < 1, f"model.residual.stream_norm_eps: must be in (0, 1), got {self.stream_norm_eps}")


class ScaledProjection(torch.autograd.Function):
    """p = (v @ W) / RMS(v) over the last axis of v [..., F], W [F, K] (RMSNorm, then a
    projection, in mHC section 4.3's order). The hand-written backward returns dv in one
    fused matmul-add; autograd's graph (norm backward, matmul backward, their sum) makes
    four more passes over the streams, which dominate this kind's cost on a CPU."""

    @staticmethod
    def forward(ctx, v: Tensor, W: Tensor, eps: float, pending: Pending | None = None) -> Tensor:
        ctx.pending = pending
        if pending is not None:
            pending.projected = True  # the read's backward leaves the streams' gradient to this one
        v2 = v.reshape(-1, v.shape[-1])                                     # [N, F]
        ms = torch.linalg.vector_norm(v2, dim=-1, keepdim=True).square() / v2.shape[-1]
        rstd = torch.rsqrt(ms + eps)                                        # [N, 1]
        raw = v2 @ W                                                        # [N, K]
        ctx.save_for_backward(v2, W, rstd, raw)
        ctx.v_shape = v.shape
        return (raw * rstd).view(*v.shape[:-1], W.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor, None, None]:
        v2, W, rstd, raw = ctx.saved_tensors
        g = g.reshape(raw.shape)
        g_raw = g * rstd
        # d rstd / dv = -rstd^3 v / F, so dv = g_raw W^T - (sum_k g_k raw_k) rstd^3 / F v
        coef = (g * raw).sum(-1, keepdim=True) * rstd.pow(3) / v2.shape[-1]
        pending = ctx.pending
        if pending is not None and pending.gH is not None:
            # the read's and the write's gradient of the same streams (native_streams.py): add
            # this one in place, and return the sum for all three
            dv = pending.gH.view(v2.shape).addmm_(g_raw, W.t()).addcmul_(v2, coef, value=-1)
            pending.gH = None
        else:
            dv = torch.addmm(v2 * -coef, g_raw, W.t())
        return dv.view(ctx.v_shape), v2.t() @ g_raw, None, None


class Streams(ResidualStream):
    """The n-stream wiring shared by hc and mhc; subclasses supply the coefficients.

    State: ``H`` the streams, ``x`` the input of the next sublayer, ``carry`` its mixed
    streams res @ H, ``post`` its write weights, ``l`` its index, ``static`` what a forward
    computes once from the parameters. A pipeline cut carries H alone (the rest is
    recomputed from it and the parameters).
    """

    identity_at_init = True
    fused_kernels = True

    def __init__(self, options: StreamOptions, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        self.n = options.n_streams
        self.dynamic = options.dynamic
        self.eps = options.stream_norm_eps

    def static_coefficients(self, dt: torch.dtype) -> dict:
        """What a forward computes once from the parameters (dt: the coefficients' dtype),
        as per-sublayer tuples: indexing a parameter per sublayer would cost a zero-filled
        parameter-sized gradient per sublayer in backward; unbind's backward is one stack."""
        return {}

    def coefficients(self, static: dict, H: Tensor, l: int, pending: Pending | None = None) -> tuple[Tensor, Tensor]:
        """The width matrix C [.., n+1, n] and the write weights post [.., n] of sublayer l,
        from its input streams H [B, T, n, D]; '..' is [B, T] (dynamic) or nothing (static).
        Row 0 of C is pre (sublayer input x = sum_j C[0, j] h_j), rows 1..n are res
        (carried stream i = sum_j C[1+i, j] h_j). ``pending``: goes to ScaledProjection (see
        native_streams.py)."""
        raise NotImplementedError

    def _prepare(self, state: State, H: Tensor, l: int) -> State:
        lib = native_kernels(H)
        pending = Pending(lib) if lib is not None else None
        C, post = self.coefficients(state["static"], H, l, pending)
        if pending is not None and native_kernels(C, post) is not None:  # one pass each way (native_streams.py)
            x = StreamRead.apply(C[..., 0, :], H, pending)
            return {**state, "l": l, "x": x, "carry": None, "res": C[..., 1:, :], "post": post, "H": H, "pending": pending}
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
        return {**state, "l": l, "x": x, "carry": carry, "post": post, "H": H}

    def init(self, emb: Tensor) -> State:
        H = emb.unsqueeze(-2).expand(*emb.shape[:-1], self.n, emb.shape[-1])  # [B, T, n, D]
        return self._prepare({"static": self.static_coefficients(stats_dtype(emb))}, H, 0)

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, None]:
        assert state["l"] == l, f"read({l}) but the state is prepared for sublayer {state['l']}"
        return state["x"], None

    def write(self, state: State, l: int, y: Tensor) -> State:
        H = self._native_write(state, y) if state.get("pending") is not None else self._batched_write(state, y)
        if l + 1 < self.n_sublayers:
            return self._prepare(state, H, l + 1)
        return {**state, "l": None, "x": None, "carry": None, "res": None, "post": None, "H": H, "pending": None}

    def _native_write(self, state: State, y: Tensor) -> Tensor:
        res, post, H, y = state["res"], state["post"], state["H"], y.to(torch.float32)
        if native.eligible(y):
            return StreamWrite.apply(res, post, H, y, state["pending"])
        # y a tensor subclass (tensor parallelism's outputs): the same formula in torch ops
        return torch.matmul(res, H) + post.unsqueeze(-1) * y.unsqueeze(-2)

    def _batched_write(self, state: State, y: Tensor) -> Tensor:
        carry, post = state["carry"], state["post"]
        *lead, n, D = carry.shape
        # H = carry + post (outer) y as one fused batched matmul-add per token: its backward
        # is two batched matmuls instead of broadcast products and reductions.
        # In the dtype of carry + y (float32 under autocast: see base.outside_autocast).
        dt = torch.promote_types(carry.dtype, y.dtype)
        H = torch.baddbmm(carry.flatten(0, -3).to(dt), post.view(-1, n, 1).to(dt), y.reshape(-1, 1, D).to(dt))
        return H.view(*lead, n, D)

    def finish_weighted(self, state: State) -> tuple[Tensor, None]:
        return state["H"].sum(-2), None

    def stage_boundary(self, state: State, l: int) -> Boundary:
        return Boundary(fresh={"H": state["H"]})  # the rest is recomputed from H and the parameters

    def from_boundary(self, boundary: Boundary, l: int) -> State:
        H = boundary.fresh["H"]
        return self._prepare({"static": self.static_coefficients(stats_dtype(H))}, H, l)
