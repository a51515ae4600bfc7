"""One run, start to finish: config -> data -> models -> method -> engine -> model file and summary.

Both ``kdkit train`` (method ``supervised`` on ``model``) and ``kdkit distill`` (any distillation method
on ``student`` with ``teacher``) come here; the CLI, the demo and the Python API share this path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from . import __version__
from .config import Config, ModelConfig
from .cpu_steal import STEAL_WARN, StealMeter
from .data import Batch, DataBundle, DataInfo, load_data, make_loader
from .engine import DistInfo, Engine, apply_speed_options, evaluate, init_distributed, load_latest
from .engine.distributed import barrier, broadcast_object, shutdown
from .engine.evaluate import agreement
from .errors import CheckpointError, ConfigError, KdkitError, ModelError, warn
from .jsonfile import write_json
from .measure import count_params, model_card
from .methods import Method, method_class
from .modelfile import BuiltModel, build_from_config, save_model
from .schema import to_dict
from .tasks import get_task, task_for


@dataclass
class RunResult:
    run_dir: Path | None
    summary: dict[str, Any]
    model: nn.Module
    is_main: bool = True  # False on torchrun ranks other than 0
    method: Method | None = None  # the trained method, with every model and extra module


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def pick_device(pref: str, dist: DistInfo) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={pref} but CUDA is not available here; use train.device=cpu")
        return torch.device("cuda", dist.local_rank) if pref == "cuda" else torch.device(pref)
    if pref != "cpu":
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {pref!r}")
    return torch.device("cpu")


def _dataset_pattern() -> re.Pattern[str]:
    from .data import DATASETS

    names = sorted((n for n in DATASETS if n != "memory"), key=len, reverse=True)  # fashion-mnist before mnist
    return re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z0-9])")


def named_for_data(cfg: Config) -> Config:
    """The config with its run name and output folder naming the dataset it reads.

    A recipe written for one dataset and pointed at another (``configs/mnist/kd.yaml data.name=fashion-mnist``)
    would otherwise name its run, folder, plots and reports after the recipe's dataset. Every dataset name
    that appears as a word in ``name`` or in the recipe's ``output_dir`` and differs from ``data.name`` is
    replaced by it (an output_dir given on the command line or from Python is used as given); the recipe's
    name is kept as ``recipe_name`` in the summary."""
    if cfg.data.name == "memory":
        return cfg
    pattern = _dataset_pattern()

    def fix(text: str | None) -> str | None:
        return None if text is None else pattern.sub(cfg.data.name, text)

    name, out = fix(cfg.name), (cfg.output_dir if cfg.output_dir_given else fix(cfg.output_dir))
    if name == cfg.name and out == cfg.output_dir:
        return cfg
    return replace(cfg, name=name or cfg.name, output_dir=out, recipe_name=cfg.name)


def parameters_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers: equal for two runs that start the student from the
    same initialisation (what a paired comparison needs)."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _fresh(path: Path) -> Path:
    """`path`, or `path`-2, -3... : the first that holds no run."""
    n, fresh = 1, path
    while (fresh / "config.yaml").exists():
        n += 1
        fresh = path.with_name(f"{path.name}-{n}")
    return fresh


def make_run_dir(cfg: Config, resume: bool, dist: DistInfo, overwrite: bool = False) -> Path:
    """Create (or, on resume, check) the run directory; rank 0 decides, the others follow.

    A folder that holds an earlier run is never written over silently: ``overwrite`` replaces it, an
    output_dir given explicitly is an error naming the ways on, and a recipe's (or the default) folder gives
    way to a fresh ``-2`` (``-3``...) beside it, said in the log."""
    import shutil

    path: Any = None
    if dist.is_main:
        if cfg.output_dir:
            path = Path(cfg.output_dir)
        else:
            path = _fresh(Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        if resume:
            if not (path / "config.yaml").is_file():
                raise CheckpointError(f"nothing to resume in {path}: it holds no config.yaml of an earlier run")
        elif (path / "config.yaml").exists():
            if overwrite:
                shutil.rmtree(path)
            elif cfg.output_dir_given:
                raise ConfigError(
                    f"output_dir {path} already holds a run: continue it with --resume {path} (resume=True in "
                    "Python), replace it with --overwrite (overwrite=True), or choose another output_dir")
            else:
                fresh = _fresh(path)
                print(f"kdkit: {path} holds an earlier run; this run goes to {fresh} (--overwrite replaces it, "
                      f"--resume {path} continues it)", file=sys.stderr, flush=True)
                path = fresh
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run folder {path} ({e.strerror or e}); choose another output_dir "
                              "that can be written") from None
        path = str(path)
    return Path(broadcast_object(path, dist))


def forward_two(model: nn.Module, x: torch.Tensor, who: str, where: str = "", fix: str = "") -> Any:
    """Run the model once, in eval mode and without gradients, on the first two images of `x` (moved to the
    model's device), restoring its mode after, and return what it returns. A model that cannot take the
    images gives one ModelError naming `who`, the input shape, `where` they come from and the `fix`; what the
    output must look like is the caller's to check."""
    was = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            return model(x[:2].to(device))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"{who} cannot take inputs of shape {tuple(x.shape[1:])}{where}: {first[:160]}{fix}"
                         ) from None
    finally:
        model.train(was)


def check_forward(model: nn.Module, x: torch.Tensor, info: DataInfo, role: str, label: str) -> None:
    """Run the model once on two images: a clear error if it cannot take the data's inputs or breaks the task's
    output contract ([batch, classes] logits; [batch, classes, H, W] for segmentation)."""
    out = forward_two(model, x, f"{role} {label}", f" from {info.name}",
                      "; set data.image_size (or the model's input_size/in_channels) to match")
    task_for(info).check_output(out, x[:2], info.num_classes, f"{role} {label}", info.name)


def resolve_task(cfg: Config, info: DataInfo, cls: type[Method]) -> None:
    """Set the run's task from the data (``task: auto``) or check the configured one against it, and check that
    the method works on it: one-line errors before any work."""
    if cfg.task == "embedding" and info.task == "classification":  # identities: labels like classes
        info.task, info.embedding = "embedding", to_dict(cfg.embedding)
    elif cfg.data.unseen_classes or cfg.data.pairs:
        key = "data.unseen_classes" if cfg.data.unseen_classes else "data.pairs"
        raise ConfigError(f"{key} holds identities out of training for verification: set task: embedding, or "
                          "remove it")
    data_task = info.task
    if cfg.task not in ("auto", data_task):
        what = {"classification": "one class per image", "segmentation": "a label map per image",
                "detection": "boxes per image"}
        raise ConfigError(f"task: {cfg.task}, but {info.name} is a {data_task} dataset ({what.get(data_task, '')}); "
                          f"pick a {cfg.task} dataset (data.name) or set task: auto")
    if data_task not in cls.tasks:
        from .methods import METHODS

        able = sorted(n for n, c in METHODS.items() if data_task in c.tasks)
        raise ConfigError(f"method {cls.name!r} does not work on {data_task}; methods for {data_task}: "
                          f"{', '.join(able)}")


def _eval_loader(data: DataBundle, split: str, cfg: Config, device: torch.device, dist: DistInfo) -> Any:
    return make_loader(data.split(split), cfg.train.eval_batch_size, cfg.data, train=False, info=data.info,
                       device=device, rank=dist.rank, world=dist.world, channels_last=cfg.train.channels_last)


def prepare(cfg: Config, command: str, given: frozenset[str] = frozenset()) -> Config:
    """Check that the config fits the command (train: a model; distill: a student and a teacher); `given`
    names the roles whose model the caller passes as an object (the Python API)."""
    cls = method_class(cfg.method.name)
    if cfg.logging.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
        except ImportError:
            raise ConfigError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
                              "(or set logging.tensorboard=false)") from None
    if command == "train":
        if cls.needs_teacher:
            raise ConfigError(f"method {cfg.method.name!r} distills from a teacher; use kdkit distill")
        if cfg.model is None:
            raise ConfigError("kdkit train needs a 'model' section (model.arch=lenet5, or a module/checkpoint)")
        if cfg.student is not None or cfg.teacher is not None:
            raise ConfigError("kdkit train uses 'model'; 'teacher'/'student' belong to kdkit distill configs")
    else:
        if not cls.needs_teacher:
            raise ConfigError(f"method {cfg.method.name!r} trains a model alone; use kdkit train")
        if cfg.student is None:
            raise ConfigError("kdkit distill needs a 'student' section (student.arch=lenet5_half)")
        if cfg.teacher is None or not (cfg.teacher.checkpoint or "teacher" in given):
            raise ConfigError("kdkit distill needs a trained teacher: teacher.checkpoint=PATH/model.pt")
        if cfg.model is not None:
            raise ConfigError("kdkit distill uses 'student' and 'teacher'; 'model' belongs to kdkit train configs")
    return cfg


def execute(cfg: Config, command: str, resume: bool = False, *, data: DataBundle | None = None,
            models: dict[str, nn.Module] | None = None, overwrite: bool = False) -> RunResult:
    """Run `command` ("train" or "distill") for `cfg`; with `resume`, continue the run in cfg.output_dir.

    The Python API (:mod:`kdkit.api`) passes `data` (a bundle made from the user's tensors or loaders, used
    instead of reading ``cfg.data``) and `models` (the user's own modules by role: "model", "student",
    "teacher"; their config sections then only label them)."""
    models = dict(models or {})
    prepare(cfg, command, frozenset(models))
    if not resume:
        cfg = named_for_data(cfg)
    t_start = time.time()
    dist = init_distributed(cfg.train.device)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        alone_models = _alone_models(cfg, command, models)
        result = _execute(cfg, command, resume, dist, t_start, data, models, overwrite)
        if alone_models is not None:
            result = _versus_alone(cfg, result, resume, dist, data, alone_models)
        return result
    finally:
        torch.set_num_threads(threads)  # leave the process as we found it (demo, notebooks, tests)
        torch.use_deterministic_algorithms(deterministic)
        shutdown()


def _execute(cfg: Config, command: str, resume: bool, dist: DistInfo, t_start: float, given_data: DataBundle | None,
             models: dict[str, nn.Module], overwrite: bool = False) -> RunResult:
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.batch_size < dist.world:
        raise ConfigError(f"train.batch_size={tc.batch_size} is smaller than the {dist.world} processes")
    seed_everything(cfg.seed, tc.deterministic)
    device = pick_device(tc.device, dist)
    cls = method_class(cfg.method.name)
    teacher_obj = None  # a data-free run reads the teacher's file once, for its normalisation and weights
    if given_data is not None:
        data = given_data if cls.reads_training_data else replace(given_data, train=None, fewshot=None)
    elif cls.reads_training_data:
        data = load_data(cfg.data)
    else:  # data-free: never read the training images; normalise as the teacher was trained
        stats, teacher_obj = _teacher_stats(cfg) if "teacher" not in models else (None, None)
        data = load_data(cfg.data, train_images=False, stats=stats)
    info = data.info
    resolve_task(cfg, info, cls)
    task = task_for(info)
    primary = task.primary

    role = "model" if command == "train" else "student"
    student_spec: ModelConfig = cfg.model if command == "train" else cfg.student  # type: ignore[assignment]
    built = _build(student_spec, info, role, models.get(role))
    student, student_spec, student_args = built.model, built.spec, built.args
    init_fingerprint = parameters_fingerprint(student)
    teacher = None
    t_built = None
    if command == "distill":
        assert cfg.teacher is not None
        t_built = _build(cfg.teacher, info, "teacher", models.get("teacher"), loaded=teacher_obj)
        teacher = t_built.model
        if t_built.file is not None:
            _check_normalisation(t_built.file.info, info)

    if data.notes and dist.is_main and tc.progress != "none":
        for note in data.notes:
            print(f"kdkit: {note}", file=sys.stderr, flush=True)
    if cls.needs_images and not info.is_images:
        raise ConfigError(f"method {cfg.method.name!r} works on images [C, H, W]; this data's samples are "
                          f"{tuple(info.input_shape)}: use kd, fitnets, adaptive or th_kd on them")
    if data.train is not None:
        first = next(iter(make_loader(data.train, 8, cfg.data, train=False, info=info, workers=0)))
        sample = replace(first, x=first.x[:8], y=None if first.y is None else first.y[:8], index=None)
    else:  # shapes are all the checks need: noise, not an image of any split
        g = torch.Generator().manual_seed(cfg.seed)
        sample = Batch(torch.randn(2, *info.input_shape, generator=g), None, torch.arange(2))
    check_forward(student, sample.x, info, role, student_spec.label)
    if teacher is not None:
        check_forward(teacher, sample.x, info, "teacher", cfg.teacher.label)  # type: ignore[union-attr]

    method: Method = cls(cfg.method.options, student=student, teacher=teacher, info=info, train=tc)
    method.to(device)
    method.data = data
    roles = {"student": (student_spec, student_args)}
    if t_built is not None:
        roles["teacher"] = (t_built.spec, t_built.args)
    method.specs = roles
    method.setup(replace(sample, x=sample.x.to(device)))
    apply_speed_options(tc, [method], [method.student, getattr(method, "teacher", None)])

    run_dir = make_run_dir(cfg, resume, dist, overwrite)
    if dist.is_main:
        method.run_dir = run_dir

        def save_artifact(filename: str, model: nn.Module, role: str) -> None:
            spec, args = roles[role]
            save_model(run_dir / filename, model, spec, args, info, meta={"method": cfg.method.name, "role": role})

        method.save_artifact = save_artifact
    state = None
    if resume:
        _check_same_config(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")), cfg, run_dir)
        state = load_latest(run_dir / "checkpoint.pt")
        if state is None:
            warn(f"{run_dir} holds no checkpoint yet (stopped in its first epoch); starting it again")
            if dist.is_main:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    elif dist.is_main:
        try:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot write in the run folder {run_dir} ({e.strerror or e}); choose an output_dir "
                              "that can be written") from None

    teacher_test, teacher_metrics = None, None
    if teacher is not None:
        teacher_metrics = evaluate(teacher.to(device), _eval_loader(data, "test", cfg, device, dist), dist, task)
        teacher_test = teacher_metrics[primary]

    engine = Engine(method, data, cfg, run_dir=run_dir, dist=dist, device=device, process_start=t_start)
    steal = StealMeter()
    history = engine.fit(resume=state)
    cpu_steal = steal.fraction()
    if cpu_steal is not None and cpu_steal >= STEAL_WARN and dist.is_main:
        warn(f"{run_dir}: the host took {100 * cpu_steal:.0f}% of this machine's CPU time while it trained (steal, "
             "in summary.json: cpu_steal): its wall time, speed and any result under train.time_budget_min are "
             "not those of an idle machine; compare them only with runs that report a like cpu_steal")
    method.finish()
    engine.release_loaders()
    evals: dict[str, Any] = {}

    def ev(split: str) -> Any:  # one evaluation loader per split from here on: its workers start once
        if split not in evals:
            evals[split] = _eval_loader(data, split, cfg, device, dist)
        return evals[split]

    if method.head is not None and dist.is_main:  # the head over the training identities, for head sharing
        torch.save({"kdkit_head": 1, "state_dict": method.head.state_dict(), "embedding": info.embedding,
                    "classes": info.classes}, run_dir / "head.pt")

    final = method.eval_model()
    val = evaluate(final, ev("val"), dist, task) if data.val is not None else None
    test = evaluate(final, ev("test"), dist, task)
    extra: dict[str, Any] = {}
    for name, m in method.extra_eval_models().items():
        if data.val is not None:
            extra[f"val_{primary}_{name}"] = evaluate(m, ev("val"), dist, task)[primary]
        extra[f"test_{primary}_{name}"] = evaluate(m, ev("test"), dist, task)[primary]
    if tc.snapshot_min:
        extra["snapshots"] = _score_snapshots(engine, final, test[primary], ev("test"), dist)
    extra.update(_progress_facts(engine, history, test[primary], None if val is None else val[primary]))
    exported = method.export_model()
    summary: dict[str, Any] = {
        "name": cfg.name, "command": command, "method": cfg.method.name, "seed": cfg.seed,
        f"test_{primary}": test[primary], f"val_{primary}": None if val is None else val[primary],
        "test_loss": test["loss"], "params": count_params(exported),
        "wall_time_s": round(engine.wall_s(), 2), "process_wall_time_s": round(time.time() - t_start, 2),
        "train_time_s": round(engine.elapsed, 2), "cpu_steal": cpu_steal,
        "model": student_spec.label, "model_args": student_args,
        "data": {"name": info.name, "train": 0 if data.train is None else len(data.train),
                 "val": len(data.val) if data.val is not None else 0,
                 "test": len(data.test), "input_shape": list(info.input_shape), "path": data.path,
                 "notes": data.notes, "skipped_files": engine.skipped_files()},
        "stages": history, "world_size": dist.world, "device": str(device),
        "global_batch_size": _last_batch(history, tc.batch_size), "torch": torch.__version__, "kdkit": __version__,
        "python": platform.python_version(), "faults": engine.faults,
        "pairing": {"student_init": init_fingerprint,
                    "data_order": next((h["data_order"] for h in history if h.get("data_order")), None)},
    }
    if task.name != "classification":
        def figures(scores: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in scores.items() if k not in ("count", "objects")}

        summary.update(task=task.name, primary_metric=primary, classes=info.classes, test_metrics=figures(test))
        if teacher_metrics is not None:
            summary["teacher_test_metrics"] = figures(teacher_metrics)
        if dist.is_main:
            from .report import EXAMPLES

            shown = {"teacher": teacher, "student": exported} if teacher is not None else {"model": exported}
            task.write_examples(run_dir / EXAMPLES, shown, ev("test"), info.classes)
    if cfg.recipe_name:
        summary["recipe_name"] = cfg.recipe_name
    if teacher is not None:
        summary.update({"teacher": cfg.teacher.label, f"teacher_test_{primary}": teacher_test,  # type: ignore
                        "teacher_params": count_params(teacher)})
    summary.update(extra)
    summary.update(method.summary())
    summary["report_card"] = _report_card(exported, teacher, test[primary], teacher_test, info, ev("test"),
                                          dist, cfg.train.latency_budget_s)
    for who, scores in (("student" if teacher is not None else "model", test), ("teacher", teacher_metrics)):
        if scores is not None and who in summary["report_card"]:  # the task's further figures (EER, mAP@.5...)
            summary["report_card"][who].update({f"test_{k}": scores.get(k) for k in task.card_keys})
    if dist.is_main:
        summary["report_card"].update(method.card_fields())
    if dist.is_main:
        save_model(run_dir / "model.pt", exported, student_spec, student_args, info,
                   meta={"method": cfg.method.name, f"test_{primary}": test[primary], "seed": cfg.seed,
                         "run_dir": str(run_dir), "data_root": cfg.data.root, "python_object": role in models,
                         "scenes": to_dict(cfg.data.scenes) if cfg.data.name == "mnist-scenes" else None,
                         "data_source": cfg.data.source, "unseen_classes": cfg.data.unseen_classes or None,
                         "pairs": cfg.data.pairs, "in_memory": cfg.data.in_memory,
                         "kdkit": __version__},
                   patches=method.export_patches())
        if role in models:  # another process cannot rebuild the user's class: keep the exported program
            summary["exported_program"] = _save_program(exported, info, run_dir)
        write_json(run_dir / "summary.json", summary)
    barrier(dist)
    return RunResult(run_dir, summary, exported, dist.is_main, method)


def _alone_models(cfg: Config, command: str, models: dict[str, nn.Module]) -> dict[str, nn.Module] | None:
    """For train.vs_alone: the models of the student-alone run (a copy of a student passed as an object, taken
    before distillation trains it), or None when there is no such run to make."""
    if command != "distill" or not cfg.train.vs_alone:
        return None
    cls = method_class(cfg.method.name)
    if not cls.has_alone_baseline:
        raise ConfigError(f"train.vs_alone: method {cfg.method.name!r} has no student-alone baseline (it reads no "
                          "labeled data); set train.vs_alone=false")
    import copy

    return {"model": copy.deepcopy(models["student"])} if "student" in models else {}


def _versus_alone(cfg: Config, result: RunResult, resume: bool, dist: DistInfo, data: DataBundle | None,
                  models: dict[str, nn.Module]) -> RunResult:
    """Train the student alone with the distillation run's seed, data, schedule and budget in RUN_DIR/alone, and
    add the paired difference to the distillation run's summary and report card."""
    from .config import build_config

    assert result.run_dir is not None
    raw = cfg.to_dict()
    raw.pop("teacher", None)
    raw["model"] = raw.pop("student")
    raw["method"] = {"name": "supervised"}
    raw["name"] = f"{cfg.name}-alone"
    raw["output_dir"] = str(result.run_dir / "alone")
    raw["train"] = {**raw["train"], "vs_alone": False}
    alone_cfg = build_config(raw, "supervised")
    alone_cfg.output_dir_given = True
    again = resume and (result.run_dir / "alone" / "config.yaml").is_file()
    if not (result.run_dir / "alone" / "summary.json").is_file():
        _execute(alone_cfg, "train", again, dist, time.time(), data, models)
    alone = json.loads((result.run_dir / "alone" / "summary.json").read_text(encoding="utf-8")) if dist.is_main else {}
    s = result.summary
    if dist.is_main:
        same = {k: s["pairing"].get(k) == alone["pairing"].get(k) for k in ("student_init", "data_order")}
        p = get_task(s.get("task", "classification")).primary
        vs = {f"student_alone_test_{p}": alone[f"test_{p}"], "difference": s[f"test_{p}"] - alone[f"test_{p}"],
              f"student_alone_val_{p}": alone.get(f"val_{p}"), "same_init": same["student_init"],
              "same_data_order": same["data_order"], "run_dir": str(result.run_dir / "alone"),
              "helped": s[f"test_{p}"] > alone[f"test_{p}"]}
        s["vs_alone"] = vs
        s["report_card"]["vs_student_alone"] = vs
        write_json(result.run_dir / "summary.json", s)
    return result


def _save_program(model: nn.Module, info: DataInfo, run_dir: Path) -> str:
    """``model.pt2`` (torch.export) of a student passed as a Python object, so ``kdkit export`` works later from
    the run folder alone; the reason when torch.export cannot trace it."""
    from .exporting import PROGRAM, exported_program

    model = model.eval()
    try:
        example = torch.randn(2, *info.input_shape, device=next(model.parameters()).device)
        torch.export.save(exported_program(model, example), str(run_dir / PROGRAM))
    except Exception as e:  # torch.export raises many types for models it cannot trace
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return f"not written: torch.export cannot trace the model ({first})"
    return PROGRAM


def _last_batch(history: list[dict[str, Any]], default: int) -> int:
    """The global batch of the last stage that ran (the one that made the reported model)."""
    ran = [h for h in history if h.get("batch_size")]
    return int(ran[-1]["batch_size"]) if ran else default


def _progress_facts(engine: Engine, history: list[dict[str, Any]], test_acc: float,
                    val_acc: float | None) -> dict[str, Any]:
    """How far training got and which state was kept: where it stopped (``reached``: stage, epoch and step,
    1-based), whether the time budget stopped it, and the last state's accuracy beside the kept one's
    (``test_accuracy_last`` equals ``test_accuracy`` when the last epoch was kept)."""
    ran = [h for h in history if "reached" in h]
    out: dict[str, Any] = {"stopped_by_time_budget": bool(engine.out_of_time)}
    if ran:
        last = ran[-1]
        out["reached"] = {"stage": last["stage"], **last["reached"], "epochs": last["epochs"],
                          "steps_per_epoch": last["steps_per_epoch"]}
        out["selected"] = {"stage": last["stage"], "rule": last["selected"], "epoch": last["selected_epoch"]}
    out["stopped_by"] = None if engine.stopped is None else engine.stopped["by"]
    lm = engine.last_model_eval
    p = engine.primary
    out[f"test_{p}_last"] = test_acc if lm is None else lm[f"test_{p}"]
    out[f"val_{p}_last"] = val_acc if lm is None else lm[f"val_{p}"]
    return out


def _report_card(student: nn.Module, teacher: nn.Module | None, student_acc: float, teacher_acc: float | None,
                 info: DataInfo, test: Any, dist: DistInfo, latency_budget_s: float = 2.0) -> dict[str, Any]:
    """What distillation bought: each model's accuracy, size, MACs and CPU latency, and how often the student
    agrees with the teacher on the test split (the timings run on rank 0 only). Timings taken on a busy machine
    or spread widely are flagged (``latency_note``), and the speed-up is then left out rather than guessed; with
    train.latency_budget_s=0 nothing is timed and the note says so."""
    from .measure import busy_note

    card: dict[str, Any] = {}
    task = task_for(info)
    key = task.agreement_key
    agree = agreement(teacher, student, test, dist, info.task) if teacher is not None and key else None
    if not dist.is_main:
        return card
    metric = task.primary
    cards = {"student" if teacher is not None else "model": model_card(student, info.input_shape, student_acc,
                                                                       metric, latency_budget_s)}
    if teacher is not None:
        cards["teacher"] = model_card(teacher, info.input_shape, teacher_acc, metric, latency_budget_s)
    stats = [st for c in cards.values() for st in c.pop("_latency_stats")]
    note = busy_note(stats) if stats else "not timed (train.latency_budget_s=0)"
    card.update(cards)
    card["latency_note"] = note
    if teacher is not None:
        t, s = card["teacher"], card["student"]
        if key:
            card[key] = agree
        card["compression"] = {"params": t["params"] / max(1, s["params"]), "macs": t["macs"] / max(1, s["macs"]),
                               "size": t["size_bytes"] / max(1, s["size_bytes"]),
                               "speedup_batch1": None if note else
                               t["cpu_latency_ms_batch1"] / max(1e-9, s["cpu_latency_ms_batch1"])}
    return card


def _build(spec: ModelConfig, info: DataInfo, role: str, given: nn.Module | None, loaded: Any = None) -> BuiltModel:
    """The model of `role`: the caller's own module when given (its config section only labels it), else the
    one its config section describes."""
    if given is not None:
        return BuiltModel(given, spec, {})
    return build_from_config(spec, info, role, loaded=loaded)


def _score_snapshots(engine: Engine, final: nn.Module, final_acc: float, loader: Any,
                     dist: DistInfo) -> list[dict[str, Any]]:
    """Test accuracy of the model kept at each train.snapshot_min mark, after training (never during it).

    A mark the run did not reach (it finished earlier) is scored with the final model."""
    import copy

    out = []
    model = copy.deepcopy(final) if engine.snapshots else None
    for minutes in engine.train_cfg.snapshot_min:
        kept = next((s for m, s in engine.snapshots if m == minutes), None)
        if kept is None or model is None:
            out.append({"minutes": minutes, f"test_{engine.primary}": final_acc, "final_model": True})
            continue
        model.load_state_dict(kept)
        out.append({"minutes": minutes, f"test_{engine.primary}": evaluate(model, loader, dist,
                                                                           engine.method.task)[engine.primary]})
    return out


def _teacher_stats(cfg: Config) -> tuple[tuple[list[float], list[float]] | None, Any]:
    """The normalisation (mean, std) recorded in the teacher's model file, for data-free runs, and the file's
    contents (so the teacher is built without reading it again)."""
    from .engine.checkpoint import read
    from .modelfile import is_model_file, parse_model_file

    assert cfg.teacher is not None and cfg.teacher.checkpoint
    obj = read(cfg.teacher.checkpoint)
    if is_model_file(obj):
        mf, _ = parse_model_file(obj, cfg.teacher.checkpoint)
        return (mf.info.mean, mf.info.std), obj
    if cfg.data.normalize:
        warn(
            f"{cfg.teacher.checkpoint} records no input normalisation (not a kdkit model file) and a data-free run "
            "reads no training images: the test images' statistics are used for evaluation; set "
            "data.normalize=false if the teacher takes raw [0, 1] images")
    return None, obj


def _check_normalisation(trained: DataInfo, info: DataInfo) -> None:
    diff = max(abs(a - b) for a, b in zip(trained.mean + trained.std, info.mean + info.std))
    if diff > 0.02:
        warn(f"the teacher was trained with normalisation mean={trained.mean} std={trained.std} but this data "
             f"gives mean={info.mean} std={info.std}; its accuracy may suffer: was it trained on {info.name}?")


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """The top-level sections in which `cfg` differs from a saved ``config.yaml``. The saved config is read as
    the current kdkit reads it (options added since it was written take their defaults), so a run made by an
    earlier version still matches its own config."""
    from .config import build_config

    with contextlib.suppress(KdkitError):  # one this version cannot read is compared as written
        saved = build_config(dict(saved), cfg.method.name).to_dict()
    now = cfg.to_dict()
    for c in (saved, now):  # how progress is shown changes nothing of the run
        if isinstance(c.get("train"), dict):
            c["train"] = {k: v for k, v in c["train"].items() if k != "progress"}
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k != "output_dir")


def _check_same_config(saved: dict[str, Any], cfg: Config, run_dir: Path) -> None:
    diffs = config_differences(saved, cfg)
    if diffs:
        raise CheckpointError(
            f"the config differs from the one {run_dir} was started with (in: {', '.join(sorted(diffs))}); "
            "resume with the run's own config (kdkit distill --resume RUN_DIR)"
        )
