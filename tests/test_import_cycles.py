"""No import cycle among the modules of ``engine/`` and ``kernels/``, function-level imports included.

The graph is read from the source (``ast``), not from ``sys.modules``: an import inside a function or
an ``if __name__ == "__main__"`` block counts as much as one at the top. An edge A -> B means A's source
imports B (``import B``, ``from B import x``, or ``from pkg import B`` where ``pkg.B`` is a module). A
package's ``__init__`` is not an edge target for its own submodules (Python imports the parent first
anyway). A cycle is a strongly connected component of more than one module, or a module importing itself.
"""
from __future__ import annotations

import ast
import os
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("engine", "kernels")


def module_files(root: str = ROOT) -> Dict[str, str]:
    """``{dotted module name: path}`` for every ``.py`` file under the packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(root, pkg)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, name)
    return out


def imports_of(path: str, name: str, modules: Set[str]) -> Set[str]:
    """Project modules that the file at ``path`` (module ``name``) imports anywhere in its body."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            # the longest project module that t names (import a.b.c imports a.b.c, which is a module or not)
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # not itself, not a parent package
                found.add(t)
    return found


def import_graph(root: str = ROOT) -> Dict[str, Set[str]]:
    files = module_files(root)
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with a cycle (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_engine_or_kernels():
    found = cycles(import_graph())
    assert found == [], f"{len(found)} import cycle(s): {found}"


def test_the_cycle_finder_sees_function_level_and_main_block_imports(tmp_path):
    # a planted cycle of the two shapes the project once had: an import in a __main__ block, and one in a
    # function body, each closing a loop with a module-level import
    eng = tmp_path / "engine"
    ker = tmp_path / "kernels"
    eng.mkdir()
    ker.mkdir()
    (eng / "__init__.py").write_text("")
    (ker / "__init__.py").write_text("")
    (eng / "ev.py").write_text("import os\nif __name__ == '__main__':\n    from engine import cli\n")
    (eng / "cli.py").write_text("from engine.ev import thing\n")
    (ker / "aot.py").write_text("def launches():\n    from kernels import op\n")
    (ker / "op.py").write_text("from kernels.aot import Launch\n")
    (ker / "fine.py").write_text("from kernels import op\n")
    found = cycles(import_graph(str(tmp_path)))
    assert found == [["engine.cli", "engine.ev"], ["kernels.aot", "kernels.op"]]
    assert import_graph(str(tmp_path))["kernels.fine"] == {"kernels.op"}
