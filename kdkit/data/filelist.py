"""Image files named in lists: ``data.root`` holds ``train.csv`` and ``test.csv`` (or ``val.csv``; ``.tsv``
and ``.txt`` too), one image a line, ``path,label`` (a tab instead of the comma in ``.tsv``), paths relative
to the list's folder. Labels are class indices, or class names (sorted into indices over the training list).
A first line whose label is ``label`` is a header. Files are streamed like an image folder
(:mod:`kdkit.data.imagefolder`).

Before any work: a malformed line is an error naming its line number; files that do not exist are
counted, and the first few named.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import DataError
from .files import require_root
from .imagefolder import image_mode
from .pathtable import PathTable
from .stream import FileSampleSet

SUFFIXES = (".csv", ".tsv", ".txt")


def find_list(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        for suf in SUFFIXES:
            if (root / f"{n}{suf}").is_file():
                return root / f"{n}{suf}"
    return None


def read_list(path: Path) -> tuple[PathTable, list[str]]:
    """(files, label fields) of a list, checked line by line. Read as a stream: a list of a million images
    leaves two arrays and one short string per distinct label, not an object per line."""
    delimiter = "\t" if path.suffix == ".tsv" else ","
    folder = str(path.parent)
    labels: list[str] = []
    distinct: dict[str, str] = {}  # one string object per label value
    missing: list[str] = []
    n_missing = 0

    def files() -> Iterator[str]:
        nonlocal n_missing
        try:
            with open(path, encoding="utf-8", newline="") as f:
                for n, row in enumerate(csv.reader(f, delimiter=delimiter), start=1):
                    if not row or all(not c.strip() for c in row):
                        continue
                    if len(row) != 2 or not row[0].strip() or not row[1].strip():
                        raise DataError(f"{path}, line {n}: expected 'path{delimiter}label', got "
                                        f"{delimiter.join(row)!r}")
                    label = row[1].strip()
                    if n == 1 and label.lower() == "label":
                        continue
                    file = os.path.join(folder, row[0].strip())
                    if not os.path.isfile(file):
                        n_missing += 1
                        if len(missing) < 3:
                            missing.append(file)
                    labels.append(distinct.setdefault(label, label))
                    yield file
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{path}: cannot read the file list ({e})") from None

    table = PathTable(files())
    if not len(table):
        raise DataError(f"{path}: lists no images; expected lines 'path{delimiter}label'")
    if n_missing:
        raise DataError(f"{path}: {n_missing} of {len(table)} listed files do not exist (first: "
                        f"{', '.join(missing)}); paths are relative to the list's folder")
    return table, labels


def _classes(labels: list[str], path: Path) -> list[str]:
    if all(x.lstrip("-").isdigit() for x in labels):
        values = sorted({int(x) for x in labels})
        if values[0] < 0:
            raise DataError(f"{path}: negative label {values[0]}; labels are class indices 0..K-1 or class names")
        return [str(i) for i in range(values[-1] + 1)]
    return sorted(set(labels))


def _indices(labels: list[str], classes: list[str], path: Path) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({x for x in labels if x not in index})
    if unknown:
        raise DataError(f"{path}: labels {unknown[:5]} are not classes of the training list")
    return torch.tensor([index[x] for x in labels], dtype=torch.long)


def load(cfg: DataConfig, need_train: bool = True) -> tuple[FileSampleSet | None, FileSampleSet]:
    root = require_root(cfg.root, "filelist", "train.csv and test.csv (or val.csv; .tsv, .txt): 'path,label' lines")
    train_list, test_list = find_list(root, ("train",)), find_list(root, ("test", "val"))
    if train_list is None or test_list is None:
        raise DataError(f"{root}: needs train.csv and test.csv (or val.csv; .tsv and .txt also work), one "
                        "'path,label' line per image, paths relative to the list")
    train_files, train_labels = read_list(train_list)
    classes = _classes(train_labels, train_list)
    test_files, test_labels = read_list(test_list)
    mode = image_mode(train_files[0], cfg.channels)

    def make(files: PathTable, labels: list[str], path: Path) -> FileSampleSet:
        return FileSampleSet(files, _indices(labels, classes, path), classes, mode, cfg.image_size, cfg.eval_crop)

    test = make(test_files, test_labels, test_list)
    return (make(train_files, train_labels, train_list) if need_train else None), test
