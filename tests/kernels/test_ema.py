"""kernels/ema.py: every path of ``ema_update_flat_`` (Triton flat, Triton pointer table, the reference
loop) and ``ema_update_reference`` against ``m * t + (1 - m) * o`` evaluated independently in float64.

Tolerance (fp32 result vs the float64 formula; values ~N(0, 1)): atol = rtol = 1e-6 (a few ulps).
"""
import pytest
import torch

import kernels.ema as ema
from kernels import dispatch
from kernels.ema import FlatBuffer, ema_update_flat_, ema_update_reference

# 77100 elements > one interpreter block (65536): the flat kernel needs two programs, one partial;
# (1,) is a one-element tensor.
SHAPES = [(1023,), (5, 7), (300, 257), (1,), (384, 3, 4, 4), (1280,)]
M = 0.996


def formula(target, online, m):
    """m * t + (1 - m) * o in float64, per tensor."""
    return [m * t.double() + (1.0 - m) * o.double() for t, o in zip(target, online)]


def make(seed, online_dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    target = [torch.randn(s, generator=gen) for s in shapes]
    online = [torch.randn(s, generator=gen).to(online_dtype) for s in shapes]
    return target, online


def check(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, atol=1e-6, rtol=1e-6)


def buffer_of(tensors):
    return FlatBuffer([torch.nn.Parameter(t.clone(), requires_grad=False) for t in tensors])


def record_launches(monkeypatch):
    calls = []
    for name in ("_launch_flat", "_launch_table"):
        real = getattr(ema, name)
        monkeypatch.setattr(ema, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    return calls


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_loop_matches_formula(online_dtype):
    target, online = make(0, online_dtype)
    expected = formula(target, online, M)
    t = [x.clone() for x in target]
    ema_update_reference(t, online, M)
    check(t, expected)


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("online_layout", ["list", "flat"])
def test_triton_matches_formula(triton_backend, monkeypatch, online_dtype, online_layout):
    target, online = make(1, online_dtype)
    expected = formula(target, online, M)
    fb = buffer_of(target)
    calls = record_launches(monkeypatch)
    arg = torch.cat([o.reshape(-1) for o in online]) if online_layout == "flat" else online
    ema_update_flat_(fb.flat, arg, M)
    check(fb.views(), expected)
    assert calls == (["_launch_flat"] if online_layout == "flat" else ["_launch_table"])  # one launch
    assert fb.is_intact()


def test_triton_mixed_online_dtypes_and_noncontiguous(triton_backend, monkeypatch):
    # one launch per online dtype; a non-contiguous online tensor is read correctly
    target, online = make(2, shapes=[(6, 5), (7,), (3, 4)])
    online = [online[0].t().contiguous().t(), online[1].to(torch.bfloat16), online[2]]
    assert not online[0].is_contiguous()
    expected = formula(target, online, 0.9)
    fb = buffer_of(target)
    calls = record_launches(monkeypatch)
    ema_update_flat_(fb.flat, online, 0.9)
    check(fb.views(), expected)
    assert calls == ["_launch_table"]


@pytest.mark.parametrize("online_layout", ["list", "flat"])
def test_triton_at_cuda_tiles(triton_backend, online_layout):
    # the CUDA block (4096 elements) under the interpreter: 77100 elements -> 20 flat programs, and
    # for the list 22 table programs (blocks never straddle two tensors)
    target, online = make(3, torch.bfloat16)
    expected = formula(target, online, M)
    fb = buffer_of(target)
    arg = torch.cat([o.reshape(-1) for o in online]) if online_layout == "flat" else online
    with dispatch.use_tiles("cuda"):
        assert dispatch.tiles("ema_update", fb.numel, False).block_d == 4096
        ema_update_flat_(fb.flat, arg, M)
    check(fb.views(), expected)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_without_triton_the_reference_loop_runs(monkeypatch, backend):
    # CPU 'auto' and forced 'reference' take the plain loop on views of the buffer
    dispatch.set_backend(backend)
    used = []
    real = ema.ema_update_reference
    monkeypatch.setattr(ema, "ema_update_reference", lambda *a: (used.append(1), real(*a))[1])
    target, online = make(4, torch.bfloat16)
    fb = buffer_of(target)
    ema_update_flat_(fb.flat, online, M)
    check(fb.views(), formula(target, online, M))
    fb2 = buffer_of(target)
    ema_update_flat_(fb2.flat, torch.cat([o.reshape(-1) for o in online]), M)  # a ZeRO-3 style partition
    check(fb2.views(), formula(target, online, M))
    assert used == [1, 1]


def test_shard_local_update(triton_backend):
    # ZeRO-3: each rank updates the slice of the buffer that matches its flat partition of the online
    # parameters, independently; together the shards give the full update
    target, online = make(5, torch.bfloat16, shapes=[(1000,), (37, 3)])
    fb = buffer_of(target)
    online_flat = torch.cat([o.reshape(-1) for o in online])
    bounds = [0, 400, 700, fb.numel]
    for lo, hi in zip(bounds, bounds[1:]):
        ema_update_flat_(fb.flat[lo:hi], online_flat[lo:hi], M)
    check(fb.views(), formula(target, online, M))


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_edges(triton_backend, m):
    target, online = make(6, shapes=[(1023,), (17,)])
    fb = buffer_of(target)
    ema_update_flat_(fb.flat, online, m)
    check(fb.views(), [o.double() for o in online] if m == 0.0 else [t.double() for t in target])


def test_flatbuffer_rehomes_module_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 7)
    before = net(x)
    fb = FlatBuffer(net.parameters())
    assert fb.params == list(net.parameters())
    assert fb.numel == 7 * 5 + 5 + 5 * 3 + 3
    assert torch.equal(net(x), before)
    assert fb.is_intact()
    base = fb.flat.data_ptr()
    assert [p.data_ptr() - base for p in net.parameters()] == [0, 35 * 4, 40 * 4, 55 * 4]
    fb.flat.zero_()  # the module sees writes to the buffer
    assert all(torch.count_nonzero(p) == 0 for p in net.parameters())
    net.load_state_dict({k: torch.ones_like(v) for k, v in net.state_dict().items()})
    assert fb.is_intact() and torch.equal(fb.flat, torch.ones_like(fb.flat))
    net[0].weight.data = torch.zeros(5, 7)  # re-pointed away from the buffer
    assert not fb.is_intact()


def test_flatbuffer_keeps_tied_parameters_once():
    shared = torch.nn.Parameter(torch.randn(3))
    other = torch.nn.Parameter(torch.randn(2))
    fb = FlatBuffer([shared, other, shared])
    assert fb.numel == 5 and len(fb.params) == 2
    assert torch.equal(fb.flat[:3], shared.detach())


def test_errors():
    with pytest.raises(ValueError, match="no parameters"):
        FlatBuffer([])
    with pytest.raises(ValueError, match="floating-point"):
        FlatBuffer([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="has 4 elements but target_flat 5"):
        ema_update_flat_(torch.zeros(5), [torch.zeros(4)], M)
    with pytest.raises(ValueError, match="contiguous 1-D fp32"):
        ema_update_flat_(torch.zeros(5, dtype=torch.bfloat16), [torch.zeros(5)], M)
    with pytest.raises(ValueError, match="contiguous 1-D fp32"):
        ema_update_flat_(torch.zeros(2, 3), [torch.zeros(6)], M)
    with pytest.raises(ValueError, match="use fp32, bf16 or fp16"):
        ema_update_flat_(torch.zeros(3), [torch.zeros(3, dtype=torch.float64)], M)
