"""kernels/ema.py: EMA paths (loop, foreach, Triton flat, Triton pointer table, Triton per tensor)
against the formula m * t + (1 - m) * o evaluated in float64.

Tolerance (fp32 result vs float64 formula; values ~N(0, 1)): atol = rtol = 1e-6 (a few ulps; the
foreach path uses lerp, t + w (o - t), which rounds differently from the formula).
"""
import pytest
import torch

import kernels.ema as ema
from kernels.ema import FlatBuffer, as_flat_view, ema_update_, ema_update_flat_, ema_update_reference

# 77100 elements > one interpreter block (65536): the flat kernel and the pointer table both need
# several programs, one of them partial; (1,) is a one-element tensor.
SHAPES = [(1023,), (5, 7), (300, 257), (1,), (384, 3, 4, 4), (1280,)]
M = 0.996


def plain_ema(target, online, m):
    return [m * t.double() + (1.0 - m) * o.double() for t, o in zip(target, online)]


def make(gen, online_dtype=torch.float32, shapes=SHAPES):
    target = [torch.randn(s, generator=gen) for s in shapes]
    online = [torch.randn(s, generator=gen).to(online_dtype) for s in shapes]
    return target, online


def check(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, atol=1e-6, rtol=1e-6)


def params_of(tensors):
    return [torch.nn.Parameter(t.clone(), requires_grad=False) for t in tensors]


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16])
def test_reference_and_foreach(online_dtype):
    gen = torch.Generator().manual_seed(0)
    target, online = make(gen, online_dtype)
    expected = plain_ema(target, online, M)
    t1 = [t.clone() for t in target]
    ema_update_reference(t1, online, M)
    check(t1, expected)
    t2 = [t.clone() for t in target]
    ema.ema_update_foreach_(t2, online, M)
    check(t2, expected)


@pytest.mark.parametrize("online_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["flat_target", "both_flat", "lists", "shuffled"])
def test_triton_paths(triton_backend, monkeypatch, online_dtype, layout):
    gen = torch.Generator().manual_seed(1)
    target, online = make(gen, online_dtype)
    expected = plain_ema(target, online, M)
    params = params_of(target)
    calls = []
    for name in ("_launch_flat", "_launch_table"):
        real = getattr(ema, name)
        monkeypatch.setattr(ema, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    if layout != "lists":
        fb = FlatBuffer(params)
    if layout == "both_flat":
        online = FlatBuffer([torch.nn.Parameter(o.float()) for o in online], dtype=online_dtype).views()
    if layout == "shuffled":  # the caller's order is not the buffer's (engine/ema.py sorts by name)
        perm = [3, 0, 5, 2, 1, 4]
        params, online, expected = ([xs[i] for i in perm] for xs in (params, online, expected))
    ema_update_(params, online, M)
    check(params, expected)
    if layout in ("flat_target", "shuffled"):
        assert calls == ["_launch_table"] and fb.is_intact()      # one launch, online via pointer table
    elif layout == "both_flat":
        assert calls == ["_launch_flat"] and fb.is_intact()       # one launch, both flat
    else:
        assert calls == ["_launch_flat"] * len(SHAPES)            # one launch per tensor


def test_ema_update_flat_accepts_flat_or_list(triton_backend):
    gen = torch.Generator().manual_seed(2)
    target, online = make(gen, torch.bfloat16)
    expected = plain_ema(target, online, 0.9)
    fb = FlatBuffer(params_of(target))
    ema_update_flat_(fb.flat, online, 0.9)
    check(fb.views(), expected)
    fb2 = FlatBuffer(params_of(target))
    ema_update_flat_(fb2.flat, torch.cat([o.reshape(-1) for o in online]), 0.9)
    check(fb2.views(), expected)


def test_ema_update_flat_torch_fallback():
    gen = torch.Generator().manual_seed(3)
    target, online = make(gen)
    fb = FlatBuffer(params_of(target))
    ema_update_flat_(fb.flat, online, M)  # auto on CPU: lerp on the flat buffer
    check(fb.views(), plain_ema(target, online, M))


def test_auto_on_cpu_uses_foreach_and_reference_uses_loop(monkeypatch):
    from kernels import dispatch
    used = []
    monkeypatch.setattr(ema, "ema_update_foreach_", lambda *a: used.append("foreach"))
    monkeypatch.setattr(ema, "ema_update_reference", lambda *a: used.append("loop"))
    target, online = make(torch.Generator().manual_seed(0), shapes=[(3,)])
    ema_update_(target, online, M)
    dispatch.set_backend("reference")
    ema_update_(target, online, M)
    assert used == ["foreach", "loop"]


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_momentum_edges(triton_backend, m):
    gen = torch.Generator().manual_seed(4)
    target, online = make(gen, shapes=[(1023,), (17,)])
    fb = FlatBuffer(params_of(target))
    ema_update_(fb.params, online, m)
    check(fb.views(), [o.double() for o in online] if m == 0.0 else [t.double() for t in target])


def test_flatbuffer_rehomes_module_parameters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    x = torch.randn(4, 7)
    before = net(x)
    fb = FlatBuffer.from_module(net)
    assert fb.numel == sum(p.numel() for p in net.parameters())
    assert torch.equal(net(x), before)
    assert fb.is_intact()
    assert as_flat_view(list(net.parameters())).data_ptr() == fb.flat.data_ptr()
    fb.flat.zero_()  # the module sees writes to the buffer
    assert all(torch.count_nonzero(p) == 0 for p in net.parameters())
    net.load_state_dict({k: torch.ones_like(v) for k, v in net.state_dict().items()})
    assert fb.is_intact() and torch.equal(fb.flat, torch.ones_like(fb.flat))


def test_as_flat_view_rejects_non_flat_layouts():
    buf = torch.zeros(30)
    a, b, c = buf[0:10], buf[10:20], buf[20:30]
    assert as_flat_view([a, b, c]).numel() == 30
    assert as_flat_view([b, c]).data_ptr() == b.data_ptr()
    assert as_flat_view([a, c]) is None              # gap
    assert as_flat_view([b, a]) is None              # out of order
    assert as_flat_view([torch.zeros(3), torch.zeros(3)]) is None
    assert as_flat_view([buf.view(5, 6).t()]) is None  # non-contiguous


def test_errors():
    with pytest.raises(ValueError, match="2 target tensors but 1"):
        ema_update_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], M)
    with pytest.raises(ValueError, match="fp32"):
        ema_update_([torch.zeros(2, dtype=torch.bfloat16)], [torch.zeros(2)], M)
    with pytest.raises(ValueError, match="elements"):
        ema_update_flat_(torch.zeros(5), [torch.zeros(4)], M)


def test_auto_on_cuda_routing(monkeypatch):
    # 'auto' with tensors that dispatch sends to Triton (CUDA in real life; faked here): a flat target
    # buffer takes the one-launch kernel, ordinary parameters the foreach path (not one launch each).
    if not ema.triton_available():
        pytest.skip("triton is not installed")
    from kernels import dispatch
    if not dispatch.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    used = []
    monkeypatch.setattr(ema, "use_triton", lambda *a: True)
    monkeypatch.setattr(ema, "_launch_table", lambda *a: used.append("table"))
    monkeypatch.setattr(ema, "_launch_flat", lambda *a: used.append("flat"))
    monkeypatch.setattr(ema, "ema_update_foreach_", lambda *a: used.append("foreach"))
    target, online = make(torch.Generator().manual_seed(0), shapes=[(3,), (4, 2)])
    ema_update_(params_of(target), online, M)
    fb = FlatBuffer(params_of(target))
    ema_update_(fb.params, online, M)
    assert used == ["foreach", "table"]
