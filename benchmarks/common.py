"""What the benchmark scripts share: the repository root, peak memory, the matmul peak, timing, the JSON writer,
and the dense block-diagonal attention the attention table sets against the ragged backends.

Peak memory, three quantities, one helper each:

- **the host process's resident set** (a CPU run's memory): :func:`reset_peak_rss` restarts the kernel's
  high-water mark (VmHWM) from the current resident size, :func:`peak_rss` reads it, :func:`current_rss` is
  the resident size now. A benchmark reads its baseline with :func:`current_rss` after its imports, resets,
  runs the measured part, and reports :func:`peak_rss` minus the baseline: the measured part alone. (Not
  ``ru_maxrss``, which cannot be reset: only the fallback where /proc is missing, see :func:`peak_rss`.)
- **CUDA memory allocated by PyTorch's caching allocator**: :func:`reset_cuda_peak` and :func:`cuda_peak`;
- **the bytes one call allocates** (the kernel tables' ``peak MiB``): :func:`allocated_peak`.

Imports torch and the standard library only: ``benchmarks/e2e.py``'s peer side runs this module in
``.venv-peer``, which has no engine.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------
# Host memory: the process's resident set
# ----------------------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Restart this process's resident-set high-water mark (VmHWM) from its current resident size (Linux:
    ``5`` written to ``/proc/self/clear_refs``). True when it restarted; False where that file is missing or
    refuses the write (not Linux, a kernel before 4.0, some sandboxes): :func:`peak_rss` then reads the
    maximum over the process's whole life, and the caller should say so."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Bytes: the resident-set high-water mark, since the last :func:`reset_peak_rss` (or the process start).

    Read as VmHWM from ``/proc/self/status``. Where /proc is not there, ``getrusage(RUSAGE_SELF).ru_maxrss``
    instead, which cannot be reset: it is the maximum over the process's whole life, so it includes whatever
    peak the process had before the measured part (imports, set-up, an earlier measurement). On Linux it is
    worse still, and so never used there: the clear_refs reset lowers VmHWM but not ru_maxrss, which also
    starts at the resident size of the process that forked this one (carried over its exec: the child of a
    process holding 2 GiB reports at least 2 GiB, whatever it allocates itself)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, Linux KiB


def current_rss() -> int:
    """Bytes resident now (``/proc/self/statm``: resident pages x the page size; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------
# CUDA memory: PyTorch's caching allocator
# ----------------------------------------------------------------------------------------------------
def reset_cuda_peak(device=None) -> int:
    """Wait for the device, restart ``torch.cuda``'s peak-allocated statistic; return the bytes allocated now
    (the baseline a peak above the inputs subtracts)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cuda_peak(device=None) -> int:
    """Wait for the device; the most bytes the caching allocator had allocated since :func:`reset_cuda_peak`
    (or the process start). Not the CUDA context, nor the allocator's cached but free blocks."""
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


@contextlib.contextmanager
def _quiet_stderr():
    """The CPU profiler (kineto) prints to fd 2; silence it while measuring memory."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def allocated_peak(fn: Callable[[], None], device: torch.device) -> float:
    """Peak bytes allocated by ``fn()`` on top of what was allocated before it: on CUDA from the caching
    allocator's statistics, on CPU from the profiler's allocation events (the tensors alone, not the
    resident set)."""
    if device.type == "cuda":
        base = reset_cuda_peak()
        fn()
        return float(cuda_peak() - base)
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur = peak = 0
    for _, n in mem:
        cur += n
        peak = max(peak, cur)
    return float(peak)


# ----------------------------------------------------------------------------------------------------
# Timing and the matmul peak
# ----------------------------------------------------------------------------------------------------
def time_fn(fn: Callable[[], None], device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on CUDA, the wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_peak(size: int = 2048, reps: int = 5) -> dict:
    """Best FLOP/s of a size^3 fp32 matmul in this process, on the wall clock and the CPU clock (per thread):
    the peak an MFU on the CPU is taken against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=out)
        wall.append(time.perf_counter() - t0)
        cpu.append((time.process_time() - c0) / torch.get_num_threads())
    flop = 2 * size ** 3
    return {"wall": flop / min(wall), "cpu": flop / min(cpu)}


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------
def save_json(result: dict, out: Optional[str]) -> None:
    """Write a benchmark's result as JSON at ``out`` (its folder made if needed); nothing when ``out`` is empty."""
    if not out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nsaved {out}")


# ----------------------------------------------------------------------------------------------------
# Dense block-diagonal attention (benchmarks/attention_table.py's ``dense-bias`` row; tests/kernels uses it as
# a reference built independently of kernels/attention.py)
# ----------------------------------------------------------------------------------------------------
def block_diagonal_bias(seqlens: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Dense ``[T, T]`` additive bias: 0 inside each sample's block, -inf elsewhere."""
    sample = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor([int(n) for n in seqlens]))
    same = (sample[:, None] == sample[None, :]).to(device)
    return torch.zeros(same.shape, dtype=dtype, device=device).masked_fill_(~same, float("-inf"))


def attention_with_bias(q, k, v, bias: torch.Tensor) -> torch.Tensor:
    """Dense attention over the whole packed sequence (``[T, H, Dh]``) with an additive ``[T, T]`` bias."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                           v.transpose(0, 1)[None], attn_mask=bias.to(q.dtype))
    return out[0].transpose(0, 1)
