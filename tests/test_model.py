"""The model around the residual stream: the loss and the model config's errors (the residual
stream itself: tests/residual/)."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_cfg
from resstream import LM, ConfigError, ModelConfig


def test_loss_ignores_minus_one_targets():
    model = LM(tiny_cfg())
    idx = torch.randint(0, 61, (2, 8))
    tgt = idx.clone()
    tgt[:, :4] = -1
    _, loss = model(idx, tgt)
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].flatten(0, 1), idx[:, 4:].flatten())
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"n_heads": 5}, "n_heads"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"d_model": 36, "n_heads": 4}, "n_heads"),  # head dim 9: odd, RoPE needs pairs
    ],
)
def test_model_config_errors_name_the_field(kwargs, field):
    base = dict(vocab_size=100, d_model=32, n_heads=4)
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**base, **kwargs})
