"""The model section of a config: the shape of the decoder LM and its residual stream."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from resstream.config import ConfigBase, require
from resstream.residual.config import ResidualConfig


@dataclass
class ModelConfig(ConfigBase):
    """Shape of the decoder LM. L = 2 * n_layers sublayers (attention, MLP alternating).

    n_kv_heads: None means n_heads (plain multi-head attention); fewer means grouped-query.
    head_dim: None means d_model / n_heads; pretrained models may set it (then the attention
    width n_heads * head_dim can differ from d_model).
    mlp_hidden: None means the SwiGLU default, 8/3 * d_model rounded up to a multiple of 64.
    qkv_bias: biases on the query, key and value projections (Qwen2-style models).
    """

    vocab_size: int
    d_model: int = 256
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    mlp_hidden: Optional[int] = None
    qkv_bias: bool = False
    rope_base: float = 10000.0
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    residual: ResidualConfig = field(default_factory=ResidualConfig)

    def validate(self) -> None:
        require(self.vocab_size >= 2, f"model.vocab_size: must be >= 2, got {self.vocab_size}")
        require(self.d_model >= 1, f"model.d_model: must be >= 1, got {self.d_model}")
        require(self.n_layers >= 1, f"model.n_layers: must be >= 1, got {self.n_layers}")
        require(self.n_heads >= 1, f"model.n_heads: must be >= 1, got {self.n_heads}")
        if self.head_dim is None:
            require(
                self.d_model % self.n_heads == 0,
                f"model.n_heads: {self.n_heads} heads do not divide d_model {self.d_model}",
            )
            require(
                (self.d_model // self.n_heads) % 2 == 0,
                f"model.n_heads: head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE",
            )
        else:
            require(self.head_dim >= 2 and self.head_dim % 2 == 0, f"model.head_dim: must be even and >= 2 for RoPE, got {self.head_dim}")
        kv = self.kv_heads
        require(kv >= 1, f"model.n_kv_heads: must be >= 1, got {kv}")
        require(
            self.n_heads % kv == 0,
            f"model.n_kv_heads: {kv} KV heads do not divide n_heads {self.n_heads}",
        )
        require(self.mlp_hidden is None or self.mlp_hidden >= 1, f"model.mlp_hidden: must be >= 1, got {self.mlp_hidden}")
        require(self.max_seq_len >= 1, f"model.max_seq_len: must be >= 1, got {self.max_seq_len}")
        require(self.rope_base > 1, f"model.rope_base: must be > 1 (rotary wavelengths grow with it), got {self.rope_base}")
        require(0 < self.norm_eps < 1, f"model.norm_eps: must be in (0, 1), got {self.norm_eps}")
        # weights drawn with std past 1 make the first logits overflow; 0 or less is no init
        require(0 < self.init_std <= 1, f"model.init_std: must be in (0, 1], got {self.init_std}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    @property
    def dim_per_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim
