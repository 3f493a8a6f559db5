"""Pretrained models in and out: Hugging Face Llama/Qwen2 folders, GGUF files, resstream
model folders; export to Hugging Face; upcycling to another residual kind.

    loaded = load("smollm2")                       # or a folder, a .gguf, a converted model
    loaded.model, loaded.tokenizer, loaded.eot_id
    export_hf(loaded.model, loaded.tokenizer_file, loaded.eot_id, "out/hf")
    upcycled = upcycle(loaded.model, ResidualConfig(kind=KIND, ...))   # any kind that starts as PreNorm
"""
from resstream.pretrained.convert import copy_weights_into, eps_equivalent, upcycle
from resstream.pretrained.wheels import fetch
from resstream.pretrained.folder import is_model_folder, read_model_folder, save_model_folder
from resstream.pretrained.hf import export_hf
from resstream.pretrained.load import describe, load, resolve_path
from resstream.pretrained.loaded import LoadedModel

__all__ = ["LoadedModel", "load", "describe", "resolve_path", "export_hf", "upcycle", "eps_equivalent", "copy_weights_into",
           "fetch", "save_model_folder", "read_model_folder", "is_model_folder"]
