"""The lean inference path of the AttnRes family: what ``LM.decode`` runs (no gradient).

At batch 1 a decoding step is a few hundred tiny operators, each costing microseconds
whatever its size, so here what counts is the number of operators per sublayer, not the
passes. No autograd Functions, no gradient sums, no tuples of sources: a token's sources
live in one buffer V [N, slots, D] (N = B*T tokens), written once each, in place; their
logits in Z [N, slots, L+1] (source-major: a new source writes its logits for every query
that will read it with one matmul; -inf where a row never reads it). A read is one softmax
over its column of Z and one batched matmul over V::

    write source i:  V[:, i] = v_i          Z[:, i, rows] = RMSNorm(v_i) @ Q[rows]^T
    read row r:      alpha = softmax(Z[:, :n, r])      x_r = alpha @ V[:, :n]

On a CPU with the native kernels (residual/native.py; float32) the buffers are slot-major
(V [slots, N, D], Z [L+1, slots, N]) and a read is one kernel call (the training path's
softmax-and-mix kernel), a write's logits another (RMS norm and the dot products per token),
with their pointer tables made once: no PyTorch operator at all beyond the copy into the slot.

Sources a row does not see (outside depth_swa's window) keep logit -inf, so weight 0. The
buffers and every view into them are made once per token count N and kept in the caller's
``scratch`` dict (``DecodeCache.residual_scratch``, alive for one generation), so a decoding
step runs about five operators per sublayer where PreNorm runs one. Everything is written in
place, which the training path never does: this state exists only under inference mode, and
a read's result is valid until the next read. Exact up to float rounding:
tests/residual/test_lean.py checks each decoder against the float64 reference,
tests/test_generate.py decoding against the full forward for every kind.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from resstream.residual import native
from resstream.residual.base import State, stats_dtype
from resstream.residual.compiled import native_kernels


class _Buffers:
    """V, Z and the mixture's output for one token shape, with cached views into them."""

    def __init__(self, stream, emb: Tensor, slots: int) -> None:
        B, T, D = emb.shape
        L, N, dt = stream.n_sublayers, B * T, stats_dtype(emb)
        self.stream, self.eps, self.D, self.slots = stream, stream.eps, D, slots
        self.V = emb.new_empty(B, T, slots, D)
        self.Vn = self.V.view(N, slots, D)
        self.Z = torch.full((B, T, slots, L + 1), float("-inf"), dtype=dt, device=emb.device)
        self.Zn = self.Z.view(N, 1, slots, L + 1)
        self.q = torch.empty(L + 1, D, dtype=dt, device=emb.device)
        self.qT = self.q.t()
        self.x = emb.new_empty(N, 1, D)
        self.x_out = self.x.view(B, T, D)
        self.slot = self.V.unbind(2)  # slot i: [B, T, D]
        self._cols: dict[tuple[int, int, int], tuple[Tensor, Tensor]] = {}
        self._rows: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def refresh_queries(self) -> None:
        """The effective queries, into the same buffer (the cached views stay valid)."""
        s = self.stream
        if s.key_norm_weight is None:
            self.q.copy_(s.queries)
        else:
            torch.mul(s.queries, s.key_norm_weight, out=self.q)

    def logits(self, slot: int, v: Tensor, first: int, last: int) -> None:
        """Logits of the source in ``slot`` (v [B, T, D]) against rows first..last."""
        key = (slot, first, last)
        if key not in self._cols:
            self._cols[key] = (self.qT[:, first : last + 1], self.Z[:, :, slot, first : last + 1])
        q, out = self._cols[key]
        k = F.rms_norm(v if v.dtype == q.dtype else v.to(q.dtype), (self.D,), eps=self.eps)
        torch.matmul(k, q, out=out)

    def put(self, slot: int, v: Tensor, first: int, last: int) -> None:
        self.slot[slot].copy_(v)
        self.logits(slot, v, first, last)

    def mix(self, row: int, n: int) -> Tensor:
        """The mixture read by ``row`` over slots 0..n-1: [B, T, D], valid until the next mix."""
        key = (row, n)
        if key not in self._rows:
            self._rows[key] = (self.Zn[..., :n, row], self.Vn[:, :n])
        z, v = self._rows[key]
        alpha = torch.softmax(z, dim=-1)
        torch.matmul(alpha if alpha.dtype == v.dtype else alpha.to(v.dtype), v, out=self.x)
        return self.x_out


class _NativeBuffers(_Buffers):
    """The same buffers slot-major, for the native kernels (float32 CPU): a read is one call of
    rs_softmax_mix, a source's logits one call of rs_normed_logits, their arguments made once."""

    def __init__(self, stream, emb: Tensor, slots: int, lib) -> None:
        B, T, D = emb.shape
        L, N = stream.n_sublayers, B * T
        self.stream, self.eps, self.D, self.N, self.lib, self.slots = stream, stream.eps, D, N, lib, slots
        self.V = emb.new_empty(slots, B, T, D)
        self.Z = torch.full((L + 1, slots, N), float("-inf"), dtype=torch.float32)
        self.alpha = torch.empty(slots, N, dtype=torch.float32)
        self.q = torch.empty(L + 1, D, dtype=torch.float32)
        self.x = emb.new_empty(B, T, D)
        self.x_out = self.x
        self.slot = self.V.unbind(0)  # slot i: [B, T, D], contiguous
        self._cols: dict[tuple[int, int, int], tuple] = {}
        self._rows: dict[tuple[int, int], tuple] = {}

    def logits(self, slot: int, v: Tensor, first: int, last: int) -> None:
        """As _Buffers.logits; v must be the slot's own tensor (put() and BlockDecoder pass it)."""
        key = (slot, first, last)
        if key not in self._cols:
            self._cols[key] = (self.slot[slot].data_ptr(), self.q[first].data_ptr(), self.Z[first, slot].data_ptr(),
                               native.threads(self.N * self.D * (last - first + 2)))
        vp, qp, zp, nt = self._cols[key]
        self.lib.rs_normed_logits(self.N, self.D, last - first + 1, vp, qp, self.eps, zp, self.slots * self.N, nt)

    def put(self, slot: int, v: Tensor, first: int, last: int) -> None:
        self.slot[slot].copy_(v)
        self.logits(slot, self.slot[slot], first, last)

    def mix(self, row: int, n: int) -> Tensor:
        key = (row, n)
        if key not in self._rows:
            vp = native.addresses([self.slot[j].data_ptr() for j in range(n)])
            zp = native.addresses([self.Z[row, j].data_ptr() for j in range(n)])
            self._rows[key] = (vp, zp, native.threads(self.N * self.D * (n + 1)))
        vp, zp, nt = self._rows[key]
        self.lib.rs_softmax_mix(self.N, self.D, n, vp, zp, self.alpha.data_ptr(), self.x.data_ptr(), nt)
        return self.x_out


def _buffers(stream, scratch: dict, emb: Tensor, slots: int) -> _Buffers:
    lib = native_kernels(emb, stream.queries)
    key = (id(stream), tuple(emb.shape), emb.dtype, emb.device, lib is not None)
    buf = scratch.get(key)
    if buf is None:
        buf = scratch[key] = _NativeBuffers(stream, emb, slots, lib) if lib is not None else _Buffers(stream, emb, slots)
    buf.refresh_queries()
    return buf


class HistoryDecoder:
    """Full AttnRes and depth_swa: slot i holds source v_i (v_0 = emb, v_i = f_{i-1}); source i
    is read by rows i..min(i - 1 + W, L) (all later rows without a window)."""

    def __init__(self, stream, scratch: dict) -> None:
        self.stream, self.scratch = stream, scratch

    def init(self, emb: Tensor) -> State:
        L = self.stream.n_sublayers
        buf = _buffers(self.stream, self.scratch, emb, L + 1)
        buf.put(0, emb, 0, L)  # the embedding is in every window
        return {"buf": buf, "emb": emb}

    def read(self, state: State, l: int) -> Tensor:
        return state["emb"] if l == 0 else state["buf"].mix(l, l + 1)

    def write(self, state: State, l: int, y: Tensor) -> State:
        s = self.stream
        last = s.n_sublayers if s.window is None else min(l + s.window, s.n_sublayers)
        state["buf"].put(l + 1, y, l + 1, last)
        return state

    def finish(self, state: State) -> Tensor:
        L = self.stream.n_sublayers
        return state["buf"].mix(L, L + 1)


class BlockDecoder:
    """Block AttnRes: slot 0 = emb, slot j = block j once complete; the open block's running
    partial sum grows in the next free slot, and a sublayer that does not open its block
    computes the partial sum's logit for its own row before reading (one joint softmax over
    the blocks and the partial sum: the same mixture as the two-phase training path)."""

    def __init__(self, stream, scratch: dict) -> None:
        self.stream, self.scratch = stream, scratch

    def init(self, emb: Tensor) -> State:
        s = self.stream
        buf = _buffers(s, self.scratch, emb, -(-s.n_sublayers // s.S) + 1)
        buf.put(0, emb, 0, s.n_sublayers)
        return {"buf": buf, "emb": emb}

    def read(self, state: State, l: int) -> Tensor:
        buf = state["buf"]
        k, i = divmod(l, self.stream.S)  # k completed blocks; i sublayers of the open block done
        if l == 0:
            return state["emb"]
        if i:  # the partial sum (slot k + 1) is a source of this row
            buf.logits(k + 1, buf.slot[k + 1], l, l)
        return buf.mix(l, k + 1 + (i > 0))

    def write(self, state: State, l: int, y: Tensor) -> State:
        buf, S, L = state["buf"], self.stream.S, self.stream.n_sublayers
        k, i = divmod(l, S)
        if i:
            buf.slot[k + 1].add_(y)
        else:
            buf.slot[k + 1].copy_(y)
        if i == S - 1 or l == L - 1:  # the block is complete: a source of rows l+1..L
            buf.logits(k + 1, buf.slot[k + 1], l + 1, L)
        return state

    def finish(self, state: State) -> Tensor:
        buf, L = state["buf"], self.stream.n_sublayers
        return buf.mix(L, buf.slots)
