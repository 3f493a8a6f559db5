"""Pretrained models: Hugging Face folders and GGUF files load with transformers' logits, export
back, and upcycle to AttnRes without changing the function (fp64, tiny eps)."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import rel_err
from pretrained_helpers import TEXT, hf_model, save_hf, tiny_tokenizer, write_gguf
from resstream import ResidualConfig
from resstream.config import ConfigError
from resstream.pretrained import eps_equivalent, export_hf, load, upcycle
from resstream.pretrained import gguf_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

SHAPES = {  # transformers config overrides per case
    "llama": ("llama", {}),
    "llama-tied-headdim": ("llama", {"tie_word_embeddings": True, "head_dim": 8}),
    "qwen2": ("qwen2", {}),
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=list(SHAPES))
def saved(request, tok, tmp_path_factory):
    """(transformers model, HF folder, GGUF file) for one architecture case."""
    arch, overrides = SHAPES[request.param]
    model = hf_model(arch, tok, **overrides)
    d = tmp_path_factory.mktemp(request.param)
    folder = save_hf(model, tok, d / "hf")
    return model, folder, write_gguf(model, tok, d / "model.gguf", arch=arch), arch


def _idx(vocab: int, T: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(3))


def test_hf_folder_logits_equal_transformers(saved, tok):
    hf, folder, _, arch = saved
    loaded = load(folder)
    assert loaded.source == "hf" and loaded.model.cfg.residual.kind == "prenorm"
    assert loaded.model.cfg.qkv_bias == (arch == "qwen2")
    assert loaded.tokenizer.encode(TEXT).ids == tok.encode(TEXT).ids
    idx = _idx(hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(loaded.model(idx), hf(idx).logits) < 1e-5


def test_gguf_logits_equal_transformers_on_the_same_file(saved, tok):
    """transformers un-permutes llama Q/K itself: agreement checks our un-permutation."""
    _, _, path, _ = saved
    loaded = load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    idx = _idx(ref.config.vocab_size)
    with torch.no_grad():
        assert rel_err(loaded.model(idx), ref.eval()(idx).logits) < 1e-5
    assert loaded.source == "gguf" and loaded.eot_id == 0
    assert loaded.tokenizer.encode(TEXT).ids == tok.encode(TEXT).ids  # rebuilt from the metadata
    assert loaded.tokenizer_file.is_file()


def test_gguf_without_unpermuting_is_wrong(saved, monkeypatch):
    """The Q/K pitfall is real: reading llama rows as stored changes the logits."""
    _, _, path, arch = saved
    if arch != "llama":
        pytest.skip("only llama files are stored permuted")
    right = load(path).model
    monkeypatch.setattr(gguf_file, "PERMUTED_QK", ())
    wrong = load(path).model
    idx = _idx(right.cfg.vocab_size)
    with torch.no_grad():
        assert rel_err(wrong(idx), right(idx)) > 1e-2


def test_export_reloads_with_the_same_logits(saved, tmp_path):
    hf, folder, _, arch = saved
    loaded = load(folder)
    out = export_hf(loaded.model, loaded.tokenizer_file, loaded.eot_id, tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert again.config.model_type == arch
    idx = _idx(hf.config.vocab_size)
    with torch.no_grad():
        ref = loaded.model(idx)
        assert rel_err(again(idx).logits, ref) < 1e-5
        assert torch.equal(load(out).model(idx), ref)  # and back into resstream, bit for bit
    with pytest.raises(ConfigError, match="already exists"):
        export_hf(loaded.model, loaded.tokenizer_file, loaded.eot_id, out)


@pytest.mark.parametrize("residual", [{"kind": "attnres"}, *[{"kind": "block_attnres", "block_size": s} for s in (1, 2, 3, 4)]])
def test_upcycling_is_lossless_fp64_tiny_eps(tok, tmp_path, residual):
    hf = hf_model("llama", tok, rms_norm_eps=1e-12, num_hidden_layers=4)
    loaded = load(save_hf(hf, tok, tmp_path / "hf"), dtype=torch.float64)
    converted = upcycle(loaded.model, ResidualConfig(**residual))
    assert converted.cfg.residual.kind == residual["kind"] and next(converted.parameters()).dtype == torch.float64
    idx = _idx(hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(converted(idx), loaded.model(idx)) < 1e-6
    with pytest.raises(ConfigError, match="already has"):
        upcycle(converted, ResidualConfig(kind="hc"))


@pytest.mark.parametrize("residual", [{"kind": "attnres"}, {"kind": "block_attnres", "block_size": 3}])
def test_upcycling_error_is_the_norm_epsilon(tok, tmp_path, residual):
    """With a real eps the converted model differs by exactly eps -> eps * n^2 in each norm:
    a PreNorm model whose norms use that larger eps matches it to rounding."""
    hf = hf_model("llama", tok, rms_norm_eps=1e-2, num_hidden_layers=3)
    loaded = load(save_hf(hf, tok, tmp_path / "hf"), dtype=torch.float64)
    converted = upcycle(loaded.model, ResidualConfig(**residual))
    idx = _idx(hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(converted(idx), loaded.model(idx)) > 1e-6  # the eps effect is visible here
        assert rel_err(converted(idx), eps_equivalent(loaded.model, converted)(idx)) < 1e-10


def test_upcycling_refuses_kinds_that_do_not_start_as_prenorm(saved):
    loaded = load(saved[1])
    with pytest.raises(ConfigError, match="does not start as PreNorm"):
        upcycle(loaded.model, ResidualConfig(kind="rezero"))


def test_export_refuses_other_kinds(saved, tmp_path):
    loaded = load(saved[1])
    converted = upcycle(loaded.model, ResidualConfig(kind="attnres"))
    with pytest.raises(ConfigError, match="only a PreNorm model exports"):
        export_hf(converted, loaded.tokenizer_file, 0, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _edit_config(folder, **changes):
    c = json.loads((folder / "config.json").read_text())
    c.update(changes)
    (folder / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope type 'llama3'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_hf_configs_are_refused(tok, tmp_path, changes, message):
    folder = save_hf(hf_model("llama", tok, num_hidden_layers=1), tok, tmp_path / "hf")
    _edit_config(folder, **changes)
    with pytest.raises(ConfigError, match=message):
        load(folder)


def test_bad_paths_give_one_clear_error(tok, tmp_path):
    folder = save_hf(hf_model("llama", tok, num_hidden_layers=1), tok, tmp_path / "hf")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load(folder)
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nothing")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF"):
        load(tmp_path / "junk.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither"):
        load(tmp_path / "empty")
