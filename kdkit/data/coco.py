"""``coco``: object detection data in the COCO format, read with pycocotools.

Layout under ``data.root``, either COCO 2017's::

    annotations/instances_train2017.json   train2017/<file_name>
    annotations/instances_val2017.json     val2017/<file_name>        (the test split)

or a plain one::

    train.json  train/<file_name>          test.json (or val.json)  test/<file_name> (or val/)

An annotation file holds ``images`` (``id``, ``file_name``, ``width``, ``height``), ``annotations`` (``image_id``,
``category_id``, ``bbox`` = [x, y, width, height] in pixels, ``iscrowd``) and ``categories`` (``id``, ``name``).
Categories become classes 0..K-1 in the order of their ids (the training file's). Crowd annotations are left
out, as COCO's training code does. Boxes are handed to the run as fractions of their image's width and height
(kdkit.tasks.detection), so ``data.image_size`` resizes images without touching them.

Checked before any work, each problem naming the file and the entry: an empty annotation file, an annotation
naming an image the file does not list, an image file that is missing, an unknown category id, a box without
area or outside its image (``data.on_bad_box: skip`` leaves such boxes out and counts them in the run log
instead). An image whose decoded size differs from the size its entry states is an error when it is read.
Small sets are decoded into memory, large ones streamed (``data.in_memory``).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig
from ..errors import DataError
from .files import require_root
from .imagefolder import image_mode
from .natural import SampleAugment, augment_with_target, read_image, resize_square
from .pathtable import PathTable
from .stream import SampleSet

TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in annotation tools)


class CocoSet(SampleSet):
    """Images listed by a COCO annotation file, with their boxes ``[N, M, 5]`` known without decoding."""

    def __init__(self, paths: list[Path], sizes: list[tuple[int, int]], boxes: torch.Tensor, classes: list[str],
                 mode: str, size: int | None):
        self.paths, self.labels, self.classes = PathTable(paths), boxes, classes
        self.sizes = torch.tensor(sizes, dtype=torch.int64).view(-1, 2)  # one tensor: see PathTable
        self.mode, self.size = mode, size
        self.scale = 255.0

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def load(self, i: int, augment: SampleAugment | None,
             g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = read_image(self.paths[i], self.mode)
        w, h = self.sizes[i].tolist()
        if (x.shape[2], x.shape[1]) != (w, h):
            raise DataError(f"{self.paths[i]} is {x.shape[2]}x{x.shape[1]} but its annotation entry says {w}x{h}; "
                            "the boxes would not fit it: fix the entry's width and height")
        if self.size is not None:
            x = resize_square(x, self.size)
        y = self.labels[i]
        if augment is not None and g is not None:
            x, y = augment_with_target(x, y, augment, g)
        return x, y


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON annotation file ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(data, dict) or not data.get("images") or not data.get("annotations") \
            or not data.get("categories"):
        raise DataError(f"{path}: an empty COCO annotation file (it needs 'images', 'annotations' and "
                        "'categories', none of them empty)")
    return data


def _files(root: Path) -> dict[str, tuple[Path, Path]]:
    """split -> (annotation file, image folder)."""
    out: dict[str, tuple[Path, Path]] = {}
    ann = root / "annotations"
    for split, names in (("train", ("train",)), ("test", ("test", "val"))):
        for n in names:
            coco = sorted(ann.glob(f"instances_{n}*.json")) if ann.is_dir() else []
            if coco:
                stem = coco[-1].stem.split("_", 1)[1]  # instances_val2017 -> val2017
                out[split] = (coco[-1], root / stem)
                break
            if (root / f"{n}.json").is_file():
                out[split] = (root / f"{n}.json", root / n)
                break
    for split, coco_name in (("train", "train2017"), ("test", "val2017")):
        if split not in out:
            raise DataError(f"coco: no {split} annotations in {root}: put annotations/instances_{coco_name}.json "
                            f"(its images in {coco_name}/), or {split}.json (its images in {split}/)")
    return out


def _parse(path: Path, folder: Path, cfg: DataConfig, categories: dict[int, int] | None
           ) -> tuple[list[Path], list[tuple[int, int]], torch.Tensor, dict[int, int], list[str], int]:
    data = _read_json(path)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        from pycocotools.coco import COCO

        coco = COCO()
        coco.dataset = data
        try:
            coco.createIndex()
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: not in the COCO format (missing {e}); each image needs 'id', each annotation "
                            "'id', 'image_id', 'category_id' and 'bbox'") from None
    names: list[str] = []
    if categories is None:
        ids = sorted(coco.cats)
        categories = {cid: i for i, cid in enumerate(ids)}
        names = [str(coco.cats[c].get("name", c)) for c in ids]
    image_ids = sorted(coco.imgs)
    for a in data["annotations"]:
        if a.get("image_id") not in coco.imgs:
            raise DataError(f"{path}: annotation {a.get('id')} names image {a.get('image_id')}, which the file does "
                            "not list under 'images'")
        if a.get("category_id") not in categories:
            raise DataError(f"{path}: annotation {a.get('id')} has category_id {a.get('category_id')}, not one of the "
                            f"categories {sorted(categories)}")
    paths, sizes, per_image = [], [], []
    skipped = 0
    for iid in image_ids:
        entry = coco.imgs[iid]
        p = folder / str(entry.get("file_name", ""))
        if not p.is_file():
            raise DataError(f"{path}: image {iid} is {p}, which does not exist; put the images in {folder}")
        w, h = int(entry.get("width", 0)), int(entry.get("height", 0))
        if w <= 0 or h <= 0:
            raise DataError(f"{path}: image {iid} ({p.name}) states no width and height")
        rows = []
        for a in coco.imgToAnns.get(iid, []):
            if a.get("iscrowd", 0):
                continue
            x, y, bw, bh = (float(v) for v in a["bbox"])
            bad = bw <= 0 or bh <= 0 or x < -TOLERANCE or y < -TOLERANCE or x + bw > w + TOLERANCE \
                or y + bh > h + TOLERANCE
            if bad and cfg.on_bad_box == "skip":
                skipped += 1
                continue
            if bad:
                raise DataError(f"{path}: annotation {a.get('id')} of {p.name} ({w}x{h}) has the box [x, y, w, h] = "
                                f"{a['bbox']}, {'without area' if bw <= 0 or bh <= 0 else 'outside the image'}; fix "
                                "it, or set data.on_bad_box=skip to leave such boxes out")
            rows.append([max(0.0, x) / w, max(0.0, y) / h, min(w, x + bw) / w, min(h, y + bh) / h,
                         float(categories[a["category_id"]])])
        paths.append(p)
        sizes.append((w, h))
        per_image.append(rows)
    m = max(1, max(len(r) for r in per_image))
    boxes = torch.full((len(per_image), m, 5), -1.0)
    for i, rows in enumerate(per_image):
        if rows:
            boxes[i, :len(rows)] = torch.tensor(rows)
    return paths, sizes, boxes, categories, names, skipped


def load(cfg: DataConfig, need_train: bool = True) -> tuple[CocoSet | None, CocoSet]:
    root = require_root(cfg.root, "coco", "COCO annotation files (annotations/instances_*.json or train.json and "
                                          "test.json) and their image folders")
    files = _files(root)
    tr_paths, tr_sizes, tr_boxes, cats, names, tr_skip = _parse(*files["train"], cfg, None)
    te_paths, te_sizes, te_boxes, _, _, te_skip = _parse(*files["test"], cfg, cats)
    if tr_skip or te_skip:
        from ..errors import warn

        warn(f"coco: left out {tr_skip + te_skip} box(es) outside their image or without area "
             f"({tr_skip} training, {te_skip} test; data.on_bad_box=skip)")
    sizes = set(tr_sizes + te_sizes)
    if len(sizes) > 1 and cfg.image_size is None:
        raise DataError(f"coco: the images have {len(sizes)} different sizes; set data.image_size to resize them to "
                        "one square size (the boxes follow)")
    mode = image_mode(tr_paths[0], cfg.channels)
    train = CocoSet(tr_paths, tr_sizes, tr_boxes, names, mode, cfg.image_size)
    test = CocoSet(te_paths, te_sizes, te_boxes, names, mode, cfg.image_size)
    return (train if need_train else None), test
