"""IWM pretraining: ``pretrain(cfg)``, the step, and the task the run core (``engine/run.py``) trains.

Follow one batch from image to loss in :func:`pretrain_step`, top to bottom. Everything a pretraining run
owns besides the loop (the networks, the EMA target encoder, the mask sampler, the random streams of the
views and masks, the MRR during training, the weights file) is in :class:`Pretraining`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from engine import checkpoint as ckpt_lib
from engine.config import IWMConfig
from engine.data import build_dataset
from engine.distributed import DistInfo, gathered
from engine.ema import SHARD, TargetEncoder
from engine.flops import step_flops
from engine.eval import chance_mrr, load_eval_images, mean_reciprocal_rank
from engine import monitors as mon
from engine.loss import iwm_loss, target_tokens
from engine.masks import MaskBatch, MaskSampler
from engine.models import IWM
from engine.run import Run, RunResult, param_groups, start_process
from engine.schedules import ema_momentum_at
from engine.views import make_views


@dataclass
class StepOutput:
    loss: torch.Tensor  # fp32 scalar, before backward
    masks: MaskBatch
    # what the collapse monitors read (detached): the views' source and action, the targets, the predictions
    source_view: Optional[torch.Tensor] = None  # [B, 3, H, W]
    action: Optional[torch.Tensor] = None  # [B, A]
    target_feats: Optional[torch.Tensor] = None  # [B, N, D]
    pred: Optional[torch.Tensor] = None  # [Tt, D]


def pretrain_step(cfg: IWMConfig, predict: Callable, target_encoder: Callable, images: torch.Tensor,
                  mask_sampler: MaskSampler, view_gen: torch.Generator, mask_gen: torch.Generator,
                  autocast: Callable = contextlib.nullcontext) -> StepOutput:
    """One IWM step on images [B, 3, H, W] in [0, 1] (the loader's shared crop + flip already applied).

    ``predict(source_view, masks, action)`` is the trainable encoder + predictor (the DeepSpeed engine);
    ``target_encoder(images)`` the EMA target encoder. Returns the loss; backward and the update are the
    caller's.
    """
    # the two views and the action that maps the source back to the target (engine/views.py)
    source_view, target_view, action, _, _ = make_views(images, cfg.views, generator=view_gen)
    # ragged masks: per sample, the target positions to predict and the context the encoder sees
    masks = mask_sampler.sample(images.shape[0], mask_gen).to(images.device)
    with torch.no_grad(), autocast():
        target_feats = target_encoder(target_view)  # [B, N, D]: y through the target encoder, all patches
    with autocast():
        pred = predict(source_view, masks, action)  # [Tt, D]: encoder on x's context, action-conditioned predictor
    loss = iwm_loss(pred, target_feats, masks, cfg.model.target_norm_eps)  # fp32
    return StepOutput(loss, masks, source_view, action, target_feats, pred.detach())


class Pretraining:
    """The IWM pretraining task: ``model`` (encoder + predictor) is what the optimizer trains."""

    name = "pretrain"

    def __init__(self, cfg: IWMConfig, device: torch.device, rank: int = 0):
        self.cfg, self.device, self.rank = cfg, device, rank
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank, the target encoder too
        self.model = IWM(cfg)
        self.target_encoder = TargetEncoder(self.model.encoder, device)
        self.mask_sampler = MaskSampler(cfg.masks, *self.model.encoder.grid)
        # per-rank random streams of the views (on the device) and of the masks (on the host)
        self.view_gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 104729 + rank)
        self.mask_gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)
        self.eval_images: Optional[torch.Tensor] = None
        self.chance = chance_mrr(cfg.eval.mrr_candidates)
        self.window = mon.FeatureWindow(cfg.train.monitor_window) if cfg.train.monitor_window else None
        self.last: Optional[StepOutput] = None  # the last micro-batch, for the monitors at log steps

    def load_eval_data(self) -> None:
        """The held-out MRR images (every rank loads them before DeepSpeed starts: a bad folder stops all)."""
        self.eval_images = load_eval_images(self.cfg, self.cfg.eval.mrr_images, split="val", device=self.device)

    def train_dataset(self):
        """Images with the shared crop + flip applied in the loader (labels are not used)."""
        return build_dataset(self.cfg.data, self.cfg.views, split="train")

    def param_groups(self, weight_decay: float) -> List[dict]:
        """Decay on matrices, none on biases and 1-D parameters (:func:`engine.run.param_groups`)."""
        return param_groups(self.model, weight_decay)

    def external_parameters(self) -> List[tuple]:
        return self.model.external_parameters()

    def step(self, engine, images: torch.Tensor, labels: torch.Tensor, autocast: Callable) -> StepOutput:
        out = pretrain_step(self.cfg, engine, self.target_encoder, images, self.mask_sampler, self.view_gen,
                            self.mask_gen, autocast)
        if self.window is not None:
            self.window.add(out.target_feats)
            self.last = out
        return out

    def after_update(self, step: int, total: int) -> Dict[str, float]:
        """After optimizer step ``step`` (1-based): the EMA of the target encoder."""
        momentum = ema_momentum_at(step, total, *self.cfg.optim.ema)
        self.target_encoder.update(momentum)
        return {"ema": momentum}

    def tokens(self, out: StepOutput) -> Dict[str, int]:
        return {"context": sum(out.masks.context_counts), "target": sum(out.masks.target_counts)}

    def step_flops(self, images: int, tokens: Dict[str, int]) -> float:
        """The IWM step's FLOPs (engine/flops.py) at the mean context / target tokens per image."""
        per_image = {k: v / max(1, images) for k, v in tokens.items()}
        return step_flops(self.cfg, per_image.get("context", 0.0), per_image.get("target", 0.0), images)

    @torch.no_grad()
    def evaluate(self, module, autocast: Callable) -> Dict[str, float]:
        """The world model's MRR on the held-out images (main rank; the same candidates every time)."""
        module.eval()
        gen = torch.Generator(device=self.device).manual_seed(12345)
        with autocast():
            mrr = mean_reciprocal_rank(module, self.target_encoder, self.eval_images, self.cfg, generator=gen)
        module.train()
        return {"mrr": mrr}

    @torch.no_grad()
    def monitors(self, module, autocast: Callable) -> Dict[str, float]:
        """The collapse monitors (``engine/monitors.py``) of the last micro-batch, every rank (a host sync)."""
        last, eps = self.last, self.cfg.model.target_norm_eps
        if last is None:
            return {}
        values = {"target_std": mon.target_std(last.target_feats, eps),
                  "rankme": mon.rankme(self.window.features()),
                  "pred_spread": mon.pred_spread(last.pred, last.masks),
                  "spatial_r2": mon.spatial_r2(last.pred, target_tokens(last.target_feats, last.masks, eps), last.masks)}
        if last.masks.batch_size > 1:
            values["action_effect"] = self._action_effect(module, last, autocast)
        return {k: float(v) for k, v in values.items()}

    def _action_effect(self, module, last: StepOutput, autocast: Callable) -> torch.Tensor:
        """The predictions of the first ``train.monitor_samples`` samples under their own action and under the
        next sample's (one encoder pass, one predictor pass over both), eval mode: no stochastic depth."""
        k = min(self.cfg.train.monitor_samples, last.masks.batch_size)
        masks = last.masks.head(k)
        actions = torch.cat([last.action[:k], last.action.roll(-1, 0)[:k]])
        module.eval()
        with autocast():
            context = module.encoder(last.source_view[:k], masks)  # [Tc, D]
            pred = module.predictor(context.repeat(2, 1), mon.tiled(masks, 2), actions)  # [2 Tt, D]
        module.train()
        own, other = pred.chunk(2)
        return mon.action_effect(own, other)

    # ---- what a checkpoint holds besides DeepSpeed's engine state -------------------------------------
    def state_dict(self) -> dict:
        return {"target_encoder": self.target_encoder.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """``state["ranks"]`` (a ZeRO-3 save on another number of ranks): every saved rank's state, whose
        target-encoder slices are merged and re-partitioned."""
        ranks = state.get("ranks")
        shards = ([r["target_encoder"][SHARD] for r in ranks] if ranks and SHARD in state["target_encoder"]
                  else None)
        self.target_encoder.load_state_dict(state["target_encoder"], shards=shards)

    def rng_state(self) -> dict:
        return {"view_gen": self.view_gen.get_state(), "mask_gen": self.mask_gen.get_state()}

    def load_rng_state(self, state: dict) -> None:
        self.view_gen.set_state(state["view_gen"])
        self.mask_gen.set_state(state["mask_gen"])

    def reseed(self, step: int) -> None:
        """Streams restarted at ``step`` (a resume on another number of ranks: this rank has none to continue)."""
        self.view_gen.manual_seed(ckpt_lib.reseed_value(self.cfg.train.seed * 104729, step, self.rank))
        self.mask_gen.manual_seed(ckpt_lib.reseed_value(self.cfg.train.seed * 7919, step, self.rank))

    def warm_start(self, source) -> List[str]:
        """Encoder, predictor and target encoder from ``source`` (an engine.warm_start.WeightsSource); a file
        without a target encoder (a finetuned network) gives it the loaded encoder's weights, as a fresh run
        starts it as a copy of the online encoder."""
        from engine.warm_start import warm_start

        return warm_start({"encoder": self.model.encoder, "predictor": self.model.predictor,
                           "target_encoder": self.target_encoder.module}, source,
                          aliases={"target_encoder": ("target_encoder", "encoder")})

    def export(self, module, step: int, metrics: Dict[str, float]) -> Optional[dict]:
        """The consolidated weights that eval and finetuning load (``checkpoint.pt``). Every rank calls it
        (under ZeRO-3 it gathers the shards); rank 0 gets the payload, the others None."""
        with gathered(module.parameters()), self.target_encoder.whole() as target:
            if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
                return None
            return ckpt_lib.weights_payload(config=self.cfg.to_dict(), step=step, encoder=module.encoder,
                                            predictor=module.predictor, target_encoder=target, metrics=metrics)


def pretrain(cfg: IWMConfig, dist_info: Optional[DistInfo] = None) -> RunResult:
    """Pretrain an IWM as ``cfg`` says, in ``cfg.train.out_dir`` (resuming there when it holds a checkpoint)."""
    cfg.validate()
    info = start_process(dist_info)
    return Run(cfg, info).fit(Pretraining(cfg, info.device, info.rank))
