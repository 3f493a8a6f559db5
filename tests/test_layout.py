"""The package layout rules (tools/check_layout.py): no import circle, no module over 300
lines, no function over 60, no residual-kind name outside residual/."""
import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "check_layout.py"


def _tool():
    spec = importlib.util.spec_from_file_location("check_layout", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layout_rules_hold():
    assert _tool().findings() == []


def test_checker_sees_a_circle_and_a_long_function():
    tool = _tool()
    assert tool.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert tool.cycles({"a": {"b"}, "b": set()}) == []
