"""MRR ranking against a plain loop and the chance formula; linear probe on separable data."""
import pytest
import torch

from engine.eval import chance_mrr, linear_probe, reciprocal_ranks


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
    from engine.ema import TargetEncoder
    from engine.models import IWM
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg("none")
    cfg.eval.mrr_candidates = 40  # not a multiple of the chunk below
    torch.manual_seed(0)
    model = IWM(cfg).eval()
    target = TargetEncoder(model.encoder)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mrr = mean_reciprocal_rank(model, target, images, cfg, generator=torch.Generator().manual_seed(2), chunk=16)
    assert mrr == pytest.approx(chance_mrr(40), abs=1e-9)
    cfg_f = tiny_cfg("feature")
    cfg_f.eval.mrr_candidates = 40
    model_f = IWM(cfg_f).eval()
    mrr_f = mean_reciprocal_rank(model_f, TargetEncoder(model_f.encoder), images, cfg_f,
                                 generator=torch.Generator().manual_seed(2), chunk=16)
    assert mrr_f != pytest.approx(chance_mrr(40), abs=1e-9)  # conditioned: predictions differ per action


class OracleSetup:
    """A tiny IWM whose predictor returns, for each action, the true candidate's target features (computed
    here independently: target encoder on the candidate view, its masked positions in order, F.layer_norm
    with the configured eps); ``engine.eval.mrr_views`` is spied on to learn the candidates (use as a
    context manager)."""

    def __init__(self, candidates: int = 24):
        import engine.eval as E
        from engine.ema import TargetEncoder
        from engine.models import IWM
        from tests.helpers import tiny_cfg

        self.E, self.cfg = E, tiny_cfg("feature")
        self.cfg.eval.mrr_candidates = candidates
        torch.manual_seed(0)
        self.model = IWM(self.cfg).eval()
        self.target = TargetEncoder(self.model.encoder)
        self.record, self.real_views = {}, E.mrr_views
        self.model.predictor.forward = self.oracle

    def spy_views(self, image, vcfg, k, generator=None):
        source, candidates, actions = self.real_views(image, vcfg, k, generator)
        self.record["candidates"], self.record["actions"] = candidates, actions
        self.record.setdefault("all_actions", []).append(actions)
        return source, candidates, actions

    def oracle(self, context, masks, action):
        import torch.nn.functional as F

        outs, start, rec = [], 0, self.record
        for b in range(masks.batch_size):
            k = [i for i in range(len(rec["actions"])) if torch.equal(rec["actions"][i], action[b])]
            assert len(k) == 1
            n = masks.target_counts[b]
            pos = masks.target_idx[start:start + n]
            feats = self.target.module(rec["candidates"][k[0]][None])[0, pos]
            outs.append(F.layer_norm(feats, feats.shape[-1:], eps=self.cfg.model.target_norm_eps))
            start += n
        return torch.cat(outs)

    def __enter__(self):
        self.E.mrr_views = self.spy_views
        return self

    def __exit__(self, *exc):
        self.E.mrr_views = self.real_views


def test_an_oracle_predictor_scores_exactly_one():
    """Catches targets that are not layer-normed, gathered in another order, or paired with another
    candidate's action."""
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with OracleSetup() as o:
        mrr = o.E.mean_reciprocal_rank(o.model, o.target, images, o.cfg, generator=torch.Generator().manual_seed(2),
                                       chunk=10)
    assert mrr == 1.0


def test_explained_variation_against_hand_values():
    from engine.eval import explained_variation

    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) + 3.0  # variation 1 per candidate
    assert explained_variation(t, t) == 1.0
    assert explained_variation(torch.full_like(t, 7.0), t) == 0.0  # blind: follows none of it
    assert abs(explained_variation(0.5 * t + 1.0, t) - 0.75) < 1e-12  # half the size: 1 - 0.5^2
    assert abs(explained_variation(-t, t) - (1 - 4.0)) < 1e-12  # the wrong direction: worse than blind


def test_per_op_profile_isolates_each_op_and_scores_an_oracle_at_one():
    """Each op's candidates vary in that op's action column only (the other jitter columns at the identity,
    no destructive op; the order columns may vary, which is immaterial with one op); an oracle predictor gets MRR 1 and R^2 1 on every op, a blind one chance and 0."""
    from engine.eval import JITTER_OPS, chance_mrr, equivariance_per_op
    from engine.views import identity_action

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with OracleSetup() as o:
        o.cfg.views.hue = 0.0  # an op of strength 0 is left out
        prof = equivariance_per_op(o.model, o.target, images, o.cfg, candidates=12,
                                   generator=torch.Generator().manual_seed(3))
        actions = o.record["all_actions"]
    assert list(prof) == ["brightness", "contrast", "saturation", "all"]
    for r in prof.values():
        assert r["mrr"] == 1.0 and abs(r["r2"] - 1.0) < 1e-9 and r["target_spread"] > 0
    cols = list(o.cfg.views.action_columns)
    ident = identity_action(1, o.cfg.views)[0]
    for i, op in enumerate(["brightness", "contrast", "saturation"]):
        a = actions[2 * i]  # two images per op
        varying = [c for j, c in enumerate(cols) if not torch.all(a[:, j] == ident[j]) and not c.startswith("rank_")]
        assert varying == [op], (op, varying)

    model = o.model
    model.predictor.forward = lambda ctx, masks, action: torch.zeros(int(masks.target_idx.numel()),
                                                                     o.cfg.model.embed_dim)
    blind = equivariance_per_op(model, o.target, images, o.cfg, candidates=12, generator=torch.Generator().manual_seed(3))
    for r in blind.values():
        assert abs(r["mrr"] - chance_mrr(12)) < 1e-12 and abs(r["r2"]) < 1e-12


def test_mrr_interval_is_mean_plus_minus_two_standard_errors():
    from engine.eval import mrr_interval

    per_image = torch.tensor([0.1, 0.3, 0.2, 0.4])
    mean, sd = 0.25, (sum((v - 0.25) ** 2 for v in [0.1, 0.3, 0.2, 0.4]) / 3) ** 0.5
    lo, hi = mrr_interval(per_image)
    assert lo == pytest.approx(mean - 1.96 * sd / 2) and hi == pytest.approx(mean + 1.96 * sd / 2)
