"""WebDataset tar shards: writing them from an image folder, and reading them as the training set.

Layout (WebDataset's standard one; any tool that writes it can feed the engine)::

    OUT/
      shard-000000.tar     KEY.jpg (or KEY.png) + KEY.cls (the label as decimal text) per sample
      shard-000001.tar     ...
      shards.json          classes, and the samples of each shard (written last: present = complete)

``python -m engine.data shard IMAGEFOLDER OUT`` writes it (:func:`write_shards`): the folder's images in a
seeded random order (a shard then holds every class), JPEG and PNG files copied byte for byte, other
formats re-encoded as PNG, unreadable files left out and counted. Each shard is written under a temporary
name and renamed, the index last: a killed writer leaves no shard that looks complete.

Reading (``--data OUT``, :class:`ShardDataset`): a map-style data set over the shards, so that the loader
keeps what the engine's ImageFolder path has: a per-sample seeded crop (``SeededCrops``), batches split
over loader workers, and an exact resume a number of batches into an epoch. :class:`ShardSampler` splits the
*shards* across ranks: each epoch it permutes them (seeded by the epoch) and gives each rank an equal run of
them (whole shards but for one at each end), so a node reads only its own shards (and no rank scans the
data set, as ``os.walk`` on an ImageFolder does). A sample is read with one ``pread`` at its offset in the tar
(each worker indexes a shard's tar headers the first time it reads from it). WebDataset's own streaming
pipeline (an ``IterableDataset``) reads shards sequentially but cannot resume mid-epoch exactly, nor keep a
sample's crop independent of the worker count; reading its format by offset keeps both.
"""
from __future__ import annotations

import bisect
import io
import json
import logging
import os
import tarfile
from typing import Dict, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from engine.data import _MAX_SUBSTITUTIONS, DataError, ImageFolderDataset, ResumableSampler, to_rgb8

log = logging.getLogger("engine.data")

INDEX = "shards.json"
SHARD_NAME = "shard-{:06d}.tar"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")  # the image member of a sample, first found wins


def is_shard_folder(path: str) -> bool:
    """A folder of ``*.tar`` shards (with or without ``shards.json``), not an image folder."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return INDEX in names or any(n.endswith(".tar") for n in names)


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def _sample_bytes(path: str) -> Tuple[str, bytes]:
    """(extension, bytes) of one image: JPEG / PNG as they are on disk, anything else decoded and re-encoded as
    PNG. Raises if PIL cannot decode the file."""
    with Image.open(path) as im:
        fmt = im.format
        im.load()  # a full decode: a truncated file fails here, not in training
        if fmt not in ("JPEG", "PNG"):
            buf = io.BytesIO()
            to_rgb8(im).save(buf, format="PNG")
            return "png", buf.getvalue()
    with open(path, "rb") as f:
        return ("jpg" if fmt == "JPEG" else "png"), f.read()


def _write_shard(path: str, samples: List[Tuple[str, str, int]]) -> int:
    """One tar of (key, image path, label) under a temporary name, renamed when whole; returns its bytes."""
    import webdataset as wds

    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0)  # an int: no pax header per member
        for key, image_path, label in samples:
            ext, data = _sample_bytes(image_path)
            writer.write({"__key__": key, ext: data, "cls": str(label).encode()})
        writer.close()
    os.replace(tmp, path)
    return os.path.getsize(path)


def write_shards(folder: str, out: str, samples_per_shard: int = 1000, seed: int = 0) -> dict:
    """Write the image folder ``folder`` (class subfolders, or flat) as shards in ``out`` (new or empty);
    returns the index written to ``out/shards.json``."""
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard {samples_per_shard}: must be at least 1")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise DataError(f"{out} exists and is not an empty folder: pass a new OUT folder (nothing is overwritten)")
    ds = ImageFolderDataset(folder)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    good, bad = [], []
    for i in order:
        path, label = ds.samples[i]
        try:
            with Image.open(path) as im:
                im.verify()
            good.append((path, label))
        except Exception as e:  # PIL raises many types for broken files
            log.warning("unreadable image left out: %s (%s: %s)", path, type(e).__name__, e)
            bad.append(path)
    if not good:
        raise DataError(f"none of the {len(ds)} image files under {folder} can be read: check the files")
    os.makedirs(out, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(good), samples_per_shard)):
        chunk = [(f"{start + j:09d}", p, k) for j, (p, k) in enumerate(good[start:start + samples_per_shard])]
        name = SHARD_NAME.format(s)
        size = _write_shard(os.path.join(out, name), chunk)
        shards.append({"name": name, "samples": len(chunk), "bytes": size})
    index = {"format": "webdataset", "classes": list(ds.classes), "samples": len(good), "shards": shards,
             "source": os.path.abspath(folder), "seed": seed, "unreadable_left_out": len(bad),
             "non_image_files_ignored": ds.num_ignored}
    from engine.checkpoint import atomic_write_json

    atomic_write_json(os.path.join(out, INDEX), index)
    return index


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
def _key_and_ext(name: str) -> Tuple[str, str]:
    """WebDataset's split of a member name: the key is everything before the first dot of the base name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), ext.lower()


def _pax_records(data: bytes) -> Dict[str, str]:
    """The ``LEN key=value\\n`` records of a pax extended header."""
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        out[key.decode()] = value.decode()
        i += length
    return out


def _tar_members(path: str) -> List[Tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of an uncompressed tar, from its 512-byte headers read with
    ``pread``, pax (``x``) and GNU long-name (``L``) headers applied to the next member (several times faster
    than ``tarfile``, which parses each header into objects). Base-256 sizes go to ``tarfile``."""
    out, pending = [], {}
    fd = os.open(path, os.O_RDONLY)
    try:
        end, pos = os.fstat(fd).st_size, 0
        while pos + 512 <= end:
            hdr = os.pread(fd, 512, pos)
            if hdr.count(0) == 512:  # the end-of-archive blocks
                break
            kind, size_field = hdr[156:157], hdr[124:136]
            if size_field[0] & 0x80:
                return _tar_members_slow(path)
            checksum = int(hdr[148:156].strip(b"\0 ") or b"-1", 8)
            if checksum != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # the checksum field counts as 8 spaces
                raise tarfile.ReadError(f"bad header checksum at byte {pos}")
            size = int(size_field.strip(b"\0 ") or b"0", 8)
            data = pos + 512
            pos = data + (size + 511) // 512 * 512
            if kind == b"x":
                pending.update(_pax_records(os.pread(fd, size, data)))
            elif kind == b"L":
                pending["path"] = os.pread(fd, size, data).split(b"\0", 1)[0].decode()
            elif kind in (b"0", b"\0"):
                name = hdr[:100].split(b"\0", 1)[0].decode()
                prefix = hdr[345:500].split(b"\0", 1)[0].decode() if hdr[257:262] == b"ustar" else ""
                name = pending.get("path", f"{prefix}/{name}" if prefix else name)
                out.append((name, data, int(pending.get("size", size))))
            if kind not in (b"x", b"L", b"g"):
                pending = {}
    finally:
        os.close(fd)
    return out


def _tar_members_slow(path: str) -> List[Tuple[str, int, int]]:
    with tarfile.open(path, mode="r:") as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def scan_shard(path: str) -> List[Tuple[str, int, int, int, int]]:
    """The samples of one tar in order: (key, image offset, image bytes, label offset, label bytes)."""
    members: Dict[str, Dict[str, Tuple[int, int]]] = {}
    try:
        for name, offset, size in _tar_members(path):
            key, ext = _key_and_ext(name)
            members.setdefault(key, {})[ext] = (offset, size)
    except (tarfile.TarError, OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read shard {path} ({type(e).__name__}: {e}): it is not an uncompressed tar or it "
                        f"is truncated; rewrite it (python -m engine.data shard IMAGEFOLDER OUT)") from None
    out = []
    for key, parts in members.items():
        image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if image is None or "cls" not in parts:
            raise DataError(f"shard {path}: sample {key!r} has {sorted(parts)}; the layout is KEY.jpg (or KEY.png) "
                            f"with KEY.cls: rewrite the shards with python -m engine.data shard")
        out.append((key, *image, *parts["cls"]))
    return out


class ShardDataset(Dataset):
    """The samples of a folder of WebDataset shards, in shard order, as ``(transform(image), label)``.

    ``shard_sizes`` (samples per shard) come from ``shards.json``, or from reading every tar's headers when
    the folder has none (shards written by another tool; labels are then the ``.cls`` integers). A sample
    that fails to decode is replaced by the next one, with a warning, and counted (as in an ImageFolder).
    """

    def __init__(self, root: str, transform=None):
        self.root, self.transform = str(root), transform
        self._fds: Dict[str, int] = {}
        self._pid = os.getpid()
        tars = sorted(n for n in os.listdir(self.root) if n.endswith(".tar"))
        index_path = os.path.join(self.root, INDEX)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                index = json.load(f)
            self.shards = [s["name"] for s in index["shards"]]
            self.shard_sizes = [int(s["samples"]) for s in index["shards"]]
            self.classes = list(index["classes"])
            missing = sorted(set(self.shards) - set(tars))
            if missing:
                raise DataError(f"{self.root}: {INDEX} lists {len(missing)} shards that are not there (e.g. "
                                f"{missing[0]}): copy them, or rewrite the folder")
        elif tars:
            self.shards = tars
            tables = [scan_shard(os.path.join(self.root, n)) for n in tars]
            self.shard_sizes = [len(t) for t in tables]
            labels = {self._read_label(n, t[3], t[4]) for n, table in zip(tars, tables) for t in table}
            self.classes = [str(k) for k in range(max(labels) + 1)] if labels else []
            self._tables = dict(zip(tars, tables))
        else:
            raise DataError(f"{self.root} holds no .tar shards: write them with python -m engine.data shard "
                            f"IMAGEFOLDER {self.root}")
        if not sum(self.shard_sizes):
            raise DataError(f"the shards under {self.root} hold no samples")
        self._starts = [0]
        for n in self.shard_sizes:
            self._starts.append(self._starts[-1] + n)
        self._tables: Dict[str, list] = getattr(self, "_tables", {})
        self._decode_failures = torch.zeros(1, dtype=torch.int64).share_memory_()

    # ---- what the engine asks of a data set -----------------------------------------------------------
    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_decode_failures(self) -> int:
        return int(self._decode_failures.item())

    def shard_of(self, index: int) -> Tuple[int, int]:
        """(shard, position in it) of sample ``index``."""
        s = bisect.bisect_right(self._starts, index) - 1
        return s, index - self._starts[s]

    def shard_indices(self, shard: int) -> range:
        return range(self._starts[shard], self._starts[shard + 1])

    def verify(self) -> int:
        """Nothing to drop up front: the shard writer left unreadable images out (a sample that still fails to
        decode is substituted and counted when it is read). 0 dropped."""
        return 0

    def summary(self) -> str:
        return (f"{len(self)} images in {self.num_classes} classes in {len(self.shards)} shards under {self.root}; "
                f"{self.num_decode_failures} decode failures substituted")

    # ---- reading one sample ---------------------------------------------------------------------------
    def _fd(self, name: str) -> int:
        if self._pid != os.getpid():  # a loader worker: its own descriptors (pread needs no shared offset anyway)
            self._fds, self._pid = {}, os.getpid()
        if name not in self._fds:
            self._fds[name] = os.open(os.path.join(self.root, name), os.O_RDONLY)
        return self._fds[name]

    def _read_label(self, name: str, offset: int, size: int) -> int:
        raw = os.pread(self._fd(name), size, offset)
        try:
            return int(raw.decode().strip())
        except ValueError:
            raise DataError(f"shard {self.root}/{name}: a .cls member holds {raw[:20]!r}, not a class index") from None

    def _table(self, name: str) -> list:
        if name not in self._tables:
            table = scan_shard(os.path.join(self.root, name))
            expected = self.shard_sizes[self.shards.index(name)]
            if len(table) != expected:
                raise DataError(f"shard {self.root}/{name} holds {len(table)} samples, {INDEX} says {expected}: the "
                                f"folder was changed after it was written; rewrite it")
            self._tables[name] = table
        return self._tables[name]

    def load(self, index: int) -> Tuple[Image.Image, int]:
        """Sample ``index`` decoded: (RGB PIL image, label)."""
        s, j = self.shard_of(index)
        name = self.shards[s]
        _, img_off, img_size, cls_off, cls_size = self._table(name)[j]
        data = os.pread(self._fd(name), img_size, img_off)
        label = self._read_label(name, cls_off, cls_size)
        with Image.open(io.BytesIO(data)) as im:
            return to_rgb8(im), label

    def __getitem__(self, index: int):
        n = len(self)
        for attempt in range(min(n, _MAX_SUBSTITUTIONS)):
            try:
                img, label = self.load((index + attempt) % n)
            except DataError:
                raise
            except Exception as e:
                self._decode_failures += 1
                log.warning("cannot decode sample %d of %s (%s: %s): using the next one instead", index + attempt,
                            self.root, type(e).__name__, e)
                continue
            return (self.transform(img) if self.transform is not None else img), label
        raise DataError(f"{min(n, _MAX_SUBSTITUTIONS)} consecutive samples from index {index} under {self.root} "
                        f"cannot be decoded: rewrite the shards")

    def __getstate__(self):  # loader workers (spawn) and pickling: no descriptors travel
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state


class ShardSampler(ResumableSampler):
    """A :class:`ResumableSampler` over a :class:`ShardDataset` that gives each rank a run of whole shards.

    Each epoch: the shards in an order seeded by (seed, epoch), their samples laid end to end and cut into
    ``world_size`` equal runs of ``len(dataset) // world_size``: rank r reads run r, whole shards but for at most
    one at each end (shared with the neighbouring rank, a disjoint part of it each). The rank's samples are then
    shuffled (seeded by seed, epoch, rank). Every rank gets the same count, no sample twice; deterministic in
    (seed, epoch, rank, world size), so ``skip_batches`` resumes exactly on the same number of ranks, whatever
    the number of loader workers.
    """

    def __init__(self, dataset: ShardDataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self.num_samples = len(dataset) // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas
        if self.num_samples < 1:
            raise DataError(f"{dataset.root} holds {len(dataset)} samples for {self.num_replicas} ranks: need at "
                            f"least one per rank")

    def shard_order(self, epoch: int) -> List[int]:
        n = len(self.dataset.shard_sizes)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def epoch_indices(self) -> List[int]:
        run = range(self.rank * self.num_samples, (self.rank + 1) * self.num_samples)
        laid, mine = 0, []
        for s in self.shard_order(self.epoch):  # the shards end to end; keep the part that falls in this rank's run
            shard = self.dataset.shard_indices(s)
            lo, hi = max(run.start - laid, 0), min(run.stop - laid, len(shard))
            mine.extend(shard[lo:hi] if lo < hi else ())
            laid += len(shard)
            if laid >= run.stop:
                break
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
            mine = [mine[k] for k in torch.randperm(len(mine), generator=g).tolist()]
        # a resume: every rank consumed the same share of its run. Exact on the same number of ranks; on another
        # number the runs are cut differently, so the rest of that epoch is approximate (docs/cluster_resume.md)
        return mine[self._skip // self.num_replicas:]

    def __len__(self) -> int:
        return self.num_samples - self._skip // self.num_replicas
