"""ddl: the gate and value at init, the write is the delta rule, a small gate is the identity
shortcut (and the default is not), and the gate's init range."""
from __future__ import annotations

import pytest
import torch

from helpers import residual_params, embedding_only_logits, prenorm_twin, randomize_residual, rel_err, tiny_cfg
from resstream import LM, ConfigError, ResidualConfig


@pytest.mark.parametrize("n_layers", [1, 3, 4])
def test_parameter_count(n_layers):
    D = 32
    L = 2 * n_layers
    assert residual_params("ddl", n_layers) == 2 * L * (D + 1)  # w_beta, b_beta, w_v, b_v per sublayer


@pytest.mark.parametrize("beta0", [1.0, 0.3, 1.9])
def test_ddl_gate_and_value_at_init(beta0):
    model = LM(tiny_cfg("ddl", ddl_beta_init=beta0))
    x = torch.randn(2, 5, 32) * 3
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        model = model.to(dtype)
        model.residual.reset_parameters()  # the logit of beta0/2, in the parameters' precision
        for l in range(model.cfg.n_sublayers):
            beta, v = model.residual.gate_and_value(x.to(dtype), l)
            assert torch.allclose(beta, torch.full_like(beta, beta0), rtol=0, atol=tol), l
            assert torch.equal(v, torch.full_like(v, 2.0)), l


def test_ddl_write_is_the_delta_rule():
    """k^T x' - v = (1 - beta)(k^T x - v) along k = y/|y|, and x' - x is parallel to k."""
    model = LM(tiny_cfg("ddl")).double()
    randomize_residual(model)
    stream = model.residual
    x, y = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    for l in (0, 3):
        beta, v = stream.gate_and_value(x, l)
        x_new = stream.write(stream.init(x), l, y)["h"]
        k = y / y.norm(dim=-1, keepdim=True)  # eps_k = 1e-5 is negligible at |y| ~ 5.7
        before, after = (k * x).sum(-1) - v, (k * x_new).sum(-1) - v
        assert rel_err(after, (1 - beta) * before) < 1e-9
        step = x_new - x
        assert rel_err(step, (step * k).sum(-1, keepdim=True) * k) < 1e-9


def test_ddl_small_gate_is_the_identity_shortcut_and_default_is_not():
    idx = torch.randint(0, 61, (2, 7))
    near_identity = LM(tiny_cfg("ddl", ddl_beta_init=1e-9)).double()
    assert rel_err(near_identity(idx), embedding_only_logits(near_identity, idx)) < 1e-6
    default = LM(tiny_cfg("ddl")).double()
    assert rel_err(default(idx), embedding_only_logits(default, idx)) > 1e-2
    assert rel_err(default(idx), prenorm_twin(default)(idx)) > 1e-2  # identity_at_init = False


@pytest.mark.parametrize("value", [0.0, 2.0, -0.5, 3.0])
def test_ddl_beta_init_must_be_inside_the_gate_range(value):
    with pytest.raises(ConfigError, match="residual.ddl_beta_init"):
        ResidualConfig(kind="ddl", ddl_beta_init=value)
