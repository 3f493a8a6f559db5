"""Parameter names: resstream's LM against Hugging Face Llama/Qwen2 and llama.cpp's GGUF.

resstream numbers sublayers (attention at l = 2i, MLP at l = 2i + 1); both other formats
number transformer layers i. Every name outside ``residual.`` maps one to one; nothing
else is renamed, reshaped or skipped here (GGUF's Q/K row order is handled by the GGUF reader).
"""
from __future__ import annotations

import re

_SUBLAYER = re.compile(r"sublayers\.(\d+)\.(\w+)\.(weight|bias)")

# sublayer parameter -> (HF module inside layer i, GGUF tensor inside block i); "norm" depends on parity
_ATTN = {"wq": ("self_attn.q_proj", "attn_q"), "wk": ("self_attn.k_proj", "attn_k"),
         "wv": ("self_attn.v_proj", "attn_v"), "wo": ("self_attn.o_proj", "attn_output"),
         "norm": ("input_layernorm", "attn_norm")}
_MLP = {"w_gate": ("mlp.gate_proj", "ffn_gate"), "w_up": ("mlp.up_proj", "ffn_up"),
        "w_down": ("mlp.down_proj", "ffn_down"), "norm": ("post_attention_layernorm", "ffn_norm")}
_TOP = {"embed.weight": ("model.embed_tokens.weight", "token_embd.weight"),
        "final_norm.weight": ("model.norm.weight", "output_norm.weight"),
        "head.weight": ("lm_head.weight", "output.weight")}


def _external(name: str, which: int) -> str:
    if name in _TOP:
        return _TOP[name][which]
    m = _SUBLAYER.fullmatch(name)
    if m is None:
        raise KeyError(f"parameter '{name}' has no counterpart outside resstream")
    l, part, kind = int(m.group(1)), m.group(2), m.group(3)
    table = _ATTN if l % 2 == 0 else _MLP
    if part not in table:
        raise KeyError(f"parameter '{name}' has no counterpart outside resstream")
    module = table[part][which]
    return f"model.layers.{l // 2}.{module}.{kind}" if which == 0 else f"blk.{l // 2}.{module}.{kind}"


def hf_name(name: str) -> str:
    """'sublayers.3.w_up.weight' -> 'model.layers.1.mlp.up_proj.weight'."""
    return _external(name, 0)


def gguf_name(name: str) -> str:
    """'sublayers.2.wq.weight' -> 'blk.1.attn_q.weight'."""
    return _external(name, 1)
