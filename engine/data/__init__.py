"""Data: the embedded shapes set (no download), ImageNet-style folders, WebDataset tar shards
(``engine/data/shards.py``), the shared crop, the loader.

    python -m engine.data shard IMAGEFOLDER OUT [--samples-per-shard N]   # an image folder as tar shards

Every dataset yields ``(image, label)``; with the transforms here the image is a uint8 tensor
[3, H, W] and the photometric part of the views is applied later, batched on the training device
(``engine/views.py``). The loader only does the geometry shared by the source and the target view:
a random resized crop and a horizontal flip (:class:`SharedCrop`).
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import random
import weakref
from pathlib import Path
from typing import Callable, List, Optional, Protocol, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from engine.config import ConfigError, DataConfig, IWMConfig, ViewConfig

log = logging.getLogger(__name__)

# extensions PIL reads (torchvision's IMG_EXTENSIONS); matched case-insensitively
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# at most this many consecutive undecodable files are skipped before __getitem__ gives up
_MAX_SUBSTITUTIONS = 32


class DataError(ValueError):
    """The data cannot be used as given; the message names the problem and the fix."""


# ----------------------------------------------------------------------------------------------------
# The embedded data set: 10 procedurally generated shape / texture classes
# ----------------------------------------------------------------------------------------------------
SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross",
                 "horizontal_stripes", "vertical_stripes", "checkerboard", "diagonal_stripes", "dots")
_SPLIT_STREAM = {"train": 0, "val": 1}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _soft(signed: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in image units (> 0 inside), one pixel wide."""
    return np.clip(signed * size + 0.5, 0.0, 1.0)


def _stripes(t: np.ndarray, period: float, phase: float, size: int) -> np.ndarray:
    """Square-wave stripes along coordinate t with anti-aliased edges."""
    s = np.sin(2 * np.pi * t / period + phase)
    return np.clip(0.5 + s * (period * size / (2 * np.pi)), 0.0, 1.0)


class EmbeddedShapes(Dataset):
    """A labelled image set generated on the fly, deterministic per (seed, split, index); no files.

    Classes (``SHAPE_CLASSES``): disc, square, triangle, ring, cross (objects of random size, position
    and a small rotation) and horizontal / vertical / diagonal stripes, checkerboard, dots (textures of
    random period and phase). Foreground and background colours are drawn per image (with at least
    0.3 luma contrast, either polarity), over a faint illumination gradient and a little noise: colour
    carries no class information, so colour jitter, grayscale or solarize do not destroy the label.
    Objects stay (about) inside the central 7/8 of the image. Labels are ``index % num_classes`` (balanced).
    ``val`` draws from a different seed stream than ``train``.

    Returns ``(PIL RGB image, label)``, or ``(transform(image), label)`` when a transform is given.
    """

    def __init__(self, num_classes: int, per_class: int, size: int, split: str = "train", seed: int = 0,
                 transform: Optional[Callable] = None):
        if not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise DataError(f"the embedded set has {len(SHAPE_CLASSES)} classes, asked for {num_classes}: "
                            f"set data.embedded_classes between 1 and {len(SHAPE_CLASSES)}")
        if per_class < 1:
            raise DataError(f"per_class={per_class}: need at least one image per class")
        if split not in _SPLIT_STREAM:
            raise DataError(f"split={split!r}: use 'train' or 'val'")
        if size < 16:
            raise DataError(f"size={size}: the embedded set needs at least 16 pixels per side")
        self.num_classes, self.per_class, self.size = num_classes, per_class, size
        self.split, self.seed, self.transform = split, seed, transform
        self.classes = list(SHAPE_CLASSES[:num_classes])
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        self._yy, self._xx = np.meshgrid(c, c, indexing="ij")  # [S, S] pixel centres in [0, 1)

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def verify(self) -> int:
        """Nothing to verify (the images are generated): 0 dropped."""
        return 0

    def summary(self) -> str:
        return f"{len(self)} embedded images in {self.num_classes} classes ({self.split} split)"

    @property
    def targets(self) -> List[int]:
        return [i % self.num_classes for i in range(len(self))]

    def label(self, index: int) -> int:
        return index % self.num_classes

    def array(self, index: int) -> np.ndarray:
        """The image as uint8 [S, S, 3]."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        rng = np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])
        S, yy, xx = self.size, self._yy, self._xx
        kind = SHAPE_CLASSES[self.label(index)]
        if kind in ("disc", "square", "triangle", "ring", "cross"):
            r = float(rng.uniform(0.2, 0.3))  # outer radius, in image units (python floats keep float32 maths)
            lo, hi = 1 / 16 + r, 15 / 16 - r
            cx, cy = map(float, rng.uniform(lo, hi, size=2))
            th = math.radians(rng.uniform(-20, 20))
            dx, dy = xx - cx, yy - cy
            u, v = math.cos(th) * dx + math.sin(th) * dy, -math.sin(th) * dx + math.cos(th) * dy  # rotated frame
            if kind == "disc":
                m = _soft(r - np.hypot(u, v), S)
            elif kind == "square":
                m = _soft(0.8 * r - np.maximum(np.abs(u), np.abs(v)), S)
            elif kind == "triangle":  # equilateral, circumradius r, pointing up (inradius r / 2)
                d = np.full_like(u, -np.inf)
                for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
                    d = np.maximum(d, math.sin(a) * v - math.cos(a) * u)  # outward normal . p
                m = _soft(r / 2 - d, S)
            elif kind == "ring":
                m = _soft(0.25 * r - np.abs(np.hypot(u, v) - 0.72 * r), S)
            else:  # cross
                w = 0.28 * r
                m = np.maximum(_soft(np.minimum(w - np.abs(u), r - np.abs(v)), S),
                               _soft(np.minimum(w - np.abs(v), r - np.abs(u)), S))
        else:
            period = float(rng.uniform(0.12, 0.22))
            phase = [float(p) for p in rng.uniform(0, 2 * math.pi, size=2)]
            th = math.radians(rng.uniform(-10, 10))
            if kind == "diagonal_stripes":
                th += float(rng.choice([-1, 1])) * math.pi / 4
            u, v = math.cos(th) * xx + math.sin(th) * yy, -math.sin(th) * xx + math.cos(th) * yy
            if kind == "horizontal_stripes":
                m = _stripes(v, period, phase[0], S)
            elif kind in ("vertical_stripes", "diagonal_stripes"):
                m = _stripes(u, period, phase[0], S)
            elif kind == "checkerboard":
                a, b = _stripes(u, period, phase[0], S), _stripes(v, period, phase[1], S)
                m = a * b + (1 - a) * (1 - b)  # xor of the two square waves
            else:  # dots on a square grid
                pu = np.mod(u / period + phase[0] / (2 * np.pi), 1.0) - 0.5
                pv = np.mod(v / period + phase[1] / (2 * np.pi), 1.0) - 0.5
                m = _soft(float(rng.uniform(0.25, 0.35)) * period - np.hypot(pu, pv) * period, S)
        fg, bg = self._colours(rng)
        gx, gy = map(float, rng.uniform(-0.08, 0.08, size=2))  # illumination gradient
        m = m.astype(np.float32)[..., None]
        img = bg * (1 - m) + fg * m + (gx * (xx - 0.5) + gy * (yy - 0.5))[..., None]
        img += (rng.random(img.shape, dtype=np.float32) - 0.5) * 0.1  # uniform noise, std 0.03
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    @staticmethod
    def _colours(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Two random RGB colours whose lumas differ by at least 0.3 (either may be the darker)."""
        for _ in range(64):
            fg, bg = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
            if abs(float(_LUMA @ fg) - float(_LUMA @ bg)) >= 0.3:
                return fg, bg
        dark, light = rng.uniform(0.0, 0.3, size=3), rng.uniform(0.7, 1.0, size=3)  # pragma: no cover
        return (dark, light) if rng.random() < 0.5 else (light, dark)  # pragma: no cover

    def __getitem__(self, index: int):
        img = Image.fromarray(self.array(index), mode="RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.label(index)


# ----------------------------------------------------------------------------------------------------
# ImageNet-style folders
# ----------------------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _hidden(name: str) -> bool:
    return name.startswith(".")


class ImageFolderDataset(Dataset):
    """Class subfolders of images (ImageNet's train/ layout), or a flat folder of images (one class, 0).

    Class subfolders are searched recursively; only subfolders holding at least one image are classes
    (sorted by name). Files without an image extension are ignored and counted (``ignored_files``).
    ``verify()`` opens every file's header and drops (and counts) the ones PIL cannot read; a file that
    still fails to decode when loaded is replaced by the next readable sample, with a warning, and
    counted in ``num_decode_failures`` (a counter in shared memory, so loader workers add to it too).
    """

    def __init__(self, root, transform: Optional[Callable] = None):
        self.root = Path(root).expanduser()
        self.transform = transform
        hint = "pass --data path/to/train (ImageNet-style class subfolders)"
        if not self.root.exists():
            raise DataError(f"data folder does not exist: {self.root}: {hint}")
        if not self.root.is_dir():
            raise DataError(f"data path is a file, not a folder: {self.root}: {hint}, "
                            f"or a folder of images")
        self.ignored_files: List[str] = []
        top_images, class_images = [], {}
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if _hidden(entry.name):
                continue
            if entry.is_dir(follow_symlinks=True):
                files = []
                for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
                    dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
                    for f in sorted(filenames):
                        if _hidden(f):
                            continue
                        (files if _is_image(f) else self.ignored_files).append(os.path.join(dirpath, f))
                if files:
                    class_images[entry.name] = files
            elif _is_image(entry.name):
                top_images.append(entry.path)
            else:
                self.ignored_files.append(entry.path)
        if class_images:
            self.classes = sorted(class_images)
            self.samples = [(p, k) for k, c in enumerate(self.classes) for p in class_images[c]]
            if top_images:
                log.warning("%s: %d images next to the class subfolders belong to no class and are ignored",
                            self.root, len(top_images))
                self.ignored_files += top_images
        elif top_images:
            self.classes = [self.root.name or "images"]
            self.samples = [(p, 0) for p in top_images]
        elif not self.ignored_files:
            raise DataError(f"data folder is empty, no images in it: {self.root}: {hint}")
        else:
            examples = ", ".join(os.path.relpath(p, self.root) for p in self.ignored_files[:3])
            raise DataError(f"no images with known extensions ({', '.join(IMG_EXTENSIONS)}) under {self.root}: "
                            f"{len(self.ignored_files)} other files ignored (e.g. {examples}): {hint}")
        if self.ignored_files:
            log.warning("%s: %d files without an image extension ignored", self.root, len(self.ignored_files))
        self.class_to_idx = {c: k for k, c in enumerate(self.classes)}
        self.num_bad = 0  # dropped by verify()
        self._decode_failures = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_ignored(self) -> int:
        return len(self.ignored_files)

    @property
    def num_decode_failures(self) -> int:
        return int(self._decode_failures.item())

    @property
    def targets(self) -> List[int]:
        return [k for _, k in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def verify(self) -> int:
        """Open every file's header (PIL ``Image.verify``), drop the unreadable ones; return how many.

        Reads every file once: meant for small folders (and a check before a long run), not ImageNet.
        """
        good = []
        for path, label in self.samples:
            try:
                with Image.open(path) as im:
                    im.verify()
                good.append((path, label))
            except Exception as e:  # PIL raises many types for broken files
                log.warning("unreadable image dropped: %s (%s: %s)", path, type(e).__name__, e)
        dropped = len(self.samples) - len(good)
        self.num_bad += dropped
        if not good:
            raise DataError(f"none of the {len(self.samples)} image files under {self.root} can be read: "
                            f"check the files (corrupt, or not images despite their extension)")
        self.samples = good
        return dropped

    def summary(self) -> str:
        return (f"{len(self)} images in {self.num_classes} classes under {self.root}; "
                f"{self.num_ignored} non-image files ignored, {self.num_bad} unreadable dropped, "
                f"{self.num_decode_failures} decode failures substituted")

    @staticmethod
    def _load(path: str) -> Image.Image:
        with Image.open(path) as im:
            return to_rgb8(im)  # forces the full decode

    def __getitem__(self, index: int):
        n = len(self.samples)
        for attempt in range(min(n, _MAX_SUBSTITUTIONS)):
            path, label = self.samples[(index + attempt) % n]
            try:
                img = self._load(path)
            except Exception as e:
                self._decode_failures += 1  # not atomic across workers; failures are rare
                log.warning("cannot decode %s (%s: %s): using the next image instead; "
                            "ImageFolderDataset.verify() drops such files up front", path, type(e).__name__, e)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, label
        raise DataError(f"{min(n, _MAX_SUBSTITUTIONS)} consecutive images from index {index} under {self.root} "
                        f"cannot be decoded: check the files, or call verify() to drop unreadable ones")


def to_rgb8(im: Image.Image) -> Image.Image:
    """An 8-bit RGB image. 16-bit (and 32-bit integer) grayscale is rescaled from its full range to 0..255
    (PIL's own convert would clip every value above 255 to white); floats are taken as 0..1."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 1.0 if im.mode == "F" else (65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    return im.convert("RGB")


def check_class_folders(path: Optional[str]) -> None:
    """A class subfolder without images would silently shift every later label: refuse it."""
    if path in (None, "embedded") or not os.path.isdir(path):
        return
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.is_dir() and not _hidden(entry.name):
            if not any(_is_image(f) for _, _, files in os.walk(entry.path) for f in files):
                raise DataError(f"class folder {entry.path} holds no images: add images or remove the folder "
                                f"(labels are the sorted class folders; an empty one would shift them)")


def check_same_classes(train_ds, val_ds, train_path, val_path) -> List[str]:
    classes = [list(getattr(d, "classes", [])) for d in (train_ds, val_ds)]
    if classes[0] != classes[1]:
        diff = sorted(set(classes[0]) ^ set(classes[1]))[:3]
        raise DataError(f"the train ({train_path}) and val ({val_path}) folders have different classes "
                        f"({len(classes[0])} vs {len(classes[1])}; e.g. {diff}): labels would not line up; give "
                        f"both the same class subfolders")
    if len(classes[0]) < 2:
        raise DataError(f"{train_path}: classification needs at least 2 classes (class subfolders); found "
                        f"{len(classes[0])}")
    return classes[0]


# ----------------------------------------------------------------------------------------------------
# Transforms run in the loader (per image, CPU): geometry only, uint8 out
# ----------------------------------------------------------------------------------------------------
def to_uint8_tensor(img) -> torch.Tensor:
    if isinstance(img, Image.Image):
        return TF.pil_to_tensor(img.convert("RGB") if img.mode != "RGB" else img).contiguous()
    return torch.as_tensor(img).contiguous()


def as_pil_or_tensor(img):
    if isinstance(img, np.ndarray):  # [H, W, 3] uint8
        return Image.fromarray(img)
    return img


class SharedCrop:
    """The geometry shared by the source and the target view: RandomResizedCrop(img_size,
    scale=cfg.crop_scale, ratio=cfg.crop_ratio) + horizontal flip (p=cfg.hflip_p).

    PIL image (or uint8 [3, H, W] tensor, or [H, W, 3] array) -> uint8 tensor [3, img_size, img_size].
    Randomness comes from torch's global RNG (seeded per loader worker by ``build_loader``).
    """

    def __init__(self, img_size: int, cfg: ViewConfig):
        self.img_size = img_size
        self.ops = v2.Compose([
            v2.RandomResizedCrop((img_size, img_size), scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                 antialias=True),
            v2.RandomHorizontalFlip(p=cfg.hflip_p),
        ])

    def __call__(self, img) -> torch.Tensor:
        return to_uint8_tensor(self.ops(as_pil_or_tensor(img)))


class EvalTransform:
    """Resize the shorter side to round(img_size / crop_fraction), center crop img_size; uint8 out."""

    def __init__(self, img_size: int, crop_fraction: float):
        if not 0.0 < crop_fraction <= 1.0:
            raise DataError(f"crop_fraction={crop_fraction} (data.eval_crop_fraction): use a value in (0, 1]")
        self.img_size = img_size
        self.ops = v2.Compose([v2.Resize(int(round(img_size / crop_fraction)), antialias=True),
                               v2.CenterCrop(img_size)])

    def __call__(self, img) -> torch.Tensor:
        return to_uint8_tensor(self.ops(as_pil_or_tensor(img)))


# ----------------------------------------------------------------------------------------------------
# Datasets and loaders for the engine
# ----------------------------------------------------------------------------------------------------
def build_dataset(data_cfg: DataConfig, view_cfg: ViewConfig, split: str = "train", path=None,
                  train: Optional[bool] = None, transform: Optional[Callable] = None) -> Dataset:
    """The data set of ``split`` yielding (uint8 image [3, img_size, img_size], label).

    Source: ``path`` if given, else ``data_cfg.dataset`` ('embedded' or a folder path; a folder is used
    as is for either split). Transform: ``transform`` if given; else :class:`SharedCrop` (random crop +
    flip) if ``train`` and :class:`EvalTransform` (resize + center crop) if not, where ``train``
    defaults to ``split == 'train'`` (``train=False`` gives the train split with the eval transform,
    for probes). The embedded val split has a quarter of the train images per class
    (DataConfig.embedded_per_class).
    """
    if split not in ("train", "val"):
        raise DataError(f"split={split!r}: use 'train' or 'val'")
    if train is None:
        train = split == "train"
    if transform is None:
        transform = (SharedCrop(data_cfg.img_size, view_cfg) if train
                     else EvalTransform(data_cfg.img_size, data_cfg.eval_crop_fraction))
    source = str(path) if path is not None else data_cfg.dataset
    if source == "embedded":
        per_class = data_cfg.embedded_per_class if split == "train" else max(1, data_cfg.embedded_per_class // 4)
        return EmbeddedShapes(num_classes=data_cfg.embedded_classes, per_class=per_class,
                              size=data_cfg.embedded_native_size, split=split, transform=transform)
    from engine.data.shards import ShardDataset, is_shard_folder

    if is_shard_folder(source):  # WebDataset tar shards (python -m engine.data shard)
        return ShardDataset(source, transform=transform)
    return ImageFolderDataset(source, transform=transform)


class ImageDataset(Protocol):
    """What the run core asks of a training set (:class:`EmbeddedShapes`, :class:`ImageFolderDataset`,
    :class:`~engine.data.shards.ShardDataset`, and :class:`SeededCrops` around any of them): (uint8 image, label)
    items, and a check + a one-line summary."""

    classes: List[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index): ...

    def verify(self) -> int:
        """Drop unreadable samples up front; returns how many were dropped."""

    def summary(self) -> str:
        """One line: how many images, from where, what was ignored or dropped."""


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start its next epoch part-way in, so a resumed run sees the rest of that
    epoch's order rather than its start again, on any number of ranks.

    The epoch's order is one permutation of the whole data set (seeded by seed + epoch, the same for every
    world size, as DistributedSampler's); rank ``r`` of ``W`` takes every ``W``-th sample from position ``r``.
    A step of ``G`` samples over all ranks therefore consumes the next ``G`` positions of the permutation,
    whatever ``W`` is: :meth:`skip_samples` drops a prefix of it, and the rest is dealt to the current ranks.
    With no skip the order is exactly DistributedSampler's. With ``with_epoch`` it yields ``(index, epoch)``
    pairs, for :class:`SeededCrops`."""

    def __init__(self, *args, batch_size: int = 1, with_epoch: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size
        self.with_epoch = with_epoch
        self._skip = 0

    def skip_samples(self, n: int) -> None:
        """Leave out the first ``n`` positions of the next epoch's permutation (samples of all ranks)."""
        self._skip = n

    def skip_batches(self, n: int) -> None:
        """Leave out this rank's first ``n`` batches of the next epoch (``n`` batches of every rank)."""
        self.skip_samples(n * self.batch_size * self.num_replicas)

    def epoch_order(self) -> List[int]:
        """The epoch's permutation of the whole data set (all ranks)."""
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def epoch_indices(self) -> List[int]:
        """This rank's indices for the rest of the current epoch: the permutation past the skipped prefix, dealt
        round-robin (DistributedSampler's split when nothing is skipped; shards: ``ShardSampler``)."""
        order, ranks = self.epoch_order()[self._skip:], self.num_replicas
        if self.drop_last:
            order = order[:len(order) // ranks * ranks]
        elif order:
            pad = -len(order) % ranks
            order += (order * (pad // len(order) + 1))[:pad]
        return order[self.rank::ranks]

    def __iter__(self):
        indices = self.epoch_indices()
        self._skip = 0
        if self.with_epoch:
            return iter([(i, self.epoch) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        left = len(self.dataset) - self._skip
        return left // self.num_replicas if self.drop_last else -(-left // self.num_replicas)


class SeededCrops(Dataset):
    """Wraps a training data set so that each sample's random crop and flip are a function of
    (seed, epoch, index) alone, whichever loader worker or process draws it: a resumed run, or the same
    run with another number of workers, sees exactly the same crops. Takes ``(index, epoch)`` keys."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # summary(), classes, ... of the wrapped data set
        if name in ("dataset", "seed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        index, epoch = key
        with torch.random.fork_rng(devices=[]):  # the process's own stream is left as it was
            torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + int(index))
            return self.dataset[index]


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker (base_seed + worker_id); give numpy and random the same stream
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    ignore_stop_signals()


def ignore_stop_signals() -> None:
    """In a loader worker: the stop signals (engine/preempt.py) are its rank's business. Launchers and SLURM
    signal whole process trees, and torch's worker handler dies of a SIGTERM that its parent did not send,
    which would fail the rank's next batch in the middle of the agreed stop. So a worker ignores them all.
    It still ends: the loader's shutdown sends it a sentinel it exits on (exit code 0), torch's worker
    loop exits by itself when its rank is gone, and at the rank's exit :func:`_end_workers` ends what is
    left (multiprocessing's own exit would SIGTERM it and then wait for ever). (Telling the rank's own
    SIGTERM from the others' by a ``sigwaitinfo`` thread does not hold: a thread the worker started before
    this runs cannot be made to block the signal, and one that does not block it takes it.)"""
    import signal

    from engine.preempt import STOP_SIGNALS

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


_WORKER_BATCHES: "weakref.WeakSet" = weakref.WeakSet()  # the live iterators that own loader workers


def _end_workers() -> None:
    """At the rank's exit (registered after multiprocessing's own exit function, so it runs first): every
    live batch iterator's workers get the shutdown sentinel; then every loader worker still alive, also one
    whose iterator was collected (torch's shutdown then SIGTERMs a worker that was slow to leave, which it
    ignores), is killed, since multiprocessing would SIGTERM it and then wait for it for ever."""
    import multiprocessing

    for batches in list(_WORKER_BATCHES):
        try:
            batches._shutdown_workers()
        except Exception:  # at exit: the kill below ends its workers
            pass
    for w in multiprocessing.active_children():
        if w.daemon and _is_loader_worker(w.pid):
            w.kill()
            w.join(timeout=5)


def _is_loader_worker(pid: int) -> bool:
    """A torch DataLoader worker (torch names its processes ``pt_data_worker``; Linux)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "pt_data_worker"
    except OSError:
        return False


class _Loader(DataLoader):
    """A DataLoader whose worker-owning iterators are known to :func:`_end_workers`."""

    def __iter__(self):
        batches = super().__iter__()
        if self.num_workers > 0 and batches not in _WORKER_BATCHES:
            if not _WORKER_BATCHES:
                atexit.unregister(_end_workers)  # once, however many loaders
                atexit.register(_end_workers)
            _WORKER_BATCHES.add(batches)
        return batches


def build_loader(dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, drop_last: bool,
                 seed: int, rank: int = 0, world_size: int = 1, pin_memory: Optional[bool] = None,
                 seeded_crops: bool = False) -> DataLoader:
    """A DataLoader over this rank's shard.

    Always a :class:`ResumableSampler` (a DistributedSampler, also for world_size=1; over tar shards its
    :class:`~engine.data.shards.ShardSampler`, which deals whole shards to ranks), seeded with ``seed``: call
    ``loader.sampler.set_epoch(epoch)`` each epoch for a new, reproducible shuffle. Ranks get disjoint
    index sets (padded by repetition to equal length unless drop_last). Worker RNGs (the random crops)
    derive from ``seed`` and ``rank``; with num_workers=0 the crops use the main process's torch RNG.
    pin_memory defaults to whether CUDA is available; workers persist across epochs when num_workers > 0.
    ``seeded_crops`` (training): each sample's random transform is seeded by (seed, epoch, index) through
    :class:`SeededCrops`, independent of workers and of the process's RNG (exact resume).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size}: must be positive")
    from engine.data.shards import ShardDataset, ShardSampler

    kind = ShardSampler if isinstance(dataset, ShardDataset) else ResumableSampler  # shards: whole shards per rank
    sampler = kind(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                   drop_last=drop_last, batch_size=batch_size, with_epoch=seeded_crops)
    if seeded_crops:
        dataset = SeededCrops(dataset, seed)
    if drop_last and len(sampler) < batch_size:
        raise DataError(f"{len(dataset)} images give {len(sampler)} per rank over {world_size} ranks, fewer than "
                        f"one batch of {batch_size} with drop_last: lower data.batch_size or use more data")
    generator = torch.Generator()
    generator.manual_seed(seed + 1_000_003 * rank)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                   pin_memory=pin_memory, drop_last=drop_last, persistent_workers=num_workers > 0,
                   generator=generator, worker_init_fn=_seed_worker if num_workers > 0 else None)


def to_float_images(batch_uint8: torch.Tensor, device) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [0, 1] on ``device`` (copied as uint8, converted there)."""
    x = batch_uint8.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


class FinetuneTransform:
    """Training transform of the supervised protocols: random resized crop + flip, then timm's RandAugment
    (PIL), uint8 out. Python's ``random`` (which RandAugment draws from) is seeded from torch's stream, so
    the loader's per-sample seeding (``SeededCrops``) makes every sample reproducible on resume."""

    def __init__(self, img_size: int, crop_scale, randaugment: str):
        from timm.data.auto_augment import rand_augment_transform
        from torchvision.transforms import v2

        self.geometry = v2.Compose([v2.RandomResizedCrop((img_size, img_size), scale=tuple(crop_scale),
                                                         antialias=True), v2.RandomHorizontalFlip()])
        self.randaugment = None
        if randaugment:
            try:
                self.randaugment = rand_augment_transform(
                    randaugment, {"translate_const": int(img_size * 0.45), "img_mean": (124, 116, 104)})
            except (AssertionError, ValueError, KeyError) as e:
                raise ConfigError(f"finetune.randaugment={randaugment!r} is not a timm RandAugment spec ({e}): "
                                  f"use e.g. 'rand-m9-mstd0.5-inc1', or '' for none") from None

    def __call__(self, img) -> torch.Tensor:
        img = self.geometry(as_pil_or_tensor(img))
        if self.randaugment is not None:
            state = random.getstate()
            random.seed(int(torch.randint(0, 2 ** 62, (1,))))
            img = self.randaugment(img.convert("RGB"))
            random.setstate(state)
        return to_uint8_tensor(img)


def val_path_of(cfg: IWMConfig) -> Optional[str]:
    """The labelled val folder: finetune.val_data, else the sibling 'val' of a '.../train' folder (None: the
    embedded val split)."""
    if cfg.finetune.val_data not in ("", "embedded"):
        return cfg.finetune.val_data
    if cfg.data.dataset == "embedded":
        return None
    sibling = os.path.join(os.path.dirname(os.path.normpath(cfg.data.dataset)), "val")
    if os.path.basename(os.path.normpath(cfg.data.dataset)) == "train" and os.path.isdir(sibling):
        return sibling
    raise DataError(f"no val split for {cfg.data.dataset}: pass --val VAL_DIR (finetune.val_data), or use the "
                    f"ImageNet layout .../train and .../val")
