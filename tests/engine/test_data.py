"""Data: the embedded set (deterministic, labelled, separable), folders and their errors, the shared
crop, the loader's sharding."""
import io
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import DataConfig, ViewConfig
from engine.data import (SHAPE_CLASSES, DataError, EmbeddedShapes, EvalTransform, ImageFolderDataset, SharedCrop,
                         build_dataset, build_loader, to_float_images)


def stack(ds, n=None):
    n = len(ds) if n is None else n
    return np.stack([ds.array(i) for i in range(n)]), np.array([ds.label(i) for i in range(n)])


# ----------------------------------------------------------------------------------------------------
# The embedded set
# ----------------------------------------------------------------------------------------------------
def test_embedded_is_deterministic_labelled_and_balanced():
    a = EmbeddedShapes(num_classes=10, per_class=6, size=48, split="train", seed=0)
    b = EmbeddedShapes(num_classes=10, per_class=6, size=48, split="train", seed=0)
    assert len(a) == 60 and a.classes == list(SHAPE_CLASSES)
    xa, ya = stack(a)
    xb, yb = stack(b)
    assert xa.dtype == np.uint8 and xa.shape == (60, 48, 48, 3)
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # out-of-order access gives the same image (generated per index, no hidden state)
    assert np.array_equal(a.array(37), xa[37])
    assert np.bincount(ya).tolist() == [6] * 10 and a.targets == ya.tolist()
    # another seed, or the val split, is another image stream
    assert not np.array_equal(EmbeddedShapes(10, 6, 48, "train", seed=1).array(3), xa[3])
    val = EmbeddedShapes(10, 6, 48, "val", seed=0)
    assert not np.array_equal(val.array(3), xa[3]) and val.label(3) == a.label(3)
    img, label = a[5]
    assert isinstance(img, Image.Image) and img.size == (48, 48) and img.mode == "RGB" and label == 5


def test_embedded_generation_is_fast():
    ds = EmbeddedShapes(10, 100, 96)
    t = time.perf_counter()
    for i in range(len(ds)):
        ds.array(i)
    # about 0.5 ms per image on one core; generous for a loaded CI machine
    assert time.perf_counter() - t < 5.0


def _fft_features(x):
    """Plain translation- and polarity-invariant features: log |FFT| of the standardised 24x24 gray image."""
    gray = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # [N, S, S]
    n, s, _ = gray.shape
    k = 24
    gray = gray[:, : s // k * k, : s // k * k].reshape(n, k, s // k, k, s // k).mean(axis=(2, 4))
    gray = (gray - gray.mean(axis=(1, 2), keepdims=True)) / (gray.std(axis=(1, 2), keepdims=True) + 1e-8)
    return np.log1p(np.abs(np.fft.fft2(gray))).reshape(n, -1)


def _nearest_class_mean(train_x, train_y, test_x, classes):
    means = np.stack([train_x[train_y == c].mean(axis=0) for c in range(classes)])
    return ((test_x[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1)


def test_embedded_classes_are_separable_by_shape_not_colour():
    train = EmbeddedShapes(10, 30, 72, "train")
    val = EmbeddedShapes(10, 12, 72, "val")
    xt, yt = stack(train)
    xv, yv = stack(val)
    # shape: a nearest-class-mean classifier on |FFT| of the gray image, far above chance (0.10)
    pred = _nearest_class_mean(_fft_features(xt), yt, _fft_features(xv), 10)
    acc = (pred == yv).mean()
    assert acc > 0.5, acc
    # colour: the mean RGB of an image says next to nothing about its class
    colour = lambda x: x.reshape(len(x), -1, 3).mean(axis=1)  # noqa: E731
    acc_colour = (_nearest_class_mean(colour(xt), yt, colour(xv), 10) == yv).mean()
    assert acc_colour < 0.3, acc_colour
    # and colour varies within every class
    for c in range(10):
        assert colour(xt[yt == c]).std(axis=0).min() > 20


def test_embedded_argument_errors():
    with pytest.raises(DataError, match="embedded_classes"):
        EmbeddedShapes(11, 5, 32)
    with pytest.raises(DataError, match="split"):
        EmbeddedShapes(10, 5, 32, split="test")


# ----------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------
def _write_image(path, size=(40, 30), mode="RGB", seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def _truncated_jpeg(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header fine, data cut: verify() passes
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    _write_image(root / "cat" / "a.png", seed=1)
    _write_image(root / "cat" / "b.JPG", seed=2, fmt="JPEG")
    _write_image(root / "cat" / "nested" / "c.png", mode="L", seed=3)  # grayscale, in a subfolder
    _write_image(root / "dog" / "d.png", mode="RGBA", seed=4)
    _write_image(root / "dog" / "e.bmp", size=(17, 50), seed=5)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(500))  # random bytes
    (root / "empty_class").mkdir()
    return root


def test_folder_classes_labels_and_ignored_files(folder):
    ds = ImageFolderDataset(folder)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2  # a subfolder with no images is no class
    assert len(ds) == 6 and ds.targets.count(0) == 3 and ds.targets.count(1) == 3
    assert ds.num_ignored == 1 and ds.ignored_files[0].endswith("notes.txt")
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 0
    assert "2 classes" in ds.summary() and "1 non-image files ignored" in ds.summary()


def test_folder_verify_drops_and_counts_corrupt_files(folder):
    _truncated_jpeg(folder / "dog" / "f.jpg")
    ds = ImageFolderDataset(folder, transform=SharedCrop(16, ViewConfig()))
    assert len(ds) == 7
    assert ds.verify() == 1  # the random-bytes .jpg; the truncated JPEG has a valid header
    assert len(ds) == 6 and ds.num_bad == 1
    assert not any(p.endswith("broken.jpg") for p, _ in ds.samples)


def test_folder_decode_failure_is_substituted_and_counted(folder, caplog):
    ds = ImageFolderDataset(folder, transform=SharedCrop(16, ViewConfig()))
    broken = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.jpg"))
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        img, label = ds[broken]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
    assert label == ds.samples[(broken + 1) % len(ds)][1]  # the next sample stands in
    assert ds.num_decode_failures == 1
    assert any("cannot decode" in r.message and "broken.jpg" in r.message for r in caplog.records)


def test_decode_failures_counted_across_loader_workers(folder):
    _truncated_jpeg(folder / "dog" / "f.jpg")
    ds = ImageFolderDataset(folder, transform=SharedCrop(16, ViewConfig()))
    loader = build_loader(ds, batch_size=2, num_workers=2, shuffle=False, drop_last=False, seed=0)
    n = sum(len(labels) for _, labels in loader)
    assert n == len(ds) == 7
    assert ds.num_decode_failures == 2  # broken.jpg and the truncated f.jpg, each loaded once


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        _write_image(tmp_path / f"img{i}.png", seed=i)
    ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 3 and ds.num_classes == 1 and set(ds.targets) == {0}


def test_folder_errors_name_problem_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"does not exist: .*missing.*pass --data path/to/train"):
        ImageFolderDataset(tmp_path / "missing")
    f = _write_image(tmp_path / "one.png")
    with pytest.raises(DataError, match=r"is a file, not a folder: .*one\.png.*--data"):
        ImageFolderDataset(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"is empty, no images in it: .*empty.*--data"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images with known extensions.*1 other files ignored.*readme\.txt"):
        ImageFolderDataset(tmp_path / "texts")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg at all")
    ds = ImageFolderDataset(tmp_path / "bad")
    with pytest.raises(DataError, match="none of the 1 image files"):
        ds.verify()
    with pytest.raises(DataError, match="cannot be decoded"):
        ImageFolderDataset(tmp_path / "bad")[0]


# ----------------------------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------------------------
def test_shared_crop_shape_dtype_and_config():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = SharedCrop(32, ViewConfig())(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and out.is_contiguous()
    # uint8 tensor and array inputs too
    assert SharedCrop(24, ViewConfig())(torch.from_numpy(np.array(img)).permute(2, 0, 1)).shape == (3, 24, 24)
    assert SharedCrop(24, ViewConfig())(np.asarray(img)).shape == (3, 24, 24)
    # with the whole image as the crop and p=1 the result is the flipped image
    square = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    flip = SharedCrop(20, ViewConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=1.0))(square)
    assert torch.equal(flip, torch.from_numpy(np.asarray(square)[:, ::-1].copy()).permute(2, 0, 1))
    ev = EvalTransform(32, 0.875)(img)
    assert ev.shape == (3, 32, 32) and ev.dtype == torch.uint8
    with pytest.raises(DataError, match="crop_fraction"):
        EvalTransform(32, 1.5)


def test_build_dataset_embedded_and_folder(folder):
    dcfg = DataConfig(img_size=32, embedded_per_class=8, embedded_native_size=40)
    train = build_dataset(dcfg, ViewConfig(), "train")
    val = build_dataset(dcfg, ViewConfig(), "val")
    assert len(train) == 80 and len(val) == 20  # val: a quarter per class
    img, label = train[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and label == 3
    assert isinstance(val.transform, EvalTransform) and isinstance(train.transform, SharedCrop)
    assert isinstance(build_dataset(dcfg, ViewConfig(), "train", train=False).transform, EvalTransform)
    # eval transform is deterministic
    assert torch.equal(val[2][0], val[2][0])
    ds = build_dataset(dcfg, ViewConfig(), "train", path=folder)
    assert isinstance(ds, ImageFolderDataset) and ds[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(DataConfig(dataset=str(folder / "nope")), ViewConfig())
    with pytest.raises(DataError, match="split"):
        build_dataset(dcfg, ViewConfig(), "test")


# ----------------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------------
class _Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i), 0


def _epoch(loader):
    return torch.cat([x for x, _ in loader]).tolist()


def test_distributed_sampler_splits_without_overlap():
    ds = _Indices(20)
    ranks = [build_loader(ds, 3, 0, shuffle=True, drop_last=False, seed=5, rank=r, world_size=2) for r in range(2)]
    a, b = _epoch(ranks[0]), _epoch(ranks[1])
    assert len(a) == len(b) == 10 and not set(a) & set(b) and set(a) | set(b) == set(range(20))
    # seeded: the same seed gives the same shard; set_epoch reshuffles
    again = build_loader(ds, 3, 0, shuffle=True, drop_last=False, seed=5, rank=0, world_size=2)
    assert _epoch(again) == a
    for loader in (again, ranks[1]):
        loader.sampler.set_epoch(1)
    a1, b1 = _epoch(again), _epoch(ranks[1])
    assert a1 != a and not set(a1) & set(b1) and set(a1) | set(b1) == set(range(20))
    # uneven: drop_last keeps equal, disjoint shards
    shards = [_epoch(build_loader(_Indices(21), 2, 0, shuffle=False, drop_last=True, seed=0, rank=r, world_size=4))
              for r in range(4)]
    assert all(len(s) == 4 for s in shards)
    assert len(set().union(*map(set, shards))) == 16


def test_loader_settings_and_errors():
    loader = build_loader(_Indices(10), 4, 0, shuffle=False, drop_last=True, seed=0)
    assert _epoch(loader) == list(range(8)) and len(loader) == 2
    assert loader.pin_memory == torch.cuda.is_available()
    with pytest.raises(DataError, match="fewer than one batch"):
        build_loader(_Indices(3), 4, 0, shuffle=True, drop_last=True, seed=0)
    with pytest.raises(DataError, match="rank"):
        build_loader(_Indices(3), 1, 0, shuffle=True, drop_last=False, seed=0, rank=2, world_size=2)


def test_embedded_loader_batches_and_float_conversion():
    dcfg = DataConfig(img_size=24, embedded_per_class=2, embedded_native_size=32)
    loader = build_loader(build_dataset(dcfg, ViewConfig()), 8, 0, shuffle=True, drop_last=True, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 24, 24) and images.dtype == torch.uint8 and labels.shape == (8,)
    x = to_float_images(images, "cpu")
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, images.float() / 255)


def test_resumable_sampler_skips_the_batches_already_seen():
    from engine.data import build_loader

    ds = list(range(40))
    loader = build_loader(ds, batch_size=4, num_workers=0, shuffle=True, drop_last=True, seed=3)
    loader.sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    loader.sampler.set_epoch(2)
    loader.sampler.skip_batches(3)
    resumed = [b.tolist() for b in loader]
    assert resumed == full[3:]  # the rest of the same epoch, in the same order
    loader.sampler.set_epoch(2)
    assert [b.tolist() for b in loader] == full  # the skip applies to one epoch only


def test_16_bit_images_are_rescaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from engine.data import ImageFolderDataset

    ramp = (np.arange(64, dtype=np.float64).reshape(8, 8) / 63 * 65535).round().astype(np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(ramp).save(tmp_path / "a" / "ramp16.png")
    img, _ = ImageFolderDataset(tmp_path)[0]
    got = np.asarray(img)[..., 0].astype(np.float64)
    assert np.abs(got - ramp / 65535 * 255).max() <= 0.5 + 1e-9  # the full 16-bit range maps onto 0..255
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 32


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_resumed_epoch_on_another_rank_count_neither_repeats_nor_skips(before, after):
    """k steps of G samples on ``before`` ranks, then the rest of the epoch on ``after`` ranks: together exactly
    the epoch's order (DistributedSampler's permutation on one replica), each sample once."""
    from torch.utils.data import DistributedSampler

    from engine.data import ResumableSampler

    n, G, k, epoch = 101, 12, 3, 4
    reference = DistributedSampler(list(range(n)), num_replicas=1, rank=0, shuffle=True, seed=9, drop_last=True)
    reference.set_epoch(epoch)
    order = list(reference)

    def ranks(world, skip=0):
        out = []
        for r in range(world):
            s = ResumableSampler(list(range(n)), num_replicas=world, rank=r, shuffle=True, seed=9, drop_last=True)
            s.set_epoch(epoch)
            s.skip_samples(skip)
            out.append(list(s))
        return out

    for world in (before, after):  # with nothing skipped, each rank's share is DistributedSampler's
        for r, got in enumerate(ranks(world)):
            ds = DistributedSampler(list(range(n)), num_replicas=world, rank=r, shuffle=True, seed=9, drop_last=True)
            ds.set_epoch(epoch)
            assert got == list(ds)
    seen = [i for share in ranks(before) for i in share[:k * G // before]]  # each rank's first k steps
    rest = ranks(after, skip=k * G)
    assert sorted(seen) == sorted(order[:k * G])
    resumed = [i for step in zip(*rest) for i in step]  # the remaining positions, dealt round-robin
    assert resumed == order[k * G:k * G + len(resumed)]
    assert len(resumed) == (n - k * G) // after * after and not set(seen) & set(resumed)
