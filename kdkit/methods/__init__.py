"""Training methods by name (``method.name``). Each lives in its own file and registers itself."""

from __future__ import annotations

from .base import Method, Stage, Update

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in METHODS:
        raise RuntimeError(f"method {cls.__name__} needs a unique name, got {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    from ..errors import ConfigError, did_you_mean

    if name not in METHODS:
        raise ConfigError(
            f"method.name: unknown method {name!r}{did_you_mean(name, METHODS)}; "
            f"available: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


from . import (  # noqa: E402,F401
    adaptive,
    attention,
    crd,
    cwd,
    dafl,
    deepinversion,
    dfad,
    dist,
    dkd,
    embedding_kd,
    fast_dfkd,
    feature_imitation,
    fgd,
    fitnets,
    kd,
    netgraft,
    pairwise,
    pkt,
    rdskd,
    review_kd,
    rkd,
    sh_kd,
    similarity_preserving,
    supervised,
    th_kd,
)

__all__ = ["METHODS", "Method", "Stage", "Update", "method_class", "register"]
