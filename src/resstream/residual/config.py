"""The residual section of a model config: which kind joins the sublayers, with its options."""
from __future__ import annotations

from dataclasses import dataclass

from resstream.config import ConfigBase, require


@dataclass
class ResidualConfig(ConfigBase):
    """How sublayer outputs are joined.

    kind: a registered residual kind (``resstream.residual.available_kinds()``).
    block_size: Block AttnRes sublayers per block S (S = 1 is Full AttnRes).
    key_norm_eps / key_norm_learnable: the RMSNorm applied to AttnRes keys.
    n_streams: hyper-connection expansion rate n.
    dynamic: dynamic (input-dependent) hyper-connections.
    sinkhorn_iters: mHC's Sinkhorn-Knopp iterations.
    window: depth_swa's window W (sublayer outputs visible besides the embedding).
    recompute: AttnRes keeps less for backward and recomputes it there (less memory, more
    time); only for kinds that support it.
    ddl_beta_init: DDL's gate beta = 2 sigmoid(.) at init, in (0, 2): 1 is the authors'
    default (projection regime); values near 0 start near the identity shortcut.
    """

    kind: str = "prenorm"
    block_size: int = 4
    key_norm_eps: float = 1e-6
    key_norm_learnable: bool = True
    n_streams: int = 4
    dynamic: bool = True
    sinkhorn_iters: int = 20
    window: int = 4
    recompute: bool = False
    ddl_beta_init: float = 1.0

    def validate(self) -> None:
        from resstream.residual import available_kinds  # late: the registry imports config

        kinds = available_kinds()
        require(self.kind in kinds, f"model.residual.kind: unknown residual kind '{self.kind}'; known kinds: {', '.join(kinds)}")
        require(self.block_size >= 1, f"model.residual.block_size: must be >= 1 (sublayers per block), got {self.block_size}")
        require(self.key_norm_eps > 0, f"model.residual.key_norm_eps: must be > 0, got {self.key_norm_eps}")
        require(self.n_streams >= 1, f"model.residual.n_streams: must be >= 1, got {self.n_streams}")
        require(self.sinkhorn_iters >= 1, f"model.residual.sinkhorn_iters: must be >= 1, got {self.sinkhorn_iters}")
        require(self.window >= 1, f"model.residual.window: must be >= 1, got {self.window}")
        if self.recompute:
            from resstream.residual.base import _REGISTRY

            require(
                getattr(_REGISTRY[self.kind], "supports_recompute", False),
                f"model.residual.recompute: kind '{self.kind}' has no recompute path; kinds that have one: "
                + ", ".join(k for k, c in _REGISTRY.items() if getattr(c, "supports_recompute", False)),
            )
        require(
            0.0 < self.ddl_beta_init < 2.0,
            f"model.residual.ddl_beta_init: must be in (0, 2) (beta = 2 sigmoid(logit)), got {self.ddl_beta_init}",
        )
