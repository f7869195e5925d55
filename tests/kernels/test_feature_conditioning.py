"""kernels/feature_conditioning.py: fused fc1 (per-position precompute + gather + action + GELU) and
its backward, outputs and gradients against a plain per-token float64 formula.

Plain reference: for each target token t, z_t = [mask_token + pos_embed[target_pos[t]], action[b_t]]
(built token by token), h = gelu(W1 z + b1), h = gelu(W2 h + b2), out = W3 h + b3 with
gelu(x) = x * (1 + erf(x / sqrt 2)) / 2, in float64; gradients by float64 autograd through it.
Tolerances (fp32 vs float64): outputs and every gradient rtol 1e-4 with atol 1e-4 of the expected
tensor's largest entry (gradients w.r.t. pos_embed / mask_token / w1 sum over up to T tokens).
"""
import math

import pytest
import torch

from kernels.feature_conditioning import feature_conditioning, feature_conditioning_reference

NAMES = ["mask_token", "pos_embed", "action", "w1", "b1", "w2", "b2", "w3", "b3"]


def plain_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def plain_feature_conditioning(p, target_pos, token_batch):
    """p: dict of float64 leaf tensors. The formula, token by token (each row of Z is one token's z)."""
    Z = torch.stack([torch.cat([p["mask_token"] + p["pos_embed"][n], p["action"][b]])
                     for n, b in zip(target_pos.tolist(), token_batch.tolist())])   # [T, D + A]
    h = plain_gelu(Z @ p["w1"].T + p["b1"])
    h = plain_gelu(h @ p["w2"].T + p["b2"])
    return h @ p["w3"].T + p["b3"]


def make_params(D, H, Dout, A, N, B, gen):
    def r(*shape, s=1.0):
        return torch.randn(*shape, generator=gen) * s
    return {
        "mask_token": r(D, s=0.02), "pos_embed": r(N, D), "action": r(B, A),
        "w1": r(H, D + A, s=1 / math.sqrt(D + A)), "b1": r(H, s=0.1),
        "w2": r(H, H, s=1 / math.sqrt(H)), "b2": r(H, s=0.1),
        "w3": r(Dout, H, s=1 / math.sqrt(H)), "b3": r(Dout, s=0.1),
    }


def ragged_tokens(sizes, N, gen):
    """target_pos, token_batch for per-sample target counts ``sizes`` (positions distinct per sample)."""
    pos = torch.cat([torch.randperm(N, generator=gen)[:k] for k in sizes])
    bat = torch.cat([torch.full((k,), b, dtype=torch.long) for b, k in enumerate(sizes)])
    return pos, bat


def _close(actual, expected, what):
    scale = max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4 * scale,
                               msg=lambda m: f"{what}: {m}")


def run_and_check(fn, params, pos, bat, need=NAMES, expect_fused=None):
    gen = torch.Generator().manual_seed(7)
    x32 = {k: v.clone().requires_grad_(k in need) for k, v in params.items()}
    x64 = {k: v.double().requires_grad_(k in need) for k, v in params.items()}
    out = fn(x32["mask_token"], x32["pos_embed"], pos, x32["action"], bat, x32["w1"], x32["b1"],
             x32["w2"], x32["b2"], x32["w3"], x32["b3"])
    if expect_fused is not None:
        assert ("FeatureConditioningFunction" in type(out.grad_fn).__name__) == expect_fused
    exp = plain_feature_conditioning(x64, pos, bat)
    _close(out, exp, "output")
    g = torch.randn(exp.shape, generator=gen)
    out.backward(g)
    exp.backward(g.double())
    for k in NAMES:
        if k in need:
            _close(x32[k].grad, x64[k].grad, f"grad {k}")
        else:
            assert x32[k].grad is None, k


CASES = [  # (D, H, Dout, A, N, B, per-sample target counts)
    (384, 384, 384, 7, 49, 3, [1, 20, 16]),   # ViT-B predictor width, a single-token sample, T = 37
    (40, 96, 24, 7, 16, 2, [9, 4]),           # D != H != Dout: catches transposed weights
    (1023, 1023, 1023, 7, 12, 2, [5, 6]),     # odd width
    (1280, 512, 1280, 3, 8, 2, [3, 2]),       # ViT-H encoder width in, predictor width hidden
]


@pytest.mark.parametrize("D,H,Dout,A,N,B,sizes", CASES)
def test_feature_conditioning_triton_matches_loop(triton_backend, D, H, Dout, A, N, B, sizes):
    gen = torch.Generator().manual_seed(D + H)
    params = make_params(D, H, Dout, A, N, B, gen)
    pos, bat = ragged_tokens(sizes, N, gen)
    run_and_check(feature_conditioning, params, pos, bat, expect_fused=True)


def test_feature_conditioning_reference_matches_loop():
    gen = torch.Generator().manual_seed(3)
    params = make_params(32, 48, 16, 7, 10, 3, gen)
    pos, bat = ragged_tokens([4, 1, 6], 10, gen)
    run_and_check(feature_conditioning, params, pos, bat, expect_fused=False)  # auto on CPU
    run_and_check(feature_conditioning_reference, params, pos, bat)


def test_feature_conditioning_partial_grads(triton_backend):
    # fixed sin-cos positions and data-side actions: no gradient wanted for them
    gen = torch.Generator().manual_seed(5)
    params = make_params(64, 128, 64, 7, 16, 2, gen)
    pos, bat = ragged_tokens([5, 8], 16, gen)
    need = ["mask_token", "w1", "b1", "w2", "b2", "w3", "b3"]
    run_and_check(feature_conditioning, params, pos, bat, need=need, expect_fused=True)
    run_and_check(feature_conditioning, params, pos, bat, need=["action"], expect_fused=True)


def test_feature_conditioning_unsorted_tokens_repeated_positions(triton_backend):
    # tokens need not be grouped by sample; the same position may appear in several samples
    gen = torch.Generator().manual_seed(9)
    params = make_params(64, 64, 64, 7, 6, 3, gen)
    pos = torch.tensor([5, 0, 5, 5, 2, 0, 1])
    bat = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    run_and_check(feature_conditioning, params, pos, bat, expect_fused=True)


def test_feature_conditioning_rejects_bad_shapes():
    gen = torch.Generator().manual_seed(0)
    p = make_params(8, 8, 8, 7, 4, 2, gen)
    pos, bat = torch.tensor([0, 1]), torch.tensor([0, 1])
    with pytest.raises(ValueError):
        feature_conditioning(p["mask_token"], p["pos_embed"], pos, p["action"][:, :3], bat,
                             p["w1"], p["b1"], p["w2"], p["b2"], p["w3"], p["b3"])
    with pytest.raises(ValueError):
        feature_conditioning(p["mask_token"], p["pos_embed"], pos, p["action"], bat[:1],
                             p["w1"], p["b1"], p["w2"], p["b2"], p["w3"], p["b3"])


def test_feature_conditioning_bf16_autocast(triton_backend):
    # Under bf16 autocast fc2/fc3 (and P) run in bf16 in both versions; the fused fc1 action term and
    # GELU are fp32. Tolerance: 3e-2 of each tensor's largest entry against float64 (bf16 has 8 bits).
    gen = torch.Generator().manual_seed(11)
    params = make_params(384, 384, 384, 7, 49, 3, gen)
    pos, bat = ragged_tokens([1, 20, 16], 49, gen)
    x = {k: v.clone().requires_grad_() for k, v in params.items()}
    x64 = {k: v.double().requires_grad_() for k, v in params.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = feature_conditioning(x["mask_token"], x["pos_embed"], pos, x["action"], bat, x["w1"], x["b1"],
                                   x["w2"], x["b2"], x["w3"], x["b3"])
    assert out.dtype == torch.bfloat16
    exp = plain_feature_conditioning(x64, pos, bat)
    g = torch.randn(exp.shape, generator=gen)
    out.backward(g.to(out.dtype))
    exp.backward(g.double())
    torch.testing.assert_close(out.double(), exp, rtol=0, atol=3e-2 * exp.abs().max().item())
    for k in NAMES:
        assert x[k].grad.dtype == torch.float32, k
        e = x64[k].grad
        torch.testing.assert_close(x[k].grad.double(), e, rtol=0, atol=3e-2 * e.abs().max().item(),
                                   msg=lambda m, k=k: f"grad {k}: {m}")


@pytest.mark.parametrize("H,blocks", [(384, (16, 128)), (512, (4, 512)), (1023, (4, 512))])
def test_feature_conditioning_at_cuda_tiles(cuda_tiles, launch_grids, H, blocks):
    # the CUDA tiles under the interpreter (384 -> 3 column tiles of 128, 1023 -> 2 of 512, 512 (ViT-H
    # predictor) -> 1; several row tiles): the action-gradient atomics add partial sums from several column tiles per token, the
    # P / b1 / w1 gradient atomics from several row tiles
    import kernels.feature_conditioning as mod
    from kernels import dispatch
    t = dispatch.tiles("feature_conditioning", H, False)
    assert (t.block_t, t.block_d) == blocks
    fwd, bwd = launch_grids(mod, "_fc1_gelu_fwd_kernel"), launch_grids(mod, "_fc1_gelu_bwd_kernel")
    gen = torch.Generator().manual_seed(H)
    params = make_params(64, H, 48, 7, 20, 3, gen)
    sizes = [1, 20, 16] if blocks[0] < 32 else [1, 20, 16, 20]  # more rows than one row tile
    params["action"] = torch.randn(len(sizes), 7, generator=gen)
    pos, bat = ragged_tokens(sizes, 20, gen)
    run_and_check(feature_conditioning, params, pos, bat, expect_fused=True)
    expected_grid = (-(-sum(sizes) // blocks[0]), -(-H // blocks[1]))
    assert fwd == [expected_grid] and bwd == [expected_grid]
    assert expected_grid[0] > 1 and (expected_grid[1] > 1) == (H != 512)  # 512: one column tile
