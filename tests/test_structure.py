"""The shape of the code that the architecture promises (docs/ARCHITECTURE.md): no import cycle
inside cnn_gpu (function-local imports included), no function longer than 80 lines, every
CNN_GPU_* variable read in cnn_gpu/config.py only, and no CUDA source in Python strings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cnn_gpu"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """The cnn_gpu modules ``name`` imports anywhere in its file (parent packages included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = node.module if not node.level else (f"{base}.{node.module}" if node.module else base)
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                q = ".".join(parts[:i])
                # a module's own parent packages are already being imported: not an edge of a cycle
                if q in mods and q != name and not name.startswith(q + "."):
                    out.add(q)
    return out


def test_no_import_cycle():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert "cnn_gpu.functional.reference" in graph and graph["cnn_gpu"]  # the graph was really built


def test_no_function_longer_than_a_screen():
    long = []
    for p in sorted(PKG.rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                long.append(f"{p.relative_to(PKG.parent)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert long == []


def test_settings_are_read_in_the_config_module_only():
    readers = [
        p.relative_to(PKG.parent).as_posix()
        for p in sorted(PKG.rglob("*.py"))
        if p.name != "config.py" and re.search(r"""(environ(\.get\(|\[)|getenv\()\s*["']CNN_GPU_""", p.read_text())
    ]
    assert readers == [], readers
    assert "CNN_GPU_ENGINE" in (PKG / "config.py").read_text()


def test_no_cuda_source_in_python():
    for p in sorted(PKG.rglob("*.py")):
        assert not re.search(r"(threadIdx|blockIdx|blockDim)\.[xyz]", p.read_text()), p
