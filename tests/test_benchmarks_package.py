"""benchmarks/ is a package: its peak-memory helper measures from its reset, and no script patches ``sys.path``,
imports the tests, or keeps its own copy of a shared helper."""
import ast
import glob
import mmap
import os

import pytest

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
MiB = 2 ** 20


def touched(mib: int) -> mmap.mmap:
    """``mib`` MiB of fresh anonymous pages, one byte written per page (resident, not only reserved): an mmap of
    its own, not malloc, whose freed memory may stay resident in a process that ran other tests (close() returns
    these pages at once)."""
    pages = mmap.mmap(-1, mib * MiB)
    for offset in range(0, mib * MiB, mmap.PAGESIZE):
        pages[offset] = 1
    return pages


def test_the_peak_sees_what_comes_after_the_reset_and_not_what_was_freed_before():
    big = touched(200)
    big.close()  # the resident set falls back, the high-water mark stays up
    if not common.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here: the high-water mark cannot be reset")
    baseline = common.current_rss()
    assert common.peak_rss() - baseline < 20 * MiB  # restarted from the current size, the 200 MiB gone
    small = touched(50)
    above = common.peak_rss() - baseline
    small.close()
    assert 40 * MiB < above < 80 * MiB, above / MiB  # about 50 MiB, not 200


def test_without_a_reset_the_mark_remembers_a_freed_peak():
    common.reset_peak_rss()
    big = touched(200)
    big.close()
    assert common.peak_rss() - common.current_rss() > 150 * MiB  # why the benchmarks reset after their imports


def _tree(path: str) -> ast.Module:
    with open(path) as f:
        return ast.parse(f.read(), path)


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_no_benchmark_patches_sys_path_or_imports_the_tests(path):
    with open(path) as f:
        assert "sys.path.insert" not in f.read()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else []
        else:
            continue
        assert not any(n == "tests" or n.startswith("tests.") for n in names), (path, node.lineno)


def test_each_shared_helper_is_defined_once():
    shared = {n.name for n in _tree(common.__file__).body if isinstance(n, ast.FunctionDef)}
    for path in SCRIPTS:
        if os.path.basename(path) == "common.py":
            continue
        defined = {n.name for n in ast.walk(_tree(path)) if isinstance(n, ast.FunctionDef)}
        assert not defined & shared, f"{os.path.relpath(path, ROOT)} redefines {sorted(defined & shared)}"
