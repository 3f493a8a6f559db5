"""Hugging Face model folders (config.json + safetensors + tokenizer.json), in and out.

Supported: ``model_type`` llama (Llama 2/3 without rope scaling, SmolLM, SmolLM2, TinyLlama,
...) and qwen2 (Qwen2, Qwen2.5: q/k/v biases). Their computation is resstream's PreNorm LM
exactly: RMSNorm, rotary embeddings on (first half, second half) pairs, grouped-query
attention, SwiGLU. Anything that would compute something else (rope scaling, sliding
windows, attention or MLP output biases, another activation) is refused with the reason
rather than loaded approximately.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from resstream.config import ConfigError
from resstream.model.config import ModelConfig
from resstream.model import LM
from resstream.pretrained.folder import write_folder
from resstream.pretrained.loaded import fill_model
from resstream.pretrained.names import hf_name

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def read_hf_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{folder}/config.json' is unreadable ({e})") from None


def is_hf_folder(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and "model_type" in read_hf_config(path)


def _rope_theta(c: dict, where: str) -> float:
    params = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(f"{where}: rope type '{rope_type}' is not supported (resstream computes plain RoPE); "
                          "models with rope scaling cannot be loaded exactly")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: partial rotary embeddings are not supported")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def config_from_hf(c: dict, where: str) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (a PreNorm residual)."""
    mt = c.get("model_type")
    if mt not in ARCHITECTURES:
        raise ConfigError(f"{where}: model_type '{mt}' is not supported; resstream loads {', '.join(ARCHITECTURES)} models")
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act '{c['hidden_act']}' is not supported (resstream's MLP is SwiGLU)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise ConfigError(f"{where}: attention_bias / mlp_bias models are not supported (biases on every projection)")
    if c.get("use_sliding_window"):
        raise ConfigError(f"{where}: sliding-window attention is not supported")
    d, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    head_dim = c.get("head_dim")
    try:
        return ModelConfig(
            vocab_size=int(c["vocab_size"]), d_model=d, n_layers=int(c["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads"), head_dim=None if head_dim in (None, d // heads) else int(head_dim),
            mlp_hidden=int(c["intermediate_size"]), rope_base=_rope_theta(c, where),
            max_seq_len=int(c.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), qkv_bias=mt == "qwen2",
        )
    except KeyError as e:
        raise ConfigError(f"{where}: config.json has no '{e.args[0]}'") from None


def _weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it (one file or a sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" ({', '.join(pickled)} are pickles, which resstream never loads; save the model with safetensors)" if pickled else ""
        raise ConfigError(f"'{folder}' holds no .safetensors weights{hint}")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: f for k in sf.keys()})
    return out


def load_hf_weights(folder: Path, cfg: ModelConfig, dtype: torch.dtype) -> LM:
    where = str(folder)
    files = _weight_files(folder)
    handles: dict[Path, object] = {}

    def fetch(name: str):
        key = hf_name(name)
        if key not in files:
            return None
        f = files[key]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(key).float()

    used = {hf_name(n) for n in LM(cfg).state_dict() if not n.startswith("residual.")}
    extra = [k for k in files if k not in used and not k.endswith("rotary_emb.inv_freq")]
    if extra:
        raise ConfigError(f"{where}: tensor '{extra[0]}' (and {len(extra) - 1} more) has no place in a "
                          "Llama-family model; this architecture is not supported")
    return fill_model(cfg, fetch, where, dtype, external=hf_name)


# ----------------------------------------------------------------------------- export


def hf_config(model: LM, eot_id: int | None) -> dict:
    cfg = model.cfg
    mt = "qwen2" if cfg.qkv_bias else "llama"
    out = {
        "architectures": [ARCHITECTURES[mt]], "model_type": mt,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        # both spellings: transformers 4 reads rope_theta, transformers 5 rope_parameters
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "eos_token_id": eot_id, "bos_token_id": None, "torch_dtype": "float32", "use_cache": True,
    }
    if mt == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return out


def export_hf(model: LM, tokenizer_file: Path | str, eot_id: int | None, out: Path | str) -> Path:
    """Write a standard-residual (PreNorm) ``model`` and its tokenizer as a Hugging Face folder
    that ``transformers.AutoModelForCausalLM.from_pretrained(out)`` loads with the same logits."""
    if not model.residual.standard_residual:
        raise ConfigError(f"only a PreNorm model exports to Hugging Face (transformers has no '{model.cfg.residual.kind}' "
                          "residual); export the model before converting it")
    tensors = {hf_name(k): v.detach().to(torch.float32).cpu().contiguous() for k, v in model.state_dict().items()
               if not k.startswith("residual.") and not (k == "head.weight" and model.cfg.tie_embeddings)}
    tokenizer_json = Path(tokenizer_file).read_text(encoding="utf-8")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.cfg.max_seq_len}
    if eot_id is not None:
        tok_cfg["eos_token"] = Tokenizer.from_str(tokenizer_json).id_to_token(eot_id)
    return write_folder(out, {
        "config.json": lambda p: p.write_text(json.dumps(hf_config(model, eot_id), indent=2) + "\n"),
        "model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"}),
        "tokenizer.json": lambda p: p.write_text(tokenizer_json, encoding="utf-8"),
        "tokenizer_config.json": lambda p: p.write_text(json.dumps(tok_cfg, indent=2) + "\n"),
    })
