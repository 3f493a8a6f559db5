"""Layout checks of src/resstream (run by tests/test_layout.py; also a command):

    python tools/check_layout.py            # prints every finding, exit 1 if any

- import circles: the graph of module -> module imports (every import statement, at module
  level or inside a function, TYPE_CHECKING blocks included) must have no cycle;
- module size: no module over MAX_MODULE_LINES lines;
- function size: no function or method over MAX_FUNCTION_LINES lines (def line to last line);
- kind names: residual kinds' names appear only under residual/ and in presets/defaults
  (the one allowed default: CompareConfig.residuals in config.py).
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "resstream"
MAX_MODULE_LINES = 300
MAX_FUNCTION_LINES = 60
KIND_NAME_ALLOWED = {"config.py"}  # CompareConfig's default kinds
COMMON_WORDS = {"scaled"}  # kind names that are also plain English words


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package.split(".")
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                # "from pkg import mod" depends on mod; "from mod import name" on mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t.startswith("resstream"):
                    r = _resolve(t, mods)
                    if r and r != mod:
                        graph[mod].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def long_functions(mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    found = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found.append((mod, node.name, n))
    return found


def long_modules(mods: dict[str, Path]) -> list[tuple[str, int]]:
    return [(m, n) for m, p in mods.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]


def kind_names_outside_residual(mods: dict[str, Path], kinds: list[str]) -> list[tuple[str, int, str]]:
    names = [k for k in kinds if k not in COMMON_WORDS]
    pat = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None
    found = []
    for mod, path in mods.items():
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "residual" or str(rel) in KIND_NAME_ALLOWED or pat is None:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pat.search(line):
                found.append((str(rel), i, line.strip()))
    return found


def findings(kinds: list[str] | None = None) -> list[str]:
    mods = modules()
    out = [f"import circle: {' <-> '.join(c)}" for c in cycles(import_graph(mods))]
    out += [f"module over {MAX_MODULE_LINES} lines: {m} ({n})" for m, n in long_modules(mods)]
    out += [f"function over {MAX_FUNCTION_LINES} lines: {m}.{f} ({n})" for m, f, n in long_functions(mods)]
    if kinds is None:
        sys.path.insert(0, str(ROOT.parent))
        from resstream.residual import available_kinds

        kinds = available_kinds()
    out += [f"kind name outside residual/: {f}:{i}: {line}" for f, i, line in kind_names_outside_residual(mods, kinds)]
    return out


if __name__ == "__main__":
    found = findings()
    print("\n".join(found) if found else "layout ok: no import circle, no long module or function, no kind name outside residual/")
    sys.exit(1 if found else 0)
