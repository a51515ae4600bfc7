"""Streaming data: image files decoded per sample in worker processes, the user's own loaders iterated every
epoch, samples that are not images, and the errors of files met mid-epoch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import kdkit
from kdkit.config import DataConfig, load_config
from kdkit.data import DataInfo, load_data, make_loader
from kdkit.data.stream import FileSampleSet, SampleSet, StreamLoader, TensorSampleSet
from kdkit.errors import ConfigError, DataError, RunWarning
from kdkit.run import execute

from .conftest import ROOT, crash_at, digits_overrides


def write_folder(root: Path, n_per_class: int = 12, classes: int = 3, size: int = 12, fmt: str = "png",
                 seed: int = 0) -> Path:
    """train/<class>/*.png and test/<class>/*.png of coloured noise whose mean brightness tells the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("test", max(2, n_per_class // 3))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(rng.normal(60 + 70 * c, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i:03d}.{fmt}")
    return root


def _cfg(root: Path, out: Path, **extra: object):
    base = {"data.name": "imagefolder", "data.root": str(root), "data.val_split": 0, "model.arch": "mlp",
            "model.hidden": "[16]", "data.in_memory": False, "data.workers": 0}
    base.update(extra)
    return load_config(None, digits_overrides(out, **base), default_method="supervised")


def test_an_image_folder_streams_and_trains_like_it_does_in_memory(tmp_path):
    root = write_folder(tmp_path / "imgs")
    streamed = execute(_cfg(root, tmp_path / "s", **{"train.deterministic": True}), "train")
    held = execute(_cfg(root, tmp_path / "m", **{"data.in_memory": True, "train.deterministic": True}), "train")
    s, m = streamed.summary, held.summary
    assert s["data"]["path"] == "stream" and m["data"]["path"] == "memory"
    assert "streaming the data from disk" in s["data"]["notes"][0] and "data.in_memory=true" in m["data"]["notes"][0]
    assert s["data"]["train"] == m["data"]["train"] == 36 and s["data"]["test"] == 12
    # the same order, the same images, the same weights (no augmentation on either path)
    a, b = streamed.model.state_dict(), held.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    auto = execute(_cfg(root, tmp_path / "a", **{"data.in_memory": "auto"}), "train").summary
    assert auto["data"]["path"] == "memory" and "data.in_memory=auto" in auto["data"]["notes"][0]


def test_workers_give_the_same_batches_and_every_sample_once_across_ranks(tmp_path):
    root = write_folder(tmp_path / "imgs", n_per_class=10)
    data = load_data(DataConfig(name="imagefolder", root=str(root), val_split=0, in_memory=False))
    info = data.info

    def batches(world: int, rank: int, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ld = StreamLoader(data.train, 8, shuffle=True, drop_last=False, mean=info.mean, std=info.std, seed=3,
                          rank=rank, world=world, workers=workers)
        ld.set_epoch(1)
        return [(b.x, b.index) for b in ld]

    one = batches(1, 0, 0)
    assert [torch.equal(x, y) for (x, _), (y, _) in zip(one, batches(1, 0, 2))] == [True] * len(one)
    r0, r1 = batches(2, 0, 2), batches(2, 1, 0)
    seen = torch.cat([i for _, i in r0] + [i for _, i in r1])
    assert sorted(seen.tolist()) == list(range(30))  # every sample exactly once over the two ranks
    # each global batch is split between the ranks, as the in-memory path does
    assert [len(i) for _, i in r0] == [4, 4, 4, 3] and [len(i) for _, i in r1] == [4, 4, 4, 3]


def test_a_dropped_loader_frees_its_workers_at_once(tmp_path):
    # no reference cycle through the batch sampler: a streamed loader dropped mid-epoch (the one-batch look
    # before training, an evaluation loader) is freed by reference counting, not left to the garbage collector,
    # whose teardown made each worker's shutdown wait out a 5 s timeout
    import gc
    import weakref

    root = write_folder(tmp_path / "imgs", n_per_class=10)
    data = load_data(DataConfig(name="imagefolder", root=str(root), val_split=0, in_memory=False))
    ld = StreamLoader(data.train, 4, shuffle=True, drop_last=False, mean=data.info.mean, std=data.info.std,
                      workers=1)
    it = iter(ld)
    next(it)
    alive = weakref.ref(ld)
    gc.disable()
    try:
        del it, ld
        assert alive() is None
    finally:
        gc.enable()


def test_samples_are_decoded_as_they_are_read_not_before(tmp_path):
    """The property behind flat memory: constructing the loader decodes nothing, and reading k batches decodes
    k batches' worth of samples, not the set."""
    root = write_folder(tmp_path / "imgs", n_per_class=20)
    data = load_data(DataConfig(name="imagefolder", root=str(root), val_split=0, in_memory=False))
    calls = []
    base = FileSampleSet.load

    def counted(self, i, augment, g):
        calls.append(i)
        return base(self, i, augment, g)

    FileSampleSet.load = counted
    try:
        ld = make_loader(data.train, 6, DataConfig(workers=0), train=True, info=data.info, seed=0)
        assert calls == []
        it = ld.iterate(0)
        for _ in range(3):
            next(it)
        assert len(calls) == 18
    finally:
        FileSampleSet.load = base


def test_resident_memory_stays_flat_as_the_dataset_grows(tmp_path):
    """Peak memory of one streamed epoch over 300 and 1,200 images of 48x48: the fourfold set may not cost
    more than a few MB more (it would cost about 6 MB more decoded into memory)."""
    script = (
        "import resource, sys\n"
        "from kdkit.config import DataConfig\n"
        "from kdkit.data import load_data, make_loader\n"
        "d = load_data(DataConfig(name='imagefolder', root=sys.argv[1], val_split=0, in_memory=False))\n"
        "ld = make_loader(d.train, 32, DataConfig(workers=0), train=True, info=d.info)\n"
        "for _ in range(2):\n"
        "    for b in ld: pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    peaks = []
    for n in (100, 400):
        root = write_folder(tmp_path / f"n{n}", n_per_class=n, size=48)
        p = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
        assert p.returncode == 0, p.stderr
        peaks.append(int(p.stdout.strip()))  # KiB
    grown_mb = (peaks[1] - peaks[0]) / 1024
    decoded_mb = 900 * 48 * 48 * 3 / 2**20
    assert grown_mb < 0.5 * decoded_mb, (peaks, decoded_mb)


def test_file_paths_are_packed_and_read_back_exactly():
    from kdkit.data.pathtable import PathTable

    names = ["a/b.png", "ünïcode/ß.jpg", "", "x" * 300, "/abs/path.JPEG"]
    t = PathTable(names)
    assert len(t) == 5 and [str(p) for p in t] == [str(Path(n)) for n in names]
    assert t[-1] == Path("/abs/path.JPEG") and t[1:3] == [Path("ünïcode/ß.jpg"), Path("")]
    with pytest.raises(IndexError):
        t[5]
    # one array of bytes and one of offsets, not an object per path (the workers share those pages)
    assert t.nbytes == sum(len(n.encode()) for n in names) + 8 * len(names)
    assert len(PathTable([])) == 0


def test_workers_hand_over_the_same_model_input_as_the_main_process(tmp_path):
    # with workers on CPU the batch is converted and normalised in the worker; it must equal the main
    # process's conversion exactly
    root = write_folder(tmp_path / "imgs", n_per_class=6)
    data = load_data(DataConfig(name="imagefolder", root=str(root), val_split=0, in_memory=False))

    def batches(workers: int) -> list[torch.Tensor]:
        ld = StreamLoader(data.train, 5, shuffle=True, drop_last=False, mean=data.info.mean, std=data.info.std,
                          seed=1, workers=workers, channels_last=True)
        return [b.x for b in ld]

    main, workers = batches(0), batches(2)
    assert main[0].dtype == torch.float32 and abs(float(main[0].mean())) < 3
    assert all(torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)
               for a, b in zip(main, workers, strict=True))


def test_a_corrupt_file_mid_epoch_is_named_and_the_checkpoint_kept(tmp_path):
    root = write_folder(tmp_path / "imgs")
    bad = root / "train" / "class1" / "005.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=r"005\.png: not a readable image .*data\.on_bad_file=skip"):
        execute(_cfg(root, tmp_path / "early", **{"data.workers": 2}), "train")  # met by the normalisation
    assert not (tmp_path / "early").exists()  # before any work
    cfg = _cfg(root, tmp_path / "r", **{"train.epochs": 2, "data.workers": 2, "data.normalize": False})
    with pytest.raises(DataError, match=r"005\.png: not a readable image .*data\.on_bad_file=skip"):
        execute(cfg, "train")
    assert (tmp_path / "r" / "checkpoint.pt").is_file()  # the checkpoint written before the first step
    with pytest.warns(RunWarning, match=r"005\.png: not a readable image; left out of its batch"):
        res = execute(_cfg(root, tmp_path / "s", **{"data.on_bad_file": "skip"}), "train")
    assert res.summary["data"]["skipped_files"]["count"] == 2  # once per epoch
    assert res.summary["data"]["skipped_files"]["first"] == [str(bad)]


def test_file_lists_name_the_bad_line_and_the_missing_files(tmp_path):
    root = write_folder(tmp_path / "imgs", n_per_class=4)
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = [f"{p.relative_to(lists.parent)},{p.parent.name}" for p in sorted((root / "train").rglob("*.png"))]
    (lists / "train.csv").write_text("path,label\n" + "\n".join(f"../{r}" for r in rows) + "\n")
    test_rows = [f"../{p.relative_to(lists.parent)},{p.parent.name}" for p in sorted((root / "test").rglob("*.png"))]
    (lists / "test.csv").write_text("\n".join(test_rows) + "\n")
    d = load_data(DataConfig(name="filelist", root=str(lists), val_split=0, in_memory=False))
    assert len(d.train) == 12 and d.info.classes == ["class0", "class1", "class2"] and d.info.input_shape == (3, 12, 12)
    (lists / "test.csv").write_text(test_rows[0] + "\nno-label-here\n")
    with pytest.raises(DataError, match=r"test.csv, line 2: expected 'path,label'"):
        load_data(DataConfig(name="filelist", root=str(lists), val_split=0))
    (lists / "test.csv").write_text("\n".join([*test_rows, "../gone/a.png,class0", "../gone/b.png,class1"]) + "\n")
    with pytest.raises(DataError, match=r"2 of 8 listed files do not exist \(first: .*gone/a.png"):
        load_data(DataConfig(name="filelist", root=str(lists), val_split=0))


def test_natural_image_augmentations_are_seeded_per_sample(tmp_path):
    from kdkit.data.natural import SampleAugment, image_sample

    root = write_folder(tmp_path / "imgs", n_per_class=1, size=40)
    path = next((root / "train").rglob("*.png"))
    aug = SampleAugment(random_resized_crop=True, hflip=True, color_jitter=0.4)

    def draw(seed: int) -> torch.Tensor:
        return image_sample(path, "RGB", 24, aug, torch.Generator().manual_seed(seed))

    assert draw(1).shape == (3, 24, 24) and torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    assert image_sample(path, "RGB", 24, None, None, crop=0.875).shape == (3, 24, 24)  # centre crop for evaluation
    with pytest.raises(DataError, match="random_resized_crop resizes its crops to data.image_size"):
        execute(_cfg(root, tmp_path / "r", **{"data.augment.random_resized_crop": True, "data.image_size": None}),
                "train")


class _Noisy(Dataset):
    """Images with fresh random noise at every read: the user's own augmentation."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.base = torch.rand(n, 1, 8, 8, generator=g)
        self.labels = (self.base.mean(dim=(1, 2, 3)) > 0.5).long()
        self.reads = 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.base[i] + 0.1 * torch.randn(1, 8, 8), self.labels[i]


def _net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 2))


def test_a_users_augmenting_loader_is_read_every_epoch_as_it_is(tmp_path):
    ds = _Noisy()
    loader = DataLoader(ds, batch_size=16, shuffle=True)
    test = (ds.base, ds.labels)
    res = kdkit.train(_net(), loader, test_data=test, train={"epochs": 3, "progress": "none"},
                      output_dir=str(tmp_path / "r"))
    assert ds.reads >= 3 * 64  # read in every epoch (plus one batch to look at it), not collected once
    stages = res.summary["stages"][0]
    assert stages["batch_size"] == 16 and stages["steps_per_epoch"] == 4  # the loader's own batch size
    assert res.summary["data"]["path"] == "stream" and "iterated every epoch" in res.summary["data"]["notes"][0]
    # collected into memory only when asked: then its augmentation is read once
    ds2 = _Noisy()
    kdkit.train(_net(), DataLoader(ds2, batch_size=16), test_data=test, train={"epochs": 3, "progress": "none"},
                data={"in_memory": True}, output_dir=str(tmp_path / "m"))
    assert ds2.reads == 64


def test_an_iterable_dataset_is_one_pass_per_epoch(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(1)
            for _ in range(40):
                x = torch.rand(64, generator=g)
                yield x, int(x.mean() > 0.5)

    x = torch.rand(20, 64)
    res = kdkit.train(nn.Linear(64, 2), DataLoader(Stream(), batch_size=8), test_data=(x, (x.mean(1) > 0.5).long()),
                      train={"epochs": 2, "progress": "none"}, output_dir=str(tmp_path / "r"))
    assert res.summary["stages"][0]["steps_per_epoch"] == 5 and res.summary["data"]["input_shape"] == [64]


@pytest.mark.parametrize("method,extra", [
    ("kd", {}),
    ("fitnets", {"method.pairs": [["layers.0", "layers.0"]]}),
    ("adaptive", {"method.paths": ["soft_target", "logits", {"name": "hint", "pairs": [["layers.0", "layers.0"]]}]}),
    ("th_kd", {}),
])
@pytest.mark.parametrize("shape", [(24,), (3, 8)])
def test_vectors_and_sequences_go_through_the_methods(tmp_path, method, extra, shape):
    """Tabular vectors [N, D] and sequences [N, C, L] through the zoo MLP (its input width from the data)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, *shape, generator=g)
    y = (x.flatten(1)[:, :4].sum(1) > 0).long() + 2 * (x.flatten(1)[:, 4:8].sum(1) > 0).long()
    common = {"train": {"epochs": 8, "batch_size": 32, "progress": "none", "optimizer": "adam", "lr": 0.01},
              "data": {"val_split": 0.1}}
    teacher = kdkit.train("mlp", (x, y), **{"model.hidden": [64]}, output_dir=str(tmp_path / "t"), **common)
    assert teacher.summary["data"]["input_shape"] == list(shape)
    res = kdkit.distill(teacher.run_dir / "model.pt", "mlp", (x, y), method=method, **{"student.hidden": [32]},
                        output_dir=str(tmp_path / method), **common, **extra)
    assert res.summary["test_accuracy"] > 0.3 and res.summary["data"]["input_shape"] == list(shape)
    loaded = kdkit.load(res.run_dir / "model.pt")
    assert loaded(x[:5]).shape == (5, 4)


def test_methods_that_need_images_say_so_before_any_work(tmp_path):
    x = torch.randn(100, 24)
    y = (x[:, 0] > 0).long()
    teacher = kdkit.train("mlp", (x, y), **{"model.hidden": [16]}, train={"epochs": 1, "progress": "none"},
                          output_dir=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match=r"method 'dafl' works on images \[C, H, W\]; this data's samples are "
                                          r"\(24,\)"):
        kdkit.distill(teacher.run_dir / "model.pt", "mlp", None, method="dafl", test_data=(x, y),
                      output_dir=str(tmp_path / "d"))
    with pytest.raises(DataError, match="data.augment crops and flips images"):
        kdkit.train("mlp", (x, y), train={"epochs": 1, "progress": "none"}, data={"augment": {"hflip": True}},
                    output_dir=str(tmp_path / "a"))


def test_streamed_mid_epoch_resume_with_workers_is_bit_identical(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "imgs", n_per_class=20)
    extra = {"train.epochs": 2, "train.deterministic": True, "train.checkpoint_every": 2, "data.workers": 2,
             "data.augment.hflip": True, "data.augment.crop_padding": 1, "train.batch_size": 16}
    ref = execute(_cfg(root, tmp_path / "ref", **extra), "train")
    cfg = _cfg(root, tmp_path / "cut", **extra)
    crash_at(cfg, 5, monkeypatch, command="train")  # inside epoch 2 (3 steps per epoch)
    res = execute(cfg, "train", resume=True)
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["stages"][0]["steps"] == 6


def test_the_tensor_path_streams_when_asked():
    d = load_data(DataConfig(name="digits", val_split=0.1, in_memory=False))
    assert isinstance(d.train, SampleSet) and isinstance(d.test, TensorSampleSet) and d.path == "stream"
    info = DataInfo("x", ["a"], (1, 8, 8), [0.0], [1.0])
    assert info.is_images and DataInfo("x", ["a"], (24,), [0.0], [1.0]).input_size == 1


def test_decoding_into_memory_names_the_odd_sized_file_and_stats_ignore_the_chunking(tmp_path):
    from PIL import Image

    from kdkit.data.images import channel_stats

    root = write_folder(tmp_path / "imgs", n_per_class=4, size=12)
    data = load_data(DataConfig(name="imagefolder", root=str(root), val_split=0, in_memory=False))
    held = data.train.to_memory()
    assert held.images.shape == (12, 3, 12, 12) and held.images.dtype == torch.uint8
    assert torch.equal(held.images[5], data.train.load(5, None, None)[0])
    assert held.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert channel_stats(held.images, chunk_values=500) == channel_stats(held.images)  # chunks of 1 image
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "train" / "class2" / "003.png")
    with pytest.raises(DataError, match=r"\(3, 9, 9\) for .*class2/003\.png.*data\.image_size"):
        data.train.to_memory()  # the listed file was replaced by one of another size
