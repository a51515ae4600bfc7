"""Segmentation: the task layer, its metrics against torchmetrics, the dense losses against hand-computed and
reference values, mnist-scenes and segfolder data, and tiny end-to-end runs."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdkit.config import load_config
from kdkit.errors import ConfigError, DataError, ModelError
from kdkit.losses import cwd_loss, kd_loss, pairwise_loss
from kdkit.run import execute
from kdkit.tasks import get_task
from kdkit.tasks.segmentation import IGNORE_INDEX, confusion, iou_from_confusion

from .conftest import idx_bytes

SEG = get_task("segmentation")


# ---------------------------------------------------------------------------------------- task layer
def test_output_contract_names_expected_and_received_shapes():
    x = torch.zeros(2, 1, 32, 32)
    SEG.check_output(torch.zeros(2, 11, 32, 32), x, 11, "student m", "scenes")
    SEG.check_output(torch.zeros(2, 11, 8, 8), x, 11, "student m", "scenes")  # factor 4: upsampled
    with pytest.raises(ModelError, match=r"outputs \(2, 11\) for a batch of 2 images of 32x32, expected "
                                         r"\(2, 11, 32, 32\)"):
        SEG.check_output(torch.zeros(2, 11), x, 11, "student m", "scenes")
    with pytest.raises(ModelError, match=r"outputs \(2, 11, 10, 10\)"):  # 32 is no integer multiple of 10
        SEG.check_output(torch.zeros(2, 11, 10, 10), x, 11, "student m", "scenes")
    with pytest.raises(ModelError, match=r"outputs \(2, 5, 32, 32\).*11 classes"):
        SEG.check_output(torch.zeros(2, 5, 32, 32), x, 11, "student m", "scenes")


def test_alignment_upsamples_by_the_integer_factor_and_the_loss_ignores_255():
    out = torch.randn(2, 3, 4, 4)
    up = SEG.align(out, torch.zeros(2, 1, 16, 16))
    assert up.shape == (2, 3, 16, 16)
    assert torch.allclose(up, F.interpolate(out, size=(16, 16), mode="bilinear", align_corners=False))
    y = torch.randint(0, 3, (2, 16, 16))
    y_ign = y.clone()
    y_ign[:, :8] = IGNORE_INDEX
    keep = y_ign != IGNORE_INDEX
    per_pixel = F.cross_entropy(up, y, reduction="none")
    assert SEG.loss(up, y_ign).item() == pytest.approx(per_pixel[keep].mean().item(), rel=1e-5)


def test_miou_and_pixel_accuracy_match_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    k = 5
    target = torch.randint(0, k, (4, 16, 16), generator=g)
    target[0, :3] = IGNORE_INDEX
    logits = torch.randn(4, k, 16, 16, generator=g) + 2.0 * F.one_hot(target.clamp(max=k - 1), k).permute(0, 3, 1, 2)
    meter = SEG.meter(k, "cpu")
    meter.update(logits[:2], target[:2])  # two batches: the confusion matrix accumulates
    meter.update(logits[2:], target[2:])
    got = meter.result()
    pred = logits.argmax(1)
    iou = MulticlassJaccardIndex(k, average="macro", ignore_index=IGNORE_INDEX)(pred, target)
    per = MulticlassJaccardIndex(k, average="none", ignore_index=IGNORE_INDEX)(pred, target)
    acc = MulticlassAccuracy(k, average="micro", ignore_index=IGNORE_INDEX)(pred, target)
    assert got["miou"] == pytest.approx(iou.item(), abs=1e-6)
    assert got["per_class_iou"] == pytest.approx(per.tolist(), abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(acc.item(), abs=1e-6)
    assert got["count"] == int((target != IGNORE_INDEX).sum())


def test_iou_by_hand_and_absent_classes_left_out():
    # labels 0 0 1 1 | predictions 0 1 1 1: IoU_0 = 1/2, IoU_1 = 2/3; class 2 appears nowhere
    cm = confusion(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]), 3)
    out = iou_from_confusion(cm)
    assert out["per_class_iou"] == [pytest.approx(0.5), pytest.approx(2 / 3), None]
    assert out["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert out["pixel_accuracy"] == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------- losses
def test_pixel_kd_is_the_mean_of_per_pixel_kd():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    rows = [kd_loss(s[b, :, i, j][None], t[b, :, i, j][None], 2.0)
            for b in range(2) for i in range(3) for j in range(5)]
    assert kd_loss(s, t, 2.0).item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


def test_pixel_kd_against_the_authors_pixel_wise_loss():
    """Liu et al.'s pixel-wise term (T = 1): sum over batch and pixels of -softmax(z_t) . log_softmax(z_s), divided
    by H*W. It differs from kdkit's mean KL by the teacher's entropy (constant for the student) and the factor B."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    p_t = torch.softmax(t, 1)
    authors = (-p_t * torch.log_softmax(s, 1)).sum() / (5 * 6)
    entropy = (-p_t * torch.log_softmax(t, 1)).sum() / (5 * 6)
    assert (authors - entropy).item() == pytest.approx(3 * kd_loss(s, t, 1.0).item(), rel=1e-5)


def test_cwd_by_hand():
    # one channel over two positions: phi_t = softmax([0, ln 3]) = (1/4, 3/4), phi_s = (1/2, 1/2), T = 1
    s = torch.tensor([[[[0.0, 0.0]]]])
    t = torch.tensor([[[[0.0, math.log(3.0)]]]])
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert cwd_loss(s, t, 1.0).item() == pytest.approx(want, rel=1e-6)
    # T = 2 scales the logits by 1/2 and the loss by 4; N * C = 2 averages two equal terms
    s2, t2 = torch.cat([s, s]), torch.cat([t, t])
    p_t = torch.softmax(t.flatten() / 2, 0)
    want2 = 4 * float((p_t * (p_t.log() - math.log(0.5))).sum())
    assert cwd_loss(s2, t2, 2.0).item() == pytest.approx(want2, rel=1e-6)


def test_cwd_matches_the_papers_formula_on_random_maps():
    """The authors' formulation (CriterionCWD, norm 'channel', divergence 'kl'): softmax over H*W per channel,
    KLDivLoss(sum) of the student's log against the teacher's, divided by N*C, times T^2."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 5, 6, 7, generator=g), torch.randn(3, 5, 6, 7, generator=g)
    temp = 4.0
    n, c = s.shape[:2]
    ns = torch.softmax(s.reshape(n, c, -1) / temp, -1)
    nt = torch.softmax(t.reshape(n, c, -1) / temp, -1)
    ref = torch.nn.KLDivLoss(reduction="sum")(ns.log(), nt) / (n * c) * temp ** 2
    assert cwd_loss(s, t, temp).item() == pytest.approx(ref.item(), rel=1e-5)


def test_pairwise_by_hand_and_its_defining_property():
    # 2x2 map, scale 0.5: kernel 1, four nodes; nodes 0 and 1 parallel, 2 orthogonal to them, 3 opposite 0
    t = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.0]]).reshape(1, 2, 2, 2)
    s = torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.0, 1.0, 1.0, 0.0]]).reshape(1, 2, 2, 2)
    # teacher sims: a01 = 1, a02 = 0, a03 = -1, a12 = 0, a13 = -1, a23 = 0; student: a01 = 0, a02 = 0, a03 = -1,
    # a12 = 1, a13 = 0, a23 = 0. Differences: (0,1), (1,2), (1,3), each counted twice (i, j and j, i): 6 / 4^2
    assert pairwise_loss(s, t, 0.5).item() == pytest.approx(6 / 16, rel=1e-6)
    # cosine similarities: scaling every node's vector by a positive factor changes nothing
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 3, 8, 8, generator=g)
    scale = torch.rand(2, 1, 8, 8, generator=g) + 0.5
    assert pairwise_loss(f * scale, f, 0.125).item() == pytest.approx(0.0, abs=1e-10)


def test_pairwise_matches_the_authors_formula_and_detaches_the_norms():
    """The authors' formulation: max-pool with kernel int(0.5 * side) (ceil mode), similarities of features
    divided by their detached L2 norm (+1e-8), squared differences summed, / (H'W')^2 / N."""
    g = torch.Generator().manual_seed(4)
    s = torch.randn(2, 4, 9, 9, generator=g, requires_grad=True)
    t = torch.randn(2, 6, 9, 9, generator=g)

    def sim(f):
        norm = (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-8).detach()
        v = (f / norm).flatten(2)
        return torch.einsum("icm,icn->imn", v, v)

    pool = torch.nn.MaxPool2d(4, 4, ceil_mode=True)
    ps, pt = pool(s), pool(t)
    ref = ((sim(pt) - sim(ps)) ** 2 / (pt.shape[-1] * pt.shape[-2]) ** 2 / 2).sum()
    got = pairwise_loss(s, t, 0.5)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    (g_ref,) = torch.autograd.grad(ref, s)
    (g_got,) = torch.autograd.grad(got, s)
    assert torch.allclose(g_got, g_ref, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------- mnist-scenes
def _write_digits(root: Path, train_label: int, test_label: int) -> None:
    """Idx files whose training digits are all `train_label` and test digits all `test_label` (solid
    squares: every resized pixel is stroke)."""
    root.mkdir(parents=True, exist_ok=True)
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 4:24] = 255
    for split, label, n in (("train", train_label, 30), ("t10k", test_label, 10)):
        (root / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.stack([img] * n))))
        (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(n, label))))


def _scenes_cfg(root: Path, folder: Path, **extra):
    over = {"data.name": "mnist-scenes", "data.root": str(root), "data.scenes.folder": str(folder),
            "data.scenes.train": 20, "data.scenes.test": 8, "data.scenes.size": 32, "data.val_split": 4, **extra}
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def test_scenes_come_from_their_own_split_are_reproducible_and_checked(tmp_path):
    from kdkit.data import load_data

    _write_digits(tmp_path / "idx", train_label=1, test_label=2)
    cfg = _scenes_cfg(tmp_path / "idx", tmp_path / "scenes")
    b = load_data(cfg.data)
    assert b.info.task == "segmentation" and b.info.classes[0] == "background" and b.info.num_classes == 11
    train_values = torch.unique(torch.cat([b.train.labels.flatten(), b.val.labels.flatten()])).tolist()
    assert train_values == [0, 2]  # background and the training digits' class (1) + 1
    assert torch.unique(b.test.labels).tolist() == [0, 3]
    assert (b.test.labels > 0).equal(b.test.images[:, 0] >= 128)  # labelled exactly where a stroke is on
    folder = next((tmp_path / "scenes").iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["seed"] == 0 and len(manifest["source_files_sha256"]) == 4
    again = load_data(_scenes_cfg(tmp_path / "idx", tmp_path / "other").data)  # built afresh elsewhere
    assert torch.equal(again.test.images, b.test.images) and torch.equal(again.test.labels, b.test.labels)
    reseeded = load_data(_scenes_cfg(tmp_path / "idx", tmp_path / "scenes", **{"data.scenes.seed": 1}).data)
    assert not torch.equal(reseeded.test.labels, b.test.labels)
    arr = np.load(folder / "test-masks.npy")
    arr[0, 0, 0] = 7
    np.save(folder / "test-masks.npy", arr)
    with pytest.raises(DataError, match="test-masks.npy: missing or altered .* delete"):
        load_data(cfg.data)


def test_segmentation_batches_augment_label_maps_with_their_images():
    from kdkit.config import DataConfig
    from kdkit.data import ImageSet, make_bundle, make_loader

    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 4, (16, 12, 12), generator=g, dtype=torch.int64).to(torch.uint8)
    images = (maps * 60).unsqueeze(1)  # each pixel says its label
    cfg = DataConfig(name="memory", val_split=0, normalize=False)
    cfg.augment.crop_padding, cfg.augment.hflip = 3, True
    data = ImageSet(images, maps, ["a", "b", "c", "d"])
    bundle = make_bundle(cfg, data, data)
    loader = make_loader(bundle.train, 8, cfg, train=True, info=bundle.info)
    moved = 0
    for batch in loader:
        assert batch.y.dtype == torch.long
        pad = batch.y == IGNORE_INDEX
        assert torch.equal((batch.x[:, 0] * 255).round()[~pad], (batch.y * 60).float()[~pad])
        assert bool((batch.x[:, 0][pad] == 0).all())
        moved += int(pad.any())
    assert moved > 0


def test_streamed_scenes_give_the_batches_held_in_memory(tmp_path):
    from kdkit.data import load_data, make_loader

    _write_digits(tmp_path / "idx", train_label=4, test_label=5)
    batches = []
    for held in ("true", "false"):
        cfg = _scenes_cfg(tmp_path / "idx", tmp_path / "scenes", **{"data.in_memory": held, "data.workers": 0})
        b = load_data(cfg.data)
        assert b.path == ("memory" if held == "true" else "stream") and b.info.task == "segmentation"
        batches.append(next(iter(make_loader(b.test, 8, cfg.data, train=False, info=b.info))))
    assert torch.equal(batches[0].x, batches[1].x) and torch.equal(batches[0].y, batches[1].y)
    assert batches[1].y.dtype == torch.long and batches[1].y.shape == (8, 32, 32)


# ---------------------------------------------------------------------------------------- segfolder
def _png(path: Path, a: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path)


def write_segfolder(root: Path, n: int = 6, size: int = 16, classes: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for i in range(n):
            mask = rng.integers(0, classes, (size, size)).astype(np.uint8)
            mask[0, 0] = 255
            _png(root / split / "images" / f"im{i}.png", (mask * 70).astype(np.uint8))
            _png(root / split / "masks" / f"im{i}.png", mask)


@pytest.mark.parametrize("in_memory", [True, False])
def test_segfolder_reads_images_and_masks_in_memory_or_streamed(tmp_path, in_memory):
    from kdkit.data import load_data, make_loader

    write_segfolder(tmp_path)
    (tmp_path / "classes.txt").write_text("sky\nroad\ncar\nperson\n")
    cfg = load_config(None, ["data.name=segfolder", f"data.root={tmp_path}", f"data.in_memory={in_memory}",
                             "data.val_split=2", "data.workers=0", "data.normalize=false"]).data
    b = load_data(cfg)
    assert b.info.task == "segmentation" and b.info.classes == ["sky", "road", "car", "person"]
    assert (b.path == "memory") == in_memory and len(b.train) == 4 and len(b.val) == 2
    batch = next(iter(make_loader(b.test, 6, cfg, train=False, info=b.info)))
    assert batch.y.shape == (6, 16, 16) and batch.y.dtype == torch.long and bool((batch.y[:, 0, 0] == 255).all())
    keep = batch.y != 255
    assert torch.equal((batch.x[:, 0] * 255).round()[keep], (batch.y * 70).float()[keep])


def test_segfolder_bad_input_names_the_file(tmp_path):
    from kdkit.data import load_data

    def cfg(**kw):
        over = {"data.name": "segfolder", "data.root": str(tmp_path), "data.val_split": 0, "data.in_memory": True,
                **kw}
        return load_config(None, [f"{k}={v}" for k, v in over.items()]).data

    write_segfolder(tmp_path)
    (tmp_path / "test" / "masks" / "im3.png").unlink()
    with pytest.raises(DataError, match=r"test/images/im3.png has no mask .*test/masks/im3.png"):
        load_data(cfg())
    write_segfolder(tmp_path)
    _png(tmp_path / "test" / "masks" / "im2.png", np.zeros((8, 16), np.uint8))
    with pytest.raises(DataError, match=r"test/masks/im2.png is 16x8 but its image .*im2.png is 16x16"):
        load_data(cfg())
    write_segfolder(tmp_path)
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"masks/im0.png: label 2, but there are 2 classes"):
        load_data(cfg())
    (tmp_path / "classes.txt").unlink()
    _png(tmp_path / "train" / "masks" / "im1.png", np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DataError, match=r"im1.png: a RGB image, but a mask is a single-channel label map"):
        load_data(cfg())


# ---------------------------------------------------------------------------------------- end to end
SCENES = {"data.name": "mnist-scenes", "data.scenes.train": 64, "data.scenes.test": 16,
          "data.scenes.size": 32, "data.val_split": 16, "train.epochs": 1, "train.batch_size": 16,
          "train.progress": "none", "train.lr": 0.05}


def scene_run(command: str, out: Path, root: Path, base: dict, **extra):
    """A kdkit train/distill run on mnist-scenes built from the idx files in `root`, settings `base` + `extra`."""
    over = {**base, "data.root": str(root), "data.scenes.folder": str(out.parent / "scenes"), "output_dir": str(out),
            **extra}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()],
                      default_method="supervised" if command == "train" else "kd")
    return execute(cfg, command)


def _run(command: str, out: Path, root: Path, **extra):
    return scene_run(command, out, root, SCENES, **extra)


@pytest.fixture(scope="module")
def seg_teacher(tmp_path_factory, digit_idx) -> Path:
    out = tmp_path_factory.mktemp("seg") / "teacher"
    r = _run("train", out, digit_idx, **{"model.arch": "deeplab_resnet8"})
    assert r.summary["task"] == "segmentation" and 0 <= r.summary["test_miou"] <= 1
    return out / "model.pt"


@pytest.mark.parametrize("method,extra", [
    ("kd", {}),
    ("cwd", {}),
    ("dkd", {"method.warmup_epochs": 1}),
    ("dist", {}),
    ("pairwise", {}),
    ("fitnets", {}),
    ("adaptive", {"method.paths": "[soft_target,cwd,pairwise,attention,logits]", "method.resize": "true"}),
])
def test_dense_distillation_end_to_end(tmp_path, seg_teacher, digit_idx, method, extra):
    r = _run("distill", tmp_path / method, digit_idx, **{"teacher.checkpoint": str(seg_teacher),
                                                         "student.arch": "unet_resnet8", "student.width": 0.5,
                                                         "method.name": method, **extra})
    s = r.summary
    assert s["primary_metric"] == "miou" and "test_accuracy" not in s
    assert set(s["test_metrics"]) >= {"miou", "pixel_accuracy", "per_class_iou", "loss"}
    card = s["report_card"]
    assert {"test_miou", "params", "macs", "cpu_latency_ms_batch1"} <= set(card["student"])
    assert 0 <= card["pixel_agreement"] <= 1
    assert s["stages"][-1]["val_miou"] is not None
    lines = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/miou" in x for x in lines if x["event"] == "epoch")


def test_segmentation_models_export_with_the_output_check(tmp_path, seg_teacher):
    import kdkit

    res = kdkit.export(seg_teacher.parent, "torchscript", str(tmp_path / "m.ts"))
    assert res["check"]["passed"] and res["task"] == "segmentation"


def test_segmentation_bad_input_is_one_line_before_any_work(tmp_path, seg_teacher, digit_idx):
    from .conftest import digits_overrides

    with pytest.raises(ConfigError, match="task: segmentation, but digits is a classification dataset"):
        execute(load_config(None, digits_overrides(tmp_path / "a", **{"task": "segmentation", "model.arch": "mlp"}),
                            default_method="supervised"), "train")
    with pytest.raises(ConfigError, match="method 'cwd' does not work on classification; methods for "
                                          "classification: .*kd"):
        execute(load_config(None, digits_overrides(tmp_path / "b", **{"method.name": "cwd", "student.arch": "mlp",
                                                                     "teacher.checkpoint": str(seg_teacher)})),
                "distill")
    with pytest.raises(ModelError, match=r"model resnet8 outputs \(2, 11\) for a batch of 2 images of 32x32, "
                                         r"expected \(2, 11, 32, 32\)"):
        _run("train", tmp_path / "c", digit_idx, **{"model.arch": "resnet8"})
    with pytest.raises(ConfigError, match="method 'th_kd' does not work on segmentation"):
        _run("distill", tmp_path / "d", digit_idx, **{"teacher.checkpoint": str(seg_teacher),
                                                       "student.arch": "unet_resnet8",
                                            "method.name": "th_kd"})
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_python_api_takes_label_maps_like_labels(tmp_path):
    import kdkit
    from kdkit.models import create

    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 3, (24, 16, 16), generator=g)
    maps[:, 0, 0] = 255
    images = (maps.clamp(max=2) * 80).unsqueeze(1).float() / 255
    model = create("unet_resnet8", num_classes=3, in_channels=1, input_size=16, width=0.5)
    res = kdkit.train(model, (images[:16], maps[:16]), test_data=(images[16:], maps[16:]), epochs=1,
                      batch_size=8, output_dir=str(tmp_path / "run"), progress="none")
    assert res.summary["task"] == "segmentation" and res.test_score == res.summary["test_miou"]
    with pytest.raises(AttributeError, match="use .test_score"):
        _ = res.test_accuracy
    bad = maps.clone()
    bad[3, 5, 5] = 7
    with pytest.raises(DataError, match="label 7 but the model outputs 3 classes.*255: ignored"):
        kdkit.train(model, (images[:16], bad[:16]), test_data=(images[16:], maps[16:]), epochs=1,
                    output_dir=str(tmp_path / "bad"))


def test_eval_scores_a_segmentation_model_on_the_scenes_it_was_trained_on(seg_teacher, capsys):
    from kdkit.cli import main

    summary = json.loads((seg_teacher.parent / "summary.json").read_text())
    assert main(["eval", "--checkpoint", str(seg_teacher.parent)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["miou"] == pytest.approx(summary["test_miou"], abs=1e-6) and len(out["per_class_iou"]) == 11
