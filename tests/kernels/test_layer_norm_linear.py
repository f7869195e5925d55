"""kernels/layer_norm_linear.py: LayerNorm in the prologue of the following linear projection, its
forward and backward against a plain float64 formula, at odd shapes; its reference path against timm's
LayerNorm + nn.Linear, bit for bit.

Plain reference: per row r of x, mu = sum_k x[r, k] / K, var = sum_k (x[r, k] - mu)^2 / K,
xn = (x[r] - mu) / sqrt(var + eps) * gamma + beta, y[r] = W xn + b (float64); gradients by float64
autograd through it. Tolerances against it, each relative to the expected tensor's largest entry:
fp32 rtol 1e-4 / atol 1e-4 (sums over up to M rows); bf16 operands (8-bit mantissa, fp32 accumulation)
atol 3e-2.
"""
import pytest
import torch
import torch.nn as nn
from timm.layers import LayerNorm as TimmLayerNorm

from kernels import dispatch
from kernels.layer_norm_linear import layer_norm_linear, layer_norm_linear_reference

NAMES = ["x", "ln_weight", "ln_bias", "weight", "bias"]
EPS = 1e-6


def plain_layer_norm_linear(x, ln_weight, ln_bias, weight, bias, eps=EPS):
    K = x.shape[-1]
    mu = x.sum(-1, keepdim=True) / K
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / K
    xn = (x - mu) / torch.sqrt(var + eps)
    if ln_weight is not None:
        xn = xn * ln_weight
    if ln_bias is not None:
        xn = xn + ln_bias
    y = xn @ weight.T
    return y + bias if bias is not None else y


def make_inputs(M, K, N, gen, dtype=torch.float32, lead=()):
    def r(*shape, s=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * s + shift).to(dtype)
    # rows with an offset and a scale: the statistics must not cancel (mean 3, std 2)
    return {"x": r(*lead, M, K, s=2.0, shift=3.0), "ln_weight": r(K, s=0.5, shift=1.0), "ln_bias": r(K, s=0.1),
            "weight": r(N, K, s=K ** -0.5), "bias": r(N, s=0.1)}


def _close(actual, expected, what, atol):
    scale = max(expected.abs().max().item(), 1e-12)
    rtol = 1e-4 if atol <= 1e-4 else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


def run_and_check(params, need=NAMES, atol=1e-4, expect_fused=True, fn=layer_norm_linear):
    ps = {k: (None if v is None else v.clone().requires_grad_(k in need)) for k, v in params.items()}
    p64 = {k: (None if v is None else v.double().requires_grad_(k in need)) for k, v in params.items()}
    y = fn(ps["x"], ps["ln_weight"], ps["ln_bias"], EPS, ps["weight"], ps["bias"])
    assert ("LayerNormLinearFunction" in type(y.grad_fn).__name__) == expect_fused
    exp = plain_layer_norm_linear(p64["x"], p64["ln_weight"], p64["ln_bias"], p64["weight"], p64["bias"])
    assert y.shape == exp.shape and y.dtype == params["x"].dtype
    _close(y, exp, "output", atol)
    g = torch.randn(exp.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g.to(y.dtype))
    exp.backward(g.double())
    for k in NAMES:
        if ps[k] is None:
            continue
        if k in need:
            assert ps[k].grad.dtype == params[k].dtype, k
            _close(ps[k].grad, p64[k].grad, f"grad {k}", atol)
        else:
            assert ps[k].grad is None, k


CASES = [  # (M, K, N)
    (47, 100, 300),    # odd everything
    (1, 64, 48),       # a single row
    (129, 384, 1152),  # ViT-S / predictor width -> QKV, one row over a tile
    (70, 192, 768),    # ViT-Ti width -> fc1
    (33, 200, 17),     # N < a column tile, K not a multiple of the reduction block
]


@pytest.mark.parametrize("M,K,N", CASES)
def test_fused_matches_formula_fp32(triton_backend, M, K, N):
    run_and_check(make_inputs(M, K, N, torch.Generator().manual_seed(M + K + N)))


@pytest.mark.parametrize("M,K,N", [(47, 100, 300), (129, 384, 1152)])
def test_fused_matches_formula_bf16(triton_backend, M, K, N):
    run_and_check(make_inputs(M, K, N, torch.Generator().manual_seed(M), dtype=torch.bfloat16), atol=3e-2)


def test_fused_packed_3d_input_without_affine_or_bias(triton_backend):
    gen = torch.Generator().manual_seed(4)
    p = make_inputs(37, 96, 80, gen, lead=(1,))  # a packed ragged batch [1, T, C]
    run_and_check(p)
    run_and_check(dict(p, ln_weight=None, ln_bias=None, bias=None), need=["x", "weight"])


def test_fused_partial_gradients(triton_backend):
    # frozen network (x only: a finetuning probe's input) and data-free parameters (no x gradient)
    p = make_inputs(40, 64, 96, torch.Generator().manual_seed(6))
    run_and_check(p, need=["x"])
    run_and_check(p, need=["ln_weight", "weight"])
    run_and_check(p, need=["bias", "ln_bias"])


@pytest.mark.parametrize("M,K,N", [(100, 256, 130), (70, 320, 200)])
def test_fused_at_cuda_tiles(cuda_tiles, launch_grids, M, K, N):
    # the CUDA tiles under the interpreter: several row and column tiles of y, several K tiles of g_W and
    # row tiles of the LayerNorm backward, whose atomics add the LayerNorm gradients across row tiles
    import kernels.layer_norm_linear as mod
    fwd, dw, bwd = (launch_grids(mod, name) for name in ("_ln_linear_fwd_kernel", "_ln_linear_dw_kernel",
                                                          "_ln_bwd_kernel"))
    run_and_check(make_inputs(M, K, N, torch.Generator().manual_seed(K)))
    t, tw, tb = (dispatch.tiles(op, D, True) for op, D in (("layer_norm_linear", N), ("layer_norm_linear_dw", K),
                                                            ("layer_norm_backward", K)))
    assert fwd == [(-(-M // t.block_t), -(-N // t.block_d))]
    assert dw == [(-(-N // tw.block_t), -(-K // tw.block_d))]
    assert bwd == [(-(-M // tb.block_t),)]
    assert fwd[0][0] > 1 and fwd[0][1] > 1 and dw[0][0] > 1 and dw[0][1] > 1 and bwd[0][0] > 1


def test_fused_under_autocast(triton_backend):
    # fp32 x and parameters under bf16 autocast: the matmuls in bf16 (fp32 accumulation), y bf16 as
    # F.linear's under autocast, gradients fp32
    p = make_inputs(47, 100, 300, torch.Generator().manual_seed(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm_linear(p["x"], p["ln_weight"], p["ln_bias"], EPS, p["weight"], p["bias"])
        ref = layer_norm_linear_reference(p["x"], p["ln_weight"], p["ln_bias"], EPS, p["weight"], p["bias"])
    assert y.dtype == ref.dtype == torch.bfloat16
    exp = plain_layer_norm_linear(*(p[k].double() for k in NAMES))
    _close(y, exp, "output", 3e-2)


def test_reference_is_timm_layer_norm_then_linear_bit_for_bit():
    # the CPU path must change no bit of a model: what timm's LayerNorm and nn.Linear compute, outputs
    # and every gradient equal (torch.equal, not close)
    gen = torch.Generator().manual_seed(2)
    norm, linear = TimmLayerNorm(192), nn.Linear(192, 576)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(192, generator=gen))
        norm.bias.copy_(torch.randn(192, generator=gen))
    x = (torch.randn(1, 301, 192, generator=gen) * 3 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y_timm = linear(norm(x))
    y = layer_norm_linear(x2, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)
    assert type(y.grad_fn).__name__ != "LayerNormLinearFunctionBackward"  # auto on CPU: the reference
    assert torch.equal(y, y_timm)
    g = torch.randn(y.shape, generator=gen)
    timm_grads = torch.autograd.grad(y_timm, [x, norm.weight, norm.bias, linear.weight, linear.bias], g)
    grads = torch.autograd.grad(y, [x2, norm.weight, norm.bias, linear.weight, linear.bias], g)
    for a, b, name in zip(grads, timm_grads, NAMES):
        assert torch.equal(a, b), name


def test_reference_matches_formula():
    run_and_check(make_inputs(47, 100, 300, torch.Generator().manual_seed(3)), expect_fused=False)
    dispatch.set_backend("reference")
    run_and_check(make_inputs(5, 16, 8, torch.Generator().manual_seed(3)), expect_fused=False)


def test_bad_shapes_are_clear_errors():
    p = make_inputs(4, 16, 8, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"weight \[N, K\]"):
        layer_norm_linear(p["x"], p["ln_weight"], p["ln_bias"], EPS, p["weight"][:, :8], p["bias"])
    with pytest.raises(ValueError, match=r"ln_weight must be \[16\]"):
        layer_norm_linear(p["x"], p["ln_weight"][:8], p["ln_bias"], EPS, p["weight"], p["bias"])
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        layer_norm_linear(p["x"], p["ln_weight"], p["ln_bias"], EPS, p["weight"], p["bias"][:4])
