"""Photometric views with a recorded action: the source view x, the target view y and a_{x->y}.

The loader applies the geometry shared by both views (random resized crop + flip, ``engine/data.py``).
Here, on the training device and vectorised over the batch, each view gets its own colour jitter and the
source view also gets the destructive transforms (PAPER.md, "Views and the action"):

    target y = jitter_y(I)                                   (jitter only)
    source x = solarize(grayscale(blur(jitter_x(I))))        (each destructive op with its own p)
    action   = [b_y - b_x, c_y - c_x, s_y - s_x, h_y - h_x, blur_x, grayscale_x, solarize_x]   [B, 7]

Every random choice is drawn first into a :class:`ViewParams` (per-sample tensors) and
:func:`apply_view` is a deterministic function of (images, params, cfg), so the action always describes
what was actually applied, including the per-sample order of the four jitter ops.

The ops follow torchvision (``transforms.v2.functional``) formulas, on float images in [0, 1]:
  brightness  x * b                                      (blend with black)
  contrast    c * x + (1 - c) * mean(gray(x))            (mean over the whole image, per image)
  saturation  s * x + (1 - s) * gray(x)
  hue         rotate H by h in HSV space                 (h in [-0.5, 0.5], wraps)
  each clamped to [0, 1]; gray = 0.2989 R + 0.587 G + 0.114 B (torchvision's luma weights).
  blur        gaussian, kernel size 2 * ceil(3 * sigma) + 1, reflect padding, separable
  grayscale   3-channel luma
  solarize    x >= threshold -> 1 - x
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from engine.config import ViewConfig

# jitter op ids, as stored in ViewParams.order
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# torchvision's rgb_to_grayscale weights (ITU-R 601 luma, 0.299 written as 0.2989 there)
LUMA = (0.2989, 0.587, 0.114)
ACTION_DIM = 7  # == ViewConfig.action_dim


@dataclass
class ViewParams:
    """What was applied to each sample of one view; every field is a per-sample tensor.

    Factors are 1.0 and the hue shift 0.0 where the jitter was not applied; ``blur_sigma`` is 0.0 where
    no blur was applied. ``order[i]`` is the permutation of (0, 1, 2, 3) = (brightness, contrast,
    saturation, hue) in which the jitter ops ran for sample i (ignored where ``jitter_applied`` is False).
    """

    jitter_applied: torch.Tensor  # [B] bool
    brightness: torch.Tensor  # [B] float32, factor
    contrast: torch.Tensor  # [B] float32, factor
    saturation: torch.Tensor  # [B] float32, factor
    hue: torch.Tensor  # [B] float32, shift in [-0.5, 0.5]
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

    @property
    def device(self) -> torch.device:
        return self.jitter_applied.device

    def _map(self, fn) -> "ViewParams":
        return ViewParams(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "ViewParams":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def index(self, idx: Union[int, slice, torch.Tensor, Sequence[int]]) -> "ViewParams":
        """The params of a subset of samples (an int keeps a batch dimension of 1)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        elif not isinstance(idx, (slice, torch.Tensor)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        if isinstance(idx, torch.Tensor):
            idx = idx.to(self.device)
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, repeats: int) -> "ViewParams":
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    @staticmethod
    def cat(params: List["ViewParams"]) -> "ViewParams":
        return ViewParams(**{f.name: torch.cat([getattr(p, f.name) for p in params], dim=0)
                             for f in fields(ViewParams)})

    @staticmethod
    def identity(batch: int, device=None) -> "ViewParams":
        """No jitter, no destructive transform: apply_view returns the images unchanged."""
        false = torch.zeros(batch, dtype=torch.bool, device=device)
        return ViewParams(
            jitter_applied=false.clone(),
            brightness=torch.ones(batch, device=device),
            contrast=torch.ones(batch, device=device),
            saturation=torch.ones(batch, device=device),
            hue=torch.zeros(batch, device=device),
            order=torch.arange(4, device=device).repeat(batch, 1),
            blur_applied=false.clone(),
            blur_sigma=torch.zeros(batch, device=device),
            grayscale=false.clone(),
            solarize=false.clone(),
        )

    def is_destructive(self) -> torch.Tensor:
        """[B] bool: any of blur, grayscale, solarize applied."""
        return self.blur_applied | self.grayscale | self.solarize


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
def _uniform(lo: float, hi: float, n: int, generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _bernoulli(p: float, n: int, generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def _draw_device(generator: Optional[torch.Generator], device) -> torch.device:
    # draw where the generator lives (a CPU generator gives the same params whatever the training device)
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _sample(cfg: ViewConfig, batch: int, generator, device, destructive: bool) -> ViewParams:
    g, dev = generator, _draw_device(generator, device)
    applied = _bernoulli(cfg.jitter_p, batch, g, dev)
    one = torch.ones(batch, device=dev)
    # torchvision ColorJitter ranges: [max(0, 1 - v), 1 + v] for the factors, [-h, h] for the hue
    b = torch.where(applied, _uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, batch, g, dev), one)
    c = torch.where(applied, _uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, batch, g, dev), one)
    s = torch.where(applied, _uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, batch, g, dev), one)
    h = torch.where(applied, _uniform(-cfg.hue, cfg.hue, batch, g, dev), torch.zeros_like(one))
    if cfg.jitter_order == "random":
        order = torch.rand(batch, 4, generator=g, device=dev).argsort(dim=1)
    else:
        order = torch.arange(4, device=dev).repeat(batch, 1)
    false = torch.zeros(batch, dtype=torch.bool, device=dev)
    if destructive:
        blur = _bernoulli(cfg.blur_p, batch, g, dev)
        sigma = torch.where(blur, _uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], batch, g, dev),
                            torch.zeros_like(one))
        gray = _bernoulli(cfg.grayscale_p, batch, g, dev)
        sol = _bernoulli(cfg.solarize_p, batch, g, dev)
    else:
        blur, sigma, gray, sol = false, torch.zeros_like(one), false.clone(), false.clone()
    params = ViewParams(applied, b, c, s, h, order, blur, sigma, gray, sol)
    return params.to(device) if device is not None else params


def sample_target_params(cfg: ViewConfig, batch: int, generator: Optional[torch.Generator] = None,
                         device=None) -> ViewParams:
    """Params of the target view y: colour jitter only, never a destructive transform."""
    return _sample(cfg, batch, generator, device, destructive=False)


def sample_source_params(cfg: ViewConfig, batch: int, generator: Optional[torch.Generator] = None,
                         device=None) -> ViewParams:
    """Params of the source view x: an independent jitter + blur / grayscale / solarize per cfg's p."""
    return _sample(cfg, batch, generator, device, destructive=True)


# ----------------------------------------------------------------------------------------------------
# The ops, per-sample parameters broadcast over [B, 3, H, W]
# ----------------------------------------------------------------------------------------------------
def _gray(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 1, H, W]
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of x [B, 3, H, W] by shift [B] (turns), keeping S and V.

    RGB -> H as in torchvision (PIL's formula); back to RGB with the closed form of the HSV hexagon,
    channel n in (5, 3, 1) for (R, G, B): V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6,
    C = V - min(R, G, B) = S * V. Equal to torchvision's sextant table up to float rounding.
    """
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    chroma = maxc - minc  # [B, H, W]
    d = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h6 = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h6 = h6 + 6.0 * shift.view(-1, 1, 1)  # hue in sextants, shifted; any real value (mod 6 below)
    n = torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6.unsqueeze(1), 6.0)  # [B, 3, H, W]
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def _jitter(x: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """The four jitter ops in each sample's recorded order (a loop over the 4 slots, not the samples)."""
    B = x.shape[0]
    col = lambda t: t.view(B, 1, 1, 1)  # noqa: E731
    factors = torch.stack((params.brightness, params.contrast, params.saturation), dim=1).to(x.dtype)  # [B, 3]
    applied = params.jitter_applied.view(B)
    for slot in range(4):
        op = torch.where(applied, params.order[:, slot], torch.full_like(params.order[:, slot], -1))  # [B]
        # brightness, contrast, saturation: one blend f * x + (1 - f) * ref, ref = 0, mean(gray) or gray;
        # f = 1 (exactly x) where this slot is hue or the jitter is off
        gray = _gray(x)  # [B, 1, H, W]
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
        ref = col((op == CONTRAST).to(x.dtype)) * mean + col((op == SATURATION).to(x.dtype)) * gray
        f = factors.gather(1, op.clamp(0, 2).view(B, 1)).view(B)
        f = torch.where((op >= 0) & (op <= SATURATION), f, torch.ones_like(f))
        blended = (col(f) * x + col(1.0 - f) * ref).clamp(0.0, 1.0)
        x = torch.where(col(op == HUE), _adjust_hue(x, params.hue.to(x.dtype)), blended)
    return x


def blur_kernel_size(sigma: float, height: int, width: int) -> int:
    """Odd kernel size used for a blur of ``sigma``: 2 * ceil(3 sigma) + 1, at most what reflect padding
    of an ``height`` x ``width`` image allows (radius <= min(H, W) - 1)."""
    k = 2 * math.ceil(3.0 * sigma) + 1
    return min(k, 2 * (min(height, width) - 1) + 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Per-sample gaussian blur: one separable depthwise conv over the batch (groups = B * 3).

    Every sample uses the radius of the largest allowed sigma; taps beyond a sample's own radius
    ceil(3 sigma_i) are zero, so the result equals a blur with its own kernel size 2 ceil(3 sigma_i) + 1
    (reflect padding gives the same border values whatever the pad width).
    """
    B, C, H, W = x.shape
    K = blur_kernel_size(max_sigma, H, W)
    R = K // 2
    sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).to(x.dtype).view(B, 1)  # [B, 1]
    radius = torch.ceil(3.0 * sigma).clamp(max=R)  # [B, 1]
    j = torch.arange(-R, R + 1, device=x.device, dtype=x.dtype).view(1, K)  # [1, K]
    w = torch.exp(-(j * j) / (2.0 * sigma * sigma)) * (j.abs() <= radius)
    w = w / w.sum(dim=1, keepdim=True)  # [B, K]
    w = w.repeat_interleave(C, dim=0)  # [B*C, K]
    xp = F.pad(x, (R, R, R, R), mode="reflect").reshape(1, B * C, H + 2 * R, W + 2 * R)
    xp = F.conv2d(xp, w.view(B * C, 1, 1, K), groups=B * C)  # along W
    xp = F.conv2d(xp, w.view(B * C, 1, K, 1), groups=B * C)  # along H
    return xp.view(B, C, H, W)


def apply_view(images: torch.Tensor, params: ViewParams, cfg: ViewConfig) -> torch.Tensor:
    """Apply ``params`` to ``images`` [B, 3, H, W] (float in [0, 1]; uint8 is converted); deterministic.

    Jitter in each sample's recorded order, then blur, grayscale, solarize where flagged, clamp to
    [0, 1]. No Python loop over samples and no host sync. Blur sigmas above ``cfg.blur_sigma[1]`` are
    truncated to that sigma's kernel size (sampled params never exceed it).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"apply_view expects images [B, 3, H, W], got {tuple(images.shape)}")
    if params.batch_size != images.shape[0]:
        raise ValueError(f"params are for {params.batch_size} samples, images for {images.shape[0]}")
    out_dtype = images.dtype if images.is_floating_point() else torch.float32
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    params = params.to(x.device)
    B = x.shape[0]
    col = lambda t: t.view(B, 1, 1, 1)  # noqa: E731
    x = _jitter(x, params)
    x = torch.where(col(params.blur_applied), _gaussian_blur(x, params.blur_sigma, cfg.blur_sigma[1]), x)
    x = torch.where(col(params.grayscale), _gray(x).expand_as(x), x)
    x = torch.where(col(params.solarize) & (x >= cfg.solarize_threshold), 1.0 - x, x)
    return x.clamp(0.0, 1.0).to(out_dtype)


# ----------------------------------------------------------------------------------------------------
# The action and the training-loop entry point
# ----------------------------------------------------------------------------------------------------
def action_from_params(source: ViewParams, target: ViewParams) -> torch.Tensor:
    """a_{x->y} [B, 7] float32: jitter differences (target - source) and the source's destructive flags."""
    target = target.to(source.device)
    return torch.stack((
        target.brightness - source.brightness,
        target.contrast - source.contrast,
        target.saturation - source.saturation,
        target.hue - source.hue,
        source.blur_applied.float(),
        source.grayscale.float(),
        source.solarize.float(),
    ), dim=1).float()


def null_action(batch: int, device=None) -> torch.Tensor:
    """The identity action [B, 7] of zeros (predictor finetuning: predict the same view)."""
    return torch.zeros(batch, ACTION_DIM, device=device)


def make_views(images: torch.Tensor, cfg: ViewConfig, generator: Optional[torch.Generator] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, ViewParams, ViewParams]:
    """One call for the training loop: images [B, 3, H, W] (the shared crop already applied) ->
    (source_view x, target_view y, action [B, 7], source_params, target_params)."""
    B, device = images.shape[0], images.device
    source_params = sample_source_params(cfg, B, generator, device)
    target_params = sample_target_params(cfg, B, generator, device)
    source_view = apply_view(images, source_params, cfg)
    target_view = apply_view(images, target_params, cfg)
    action = action_from_params(source_params, target_params)
    return source_view, target_view, action, source_params, target_params


def mrr_views(image: torch.Tensor, cfg: ViewConfig, candidates: int, generator: Optional[torch.Generator] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the MRR: image [1, 3, H, W] -> (one source view [1, 3, H, W], K candidate target views
    [K, 3, H, W], their actions [K, A]); every candidate gets the colour jitter."""
    import dataclasses

    device = image.device
    sp = sample_source_params(cfg, 1, generator, device)
    tp = sample_target_params(dataclasses.replace(cfg, jitter_p=1.0), candidates, generator, device)
    source = apply_view(image, sp, cfg)
    targets = apply_view(image.expand(candidates, -1, -1, -1), tp, cfg)
    return source, targets, action_from_params(sp.repeat_interleave(candidates), tp)
