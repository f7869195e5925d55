"""WebDataset tar shards: ``python -m engine.data shard`` writes the standard layout (read back here by the
webdataset library itself), ``--data SHARDS`` yields the folder's images, ranks read disjoint whole shards,
loader workers split the batches, and an epoch resumes exactly, whatever the number of workers."""
import io
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from engine.cli import data_main
from engine.config import DataConfig, ViewConfig
from engine.data import DataError, ImageFolderDataset, SharedCrop, build_dataset, build_loader
from engine.data.shards import ShardDataset, ShardSampler, scan_shard
from tests.helpers import TINY, tiny_config

CLASSES = ("cat", "dog", "eel")
PER_CLASS = 9


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder of three classes: JPEG, PNG and BMP files of varied sizes, one corrupt JPEG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(PER_CLASS):
            fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp")][i % 3]
            a = rng.integers(0, 256, (24 + i, 40 - i, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{c}_{i}.{ext}", format=fmt)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "train"
    assert data_main(["shard", str(folder), str(out), "--samples-per-shard", "4"]) == 0
    return out


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def folder_images(folder):
    """{(label, decoded pixels as bytes)} of every readable file, read with PIL directly."""
    out = []
    for k, c in enumerate(CLASSES):
        for name in sorted(os.listdir(folder / c)):
            if name != "broken.jpg":
                out.append((k, decoded((folder / c / name).read_bytes()).tobytes()))
    return sorted(out)


def test_shards_are_in_webdatasets_standard_layout(folder, shards):
    index = json.loads((shards / "shards.json").read_text())
    assert index["classes"] == list(CLASSES) and index["unreadable_left_out"] == 1
    assert [s["samples"] for s in index["shards"]] == [4] * 6 + [3]  # 27 readable images, 4 per shard
    # the webdataset library's own reader: KEY.jpg or KEY.png with KEY.cls, nothing else
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert all(set(s) - {"__key__", "__url__", "__local_path__"} in ({"jpg", "cls"}, {"png", "cls"}) for s in samples)
    assert len({s["__key__"] for s in samples}) == len(samples) == 27
    got = sorted((int(s["cls"].decode()), decoded(s.get("jpg", s.get("png"))).tobytes()) for s in samples)
    assert got == folder_images(folder)  # every readable image, with its class, pixel for pixel
    jpegs = {s["jpg"] for s in samples if "jpg" in s}  # JPEGs are copied byte for byte, not re-encoded
    assert jpegs == {(folder / c / f"{c}_{i}.jpg").read_bytes() for c in CLASSES for i in range(0, PER_CLASS, 3)}
    # written in a shuffled order: the first shard does not hold one class only
    assert len({int(s["cls"].decode()) for s in samples[:4]}) > 1


def test_shard_folder_as_data_yields_the_folders_images(folder, shards):
    ds = build_dataset(DataConfig(dataset=str(shards)), ViewConfig(), "train", transform=lambda im: im)
    assert isinstance(ds, ShardDataset) and len(ds) == 27 and ds.classes == list(CLASSES)
    got = sorted((label, np.asarray(img).tobytes()) for img, label in (ds[i] for i in range(len(ds))))
    assert got == folder_images(folder)
    ref = ImageFolderDataset(folder)
    assert ds.num_classes == ref.num_classes
    assert "27 images in 3 classes in 7 shards" in ds.summary()


def test_shards_without_an_index_are_read_from_their_headers(shards, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for p in shards.glob("*.tar"):
        (foreign / p.name).write_bytes(p.read_bytes())
    ds, ref = ShardDataset(str(foreign)), ShardDataset(str(shards))
    assert ds.shard_sizes == ref.shard_sizes and ds.classes == ["0", "1", "2"]
    assert all(ds[i][1] == ref[i][1] for i in range(len(ds)))


def test_tar_headers_are_read_as_tarfile_reads_them(shards, tmp_path):
    import tarfile

    from engine.data.shards import _tar_members

    def reference(path):
        with tarfile.open(path) as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]

    for p in sorted(shards.glob("*.tar")):
        assert _tar_members(str(p)) == reference(p)
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):  # long names: extension headers
        path = tmp_path / f"long_{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name in ("a" * 40 + "/" + "b" * 90 + ".cls", "short.cls", "dir/" + "x" * 95 + ".jpg"):
                data = name.encode()[:7]
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        assert _tar_members(str(path)) == reference(path)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DataError, match="not an uncompressed tar"):
        scan_shard(str(tmp_path / "junk.tar"))


def rank_indices(ds, epoch, world):
    out = []
    for r in range(world):
        s = ShardSampler(ds, num_replicas=world, rank=r, shuffle=True, seed=7, drop_last=True)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_read_disjoint_runs_of_whole_shards_an_equal_share(shards, world):
    ds = ShardDataset(str(shards))
    for epoch in (0, 1):
        per_rank = rank_indices(ds, epoch, world)
        assert all(len(idx) == 27 // world for idx in per_rank)  # the same number of samples on every rank
        assert len(set().union(*map(set, per_rank))) == world * (27 // world)  # no sample on two ranks or twice
        for idx in per_rank:  # whole shards, but for at most one at each end of the rank's run
            counts = {}
            for i in idx:
                s = ds.shard_of(i)[0]  # read back from the sample's index, not from the sampler
                counts[s] = counts.get(s, 0) + 1
            assert sum(n < ds.shard_sizes[s] for s, n in counts.items()) <= 2
            assert len(counts) <= len(idx) // 3 + 2  # shards of 3-4 samples: few shards per rank, not all of them
    if world > 1:  # each epoch deals the shards anew
        assert rank_indices(ds, 0, world)[0] != rank_indices(ds, 1, world)[0]


def batches(shards, workers, epoch=1, skip=0, rank=0, world=1):
    ds = ShardDataset(str(shards), transform=SharedCrop(16, ViewConfig()))
    loader = build_loader(ds, 3, workers, shuffle=True, drop_last=True, seed=5, rank=rank, world_size=world,
                          seeded_crops=True)
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip_batches(skip)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_workers_split_the_batches_and_resume_exactly(shards):
    full = batches(shards, workers=0)
    assert len(full) == 27 // 3
    two = batches(shards, workers=2)  # two workers share the batches: the same stream, crops included
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, two)) and len(two) == len(full)
    resumed = batches(shards, workers=2, skip=3)  # a run resumed 3 batches into the epoch, with other workers
    assert len(resumed) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], resumed))


def test_shard_command_refuses_bad_input_in_one_line(folder, shards, tmp_path, capsys):
    assert data_main(["shard", str(folder), str(shards)]) == 2  # never overwrites
    assert "not an empty folder" in capsys.readouterr().err
    assert data_main(["shard", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "shards.json").write_text((shards / "shards.json").read_text())
    with pytest.raises(DataError, match="not there"):
        ShardDataset(str(broken))


@pytest.mark.slow
def test_pretraining_on_shards_resumes_bit_exactly(shards, tmp_path, monkeypatch):
    """A run stopped after its step-2 checkpoint and rerun ends with the uninterrupted run's losses and weights
    (one loader worker: the shard stream is resumed in the worker, crops included)."""
    from engine import run as run_lib
    from engine.pretrain import pretrain

    extra = [f"data.dataset='{shards}'", "data.batch_size=4", "data.num_workers=1", "data.img_size=32",
             "train.ckpt_every=2", "train.log_every=1", "train.eval_every=0"]
    assert "data.batch_size=16" in TINY
    ref = pretrain(tiny_config(tmp_path / "ref", 5, extra))

    real = run_lib.Run.optimizer_step

    def stop_at_step_3(self, engine, task, step, *args, **kwargs):
        if step == 3:
            raise KeyboardInterrupt  # as a kill would, after the step-2 checkpoint
        return real(self, engine, task, step, *args, **kwargs)

    monkeypatch.setattr(run_lib.Run, "optimizer_step", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(tmp_path / "cut", 5, extra))
    monkeypatch.setattr(run_lib.Run, "optimizer_step", real)
    again = pretrain(tiny_config(tmp_path / "cut", 5, extra))
    assert again.final_loss == ref.final_loss and again.step == ref.step == 5
    a = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    for part in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
