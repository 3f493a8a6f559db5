"""Decoding: KV-cached incremental forward equals the full forward for every residual kind,
chunked prefill equals one-shot, greedy equals repeated argmax, sampling is seeded and
restricted by top_k / top_p, streamed text handles split UTF-8, bad requests fail in one line."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from helpers import KIND_CASES, case_id, randomize_residual, rel_err, tiny_cfg
from resstream import LM, ModelConfig, ResidualConfig
from resstream.model.generate import (
    DecodeCache, KVCache, decode_stream, generate, prefill, sample_next, stream_generate,
)
from resstream.runs import load as run_load
from resstream.runs.load import generate_from_run

IDS = [case_id(c) for c in KIND_CASES]


def random_model(kind: str, opts: dict, dtype=torch.float32) -> LM:
    model = LM(tiny_cfg(kind, **opts)).to(dtype)
    randomize_residual(model)
    return model


@torch.no_grad()
@pytest.mark.parametrize("kind,opts", KIND_CASES, ids=IDS)
def test_incremental_decoding_matches_full_forward(kind, opts):
    model = random_model(kind, opts)
    idx = torch.randint(0, 61, (2, 19))
    full = model(idx)
    cache = DecodeCache(model, batch=2)
    steps = [prefill(model, idx[:, :6], cache)]
    for t in range(6, idx.shape[1]):
        steps.append(model.decode(idx[:, t : t + 1], cache))
    assert cache.pos == idx.shape[1]
    inc = torch.cat(steps, dim=1)
    assert rel_err(inc, full) < 1e-5
    for t in range(idx.shape[1]):  # no position is hidden by the others' norm
        assert rel_err(inc[:, t], full[:, t]) < 1e-5, t


@torch.no_grad()
@pytest.mark.parametrize("kind,opts", KIND_CASES, ids=IDS)
def test_chunked_prefill_matches_one_shot(kind, opts):
    model = random_model(kind, opts)
    idx = torch.randint(0, 61, (2, 23))
    one_cache = DecodeCache(model, batch=2)
    one = prefill(model, idx, one_cache)
    nxt = torch.randint(0, 61, (2, 1))
    after_one = model.decode(nxt, one_cache)
    for chunk in (3, 5):
        cache = DecodeCache(model, batch=2)
        chunked = prefill(model, idx, cache, chunk_size=chunk)
        assert rel_err(chunked, one) < 1e-5, chunk
        assert rel_err(model.decode(nxt, cache), after_one) < 1e-5, chunk  # the caches agree too
    last = prefill(model, idx, DecodeCache(model, batch=2), chunk_size=5, last_only=True)
    assert last.shape == (2, 1, 61) and rel_err(last, one[:, -1:]) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("kind,opts", KIND_CASES, ids=IDS)
def test_greedy_equals_argmax_of_repeated_full_forwards(kind, opts):
    model = random_model(kind, opts, torch.float64)  # float64: no near-tie can flip an argmax
    idx = torch.randint(0, 61, (2, 5))
    out = model.generate(idx, max_new_tokens=8, temperature=0)
    seq = idx
    for _ in range(8):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_shapes_and_one_dim_prompt():
    model = random_model("block_attnres", {"block_size": 2})
    out = model.generate(torch.tensor([1, 2, 3]), max_new_tokens=4, temperature=0)
    assert out.shape == (7,) and out.dtype == torch.long and torch.equal(out[:3], torch.tensor([1, 2, 3]))
    batch = model.generate(torch.tensor([[1, 2, 3], [1, 2, 3]]), max_new_tokens=4, temperature=0)
    assert torch.equal(batch[0], out) and torch.equal(batch[1], out)
    # the whole context can be filled
    assert model.generate(torch.tensor([[5]]), max_new_tokens=31, temperature=0).shape == (1, 32)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone():
    model = random_model("attnres", {})
    model.head.weight.data.mul_(50)  # a peaked distribution would make seeds agree by chance: spread it
    idx = torch.randint(0, 61, (3, 4))
    rng = torch.get_rng_state()
    a = model.generate(idx, 12, temperature=1.0, seed=123)
    b = model.generate(idx, 12, temperature=1.0, seed=123)
    c = model.generate(idx, 12, temperature=1.0, seed=124)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    model.generate(idx, 12, temperature=1.0)  # unseeded: still no global RNG use
    assert torch.equal(torch.get_rng_state(), rng)


def test_top_k_and_top_p_restrict_the_support():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # by rank: 1, 3, 2, 0
    logits = probs.log().expand(4000, 4)

    def support(**kw):
        return set(sample_next(logits, generator=g, **kw).unique().tolist())

    assert support() == {0, 1, 2, 3}
    assert support(top_k=1) == {1}
    assert support(top_k=2) == {1, 3}
    assert support(top_k=3) == {1, 2, 3}
    assert support(top_p=0.4) == {1}           # the top token alone reaches 0.4
    assert support(top_p=0.8) == {1, 3}        # 0.5 + 0.3 reaches 0.8
    assert support(top_p=0.81) == {1, 2, 3}
    assert support(top_p=1.0) == {0, 1, 2, 3}
    assert support(top_k=3, top_p=0.6) == {1, 3}
    assert support(temperature=0.0) == {1}
    # the restricted distribution is renormalised, not just truncated
    freq = (sample_next(probs.log().expand(20000, 4), top_k=2, generator=g) == 1).float().mean().item()
    assert abs(freq - 0.5 / 0.8) < 0.02


def test_generate_with_top_k_1_is_greedy():
    model = random_model("block_attnres", {"block_size": 3}, torch.float64)
    idx = torch.randint(0, 61, (2, 5))
    assert torch.equal(model.generate(idx, 6, top_k=1, seed=0), model.generate(idx, 6, temperature=0))


@pytest.mark.parametrize(
    "prompt,new,match",
    [
        (torch.zeros(1, 0, dtype=torch.long), 3, "empty prompt"),
        (torch.zeros(0, dtype=torch.long), 3, "empty prompt"),
        (torch.zeros(1, 4, dtype=torch.long), 0, "max_new_tokens must be an integer >= 1"),
        (torch.zeros(1, 4, dtype=torch.long), -2, "max_new_tokens must be an integer >= 1"),
        (torch.zeros(1, 33, dtype=torch.long), 1, "prompt of 33 tokens is longer than the model's context max_seq_len=32"),
        (torch.zeros(1, 30, dtype=torch.long), 3, "exceeds the model's context max_seq_len=32; ask for at most 2"),
        (torch.zeros(1, 4), 3, "integer token ids"),
    ],
)
def test_bad_requests_fail_in_one_line(prompt, new, match):
    model = random_model("prenorm", {})
    with pytest.raises(ValueError, match=match) as e:
        model.generate(prompt, new)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,match", [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                                      ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampling_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        random_model("prenorm", {}).generate(torch.zeros(1, 3, dtype=torch.long), 2, **kw)


def test_decoding_past_the_cache_is_refused():
    model = random_model("attnres", {})
    cache = DecodeCache(model, batch=1, max_len=6)
    prefill(model, torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_len=6"):
        model.decode(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_len=6"):
        KVCache(1, 2, 8, 6, torch.float32, "cpu").update(torch.zeros(1, 2, 7, 8), torch.zeros(1, 2, 7, 8))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        DecodeCache(model, batch=1, max_len=33)


def test_a_kind_that_mixes_positions_decodes_by_recomputation():
    model = random_model("attnres", {}, torch.float64)
    idx = torch.randint(0, 61, (2, 5))
    expected = model.generate(idx, 6, temperature=0)
    model.residual.mixes_positions = True  # as a kind with a convolution over tokens would declare
    with pytest.raises(ValueError, match="mixes positions"):
        DecodeCache(model, batch=2)
    assert torch.equal(model.generate(idx, 6, temperature=0), expected)


# ----------------------------------------------------------------------------- text


class ByteTokenizer:
    """Each id is a byte string; some ids are halves of a two-byte UTF-8 character."""

    pieces = [b"a", b"b", b" ", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"!"]  # é = c3 a9, € = e2 82 ac

    def encode(self, text: str) -> list[int]:
        return [self.pieces.index(bytes([c])) for c in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_decode_stream_waits_for_complete_characters():
    tok = ByteTokenizer()
    ids = [0, 3, 4, 2, 5, 6, 7, 1, 7]  # a é ' ' € ! b ! ; 7 doubles as the stop token below
    pieces = list(decode_stream(tok, ids))
    assert pieces == ["a", "é", " ", "€", "!", "b", "!"]
    assert "".join(pieces) == tok.decode(ids)
    assert list(decode_stream(tok, ids, stop_at_eot=7)) == ["a", "é", " ", "€"]
    # an incomplete character at the very end is flushed, as the decoder renders it
    assert "".join(decode_stream(tok, [0, 5])) == tok.decode([0, 5]) == "a\ufffd"
    assert list(decode_stream(tok, [])) == []


def _bpe_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(["the café serves crème brûlée, ça coûte 5 €"] * 20, trainer)
    return tok


def test_stream_generate_with_a_byte_level_bpe():
    tok = _bpe_tokenizer()
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                      residual=ResidualConfig(kind="block_attnres", block_size=2))
    model = LM(cfg)
    prompt = "the café"
    ids = tok.encode(prompt).ids
    pieces = list(stream_generate(model, tok, prompt, 40, temperature=1.5, seed=3))
    out = generate(model, torch.tensor([ids]), 40, temperature=1.5, seed=3)[0, len(ids):].tolist()
    assert "".join(pieces) == tok.decode(out)
    assert all(p and not p.endswith("\ufffd") for p in pieces[:-1])
    # stopping at a token: the text before its first occurrence
    stop = out[5]
    stopped = "".join(stream_generate(model, tok, prompt, 40, temperature=1.5, seed=3, stop_at_eot=stop))
    assert stopped == tok.decode(out[: out.index(stop)])
    with pytest.raises(ValueError, match="empty prompt"):
        stream_generate(model, tok, "", 5)


def test_generate_from_run_streams_to_out(monkeypatch):
    tok = _bpe_tokenizer()
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    model = LM(cfg)
    ids = tok.encode("the café").ids
    greedy = model.generate(torch.tensor([ids]), 10, temperature=0)[0, len(ids):].tolist()
    for eot in (tok.token_to_id("<|endoftext|>"), greedy[4]):
        loaded = SimpleNamespace(model=model, tokenizer=tok, eot_id=eot)
        monkeypatch.setattr(run_load, "load_model", lambda path, loaded=loaded, **kw: loaded)
        out = io.StringIO()
        text = generate_from_run("some/run", "the café", max_new_tokens=10, temperature=0, out=out)
        assert out.getvalue() == "the café" + text + "\n"
        assert text == tok.decode(greedy[: greedy.index(eot)] if eot in greedy else greedy)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate_from_run("some/run", "the café", max_new_tokens=100, out=io.StringIO())
