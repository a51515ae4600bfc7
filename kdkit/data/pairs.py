"""LFW-style verification pairs (``data.pairs``): the test split of ``task: embedding`` as a list of image pairs.

The file (a path, relative to ``data.root`` unless absolute) holds one pair per line::

    name   n1   n2          the same identity: <root>/<name>/<name>_<n1 as 4 digits>.<ext> and ..._<n2>
    name1  n1   name2  n2   two identities

with an optional first line of one or two integers (LFW's "folds pairs-per-fold" header), blank lines and
``#`` comments ignored. Images are found in the identity folders under ``data.root`` (the ``imagefolder``
layout, any image extension). The identities the pairs name are kept out of training (an open-set split, as
``data.unseen_classes``), and the test metrics are computed on the listed pairs only: their genuine/impostor
flags are the file's, not inferred. A malformed line, or a pair naming an image that does not exist, is an
error giving the file and the line number.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import DataError
from .imagefolder import EXTENSIONS, image_mode
from .images import ImageSet
from .natural import read_image, resize_square


def _image(root: Path, name: str, number: str, where: str) -> Path:
    if not number.isdigit():
        raise DataError(f"{where}: image number {number!r} is not a whole number")
    stem = f"{name}_{int(number):04d}"
    folder = root / name
    found = [p for p in (folder.glob(f"{stem}.*") if folder.is_dir() else []) if p.suffix.lower() in EXTENSIONS]
    if not found:
        raise DataError(f"{where}: no image {folder / stem}.<jpg|png|...>; the pairs name images of the identity "
                        f"folders under {root}")
    return found[0]


def parse_pairs(path: Path, root: Path) -> list[tuple[Path, Path, bool]]:
    """(image, image, same identity) for every line of an LFW-style pairs file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.pairs: cannot read {path} ({e}); give an LFW-style pairs file") from None
    out = []
    for n, line in enumerate(lines, start=1):
        tokens = line.split("#", 1)[0].split()
        if not tokens or (n == 1 and len(tokens) <= 2 and all(t.isdigit() for t in tokens)):
            continue  # blank, comment, or LFW's header
        where = f"{path}, line {n}"
        if len(tokens) == 3:
            out.append((_image(root, tokens[0], tokens[1], where), _image(root, tokens[0], tokens[2], where), True))
        elif len(tokens) == 4:
            out.append((_image(root, tokens[0], tokens[1], where), _image(root, tokens[2], tokens[3], where), False))
        else:
            raise DataError(f"{where}: {len(tokens)} fields; a pair is 'name n1 n2' (same identity) or "
                            "'name1 n1 name2 n2' (two identities)")
    if not out:
        raise DataError(f"data.pairs: {path} lists no pairs")
    if all(same for *_, same in out) or not any(same for *_, same in out):
        raise DataError(f"data.pairs: {path} lists only {'genuine' if out[0][2] else 'impostor'} pairs; verification "
                        "needs both")
    return out


def pairs_set(cfg: DataConfig, root: Path, classes: list[str]) -> tuple[ImageSet, list[str]]:
    """The images of the pairs file (each once) with their identity labels (index into `classes` where the
    identity is a training class, new indices after them otherwise) and the pairs ``[P, 3]`` (i, j, same);
    and the names of the identities the pairs use."""
    assert cfg.pairs is not None
    path = Path(cfg.pairs).expanduser()
    path = path if path.is_absolute() else root / path
    pairs = parse_pairs(path, root)
    index: dict[Path, int] = {}
    for a, b, _ in pairs:
        for p in (a, b):
            index.setdefault(p, len(index))
    files = list(index)
    names = sorted({p.parent.name for p in files})
    ids = {c: i for i, c in enumerate(classes)}
    extra = {n: len(classes) + i for i, n in enumerate(x for x in names if x not in ids)}
    mode = image_mode(files[0], cfg.channels)
    xs = []
    for p in files:
        x = read_image(p, mode)
        xs.append(resize_square(x, cfg.image_size) if cfg.image_size else x)
    if len({tuple(x.shape) for x in xs}) > 1:
        raise DataError("data.pairs: the images have different sizes; set data.image_size")
    labels = torch.tensor([ids.get(p.parent.name, extra.get(p.parent.name, -1)) for p in files])
    table = torch.tensor([[index[a], index[b], int(same)] for a, b, same in pairs])
    return ImageSet(torch.stack(xs), labels, classes, pairs=table), names
