"""ops/mlra/config.py: the one reader of the environment, no writes, no import cycle, the Triton mode."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "mlra_kernels"
OPS = PACKAGE / "ops" / "mlra"
NAME = "mlra_kernels.ops.mlra"


def _ast(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(path: pathlib.Path, modules: set) -> set:
    """The ``ops/mlra`` modules ``path`` imports, at module level or inside a function; a name imported
    from the package itself (``from mlra_kernels.ops.mlra import mlra_attention``) counts as ``__init__``."""
    deps = set()
    for node in ast.walk(_ast(path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == NAME:
                deps.update(a.name if a.name in modules else "__init__" for a in node.names)
            elif node.module.startswith(NAME + "."):
                deps.add(node.module[len(NAME) + 1:].split(".")[0])
        elif isinstance(node, ast.Import):
            deps.update(a.name[len(NAME) + 1:].split(".")[0] for a in node.names if a.name.startswith(NAME + "."))
    return deps - {path.stem}


def _cycle(graph: dict) -> list:
    """One import cycle of ``graph`` as a list of modules, or ``[]``."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_ops_mlra():
    """The package's ``__init__`` imports its modules; no module imports one that (through others) imports
    it back, at module level or inside a function."""
    modules = {p.stem for p in OPS.glob("*.py")}
    graph = {p.stem: _imports(p, modules) for p in OPS.glob("*.py")}
    graph = {m: deps - {"__init__"} if m != "__init__" else deps for m, deps in graph.items()}
    assert graph["config"] == set(), "config imports nothing from the package"
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def _env_calls(path: pathlib.Path):
    """``(line, text)`` of every write to ``os.environ`` (assignment, ``del``, a mutating method, putenv)."""
    mutating = {"setdefault", "pop", "popitem", "update", "clear", "__setitem__", "__delitem__"}
    for node in ast.walk(_ast(path)):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        for t in targets:
            if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ":
                yield node.lineno, ast.unparse(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, attr = ast.unparse(node.func.value), node.func.attr
            if (owner == "os.environ" and attr in mutating) or (owner == "os" and attr in ("putenv", "unsetenv")):
                yield node.lineno, ast.unparse(node)


def test_env_write_finder_finds_writes(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nos.environ['A'] = '1'\nos.environ.setdefault('B', '1')\ndel os.environ['A']\n"
                 "os.putenv('C', '1')\nx = os.environ.get('D')\n")
    assert sorted(line for line, _ in _env_calls(f)) == [2, 3, 4, 5]


def test_nothing_in_the_package_writes_the_environment():
    writes = [f"{p.relative_to(REPO)}:{line}: {text}" for p in sorted(PACKAGE.rglob("*.py"))
              for line, text in sorted(_env_calls(p))]
    assert writes == []


def test_config_is_the_packages_one_environment_reader():
    readers = []
    for p in sorted(PACKAGE.rglob("*.py")):
        if p == OPS / "config.py":
            continue
        for node in ast.walk(_ast(p)):
            if isinstance(node, ast.Attribute) and ast.unparse(node) in ("os.environ", "os.getenv"):
                readers.append(f"{p.relative_to(REPO)}:{node.lineno}")
    assert readers == []


_MODE_CHECK = """
import os, sys
import triton
from triton import knobs
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
from mlra_kernels.ops.mlra import config, launcher

library = config.triton_interpreted()
assert library == (sys.argv[1] == "1"), library
later = "0" if library else "1"
os.environ["TRITON_INTERPRET"] = later  # changed after triton's import: the kernels keep the library's mode
for name in ("kernels", "decode_kernels"):
    module = launcher.kernels(name)
    assert launcher.kernels(name) is module
    jitted = [v for v in vars(module).values() if isinstance(v, (InterpretedFunction, JITFunction))]
    assert jitted and all(isinstance(v, InterpretedFunction if library else JITFunction) for v in jitted), name
assert os.environ["TRITON_INTERPRET"] == later, "the environment was written"
assert "interpret" not in vars(knobs.runtime) and knobs.runtime.interpret == (later == "1")
assert launcher.kernels("kernels").INTERPRET is library
print("ok", triton.__version__)
"""


@pytest.mark.parametrize("mode", ["1", "0"], ids=["interpreted", "compiled"])
def test_kernels_follow_the_triton_library_mode_without_touching_the_environment(mode):
    """``launcher.kernels()`` decorates the kernel modules in the mode Triton's own library was imported in,
    even when ``TRITON_INTERPRET`` has changed since, and leaves the environment and Triton's knobs as
    they were."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.knobs")
    env = dict(os.environ, TRITON_INTERPRET=mode, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _MODE_CHECK, mode], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
