"""Detection: targets and decoding, COCO mAP from pycocotools, the losses by hand and against the authors'
formulas, box augmentation, mnist-scenes boxes, the COCO reader and its bad inputs, and tiny end-to-end runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.config import load_config
from kdkit.errors import ConfigError, DataError, ModelError
from kdkit.losses.fgd import FGDLoss, fgd_masks
from kdkit.losses.imitation import box_imitation, imitation_mask, masked_imitation
from kdkit.run import execute
from kdkit.tasks.detection import coco_map, decode, encode, focal_loss, gaussian_radius, heatmap_kd

from .test_segmentation import _write_digits, scene_run


def perfect_output(boxes: torch.Tensor, k: int, h: int, w: int) -> torch.Tensor:
    """The output a perfect detector gives for `boxes`: a confident peak at each centre, exact sizes, offsets."""
    t = encode(boxes, k, h, w)
    out = torch.full((boxes.shape[0], k + 4, h, w), -10.0)
    for b in range(boxes.shape[0]):
        for m in range(boxes.shape[1]):
            if t["real"][b, m]:
                iy, ix = t["iy"][b, m], t["ix"][b, m]
                out[b, int(boxes[b, m, 4]), iy, ix] = 10.0
                out[b, k:k + 2, iy, ix] = t["size"][b, m]
                out[b, k + 2:, iy, ix] = t["offset"][b, m]
    return out


BOXES = torch.tensor([[[0.10, 0.20, 0.40, 0.50, 2.0], [0.55, 0.55, 0.95, 0.90, 0.0]],
                      [[0.30, 0.30, 0.70, 0.60, 1.0], [-1.0, -1.0, -1.0, -1.0, -1.0]]])


def test_a_perfect_output_decodes_to_the_boxes_and_scores_map_1():
    out = perfect_output(BOXES, 3, 24, 24)
    boxes, scores, cls = decode(out, 3)
    assert torch.allclose(boxes[0, :2].sort(0).values, BOXES[0, :, :4].sort(0).values, atol=1e-5)
    assert torch.allclose(boxes[1, 0], BOXES[1, 0, :4], atol=1e-5) and int(cls[1, 0]) == 1
    gt = [b[b[:, 4] >= 0] for b in BOXES]
    got = coco_map(gt, [(boxes[i], scores[i], cls[i]) for i in range(2)], 3)
    assert got["map"] == pytest.approx(1.0) and got["map50"] == pytest.approx(1.0)


def test_coco_map_of_one_box_at_iou_062():
    """One ground truth, one detection overlapping it at IoU 0.62: a hit at thresholds .50, .55 and .60 of the ten,
    so COCO's mAP@[.5:.95] is 0.3 and mAP@.5 is 1 (pycocotools' COCOeval)."""
    gt = [torch.tensor([[0.0, 0.0, 0.1, 0.1, 0.0]])]
    det = [(torch.tensor([[0.0, 0.0, 0.1, 0.062]]), torch.tensor([0.9]), torch.tensor([0]))]
    got = coco_map(gt, det, 1)
    assert got["map"] == pytest.approx(0.3, abs=1e-6) and got["map50"] == pytest.approx(1.0)


def test_targets_put_a_peak_of_one_at_each_centre_with_sizes_and_offsets_in_cells():
    t = encode(BOXES, 3, 24, 24)
    assert t["heat"].shape == (2, 3, 24, 24)
    # box 0 of image 0: centre (0.25, 0.35) of 24 cells = (6.0, 8.4): cell (x 6, y 8), offset (0.0, 0.4)
    assert t["ix"][0, 0] == 6 and t["iy"][0, 0] == 8
    assert torch.allclose(t["offset"][0, 0], torch.tensor([0.0, 0.4]), atol=1e-5)
    assert torch.allclose(t["size"][0, 0], torch.tensor([7.2, 7.2]), atol=1e-5)
    assert t["heat"][0, 2, 8, 6] == 1 and t["heat"][0, 2].max() == 1 and t["heat"][1, 2].max() == 0
    assert int((t["heat"] == 1).sum()) == 3


def test_gaussian_radius_is_centernets():
    h, w, o = 8.0, 12.0, 0.7
    r1 = (h + w + math.sqrt((h + w) ** 2 - 4 * w * h * (1 - o) / (1 + o))) / 2
    r2 = (2 * (h + w) + math.sqrt(4 * (h + w) ** 2 - 16 * (1 - o) * w * h)) / 2
    r3 = (-2 * o * (h + w) + math.sqrt(4 * o ** 2 * (h + w) ** 2 - 16 * o * (o - 1) * w * h)) / 2
    assert float(gaussian_radius(torch.tensor(h), torch.tensor(w), o)) == pytest.approx(min(r1, r2, r3))


def test_focal_loss_by_hand():
    # two cells, one class: a centre (target 1) and a neighbour (target 0.5), both predicted at p = 0.5
    logits = torch.zeros(1, 1, 1, 2)
    heat = torch.tensor([[[[1.0, 0.5]]]])
    pos = 0.5 ** 2 * math.log(0.5)
    neg = (1 - 0.5) ** 4 * 0.5 ** 2 * math.log(0.5)
    assert focal_loss(logits, heat, torch.tensor(1.0)).item() == pytest.approx(-(pos + neg), rel=1e-5)


def test_heatmap_kd_by_hand():
    # p_t = sigmoid(0) = 1/2, p_s = sigmoid(ln 3) = 3/4; one class, one cell, T = 1, then T = 2
    s, t = torch.tensor([[[[math.log(3.0)]]]]), torch.zeros(1, 1, 1, 1)
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert heatmap_kd(s, t, 1.0).item() == pytest.approx(want, rel=1e-5)
    q = 1 / (1 + math.exp(-math.log(3.0) / 2))
    assert heatmap_kd(s, t, 2.0).item() == pytest.approx(4 * (0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))),
                                                       rel=1e-5)


def test_imitation_mask_follows_the_authors_rule():
    """A 7 x 7-cell box centred on cell (9, 9): the same box shifted by (dx, dy) cells overlaps it by
    inter / (98 - inter), inter = (7 - dx)(7 - dy), and the best overlap is 1 (no shift). Above half of it means
    inter > 98 / 3: shifts of at most 1 in both directions, or of 2 in one direction alone."""
    boxes = torch.tensor([[[6 / 24, 6 / 24, 13 / 24, 13 / 24, 0.0], [-1, -1, -1, -1, -1]]])
    mask = imitation_mask(boxes, 24, 24)
    want = [[r, c] for r in range(24) for c in range(24)
            if (abs(r - 9) <= 1 and abs(c - 9) <= 1) or (abs(r - 9) + abs(c - 9) == 2 and (r == 9 or c == 9))]
    assert mask[0].nonzero().tolist() == want and len(want) == 13


def test_feature_and_box_imitation_against_the_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 6, 6, generator=g), torch.randn(2, 5, 6, 6, generator=g)
    mask = (torch.rand(2, 6, 6, generator=g) > 0.6).float()
    authors = (torch.pow(t - s, 2) * mask[:, None]).sum() / (mask.sum() * 2)
    assert masked_imitation(s, t, mask).item() == pytest.approx(authors.item(), rel=1e-5)
    sb, tb = torch.zeros(1, 4, 1, 2), torch.ones(1, 4, 1, 2)
    heat = torch.tensor([[[[0.0, math.log(3.0)]]]])  # teacher probabilities 1/2 and 3/4
    assert box_imitation(sb, tb, heat).item() == pytest.approx(4.0)  # every cell differs by 4: any weighting
    sb[0, :, 0, 1] = 1.0  # the second cell now agrees: 4 * (1/2) / (1/2 + 3/4)
    assert box_imitation(sb, tb, heat).item() == pytest.approx(4 * 0.5 / 1.25, rel=1e-5)


def _wave(shape: tuple[int, ...], phase: float, scale: float = 0.5) -> torch.Tensor:
    """A fixed tensor (no random generator): scale * sin(0.37 k + phase) over its flattened index k."""
    n = math.prod(shape)
    return (torch.sin(torch.arange(n, dtype=torch.float64) * 0.37 + phase) * scale).reshape(shape).float()


def test_fgd_masks_follow_the_authors_rule():
    """On a 10 x 10 grid, a box over x in [0.12, 0.38] covers columns floor(1.2) = 1 .. ceil(3.8) = 4 inclusive,
    rows floor(2.1) = 2 .. ceil(4.9) = 5: 16 cells of weight 1/16; a smaller box inside it wins where they overlap;
    the background's weights are 1 / (cells outside every box)."""
    boxes = torch.tensor([[[0.12, 0.21, 0.38, 0.49, 0.0], [0.21, 0.31, 0.29, 0.39, 1.0], [-1, -1, -1, -1, -1]]])
    fg, bg = fgd_masks(boxes, 10, 10)
    big = torch.zeros(10, 10)
    big[2:6, 1:5] = 1 / 16
    big[3:5, 2:4] = 1 / 4  # rows 3..4, columns 2..3: the small box's 2 x 2 cells
    assert torch.allclose(fg[0], big)
    assert torch.allclose(bg[0], (big == 0).float() / 84) and bg.sum().item() == pytest.approx(1.0)
    empty = fgd_masks(torch.full((1, 1, 5), -1.0), 4, 4)
    assert empty[0].sum() == 0 and torch.allclose(empty[1], torch.full((1, 4, 4), 1 / 16))


def test_fgd_against_the_authors_code_on_the_same_tensors():
    """Reference values from the authors' FeatureLoss (yzd-v/FGD, mmdet/distillation/losses/fgd.py, defaults
    T 0.5, alpha 0.001, beta 0.0005, gamma 0.001, lambda 5e-6; boxes in pixels of a 40 x 56 image), run on these
    tensors with these parameters (each parameter set to _wave(shape, 0.1 i, 0.15), i its rank in kdkit's sorted
    names, the authors' same-named modules given the same values): fg 2.27428675, bg 1.55525017, mask
    6.55087614, relation 69.5523605, total 0.00995055027."""
    fs, ft = _wave((2, 4, 5, 7), 1.0), _wave((2, 6, 5, 7), 2.0, 0.75)
    boxes = torch.tensor([[[0.12, 0.21, 0.55, 0.63, 1], [0.40, 0.05, 0.93, 0.44, 0], [-1, -1, -1, -1, -1]],
                          [[0.31, 0.33, 0.71, 0.86, 2], [-1, -1, -1, -1, -1], [-1, -1, -1, -1, -1]]])
    loss = FGDLoss(4, 6)
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(loss.named_parameters())):
            p.copy_(_wave(tuple(p.shape), 0.1 * i, 0.15))
    terms = loss.terms(fs, ft, boxes)
    want = {"fg": 2.2742867, "bg": 1.5552502, "attention": 6.5508761, "global": 69.552361}
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(want, rel=1e-5)
    assert loss(fs, ft, boxes).item() == pytest.approx(0.0099505503, rel=1e-5)
    fresh = FGDLoss(6, 6)  # GcBlocks start as the identity (their last conv is zero): global = plain squared error
    assert isinstance(fresh.align, torch.nn.Identity)
    assert fresh.terms(ft, ft * 0.5, boxes)["global"].item() == pytest.approx(((ft * 0.5) ** 2).sum().item() / 2,
                                                                              rel=1e-5)


# ---------------------------------------------------------------------------------------- data
def test_scene_boxes_are_tight_around_each_digit_and_move_with_crops_and_flips(tmp_path):
    from kdkit.data import load_data, make_loader

    _write_digits(tmp_path / "idx", train_label=3, test_label=7)
    over = {"data.name": "mnist-scenes", "data.root": str(tmp_path / "idx"), "data.scenes.folder": str(tmp_path / "s"),
            "data.scenes.labels": "boxes", "data.scenes.max_digits": 1, "data.scenes.size": 48,
            "data.scenes.train": 16, "data.scenes.test": 8, "data.val_split": 0, "data.normalize": "false"}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    b = load_data(cfg.data)
    assert b.info.task == "detection" and b.info.classes == [str(i) for i in range(10)]
    y = b.test.labels
    assert y.shape == (8, 1, 5) and bool((y[:, 0, 4] == 7).all())
    for img, box in zip(b.test.images, y[:, 0]):
        on = (img[0] >= 128).nonzero()
        tight = torch.tensor([on[:, 1].min(), on[:, 0].min(), on[:, 1].max() + 1, on[:, 0].max() + 1]) / 48
        assert torch.allclose(box[:4], tight.float(), atol=1e-6)
    cfg.data.augment.crop_padding, cfg.data.augment.hflip = 6, True
    streamed = load_data(replace(cfg.data, in_memory=False, workers=0))  # augmented per sample instead of per batch
    assert streamed.path == "stream"
    for bundle in (b, streamed):
        for batch in make_loader(bundle.train, 8, cfg.data, train=True, info=bundle.info):
            for img, box in zip(batch.x, batch.y[:, 0]):
                on = (img[0] >= 0.5).nonzero()
                if box[4] < 0:  # cropped out of view entirely
                    continue
                seen = torch.tensor([on[:, 1].min(), on[:, 0].min(), on[:, 1].max() + 1, on[:, 0].max() + 1]) / 48
                assert torch.allclose(box[:4], seen.float(), atol=1e-5)


def _png(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), 100, np.uint8)).save(path)


def write_coco(root: Path, n: int = 4, size: tuple[int, int] = (40, 30)) -> None:
    """train.json + train/ and test.json + test/ in the COCO format: two categories with ids 7 and 3."""
    for split in ("train", "test"):
        images, anns = [], []
        for i in range(n):
            _png(root / split / f"im{i}.png", size)
            images.append({"id": 100 + i, "file_name": f"im{i}.png", "width": size[0], "height": size[1]})
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 7, "bbox": [4, 3, 20, 15],
                         "iscrowd": 0, "area": 300})
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 3, "bbox": [0, 0, 10, 10],
                         "iscrowd": 1, "area": 100})
        data = {"images": images, "annotations": anns,
                "categories": [{"id": 7, "name": "car"}, {"id": 3, "name": "person"}]}
        (root / f"{split}.json").write_text(json.dumps(data))


def _coco_cfg(root: Path, **extra):
    over = {"data.name": "coco", "data.root": str(root), "data.val_split": 0, "data.workers": 0, **extra}
    return load_config(None, [f"{k}={v}" for k, v in over.items()]).data


@pytest.mark.parametrize("in_memory", [True, False])
def test_coco_files_read_in_memory_or_streamed(tmp_path, in_memory):
    from kdkit.data import load_data, make_loader

    write_coco(tmp_path)
    cfg = _coco_cfg(tmp_path, **{"data.in_memory": in_memory})
    b = load_data(cfg)
    assert b.info.task == "detection" and b.info.classes == ["person", "car"]  # by category id: 3, then 7
    batch = next(iter(make_loader(b.test, 4, cfg, train=False, info=b.info)))
    assert batch.y.shape == (4, 1, 5)  # the crowd box is left out
    assert torch.allclose(batch.y[0, 0], torch.tensor([4 / 40, 3 / 30, 24 / 40, 18 / 30, 1.0]))


def test_coco_bad_input_names_the_file_and_the_entry(tmp_path):
    from kdkit.data import load_data

    def rewrite(split: str, fn) -> None:
        p = tmp_path / f"{split}.json"
        data = json.loads(p.read_text())
        fn(data)
        p.write_text(json.dumps(data))

    write_coco(tmp_path)
    rewrite("test", lambda d: d["annotations"][0].update(bbox=[30, 3, 20, 15]))
    with pytest.raises(DataError, match=r"test.json: annotation 1 of im0.png \(40x30\) has the box .* outside the "
                                        r"image; .*data.on_bad_box=skip"):
        load_data(_coco_cfg(tmp_path))
    with pytest.warns(Warning, match="left out 1 box"):
        b = load_data(_coco_cfg(tmp_path, **{"data.on_bad_box": "skip", "data.in_memory": True}))
    assert int((b.test.labels[..., 4] >= 0).sum()) == 3
    write_coco(tmp_path)
    rewrite("train", lambda d: d["annotations"][2].update(category_id=99))
    with pytest.raises(DataError, match=r"train.json: annotation 3 has category_id 99, not one of the categories"):
        load_data(_coco_cfg(tmp_path))
    write_coco(tmp_path)
    rewrite("train", lambda d: d["annotations"][0].update(image_id=555))
    with pytest.raises(DataError, match=r"annotation 1 names image 555, which the file does not list"):
        load_data(_coco_cfg(tmp_path))
    write_coco(tmp_path)
    (tmp_path / "test" / "im2.png").unlink()
    with pytest.raises(DataError, match=r"test.json: image 102 is .*im2.png, which does not exist"):
        load_data(_coco_cfg(tmp_path))
    write_coco(tmp_path)
    (tmp_path / "train.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match="train.json: an empty COCO annotation file"):
        load_data(_coco_cfg(tmp_path))


# ---------------------------------------------------------------------------------------- end to end
SCENES = {"data.name": "mnist-scenes", "data.scenes.labels": "boxes",
          "data.scenes.train": 48, "data.scenes.test": 16, "data.scenes.size": 64, "data.val_split": 16,
          "train.epochs": 1, "train.batch_size": 16, "train.progress": "none", "train.optimizer": "adam",
          "train.lr": 0.003, "train.weight_decay": 0}


def _run(command: str, out: Path, root: Path, **extra):
    return scene_run(command, out, root, SCENES, **extra)


@pytest.fixture(scope="module")
def det_teacher(tmp_path_factory, digit_idx) -> Path:
    out = tmp_path_factory.mktemp("det") / "teacher"
    r = _run("train", out, digit_idx, **{"model.arch": "centernet_resnet8"})
    assert r.summary["task"] == "detection" and 0 <= r.summary["test_map"] <= 1
    return out / "model.pt"


@pytest.mark.parametrize("method,extra", [
    ("kd", {}),
    ("feature_imitation", {"method.warmup_steps": 1}),
    ("fgd", {}),
    ("adaptive", {"method.paths": "[soft_target,boxes,imitation,attention,fgd]", "method.weighting": "dwa"}),
])
def test_detection_distillation_end_to_end(tmp_path, det_teacher, digit_idx, method, extra):
    r = _run("distill", tmp_path / method, digit_idx, **{"teacher.checkpoint": str(det_teacher),
                                              "student.arch": "centernet_resnet8", "student.width": 0.5,
                                              "method.name": method, **extra})
    s = r.summary
    assert s["primary_metric"] == "map" and {"map", "map50", "loss"} <= set(s["test_metrics"])
    assert {"test_map", "params", "macs", "cpu_latency_ms_batch1"} <= set(s["report_card"]["student"])
    assert (r.run_dir / "examples.png").is_file()
    lines = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/map" in x for x in lines if x["event"] == "epoch")
    term = {"feature_imitation": "train/imitation", "fgd": "train/fgd", "adaptive": "train/path/fgd"}.get(method)
    if term:  # the method's own term took part (after its warm-up), not only the detection loss
        assert [x[term] for x in lines if x["event"] == "epoch"][-1] > 0


def test_detectors_export_with_the_output_check(tmp_path, det_teacher):
    import kdkit

    res = kdkit.export(det_teacher.parent, "torchscript", str(tmp_path / "d.ts"))
    assert res["check"]["passed"] and res["task"] == "detection"


def test_detection_bad_input_is_one_line_before_any_work(tmp_path, det_teacher, digit_idx):
    from .conftest import digits_overrides

    with pytest.raises(ConfigError, match="task: detection, but digits is a classification dataset"):
        execute(load_config(None, digits_overrides(tmp_path / "a", **{"task": "detection", "model.arch": "mlp"}),
                            default_method="supervised"), "train")
    with pytest.raises(ModelError, match=r"model deeplab_resnet8 outputs \(2, 10, 64, 64\) .* expected \(2, 10 \+ 4"):
        _run("train", tmp_path / "b", digit_idx, **{"model.arch": "deeplab_resnet8"})
    with pytest.raises(ConfigError, match="method 'feature_imitation' does not work on classification"):
        execute(load_config(None, digits_overrides(tmp_path / "c", **{
            "method.name": "feature_imitation", "student.arch": "mlp", "teacher.checkpoint": str(det_teacher)})),
            "distill")
    with pytest.raises(ConfigError, match="method 'fgd' does not work on classification"):
        execute(load_config(None, digits_overrides(tmp_path / "d", **{
            "method.name": "fgd", "student.arch": "mlp", "teacher.checkpoint": str(det_teacher)})), "distill")
    with pytest.raises(ModelError, match=r"path 'fgd' compares feature maps \[B, C, H, W\] of one spatial size"):
        _run("distill", tmp_path / "e", digit_idx, **{
            "teacher.checkpoint": str(det_teacher), "student.arch": "centernet_resnet8", "student.width": 0.5,
            "method.name": "adaptive", "method.paths": "[{name: fgd, pairs: [[backbone.stages.0, neck]]}]"})
    assert not any((tmp_path / n).exists() for n in "abcde")
