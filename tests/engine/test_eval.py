"""MRR ranking against a plain loop and the chance formula; linear probe on separable data."""
import pytest
import torch

from engine.eval import linear_probe, reciprocal_ranks
from engine.train import chance_mrr


def test_reciprocal_ranks_plain_loop():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(9, 9, generator=g)
    got = reciprocal_ranks(d)
    for j in range(9):
        rank = 1 + sum(1 for k in range(9) if d[j, k] < d[j, j])
        assert got[j].item() == pytest.approx(1.0 / rank)


def test_perfect_and_worst_rankings():
    d = torch.ones(4, 4) - torch.eye(4)  # the true candidate is always the closest
    assert reciprocal_ranks(d).mean().item() == 1.0
    d = torch.eye(4)  # the true candidate is always the farthest
    assert reciprocal_ranks(d).mean().item() == pytest.approx(0.25)


def test_random_ranking_matches_chance_formula():
    # the harmonic number H_K / K; for K = 256 that is about 0.0239
    assert chance_mrr(256) == pytest.approx(sum(1 / r for r in range(1, 257)) / 256)
    assert chance_mrr(256) == pytest.approx(0.02393, abs=1e-4)
    g = torch.Generator().manual_seed(1)
    vals = torch.cat([reciprocal_ranks(torch.rand(64, 64, generator=g)) for _ in range(200)])
    assert vals.mean().item() == pytest.approx(chance_mrr(64), rel=0.05)


def test_linear_probe_separates_separable_data():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(3, 16, generator=g) * 4
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 16, generator=g)
    res = linear_probe(x[:200], y[:200], x[200:], y[200:], epochs=100, lr=0.05)
    assert res["val_top1"] > 95 and res["classes"] == 3
    shuffled = linear_probe(x[:200], y[torch.randperm(200, generator=g)], x[200:], y[200:], epochs=100, lr=0.05)
    assert shuffled["val_top1"] < 60  # labels carry no signal: near chance (33%)
