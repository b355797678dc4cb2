"""The package's modules import in one direction: none imports one that imports it back, at
module level or inside a function (an optional dependency deferred, such as CuPy, is not
xpnet's), and the benchmark's modules load without Numba."""

import ast
import subprocess
import sys
from pathlib import Path

import xpnet

PACKAGE = Path(xpnet.__file__).parent


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, modules):
    """The xpnet modules a file imports anywhere in it: `import a.b`, `from a import b` (b a module
    or a name in a), by the statements themselves (not the packages Python loads around them)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & modules


def import_graph():
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) - {name} for name, path in paths.items()}


def cycles(graph):
    """Each cycle found by a depth-first search, as the modules around it."""
    found, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                found.append(trail[trail.index(imported) :] + [imported])
            elif imported not in state:
                visit(imported, trail + [imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert "xpnet.nn.train" in graph["xpnet.commands.train"]  # the graph sees imports
    assert cycles(graph) == []


def test_the_cycle_search_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_benchmark_loads_without_numba():
    """`xpnet bench --backends numpy` does not pay for Numba: its modules never import it."""
    code = "import sys, xpnet.bench, xpnet.bench_report, xpnet.commands.bench; print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
