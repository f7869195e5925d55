"""Fixtures for the kernel tier: a clean backend choice per test, a forced-Triton backend, the CUDA
tiles under the interpreter, and a recorder of launch grids.

Under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) the Triton kernels run on CPU tensors, one
program at a time, so shapes here are small and the launchers use few programs with big blocks
(``kernels.dispatch.TILE_POLICIES[op]['interpreter']``); the ``cuda_tiles`` fixture switches them to
the CUDA tiles, so the column tiling and the cross-tile atomics run too.
"""
import pytest

from kernels import dispatch


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile: compiles every Triton kernel for sm_80 / sm_90 without a GPU (kernels/aot.py, "
                   "about 30 s on 2 cores from an empty cache); part of `make test`")


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_backend(None)
    yield
    dispatch.set_backend(None)


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (on CPU tensors: through the interpreter)."""
    if not dispatch.triton_available():
        pytest.skip("triton is not installed")
    if not dispatch.interpreter_enabled():
        pytest.skip("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py does it)")
    dispatch.set_backend("triton")
    yield
    dispatch.set_backend(None)


@pytest.fixture
def cuda_tiles(triton_backend):
    """Forced Triton with the CUDA tile choices, under the interpreter."""
    with dispatch.use_tiles("cuda"):
        yield


@pytest.fixture
def launch_grids(monkeypatch):
    """``grids = launch_grids(module, 'kernel_name')``: records the grid of every launch of that kernel
    (the list fills as the kernel runs), so a test can see how many row / column tiles ran."""
    def record(module, name):
        grids = []
        kernel = getattr(module, name)

        class Recorder:
            def __getitem__(self, grid):
                grids.append(tuple(grid))
                return kernel[grid]

        monkeypatch.setattr(module, name, Recorder())
        return grids
    return record
