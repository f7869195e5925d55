"""Process-level set-up: the CPU allocator setting every CPU rank applies (engine.distributed)."""
import ctypes

import pytest

from engine import distributed


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    return fake


def test_keep_freed_memory_sets_glibc_thresholds(libc):
    # glibc's malloc.h: M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3
    assert distributed.keep_freed_memory(environ={}) is True
    assert sorted(libc.calls) == sorted([(-3, 32 * 1024 * 1024), (-1, 1024 ** 3)])


@pytest.mark.parametrize("environ", [{"IWM_MALLOC": "default"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                     {"MALLOC_MMAP_THRESHOLD_": "65536"}])
def test_keep_freed_memory_leaves_the_allocator_alone_when_told(libc, environ):
    assert distributed.keep_freed_memory(environ=environ) is False
    assert libc.calls == []


def test_keep_freed_memory_rejects_a_bad_switch(libc):
    with pytest.raises(ValueError, match="IWM_MALLOC='fast'"):
        distributed.keep_freed_memory(environ={"IWM_MALLOC": "fast"})


def test_keep_freed_memory_without_glibc():
    assert distributed.keep_freed_memory(environ={}, libc_name="libdoes-not-exist.so.9") is False


def test_cpu_ranks_apply_it(monkeypatch):
    """setup_distributed on a CPU machine calls it once (the process group is already up or starts here)."""
    seen = []
    monkeypatch.setattr(distributed, "keep_freed_memory", lambda: seen.append(True) or True)
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    info = distributed.setup_distributed()
    assert info.device.type == "cpu" and seen == [True]
