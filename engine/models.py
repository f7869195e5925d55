"""The networks: a timm ViT encoder over ragged context tokens, and the action-conditioned predictor.

Token batches are *packed*: the tokens of all samples are concatenated into one sequence [1, T, D] and a
:class:`RaggedLayout` (per-sample lengths) tells attention where each sample starts, so every sample
keeps all its tokens and MLPs / norms never compute on padding. Attention goes through
``kernels.attention`` (xformers block-diagonal, SDPA, or the reference loop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Attention as TimmAttention
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from engine.config import IWMConfig
from engine.masks import MaskBatch, all_patches_masks
from kernels.attention import ragged_attention
from kernels.feature_conditioning import feature_conditioning
from kernels.gather import gather_tokens
from kernels.layer_norm_linear import layer_norm_linear


# Under torch.compile the ragged attention stays eager (a graph break): its backend choice, its host-side lengths
# and the xformers / SDPA kernels are Python the compiled graphs around it need not trace.
_eager_ragged_attention = torch.compiler.disable(ragged_attention)


@dataclass
class RaggedLayout:
    """Per-sample lengths of a packed token sequence (host ints: attention kernels need them there)."""
    seqlens: List[int]


class RaggedAttention(TimmAttention):
    """timm's ViT attention (same parameters, so timm checkpoints load) that also accepts a packed
    ragged batch: ``attn_mask`` may be a :class:`RaggedLayout`, then ``x`` is [1, T, C].
    :meth:`attend` is the part after the QKV projection (:class:`RaggedBlock` computes the projection
    with its LayerNorm fused in)."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if not isinstance(attn_mask, RaggedLayout):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.attend(self.qkv(x), attn_mask)

    def attend(self, qkv: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        """Attention from the projected ``qkv``: [1, T, 3C] with a :class:`RaggedLayout`, else [B, N, 3C]
        (timm's ``Attention.forward`` after ``self.qkv``, its fused-attention branch; no gate)."""
        if isinstance(attn_mask, RaggedLayout):
            T = qkv.shape[1]
            q, k, v = qkv[0].view(T, 3, self.num_heads, self.head_dim).unbind(1)  # [T, H, Dh]
            q, k = self.q_norm(q), self.k_norm(k)
            out = _eager_ragged_attention(q, k, v, attn_mask.seqlens)
            out = self.norm(out.reshape(1, T, self.attn_dim))
            return self.proj_drop(self.proj(out))
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj(x))


def drop_samples(x: torch.Tensor, layout: RaggedLayout, drop_prob: float) -> torch.Tensor:
    """Stochastic depth on a packed ragged batch x [1, T, C]: each SAMPLE's residual branch is kept with
    probability 1 - drop_prob (scaled by 1 / (1 - drop_prob)) or zeroed, all of its tokens together. (timm's
    DropPath draws one decision per row of dim 0, which here is the whole packed batch.)"""
    keep = 1.0 - drop_prob
    seqlens = torch.tensor(layout.seqlens, device=x.device)
    sample_keep = torch.empty(len(layout.seqlens), device=x.device, dtype=x.dtype).bernoulli_(keep) / keep
    token_keep = torch.repeat_interleave(sample_keep, seqlens, output_size=x.shape[1])  # [T]
    return x * token_keep[None, :, None]


def _plain_layer_norm(norm: nn.Module) -> bool:
    """An affine LayerNorm over the last dimension that computes ``F.layer_norm`` (nn.LayerNorm, or timm's
    LayerNorm without its fast-norm path): what ``kernels.layer_norm_linear`` fuses."""
    return (type(norm) in (nn.LayerNorm, TimmLayerNorm) and len(norm.normalized_shape) == 1
            and norm.weight is not None and not getattr(norm, "_fast_norm", False))


class RaggedBlock(Block):
    """timm's ViT block (same parameters) whose stochastic depth drops per sample on a packed ragged batch
    (on a dense [B, N, C] batch timm's DropPath already drops per sample, row of dim 0), and whose
    ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1`` run as one op each, ``kernels.layer_norm_linear``
    (LayerNorm in the projection's prologue on CUDA; on CPU exactly timm's two ops)."""

    def __init__(self, *args, drop_path: float = 0.0, **kwargs):
        super().__init__(*args, drop_path=drop_path, **kwargs)
        self.drop_prob = drop_path
        self.fuse_layer_norm = (_plain_layer_norm(self.norm1) and _plain_layer_norm(self.norm2)
                                and isinstance(self.attn, RaggedAttention) and self.attn.gate is None
                                and self.attn.fused_attn and type(self.mlp) is Mlp
                                and type(self.mlp.fc1) is nn.Linear)

    def fused_parameters(self) -> List[nn.Parameter]:
        """The parameters this block's forward reads outside their own modules' forwards (ZeRO-3 must
        be told: :meth:`IWM.external_parameters`)."""
        if not self.fuse_layer_norm:
            return []
        return [p for m in (self.norm1, self.attn.qkv, self.norm2, self.mlp.fc1) for p in m.parameters()]

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        per_sample = isinstance(attn_mask, RaggedLayout) and self.training and self.drop_prob > 0
        if not self.fuse_layer_norm:
            if not per_sample:
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            x = x + drop_samples(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)), attn_mask, self.drop_prob)
            return x + drop_samples(self.ls2(self.mlp(self.norm2(x))), attn_mask, self.drop_prob)
        drop1, drop2 = ((lambda y: drop_samples(y, attn_mask, self.drop_prob),) * 2 if per_sample
                        else (self.drop_path1, self.drop_path2))
        qkv = _norm_linear(x, self.norm1, self.attn.qkv)  # [.., 3C]
        x = x + drop1(self.ls1(self.attn.attend(qkv, attn_mask=attn_mask, is_causal=is_causal)))
        m = self.mlp
        h = m.drop1(m.act(_norm_linear(x, self.norm2, m.fc1)))  # [.., hidden]
        return x + drop2(self.ls2(m.drop2(m.fc2(m.norm(h)))))


def _norm_linear(x: torch.Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> torch.Tensor:
    """``linear(norm(x))`` as one op (kernels.layer_norm_linear)."""
    return layer_norm_linear(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every :class:`RaggedBlock` of ``model`` in place (train.compile); returns how many.

    A block compiles into two graphs (before and after the attention, which stays eager). The packed token
    count changes every batch: the first call compiles for its shapes, the second (a new count) recompiles
    once with the count dynamic, and later batches reuse that graph (torch's automatic dynamic shapes), so
    a run compiles each block at most twice (``tests/engine/test_train_compile.py`` counts them over 50 steps)."""
    blocks = [m for m in model.modules() if isinstance(m, RaggedBlock)]
    for blk in blocks:
        blk.compile(backend=backend)
    return len(blocks)


def sincos_2d(dim: int, grid_h: int, grid_w: int, layout: str = "rows_first") -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [H*W, dim] (MAE / I-JEPA): half the channels encode the row,
    half the column, each as sin/cos of the coordinate at geometrically spaced frequencies. ``layout``
    (model.pos_layout): which half comes first; MAE's and I-JEPA's tables put the column first."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                            torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def enc(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], 1)

    halves = [enc(ys), enc(xs)] if layout == "rows_first" else [enc(xs), enc(ys)]
    return torch.cat(halves, 1).float()


def run_blocks(blocks, x: torch.Tensor, layout: Optional[RaggedLayout], checkpointing: bool) -> torch.Tensor:
    """The transformer blocks; with ``checkpointing`` (and grad enabled) each block's activations are
    recomputed in the backward pass instead of kept (train.activation_checkpointing)."""
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, attn_mask=layout, use_reentrant=False)
        else:
            x = blk(x, attn_mask=layout)
    return x


class Encoder(nn.Module):
    """A timm VisionTransformer without class token or head; fixed sin-cos positions.

    Takes images in [0, 1] (after the photometric views) and normalises them with the ImageNet mean and
    std first, once, here (so the weights expect normalised inputs, as standard pipelines feed them).
    ``forward(images)`` -> [B, N, D] for the whole image (the target encoder);
    ``forward(images, masks)`` -> packed [Tc, D] for each sample's context patches only.
    """

    def __init__(self, cfg: IWMConfig):
        super().__init__()
        m = cfg.model
        dim, depth, heads = m.encoder_dims()
        self.vit = VisionTransformer(
            img_size=cfg.data.img_size, patch_size=m.patch_size, embed_dim=dim, depth=depth, num_heads=heads,
            mlp_ratio=m.mlp_ratio, qkv_bias=True, class_token=False, global_pool="", num_classes=0,
            drop_path_rate=m.drop_path, attn_layer=RaggedAttention, block_fn=RaggedBlock)
        gh, gw = self.vit.patch_embed.grid_size
        self.grid = (gh, gw)
        self.embed_dim = dim
        self.vit.pos_embed.data.copy_(sincos_2d(dim, gh, gw, m.pos_layout)[None])
        self.vit.pos_embed.requires_grad_(False)  # kept for timm state-dict compatibility
        # the forward reads the fixed positions from a buffer: a parameter read outside its module's forward
        # would be an external parameter to ZeRO-3, fetched out of its traced order
        self.register_buffer("pos_embed", sincos_2d(dim, gh, gw, m.pos_layout)[None], persistent=False)  # [1, N, D]
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        self.checkpointing = cfg.train.activation_checkpointing

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor, masks: Optional[MaskBatch] = None) -> torch.Tensor:
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        # [B, N, D]; timm's patch embedding returns a transposed view of its NCHW output: made contiguous here,
        # once, or every residual add keeps that layout and every layer norm copies its input
        x = self.vit.patch_embed(x).contiguous() + self.pos_embed.to(x.dtype)
        layout = None
        if masks is not None:
            x = gather_tokens(x, masks.flat_context())[None]  # [1, Tc, D]
            layout = RaggedLayout(masks.context_counts)
        x = run_blocks(self.vit.blocks, x, layout, self.checkpointing)
        x = self.vit.norm(x)
        return x[0] if masks is not None else x


class FeatureConditioning(nn.Module):
    """IWM's feature conditioning: [mask token + position, action] -> 3-layer MLP (a 1x1-conv network
    per token) -> predictor width. Computed by ``kernels.feature_conditioning`` (fused on CUDA).
    ``position`` (``model.cond_position``) says where the position enters: 'before' the MLP (as above),
    'after' it (MLP([mask token, action]) + position) or 'residual' (token + MLP([token, action]))."""

    def __init__(self, width: int, action_dim: int, position: str = "before"):
        super().__init__()
        self.fc1 = nn.Linear(width + action_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        self.position = position

    def forward(self, mask_token, pos_embed, target_pos, action, token_batch):
        mlp_pos = torch.zeros_like(pos_embed) if self.position == "after" else pos_embed  # [N, W]
        out = feature_conditioning(mask_token, mlp_pos, target_pos, action, token_batch,
                                   self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                   self.fc3.weight, self.fc3.bias)  # [Tt, W]
        if self.position == "after":
            return out + pos_embed[target_pos]
        if self.position == "residual":
            return out + mask_token + pos_embed[target_pos]
        return out


class SequenceConditioning(nn.Module):
    """IWM's sequence conditioning: one extra token per action parameter, a_k * w_k + b_k."""

    def __init__(self, width: int, action_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(action_dim, width) * 0.02)
        self.bias = nn.Parameter(torch.zeros(action_dim, width))

    def forward(self, action: torch.Tensor) -> torch.Tensor:  # [B, A] -> [B, A, W]
        return action[:, :, None] * self.weight + self.bias


class Predictor(nn.Module):
    """A narrow ViT: context tokens (projected to the predictor width) plus one mask token per target
    position, conditioned on the action; predicts the target encoder's features at the target positions.
    """

    def __init__(self, cfg: IWMConfig, encoder_dim: int, grid: tuple, action_dim: int):
        super().__init__()
        m = cfg.model
        w = m.predictor_width
        self.conditioning = m.conditioning
        self.action_dim = action_dim
        self.embed = nn.Linear(encoder_dim, w)
        self.mask_token = nn.Parameter(torch.zeros(w))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_2d(w, *grid, m.pos_layout), persistent=False)  # [N, W]
        if m.conditioning == "feature":
            self.cond = FeatureConditioning(w, action_dim, m.cond_position)
        elif m.conditioning == "sequence":
            self.cond = SequenceConditioning(w, action_dim)
        else:
            self.cond = None
        dpr = [m.drop_path * i / max(1, m.predictor_depth - 1) for i in range(m.predictor_depth)]
        self.blocks = nn.ModuleList([
            RaggedBlock(w, m.predictor_heads, mlp_ratio=m.mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                  attn_layer=RaggedAttention) for i in range(m.predictor_depth)])
        self.norm = nn.LayerNorm(w)
        self.proj = nn.Linear(w, encoder_dim)
        self.checkpointing = cfg.train.activation_checkpointing
        self.apply(_init_weights)

    def mask_tokens(self, masks: MaskBatch, action: torch.Tensor) -> torch.Tensor:
        """[Tt, W]: one input token per target position of every sample."""
        if self.conditioning == "feature":
            return self.cond(self.mask_token, self.pos_embed, masks.target_idx, action.to(self.mask_token.dtype),
                             masks.target_batch)
        return self.mask_token + self.pos_embed[masks.target_idx]

    def forward(self, context: torch.Tensor, masks: MaskBatch, action: torch.Tensor) -> torch.Tensor:
        """context: packed [Tc, Denc] encoder output; action: [B, A]. Returns packed [Tt, Denc]."""
        B = masks.batch_size
        ctx = self.embed(context) + self.pos_embed[masks.context_idx]  # [Tc, W]
        tgt = self.mask_tokens(masks, action)  # [Tt, W]
        parts, counts = [ctx, tgt], [masks.context_counts, masks.target_counts]
        if self.conditioning == "sequence":
            parts.append(self.cond(action.to(ctx.dtype)).reshape(B * self.action_dim, -1))
            counts.append([self.action_dim] * B)
        # interleave per sample: [ctx_b, tgt_b, (action_b)] for b = 0..B-1
        seqlens = [sum(c[b] for c in counts) for b in range(B)]
        order, target_rows = _interleave_order(counts, ctx.device)
        x = torch.cat(parts, 0).index_select(0, order)[None]  # [1, T, W]
        x = run_blocks(self.blocks, x, RaggedLayout(seqlens), self.checkpointing)
        x = x[0].index_select(0, target_rows)  # [Tt, W]
        return self.proj(self.norm(x))


def _interleave_order(counts: List[List[int]], device):
    """Given per-part per-sample counts [P][B], the permutation taking cat(parts) (part-major) to the
    packed sample-major order [part0_b, part1_b, ...] for b = 0..B-1, and the packed rows of part 1."""
    c = torch.tensor(counts)  # [P, B]
    per_sample = c.sum(0)
    seq_start = per_sample.cumsum(0) - per_sample  # [B]
    part_off = c.cumsum(0) - c  # [P, B]: where part p starts inside sample b
    dest = []
    for p in range(c.shape[0]):
        b = torch.repeat_interleave(torch.arange(c.shape[1]), c[p])
        j = torch.arange(int(c[p].sum())) - (c[p].cumsum(0) - c[p])[b]
        dest.append(seq_start[b] + part_off[p, b] + j)
    order = torch.empty(int(c.sum()), dtype=torch.long)
    order[torch.cat(dest)] = torch.arange(int(c.sum()))
    return order.to(device), dest[1].to(device)


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class IWM(nn.Module):
    """The trainable part (encoder + predictor) that DeepSpeed wraps. The target encoder is kept apart,
    in fp32, with no gradient: see :class:`engine.ema.TargetEncoder`."""

    def __init__(self, cfg: IWMConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.predictor = Predictor(cfg, self.encoder.embed_dim, self.encoder.grid, cfg.views.action_dim)

    def external_parameters(self):
        """(module, parameter) pairs where a module's forward reads a parameter of another module (the fused
        feature conditioning reads its fc layers' weights, each block its LayerNorms' and the projections
        after them): ZeRO-3 must be told before the first forward."""
        pairs = []
        cond = self.predictor.cond
        if isinstance(cond, FeatureConditioning):
            pairs += [(cond, p) for p in cond.parameters()]
        for blk in self.modules():
            if isinstance(blk, RaggedBlock):
                pairs += [(blk, p) for p in blk.fused_parameters()]
        return pairs

    def forward(self, source_view: torch.Tensor, masks: MaskBatch, action: torch.Tensor) -> torch.Tensor:
        context = self.encoder(source_view, masks)  # [Tc, D]
        return self.predictor(context, masks, action)  # [Tt, D]


def predict_all(predictor: Predictor, tokens: torch.Tensor, action: torch.Tensor, grid: tuple) -> torch.Tensor:
    """The predictor on every position: tokens [B, N, D] (the encoder's, all patches) -> [B, N, D]."""
    B, N, D = tokens.shape
    masks = all_patches_masks(B, grid, tokens.device)
    return predictor(tokens.reshape(B * N, D), masks, action).reshape(B, N, -1)
