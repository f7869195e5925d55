"""No function in engine/ or kernels/ over 60 lines (the house rule: a reader sees a whole function at once).

Counted from the ``def`` line to the function's last line (``ast`` end_lineno), decorators and docstring
included; nested functions count inside their parent. Triton kernels (``@triton.jit``) are held to the
same rule.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 60


def long_functions(root: str = ROOT, limit: int = LIMIT):
    """(path:line, name, lines) of every function longer than ``limit`` lines under engine/ and kernels/."""
    out = []
    for pkg in ("engine", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(root, pkg)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        n = node.end_lineno - node.lineno + 1
                        if n > limit:
                            out.append((f"{os.path.relpath(path, root)}:{node.lineno}", node.name, n))
    return out


def test_no_function_in_engine_or_kernels_is_over_60_lines():
    found = long_functions()
    assert found == [], f"functions over {LIMIT} lines: {found}"


def test_the_counter_sees_a_long_function(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "kernels").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (tmp_path / "engine" / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(str(tmp_path)) == [("engine/m.py:5", "long", 61)]
