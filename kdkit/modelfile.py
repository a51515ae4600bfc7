"""Self-describing model files (``model.pt``): ``kdkit.load(path)`` and ``kdkit eval`` need nothing else.

A model file holds the architecture (zoo ``arch`` or user ``module`` factory) and its arguments, the
input shape, the normalisation, the class names, the dataset it was trained on and the weights. It is
read with ``torch.load(weights_only=True)``: no code runs when a model file is opened.

A method whose exported model differs from the plain architecture in a submodule (a student with a mixed
head, say) records *patches*: ``{"path": "classifier", "factory": "package.module:callable", "args": {...}}``;
loading builds the architecture, replaces each patched submodule with ``factory(**args)`` (or, with
``"wrap": true``, with ``factory(existing_submodule, **args)``), in order, then loads the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import ModelConfig
from .data import DataInfo
from .engine.checkpoint import atomic_save, read
from .errors import CheckpointError, KdkitError, ModelError
from .models import build

FORMAT = "kdkit-model"


@dataclass
class ModelFile:
    arch: str | None
    module: str | None
    args: dict[str, Any]
    info: DataInfo
    meta: dict[str, Any] = field(default_factory=dict)
    patches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.arch or self.module or "?"


def save_model(path: str | os.PathLike, model: nn.Module, spec: ModelConfig, args: dict[str, Any], info: DataInfo,
               meta: dict[str, Any] | None = None, patches: list[dict[str, Any]] | None = None) -> None:
    if not (spec.arch or spec.module):
        raise ModelError("only models built from a zoo 'arch' or a 'module' factory can be saved as model files")
    atomic_save({
        "format": FORMAT, "version": 1, "arch": spec.arch, "module": spec.module, "args": dict(args),
        "data": info.to_dict(), "meta": dict(meta or {}), "patches": list(patches or []),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }, path)


def apply_patches(model: nn.Module, patches: list[dict[str, Any]]) -> nn.Module:
    """Replace the submodules named in `patches` with ``factory(**args)`` (see the module docstring)."""
    from .models import import_factory

    for p in patches:
        parent_path, _, name = p["path"].rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        factory = import_factory(p["factory"])
        args = p.get("args", {})
        setattr(parent, name, factory(getattr(parent, name), **args) if p.get("wrap") else factory(**args))
    return model


def is_model_file(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_model_file(path: str | os.PathLike) -> tuple[ModelFile, dict[str, Any]]:
    return parse_model_file(read(path), path)


def parse_model_file(obj: Any, path: Any) -> tuple[ModelFile, dict[str, Any]]:
    if not is_model_file(obj):
        raise CheckpointError(
            f"{path} is not a kdkit model file (model.pt written by kdkit train/distill); for a plain state_dict "
            "give the architecture too (teacher.arch or teacher.module) and kdkit loads the weights into it"
        )
    d = obj["data"]
    info = DataInfo(d["name"], list(d["classes"]), tuple(d["input_shape"]), list(d["mean"]), list(d["std"]),
                    task=d.get("task", "classification"), embedding=d.get("embedding"))
    mf = ModelFile(obj["arch"], obj["module"], dict(obj["args"]), info, dict(obj.get("meta", {})),
                   list(obj.get("patches", [])))
    return mf, obj["state_dict"]


def load_weights(model: nn.Module, state: dict[str, Any], label: str, path: Any) -> None:
    """Load a state_dict strictly, summarising any mismatch in one line."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: does not hold a state_dict (a mapping of parameter names to tensors)")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CheckpointError(
            f"{path} does not fit model {label}: {'; '.join(parts)}; is the checkpoint for another "
            "architecture, width or class count?"
        )
    model.load_state_dict(state)


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild the model stored in a kdkit model file, in eval mode.

    The returned module carries ``kdkit_info`` (a :class:`ModelFile`: arch, args, classes, input shape,
    normalisation) so callers can prepare inputs the way the model was trained.
    """
    mf, state = read_model_file(path)
    try:
        model = apply_patches(build(mf.arch, mf.module, **mf.args), mf.patches)
        load_weights(model, state, mf.label, path)
    except KdkitError as e:
        if not mf.meta.get("python_object"):
            raise
        raise ModelError(
            f"{path} holds the weights of a {mf.module} passed to kdkit as a Python object, whose constructor "
            f"arguments kdkit does not know ({e}); build it yourself and load the weights: "
            "model.load_state_dict(torch.load(path, weights_only=True)['state_dict'])") from None
    model.kdkit_info = mf  # type: ignore[assignment]
    return model.eval()


def model_args(spec: ModelConfig, info: DataInfo, role: str) -> dict[str, Any]:
    """The factory arguments of `spec`, with the data's class count, channels and input size filled in."""
    args = dict(spec.args)
    for key, value in (("num_classes", info.output_size), ("in_channels", info.in_channels),
                       ("input_size", info.input_size), ("input_shape", list(info.input_shape))):
        if key in args and args[key] != value:
            from .errors import ConfigError

            raise ConfigError(
                f"{role}.{key}={args[key]} but the data ({info.name}) has {key}={value}; remove it or change the data"
            )
        args[key] = value
    return args


@dataclass
class BuiltModel:
    model: nn.Module
    spec: ModelConfig  # taken from the model file when the config section only names a checkpoint
    args: dict[str, Any]  # the factory arguments
    file: ModelFile | None = None  # the kdkit model file it was loaded from, if any


def build_from_config(spec: ModelConfig, info: DataInfo, role: str, loaded: Any = None) -> BuiltModel:
    """Build the model a config section describes, loading its checkpoint if it has one (``loaded``: the
    checkpoint's contents when the caller has already read it)."""
    if spec.checkpoint:
        obj = read(spec.checkpoint) if loaded is None else loaded
        if is_model_file(obj):
            mf, state = parse_model_file(obj, spec.checkpoint)
            if (spec.arch and spec.arch != mf.arch) or (spec.module and spec.module != mf.module):
                raise ModelError(
                    f"{role}.checkpoint {spec.checkpoint} holds a {mf.label} but the config says "
                    f"{spec.arch or spec.module}; fix {role}.arch or point at the right checkpoint"
                )
            check_compatible(mf, info, role, spec.checkpoint)
            for k, v in spec.args.items():
                if mf.args.get(k) != v:
                    raise ModelError(f"{role}.{k}={v} but {spec.checkpoint} was trained with {k}={mf.args.get(k)}")
            model = apply_patches(build(mf.arch, mf.module, **mf.args), mf.patches)
            load_weights(model, state, mf.label, spec.checkpoint)
            return BuiltModel(model, ModelConfig(mf.arch, mf.module, spec.checkpoint, {}), mf.args, mf)
        if not (spec.arch or spec.module):
            raise ModelError(
                f"{role}.checkpoint {spec.checkpoint} is not a kdkit model file; give {role}.arch or {role}.module "
                "so kdkit can build the model and load these weights into it"
            )
        args = model_args(spec, info, role)
        model = build(spec.arch, spec.module, **args)
        state = obj.get("state_dict", obj.get("model", obj)) if isinstance(obj, dict) else obj
        load_weights(model, state, spec.label, spec.checkpoint)
        return BuiltModel(model, spec, args)
    args = model_args(spec, info, role)
    return BuiltModel(build(spec.arch, spec.module, **args), spec, args)


def check_compatible(mf: ModelFile, info: DataInfo, role: str, path: Any) -> None:
    if mf.info.num_classes != info.num_classes:
        raise ModelError(
            f"{role} checkpoint {path} was trained for {mf.info.num_classes} classes ({mf.info.name}) but the data "
            f"({info.name}) has {info.num_classes}; use a teacher trained on this data"
        )
    if tuple(mf.info.input_shape) != tuple(info.input_shape):
        raise ModelError(
            f"{role} checkpoint {path} expects inputs of shape {tuple(mf.info.input_shape)} but the data gives "
            f"{tuple(info.input_shape)}; set data.image_size (and channels) to match"
        )
