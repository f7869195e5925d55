"""One objective: the training loss and the MRR's targets come from the same definition."""
import torch
import torch.nn.functional as F

from engine.loss import iwm_loss, target_tokens
from engine.masks import MaskSampler
from engine.config import MaskConfig


def test_training_loss_is_the_squared_distance_to_the_mrr_targets():
    g = torch.Generator().manual_seed(0)
    masks = MaskSampler(MaskConfig(), 6, 6).sample(3, g)
    feats = torch.randn(3, 36, 16, generator=g) * 3 + 1
    pred = torch.randn(sum(masks.target_counts), 16, generator=g)
    eps = 1e-3  # large enough that using another eps would show
    targets = target_tokens(feats, masks, eps)
    torch.testing.assert_close(iwm_loss(pred, feats, masks, eps), ((pred - targets) ** 2).mean())
    # independent reference: per sample, its masked rows in order, F.layer_norm at that eps
    start, rows = 0, []
    for b, n in enumerate(masks.target_counts):
        idx = masks.target_idx[start:start + n]
        rows.append(F.layer_norm(feats[b, idx], (16,), eps=eps))
        start += n
    torch.testing.assert_close(targets, torch.cat(rows))
    assert not torch.allclose(target_tokens(feats, masks, 1.0), targets)
