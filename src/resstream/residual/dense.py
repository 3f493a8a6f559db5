"""DenseFormer: depth-weighted averaging after every transformer block (Pagliardini, Mohtashami,
Fleuret, Jaggi, "DenseFormer: Enhancing Information Flow in Transformers via Depth Weighted
Averaging", NeurIPS 2024, arXiv:2402.02622).

A block is two sublayers (attention, then MLP) joined by ordinary PreNorm residuals. Its
output X_i (the hidden state after the block) is stored, and the next block reads the
depth-weighted average (DWA) of the embedding and every block output so far::

    emb = X_0 ─► [block 1] ─► X_1 ─► DWA_1(X_0, X_1) = Y_1 ─► [block 2] ─► X_2 ─► DWA_2(X_0..X_2) = Y_2
              ... ─► [block n] ─► X_n ─► DWA_n(X_0..X_n) = Y_n ─► final norm ─► head

    block i:  Y_{i-1} ──►(+)──►(+)──► X_i        (PreNorm residuals inside the block)
                         ▲ │   ▲ │
                      attn─┘ mlp─┘

    X_i = B_i(Y_{i-1}),   Y_i = DWA_i(X_0..X_i) = sum_{j=0..i} a_ij X_j,   output Y_n

The accumulator holds the raw block outputs X_j, never the DWA outputs Y_j (paper section 3,
and the authors' package). This is the 1x1 DenseFormer: no dilation, a DWA after every block.

Parameters: ``residual.dwa.{i}`` for i = 0..n-1, the i+2 weights (a_{i+1,0}..a_{i+1,i+1})
of the DWA after block i+1; n(n+3)/2 scalars in all (n = n_layers). Init: weight 1 on the
current block output, 0 elsewhere, so Y_i = X_i and the model is exactly PreNorm (no norm
epsilon involved). They are unconstrained (no softmax, no sum-to-one). Weight decay: the
trainer exempts every ``residual.*`` parameter, so the DWA weights are never decayed (the
authors' experiment code appears to decay them with every nn.Linear; we do not).

Mixing weights for diagnostics, over source names from ``source_names``: the attention
sublayer of block i+1 reads Y_i, i.e. the DWA weights over [emb, X1..Xi]; its MLP reads
Y_i + f_attn, the same weights plus weight 1 on that attention output; the final mixture is
the last DWA. The weights are the same at every token, returned expanded to [B, T, n].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from resstream.residual import native
from resstream.residual.base import Boundary, ResidualStream, State, register
from resstream.residual.compiled import native_kernels


def denseformer_reference(emb: Tensor, sublayers, params: dict, cfg) -> tuple[Tensor, list]:
    """Float64 specification (paper section 3): X_0 = emb, X_i = B_i(Y_{i-1}) with B_i a
    PreNorm block (attention then MLP), Y_i = sum_{j=0..i} a_ij X_j (a_i = ``dwa.{i-1}``),
    output Y_n. Weights: attention of block i reads Y_{i-1} = [a_{i-1}] over [X_0..X_{i-1}]
    (Y_0 = X_0: weight [1]); its MLP reads Y_{i-1} + attn, i.e. [a_{i-1}, 1]; final: a_n."""
    B, T, _ = emb.shape
    f64 = torch.float64

    def per_token(a: Tensor) -> Tensor:
        return a.reshape(1, 1, -1).repeat(B, T, 1)

    X = [emb.to(f64)]
    Y = X[0]
    a_prev = torch.ones(1, dtype=f64)
    weights = []
    for i in range(1, len(sublayers) // 2 + 1):
        attn, mlp = sublayers[2 * i - 2], sublayers[2 * i - 1]
        weights.append(per_token(a_prev))
        U = Y + attn(Y)
        weights.append(per_token(torch.cat([a_prev, torch.ones(1, dtype=f64)])))
        X.append(U + mlp(U))
        a = params[f"dwa.{i - 1}"].to(f64)
        Y = sum(a[j] * X[j] for j in range(i + 1))
        a_prev = a
    return Y, weights + [per_token(a_prev)]


@register("denseformer", reference=denseformer_reference)
class DenseFormer(ResidualStream):
    """DenseFormer (Pagliardini et al., NeurIPS 2024): a depth-weighted average after every block.

    State: ``h`` the running hidden state [B, T, D] and ``blocks``, the token's block outputs
    X_0 = emb, X_1, ... that the depth-weighted averages read.
    """

    identity_at_init = True
    mixes_depth = True
    weights_sum_to_one = False  # DWA weights are free scalars, not a softmax
    source_legend = {"emb": "token embedding", "X{j}": "output of layer j",
                     "f{i}": "output of sublayer i (the attention output its MLP also reads)"}

    def __init__(self, options, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        self.n_blocks = self.n_sublayers // 2
        self.dwa = nn.ParameterList([nn.Parameter(torch.zeros(i + 2)) for i in range(self.n_blocks)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Identity init (paper section 3): a_ii = 1, a_ij = 0 for j < i.
        with torch.no_grad():
            for a in self.dwa:
                a.zero_()
                a[-1] = 1.0

    def init(self, emb: Tensor) -> State:
        return {"h": emb, "blocks": (emb,)}

    def _read_weights(self, l: int, h: Tensor) -> Tensor:
        """Coefficients of read(l) over source_names(l), expanded to [B, T, n]."""
        b = l // 2  # sublayer l belongs to block b + 1, whose input is Y_b
        one = torch.ones(1, dtype=h.dtype, device=h.device)
        a = one if b == 0 else self.dwa[b - 1].to(h.dtype)  # Y_0 = X_0 = emb
        if l % 2:  # the MLP reads Y_b + f_{l-1}
            a = torch.cat([a, one])
        return a.expand(*h.shape[:-1], -1)

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        h = state["h"]
        return h, self._read_weights(l, h)

    def read(self, state: State, l: int) -> Tensor:
        return state["h"]  # read_weighted()[0], without building the weights nobody asked for

    def finish(self, state: State) -> Tensor:
        return state["h"]

    def inference(self, scratch: dict | None = None) -> "DenseDecoder":
        return DenseDecoder(self, {} if scratch is None else scratch)

    def write(self, state: State, l: int, y: Tensor) -> State:
        h = state["h"] + y  # PreNorm residual inside the block
        if l % 2 == 0:
            return {**state, "h": h}
        # The block is complete: store X_{b+1} and read the next block's input from the DWA.
        blocks = state["blocks"] + (h,)
        a = self.dwa[l // 2].to(h.dtype)
        mixed = a[0] * blocks[0]
        for j in range(1, len(blocks)):
            # addcmul: one pass per source, and autograd keeps only X_j, which is alive anyway
            mixed = torch.addcmul(mixed, blocks[j], a[j])
        return {"h": mixed, "blocks": blocks}

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        h = state["h"]
        return h, self.dwa[-1].to(h.dtype).expand(*h.shape[:-1], -1)

    def stage_boundary(self, state: State, l: int) -> Boundary:
        # block outputs X_j are stored once and never change; h moves on every sublayer
        return Boundary(fresh={"h": state["h"]}, history={f"X{j}": x for j, x in enumerate(state["blocks"])})

    def from_boundary(self, boundary: Boundary, l: int) -> State:
        blocks = tuple(boundary.history[f"X{j}"] for j in range(len(boundary.history)))
        return {"h": boundary.fresh["h"], "blocks": blocks}

    def source_names(self, l: int) -> list[str]:
        """``emb``; ``X{j}`` the output of block j (its hidden state after the MLP); ``f{l-1}``
        the attention output an MLP sublayer also reads."""
        b = min(l, self.n_sublayers) // 2
        names = ["emb"] + [f"X{j}" for j in range(1, b + 1)]
        return names + [f"f{l - 1}"] if l < self.n_sublayers and l % 2 else names


class DenseDecoder:
    """DenseFormer's lean inference path (``LM.decode``): the block outputs X_j in one buffer
    [B, T, n+1, D] (written once each, in place, reused across steps through ``scratch``) and
    each DWA one matmul of its weights with the X_j written so far, instead of one multiply-add
    per block output. A read's result is valid until the next DWA."""

    def __init__(self, stream: DenseFormer, scratch: dict) -> None:
        self.stream, self.scratch = stream, scratch

    def init(self, emb: Tensor) -> State:
        lib = native_kernels(emb, *self.stream.dwa)
        key = (id(self.stream), tuple(emb.shape), emb.dtype, emb.device, lib is not None)
        if key not in self.scratch:
            self.scratch[key] = self._native_buffers(emb, lib) if lib is not None else self._buffers(emb)
        slots, dwa = self.scratch[key]
        slots[0].copy_(emb)
        return {"h": emb, "slots": slots, "dwa": dwa}

    def _buffers(self, emb: Tensor):
        """X [B, T, n+1, D]: its slots, and the DWA after each block j (dwa[j]() -> Y_j): one matmul
        of the weights with slots 0..j as [B*T, j+1, D]."""
        B, T, D = emb.shape
        X = emb.new_empty(B, T, self.stream.n_blocks + 1, D)

        def dwa(j: int):
            upto = X.view(B * T, -1, D)[:, : j + 1]

            def run() -> Tensor:
                a = self.stream.dwa[j - 1]
                return torch.matmul(a if a.dtype == emb.dtype else a.to(emb.dtype), upto).view(emb.shape)
            return run
        return X.unbind(2), [None] + [dwa(j) for j in range(1, X.shape[2])]

    def _native_buffers(self, emb: Tensor, lib):
        """float32 on a CPU: X slot-major [n+1, B, T, D], and each DWA a native mixture (rs_mix,
        its weights the same for every token: token stride 0) into one output buffer, its pointer
        tables made once."""
        X, out = emb.new_empty(self.stream.n_blocks + 1, *emb.shape), emb.new_empty(emb.shape)
        slots, N, D = X.unbind(0), emb.numel() // emb.shape[-1], emb.shape[-1]

        def dwa(j: int, a: Tensor):
            vp = native.addresses([slots[i].data_ptr() for i in range(j + 1)])
            wp = native.addresses([a.data_ptr() + 4 * i for i in range(j + 1)])
            ws, op, nt = native.longs([0] * (j + 1)), native.addresses([out.data_ptr()]), native.threads(N * D * (j + 2))

            def run() -> Tensor:
                lib.rs_mix(N, D, j + 1, 1, vp, wp, ws, None, op, nt)
                return out
            return run
        return slots, [None] + [dwa(j, a.detach()) for j, a in enumerate(self.stream.dwa, start=1)]

    def read(self, state: State, l: int) -> Tensor:
        return state["h"]

    def write(self, state: State, l: int, y: Tensor) -> State:
        h = state["h"] + y
        if l % 2 == 0:
            state["h"] = h
            return state
        j = l // 2 + 1  # block j is complete: X_j, then Y_j = sum_i a_ji X_i
        state["slots"][j].copy_(h)
        state["h"] = state["dwa"][j]()
        return state

    def finish(self, state: State) -> Tensor:
        return state["h"]
