"""Fixtures for the kernel tier: a clean backend choice per test, and a forced-Triton backend.

Under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) the Triton kernels run on CPU tensors, one
program at a time, so shapes here are small and the launchers use few programs with big blocks.
"""
import pytest

from kernels import dispatch


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
