"""Run configuration: YAML recipes, dotted ``key=value`` overrides, typed validation.

A config has the sections ``model`` (for ``kdkit train``), ``teacher`` and ``student`` (for
``kdkit distill``), ``data``, ``method``, ``train``, plus ``name``, ``seed`` and ``output_dir``.
Everything is validated before any work starts: unknown keys get a did-you-mean, values are checked
against their types and bounds, model arguments against the model factory's signature and method
options against the method's own options dataclass.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .schema import opt, parse, to_dict


@dataclass
class ModelConfig:
    """A model: a zoo ``arch`` or a user ``module: package.module:factory``, its arguments, a checkpoint.

    Any key other than ``arch``, ``module`` and ``checkpoint`` is an argument of the model factory
    (``width: 0.5``, ``depth: 16``...). ``num_classes``, ``in_channels`` and ``input_size`` are filled
    in from the data when not given.
    """

    arch: str | None = None
    module: str | None = None
    checkpoint: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.arch and self.module:
            raise ConfigError(f"{where}: give either 'arch' (zoo model) or 'module' (your factory), not both")
        if not (self.arch or self.module or self.checkpoint):
            raise ConfigError(
                f"{where}: needs 'arch' (a zoo model, see `kdkit models`), "
                f"'module: package.module:factory', or a 'checkpoint' written by kdkit"
            )
        if self.module and ":" not in self.module:
            raise ConfigError(f"{where}.module: expected 'package.module:factory', got {self.module!r}")

    @property
    def label(self) -> str:
        return self.arch or self.module or Path(self.checkpoint or "?").name


def parse_model(data: Any, where: str) -> ModelConfig | None:
    """ModelConfig from a mapping whose non-reserved keys are factory arguments."""
    if data is None:
        return None
    if isinstance(data, str):  # `student: lenet5_half` shorthand
        data = {"arch": data}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with 'arch' or 'module', got {data!r}")
    reserved = {f.name for f in dataclasses.fields(ModelConfig)} - {"args"}
    base = {k: v for k, v in data.items() if k in reserved}
    args = dict(data.get("args") or {})
    args.update({k: v for k, v in data.items() if k not in reserved and k != "args"})
    cfg = parse(ModelConfig, base, where)
    cfg.args = args
    cfg.validate(where)
    if cfg.arch or cfg.module:
        from .models import check_factory_args

        check_factory_args(cfg, where)
    return cfg


@dataclass
class AugmentConfig:
    crop_padding: int = opt(0, "random crop with this much zero padding (0: off)", ge=0)
    hflip: bool = opt(False, "random horizontal flip")
    random_resized_crop: bool = opt(False, "streamed images: a random 8-100% crop (aspect 3/4-4/3) resized to "
                                           "data.image_size, per sample")
    color_jitter: float = opt(0.0, "streamed images: brightness, contrast and saturation each scaled by a factor in "
                                   "[1 - s, 1 + s], per sample (0: off)", ge=0, lt=1)


@dataclass
class ScenesConfig:
    train: int = opt(5000, "mnist-scenes: training scenes (made from training digits only)", gt=0)
    test: int = opt(1000, "mnist-scenes: test scenes (made from test digits only)", gt=0)
    size: int = opt(64, "mnist-scenes: side of the square canvas", ge=28)
    max_digits: int = opt(4, "mnist-scenes: each scene holds 1..max_digits digits", ge=1)
    min_scale: float = opt(0.8, "mnist-scenes: smallest digit scale (1 = 28 pixels)", gt=0)
    max_scale: float = opt(1.5, "mnist-scenes: largest digit scale", gt=0)
    seed: int = opt(0, "mnist-scenes: seed of the scenes (fixed across training seeds)")
    folder: str | None = opt(None, "mnist-scenes: where the scenes are written once (default: data.root/scenes)")
    labels: Literal["masks", "boxes"] = opt("masks", "mnist-scenes: label maps (segmentation) or the digits' boxes "
                                                     "(detection)")


@dataclass
class DataConfig:
    name: str = opt("digits", "dataset: digits, mnist, fashion-mnist, kmnist, cifar10, cifar100, svhn, imagefolder, "
                              "filelist; segmentation: mnist-scenes, segfolder; detection: mnist-scenes "
                              "(data.scenes.labels=boxes), coco")
    root: str | None = opt(None, "folder holding the dataset's files (not needed for digits)")
    image_size: int | None = opt(None, "resize images to this square size once, at load time", gt=0)
    channels: int | None = opt(None, "imagefolder: 1 (grayscale) or 3 (RGB); default from the images", ge=1)
    val_split: float = opt(0.1, "validation split carved from the training set: fraction (<1) or count", ge=0)
    test_split: float = opt(0.2, "test split for datasets without one (digits, flat imagefolder)", gt=0, lt=1)
    split_seed: int = opt(0, "seed of the validation/test split (fixed across training seeds)")
    train_subset: int | None = opt(None, "keep only this many labeled training images per class", gt=0)
    shots_per_class: int | None = opt(None, "few-shot methods: images per class (N-shot contains smaller)", gt=0)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    source: str = opt("mnist", "mnist-scenes: the idx dataset in data.root the digits come from (mnist, "
                               "fashion-mnist, kmnist)")
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    ignore_index: int = opt(255, "segmentation: the label-map value of pixels that count nowhere", ge=0)
    pairs: str | None = opt(None, "task: embedding: an LFW-style pairs file (relative to data.root) giving the test "
                                  "split: its identities are kept out of training, the listed pairs are scored")
    unseen_classes: list[int] = opt([], "task: embedding: classes (identities) kept out of training; their training "
                                        "images give the validation split (data.val_split of them) and their test "
                                        "images the test split: verification on identities never seen")
    on_bad_box: Literal["stop", "skip"] = opt(
        "stop", "detection (coco): a box outside its image or without area stops before any work naming the file "
                "and the annotation (stop), or is left out and counted in the run log (skip)")
    normalize: bool = opt(True, "normalise with the training set's per-channel mean and std")
    in_memory: bool | Literal["auto"] = opt(
        "auto", "hold the decoded data in memory (true), stream it from disk in worker processes (false), or "
        "auto: in memory when its decoded size is at most data.memory_limit_mb; the run log says which and why")
    memory_limit_mb: float = opt(2048.0, "data.in_memory=auto: the largest decoded size held in memory", gt=0)
    workers: int | Literal["auto"] = opt("auto", "streaming: worker processes decoding samples (auto: one per core "
                                                 "but one, at most 8; 0: in the main process)")
    on_bad_file: Literal["stop", "skip"] = opt(
        "stop", "streaming: an unreadable image stops the run naming the file (stop), or is left out with a "
                "warning and counted in summary.json (skip)")
    eval_crop: float = opt(1.0, "image files with data.image_size: resize the shorter side to image_size / "
                                "eval_crop and take the centre square (0.875: the ImageNet convention)", gt=0, le=1)
    epoch_steps: int | None = opt(None, "a loader without len (an IterableDataset): its batches per pass (else "
                                        "kdkit counts them once before training)", gt=0)

    def validate(self, where: str) -> None:
        from .data import DATASETS

        if self.name not in DATASETS:
            from .errors import did_you_mean

            raise ConfigError(
                f"{where}.name: unknown dataset {self.name!r}{did_you_mean(self.name, DATASETS)}; "
                f"available: {', '.join(sorted(DATASETS))}"
            )
        if self.val_split >= 1 and not float(self.val_split).is_integer():
            raise ConfigError(f"{where}.val_split: a fraction below 1 or a whole count, got {self.val_split}")


@dataclass
class TrainConfig:
    epochs: int = opt(10, "epochs (per stage, unless the method sets its own budgets)", ge=0)
    batch_size: int = opt(128, "global batch size (split across torchrun processes)", gt=0)
    eval_batch_size: int = opt(512, "batch size for evaluation", gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = opt("sgd", "optimizer")
    lr: float = opt(0.05, "learning rate", gt=0)
    momentum: float = opt(0.9, "SGD momentum", ge=0, lt=1)
    nesterov: bool = opt(False, "SGD Nesterov momentum")
    betas: list[float] = opt([0.9, 0.999], "Adam/AdamW betas")
    weight_decay: float = opt(5e-4, "weight decay", ge=0)
    schedule: Literal["cosine", "step", "constant"] = opt("cosine", "learning-rate schedule")
    milestones: list[float] = opt([], "step schedule: epochs (or fractions of the budget if < 1)")
    gamma: float = opt(0.1, "step schedule: factor at each milestone", gt=0)
    warmup_epochs: float = opt(0.0, "linear warm-up length in epochs", ge=0)
    grad_clip: float | None = opt(
        5.0, "clip each step's gradient norm to this value (null: off). The default keeps distillation at the "
        "student's own learning rate from diverging: KD's T^2-scaled gradient is several times a cross-entropy's "
        "(see BENCHMARKS.md, 'How the recipes were chosen')", gt=0)
    grad_clip_relative: float | None = opt(
        None, "clip each step's gradient norm at this multiple of the running mean of the earlier steps' norms "
        "(scale-free: whatever the scale of the loss, only the spikes are cut)", gt=1)
    agc: float | None = opt(None, "adaptive gradient clipping (Brock et al. 2021): scale each output unit's "
                            "gradient down to at most this fraction of its weights' norm (e.g. 0.01-0.16)", gt=0)
    on_nonfinite: Literal["recover", "stop"] = opt(
        "recover", "a non-finite loss or gradient: 'recover' restores the last good checkpoint, multiplies the "
        "learning rate by train.recover_lr_factor and continues (a second fault stops the run); 'stop' stops at once")
    recover_lr_factor: float = opt(0.1, "learning-rate factor applied once when recovering from a non-finite step",
                                   gt=0, le=1)
    amp: bool = opt(False, "mixed precision (bfloat16 on CPU, float16 on CUDA)")
    channels_last: bool = opt(False, "models and batches in channels_last memory format")
    compile: bool = opt(False, "torch.compile the student and the teacher (the first steps compile)")
    teacher_cache: bool = opt(True, "keep the frozen teacher's outputs per image when a stage's images repeat "
                              "exactly (no random augmentation), so later epochs skip the teacher; off under "
                              "train.deterministic, whose resumed runs must match bit for bit")
    teacher_cache_mb: float = opt(2048.0, "teacher cache size kept in memory; past it, memory-mapped temporary files",
                                  ge=0)
    deterministic: bool = opt(False, "deterministic algorithms (bit-identical reruns, slower on GPU)")
    select: Literal["best_val", "last"] = opt("best_val", "final model: best validation accuracy (ties: the lower "
                                              "validation loss), or last")
    eval_every: int = opt(1, "evaluate on the validation split every N epochs", ge=1)
    checkpoint_every: int = opt(0, "also checkpoint every N steps inside an epoch (0: per epoch only)", ge=0)
    checkpoint_min: float = opt(0.0, "write the end-of-epoch checkpoint only when this many minutes passed since the "
                                "last one (0: after every epoch); for epochs of seconds whose state is large, e.g. "
                                "FastDFKD's memory of images. The last epoch of a stage, a stop signal, the time "
                                "budget and an early stop always write one; a crash loses at most this much work",
                                ge=0)
    log_every: int = opt(50, "log training losses every N steps", ge=1)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = opt(None, "CPU threads for torch (default: torch's choice)", gt=0)
    progress: Literal["auto", "bar", "lines", "none"] = opt("auto", "progress bar on a terminal, else lines")
    time_budget_min: float | None = opt(None, "stop training after this many minutes (the stage ends, later "
                                        "stages are skipped, the last state is kept)", gt=0)
    schedule_to_budget: bool = opt(True, "with time_budget_min: the learning-rate schedules reach their end when "
                                   "the budget is spent (at the run's measured pace) if that comes before the "
                                   "planned steps; false: the budget cuts the planned schedule")
    snapshot_min: list[float] = opt([], "keep the evaluated model at these minutes of training; each is scored "
                                    "on the test split after training (summary: snapshots)")
    latency_budget_s: float = opt(2.0, "seconds the report card may spend timing each model's CPU latency at "
                                  "each batch size (1 and 64; at least 5 calls after the warm-up); 0 leaves "
                                  "latency out of the report card (null)", ge=0)
    vs_alone: bool = opt(False, "kdkit distill: also train the student alone with the same seed, data, schedule and "
                         "budget (RUN_DIR/alone), and report the paired difference (summary: vs_alone)")

    def validate(self, where: str) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{where}.betas: expected two numbers in [0, 1), got {self.betas}")
        if sorted(self.milestones) != list(self.milestones):
            raise ConfigError(f"{where}.milestones: must be increasing, got {self.milestones}")
        if sorted(self.snapshot_min) != list(self.snapshot_min) or any(m <= 0 for m in self.snapshot_min):
            raise ConfigError(f"{where}.snapshot_min: positive minutes in increasing order, got {self.snapshot_min}")


@dataclass
class MethodConfig:
    """``name`` picks the method; the other keys are its options (validated by the method)."""

    name: str = "kd"
    options: Any = None


@dataclass
class EmbeddingConfig:
    dim: int = opt(128, "task: embedding: the width of the models' embedding (their output)", gt=0)
    head: Literal["softmax", "cosface", "arcface"] = opt(
        "arcface", "the classifier over training identities: softmax, cosface (Wang et al. 2018), arcface (Deng et "
                   "al. 2019); kdkit.margin_heads")
    scale: float = opt(64.0, "cosface/arcface: the scale s of the cosine logits", gt=0)
    margin: float = opt(0.5, "cosface/arcface: the margin m (arcface: radians; the papers use 0.5, cosface 0.35)",
                        ge=0)
    easy_margin: bool = opt(False, "arcface: apply the margin only where cos(theta) > 0")
    metric: Literal["tar_far1e-2", "tar_far1e-3", "tar_far1e-4", "recall_at_1"] = opt(
        "tar_far1e-3", "the verification metric validation selects on (higher is better)")
    max_eval_images: int = opt(4000, "verification uses every pair of at most this many images of a split (a seeded "
                                     "choice beyond it)", gt=1)


@dataclass
class LoggingConfig:
    tensorboard: bool = opt(False, "also write the logged figures as TensorBoard scalars to RUN_DIR/tensorboard "
                            "(needs the tensorboard package)")


@dataclass
class Config:
    name: str = "run"
    seed: int = 0
    output_dir: str | None = None
    #: classification, segmentation (kdkit.tasks), or auto: the dataset's own task
    task: str = "auto"
    model: ModelConfig | None = None
    teacher: ModelConfig | None = None
    student: ModelConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    #: the recipe's own name when the run was renamed for the data it reads (kdkit.run.named_for_data);
    #: recorded in summary.json, not in config.yaml
    recipe_name: str | None = field(default=None, repr=False, compare=False)
    #: whether output_dir was given explicitly (an override or the Python API), not by a recipe file: an
    #: explicit folder is never renamed for the data (kdkit.run.named_for_data)
    output_dir_given: bool = field(default=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, as written to ``config.yaml``; loading it gives this config back."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed, "output_dir": self.output_dir}
        if self.task != "auto":
            out["task"] = self.task
        for key in ("model", "teacher", "student"):
            m: ModelConfig | None = getattr(self, key)
            if m is not None:
                d = {k: v for k, v in (("arch", m.arch), ("module", m.module), ("checkpoint", m.checkpoint)) if v}
                d.update(m.args)
                out[key] = d
        out["data"] = to_dict(self.data)
        out["method"] = {"name": self.method.name, **to_dict(self.method.options or {})}
        out["train"] = to_dict(self.train)
        out["logging"] = to_dict(self.logging)
        if self.task == "embedding":
            out["embedding"] = to_dict(self.embedding)
        return out


TOP_KEYS = ("name", "seed", "output_dir", "task", "model", "teacher", "student", "data", "method", "train", "logging",
            "embedding")


def parse_value(text: str) -> Any:
    """A command-line override value, read as YAML (`3`, `0.1`, `true`, `[1, 2]`, `null`, `abc`)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it; ``~a.b.c`` removes a key
    (the default then applies)."""
    for item in overrides:
        if item.startswith("~") and "=" not in item:
            parts = item[1:].strip().split(".")
            node: Any = raw
            for p in parts[:-1]:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(parts[-1], None)
            continue
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=3), or ~key to "
                              "remove a key")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key component")
        node = raw
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif isinstance(child, str) and p in ("model", "teacher", "student") and i == 0:
                child = node[p] = {"arch": child}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = parse_value(text)
    return raw


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe into a dict, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} not found; recipes live under configs/ (e.g. configs/digits/kd.yaml)"
        )
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            first = f"{getattr(e, 'problem', None) or first} at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {first}; fix the file there") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def build_config(raw: dict[str, Any], default_method: str = "kd") -> Config:
    """Validate a raw nested dict into a :class:`Config` (method options included)."""
    from .errors import did_you_mean

    if not isinstance(raw, dict):
        raise ConfigError(f"a config is a mapping of sections, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(
                f"unknown config section '{key}'{did_you_mean(str(key), TOP_KEYS)}; "
                f"valid sections: {', '.join(TOP_KEYS)}"
            )
    simple = {k: raw[k] for k in ("name", "seed", "output_dir", "task") if k in raw}
    cfg = parse(Config, simple)
    if cfg.task != "auto":
        from .tasks import get_task

        get_task(cfg.task)
    for key in ("model", "teacher", "student"):
        setattr(cfg, key, parse_model(raw.get(key), key))
    cfg.data = parse(DataConfig, raw.get("data") or {}, "data")
    cfg.train = parse(TrainConfig, raw.get("train") or {}, "train")
    cfg.logging = parse(LoggingConfig, raw.get("logging") or {}, "logging")
    cfg.embedding = parse(EmbeddingConfig, raw.get("embedding") or {}, "embedding")
    if raw.get("embedding") and cfg.task != "embedding":
        raise ConfigError("the embedding section configures task: embedding; set task: embedding or remove it")
    cfg.method = parse_method(raw.get("method"), default_method)
    return cfg


def parse_method(data: Any, default: str = "kd") -> MethodConfig:
    from .methods import METHODS, method_class

    if data is None:
        data = {}
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise ConfigError(f"method: expected a mapping with 'name', got {data!r}")
    data = dict(data)
    name = data.pop("name", default)
    if not isinstance(name, str):
        raise ConfigError(f"method.name: expected a method name, got {name!r}; available: {', '.join(METHODS)}")
    cls = method_class(name)
    return MethodConfig(name=name, options=parse(cls.Options, data, "method"))


def _drop_other_methods_keys(raw: dict[str, Any], recipe_method: Any, recipe_keys: set[str],
                             overrides: list[str]) -> None:
    """When an override switches ``method.name``, the recipe's method options that the new method does not
    have are dropped, with a warning naming them (options given on the command line are still checked)."""
    import dataclasses

    from .errors import warn
    from .methods import METHODS, method_class

    method = raw.get("method")
    if not isinstance(method, dict) or not recipe_method or method.get("name", recipe_method) == recipe_method:
        return
    if method.get("name") not in METHODS:
        return  # the unknown name is reported by the parse
    given = {o.split("=", 1)[0].strip().split(".", 1)[1] for o in overrides
             if o.split("=", 1)[0].strip().startswith("method.")}
    valid = {f.name for f in dataclasses.fields(method_class(method["name"]).Options) if f.init}
    dropped = sorted(k for k in recipe_keys if k not in valid and k not in given)
    for k in dropped:
        method.pop(k, None)
    if dropped:
        warn(f"method.name={method['name']}: the recipe's method keys {', '.join(dropped)} are options of "
             f"{recipe_method}, not of {method['name']}, and were dropped")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                default_method: str = "kd") -> Config:
    """Load a recipe (or start from defaults when `path` is None), apply overrides, validate."""
    raw = load_yaml(path) if path is not None else {}
    overrides = list(overrides or [])
    before = raw.get("method")
    recipe_method = before.get("name") if isinstance(before, dict) else before
    recipe_keys = set(before) - {"name"} if isinstance(before, dict) else set()
    apply_overrides(raw, overrides)
    _drop_other_methods_keys(raw, recipe_method, recipe_keys, overrides)
    cfg = build_config(raw, default_method)
    cfg.output_dir_given = any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides)
    return cfg
