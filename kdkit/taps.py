"""Feature taps: read any module's output (or input) of any ``nn.Module`` by its dotted path.

    with Taps(model, ["layer2", "fc:input"]) as taps:
        logits = model(x)
        f2, emb = taps["layer2"], taps["fc:input"]

A path is a name from ``model.named_modules()`` (``layer2.0.conv1``), optionally followed by
``:input`` to read the module's first positional input instead of its output. The empty path ``""``
is the model itself. Hooks are removed when the ``with`` block ends (or on :meth:`Taps.remove`).
An unknown path is an error that lists the closest existing paths. Wrappers (DDP, ``torch.compile``)
are looked through, so paths are always those of the plain model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import ModelError, closest

INPUT = "input"


def split_path(path: str) -> tuple[str, str]:
    """('layer2', 'output') from 'layer2'; ('fc', 'input') from 'fc:input'."""
    name, sep, kind = path.partition(":")
    if not sep:
        return name, "output"
    if kind != INPUT:
        raise ModelError(f"tap path {path!r}: the only suffix is ':input' (e.g. 'fc:input')")
    return name, INPUT


def _unwrap(model: nn.Module) -> nn.Module:
    from .models.parts import unwrap

    return unwrap(model)


def resolve(model: nn.Module, path: str) -> nn.Module:
    """The submodule of `model` at `path` (suffix ignored), or an error naming the closest paths."""
    name, _ = split_path(path)
    model = _unwrap(model)
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    near = closest(name, [n for n in modules if n], n=5)
    hint = f"; closest: {', '.join(near)}" if near else ""
    top = [n for n, _ in model.named_children()]
    raise ModelError(
        f"{type(model).__name__} has no module {name!r}{hint}; its top-level modules are: {', '.join(top)}"
    )


class Taps:
    """Forward hooks that store the outputs (or inputs) of the modules at `paths` on each forward."""

    def __init__(self, model: nn.Module, paths: Iterable[str]):
        self.model = model
        self.paths = list(dict.fromkeys(paths))
        self.values: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for p in self.paths:
            module = resolve(model, p)
            _, kind = split_path(p)
            if kind == INPUT:
                h = module.register_forward_pre_hook(self._make_pre_hook(p))
            else:
                h = module.register_forward_hook(self._make_hook(p))
            self._handles.append(h)

    def _make_hook(self, path: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.values[path] = output

        return hook

    def _make_pre_hook(self, path: str):
        def hook(module: nn.Module, args: Any) -> None:
            if not args:
                raise ModelError(f"tap {path!r}: the module was called without a positional input")
            self.values[path] = args[0]

        return hook

    def __getitem__(self, path: str) -> Any:
        try:
            return self.values[path]
        except KeyError:
            if path not in self.paths:
                raise KeyError(f"{path!r} is not tapped; tapped: {self.paths}") from None
            raise ModelError(
                f"tap {path!r} saw no forward pass: the module is not used in the model's forward"
            ) from None

    def get(self, path: str, default: Any = None) -> Any:
        return self.values.get(path, default)

    def clear(self) -> None:
        self.values = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.values = {}

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.paths)
