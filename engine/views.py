"""Photometric views with a recorded action: the target view y, the source view x = F_x(y) and a_{x->y}.

The loader applies the geometry shared by both views (random resized crop + flip, ``engine/data/``).
Here, on the training device and vectorised over the batch, the views are composed as the method does
(``docs/method.md``, "Views and the action"): the target is drawn first and the source is derived from it.

    target  y = J_y(I)                  colour jitter (with probability jitter_p)
    source  z = J_x(y)                  a further colour jitter of y (with probability jitter_p)
            x = D(z) = solarize(grayscale(blur(z)))   source-only destructive ops, each with its own p
    action  a = (J_x^{-1}, D)           how to get y back from x

The inverse of a jitter is a jitter: reciprocal brightness / contrast / saturation factors and the
negated hue shift, applied in the reverse order (gray(x) and mean(gray(x)) are preserved by the
contrast and saturation blends because the luma weights sum to 1, and the hue rotation keeps S and V),
so y = J_x^{-1}(z) exactly wherever the forward jitter did not clamp. D is not invertible (grayscale,
solarize); the action records which destructive ops ran (and the blur's sigma), so x, a -> y is a
function wherever the transforms are invertible.

Jitter order: torchvision's ColorJitter runs its four ops in a random order per call; the paper does not
say which it used (with torchvision, that is the random order). ``views.jitter_order = 'random'`` (the
default) draws a permutation per sample and the action encodes it; ``'fixed'`` always runs brightness,
contrast, saturation, hue and the action has no order columns.

The action, ``[B, cfg.action_dim]`` float32 (``ViewConfig.action_columns`` names the columns):
    0  brightness   factor of J_x^{-1}: 1 / b_x   (1 = unchanged)
    1  contrast     1 / c_x
    2  saturation   1 / s_x
    3  hue          -h_x, in turns                (0 = unchanged)
    4-7 (jitter_order='random' only) rank_brightness, rank_contrast, rank_saturation, rank_hue: the step at
       which J_x^{-1} applies that op, / 3 (0 = first, 1 = last); the reverse of J_x's order
    then  blur (0/1), blur_sigma (0 when no blur), grayscale (0/1), solarize (0/1): D, applied to x
Where J_x was not applied the factors are 1, the hue 0 and the order the canonical one, which is
:func:`identity_action`.

The ops follow torchvision (``transforms.v2.functional``) on float images in [0, 1], each clamped:
  brightness  b * x
  contrast    c * x + (1 - c) * mean(gray(x))     (mean over the whole image)
  saturation  s * x + (1 - s) * gray(x)           gray = 0.2989 R + 0.587 G + 0.114 B
  hue         rotate the HSV hue by h turns (S and V kept); computed on the HSV hexagon directly,
              without an RGB -> HSV -> RGB round trip
  blur        gaussian, kernel size 2 * ceil(3 sigma) + 1, reflect padding
  grayscale   3-channel luma;   solarize   x >= threshold -> 1 - x
Implementation: the three blends are one per-sample 3x3 colour matrix plus offset (one batched matmul);
the hue is computed once per jitter (each sample's blends before it and after it go in slots around it,
:func:`_slots`); the blur is two batched matmuls with per-sample matrices holding the taps and the reflect
padding. No Python loop over samples and no host sync on an accelerator: each op runs on the whole batch
and the samples that skip it keep their input. On the CPU (no device to wait for) each op runs only on
the samples that need it; both paths give the same pixels. Throughput: ``benchmarks/data_pipeline.py``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from engine.config import ViewConfig

# jitter op ids, as stored in ViewParams.order
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# torchvision's rgb_to_grayscale weights (ITU-R 601 luma, 0.299 written as 0.2989 there)
LUMA = (0.2989, 0.587, 0.114)


@dataclass
class ViewParams:
    """What one jitter (and, for the source, the destructive ops) did to each sample; per-sample tensors.

    Factors are 1.0, the hue shift 0.0 and ``order`` the canonical (0, 1, 2, 3) where the jitter was not
    applied; ``blur_sigma`` is 0.0 where no blur was applied. ``order[i]`` is the permutation of
    (0, 1, 2, 3) = (brightness, contrast, saturation, hue) in which the jitter ops ran for sample i.
    """

    jitter_applied: torch.Tensor  # [B] bool
    brightness: torch.Tensor  # [B] float32, factor
    contrast: torch.Tensor  # [B] float32, factor
    saturation: torch.Tensor  # [B] float32, factor
    hue: torch.Tensor  # [B] float32, shift in turns
    order: torch.Tensor  # [B, 4] int64, permutation of 0..3
    blur_applied: torch.Tensor  # [B] bool
    blur_sigma: torch.Tensor  # [B] float32
    grayscale: torch.Tensor  # [B] bool
    solarize: torch.Tensor  # [B] bool

    @property
    def batch_size(self) -> int:
        return self.jitter_applied.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def _map(self, fn) -> "ViewParams":
        return ViewParams(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "ViewParams":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def repeat_interleave(self, repeats: int) -> "ViewParams":
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
def _uniform(lo: float, hi: float, n: int, generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _bernoulli(p: float, n: int, generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def _sample(cfg: ViewConfig, batch: int, generator, device, destructive: bool) -> ViewParams:
    # every uniform in one draw, where the generator lives (a CPU generator gives the same params
    # whatever the training device); columns: applied, b, c, s, h, blur, sigma, grayscale, solarize
    dev = generator.device if generator is not None else torch.device(device if device is not None else "cpu")
    u = torch.rand(batch, 9, generator=generator, device=dev)
    applied = u[:, 0] < cfg.jitter_p
    # torchvision ColorJitter ranges: [max(0, 1 - v), 1 + v] for the factors, [-h, h] for the hue
    v = (cfg.brightness, cfg.contrast, cfg.saturation)
    lo = torch.tensor([max(0.0, 1 - x) for x in v] + [-cfg.hue], device=dev)
    hi = torch.tensor([1 + x for x in v] + [cfg.hue], device=dev)
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev)
    jitter = torch.where(applied[:, None], lo + (hi - lo) * u[:, 1:5], identity)  # [B, 4]
    canonical = torch.arange(4, device=dev).expand(batch, 4)
    if cfg.jitter_order == "random":
        order = torch.where(applied[:, None], torch.rand(batch, 4, generator=generator, device=dev).argsort(dim=1),
                            canonical)
    else:
        order = canonical.clone()
    if destructive:
        blur = u[:, 5] < cfg.blur_p
        sigma = torch.where(blur, cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, 6], 0.0)
        gray, sol = u[:, 7] < cfg.grayscale_p, u[:, 8] < cfg.solarize_p
    else:
        blur = gray = sol = torch.zeros(batch, dtype=torch.bool, device=dev)
        sigma = torch.zeros(batch, device=dev)
    b, c, s, h = jitter.unbind(dim=1)
    params = ViewParams(applied, b, c, s, h, order, blur, sigma, gray, sol)
    return params.to(device) if device is not None else params


def sample_target_params(cfg: ViewConfig, batch: int, generator: Optional[torch.Generator] = None,
                         device=None) -> ViewParams:
    """J_y, the target's jitter: colour jitter only, never a destructive op."""
    return _sample(cfg, batch, generator, device, destructive=False)


def sample_source_params(cfg: ViewConfig, batch: int, generator: Optional[torch.Generator] = None,
                         device=None) -> ViewParams:
    """J_x and D, applied to the target view: a further jitter + blur / grayscale / solarize per cfg's p."""
    return _sample(cfg, batch, generator, device, destructive=True)


def inverse_jitter(params: ViewParams) -> ViewParams:
    """J^{-1}: reciprocal factors, negated hue, the reverse order; no destructive op. Exact where J did
    not clamp (the luma weights sum to 1, so a blend's reference gray / mean gray is preserved)."""
    false = torch.zeros_like(params.blur_applied)
    return ViewParams(params.jitter_applied, 1.0 / params.brightness, 1.0 / params.contrast,
                      1.0 / params.saturation, -params.hue, params.order.flip(1), false,
                      torch.zeros_like(params.blur_sigma), false.clone(), false.clone())


# ----------------------------------------------------------------------------------------------------
# Running an op on some samples of a batch
# ----------------------------------------------------------------------------------------------------
def _compact(device: torch.device) -> bool:
    """Run ops only on the samples that need them (host-side indexing) on the CPU; on an accelerator run
    them on the whole batch and select, which needs no host sync."""
    return device.type == "cpu"


class _Work:
    """The batch being transformed; copied on the first in-place write so the caller's tensor is kept."""

    def __init__(self, x: torch.Tensor):
        self.x, self.owned = x, False

    def apply(self, mask: torch.Tensor, fn: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]):
        """Apply ``fn`` to the samples where ``mask`` [B] is True. ``fn(xs, idx)`` gets those samples and
        their indices (``None``: all of them) to pick its per-sample parameters with."""
        x = self.x
        if not _compact(x.device):
            self.x, self.owned = torch.where(mask.view(-1, 1, 1, 1), fn(x, None), x), True
            return
        idx = mask.nonzero().flatten()
        if idx.numel() == 0:
            return
        if idx.numel() == x.shape[0]:
            self.x, self.owned = fn(x, None), True
            return
        out = fn(x.index_select(0, idx), idx)
        if not self.owned:
            self.x, self.owned = x.clone(memory_format=torch.contiguous_format), True
        self.x.index_copy_(0, idx, out)


def _pick(t: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    return t if idx is None else t.index_select(0, idx)


# ----------------------------------------------------------------------------------------------------
# The ops, per-sample parameters broadcast over [n, 3, H, W]
# ----------------------------------------------------------------------------------------------------
def _luma(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(LUMA, device=x.device, dtype=x.dtype)


def _gray(x: torch.Tensor) -> torch.Tensor:  # [n, 3, H, W] -> [n, 1, H, W]
    n, _, H, W = x.shape
    return torch.matmul(_luma(x).view(1, 1, 3), x.reshape(n, 3, H * W)).view(n, 1, H, W)


def _blend_matrices(op: torch.Tensor, factor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Brightness, contrast or saturation (op [...] in 0..2, factor [...]) as a colour matrix and an offset
    coefficient: torchvision's clamp(f x + (1 - f) ref), ref = 0, mean(gray(x)) or gray(x), is
    clamp(A x + con * mean(w^T x)) with A = f I + (1 - f) [op == saturation] 1 w^T (w: the luma weights)
    and con = (1 - f) [op == contrast]. Returns A [..., 3, 3] and con [...]."""
    f = factor.float()
    rest = 1.0 - f
    w = torch.tensor(LUMA, device=f.device)
    eye = torch.eye(3, device=f.device)
    A = f[..., None, None] * eye + (rest * (op == SATURATION))[..., None, None] * w.view(1, 3)
    return A, rest * (op == CONTRAST)


def _blend(x: torch.Tensor, A: torch.Tensor, con: torch.Tensor) -> torch.Tensor:
    """clamp(A x + con * mean(gray(x))) on x [n, 3, H, W], A [n, 3, 3], con [n]: one batched matmul."""
    n, _, H, W = x.shape
    xf = x.reshape(n, 3, H * W)
    mean_gray = xf.mean(dim=2) @ _luma(x)  # [n]
    offset = (con.to(x.dtype) * mean_gray).view(n, 1, 1).expand(n, 3, 1)
    return torch.baddbmm(offset, A.to(x.dtype), xf).clamp_(0.0, 1.0).view(n, 3, H, W)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of x [n, 3, H, W] by shift [n] (turns), keeping S and V.

    The hue H in sextants from the channel that is the max (torchvision / PIL's formula), shifted, wrapped
    to [0, 6); then channel c = V - C * T_c with C = max - min and T_c = clamp(||H - t_c| - 3| - 1, 0, 1),
    t = (3, 5, 1) for (R, G, B): the HSV hexagon in closed form, no RGB -> HSV -> RGB round trip; equal to
    torchvision's sextant table up to float rounding. Branch-free and mostly in place (float masks from
    sign(), few temporaries): this op dominates the views' cost on the CPU.
    """
    n = x.shape[0]
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    torch.sub(maxc, chroma, out=chroma)  # C = max - min
    dr, dg, db = maxc - r, maxc - g, maxc - b  # >= 0, 0 where that channel is the max
    not_r = torch.sign(dr)
    is_b = torch.sign(dg).mul_(not_r)  # neither r nor g is the max
    is_g = not_r.sub_(is_b)  # g is the max and r is not (r wins ties, then g, as torchvision)
    # H * C: r max: g - b = db - dg; g max: 2C + b - r = 2C + dr - db; b max: 4C + r - g = 4C + dg - dr
    h6 = db - dg
    term = torch.add(dr, dg).sub_(db, alpha=2.0).add_(chroma, alpha=2.0).mul_(is_g)  # g max: 2C + dr - db - h6
    h6.add_(term)
    torch.sub(dg, dr, out=term).add_(dg).sub_(db).add_(chroma, alpha=4.0).mul_(is_b)  # b max: 4C + dg - dr - h6
    h6.add_(term)
    h6.mul_(chroma.clamp(min=1e-12).reciprocal_()).add_((6.0 * shift.to(x.dtype)).view(n, 1, 1))
    h6.sub_(torch.floor(torch.mul(h6, 1.0 / 6.0, out=term)).mul_(6.0))  # wrapped to [0, 6)
    t = torch.tensor((3.0, 5.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    d = (h6.unsqueeze(1) - t).abs_().sub_(3.0).abs_().clamp_(1.0, 2.0).mul_(chroma.unsqueeze(1))  # C (1 + T)
    return torch.sub(maxc.add_(chroma).unsqueeze(1), d, out=d)


def _slots(params: ViewParams) -> torch.Tensor:
    """[B, 7] op per slot, -1 for none: each sample's blends before its hue right-aligned in slots 0-2,
    the hue in slot 3, the blends after it left-aligned in slots 4-6 (step j goes to slot j + 3 - k for
    a hue at step k). Every sample's ops keep their order and the hue runs once, for all samples at once."""
    k = (params.order == HUE).to(torch.long).argmax(dim=1, keepdim=True)  # [B, 1] the hue's step
    steps = torch.arange(4, device=params.order.device).view(1, 4)
    return torch.full((params.batch_size, 7), -1, dtype=torch.long, device=params.order.device).scatter_(
        1, steps + 3 - k, params.order)


def apply_jitter(images: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """The colour jitter of ``params`` on images [B, 3, H, W] in [0, 1]: each sample's four ops in its
    recorded order (a loop over 7 slots, not over the samples, see :func:`_slots`); samples with
    ``jitter_applied`` False are returned unchanged."""
    work = _Work(_as_float(images))
    params = params.to(work.x.device)
    slots = torch.where(params.jitter_applied[:, None], _slots(params), -1)  # [B, 7]
    factors = torch.stack((params.brightness, params.contrast, params.saturation), dim=1)  # [B, 3]
    blend_op = slots.clamp(0, SATURATION)
    A, con = _blend_matrices(blend_op, factors.gather(1, blend_op))  # [B, 7, 3, 3], [B, 7]
    for s in range(7):
        if s == 3:
            work.apply(slots[:, s] == HUE, lambda xs, idx: _adjust_hue(xs, _pick(params.hue, idx)))
        else:
            work.apply(slots[:, s] >= 0, lambda xs, idx, s=s: _blend(xs, _pick(A[:, s], idx), _pick(con[:, s], idx)))
    return work.x


def blur_kernel_size(sigma: float, height: int, width: int) -> int:
    """Odd kernel size used for a blur of ``sigma``: 2 * ceil(3 sigma) + 1, at most what reflect padding
    of an ``height`` x ``width`` image allows (radius <= min(H, W) - 1)."""
    k = 2 * math.ceil(3.0 * sigma) + 1
    return min(k, 2 * (min(height, width) - 1) + 1)


@functools.lru_cache(maxsize=16)
def _reflect_onehot(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """[K, size * size] float: entry (t, j * size + i) is 1 where tap t of output j reads input i under
    reflect padding (K = 2 radius + 1 taps)."""
    pos = torch.arange(size, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device)[None, :]
    pos = torch.where(pos < 0, -pos, torch.where(pos > size - 1, 2 * (size - 1) - pos, pos))  # [size, K]
    return F.one_hot(pos, size).to(torch.float32).permute(1, 0, 2).reshape(2 * radius + 1, size * size)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Per-sample gaussian blur as two batched matmuls with [n, size, size] matrices that hold the taps
    and the reflect padding: out = B_H^T x B_W per channel.

    Every sample uses the radius of the largest allowed sigma; taps beyond a sample's own radius
    ceil(3 sigma_i) are zero, so the result equals a blur with its own kernel size 2 ceil(3 sigma_i) + 1
    (reflect padding gives the same border values whatever the pad width).
    """
    n, C, H, W = x.shape
    K = blur_kernel_size(max_sigma, H, W)
    R = K // 2
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).to(x.dtype).view(n, 1)  # [n, 1]
    radius = torch.ceil(3.0 * sigma).clamp(max=R)  # [n, 1]
    j = torch.arange(-R, R + 1, device=x.device, dtype=x.dtype).view(1, K)  # [1, K]
    w = torch.exp(-(j * j) / (2.0 * sigma * sigma)) * (j.abs() <= radius)
    w = w / w.sum(dim=1, keepdim=True)  # [n, K]
    # M[n, j, i]: weight of input i in output j
    mw = (w @ _reflect_onehot(W, R, x.device).to(x.dtype)).view(n, W, W)
    mh = mw if H == W else (w @ _reflect_onehot(H, R, x.device).to(x.dtype)).view(n, H, H)
    y = torch.bmm(x.reshape(n, C * H, W), mw.transpose(1, 2)).view(n, C, H, W)  # along W
    return torch.matmul(mh.unsqueeze(1), y).clamp_(0.0, 1.0)  # along H


def apply_destructive(images: torch.Tensor, params: ViewParams, cfg: ViewConfig) -> torch.Tensor:
    """D: blur, grayscale, solarize where ``params`` flags them, in that order. Blur sigmas above
    ``cfg.blur_sigma[1]`` are truncated to that sigma's kernel size (sampled params never exceed it)."""
    work = _Work(_as_float(images))
    params = params.to(work.x.device)
    work.apply(params.blur_applied,
               lambda xs, idx: _gaussian_blur(xs, _pick(params.blur_sigma, idx), cfg.blur_sigma[1]))
    work.apply(params.grayscale, lambda xs, idx: _gray(xs).repeat(1, 3, 1, 1))
    work.apply(params.solarize, lambda xs, idx: torch.where(xs >= cfg.solarize_threshold, 1.0 - xs, xs))
    return work.x


def _as_float(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"views expect images [B, 3, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise ValueError(f"views expect float images in [0, 1] (or uint8), got {images.dtype}")
    return images.float()


# ----------------------------------------------------------------------------------------------------
# The action and the entry points
# ----------------------------------------------------------------------------------------------------
def action_from_params(source_params: ViewParams, cfg: ViewConfig) -> torch.Tensor:
    """a_{x->y} [B, cfg.action_dim] float32 from the source's params (J_x and D): J_x^{-1}'s factors, hue
    and (jitter_order 'random') order, then D's flags and blur sigma. Layout: the module docstring."""
    p = source_params
    inv = inverse_jitter(p)
    cols = [inv.brightness, inv.contrast, inv.saturation, inv.hue]
    if cfg.jitter_order == "random":
        rank = inv.order.argsort(dim=1)  # rank[i, op] = the step at which J_x^{-1} applies op
        cols += list((rank.to(torch.float32) / 3.0).unbind(dim=1))
    cols += [p.blur_applied.float(), p.blur_sigma, p.grayscale.float(), p.solarize.float()]
    return torch.stack([c.float() for c in cols], dim=1)


def identity_action(batch: int, cfg: ViewConfig, device=None) -> torch.Tensor:
    """The action of "no transformation" [batch, cfg.action_dim]: factors 1, hue 0, canonical order, no
    destructive op (e.g. the predictor asked to predict the view it is given)."""
    row = [1.0, 1.0, 1.0, 0.0]
    if cfg.jitter_order == "random":
        row += [3 / 3, 2 / 3, 1 / 3, 0 / 3]  # the reverse of (brightness, contrast, saturation, hue)
    row += [0.0, 0.0, 0.0, 0.0]
    return torch.tensor(row, dtype=torch.float32, device=device).expand(batch, -1).clone()


def make_views(images: torch.Tensor, cfg: ViewConfig, generator: Optional[torch.Generator] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, ViewParams, ViewParams]:
    """One call for the training loop: images [B, 3, H, W] in [0, 1] (the shared crop already applied) ->
    (source_view x [B, 3, H, W], target_view y [B, 3, H, W], action [B, cfg.action_dim] float32,
    source_params (J_x and D), target_params (J_y)). y = J_y(I), x = D(J_x(y)), a = (J_x^{-1}, D).
    Outputs stay in [0, 1] (the encoder normalises). Every draw comes from ``generator`` (on its device;
    the target's params are drawn first)."""
    B, device = images.shape[0], images.device
    target_params = sample_target_params(cfg, B, generator, device)
    source_params = sample_source_params(cfg, B, generator, device)
    target_view = apply_jitter(images, target_params)
    source_view = apply_destructive(apply_jitter(target_view, source_params), source_params, cfg)
    return source_view, target_view, action_from_params(source_params, cfg), source_params, target_params


def mrr_views(image: torch.Tensor, cfg: ViewConfig, candidates: int, generator: Optional[torch.Generator] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The world model's MRR views of one image [1, 3, H, W]: one source view x and K = ``candidates``
    target views y_k with their actions a_k, such that (x, a_k) -> y_k is the training relation.

    As in training, z = J_x(J_y(I)) (the source before its destructive ops) and x = D(z). Each candidate
    k draws its own jitter J_k, always applied (jitter_p = 1, so no two candidates are the same image),
    and y_k = J_k^{-1}(z) (clamped, as every op is); a_k = the action of (J_k, D), i.e. the action under
    which training would have produced x from y_k. Where J_k^{-1} does not clamp, J_k(y_k) = z exactly.
    Returns (source_view [1, 3, H, W], target_views [K, 3, H, W], actions [K, cfg.action_dim]).
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"mrr_views takes one image [1, 3, H, W], got {tuple(image.shape)}")
    if candidates < 2:
        raise ValueError(f"mrr_views: candidates={candidates}; ranking needs at least 2")
    if cfg.brightness == cfg.contrast == cfg.saturation == cfg.hue == 0:
        raise ValueError("mrr_views: views.brightness/contrast/saturation/hue are all 0, so every candidate "
                         "would be the same image; set a jitter strength")
    device = image.device
    target_params = sample_target_params(cfg, 1, generator, device)
    source_params = sample_source_params(cfg, 1, generator, device)
    z = apply_jitter(apply_jitter(image, target_params), source_params)
    source_view = apply_destructive(z, source_params, cfg)
    jk, target_views = inverse_jitter_views(z, cfg, candidates, generator)
    d = source_params.repeat_interleave(candidates)
    cand = replace(jk, blur_applied=d.blur_applied, blur_sigma=d.blur_sigma, grayscale=d.grayscale,
                   solarize=d.solarize)
    return source_view, target_views, action_from_params(cand, cfg)


def inverse_jitter_views(image: torch.Tensor, cfg: ViewConfig, count: int,
                         generator: Optional[torch.Generator] = None) -> Tuple[ViewParams, torch.Tensor]:
    """``count`` colour jitters J_k drawn from ``cfg`` (always applied: jitter_p = 1) and the views
    J_k^{-1}(image) of one image [1, 3, H, W]: the MRR's candidates. -> (J_k, views [count, 3, H, W])."""
    jk = sample_target_params(replace(cfg, jitter_p=1.0), count, generator, image.device)
    return jk, apply_jitter(image.expand(count, -1, -1, -1), inverse_jitter(jk))
