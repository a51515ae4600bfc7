"""``mnist-scenes``: a reproducible semantic-segmentation benchmark built from real digits.

Each scene is a ``size x size`` canvas (64 by default) holding 1..``max_digits`` digits of the source idx
dataset (``data.source``: mnist, fashion-mnist, kmnist, read from ``data.root``), each resized by a random
scale in [``min_scale``, ``max_scale``] and placed at a random position; overlapping digits keep the brighter
pixel. The label map gives each pixel where a digit's stroke is on (its pixel value at least half of 255
after resizing) the digit's class + 1, and 0 (background) elsewhere; a later digit's stroke wins over an
earlier one's. Classes: ``background`` then the source's ten. With ``data.scenes.labels: boxes`` (detection)
the labels are instead each digit's box, tight around its own stroke pixels (whatever covers them later),
with the digit's class (the source's ten classes): ``[max_digits, 5]`` rows (x1, y1, x2, y2, class), stored
in pixels (x2 and y2 exclusive) and handed to the run as fractions of the canvas, padded with rows of -1.

Training scenes are made from training digits only, test scenes from test digits only. Everything follows
from the idx files and ``data.scenes.seed``: the scenes are built once, written under
``data.scenes.folder`` (default ``data.root/scenes``) as ``.npy`` arrays with a ``manifest.json`` holding
the settings, the source files' SHA-256 and the arrays' SHA-256, and read back (checksums verified) by every
later run with the same settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..errors import DataError
from . import idx
from .files import find, require_root
from .images import ImageSet

STROKE = 128  # a resized digit's pixel at least this bright is its stroke (labelled with its class)
FORMAT = 2  # bumped when what is stored changes (2: boxes added): old folders are then rebuilt, not reused


def make_scenes(digits: torch.Tensor, labels: torch.Tensor, count: int, size: int, max_digits: int,
                min_scale: float, max_scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` scenes ``[count, 1, size, size]`` uint8, label maps ``[count, size, size]`` uint8 and boxes
    ``[count, max_digits, 5]`` float32 (x1, y1, x2, y2, class; rows of -1 pad) from ``digits [N, 1, 28, 28]``
    with class ``labels [N]`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    side0 = digits.shape[-1]
    images = torch.zeros(count, 1, size, size, dtype=torch.uint8)
    maps = torch.zeros(count, size, size, dtype=torch.uint8)
    boxes = torch.full((count, max_digits, 5), -1.0)
    n_digits = torch.randint(1, max_digits + 1, (count,), generator=g)
    for i in range(count):
        for k in range(int(n_digits[i])):
            j = int(torch.randint(len(digits), (1,), generator=g))
            scale = min_scale + (max_scale - min_scale) * float(torch.rand(1, generator=g))
            side = max(4, min(size, round(side0 * scale)))
            d = F.interpolate(digits[j:j + 1].float(), size=(side, side), mode="bilinear", align_corners=False,
                              antialias=True)[0, 0].round().clamp(0, 255).to(torch.uint8)
            y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=g))
            patch = images[i, 0, y:y + side, x:x + side]
            torch.maximum(patch, d, out=patch)
            stroke = d >= STROKE
            maps[i, y:y + side, x:x + side][stroke] = int(labels[j]) + 1
            rows, cols = stroke.any(1).nonzero().flatten(), stroke.any(0).nonzero().flatten()
            if len(rows):  # the box of the digit's own stroke, whatever covers it later
                boxes[i, k] = torch.tensor([x + float(cols[0]), y + float(rows[0]), x + float(cols[-1]) + 1,
                                            y + float(rows[-1]) + 1, float(labels[j])])
    return images, maps, boxes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_files(root: Path, source: str) -> dict[str, str]:
    out = {}
    for split in ("train", "test"):
        for base in idx.FILES[split]:
            p = find(root, [base, base + ".gz"], ["", "raw", f"{idx.FOLDERS[source]}/raw", idx.FOLDERS[source]])
            if p is not None:
                out[p.name] = _sha256(p)
    return out


def _settings(cfg: DataConfig) -> dict[str, Any]:
    s = asdict(cfg.scenes)
    s.pop("folder")
    s.pop("labels")  # the same scenes serve both tasks
    return {"format": FORMAT, "source": cfg.source, **s}


def scenes_folder(cfg: DataConfig, root: Path) -> Path:
    """The folder of these settings' scenes: one per source, seed and size, so settings never collide."""
    s = cfg.scenes
    base = Path(s.folder).expanduser() if s.folder else root / "scenes"
    name = (f"{cfg.source}-seed{s.seed}-{s.train}x{s.test}-{s.size}px-max{s.max_digits}-"
            f"scale{s.min_scale:g}-{s.max_scale:g}-v{FORMAT}")
    return base / name


ARRAYS = ("train-images.npy", "train-masks.npy", "train-boxes.npy", "test-images.npy", "test-masks.npy",
          "test-boxes.npy")


def _read(folder: Path, settings: dict[str, Any]) -> list[np.ndarray] | None:
    """The stored arrays when the manifest matches `settings` (checksums verified), else None."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"{manifest}: not a readable manifest; delete {folder} and the next run rebuilds the "
                        "scenes") from None
    if m.get("settings") != settings:
        return None
    out = []
    for name in ARRAYS:
        p = folder / name
        if not p.is_file() or _sha256(p) != m.get("sha256", {}).get(name):
            raise DataError(f"{p}: missing or altered (its SHA-256 does not match {manifest}); delete {folder} and "
                            "the next run rebuilds the scenes")
        out.append(np.load(p))
    return out


def _write(folder: Path, settings: dict[str, Any], arrays: list[np.ndarray], sources: dict[str, str],
           classes: list[str]) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, a in zip(ARRAYS, arrays):
            np.save(folder / name, a)
    except OSError as e:
        raise DataError(f"cannot write the scenes to {folder} ({e.strerror or e}); set data.scenes.folder to a "
                        "folder that can be written") from None
    manifest = {"dataset": "mnist-scenes", "settings": settings, "source_files_sha256": sources,
                "classes": classes, "sha256": {n: _sha256(folder / n) for n in ARRAYS}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def load(cfg: DataConfig, need_train: bool = True) -> tuple[ImageSet | None, ImageSet]:
    """The scenes of `cfg` (built and written on first use), as (train, test) sets with label maps."""
    if cfg.source not in idx.CLASSES:
        raise DataError(f"data.source={cfg.source!r}: mnist-scenes draws digits from an idx dataset: "
                        f"{', '.join(idx.CLASSES)}")
    s = cfg.scenes
    if s.min_scale > s.max_scale:
        raise DataError(f"data.scenes.min_scale={s.min_scale} is above max_scale={s.max_scale}")
    root = require_root(cfg.root, "mnist-scenes", f"the four idx files of {cfg.source} (data.source)")
    settings = _settings(cfg)
    folder = scenes_folder(cfg, root)
    classes = ["background", *idx.CLASSES[cfg.source]]
    arrays = _read(folder, settings)
    if arrays is None:
        train_digits = idx.loader(cfg.source)(cfg, True)[0]
        test_digits = idx.loader(cfg.source)(cfg, False)[1]
        assert train_digits is not None and train_digits.labels is not None and test_digits.labels is not None
        args = (s.size, s.max_digits, s.min_scale, s.max_scale)
        tr = make_scenes(train_digits.images, train_digits.labels, s.train, *args, seed=s.seed)
        te = make_scenes(test_digits.images, test_digits.labels, s.test, *args, seed=s.seed + 1)
        arrays = [a.numpy() for a in (*tr, *te)]
        _write(folder, settings, arrays, _source_files(root, cfg.source), classes)
    tr_x, tr_m, tr_b, te_x, te_m, te_b = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    if s.labels == "boxes":  # detection: the digits' classes only, no background class; boxes as fractions
        classes = classes[1:]
        frac = torch.tensor([1 / s.size] * 4 + [1.0])
        tr_y, te_y = (torch.where(b[..., 4:] >= 0, b * frac, b) for b in (tr_b, te_b))
    else:
        tr_y, te_y = tr_m, te_m
    train = ImageSet(tr_x, tr_y, classes) if need_train else None
    return train, ImageSet(te_x, te_y, classes)
