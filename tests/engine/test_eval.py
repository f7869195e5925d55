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


def test_ties_get_the_mid_rank():
    # candidates 0..3 all at distance 0 from every prediction: each true candidate ties with 3 others,
    # mid-rank 1 + 3/2 = 2.5 (a strict rule would give rank 1 and MRR 1 to a blind predictor)
    d = torch.zeros(4, 4)
    assert reciprocal_ranks(d).tolist() == pytest.approx([1 / 2.5] * 4)


def test_blind_predictor_equal_to_duplicated_candidates_earns_no_credit():
    from engine.eval import latent_reciprocal_ranks

    g = torch.Generator().manual_seed(3)
    K, F_ = 100, 12
    targets = torch.randn(K, F_, generator=g)
    targets[:20] = targets[0]  # 20% of the candidates are the same (e.g. unjittered) image
    preds = targets[0].expand(K, -1)  # ignores the action, always predicts that image
    assert latent_reciprocal_ranks(preds, targets).mean().item() < 2 * chance_mrr(K)
    distinct = torch.randn(K, F_, generator=g)
    assert latent_reciprocal_ranks(distinct, distinct).mean().item() == 1.0  # an oracle is perfect


def test_mrr_of_an_unconditioned_predictor_is_exactly_chance():
    """With conditioning=none the prediction is the same for every candidate of an image, so the true
    candidates' ranks are a permutation of 1..K: MRR = H_K / K exactly (candidates are all distinct)."""
    from engine.eval import mean_reciprocal_rank
    from engine.models import IWM, make_target_encoder
    from tests.engine.test_models import tiny_cfg

    cfg = tiny_cfg("none")
    cfg.eval.mrr_candidates = 40  # not a multiple of the chunk below
    torch.manual_seed(0)
    model = IWM(cfg).eval()
    target = make_target_encoder(model.encoder)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mrr = mean_reciprocal_rank(model, target, images, cfg, generator=torch.Generator().manual_seed(2), chunk=16)
    assert mrr == pytest.approx(chance_mrr(40), abs=1e-9)
    cfg_f = tiny_cfg("feature")
    cfg_f.eval.mrr_candidates = 40
    model_f = IWM(cfg_f).eval()
    mrr_f = mean_reciprocal_rank(model_f, make_target_encoder(model_f.encoder), images, cfg_f,
                                 generator=torch.Generator().manual_seed(2), chunk=16)
    assert mrr_f != pytest.approx(chance_mrr(40), abs=1e-9)  # conditioned: predictions differ per action
