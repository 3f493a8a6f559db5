"""Property-based fuzzing of config overrides and command lines (hypothesis).

Whatever the user types, the answer is a valid config or one ConfigError line; through the
CLI, exit code 0 or 2 with one line on stderr, never a traceback. Accepted configs hold only
finite floats and 64-bit integers, and the memory estimate can be computed for them. The
deeper run (real training and generation from accepted configs, 1,000 cases) is
tools/fuzz_runs.py.
"""
from __future__ import annotations

import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from resstream.config import INT_MAX, INT_MIN, ConfigError  # noqa: E402
from resstream.runs.config import RunConfig, load_run_config, run_config_fields  # noqa: E402


KEYS = sorted(run_config_fields())
SPECIAL = ["nan", "inf", "-inf", "1e308", "1e-320", "-0.0", "0", "-1", "1", "true", "false", "none", "[]",
           "[1, 2]", "\"\"", "\"kjv\"", "{", "[1,", "\"unterminated", "100000000000000000000000", "9223372036854775807",
           "-9223372036854775809", "0x10", "1_000", "\"cuda:0\"", "\"bf16\"", "\"prenorm\"", "\"hc\""]
values = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet="abc019.-_=:\"[], ", max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"),
                 st.sampled_from(["", ".", "a..b", "train.", "model.residual", "zzz", "model.vocab_size"]))
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", keys, values) | st.text(max_size=8), max_size=6)


def _check_accepted(cfg: RunConfig) -> None:
    from resstream.model.memory import lower_bound

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            assert math.isfinite(x)
        elif isinstance(x, int) and not isinstance(x, bool):
            assert INT_MIN <= x <= INT_MAX

    walk(cfg.to_dict())
    est = lower_bound(cfg.model_config(cfg.data.vocab_size), cfg.train.batch_size, cfg.train.seq_len, True)
    assert est.total > 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides)
def test_overrides_give_a_config_or_one_clean_line(items):
    try:
        cfg = load_run_config(None, items, preset="tiny")
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    _check_accepted(cfg)


OPTIONS = st.sampled_from([["--preset", "tiny"], ["--preset", "nope"], ["--config", "/nonexistent.toml"],
                           ["--out", "OUT"], ["--no-progress"], ["--resume", "/nonexistent-run"], ["--trust-unverified"]])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(OPTIONS, overrides.map(lambda o: o[:2])), max_size=6))
def test_train_command_lines_exit_cleanly(monkeypatch, capsys, pieces):
    """`resstream train ...` with options and overrides in any order: exit 0 (training stubbed
    out) or 2 with one line on stderr. argparse's own refusals (usage + error) are exit 2 too."""
    import resstream.train as train_room
    from resstream.cli import main

    seen = []

    def fake_train(cfg, out=None, resume=False, **kwargs):
        seen.append(cfg)
        return train_room.RunResult(out, "finished", 1, 1, 1.0, 1.0, 1.0, 1.0, 1.0)

    monkeypatch.setattr(train_room, "train", fake_train)
    argv = ["train"] + [a for piece in pieces for a in piece]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: an option without its value, an unknown option
        assert e.code == 2
        capsys.readouterr()
        return
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, err)
    if code == 2:
        assert err.startswith("resstream: error: ") and err.count("\n") == 1, (argv, err)
    else:
        _check_accepted(seen[-1])


SPEC_PIECES = st.sampled_from(["prenorm", "attnres", "block_attnres", "hc", "mhc", "nope", "", ":", ",", "=",
                               "block_size=4", "n_streams=0", "window=", "recompute=true", "x=1", "kind=hc", " "])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SPEC_PIECES, max_size=6).map("".join) | st.text(max_size=20),
       st.one_of(st.none(), st.integers(min_value=-5, max_value=2**70)),
       st.one_of(st.none(), st.integers(min_value=-5, max_value=2**70)),
       st.one_of(st.none(), st.integers(min_value=-5, max_value=2**70)))
def test_compare_plans_give_runs_or_one_clean_line(residuals, seeds, steps, tokens):
    """`compare --residuals/--seeds/--steps/--tokens`: a plan of valid runs, or one ConfigError line."""
    from resstream.compare.run import CompareOptions, plan

    base = load_run_config(None, [], preset="tiny")
    try:
        cfg, kinds, seed_list = plan(base, CompareOptions(residuals=residuals, seeds=seeds, steps=steps, tokens=tokens))
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert kinds and seed_list and len(seed_list) <= 1000
    _check_accepted(cfg)
