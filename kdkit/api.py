"""kdkit from Python: the same runs as the command line, on your own modules and data.

    import kdkit
    res = kdkit.distill(teacher, student, train_loader, method="kd", test_data=test_loader,
                        temperature=4, train={"epochs": 5, "lr": 0.01})
    res.model, res.summary["test_accuracy"], res.run_dir

Models are ``nn.Module`` objects (yours, trained or not), zoo names (``"resnet20"``) or paths to kdkit
``model.pt`` files. Data is a kdkit dataset name (``"digits"``, ``"mnist"`` with ``data={"root": ...}``),
or any ``DataLoader`` / iterable of ``(images, labels)`` batches (images alone for unlabeled modes), a
dataset of ``(image, label)`` samples, or an ``(images, labels)`` pair of tensors (:mod:`kdkit.data.memory`).

Options are the YAML recipes' keys: a section as a dict (``train={"epochs": 3}``), a dotted key
(``**{"train.epochs": 3}``), or, for anything that is not a section name, a key of the method
(``temperature=4`` is ``method.temperature``). They are validated exactly as recipes are: a misspelled key
raises a :class:`~kdkit.errors.ConfigError` that names the closest valid one.

Your models are used in place: the student is trained in place (``Result.model`` is the exported
student); the teacher is put in eval mode with gradients off, as the command line does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TOP_KEYS, Config, ModelConfig, build_config
from .errors import ConfigError, KdkitError, ModelError
from .methods import Method, method_class

ModelLike = nn.Module | str | os.PathLike
#: the size of the label space: known, found from the model's output on images, or None (labels' max + 1)
ClassCount = int | Callable[[torch.Tensor], int] | None


@dataclass
class Result:
    """What a run gives back: the trained model, its summary (as in ``summary.json``) and where the run is."""

    model: nn.Module
    summary: dict[str, Any]
    run_dir: Path | None
    method: Method | None = None

    @property
    def test_accuracy(self) -> float:
        """Test top-1 accuracy (classification; see :attr:`test_score` for other tasks)."""
        if "test_accuracy" not in self.summary:
            raise AttributeError(f"a {self.summary.get('task')} run has no test accuracy; use .test_score "
                                 f"({self.summary.get('primary_metric')})")
        return float(self.summary["test_accuracy"])

    @property
    def test_score(self) -> float:
        """The task's primary test metric: accuracy, or mIoU for segmentation."""
        return float(self.summary[f"test_{self.summary.get('primary_metric', 'accuracy')}"])


def distill(teacher: ModelLike, student: ModelLike, train_data: Any = None, method: str = "kd",
            val_data: Any = None, test_data: Any = None, *, resume: bool = False, overwrite: bool = False,
            **options: Any) -> Result:
    """Distill `student` from `teacher` with `method` (any ``kdkit distill`` method; see docs/methods.md).

    `train_data` is None for the data-free methods (rdskd, dafl, dfad, deepinversion), which then need
    `test_data` (or a dataset name) to evaluate on. With an `output_dir` that holds an earlier run,
    ``resume=True`` continues it (the same call, the same data) and ``overwrite=True`` replaces it."""
    return _run("distill", {"teacher": teacher, "student": student}, method, train_data, val_data, test_data,
                options, resume, overwrite)


def train(model: ModelLike, train_data: Any, val_data: Any = None, test_data: Any = None, *, resume: bool = False,
          overwrite: bool = False, **options: Any) -> Result:
    """Train `model` alone with cross-entropy (``kdkit train``): a teacher, or a student baseline. `resume` and
    `overwrite` as in :func:`distill`."""
    return _run("train", {"model": model}, "supervised", train_data, val_data, test_data, options, resume,
                overwrite)


def evaluate(checkpoint: str | os.PathLike, data: str | None = None, root: str | os.PathLike | None = None,
             split: str = "test", batch_size: int = 512) -> dict[str, Any]:
    """A kdkit model file's metrics on a dataset split, by its task (``kdkit eval``): accuracy, mIoU, mAP or
    verification, with the mean supervised loss and the count of scored samples.

    `checkpoint` is a ``model.pt`` or its run folder; `data` and `root` default to the dataset and folder the
    model was trained on (the same scenes, or the same identities kept out of training); `split` is ``"test"``
    or ``"train"`` (every training image: no validation set is carved out)."""
    from dataclasses import replace

    from .config import DataConfig
    from .data import load_data, make_loader
    from .engine import evaluate as evaluate_loader
    from .modelfile import check_compatible, load
    from .tasks import task_for

    if split not in ("test", "train"):
        raise ConfigError(f"evaluate: split must be 'test' or 'train', got {split!r}")
    path = Path(checkpoint)
    if path.is_dir():  # a run folder, as report, export and sample take
        path = path / "model.pt"
    model = load(path)
    mf = model.kdkit_info
    name = data or mf.info.name
    root = root or (mf.meta.get("data_root") if name == mf.info.name else None)
    cfg = DataConfig(name=name, root=None if root is None else str(root), val_split=0.0)
    if name == mf.info.name and mf.meta.get("scenes"):  # the scenes the model was trained on (size, labels...)
        from .config import ScenesConfig
        from .schema import parse

        cfg.scenes = parse(ScenesConfig, dict(mf.meta["scenes"]), "scenes")
        cfg.source = mf.meta.get("data_source", cfg.source)
    if name == mf.info.name and (mf.meta.get("unseen_classes") or mf.meta.get("pairs")):
        # verification on the identities kept out of training: the same classes, or the same pairs file
        cfg.unseen_classes = list(mf.meta.get("unseen_classes") or [])
        cfg.pairs = mf.meta.get("pairs")
        cfg.in_memory = mf.meta.get("in_memory", cfg.in_memory)
    cfg.validate("--data")
    bundle = load_data(cfg)
    if bundle.info.input_shape[1:] != tuple(mf.info.input_shape[1:]):
        cfg.image_size = mf.info.input_shape[1]
        bundle = load_data(cfg)
    check_compatible(mf, bundle.info, "model", str(path))
    loader = make_loader(bundle.split(split), batch_size, cfg, train=False,
                         info=replace(bundle.info, mean=mf.info.mean, std=mf.info.std))
    identities = mf.info.task == "embedding" and bundle.info.task == "classification"  # class indices as identities
    if bundle.info.task != mf.info.task and not identities:
        raise KdkitError(f"{path} is a {mf.info.task} model but {name} is a {bundle.info.task} dataset; "
                         "evaluate it on data of its task (--data)")
    res = evaluate_loader(model, loader, task=task_for(mf.info))
    return {"checkpoint": str(path), "model": mf.label, "data": name, "split": split, **res}


def _section_of(key: str, method: str) -> str:
    """Where a bare keyword option belongs: the method's own options first, then the train section (epochs,
    lr, batch_size...), then the data section; otherwise an error with the closest key of any section."""
    import dataclasses

    from .config import DataConfig, TrainConfig
    from .errors import closest
    from .methods import method_class

    fields = {"method": [f.name for f in dataclasses.fields(method_class(method).Options) if f.init],
              "train": [f.name for f in dataclasses.fields(TrainConfig)],
              "data": [f.name for f in dataclasses.fields(DataConfig)]}
    for section, names in fields.items():
        if key in names:
            return section
    found = [f"{s}.{c}" for s, names in fields.items() for c in closest(key, names, 2)]
    hint = f" (did you mean {' or '.join(repr(f) for f in found[:3])}?)" if found else ""
    raise ConfigError(f"unknown option {key!r}{hint}: keyword options are method options, train and data keys "
                      "(epochs=, lr=, batch_size=...), sections (train={...}) or dotted keys ('train.epochs')")


def _options(options: dict[str, Any], method: str) -> dict[str, Any]:
    """The raw nested config of the keyword options (sections, dotted keys, method, train and data keys)."""
    raw: dict[str, Any] = {"method": {"name": method}, "train": {"progress": "lines"}}
    for key, value in options.items():
        parts = key.split(".")
        if len(parts) == 1 and key not in TOP_KEYS:
            parts = [_section_of(key, method), key]
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option {key!r}: {p!r} is not a section")
        last = parts[-1]
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            node[last].update(value)
        else:
            node[last] = value
    if raw["method"].get("name", method) != method:
        raise ConfigError(f"method given twice ({method!r} and method.name={raw['method']['name']!r}); give it once")
    return raw


def _model(role: str, model: ModelLike, raw: dict[str, Any], given: dict[str, nn.Module]) -> None:
    if isinstance(model, nn.Module):
        given[role] = model
        raw.pop(role, None)
    elif isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        key = "checkpoint" if (text.endswith(".pt") or Path(text).is_file()) else "arch"
        raw[role] = {key: text, **(raw.get(role) or {})}
    else:
        raise ConfigError(f"{role}: expected an nn.Module, a zoo model name or a kdkit model.pt path, "
                          f"got {type(model).__name__}")


def _run(command: str, models: dict[str, ModelLike], method: str, train_data: Any, val_data: Any, test_data: Any,
         options: dict[str, Any], resume: bool = False, overwrite: bool = False) -> Result:
    from .data.memory import memory_bundle
    from .run import execute

    if not isinstance(method, str):
        shown = f"a {type(method).__name__}" + (f" {method!r}"[:80] if isinstance(method, dict) else "")
        raise ConfigError(f"method=: expected a method name such as 'kd', got {shown}; give the method's options "
                          "as keywords beside it: method='kd', temperature=4, kd_weight=0.9")
    raw = _options(options, method)
    given: dict[str, nn.Module] = {}
    for role, m in models.items():
        _model(role, m, raw, given)
    in_memory = not isinstance(train_data, str) and not (train_data is None and isinstance(test_data, str))
    if not in_memory:
        name = train_data if isinstance(train_data, str) else test_data
        if (val_data is not None and not isinstance(val_data, str)) or (test_data is not None and test_data != name):
            raise ConfigError(f"with a kdkit dataset name ({name!r}) the splits come from the dataset: give "
                              "val_data/test_data only with your own training data")
        raw.setdefault("data", {})["name"] = name
    else:
        raw.setdefault("data", {})["name"] = "memory"
        raw["data"].setdefault("normalize", False)  # the user's images go to the models as given
    cfg = build_config(raw, default_method=method)
    cfg.output_dir_given = cfg.output_dir is not None
    if (resume or overwrite) and cfg.output_dir is None:
        raise ConfigError("resume= and overwrite= act on a run folder: give output_dir too")
    for role, module in given.items():
        setattr(cfg, role, ModelConfig(module=f"{type(module).__module__}:{type(module).__qualname__}"))
    bundle = None
    if in_memory:
        cls = method_class(cfg.method.name)
        bundle = memory_bundle(cfg.data, train_data, val_data, test_data, _class_count(cfg, given, models),
                               cls.reads_training_data)
    res = execute(cfg, command, resume=resume, data=bundle, models=given, overwrite=overwrite)
    return Result(res.model, res.summary, res.run_dir, res.method)


def _class_count(cfg: Config, given: dict[str, nn.Module], models: dict[str, ModelLike]) -> ClassCount:
    """How to tell the label space's size: the teacher's (or the trained model's) output size on two images,
    or the class count in its model file; None (the labels' maximum + 1) for a zoo name."""
    role = "teacher" if "teacher" in models else "model"
    module = given.get(role)
    if module is not None:
        from .run import forward_two

        who = f"the {role} ({type(module).__name__})"

        def outputs(x: torch.Tensor) -> int:
            out = forward_two(module, x, who)
            if not isinstance(out, torch.Tensor) or out.dim() not in (2, 4):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelError(f"{who} outputs {shape} for a batch of 2; it must return [batch, classes] logits "
                                 "(or [batch, classes, H, W] for segmentation)")
            return int(out.shape[1])
        return outputs
    spec: ModelConfig | None = getattr(cfg, role)
    if spec is not None and spec.checkpoint:
        from .engine.checkpoint import read
        from .modelfile import is_model_file, parse_model_file

        obj = read(spec.checkpoint)
        if is_model_file(obj):
            return parse_model_file(obj, spec.checkpoint)[0].info.num_classes
    return None
