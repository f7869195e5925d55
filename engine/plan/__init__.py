"""Memory and throughput plan of an IWM run, on paper: will it fit, and how long will it take?

    python -m engine.plan recipes/pretrain_vith.py --gpus 16 --gpu-mem 80 [--gpu h100|a100] \
        [--mfu 0.4] [--precision autocast|ds_bf16|fp32] [--set section.field=value ...] [--json PATH]

For ZeRO stages 1, 2 and 3, each with activation checkpointing off and on, it prints the estimated
per-GPU memory at the peak of a training step, broken down into parameters, gradients, AdamW moments,
the fp32 master partition, the EMA target encoder, saved activations, communication buffers and a fixed
CUDA overhead; whether that fits in ``--gpu-mem`` GiB; and the step, epoch (ImageNet-1k) and whole-run
time from the step FLOPs at an assumed MFU plus the collective communication over NVLink / InfiniBand.

Every formula and constant is documented in ``docs/plan.md``; the memory model is checked against
measured peak memory of small CPU configurations by ``benchmarks/plan_validation.py``.

Precision is a parameter (:data:`PRECISIONS`): ``autocast`` is what ``engine/pretrain.py`` does on CUDA
today (fp32 parameters, gradients and AdamW in the module, ``torch.autocast`` bf16 activations, an fp32
residual stream); ``ds_bf16`` is DeepSpeed's bf16 mode (bf16 parameters and gradients, fp32 master
partition); ``fp32`` is the CPU path.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from engine import config as config_lib
from engine.config import ConfigError, IWMConfig
from engine.flops import step_flops, vit_forward_flops

GiB = 2 ** 30
IMAGENET_TRAIN_IMAGES = 1_281_167


# ----------------------------------------------------------------------------------------------------
# Hardware (datasheet figures, cited in docs/plan.md)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_tflops: float  # dense (no sparsity) bf16 tensor-core peak
    hbm_tb_s: float  # HBM bandwidth
    nvlink_gb_s: float  # NVLink, total bidirectional per GPU (datasheet figure)
    ib_gb_s: float  # inter-node, per GPU per direction (one 400 Gb/s InfiniBand NIC per GPU = 50 GB/s)
    mem_gib: float


GPUS = {
    "h100": GPUSpec("H100 SXM5 80GB", bf16_tflops=989.4, hbm_tb_s=3.35, nvlink_gb_s=900.0, ib_gb_s=50.0, mem_gib=80),
    "a100": GPUSpec("A100 SXM4 80GB", bf16_tflops=312.0, hbm_tb_s=2.039, nvlink_gb_s=600.0, ib_gb_s=50.0,
                    mem_gib=80),
}
GPUS_PER_NODE = 8
COMM_EFFICIENCY = 0.7  # achieved NCCL bus bandwidth / link bandwidth (assumption, docs/plan.md)
DEFAULT_MFU = 0.4  # assumed model FLOPs utilisation of the compute part (assumption, docs/plan.md)
CUDA_OVERHEAD_GIB = 2.0  # CUDA context + cuBLAS/NCCL workspaces + allocator fragmentation (assumption)
# a CPU rank's resident memory beyond its tensors once its engine is built: the gloo process group, DeepSpeed's
# CPU communication, the allocator's heap and library pages first touched after the imports (measured:
# 0.31 GiB for ViT-B/16 at ZeRO-3 on 2 ranks, 0.26 GiB for ViT-H/14 at ZeRO-0; docs/plan.md "Full size on the CPU")
CPU_OVERHEAD_GIB = 0.3

# DeepSpeed ZeRO defaults (deepspeed/runtime/zero/config.py), in elements
REDUCE_BUCKET_SIZE = int(5e8)
ALLGATHER_BUCKET_SIZE = int(5e8)  # stages 1-2 all-gather the updated partitions in place: no extra buffer
STAGE3_PREFETCH_BUCKET_SIZE = int(5e7)
STAGE3_PARAM_PERSISTENCE_THRESHOLD = int(1e5)  # parameters of at most this many elements stay replicated
STAGE3_MAX_LIVE_PARAMETERS = int(1e9)
STAGE3_MAX_REUSE_DISTANCE = int(1e9)
MASK_SAMPLES = 256  # masks drawn to estimate the mean context / target tokens per sample


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a training step keeps, for one way of training."""
    name: str
    param_bytes: int  # the module's parameters
    grad_bytes: int  # the module's gradients
    act_bytes: int  # saved activations (matmul inputs, attention, MLP hidden)
    residual_bytes: int  # the residual stream (layer-norm inputs)
    weight_copy_bytes: int  # per trainable parameter: bf16 casts autocast saves for the backward (0: none)
    master_at_stage0: bool  # an fp32 master copy even without ZeRO partitioning


PRECISIONS = {
    # engine/pretrain.py on CUDA today: fp32 module + torch AdamW, torch.autocast(bf16). Layer norms run in
    # fp32 under autocast and bf16 + fp32 promotes, so the residual stream stays fp32.
    "autocast": Precision("autocast", 4, 4, 2, 4, 2, False),
    # DeepSpeed {"bf16": {"enabled": true}}: bf16 module, fp32 master partition + fp32 AdamW moments
    "ds_bf16": Precision("ds_bf16", 2, 2, 2, 2, 0, True),
    # CPU (and train.precision=fp32)
    "fp32": Precision("fp32", 4, 4, 4, 4, 0, False),
}


# ----------------------------------------------------------------------------------------------------
# Shapes: parameters and tokens
# ----------------------------------------------------------------------------------------------------
def block_params(width: int, mlp_ratio: float) -> int:
    """One pre-norm ViT block with qkv bias: qkv 3D^2+3D, proj D^2+D, fc1 hD^2+hD, fc2 hD^2+D, 2 LN 4D."""
    hidden = int(width * mlp_ratio)
    return 4 * width * width + 2 * width * hidden + 9 * width + hidden


def param_tensors(cfg: IWMConfig) -> Dict[str, List[int]]:
    """Element counts of every parameter tensor, per part (for the ZeRO-3 persistence threshold)."""
    m = cfg.model
    dim, depth, _ = m.encoder_dims()
    w, a = m.predictor_width, cfg.views.action_dim
    hd, hw = int(dim * m.mlp_ratio), int(w * m.mlp_ratio)

    def block(d, h):
        return [3 * d * d, 3 * d, d * d, d, h * d, h, d * h, d, d, d, d, d]

    encoder = [3 * m.patch_size ** 2 * dim, dim] + block(dim, hd) * depth + [dim, dim]  # + final norm
    predictor = [dim * w, w, w]  # embed, mask token
    if m.conditioning == "feature":
        predictor += [(w + a) * w, w, w * w, w, w * w, w]
    elif m.conditioning == "sequence":
        predictor += [a * w, a * w]
    predictor += block(w, hw) * m.predictor_depth + [w, w, w * dim, dim]
    return {"encoder": encoder, "predictor": predictor}


def param_counts(cfg: IWMConfig) -> Dict[str, int]:
    t = param_tensors(cfg)
    enc, pred = sum(t["encoder"]), sum(t["predictor"])
    return {"encoder": enc, "predictor": pred, "trainable": enc + pred, "target_encoder": enc}


@dataclass
class TokenStats:
    """Mean per-sample token counts and the mean per-batch maxima (the padded attention length)."""
    num_patches: int
    context: float
    target: float
    context_max: float  # mean over batches of max context count (sdpa pads the encoder to it)
    predictor_max: float  # same for context + target (+ action tokens) of the predictor
    samples: int


def token_stats(cfg: IWMConfig, batch: int, samples: int = MASK_SAMPLES, seed: int = 0) -> TokenStats:
    """Draw masks from ``engine.masks.MaskSampler`` with the config's mask settings (on the CPU)."""
    from engine.masks import MaskSampler

    grid = cfg.data.img_size // cfg.model.patch_size
    sampler = MaskSampler(cfg.masks, grid, grid)
    gen = torch.Generator().manual_seed(seed)
    extra = cfg.views.action_dim if cfg.model.conditioning == "sequence" else 0
    ctx, tgt, cmax, pmax = [], [], [], []
    for _ in range(max(2, math.ceil(samples / batch))):
        mb = sampler.sample(batch, gen)
        ctx += list(mb.context_counts)
        tgt += list(mb.target_counts)
        cmax.append(max(mb.context_counts))
        pmax.append(max(c + t for c, t in zip(mb.context_counts, mb.target_counts)) + extra)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return TokenStats(grid * grid, mean(ctx), mean(tgt), mean(cmax), mean(pmax), len(ctx))


# ----------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------
def block_saved_bytes(tokens: float, width: int, heads: int, mlp_ratio: float, prec: Precision,
                      padded_tokens: Optional[float] = None, fused_layer_norm: bool = False) -> float:
    """Bytes one ViT block saves for its backward pass over `tokens` packed tokens.

    Per token: the two layer-norm inputs (residual stream) 2*D*r, their mean/rstd 16 B, the inputs of
    qkv and fc1 (layer-norm outputs) 2*D*a, the qkv output 3*D*a, the attention output (proj input)
    D*a, the MLP hidden before and after GELU 2*h*D*a, and the attention's log-sum-exp 4*H B.
    `padded_tokens` (the sdpa backend: B x longest sample) adds the padded q, k, v and output copies
    4*D*a and an int64 row index per token, with the log-sum-exp over the padded length.
    `fused_layer_norm` (kernels.layer_norm_linear's Triton path): the layer-norm outputs are not saved
    (recomputed from the inputs and their mean/rstd), 2*D*a less.
    """
    r, a = prec.residual_bytes, prec.act_bytes
    hidden = mlp_ratio * width
    ln_out = 0 if fused_layer_norm else 2 * width * a
    per_token = 2 * width * r + 16 + ln_out + 3 * width * a + width * a + 2 * hidden * a
    total = tokens * per_token
    if padded_tokens is None:
        total += tokens * 4 * heads
    else:
        total += padded_tokens * (4 * width * a + 4 * heads) + tokens * 8
    return total


def fused_layer_norm(cfg: IWMConfig, attention: str) -> bool:
    """Do the blocks run LN -> QKV / fc1 as the fused Triton op (the CUDA path, kernels not forced to
    the reference)? Then the layer-norm outputs are not saved."""
    return attention == "packed" and cfg.train.kernels != "reference"


def block_input_bytes(tokens: float, width: int, prec: Precision) -> float:
    """What a checkpointed block keeps: its input (the residual stream)."""
    return tokens * width * prec.residual_bytes


@dataclass
class ActivationLayer:
    name: str
    saved: float  # bytes saved for the backward pass (with checkpointing: what stays until recompute)
    grads: float  # bytes of parameter gradients the backward pass produces here (module dtype)


def activation_layers(cfg: IWMConfig, batch: int, tok: TokenStats, prec: Precision, checkpointing: bool,
                      attention: str = "packed") -> List[ActivationLayer]:
    """The trained networks in forward order, with what each saves and the gradients it produces.

    attention: 'packed' (xformers on the packed sequence: the CUDA path) or 'padded' (sdpa on the batch
    padded to its longest sample: the CPU path)."""
    m = cfg.model
    fused = fused_layer_norm(cfg, attention)
    dim, depth, heads = m.encoder_dims()
    w, A = m.predictor_width, cfg.views.action_dim
    r, a, g = prec.residual_bytes, prec.act_bytes, prec.grad_bytes
    extra = A if m.conditioning == "sequence" else 0
    Tc, Tt = batch * tok.context, batch * tok.target
    Tp = Tc + Tt + batch * extra
    pad_c = batch * tok.context_max if attention == "padded" else None
    pad_p = batch * tok.predictor_max if attention == "padded" else None
    tensors = param_tensors(cfg)
    n_blk_enc = block_params(dim, m.mlp_ratio)
    n_blk_pred = block_params(w, m.mlp_ratio)
    img = cfg.data.img_size

    layers = [ActivationLayer("patch_embed", batch * 3 * img * img * a + Tc * 8,
                              (3 * m.patch_size ** 2 * dim + dim) * g)]
    for i in range(depth):
        saved = (block_input_bytes(Tc, dim, prec) if checkpointing
                 else block_saved_bytes(Tc, dim, heads, m.mlp_ratio, prec, pad_c, fused))
        layers.append(ActivationLayer(f"encoder.{i}", saved, n_blk_enc * g))
    # encoder final norm (input + stats), predictor embed input (the norm output), conditioning inputs
    head = Tc * (dim * r + 8 + dim * a)
    if m.conditioning == "feature":
        head += Tt * ((5 * w + A) * a)  # fc1 input [W + A], fc1/fc2 outputs before and after GELU, fc3 input
    head += Tp * 8  # the interleaving permutation (int64)
    n_head = sum(tensors["predictor"]) - n_blk_pred * m.predictor_depth - (2 * w + w * dim + dim)
    layers.append(ActivationLayer("encoder_norm+predictor_in", head, (2 * dim + n_head) * g))
    for i in range(m.predictor_depth):
        saved = (block_input_bytes(Tp, w, prec) if checkpointing
                 else block_saved_bytes(Tp, w, m.predictor_heads, m.mlp_ratio, prec, pad_p, fused))
        layers.append(ActivationLayer(f"predictor.{i}", saved, n_blk_pred * g))
    # target-row index, predictor norm (input + stats), proj input, the loss's [Tt, D] fp32 residual
    tail = Tt * (8 + w * r + 8 + w * a + dim * 4)
    layers.append(ActivationLayer("predictor_out+loss", tail, (2 * w + w * dim + dim) * g))
    return layers


def recompute_bytes(cfg: IWMConfig, batch: int, tok: TokenStats, prec: Precision, attention: str) -> float:
    """With checkpointing, one block's activations are rematerialised at a time during the backward."""
    m = cfg.model
    dim, _, heads = m.encoder_dims()
    extra = cfg.views.action_dim if m.conditioning == "sequence" else 0
    Tc, Tp = batch * tok.context, batch * (tok.context + tok.target + extra)
    padded, fused = attention == "padded", fused_layer_norm(cfg, attention)
    enc = block_saved_bytes(Tc, dim, heads, m.mlp_ratio, prec, batch * tok.context_max if padded else None, fused)
    pred = block_saved_bytes(Tp, m.predictor_width, m.predictor_heads, m.mlp_ratio, prec,
                             batch * tok.predictor_max if padded else None, fused)
    return max(enc, pred)


def backward_workspace_bytes(cfg: IWMConfig, batch: int, tok: TokenStats, prec: Precision) -> float:
    """Transient gradients of one block's backward: the MLP hidden gradient before and after GELU
    (2*h*D*a per token) and the residual-stream gradient (2*D*r), for the larger of the two networks."""
    m = cfg.model
    dim, _, _ = m.encoder_dims()
    Tc, Tp = batch * tok.context, batch * (tok.context + tok.target)
    r, a = prec.residual_bytes, prec.act_bytes

    def ws(T, d):
        return T * (2 * m.mlp_ratio * d * a + 2 * d * r)

    return max(ws(Tc, dim), ws(Tp, m.predictor_width))


def target_forward_bytes(cfg: IWMConfig, batch: int, prec: Precision) -> float:
    """Live memory of the no-grad target-encoder forward beyond its output: one block's residual input,
    its layer-norm output, qkv, attention output and the MLP hidden before and after GELU."""
    dim, _, _ = cfg.model.encoder_dims()
    T = batch * (cfg.data.img_size // cfg.model.patch_size) ** 2
    r, a = prec.residual_bytes, prec.act_bytes
    return T * (2 * dim * r + 2 * cfg.model.mlp_ratio * dim * a) + batch * 3 * cfg.data.img_size ** 2 * 4


# ----------------------------------------------------------------------------------------------------
# Memory per ZeRO stage
# ----------------------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    stage: int
    checkpointing: bool
    # components live at the peak (bytes); they add up to `total`
    params: float
    grads: float
    optimizer: float
    master: float
    ema: float
    activations: float
    buffers: float
    overhead: float
    total: float
    peak_phase: str  # target_forward | backward | grad_reduce | optimizer_step
    # full sizes, for reference
    activations_full: float
    grads_full: float  # module gradients of one backward pass
    grads_step: float  # gradients held through the optimizer step (module and/or partitions)
    # the first optimizer step: no AdamW moments before its update, ZeRO-3 recording its trace (no prefetch)
    first_step_total: float = 0.0
    first_step_phase: str = ""

    def gib(self) -> Dict[str, float]:
        return {k: v / GiB for k, v in asdict(self).items() if isinstance(v, float)}


@dataclass(frozen=True)
class Gathered:
    """ZeRO-3: elements a rank holds whole beyond its partitions (DeepSpeed's PartitionedParameterCoordinator)."""
    live: float  # trained parameters whole when the forward ends and the backward starts
    buffer: float  # one fetch's flat all-gather buffer, alive beside the per-parameter copies until all are used
    target: float  # target-encoder parameters whole at once during its forward
    target_buffer: float  # the same flat buffer, in the target's forward


def reuse_kept_elements(tensors: Sequence[int], max_reuse: int = STAGE3_MAX_REUSE_DISTANCE,
                        threshold: int = STAGE3_PARAM_PERSISTENCE_THRESHOLD) -> int:
    """Elements of the partitioned parameters (`tensors`, element counts in forward order) still whole when the
    forward ends. DeepSpeed releases a module's parameters after its forward only if their next use lies more
    than ``stage3_max_reuse_distance`` traced elements ahead (``__params_to_release``); from a parameter's forward
    use to its backward use the trace runs through every parameter after it twice (the rest of the forward, then
    their backward), so it stays whole when twice the elements after it are under the distance."""
    kept, after = 0, sum(tensors)
    for n in tensors:
        after -= n
        if n > threshold and 2 * after < max_reuse:
            kept += n
    return kept


def stage3_gathered(cfg: IWMConfig, N: int, first_step: bool = False) -> Gathered:
    """What ZeRO-3 gathers (DeepSpeed's defaults). From the second step on (a recorded trace) every module's
    hook prefetches ``stage3_prefetch_bucket_size`` more elements ahead (up to ``stage3_max_live_parameters``
    whole), so the whole network is gathered within its first few modules; what the reuse distance keeps stays
    whole into the backward, plus one prefetch of what it released. Each fetch gathers into one flat buffer and
    copies every parameter out of it (``AllGatherCoalescedHandle.wait``); the buffer lives until its last
    parameter is used. The first step records the trace: each module's parameters are fetched at its hook and
    released after it, nothing prefetched. One rank gathers nothing (the partition is the parameter)."""
    if N == 1:
        return Gathered(0.0, 0.0, 0.0, 0.0)
    tensors = param_tensors(cfg)
    trained = tensors["encoder"] + tensors["predictor"]
    partitioned = [n for n in trained if n > STAGE3_PARAM_PERSISTENCE_THRESHOLD]
    target = tensors["encoder"]  # the target is partitioned whole: no persistence threshold (engine/ema.py)
    largest = max(partitioned, default=0)
    if first_step:
        return Gathered(largest, largest, max(target), max(target))
    fetch = STAGE3_PREFETCH_BUCKET_SIZE + largest
    kept = reuse_kept_elements(trained)
    prefetched = min(fetch, sum(partitioned) - kept, max(0, STAGE3_MAX_LIVE_PARAMETERS - kept))
    return Gathered(kept + prefetched, min(fetch, sum(partitioned)), min(sum(target), STAGE3_MAX_LIVE_PARAMETERS),
                    min(STAGE3_PREFETCH_BUCKET_SIZE + max(target), sum(target)))


def target_gather_bytes(cfg: IWMConfig, stage: int, N: int) -> float:
    """ZeRO-3: the target encoder's parameters whole at once in its forward (fp32), beside the shards: engine/ema.py
    partitions every target parameter and the prefetch gathers all of them ahead of use (:func:`stage3_gathered`;
    measured on 2 CPU ranks by tests/engine/test_zero3_target.py, which also finds none whole after it)."""
    return 4.0 * stage3_gathered(cfg, N).target if stage == 3 else 0.0


def stage3_reduce_bytes(P: float, g: float, resident: bool) -> float:
    """ZeRO-3's gradient reduction of its bucket (at most ``reduce_bucket_size`` elements; at the end of the
    backward when the model fits one): ``reduce_scatter_coalesced`` interleaves the bucket's gradients into one
    new tensor (``torch.cat``) for the reduce-scatter, and gloo's ``reduce_scatter_tensor`` clones its input
    besides (``ProcessGroupGloo::reduce_scatter_tensor_coalesced``; ``resident``: the CPU's backend). NCCL
    reduces in place."""
    return g * min(P, REDUCE_BUCKET_SIZE) * (2 if resident else 1)


def persistent_bytes(cfg: IWMConfig, stage: int, N: int, prec: Precision, P: float, PT: float,
                     resident: bool = False):
    """Per-rank bytes held for the whole step: (params, AdamW states, fp32 master, EMA target, buffers).
    ``resident``: count DeepSpeed's reduce bucket as the pages a step writes (see :func:`memory_plan`)."""
    bucket = min(REDUCE_BUCKET_SIZE, P) if resident else REDUCE_BUCKET_SIZE
    p, g = prec.param_bytes, prec.grad_bytes
    if stage < 3:
        params = P * p
    else:  # own partition + the parameters below the persistence threshold, replicated whole
        small = sum(n for part in param_tensors(cfg).values() for n in part if n <= STAGE3_PARAM_PERSISTENCE_THRESHOLD)
        params = P * p / N + small * p
    optimizer = 8 * P / (N if stage >= 1 else 1)  # AdamW exp_avg + exp_avg_sq, fp32
    if stage == 0:
        master = 4 * P if prec.master_at_stage0 else 0.0
    else:
        # stages 1-2 clone their fp32 partition (single_partition_of_fp32_groups) even for an fp32 module;
        # stage 3 would reuse an fp32 partition, but its test (`tensor.device == "cpu"`, a device against the
        # accelerator's device name, a str) never holds: it clones too (measured, docs/plan.md)
        master = 4 * P / N
    ema = 4 * PT / (N if stage == 3 else 1)
    if stage == 0:
        buffers = 0.0  # its all-reduce bucket is a transient copy: the grad_reduce phase (:func:`step_memory`)
    elif stage in (1, 2):
        # the contiguous-gradient IPG bucket: torch.empty(reduce_bucket_size) in the reduction dtype
        # (fp32 for stage 1, the gradient dtype for stage 2); overlap_comm is off by default for 1-2
        buffers = bucket * (4 if stage == 1 else g)
    else:
        buffers = bucket * g
    return params, optimizer, master, ema, buffers


def reduce_phase(stage: int, P: int, g: float, resident: bool) -> Dict[str, float]:
    """What the gradient reduction adds at the backward's end. Stage 0: every module gradient, and
    DeepSpeedEngine.allreduce_bucket's flat copy of them (``self.flatten(bucket)``, buckets of up to 5e8
    elements; made on one rank too, freed after the copy back; measured: ViT-L/16's second step). Stage 3:
    :func:`stage3_reduce_bytes`. Stages 1-2 reduce into their persistent IPG bucket."""
    if stage == 0:
        return {"grads": P * g, "buffers": min(REDUCE_BUCKET_SIZE, P) * g}
    return {"buffers": stage3_reduce_bytes(P, g, resident) if stage == 3 else 0.0}


def backward_peak(layers, stage: int, P: int, g: float, N: int) -> Tuple[float, float]:
    """(activations, gradients) held at the backward's peak. Stages 0-1: full module gradients accumulate
    while activations are freed in reverse layer order (the worst point of that trade); stage 2: the
    contiguous gradient partition (its IPG bucket is in the buffers); stage 3 holds its gradient partitions
    from the start (:func:`step_memory`)."""
    if stage <= 1:
        best, best_acts, best_grads = -1.0, 0.0, 0.0
        for k in range(len(layers), -1, -1):  # layers[k:] are done: their activations freed, grads made
            acts = sum(L.saved for L in layers[:k])
            grads = sum(L.grads for L in layers[k:])
            if acts + grads > best:
                best, best_acts, best_grads = acts + grads, acts, grads
        return best_acts, best_grads
    acts_full = sum(L.saved for L in layers)
    return (acts_full, P * g / N) if stage == 2 else (acts_full, 0.0)


def step_grad_bytes(stage: int, P: int, g: float, N: int) -> float:
    """Gradient bytes held through the optimizer step."""
    if stage == 0:
        return P * g
    if stage == 1:
        return P * g + 4 * P / N  # module gradients + the reduced fp32 partition
    # stage 2: the gradient partition + its fp32 copy; stage 3: the partitions (grad_partitions_flat_buffer) +
    # the fp32 copy the step hands AdamW (`_prepare_fp32_grad_for_sub_group` flattens them)
    return P * g / N + 4 * P / N


def step_memory(cfg: IWMConfig, stage: int, N: int, prec: Precision, checkpointing: bool, tok: TokenStats,
                attention: str, overhead: float, B: int, resident: bool, first_step: bool) -> MemoryPlan:
    """One optimizer step's peak: the persistent state plus the largest phase (each phase's additions by column).
    ``first_step``: torch's AdamW allocates its moments in its first ``step()``, and ZeRO-3 records its trace."""
    counts = param_counts(cfg)
    P, PT = counts["trainable"], counts["target_encoder"]
    p, g = prec.param_bytes, prec.grad_bytes
    params, moments, master, ema, buffers = persistent_bytes(cfg, stage, N, prec, P, PT, resident)
    optimizer = 0.0 if first_step else moments
    held = P * g / N if stage == 3 else 0.0  # ZeRO-3 allocates its gradient partitions at init
    whole = stage3_gathered(cfg, N, first_step) if stage == 3 else Gathered(0.0, 0.0, 0.0, 0.0)
    n = (cfg.data.img_size // cfg.model.patch_size) ** 2
    target_out = B * n * cfg.model.encoder_dims()[0] * 4  # [B, N, D] fp32 targets, alive until the loss
    layers = activation_layers(cfg, B, tok, prec, checkpointing, attention)
    extra_bwd = target_out + backward_workspace_bytes(cfg, B, tok, prec) + P * prec.weight_copy_bytes
    if checkpointing:
        extra_bwd += recompute_bytes(cfg, B, tok, prec, attention)
    bwd_acts, bwd_grads = backward_peak(layers, stage, P, g, N)
    step_grads = step_grad_bytes(stage, P, g, N)
    phases = {  # column -> bytes added on top of the persistent state
        "target_forward": {"activations": target_out + target_forward_bytes(cfg, B, prec),
                           "ema": 4 * (whole.target + whole.target_buffer)},
        "backward": {"activations": bwd_acts + extra_bwd, "grads": bwd_grads,
                     "params": p * (whole.live + whole.buffer)},
        "grad_reduce": reduce_phase(stage, P, g, resident),
        "optimizer_step": {"grads": step_grads - held, "optimizer": moments - optimizer},
    }
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    add = {k: 0.0 for k in ("params", "grads", "optimizer", "ema", "activations", "buffers")}
    add.update(phases[peak_phase])
    total = params + optimizer + master + ema + buffers + held + overhead + sum(add.values())
    return MemoryPlan(stage, checkpointing, float(params + add["params"]), float(held + add["grads"]),
                      float(optimizer + add["optimizer"]), float(master), float(ema + add["ema"]),
                      float(add["activations"]), float(buffers + add["buffers"]), float(overhead), float(total),
                      peak_phase, float(sum(L.saved for L in layers) + extra_bwd), float(sum(L.grads for L in layers)),
                      float(step_grads))


def memory_plan(cfg: IWMConfig, stage: int, ranks: int, prec: Precision, checkpointing: bool,
                tok: TokenStats, attention: str = "packed", overhead_bytes: float = CUDA_OVERHEAD_GIB * GiB,
                batch: Optional[int] = None, resident: bool = False) -> MemoryPlan:
    """Estimated per-rank peak memory of a training step from the second on (see docs/plan.md for every term);
    ``first_step_total`` / ``first_step_phase``: the first step's.

    stage 0 is plain data parallel (DDP-style all-reduce, or one process); stages 1-3 follow DeepSpeed
    ZeRO with its default buckets. `ranks` is the data-parallel world size N.

    `resident`: a CPU rank (gloo), counting its resident set rather than what a GPU allocator hands out. The two
    differ in DeepSpeed's reduce bucket, a `torch.empty` of 5e8 elements: CUDA's allocator counts all of it,
    but a CPU page is resident only once written, and a backward writes at most the model's P gradient
    elements into it; and gloo's reduce-scatter clones its input where NCCL's does not
    (:func:`stage3_reduce_bytes`; measured: benchmarks/full_size.py, docs/plan.md "Full size on the CPU")."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage {stage}: use 0, 1, 2 or 3")
    if ranks < 1:
        raise ConfigError(f"ranks={ranks}: need at least one GPU")
    args = (cfg, stage, ranks, prec, checkpointing, tok, attention, overhead_bytes, batch or cfg.data.batch_size,
            resident)
    steady, first = step_memory(*args, first_step=False), step_memory(*args, first_step=True)
    steady.first_step_total, steady.first_step_phase = first.total, first.peak_phase
    return steady


# ----------------------------------------------------------------------------------------------------
# Time per step
# ----------------------------------------------------------------------------------------------------
def link_bandwidth(gpu: GPUSpec, ranks: int, gpus_per_node: int = GPUS_PER_NODE) -> float:
    """Bus bandwidth (bytes/s) of a ring collective: NVLink per direction inside one node, the
    per-GPU InfiniBand NIC across nodes; times COMM_EFFICIENCY."""
    per_direction = gpu.nvlink_gb_s / 2 if ranks <= gpus_per_node else min(gpu.nvlink_gb_s / 2, gpu.ib_gb_s)
    return per_direction * 1e9 * COMM_EFFICIENCY


def comm_bytes(cfg: IWMConfig, stage: int, ranks: int, prec: Precision) -> Dict[str, float]:
    """Bytes each rank sends per step in ring collectives: (N-1)/N of the buffer for reduce-scatter or
    all-gather, 2(N-1)/N for all-reduce."""
    N = ranks
    counts = param_counts(cfg)
    P, PT = counts["trainable"], counts["target_encoder"]
    f = (N - 1) / N
    out = {"grad_reduce": 0.0, "param_gather": 0.0}
    if N == 1:
        return out
    if stage == 0:
        out["grad_reduce"] = 2 * f * P * prec.grad_bytes  # all-reduce
    elif stage in (1, 2):
        out["grad_reduce"] = f * P * prec.grad_bytes  # reduce-scatter
        out["param_gather"] = f * P * prec.param_bytes  # all-gather of the updated partitions
    else:
        out["grad_reduce"] = f * P * prec.grad_bytes
        # trainable parameters gathered in the forward and again in the backward, the target encoder's
        # (fp32, partitioned) in its forward
        out["param_gather"] = f * (2 * P * prec.param_bytes + PT * 4)
    return out


@dataclass
class TimePlan:
    compute_s: float
    comm_s: float
    optimizer_s: float
    step_s: float
    images_per_s: float
    epoch_s: float
    run_s: float
    steps_per_epoch: int
    total_steps: int
    flops_per_step: float


def time_plan(cfg: IWMConfig, stage: int, ranks: int, gpu: GPUSpec, prec: Precision, checkpointing: bool,
              tok: TokenStats, mfu: float = DEFAULT_MFU, gpus_per_node: int = GPUS_PER_NODE,
              dataset_images: int = IMAGENET_TRAIN_IMAGES) -> TimePlan:
    """Step time = compute (FLOPs / (peak x MFU)) + communication (no overlap assumed) + the memory-bound
    AdamW and EMA updates at HBM bandwidth."""
    B = cfg.data.batch_size
    flops = step_flops(cfg, tok.context, tok.target, B)
    if checkpointing:  # one more forward of the trained networks
        dim, depth, _ = cfg.model.encoder_dims()
        n = (cfg.data.img_size // cfg.model.patch_size) ** 2
        target_fwd = vit_forward_flops(B * n, n, dim, depth, cfg.model.mlp_ratio)
        flops += (flops - target_fwd) / 3
    compute = flops / (gpu.bf16_tflops * 1e12 * mfu)
    comm = sum(comm_bytes(cfg, stage, ranks, prec).values()) / link_bandwidth(gpu, ranks, gpus_per_node)
    counts = param_counts(cfg)
    P = counts["trainable"]
    shard = P / (ranks if stage >= 1 else 1)
    # AdamW reads param, grad, m, v and writes param, m, v (fp32: 28 B); EMA reads 2 and writes 1 (12 B)
    optim = (28 * shard + 12 * counts["target_encoder"] / (ranks if stage == 3 else 1)) / (gpu.hbm_tb_s * 1e12)
    micro = 1
    if cfg.optim.global_batch:
        micro = max(1, cfg.optim.global_batch // (ranks * B))
    step = micro * compute + (micro if stage >= 2 else 1) * comm + optim
    images = micro * ranks * B
    steps_per_epoch = max(1, dataset_images // images)
    epoch = steps_per_epoch * step
    total = cfg.optim.max_steps or max(1, round(cfg.optim.epochs * steps_per_epoch))
    return TimePlan(compute * micro, comm * (micro if stage >= 2 else 1), optim, step, images / step, epoch,
                    total * step, steps_per_epoch, total, flops * micro)


# ----------------------------------------------------------------------------------------------------
# The whole plan, and the command line
# ----------------------------------------------------------------------------------------------------
def load_recipe(path: str, overrides: Sequence[str] = ()) -> IWMConfig:
    """The recipe's config (:func:`engine.config.load_recipe`), validated for any ZeRO stage (the plan covers
    every stage)."""
    cfg = config_lib.load_recipe(path, overrides)
    stage = cfg.train.zero_stage
    cfg.train.zero_stage = 1  # the plan covers every stage: validate the rest of the config
    try:
        cfg.validate()
    finally:
        cfg.train.zero_stage = stage
    return cfg


def plan(cfg: IWMConfig, gpus: int, gpu: str = "h100", gpu_mem_gib: float = 80.0, mfu: float = DEFAULT_MFU,
         precision: str = "autocast", stages: Sequence[int] = (1, 2, 3), gpus_per_node: int = GPUS_PER_NODE,
         overhead_gib: float = CUDA_OVERHEAD_GIB) -> dict:
    """Memory and time for each ZeRO stage x activation checkpointing off/on, as a JSON-able dict."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: need at least one GPU")
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r}: use one of {sorted(GPUS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: use one of {sorted(PRECISIONS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: a fraction in (0, 1], e.g. 0.4")
    if gpu_mem_gib <= 0:
        raise ConfigError(f"--gpu-mem {gpu_mem_gib}: GiB per GPU, must be positive")
    if gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {gpus_per_node}: must be >= 1")
    if cfg.optim.global_batch and cfg.optim.global_batch % (gpus * cfg.data.batch_size):
        raise ConfigError(f"optim.global_batch={cfg.optim.global_batch} is not a multiple of {gpus} GPUs x "
                          f"data.batch_size={cfg.data.batch_size}: change one of them")
    spec, prec = GPUS[gpu], PRECISIONS[precision]
    tok = token_stats(cfg, cfg.data.batch_size)
    rows = []
    for stage in stages:
        for ckpt in (False, True):
            mem = memory_plan(cfg, stage, gpus, prec, ckpt, tok, "packed", overhead_gib * GiB)
            tp = time_plan(cfg, stage, gpus, spec, prec, ckpt, tok, mfu, gpus_per_node)
            rows.append({"zero_stage": stage, "activation_checkpointing": ckpt,
                         "memory_gib": mem.gib(), "peak_phase": mem.peak_phase,
                         "fits": mem.total / GiB <= gpu_mem_gib, "time": asdict(tp)})
    counts = param_counts(cfg)
    return {
        "recipe": cfg.name, "gpus": gpus, "nodes": math.ceil(gpus / gpus_per_node), "gpu": asdict(spec),
        "gpu_mem_gib": gpu_mem_gib, "mfu": mfu, "precision": asdict(prec), "comm_efficiency": COMM_EFFICIENCY,
        "batch_per_gpu": cfg.data.batch_size, "img_size": cfg.data.img_size,
        "params": counts, "tokens": asdict(tok), "dataset_images": IMAGENET_TRAIN_IMAGES,
        "epochs": cfg.optim.epochs, "rows": rows,
    }


def _hms(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def format_plan(result: dict) -> str:
    c, t = result["params"], result["tokens"]
    lines = [
        f"{result['recipe']}: {result['gpus']} x {result['gpu']['name']} ({result['nodes']} node(s)), "
        f"{result['gpu_mem_gib']:g} GiB each | precision {result['precision']['name']} | "
        f"MFU {result['mfu']:g} (assumed) | batch {result['batch_per_gpu']}/GPU at {result['img_size']} px",
        f"params: encoder {c['encoder'] / 1e6:.1f}M + predictor {c['predictor'] / 1e6:.1f}M trainable, "
        f"target encoder {c['target_encoder'] / 1e6:.1f}M | tokens/sample of {t['num_patches']}: "
        f"context {t['context']:.1f}, target {t['target']:.1f} (mean of {t['samples']} masks)",
        "memory per GPU in GiB, at the peak of a step (columns add up to 'total'):",
    ]
    hdr = (f"{'ZeRO':>4} {'ckpt':>4} | {'params':>6} {'grads':>6} {'adamw':>6} {'master':>6} {'ema':>6} "
           f"{'acts':>6} {'bufs':>6} {'cuda':>5} | {'total':>6} {'fits':>4} {'peak at':>9} | "
           f"{'compute':>8} {'comm':>7} {'step':>7} {'img/s':>7} {'epoch':>8} {'run':>8}")
    lines += [hdr, "-" * len(hdr)]
    for r in result["rows"]:
        m, tp = r["memory_gib"], r["time"]
        lines.append(
            f"{r['zero_stage']:>4} {'on' if r['activation_checkpointing'] else 'off':>4} | "
            f"{m['params']:6.2f} {m['grads']:6.2f} {m['optimizer']:6.2f} {m['master']:6.2f} {m['ema']:6.2f} "
            f"{m['activations']:6.2f} {m['buffers']:6.2f} {m['overhead']:5.2f} | {m['total']:6.1f} "
            f"{'yes' if r['fits'] else 'NO':>4} {r['peak_phase'][:9]:>9} | {tp['compute_s']:7.3f}s "
            f"{tp['comm_s']:6.3f}s {tp['step_s']:6.3f}s {tp['images_per_s']:7.0f} {_hms(tp['epoch_s']):>8} "
            f"{_hms(tp['run_s']):>8}")
    lines.append(f"epoch = {result['dataset_images']:,} ImageNet-1k images; run = {result['epochs']:g} epochs; "
                 f"step = compute + communication (not overlapped) + AdamW/EMA at HBM bandwidth. "
                 f"Formulas: docs/plan.md")
    lines.append("grads at a backward peak: stage 1 holds none yet (they appear as activations are freed); "
                 "the gradients held through the optimizer step are 'grads_step' in --json")
    return "\n".join(lines)
