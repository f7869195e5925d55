"""The run core: what every training run shares, whatever it trains.

A *task* (``engine/pretrain.py``'s :class:`~engine.pretrain.Pretraining`; finetuning protocols next) owns the
networks and the step; :class:`Run` owns the rest: the run directory (one run per folder, nothing deleted
before the run has proved it can start), the data loader, the DeepSpeed engine, the schedules, gradient
accumulation, meters and logs, periodic evaluation, checkpoints and exact resume.

A task is anything that implements :class:`Task` (every member; the run core probes for nothing): the
pretraining task (``engine.pretrain.Pretraining``) and the finetuning protocols (``engine.finetune.Finetuning``).

Host synchronisation: the step loop never reads a device value; losses and a non-finite count are
accumulated on the device and read at log, eval and checkpoint steps only. A non-finite loss stops every
rank at the next of those, before any checkpoint can contain the diverged weights.

Stopping on purpose (``engine/preempt.py``): SIGTERM / SIGUSR1 / SIGUSR2 on any rank, or the wall-clock
interval ``train.ckpt_every_minutes``, is voted on at every step boundary without a host sync; every rank
saves at the same step, and a signal then ends the run with :class:`~engine.preempt.Preempted` (exit code
75). A rank that dies or hangs is named by the others' watchdogs (``engine/watchdog.py``, exit code 76).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import torch

from engine import checkpoint as ckpt_lib
from engine.config import ConfigError, IWMConfig
from engine.data import DataError, ImageDataset, build_loader, to_float_images
from engine.distributed import DistInfo, all_reduce_sum, barrier, remove_shm_buffers, setup_distributed
from engine.flops import device_peak_flops
from engine.metrics import MetricLogger
from engine.models import compile_blocks
from engine.monitors import collapse_warning
from engine.preempt import Preempted, StopSignals, StopVote, preempted
from engine.schedules import lr_at, weight_decay_at
from engine.watchdog import DONE, FAILED, Watchdog
from kernels import dispatch

log = logging.getLogger("iwm")
VERIFY_UP_TO = 50_000  # folders up to this size are checked file by file before training


class StepOutput(Protocol):
    loss: torch.Tensor  # fp32 scalar, before backward


class Task(Protocol):
    """What the run core trains: the networks, the step, evaluation, and what a checkpoint holds besides
    DeepSpeed's state. Images reach :meth:`step` as float [B, 3, H, W] in [0, 1] on the device, labels [B]."""

    name: str                          # in the logs
    model: torch.nn.Module             # what the optimizer trains (DeepSpeed wraps it)
    target_encoder: Optional[object]   # the EMA target encoder (engine.ema.TargetEncoder), or None
    chance: Optional[float]            # the MRR's chance level for the plot, or None

    def train_dataset(self) -> ImageDataset:
        """The training set, yielding (uint8 image [3, H, W], label)."""

    def load_eval_data(self) -> None:
        """Load what :meth:`evaluate` needs (every rank, before DeepSpeed starts: bad data stops all)."""

    def param_groups(self, weight_decay: float) -> List[dict]:
        """AdamW groups; a group's ``lr_scale`` multiplies the scheduled LR, ``apply_wd`` says if it decays."""

    def external_parameters(self) -> List[tuple]:
        """(module, parameter) pairs ZeRO-3 must register as used outside their module's forward."""

    def step(self, engine, images: torch.Tensor, labels: torch.Tensor, autocast: Callable) -> StepOutput:
        """One micro-batch's forward and loss (backward and the update are the run core's)."""

    def after_update(self, step: int, total: int) -> Dict[str, float]:
        """After optimizer step ``step`` (1-based) of ``total``: e.g. the EMA update; values to log."""

    def tokens(self, out: StepOutput) -> Dict[str, int]:
        """Tokens the step processed ({"context": n, "target": n}) for the FLOPs estimate."""

    def step_flops(self, images: int, tokens: Dict[str, int]) -> float:
        """FLOPs of the optimizer steps since the last log: ``images`` and the summed :meth:`tokens`."""

    def evaluate(self, module, autocast: Callable) -> Dict[str, float]:
        """Held-out metrics (main rank; every rank under ZeRO-3)."""

    def monitors(self, module, autocast: Callable) -> Dict[str, float]:
        """Collapse monitors of the last step, at log steps, on every rank (engine/monitors.py; {}: none)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def rng_state(self) -> dict:
        """The task's random streams on this rank."""

    def load_rng_state(self, state: dict) -> None: ...

    def reseed(self, step: int) -> None:
        """New random streams at ``step`` (a resume on another number of ranks: none of this rank to continue),
        from the seed, the step and the rank."""

    def warm_start(self, source) -> List[str]:
        """The networks from an engine.warm_start.WeightsSource (a new run's ``--init``); the report lines."""

    def export(self, module, step: int, metrics: Dict[str, float]) -> Optional[dict]:
        """The consolidated weights (every rank calls it: a gather under ZeRO-3; rank 0 gets them)."""


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names the last good checkpoint and how to resume from it."""


# what ends a run on every rank alike (the CLI turns them into one line and an exit code): not a silent rank
AGREED_STOPS = (Preempted, TrainingDiverged, ConfigError, DataError, ckpt_lib.CheckpointError)


def start_process(dist_info: Optional[DistInfo] = None) -> DistInfo:
    """This rank's process group (or the one given) and logging: INFO on the main rank, warnings elsewhere."""
    info = dist_info or setup_distributed()
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return info


def decays(name: str, p: torch.nn.Parameter) -> bool:
    """Weight decay applies to matrices only: not to biases and 1-D parameters (norms, mask token)."""
    return not (p.ndim <= 1 or name.endswith(".bias"))


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[dict]:
    """AdamW groups: decay on what :func:`decays`, none on the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]


def autocast_context(cfg: IWMConfig, device: torch.device):
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def accumulation_steps(cfg: IWMConfig, world_size: int) -> int:
    """Micro-batches per optimizer step, so that ranks x batch x steps = optim.global_batch."""
    per_pass = cfg.data.batch_size * world_size
    if cfg.optim.global_batch is None:
        return 1
    if cfg.optim.global_batch % per_pass:
        raise ConfigError(f"optim.global_batch={cfg.optim.global_batch} is not a multiple of {world_size} ranks x "
                          f"data.batch_size={cfg.data.batch_size} = {per_pass}: pick a global batch that is, or "
                          f"change the batch size / number of ranks")
    return cfg.optim.global_batch // per_pass


def deepspeed_config(cfg: IWMConfig, world_size: int, universal: bool = False) -> dict:
    """DeepSpeed's config; ``universal``: the engine loads a universal checkpoint (another number of ranks)."""
    accum = accumulation_steps(cfg, world_size)
    return {
        "checkpoint": {"load_universal": universal},
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": cfg.data.batch_size * world_size * accum,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


@dataclass
class Schedule:
    """Optimizer steps of the run and the per-step LR / weight decay (docs/method.md, "Optimisation")."""
    total: int
    warmup: int
    steps_per_epoch: int

    @classmethod
    def build(cls, cfg: IWMConfig, micro_batches_per_epoch: int, accum: int) -> "Schedule":
        per_epoch = micro_batches_per_epoch // accum
        if per_epoch < 1:
            raise ConfigError(f"one optimizer step needs {accum} micro-batches but an epoch has "
                              f"{micro_batches_per_epoch} per rank: lower optim.global_batch or use more data")
        total = cfg.optim.max_steps or max(1, round(cfg.optim.epochs * per_epoch))
        return cls(total, min(total, round(cfg.optim.warmup_epochs * per_epoch)), per_epoch)

    def apply(self, optimizer, cfg: IWMConfig, step: int) -> Tuple[float, float]:
        o = cfg.optim
        lr = lr_at(step, self.total, self.warmup, o.start_lr, o.lr, o.final_lr)
        wd = weight_decay_at(step, self.total, o.weight_decay, o.final_weight_decay)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # lr_scale: layer-wise decay, a pretrained predictor's 1/10
            g["weight_decay"] = wd if g.get("apply_wd", True) else 0.0
        return lr, wd


@dataclass
class Meters:
    """Per-rank sums since the last log, kept on the device (read only at log steps)."""
    device: torch.device
    loss_sum: Optional[torch.Tensor] = None
    bad: Optional[torch.Tensor] = None
    micro: int = 0
    images: int = 0
    tokens: Dict[str, int] = field(default_factory=lambda: {"context": 0, "target": 0})
    since: float = field(default_factory=time.time)

    def add(self, loss: torch.Tensor, images: int, tokens: Dict[str, int]) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        value = torch.where(finite, loss, torch.zeros_like(loss))
        self.loss_sum = value if self.loss_sum is None else self.loss_sum + value
        self.bad = (~finite).int() if self.bad is None else self.bad + (~finite).int()
        self.micro += 1
        self.images += images
        for k, v in tokens.items():
            self.tokens[k] = self.tokens.get(k, 0) + v

    def any_bad(self) -> bool:
        """Host sync: did any rank see a non-finite loss since the last reset? (every rank calls this)"""
        bad = self.bad if self.bad is not None else torch.zeros((), dtype=torch.int32, device=self.device)
        return all_reduce_sum(bad.double(), self.device) > 0

    def reset(self) -> None:
        self.__init__(self.device)


@dataclass
class RunResult:
    step: int
    final_loss: float
    first_loss: float
    metrics: Dict[str, float]
    out_dir: str
    checkpoint: str
    metrics_csv: str
    plot: Optional[str]
    data_summary: Optional[str] = None

    @property
    def mrr(self) -> float:
        return self.metrics.get("mrr", float("nan"))


class Run:
    """Trains one task in ``cfg.train.out_dir`` on this process's rank (see the module docstring)."""

    def __init__(self, cfg: IWMConfig, info: DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.dir = ckpt_lib.RunDir(cfg.train.out_dir)
        self.autocast = autocast_context(cfg, self.device)
        self.peak = device_peak_flops(self.device)
        self.warned = False  # the collapse warning is given once per run
        self.monitor_s = 0.0  # the last log step's monitor time
        self.universal = False

    # ---- the loop -------------------------------------------------------------------------------------
    def fit(self, task: Task, init=None) -> RunResult:
        """Train ``task``; ``init``: the warm-start weights already read (else ``train.init`` is read here)."""
        cfg, info = self.cfg, self.info
        self.task = task
        dispatch.configure(kernels=cfg.train.kernels, attention=cfg.train.attention)
        with self.dir.lock(enabled=info.is_main), StopSignals() as signals:
            watchdog, state = self._watchdog(), FAILED
            try:
                loader, sched, engine, step = self._prepare(task, init)
                vote = StopVote(signals, cfg.train.ckpt_every_minutes)
                step, results = self._loop(engine, task, loader, sched, step, vote, watchdog)
                state = DONE
            except AGREED_STOPS:
                state = DONE  # every rank stops here (a signal, bad input, divergence): no one is silent
                raise
            except Exception as e:
                if is_communication_error(e):  # a peer died: let the watchdog name it (it ends the process)
                    watchdog.wait_for_verdict()
                raise
            finally:
                watchdog.stop(state)
            return self._finish(step, results, loader)

    def _prepare(self, task, init) -> tuple:
        """(loader, schedule, engine, first step): a fresh start (from ``train.init`` if set) or a resume, on this
        number of ranks or another; the run directory's config and logs set for it."""
        resume_tag = self._resume_tag()
        loader, sched = self._data(task)
        task.load_eval_data()
        reshard = self._reshard(resume_tag)
        if resume_tag is None and self.cfg.train.init:
            self._warm_start(task, init)
        self.universal = bool(reshard)  # the engine loads a universal checkpoint (build_engine reads it)
        engine = self.build_engine(task)
        step = self._resume(engine, task, resume_tag, bool(reshard)) if resume_tag else 0
        self._start(step, resume_tag)  # the run has proved it can start: only now touch old files
        self.metrics = MetricLogger(self.dir.path, enabled=self.info.is_main)
        self.metrics.drop_after(step if resume_tag else -1)
        if reshard is not None:  # saved again in this count's layout: a later resume here converts nothing
            self._save(step, sched, Meters(self.device), engine, task, loader, {})
        return loader, sched, engine, step

    def _loop(self, engine, task, loader, sched: Schedule, step: int, vote: StopVote,
              watchdog: Watchdog) -> Tuple[int, Dict[str, float]]:
        """Optimizer steps from ``step`` to the end, with the periodic log / eval / checkpoint and the
        agreed stop (a signal, the wall-clock interval); returns (the last step, the last eval results)."""
        cfg = self.cfg
        results: Dict[str, float] = {}
        bar = self._progress(sched.total, step)
        meters = Meters(self.device)
        saved_at = None
        for step, micro_batches in self._optimizer_steps(loader, sched, step):
            watchdog.started_step(step)
            logged = self.optimizer_step(engine, task, step, micro_batches, sched, meters)
            step += 1
            watchdog.finished_step(step)
            bar.update(1)
            last = step == sched.total
            save = lambda: self._save(step, sched, meters, engine, task, loader, results)  # noqa: E731
            if step % cfg.train.log_every == 0 or last:
                self._log(step, sched, meters, engine, bar, **logged)
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
                results = self._evaluate(step, sched, meters, task, engine, bar)
            if step % cfg.train.ckpt_every == 0 or last:
                save()
                saved_at = step
                vote.saved()
            if not last:
                saved_at = self._agreed_stop(vote, step, saved_at, save)
        vote.close()
        if saved_at != step:  # resumed at the last step: nothing trained, still export the weights
            results = self._evaluate(step, sched, meters, task, engine, bar)
            self._save(step, sched, meters, engine, task, loader, results)
        bar.close()
        if self.info.is_main:
            log.info("stop vote (signals, train.ckpt_every_minutes): %s", vote.cost())
        return step, results

    def _agreed_stop(self, vote: StopVote, step: int, saved_at: Optional[int], save: Callable[[], None]):
        """At every step boundary: what the ranks agreed (engine/preempt.py). A signal: save, then stop with
        :class:`~engine.preempt.Preempted`; the wall-clock interval: save and go on. Returns the step of the
        newest checkpoint."""
        decision = vote.decide()
        if decision is not None and saved_at != step:
            if decision == "time" and self.info.is_main:
                log.info("wall-clock checkpoint at step %d (train.ckpt_every_minutes=%g)", step,
                         self.cfg.train.ckpt_every_minutes)
            save()
            saved_at = step
            vote.saved()
        if decision == "signal":
            raise preempted(vote.signals, step, self.dir.path, ckpt_lib.ds_tag(step))
        vote.post()
        return saved_at

    def _watchdog(self) -> Watchdog:
        """This rank's heartbeat (engine/watchdog.py), started when there are peers to watch."""
        info, dog = self.info, self.cfg.train.watchdog_seconds
        last = self.dir.latest_complete_step

        def note() -> str:
            step = last()
            return (f"rerun the same command to resume from the last complete checkpoint, step {step} in "
                    f"{self.dir.path}" if step is not None else "no checkpoint was complete: a rerun starts over")

        def release() -> None:  # what atexit would do: this rank's DeepSpeed shared-memory buffer
            if self.device.type == "cpu" and "MASTER_PORT" in os.environ:
                remove_shm_buffers(os.environ["MASTER_PORT"], rank=info.local_rank)

        watchdog = Watchdog(self.dir.path, info.rank, info.world_size, dog, note, release)
        return watchdog.start() if dog and info.world_size > 1 else watchdog

    def optimizer_step(self, engine, task, step: int, micro_batches: List[tuple], sched: Schedule,
                       meters: Meters) -> Dict[str, float]:
        """Optimizer step ``step`` (0-based): the scheduled LR / weight decay, each micro-batch's forward,
        backward and (DeepSpeed: accumulated) update, then the task's after-update (the EMA). No host sync.
        Returns the values to log. (``benchmarks/e2e.py`` times this very call.)"""
        lr, wd = sched.apply(engine.optimizer, self.cfg, step)
        for images, labels in micro_batches:
            out = task.step(engine, to_float_images(images, self.device),
                            labels.to(self.device, non_blocking=True), self.autocast)
            engine.backward(out.loss)
            engine.step()
            meters.add(out.loss, images.shape[0], task.tokens(out))
        return dict(lr=lr, weight_decay=wd, **task.after_update(step + 1, sched.total))

    def _optimizer_steps(self, loader, sched: Schedule, step: int) -> Iterator[Tuple[int, List[tuple]]]:
        """(step, the micro-batches of that optimizer step) from ``step`` on; a resumed run continues the
        epoch's order where it stopped."""
        accum = self.accum
        epoch, within = divmod(step, sched.steps_per_epoch)
        loader.sampler.skip_batches(within * accum)
        while step < sched.total:
            loader.sampler.set_epoch(epoch)
            batches: List[tuple] = []
            for images, labels in loader:
                batches.append((images, torch.as_tensor(labels)))
                if len(batches) == accum:
                    yield step, batches
                    step, batches = step + 1, []
                    if step >= sched.total or step % sched.steps_per_epoch == 0:
                        break
            epoch += 1

    # ---- set-up -----------------------------------------------------------------------------------------
    def _resume_tag(self) -> Optional[str]:
        """The complete checkpoint to resume from (None: a fresh start); refuses a different network."""
        if not self.cfg.train.resume:
            return None
        tag, note = self.dir.resume_tag()
        if note and self.info.is_main:
            log.warning("%s", note)
        saved = self.dir.saved_config()
        if self.cfg.train.init:
            check_init_target(saved, tag, self.cfg, self.dir.path)
        if tag is not None and saved is not None:
            check_resume_config(saved, self.cfg, self.dir.path)
        return tag

    def _reshard(self, tag: Optional[str]) -> Optional[bool]:
        """None: nothing to reshard (a fresh start, or ``tag`` saved by this number of ranks). Else ``tag`` was
        saved by another number: True when it loads through DeepSpeed's universal checkpoint (ZeRO 1-3;
        converted here, before the engine exists), False at ZeRO-0 (the whole optimizer state is in rank 0's
        file and loads on any number of ranks as it is)."""
        if tag is None:
            return None
        saved_ranks = self.dir.manifest(tag).get("world_size")
        if saved_ranks == self.info.world_size:
            return None
        check_global_batch(self.dir.saved_config(), saved_ranks, self.cfg, self.info.world_size, self.dir.path)
        if self.info.is_main:
            log.warning("%s was saved by %d ranks, this run has %d: resharding (weights, AdamW moments, EMA, step "
                        "and data order carry over; the views' and masks' random streams restart from the step)",
                        tag, saved_ranks, self.info.world_size)
        if self.cfg.train.zero_stage == 0:
            return False
        self.dir.universal(tag, self.info)
        return True

    def _warm_start(self, task, source=None) -> None:
        """A new run's networks from ``train.init`` (every rank reads the file: each needs the weights before
        DeepSpeed partitions them); the part-by-part report on the main rank."""
        from engine.warm_start import read_weights

        source = source if source is not None else read_weights(self.cfg.train.init)
        for line in task.warm_start(source):
            if self.info.is_main:
                log.info("%s", line)

    def _data(self, task):
        cfg, info = self.cfg, self.info
        dataset = task.train_dataset()
        if len(dataset) <= VERIFY_UP_TO:
            dataset.verify()  # an image folder: drop unreadable files up front when that is cheap
        if info.is_main:
            log.info("data: %s", dataset.summary())
        self.dataset = dataset
        loader = build_loader(dataset, cfg.data.batch_size, cfg.data.num_workers, shuffle=True, drop_last=True,
                              seed=cfg.train.seed, rank=info.rank, world_size=info.world_size, seeded_crops=True)
        self.accum = accumulation_steps(cfg, info.world_size)
        return loader, Schedule.build(cfg, len(loader), self.accum)

    def build_engine(self, task: Task):
        """The DeepSpeed engine around ``task.model`` with torch AdamW (``task.param_groups``), our safe
        checkpoint engine and ZeRO-3's external parameters (``self.universal``: it loads a universal checkpoint:
        a resume on another number of ranks)."""
        import deepspeed

        cfg = self.cfg
        if cfg.train.compile:
            compile_blocks(task.model, cfg.train.compile_backend)
        groups = task.param_groups(cfg.optim.weight_decay)
        # fused: one pass over each (ZeRO: flat) parameter tensor, on the CPU too (the loop implementation
        # makes ten; 10x faster there, the same update to fp32 rounding)
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.start_lr, betas=cfg.optim.betas,
                                      fused=self.device.type in ("cuda", "cpu"))
        engine, _, _, _ = deepspeed.initialize(model=task.model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, self.info.world_size, self.universal))
        engine.checkpoint_engine = ckpt_lib.SafeCheckpointEngine()  # resume never unpickles code
        if cfg.train.zero_stage == 3:
            for module, param in task.external_parameters():
                deepspeed.zero.register_external_parameter(module, param)
        if task.target_encoder is not None:
            check_same_across_ranks(task.target_encoder.module, self.device)
            if cfg.train.zero_stage == 3:  # partitioned like the online encoder (engine/ema.py)
                task.target_encoder.partition(cfg.data.batch_size)
        engine.train()
        if self.info.is_main:
            n = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
            m = cfg.model
            log.info("%s: encoder %s/%d, predictor %dx%d, conditioning=%s | %.2fM trainable params | %d ranks x "
                     "batch %d x %d accumulation | device %s", task.name, m.encoder, m.patch_size, m.predictor_depth,
                     m.predictor_width, m.conditioning, n / 1e6, self.info.world_size, cfg.data.batch_size,
                     accumulation_steps(cfg, self.info.world_size), self.device)
        return engine

    def _resume(self, engine, task, tag: str, universal: bool = False) -> int:
        state = self.dir.load(engine, tag, self.info, universal=universal)
        step = int(state["step"])
        task.load_state_dict(state["client"])
        if state["rng"] is not None:
            task.load_rng_state(state["rng"]["task"])
            ckpt_lib.set_global_rng_state(state["rng"]["global"])
        else:  # saved by another number of ranks: no stream of this rank to continue; new ones from the step
            task.reseed(step)
            torch.manual_seed(ckpt_lib.reseed_value(self.cfg.train.seed, step, self.info.rank))
        if self.info.is_main:
            log.info("resumed from %s at step %d", tag, step)
        return step

    def _start(self, step: int, resume_tag: Optional[str]) -> None:
        barrier()
        if self.info.is_main:
            if resume_tag is None:
                moved = self.dir.move_aside()  # a fresh start: the old run's files are kept, not deleted
                if moved:
                    log.warning("a previous run in %s was moved to %s", self.dir.path, moved)
            self.dir.write_config(self.cfg.to_dict())
        barrier()

    def _progress(self, total: int, step: int):
        from tqdm import tqdm

        return tqdm(total=total, initial=step, disable=not (self.info.is_main and self.cfg.train.progress),
                    dynamic_ncols=True, desc="train")

    # ---- at log / eval / checkpoint steps (host syncs happen here only) ---------------------------------
    def _check_finite(self, step: int, meters: Meters) -> None:
        if meters.any_bad():
            last = self.dir.latest_complete_step()
            where = (f"the last checkpoint, step {last} in {self.dir.path}, was written before it" if last
                     else "no checkpoint was written before it")
            raise TrainingDiverged(
                f"the loss became non-finite between step {step - meters.micro // self.accum + 1} and step {step}; "
                f"{where}: rerun the same command with a lower learning rate (e.g. --set optim.lr="
                f"{self.cfg.optim.lr / 2:g}) or a longer warmup (optim.warmup_epochs) to resume from it")

    def _log(self, step: int, sched: Schedule, meters: Meters, engine, bar, **values) -> None:
        self._check_finite(step, meters)
        info = self.info
        dt = max(time.time() - meters.since, 1e-9)
        loss = all_reduce_sum(meters.loss_sum.double(), self.device) / (meters.micro * info.world_size)
        img_s = meters.images * info.world_size / dt
        flops = self.task.step_flops(meters.images, meters.tokens)
        tflops = flops / dt / 1e12
        extra = {"mfu": 100 * tflops * 1e12 / self.peak} if self.peak else {}
        grad_norm = engine.get_global_grad_norm()  # None / nan under ZeRO-0 fp32 (not tracked)
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            extra["grad_norm"] = float(grad_norm)
        extra.update(self._monitors(engine))
        self.metrics.log(step, loss=loss, img_per_s=img_s, tflops_per_device=tflops, **values, **extra,
                         epoch=step / sched.steps_per_epoch)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values.get('lr', 0):.2e}", img_s=f"{img_s:.1f}")
        meters.reset()

    def _monitors(self, engine) -> Dict[str, float]:
        """The task's collapse monitors, averaged over ranks; one warning line the first time one crosses its
        collapse threshold (engine/monitors.py). Their time is not training time (img/s)."""
        started = time.time()
        values = self.task.monitors(engine.module, self.autocast)
        n = self.info.world_size
        values = {k: all_reduce_sum(v, self.device) / n for k, v in sorted(values.items())}
        warning = collapse_warning(values)
        if warning and not self.warned and self.info.is_main:
            log.warning("%s", warning)
        self.warned = self.warned or bool(warning)
        self.monitor_s = time.time() - started
        return values

    def _evaluate(self, step: int, sched, meters: Meters, task, engine, bar) -> Dict[str, float]:
        self._check_finite(step, meters)
        started = time.time()
        results: Dict[str, float] = {}
        if self.info.is_main or self.cfg.train.zero_stage == 3:  # ZeRO-3: forwards gather, every rank runs them
            results = task.evaluate(engine.module, self.autocast)
        if self.info.is_main:
            self.metrics.log(step, **results)
            self.metrics.plot(chance_mrr=task.chance)
            bar.set_postfix({k: f"{v:.3f}" for k, v in results.items()})
        barrier()
        meters.since += time.time() - started  # img/s counts training time only
        return results

    def _save(self, step: int, sched, meters: Meters, engine, task, loader, results) -> None:
        self._check_finite(step, meters)
        rng = {"task": task.rng_state(), "global": ckpt_lib.global_rng_state()}
        weights = task.export(engine.module, step, results)  # every rank: a gather under ZeRO-3
        self.dir.save(engine, step, client=task.state_dict(), rng=rng, info=self.info,
                      keep=self.cfg.train.keep_checkpoints,
                      export=lambda path: ckpt_lib.write_weights(path, weights))

    def _finish(self, step: int, results: Dict[str, float], loader) -> RunResult:
        plot = self.metrics.plot(chance_mrr=None) if self.info.is_main else None
        self.metrics.close()
        logged = self.metrics.series("loss")[1]  # the whole run's history, resumed parts included (main rank)
        summary = self.dataset.summary()
        return RunResult(step=step, final_loss=logged[-1] if logged else float("nan"),
                         first_loss=logged[0] if logged else float("nan"), metrics=results,
                         out_dir=self.dir.path, checkpoint=self.dir.weights, metrics_csv=self.metrics.csv_path,
                         plot=plot, data_summary=summary)


def is_communication_error(e: BaseException) -> bool:
    """An error raised by the process group (a peer's connection closed or timed out), not by this rank's
    own code: only then is there a silent peer to name."""
    import torch.distributed as dist

    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        w in str(e) for w in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")))


def check_resume_config(saved: dict, cfg: IWMConfig, out_dir: str) -> None:
    """Refuse to resume a run whose network differs from the checkpoint's (the weights would not fit):
    the model section, and the image size (it sets the patch grid and the position embeddings)."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists, as saved
    default = json.loads(json.dumps(IWMConfig().to_dict()))  # a field added since the save: its default
    keys = [("model", k) for k in now["model"]] + [("data", "img_size")]
    was = {(sec, k): saved.get(sec, {}).get(k, default[sec][k]) for sec, k in keys}
    diff = {f"{sec}.{k}": (was[sec, k], now[sec][k]) for sec, k in keys if was[sec, k] != now[sec][k]}
    saved_views = IWMConfig.from_dict({"views": saved["views"]}).views if "views" in saved else cfg.views
    if saved_views.action_dim != cfg.views.action_dim:  # the predictor's conditioning width
        diff["views.action_dim (views.jitter_order, ...)"] = (saved_views.action_dim, cfg.views.action_dim)
    if diff:
        raise ckpt_lib.CheckpointError(
            f"{out_dir} holds a run with a different model config {diff} (saved, now): resume with the same "
            f"model settings, or pass a new --out (or --fresh to move the old run aside and start over)")


def check_init_target(saved: Optional[dict], tag: Optional[str], cfg: IWMConfig, out_dir: str) -> None:
    """``--init`` starts a new run: refuse a folder holding another run (its checkpoints or config) unless
    ``--fresh`` moves it aside. The run that this same ``--init`` started resumes (a requeued job reruns its
    command)."""
    if not cfg.train.resume or (saved is None and tag is None):
        return
    if saved is not None and (saved.get("train") or {}).get("init") == cfg.train.init:
        return
    what = f"checkpoint {tag}" if tag else "config.json"
    raise ckpt_lib.CheckpointError(
        f"{out_dir} already holds a run ({what}) that --init {cfg.train.init} did not start: a warm start begins a "
        f"new run; pass another --out, or --fresh to move the old run to {out_dir}/previous/ and start over")


def check_global_batch(saved: Optional[dict], saved_ranks: int, cfg: IWMConfig, world_size: int, out_dir: str) -> None:
    """A resume on another number of ranks keeps the global batch: the step is a count of global batches (the
    schedules and the position in the epoch's order are functions of it)."""
    if saved is None:
        return
    s_data, s_optim = saved.get("data", {}), saved.get("optim", {})
    before = s_optim.get("global_batch") or s_data.get("batch_size", 0) * saved_ranks
    now = cfg.data.batch_size * world_size * accumulation_steps(cfg, world_size)
    if before != now:
        raise ckpt_lib.CheckpointError(
            f"{out_dir} was saved with a global batch of {before} on {saved_ranks} ranks; {world_size} ranks x "
            f"data.batch_size={cfg.data.batch_size} give {now}: keep the global batch with --set "
            f"optim.global_batch={before} (a multiple of {world_size} x the per-rank batch)")


def check_same_across_ranks(module: torch.nn.Module, device) -> None:
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
