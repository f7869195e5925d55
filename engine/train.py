"""IWM pretraining on DeepSpeed.

One step: draw the two views and the action on the device; draw ragged block masks; the EMA target
encoder embeds the target view; the encoder embeds the source view's context patches; the predictor,
conditioned on the action, predicts the target features at the masked positions; squared L2 loss against
the layer-normalised targets; DeepSpeed backward/step; EMA update of the target encoder.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from engine import checkpoint as ckpt_lib
from engine.config import IWMConfig
from engine.data import build_dataset, build_loader, to_float_images
from engine.distributed import DistInfo, all_reduce_mean, barrier, setup_distributed
from engine.ema import update_target
from engine.flops import device_peak_flops, step_flops
from engine.masks import MaskSampler
from engine.metrics import MetricLogger
from engine.models import IWM, make_target_encoder
from engine.schedules import ema_momentum_at, lr_at, weight_decay_at
from engine.views import make_views
from kernels import dispatch
from kernels.l2_loss import masked_l2_loss

log = logging.getLogger("iwm")
VERIFY_UP_TO = 50_000  # folders up to this size are checked file by file before training


def param_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups: no weight decay on biases and 1-D parameters (norms, mask token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def autocast_context(cfg: IWMConfig, device: torch.device):
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def deepspeed_config(cfg: IWMConfig, world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "train_batch_size": cfg.data.batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


@dataclass
class TrainResult:
    step: int
    final_loss: float
    first_loss: float
    mrr: float
    out_dir: str
    checkpoint: str
    metrics_csv: str
    plot: Optional[str]


def _setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def _check_resume_config(saved: dict, cfg: IWMConfig, out_dir: str) -> None:
    """Refuse to resume a run whose network differs from the checkpoint's (the weights would not fit):
    the model section, and the image size (it sets the patch grid and the position embeddings)."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    keys = [("model", k) for k in now["model"]] + [("data", "img_size")]
    diff = {f"{sec}.{k}": (saved.get(sec, {}).get(k), now[sec][k]) for sec, k in keys
            if saved.get(sec, {}).get(k) != now[sec][k]}
    if diff:
        raise ckpt_lib.CheckpointError(
            f"{out_dir} holds a run with a different model config {diff} (saved, now): resume with the same "
            f"model settings, or pass a new train.out_dir (or train.resume=False to start over there)")


def train(cfg: IWMConfig, dist_info: Optional[DistInfo] = None) -> TrainResult:
    import deepspeed
    from tqdm import tqdm

    cfg.validate()
    info = dist_info or setup_distributed()
    _setup_logging(info.is_main)
    device = info.device
    # 'auto' leaves the choice to the IWM_KERNELS / IWM_ATTENTION environment (default: by device)
    dispatch.configure(kernels=cfg.train.kernels, attention=cfg.train.attention)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank (the target encoder too)

    out_dir = cfg.train.out_dir
    ds_dir = os.path.join(out_dir, "ds")
    weights_path = os.path.join(out_dir, "checkpoint.pt")
    config_path = os.path.join(out_dir, "config.json")
    resuming = cfg.train.resume and ckpt_lib.latest_ds_tag(ds_dir) is not None
    if resuming and os.path.isfile(config_path):
        with open(config_path) as f:
            _check_resume_config(json.load(f), cfg, out_dir)
    barrier()
    if info.is_main:
        if not resuming:  # a fresh start: the old run's checkpoints must not survive beside the new run
            ckpt_lib.remove_checkpoints(out_dir)
        ckpt_lib.atomic_write_json(config_path, cfg.to_dict())

    # ---- data --------------------------------------------------------------------------------------
    dataset = build_dataset(cfg.data, cfg.views, split="train")
    if hasattr(dataset, "verify"):  # an image folder: drop unreadable files up front when that is cheap
        if len(dataset) <= VERIFY_UP_TO:
            dataset.verify()
        if info.is_main:
            log.info("data: %s", dataset.summary())
    loader = build_loader(dataset, cfg.data.batch_size, cfg.data.num_workers, shuffle=True, drop_last=True,
                          seed=cfg.train.seed, rank=info.rank, world_size=info.world_size)
    steps_per_epoch = len(loader)  # build_loader refuses data with less than one batch per rank
    total = cfg.optim.max_steps or max(1, round(cfg.optim.epochs * steps_per_epoch))
    warmup = min(total, round(cfg.optim.warmup_epochs * steps_per_epoch))

    # every rank loads the held-out MRR images before DeepSpeed starts, so a bad folder stops all ranks
    eval_images = _eval_images(cfg, device)

    # ---- model, target encoder, engine ---------------------------------------------------------------
    model = IWM(cfg)
    target_encoder = make_target_encoder(model.encoder, device)
    mask_sampler = MaskSampler(cfg.masks, *model.encoder.grid)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.start_lr,
                                  betas=cfg.optim.betas, fused=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, info.world_size))
    autocast = autocast_context(cfg, device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _check_same_across_ranks(target_encoder, device)

    metrics = MetricLogger(out_dir, enabled=info.is_main)
    step = 0
    if resuming:
        path, client = engine.load_checkpoint(ds_dir, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None or client is None:
            raise ckpt_lib.CheckpointError(
                f"{ds_dir}: the checkpoint named by 'latest' is incomplete or unreadable; pass --fresh (or "
                f"train.resume=False) to start over, or point ds/latest at an older complete tag")
        target_encoder.load_state_dict(client["target_encoder"])
        step = int(client["step"])
        metrics.drop_after(step)
        log.info("resumed from %s at step %d", path, step)
    else:
        metrics.drop_after(-1)  # a fresh start in an old run directory: forget its history

    # per-rank random streams, re-seeded from the step on resume (crops with num_workers=0 use the global one)
    torch.manual_seed(cfg.train.seed * 1_000_003 + info.rank * 7_919 + step)
    mask_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + info.rank + step)
    view_gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 104729 + info.rank + step)

    if info.is_main:
        log.info("IWM: encoder %s/%d (%s), predictor %dx%d, conditioning=%s | %.2fM trainable params | "
                 "%d ranks x batch %d | %d steps (%d/epoch, warmup %d) | device %s",
                 cfg.model.encoder, cfg.model.patch_size, "x".join(map(str, model.encoder.grid)),
                 cfg.model.predictor_depth, cfg.model.predictor_width, cfg.model.conditioning, n_params / 1e6,
                 info.world_size, cfg.data.batch_size, total, steps_per_epoch, warmup, device)

    def save(step_now: int, mrr_value: float = float("nan")):
        client = {"step": step_now, "config": cfg.to_dict(), "target_encoder": target_encoder.state_dict()}
        tag = ckpt_lib.ds_tag(step_now)
        engine.save_checkpoint(ds_dir, tag=tag, client_state=client, save_latest=False)
        barrier()  # every rank's shards are on disk: only now may 'latest' name this tag
        if info.is_main:
            ckpt_lib.write_latest(ds_dir, tag)
            ckpt_lib.save_weights(weights_path, config=cfg.to_dict(), step=step_now, encoder=model.encoder,
                                  predictor=model.predictor, target_encoder=target_encoder,
                                  metrics={"mrr": mrr_value})
            ckpt_lib.prune_ds_tags(ds_dir, cfg.train.keep_checkpoints)
        barrier()

    bar = tqdm(total=total, initial=step, disable=not (info.is_main and cfg.train.progress), dynamic_ncols=True,
               desc="pretrain")
    first_loss = last_loss = float("nan")  # of the logged means; see the end
    mrr = float("nan")
    loss_acc, n_acc, t_last, imgs_last = 0.0, 0, time.time(), 0
    tokens_acc = [0, 0]  # context, target tokens of this rank since the last log
    peak = device_peak_flops(device)
    epoch = step // steps_per_epoch
    loader.sampler.skip_batches(step % steps_per_epoch)  # resume inside an epoch where it stopped
    engine.train()
    while step < total:
        loader.sampler.set_epoch(epoch)
        for images, _ in loader:
            if step >= total:
                break
            lr = lr_at(step, total, warmup, cfg.optim.start_lr, cfg.optim.lr, cfg.optim.final_lr)
            wd = weight_decay_at(step, total, cfg.optim.weight_decay, cfg.optim.final_weight_decay)
            for g in engine.optimizer.param_groups:
                g["lr"] = lr
                g["weight_decay"] = wd if g.get("apply_wd", True) else 0.0

            images = to_float_images(images, device)
            source_view, target_view, action, _, _ = make_views(images, cfg.views, generator=view_gen)
            masks = mask_sampler.sample(images.shape[0], mask_gen).to(device)
            with torch.no_grad(), autocast():
                target_feats = target_encoder(target_view)  # [B, N, D]
            with autocast():
                pred = engine(source_view, masks, action)  # [Tt, D]
            loss = masked_l2_loss(pred, target_feats, masks.flat_target())  # fp32 inside
            loss_value = loss.item()
            # every rank stops together (before the update) if any rank's loss is not finite
            if all_reduce_mean(float(math.isfinite(loss_value)), device) < 1.0:
                raise FloatingPointError(f"loss is not finite at step {step + 1} (this rank: {loss_value}): "
                                         f"lower optim.lr, raise optim.warmup_epochs, or check the data")
            engine.backward(loss)
            engine.step()
            step += 1
            momentum = ema_momentum_at(step, total, *cfg.optim.ema)
            update_target(target_encoder, engine.module.encoder, momentum)
            loss_acc += loss_value
            n_acc += 1
            imgs_last += images.shape[0] * info.world_size
            tokens_acc[0] += sum(masks.context_counts)
            tokens_acc[1] += sum(masks.target_counts)
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                dt = time.time() - t_last
                mean_loss = all_reduce_mean(loss_acc / n_acc, device)
                img_s = imgs_last / max(dt, 1e-9)
                last_loss = mean_loss
                local_imgs = n_acc * cfg.data.batch_size
                tflops = step_flops(cfg, tokens_acc[0] / local_imgs, tokens_acc[1] / local_imgs,
                                    local_imgs) / max(dt, 1e-9) / 1e12  # per device
                extra = {"mfu": 100 * tflops * 1e12 / peak} if peak else {}
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{img_s:.1f}",
                                **({"mfu": f"{extra['mfu']:.1f}%"} if extra else {}))
                grad_norm = engine.get_global_grad_norm()  # None / nan under ZeRO-0 fp32 (not tracked)
                if grad_norm is not None and math.isfinite(float(grad_norm)):
                    extra["grad_norm"] = float(grad_norm)
                metrics.log(step, loss=mean_loss, lr=lr, weight_decay=wd, ema=momentum, img_per_s=img_s,
                            tflops_per_device=tflops, **extra, epoch=step / steps_per_epoch)
                loss_acc, n_acc, t_last, imgs_last = 0.0, 0, time.time(), 0
                tokens_acc = [0, 0]
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                if info.is_main:
                    mrr = _eval_mrr(cfg, engine.module, target_encoder, eval_images, device, autocast)
                    metrics.log(step, mrr=mrr)
                    metrics.plot(chance_mrr=chance_mrr(cfg.eval.mrr_candidates))
                    bar.set_postfix(loss=f"{last_loss:.4f}", mrr=f"{mrr:.3f}")
                barrier()
            if step % cfg.train.ckpt_every == 0 and step < total:
                save(step, mrr)
        epoch += 1
    bar.close()

    if info.is_main:
        mrr = _eval_mrr(cfg, engine.module, target_encoder, eval_images, device, autocast)
        metrics.log(step, mrr=mrr)
    save(step, mrr)
    plot = metrics.plot(chance_mrr=chance_mrr(cfg.eval.mrr_candidates)) if info.is_main else None
    metrics.close()
    logged = metrics.series("loss")[1]  # the whole run's history, resumed parts included (main rank)
    if logged:
        first_loss, last_loss = logged[0], logged[-1]
    return TrainResult(step=step, final_loss=last_loss, first_loss=first_loss, mrr=mrr, out_dir=out_dir,
                       checkpoint=weights_path, metrics_csv=metrics.csv_path, plot=plot)


def _check_same_across_ranks(module: torch.nn.Module, device) -> None:
    """Every rank must start from the same target encoder (it is not a DeepSpeed-managed module)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        s = torch.stack([p.double().sum() for p in module.parameters()]).sum().reshape(1).to(device)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError("the target encoder differs between ranks: build the model under the same seed")


def chance_mrr(candidates: int) -> float:
    """MRR of a random ranking: the mean of 1/rank over ranks 1..K."""
    return sum(1.0 / r for r in range(1, candidates + 1)) / candidates


def _eval_images(cfg: IWMConfig, device) -> torch.Tensor:
    """A fixed set of held-out images (the val split, center-cropped) for the MRR during training."""
    from engine.eval import load_eval_images

    return load_eval_images(cfg, cfg.eval.mrr_images, split="val", device=device)


def _eval_mrr(cfg, model, target_encoder, images, device, autocast) -> float:
    from engine.eval import mean_reciprocal_rank

    model.eval()
    gen = torch.Generator(device=device).manual_seed(12345)  # the same candidates at every evaluation
    with autocast():
        value = mean_reciprocal_rank(model, target_encoder, images, cfg, generator=gen)
    model.train()
    return value
