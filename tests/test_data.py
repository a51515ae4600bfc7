"""Dataset readers on files generated here in the exact on-disk formats, splits, augmentations, loader."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.config import AugmentConfig, DataConfig
from kdkit.data import Augment, BatchLoader, load_data, per_class
from kdkit.data.augment import random_crop
from kdkit.data.idx import parse_idx
from kdkit.errors import DataError

from .conftest import MNIST, idx_bytes

# ---------------------------------------------------------------------------------------- writers




def write_mnist(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, sub: str = "") -> dict:
    rng = np.random.default_rng(0)
    d = root / sub if sub else root
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, a in arrays.items():
        raw = idx_bytes(a)
        if gz:
            (d / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (d / name).write_bytes(raw)
    return arrays


def write_cifar(root: Path, kind: str = "cifar10", n: int = 20) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        first = None
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            first = data if first is None else first
            with open(d / name, "wb") as f:
                pickle.dump({b"batch_label": b"x", b"labels": [i % 10 for i in range(n)], b"data": data,
                             b"filenames": [b"a.png"] * n}, f, protocol=2)
        with open(d / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}, f, protocol=2)
        return first
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    first = None
    for name in ("train", "test"):
        data = rng.integers(0, 256, (n * 5, 3072), dtype=np.uint8)
        first = data if first is None else first
        with open(d / name, "wb") as f:
            pickle.dump({"fine_labels": [i % 100 for i in range(n * 5)], "coarse_labels": [0] * (n * 5),
                         "data": data}, f, protocol=3)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)]}, f)
    return first


def write_images(folder: Path, classes: int = 3, per: int = 4, size: tuple[int, int] = (12, 10), mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(2)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"class{c}" / f"{i}.png")


# ---------------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
@pytest.mark.parametrize("gz,sub", [(True, ""), (False, ""), (True, "raw")])
def test_idx_datasets_read_generated_files(tmp_path, name, gz, sub):
    arrays = write_mnist(tmp_path, gz=gz, sub=sub)
    b = load_data(DataConfig(name=name, root=str(tmp_path), val_split=0, normalize=False))
    assert b.info.input_shape == (1, 28, 28) and b.info.num_classes == 10
    assert torch.equal(b.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(b.test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)))


def test_idx_truncated_corrupt_and_wrong_files(tmp_path):
    arrays = write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(idx_bytes(arrays["train-images-idx3-ubyte"])[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated.*download it again"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))
    p.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match="not an idx uint8 file"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))
    p.unlink()
    packed = gzip.compress(idx_bytes(arrays["train-images-idx3-ubyte"]))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(packed[:50])
    with pytest.raises(DataError, match=r"\.gz: cannot read it.*corrupt or truncated"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))
    with pytest.raises(DataError, match="are images and labels swapped"):
        parse_idx(idx_bytes(np.zeros(3, np.uint8)), "labels-as-images", 3)


def test_idx_missing_files_and_folder(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\] not found in .*put the four original idx"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))
    with pytest.raises(DataError, match="is not a folder"):
        load_data(DataConfig(name="mnist", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="needs data.root"):
        load_data(DataConfig(name="kmnist"))


def test_image_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(DataError, match="holds 60 images but .* holds 7 labels"):
        load_data(DataConfig(name="mnist", root=str(tmp_path)))


@pytest.mark.skipif(not MNIST.is_dir(), reason="shared MNIST files not present")
def test_real_mnist_files():
    b = load_data(DataConfig(name="mnist", root=str(MNIST), val_split=5000))
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)
    assert b.info.mean[0] == pytest.approx(0.1307, abs=1e-3) and b.info.std[0] == pytest.approx(0.3081, abs=1e-3)


# ---------------------------------------------------------------------------------------- cifar


def test_cifar10_batches_and_pixel_layout(tmp_path):
    first = write_cifar(tmp_path, "cifar10")
    b = load_data(DataConfig(name="cifar10", root=str(tmp_path), val_split=0, normalize=False))
    assert len(b.train) == 100 and len(b.test) == 20 and b.info.input_shape == (3, 32, 32)
    assert b.info.classes[3] == "c3"
    # rows are 1024 red, 1024 green, 1024 blue values, each row-major 32x32
    assert torch.equal(b.train.images[0, 1].flatten(), torch.from_numpy(first[0, 1024:2048]))


def test_cifar100_and_archive_extraction(tmp_path):
    src = tmp_path / "src"
    write_cifar(src, "cifar100")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    b = load_data(DataConfig(name="cifar100", root=str(root), val_split=0))
    assert b.info.num_classes == 100 and b.info.classes[5] == "f5" and len(b.train) == 100


def test_cifar_corrupt_truncated_and_malicious(tmp_path):
    write_cifar(tmp_path, "cifar10")
    d = tmp_path / "cifar-10-batches-py"
    raw = (d / "data_batch_2").read_bytes()
    (d / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR pickle batch"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DataError, match=r"would load \w+\.system, which no CIFAR batch holds; refusing"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path)))
    with pytest.raises(DataError, match="no cifar-100-python/"):
        load_data(DataConfig(name="cifar100", root=str(tmp_path)))


# ---------------------------------------------------------------------------------------- imagefolder


def test_imagefolder_train_test_layout(tmp_path):
    write_images(tmp_path / "train", per=5)
    write_images(tmp_path / "test", per=2)
    b = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_split=0))
    assert b.info.classes == ["class0", "class1", "class2"] and b.info.input_shape == (3, 10, 12)
    assert len(b.train) == 15 and len(b.test) == 6
    g = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_split=0, channels=1, image_size=8))
    assert g.info.input_shape == (1, 8, 8)


def test_imagefolder_flat_layout_carves_test(tmp_path):
    write_images(tmp_path, per=10, mode="L")
    b = load_data(DataConfig(name="imagefolder", root=str(tmp_path), val_split=0, test_split=0.2))
    assert len(b.test) == 6 and len(b.train) == 24 and b.info.in_channels == 1
    assert sorted(b.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_imagefolder_errors(tmp_path):
    write_images(tmp_path / "a", per=2)
    write_images(tmp_path / "a", classes=1, per=1, size=(20, 20))
    with pytest.raises(DataError, match="set data.image_size"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path / "a")))
    write_images(tmp_path / "b", per=2)
    (tmp_path / "b" / "class1" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path / "b")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))


# ---------------------------------------------------------------------------------------- splits


def test_digits_default_dataset():
    b = load_data(DataConfig())
    assert len(b.train) + len(b.val) + len(b.test) == 1797
    assert b.info.input_shape == (1, 8, 8) and b.train.images.max() == 255
    assert set(b.test.labels.tolist()) == set(range(10))


def test_validation_split_is_seeded_disjoint_and_fixed_across_training_seeds():
    a = load_data(DataConfig(val_split=0.2, split_seed=0))
    b = load_data(DataConfig(val_split=0.2, split_seed=0))
    c = load_data(DataConfig(val_split=0.2, split_seed=1))
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)
    n = len(a.train) + len(a.val)
    assert len(a.val) == round(0.2 * n)
    # no training image is also a validation image
    train_rows = {r.tobytes() for r in a.train.images.numpy()}
    assert sum(r.tobytes() in train_rows for r in a.val.images.numpy()) <= 5  # digits has a few exact duplicates
    assert len(load_data(DataConfig(val_split=100)).val) == 100


def test_train_subset_and_nested_few_shot_views():
    sub = load_data(DataConfig(train_subset=7))
    assert len(sub.train) == 70 and torch.bincount(sub.train.labels).tolist() == [7] * 10
    views = {n: load_data(DataConfig(shots_per_class=n)).fewshot for n in (1, 5, 10)}
    assert all(v.labels is None for v in views.values())
    rows = {n: {r.tobytes() for r in v.images.numpy()} for n, v in views.items()}
    assert rows[1] <= rows[5] <= rows[10] and len(views[10]) == 100
    labels = load_data(DataConfig()).train.labels
    for a, b in ((1, 5), (5, 10)):
        assert set(per_class(labels, a, 3, "x").tolist()) <= set(per_class(labels, b, 3, "x").tolist())
    with pytest.raises(DataError, match="shots_per_class=500 but class 0 has only"):
        load_data(DataConfig(shots_per_class=500))


# ---------------------------------------------------------------------------------------- augment + loader


def test_random_crop_equals_slicing_the_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    offsets = torch.tensor([[0, 4], [2, 1]])
    out = random_crop(x, 2, offsets)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    assert torch.equal(out[0], padded[0, :, 0:5, 4:9])
    assert torch.equal(out[1], padded[1, :, 2:7, 1:6])
    centre = random_crop(x, 2, torch.tensor([[2, 2], [2, 2]]))
    assert torch.equal(centre, x)


def test_flip_and_sampling():
    aug = Augment(crop_padding=0, hflip=True)
    x = torch.randn(64, 1, 4, 4)
    p = aug.sample(64, torch.Generator().manual_seed(0))
    y = aug.apply(x, p)
    assert torch.equal(y[p["flip"]], x[p["flip"]].flip(3)) and torch.equal(y[~p["flip"]], x[~p["flip"]])
    assert 10 < int(p["flip"].sum()) < 54


def _loader(world: int = 1, rank: int = 0, **kw):
    b = load_data(DataConfig(image_size=12, augment=AugmentConfig(crop_padding=2, hflip=True)))
    return BatchLoader(b.train, 64, shuffle=True, drop_last=True, mean=b.info.mean, std=b.info.std,
                       augment=Augment(2, True), seed=5, rank=rank, world=world, **kw)


def test_loader_is_deterministic_and_resumable():
    a, b = _loader(), _loader()
    a.set_epoch(3)
    b.set_epoch(3)
    full = list(a)
    assert all(torch.equal(x.x, y.x) for x, y in zip(full, b))
    tail = list(b.iterate(5))
    assert len(tail) == len(full) - 5 and torch.equal(tail[0].x, full[5].x) and torch.equal(tail[0].y, full[5].y)
    b.set_epoch(4)
    assert not torch.equal(next(iter(b)).index, full[0].index)


def test_global_batch_is_the_same_for_any_number_of_processes():
    one = _loader()
    halves = [_loader(world=2, rank=r) for r in (0, 1)]
    for ld in (one, *halves):
        ld.set_epoch(1)
    for whole, left, right in zip(one, *halves):
        assert torch.equal(whole.x, torch.cat([left.x, right.x]))
        assert torch.equal(whole.y, torch.cat([left.y, right.y]))


def test_normalisation_uses_training_statistics():
    b = load_data(DataConfig(val_split=0))
    ld = BatchLoader(b.train, len(b.train), shuffle=False, drop_last=False, mean=b.info.mean, std=b.info.std)
    x = next(iter(ld)).x
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4) and x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_no_torchvision_or_timm_import_anywhere():
    src = Path(__file__).resolve().parents[1] / "kdkit"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "import torchvision" not in text and "from torchvision" not in text, f
        assert "import timm" not in text and "from timm" not in text, f


def test_pickle_helper_is_plain_bytes():
    # the restricted unpickler accepts what CIFAR files hold: dicts, lists, bytes, numpy arrays
    from kdkit.data.cifar import _SafeUnpickler

    obj = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    back = _SafeUnpickler(io.BytesIO(pickle.dumps(obj, protocol=2)), encoding="bytes").load()
    assert back[b"labels"] == [1, 2] and back[b"data"].shape == (2, 3072)
