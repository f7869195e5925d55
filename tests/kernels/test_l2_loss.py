"""kernels/l2_loss.py: fused gather + layer norm + squared L2 (+ gradient) against a plain formula.

The plain reference below works row by row in float64: mean, biased variance, (t - mean) / sqrt(var +
eps), then sum((p - t)^2) / (T*D) and d/dp = 2 (p - t) / (T*D).
Tolerances (fp32 kernel vs float64 formula): loss rtol 1e-5; gradient rtol 1e-4 with atol 1e-4 of the
gradient's largest entry (entries are ~1e-5 in size: 2 / (T*D) times an O(1) error).
"""
import math

import pytest
import torch

from kernels.l2_loss import masked_l2_loss, masked_l2_loss_reference


def plain_l2(pred, target, flat_idx, eps=1e-6):
    B, N, D = target.shape
    T = len(flat_idx)
    total = 0.0
    grad = torch.zeros(T, D, dtype=torch.float64)
    for r, i in enumerate(flat_idx.tolist()):
        t = target[i // N, i % N].double()
        mean = t.sum() / D
        var = ((t - mean) ** 2).sum() / D
        tn = (t - mean) / math.sqrt(var + eps)
        err = pred[r].double() - tn
        total += (err ** 2).sum().item()
        grad[r] = 2.0 * err / (T * D)
    return total / (T * D), grad


def ragged_idx(sizes, N, gen):
    return torch.cat([b * N + torch.randperm(N, generator=gen)[:k] for b, k in enumerate(sizes)])


CASES = [  # (B, N, D, per-sample target counts)
    (3, 50, 384, [1, 23, 14]),    # single-token sample, T = 38
    (2, 20, 1023, [9, 12]),       # odd width, T = 21
    (2, 16, 1280, [7, 1]),        # ViT-H width, T = 8
]


def _grad_close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("B,N,D,sizes", CASES)
def test_masked_l2_triton_matches_formula(triton_backend, B, N, D, sizes):
    gen = torch.Generator().manual_seed(D)
    # targets off-centre and scaled, as encoder features are: exercises the layer norm
    target = torch.randn(B, N, D, generator=gen) * 3.0 + 2.0
    idx = ragged_idx(sizes, N, gen)
    pred = torch.randn(len(idx), D, generator=gen, requires_grad=True)
    loss = masked_l2_loss(pred, target, idx)
    assert "MaskedL2LossFunction" in type(loss.grad_fn).__name__
    assert loss.dtype == torch.float32 and loss.dim() == 0
    exp_loss, exp_grad = plain_l2(pred.detach(), target, idx)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    (loss * 3.0).backward()  # grad_output != 1
    _grad_close(pred.grad, 3.0 * exp_grad)


def test_masked_l2_reference_matches_formula():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 10, 33, generator=gen)
    idx = torch.tensor([0, 19, 19, 4])  # repeated target rows are allowed
    pred = torch.randn(4, 33, generator=gen, requires_grad=True)
    loss = masked_l2_loss(pred, target, idx)  # auto on CPU -> reference
    exp_loss, exp_grad = plain_l2(pred.detach(), target, idx)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    loss.backward()
    _grad_close(pred.grad, exp_grad)
    assert masked_l2_loss_reference(pred, target, idx).item() == pytest.approx(exp_loss, rel=1e-5)


def test_masked_l2_no_grad_to_target_and_eps(triton_backend):
    target = torch.randn(2, 8, 384, requires_grad=True)
    target.data[1, 3] = 0.7  # a constant row: variance 0, eps decides the scale
    idx = torch.tensor([11, 2, 5])
    pred = torch.randn(3, 384, requires_grad=True)
    loss = masked_l2_loss(pred, target, idx, eps=1e-3)
    loss.backward()
    assert target.grad is None
    exp_loss, exp_grad = plain_l2(pred.detach(), target.detach(), idx, eps=1e-3)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    _grad_close(pred.grad, exp_grad)


def test_masked_l2_without_grad(triton_backend):
    target = torch.randn(1, 4, 384)
    pred = torch.randn(3, 384)
    loss = masked_l2_loss(pred, target, torch.tensor([0, 1, 3]))
    assert loss.item() == pytest.approx(plain_l2(pred, target, torch.tensor([0, 1, 3]))[0], rel=1e-5)


def test_masked_l2_rejects_bad_shapes():
    with pytest.raises(ValueError):
        masked_l2_loss(torch.randn(3, 8), torch.randn(1, 4, 9), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        masked_l2_loss(torch.randn(3, 8), torch.randn(1, 4, 8), torch.tensor([0, 1]))


def test_masked_l2_bf16_inputs(triton_backend):
    # bf16 pred and target: the kernel upcasts to fp32, loss is fp32, the gradient is bf16 (pred's dtype).
    # Tolerance: loss rel 1e-5 against the formula on the same bf16 values; gradient 1e-2 of its max
    # (rounding of the stored gradient to bf16).
    gen = torch.Generator().manual_seed(12)
    target = (torch.randn(2, 12, 384, generator=gen) * 2 + 1).to(torch.bfloat16)
    idx = torch.tensor([0, 5, 13, 23, 7])
    pred = torch.randn(5, 384, generator=gen).to(torch.bfloat16).requires_grad_()
    loss = masked_l2_loss(pred, target, idx)
    assert loss.dtype == torch.float32
    exp_loss, exp_grad = plain_l2(pred.detach(), target, idx)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    loss.backward()
    assert pred.grad.dtype == torch.bfloat16
    torch.testing.assert_close(pred.grad.double(), exp_grad, rtol=0, atol=1e-2 * exp_grad.abs().max().item())


@pytest.mark.parametrize("D,blocks", [(768, (8, 1024)), (1280, (4, 2048))])
def test_masked_l2_at_cuda_tiles(cuda_tiles, launch_grids, D, blocks):
    # the CUDA tiles under the interpreter (whole rows, 8 x 1024 or 4 x 2048 per program): several
    # programs, the last one partial, their partial sums added in order
    import kernels.l2_loss as mod
    from kernels import dispatch
    t = dispatch.tiles("masked_l2_loss", D, False)
    assert (t.block_t, t.block_d, t.num_warps) == (*blocks, 8)
    grids = launch_grids(mod, "_masked_l2_fwd_kernel")
    gen = torch.Generator().manual_seed(6)
    target = torch.randn(2, 16, D, generator=gen) * 3.0 + 2.0
    idx = ragged_idx([7, 6], 16, gen)  # T = 13
    pred = torch.randn(len(idx), D, generator=gen, requires_grad=True)
    loss = masked_l2_loss(pred, target, idx)
    exp_loss, exp_grad = plain_l2(pred.detach(), target, idx)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    loss.backward()
    _grad_close(pred.grad, exp_grad)
    assert grids == [(-(-13 // blocks[0]),)]
