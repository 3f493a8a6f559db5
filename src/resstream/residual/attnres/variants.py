"""The ablations of Attention Residuals' Table 4 (Kimi Team, arXiv:2603.15031, section 5.3), as
options of Full (``attnres``) and Block (``block_attnres``) AttnRes.

    query    "static"  w_l: one learned vector per row (the paper's AttnRes, the default)
             "input"   w_l + W_l RMSNorm(s_new) / sqrt(D): the query also depends on the token,
                       through a d x d projection W_l (zero init) of the row's newest source
             "none"    input-independent mixing: one learned scalar c_{l,i} per row and source
                       replaces the query-key logit (no query, no keys)
    score    "softmax" (default) or "sigmoid": each source's weight is sigmoid(z_i) on its own,
             so the weights need not sum to one
    key_norm True (default) or False: the keys are the raw sources, z_i = w_l · s_i
    heads    H > 1: the D channels split into H groups, each with its own query slice, its own
             key RMSNorm over the group and its own softmax over the sources ("multihead")

One row l reads its sources s_0..s_n (Full: the embedding and every earlier output; Block:
the embedding, the completed block sums and the open block's partial sum)::

    s_0   s_1  ...  s_n (newest)
     │     │         │──► [query="input"]  q = w_l + W_l RMSNorm(s_n)/sqrt(D)   else q = w_l
     └─────┴────┬────┘
                ▼   per channel group h:  k_{i,h} = RMSNorm_{g_l}(s_{i,h})   (or s_{i,h})
                    z_{i,h} = q_h · k_{i,h}                                 (or c_{l,i})
                    alpha_{i,h} = softmax_i(z_{.,h})                        (or sigmoid(z_{i,h}))
                    x_l[h] = sum_i alpha_{i,h} s_{i,h}

Every ablation starts as PreNorm, like AttnRes: zero queries, projections and scalars give
uniform weights, and the sigmoid gives 1/2 to every source, whose sum is PreNorm's hidden
state, which the scale-invariant norms that follow cannot tell from the mean. The diagnostic
weights of a multi-head row are the mean over its heads.

These run on a plain path (stacked sources, plain autograd), not the fast kernels: they are
for ablation studies, and the input-dependent query cannot be batched the way Block's phase 1
batches the static queries of a block. Choices where the paper is silent: the projection reads
the row's newest source (Full: the previous sublayer's output; Block: the partial sum, or the
newest block when the row opens a block) RMS-normalised without a weight, and keeps w_l as its
bias; the 1/sqrt(D) keeps an AdamW step on W_l as large, in the query, as a step on w_l; the
learned scalars go through the same softmax (or sigmoid) as logits would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resstream.config import ConfigBase, ConfigError, require
from resstream.residual.base import Boundary, ResidualStream, State, stats_dtype

QUERIES, SCORES = ("static", "input", "none"), ("softmax", "sigmoid")
DEFAULTS = {"query": "static", "score": "softmax", "key_norm": True, "heads": 1}


@dataclass
class AblationOptions(ConfigBase):
    """Table 4's ablations (see residual/attnres/variants.py): query static | input | none,
    score softmax | sigmoid, key_norm, heads (channel groups)."""

    query: str = "static"
    score: str = "softmax"
    key_norm: bool = True
    heads: int = 1

    def validate(self) -> None:
        super().validate()
        where = "model.residual."
        require(self.query in QUERIES, f"{where}query: must be one of {', '.join(QUERIES)}, got '{self.query}'")
        require(self.score in SCORES, f"{where}score: must be softmax or sigmoid, got '{self.score}'")
        require(self.heads >= 1, f"{where}heads: must be >= 1, got {self.heads}")
        if self.query == "none":
            require(self.heads == 1 and self.key_norm, f"{where}query: 'none' mixes with one scalar per source and "
                                                       "has no keys; leave heads and key_norm at their defaults")

    def is_ablation(self) -> bool:
        return any(getattr(self, k) != v for k, v in DEFAULTS.items())


class SwitchesToAblation:
    """Mixin of a fast AttnRes stream: built with ablation options (``is_ablation``), the
    constructor returns ``ablation_class`` instead, the plain path of the same kind."""

    ablation_class: type

    def __new__(cls, options=None, *args, **kwargs):
        if options is not None and options.is_ablation():
            stream = cls.ablation_class(options, *args, **kwargs)
            stream.kind = cls.kind
            return stream
        return super().__new__(cls)


def _rms(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class AblationStream(ResidualStream):
    """The plain path of a Full or Block AttnRes stream with ablation options; full.py and
    block.py build one of its two subclasses when an ablation option is set."""

    mixes_depth = True

    def __init__(self, options, n_sublayers: int, d_model: int) -> None:
        super().__init__(options, n_sublayers, d_model)
        o = options
        if d_model % o.heads:
            raise ConfigError(f"model.residual.heads: {o.heads} channel groups do not divide d_model {d_model}")
        self.eps, self.heads = o.key_norm_eps, o.heads
        self.weights_sum_to_one = o.score == "softmax"
        rows = n_sublayers + 1
        self.register_parameter("queries", None)
        self.register_parameter("key_norm_weight", None)
        self.register_parameter("query_proj", None)
        self.register_parameter("source_logits", None)
        if o.query == "none":
            self.source_logits = nn.Parameter(torch.zeros(rows, self.max_sources()))
        else:
            self.queries = nn.Parameter(torch.zeros(rows, d_model))
            if o.key_norm and o.key_norm_learnable:
                self.key_norm_weight = nn.Parameter(torch.ones(rows, d_model))
            if o.query == "input":
                self.query_proj = nn.Parameter(torch.zeros(rows, d_model, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.queries, self.query_proj, self.source_logits):
                if p is not None:
                    p.zero_()
            if self.key_norm_weight is not None:
                self.key_norm_weight.fill_(1.0)

    def max_sources(self) -> int:
        raise NotImplementedError

    def mix(self, row: int, sources: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Row ``row``'s mixture of ``sources`` (newest last) [B, T, D] and its weights [B, T, n]."""
        o, H = self.options, self.heads
        V = torch.stack(sources, dim=-2)  # [B, T, n, D]
        n, dt = V.shape[-2], stats_dtype(V)
        if o.query == "none":
            z = self.source_logits[row, :n].to(dt).expand(*V.shape[:-1]).unsqueeze(-1)  # [B, T, n, 1]
        else:
            q = self.queries[row].to(dt)
            if o.query == "input":
                proj = self.query_proj[row].to(dt) * self.d_model ** -0.5
                q = q + _rms(sources[-1].to(dt), self.eps) @ proj.t()  # [B, T, D]
            Vh = V.to(dt).unflatten(-1, (H, -1))  # [B, T, n, H, D/H]
            K = _rms(Vh, self.eps) if o.key_norm else Vh
            if self.key_norm_weight is not None:
                K = K * self.key_norm_weight[row].to(dt).unflatten(-1, (H, -1))
            z = (K * q.unflatten(-1, (H, -1)).unsqueeze(-3)).sum(-1)  # [B, T, n, H]
        alpha = torch.softmax(z, dim=-2) if o.score == "softmax" else torch.sigmoid(z)
        x = (alpha.unsqueeze(-1).to(V.dtype) * V.unflatten(-1, (alpha.shape[-1], -1))).sum(-3).flatten(-2)
        return x, alpha.mean(-1)


class AblationFull(AblationStream):
    """Full AttnRes with ablation options. State: ``values`` v_0 = emb, v_1 = f_0, ..."""

    source_legend = {"emb": "token embedding", "f{i}": "output of sublayer i"}

    def max_sources(self) -> int:
        return self.n_sublayers + 1

    def init(self, emb: Tensor) -> State:
        return {"values": (emb,)}

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        return self.mix(l, state["values"])

    def write(self, state: State, l: int, y: Tensor) -> State:
        return {"values": state["values"] + (y,)}

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        return self.mix(self.n_sublayers, state["values"])

    def stage_boundary(self, state: State, l: int) -> Boundary:
        return Boundary(history={f"v{i}": v for i, v in enumerate(state["values"])})  # never change once written

    def from_boundary(self, boundary: Boundary, l: int) -> State:
        return {"values": tuple(boundary.history[f"v{i}"] for i in range(l + 1))}

    def source_names(self, l: int) -> list[str]:
        return ["emb"] + [f"f{i}" for i in range(l)]


class AblationBlock(AblationStream):
    """Block AttnRes with ablation options. State: ``blocks`` (b_0 = emb and the completed block
    sums) and ``partial`` (the running sum of the open block, None when a block opens)."""

    source_legend = {"emb": "token embedding", "B{j}": "sum of block j", "partial": "running sum of the open block"}

    def __init__(self, options, n_sublayers: int, d_model: int) -> None:
        self.S = options.block_size
        super().__init__(options, n_sublayers, d_model)

    def max_sources(self) -> int:
        return 1 + -(-self.n_sublayers // self.S)

    def init(self, emb: Tensor) -> State:
        return {"blocks": (emb,), "partial": None}

    def read_weighted(self, state: State, l: int) -> tuple[Tensor, Tensor]:
        extra = (state["partial"],) if l % self.S else ()
        return self.mix(l, state["blocks"] + extra)

    def write(self, state: State, l: int, y: Tensor) -> State:
        partial = y if l % self.S == 0 else state["partial"] + y
        if l % self.S == self.S - 1 or l == self.n_sublayers - 1:  # the block is complete
            return {"blocks": state["blocks"] + (partial,), "partial": None}
        return {"blocks": state["blocks"], "partial": partial}

    def finish_weighted(self, state: State) -> tuple[Tensor, Tensor]:
        return self.mix(self.n_sublayers, state["blocks"])

    def stage_boundary(self, state: State, l: int) -> Boundary:
        fresh = {} if state["partial"] is None else {"partial": state["partial"]}
        return Boundary(fresh=fresh, history={f"b{j}": b for j, b in enumerate(state["blocks"])})

    def from_boundary(self, boundary: Boundary, l: int) -> State:
        blocks = tuple(boundary.history[f"b{j}"] for j in range(1 + l // self.S))
        return {"blocks": blocks, "partial": boundary.fresh.get("partial")}

    def source_names(self, l: int) -> list[str]:
        if l >= self.n_sublayers:
            return ["emb"] + [f"B{j + 1}" for j in range(-(-self.n_sublayers // self.S))]
        names = ["emb"] + [f"B{j + 1}" for j in range(l // self.S)]
        return names + ["partial"] if l % self.S else names
