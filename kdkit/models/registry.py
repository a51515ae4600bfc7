"""The model registry: zoo names to factories, user factories by ``package.module:factory``.

Every zoo factory takes ``num_classes``, ``in_channels`` and ``input_size`` (square side of the input),
and most take ``width`` (a channel multiplier), so a half-width student is ``width=0.5``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, ModelError, did_you_mean

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ZooEntry:
    name: str
    factory: Factory
    kwargs: dict[str, Any]
    summary: str
    default_input_size: int = 32
    #: what the model's output is for (kdkit.tasks): classification logits [B, K], or segmentation [B, K, H, W]
    task: str = "classification"


_ZOO: dict[str, ZooEntry] = {}


def register(name: str, summary: str, default_input_size: int = 32, task: str = "classification",
             **kwargs: Any) -> Callable[[Factory], Factory]:
    """Register `factory` under `name`, with fixed keyword arguments (e.g. depth=20)."""

    def deco(factory: Factory) -> Factory:
        if name in _ZOO:
            raise RuntimeError(f"model {name!r} registered twice")
        _ZOO[name] = ZooEntry(name, factory, kwargs, summary, default_input_size, task)
        return factory

    return deco


def add(name: str, factory: Factory, summary: str, default_input_size: int = 32, task: str = "classification",
        **kwargs: Any) -> None:
    register(name, summary, default_input_size, task, **kwargs)(factory)


def zoo_names() -> list[str]:
    return sorted(_ZOO)


_WRN = re.compile(r"^wrn_(\d+)_(\d+)$")


def entry(name: str) -> ZooEntry:
    """The zoo entry for `name`; ``wrn_D_W`` works for any valid depth D and widen factor W."""
    if name in _ZOO:
        return _ZOO[name]
    m = _WRN.match(name)
    if m:
        from .wrn import wrn

        return ZooEntry(name, wrn, {"depth": int(m.group(1)), "widen": int(m.group(2))},
                        f"Wide ResNet depth {m.group(1)}, widen {m.group(2)}")
    raise ConfigError(
        f"unknown model {name!r}{did_you_mean(name, _ZOO)}; `kdkit models` lists the zoo: {', '.join(zoo_names())}"
    )


def import_factory(spec: str) -> Factory:
    """Import ``package.module:attr`` (a class or function returning an nn.Module)."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(
            f"cannot import module {mod_name!r} for model factory {spec!r}: {e}; "
            "is it installed or on PYTHONPATH (run kdkit from the folder that holds it)?"
        ) from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(mod) if not n.startswith("_")]
            raise ConfigError(f"module {mod_name!r} has no attribute {attr!r}{did_you_mean(attr, names)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{spec!r} is not callable; it must be a class or function returning an nn.Module")
    return obj


def factory_for(arch: str | None, module: str | None) -> tuple[Factory, dict[str, Any]]:
    if arch:
        e = entry(arch)
        return e.factory, dict(e.kwargs)
    if module:
        return import_factory(module), {}
    raise ConfigError("a model needs 'arch' or 'module'")


def accepted_args(factory: Factory) -> tuple[set[str], bool]:
    """Parameter names `factory` accepts, and whether it takes **kwargs."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def check_factory_args(cfg: Any, where: str) -> None:
    """Reject model arguments the factory does not take, with did-you-mean."""
    factory, fixed = factory_for(cfg.arch, cfg.module)
    names, var_kw = accepted_args(factory)
    if var_kw:
        return
    for key in cfg.args:
        if key in fixed:
            raise ConfigError(f"{where}.{key}: fixed by the architecture {cfg.arch!r} ({key}={fixed[key]})")
        if key not in names:
            valid = sorted(names - set(fixed))
            raise ConfigError(
                f"{where}: {cfg.label} takes no argument '{key}'{did_you_mean(key, valid)}; "
                f"it takes: {', '.join(valid)}"
            )


def build(arch: str | None = None, module: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a zoo model (`arch`) or a user model (`module`), passing only the arguments it accepts.

    ``num_classes``, ``in_channels``, ``input_size`` and ``input_shape`` (one sample's shape) are offered to
    every factory; a user factory that does not take one of them simply does not get it.
    """
    factory, fixed = factory_for(arch, module)
    names, var_kw = accepted_args(factory)
    offered = {"num_classes", "in_channels", "input_size", "input_shape"}
    call = dict(fixed)
    for k, v in kwargs.items():
        if k in offered and not var_kw and k not in names:
            continue
        call[k] = v
    label = arch or module
    try:
        model = factory(**call)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ModelError(f"building model {label!r} with {call} failed: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {label!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def create(name: str, num_classes: int = 10, in_channels: int = 3, input_size: int | None = None,
           **kwargs: Any) -> nn.Module:
    """Public way to build a zoo model: ``kdkit.models.create("resnet20", num_classes=100)``."""
    e = entry(name)
    size = input_size if input_size is not None else e.default_input_size
    return build(arch=name, num_classes=num_classes, in_channels=in_channels, input_size=size, **kwargs)
