"""Network grafting machinery (used by :mod:`kdkit.methods.netgraft`).

* :func:`graft_blocks` cuts a model into the blocks that grafting replaces one by one. For zoo models:
  the modules with parameters before the first stage (a stem), every stage, and the modules with
  parameters after the last stage (a head, the classifier); parameter-free modules between them (pools)
  are shared. For other models the blocks are given as module paths.
* :func:`swapped` temporarily replaces blocks of a model by other modules for one forward pass; a
  student block wrapped in its adapters replaces the teacher's block this way.
* :func:`make_adapter` is the 1x1 convolution (or linear map, for vectors) with bias and Kaiming
  initialisation that translates channels between a teacher and a student block.
* :func:`fold_boundary` and friends turn the back-to-back adapters at a block boundary into one affine
  map, and fold it into the next block's first convolution or linear layer where that is exact, so the
  exported student is a plain network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError
from .losses.adapters import Pointwise
from .models import build, unwrap
from .taps import resolve

#: parameter-free modules through which a channel-wise linear map can be moved without changing results
COMMUTING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def forward_sequence(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """(path, module) of a zoo model's forward, in order: top-level children, containers of stages
    expanded into their stages. None for models that do not declare their stages."""
    model = unwrap(model)
    stages = tuple(getattr(model, "kd_stages", ()) or ())
    if not stages:
        return None
    out = []
    for name, child in model.named_children():
        inner = [s for s in stages if s.startswith(name + ".")]
        if inner:
            out += [(s, resolve(model, s)) for s in inner]
        else:
            out.append((name, child))
    return out


def graft_blocks(model: nn.Module, paths: list[str] | None = None, who: str = "model") -> list[str]:
    """The blocks of `model` for grafting: given paths (checked), or derived from a zoo model's stages."""
    if paths:
        for p in paths:
            resolve(model, p)
        return list(paths)
    seq = forward_sequence(model)
    if seq is None:
        raise ModelError(
            f"the {who} ({type(unwrap(model)).__name__}) does not declare its stages; list its blocks in forward "
            f"order with method.{who}_blocks (module paths)"
        )
    return [p for p, m in seq if _has_params(m)]


def gap_between(model: nn.Module, a: str, b: str) -> list[nn.Module] | None:
    """Parameter-free modules of the forward between blocks `a` and `b`; None when unknown."""
    seq = forward_sequence(model)
    if seq is None:
        return None
    names = [p for p, _ in seq]
    if a not in names or b not in names:
        return None
    return [m for _, m in seq[names.index(a) + 1:names.index(b)]]


def commutes(modules: list[nn.Module]) -> bool:
    """Whether a channel-wise affine map can be moved through all of `modules` (pools, flatten...)."""
    for m in modules:
        if isinstance(m, nn.Sequential):
            if not commutes(list(m)):
                return False
        elif not isinstance(m, COMMUTING):
            return False
    return True


@contextlib.contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """Replace the submodules at the given paths for the duration of the ``with`` block."""
    saved = []
    try:
        for path, new in replacements.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            saved.append((parent, name, getattr(parent, name)))
            setattr(parent, name, new)
        yield model
    finally:
        for parent, name, old in reversed(saved):
            setattr(parent, name, old)


def make_adapter(cin: int, cout: int, dims: int) -> nn.Module:
    """1x1 conv (maps) or linear (vectors), with bias, Kaiming-normal weights and zero bias."""
    m: nn.Module = Pointwise(cin, cout) if dims == 4 else nn.Linear(cin, cout)
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(m.bias)
    return m


def affine_of(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [out, in], b [out]) of a Pointwise / 1x1 conv or linear adapter."""
    w = m.weight.detach()
    w = w.flatten(1) if w.dim() == 4 else w
    b = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0], device=w.device)
    return w, b


def first_layer(block: nn.Module) -> nn.Module | None:
    """The layer that alone consumes a block's input: the first child of nested Sequentials, if it is a
    convolution or linear layer; None otherwise (e.g. a residual block, whose input also feeds a shortcut)."""
    m = block
    while isinstance(m, nn.Sequential) and len(m):
        m = m[0]
    return m if isinstance(m, (nn.Conv2d, nn.Linear)) else None


@torch.no_grad()
def fold_into(layer: nn.Module, w: torch.Tensor, b: torch.Tensor) -> bool:
    """Make ``layer(x)`` compute ``layer(A x)`` with A = (w, b) applied channel-wise, if exact; True if done.

    Exact for a linear layer; for a convolution when it has no padding or A has no bias (with zero
    padding, the border would see 0 instead of b), and when it is not grouped. A must be square so the
    layer keeps its shape."""
    has_b = bool(b.abs().max() > 0)
    if w.shape[0] != w.shape[1] or (has_b and layer.bias is None):
        return False
    if isinstance(layer, nn.Linear):
        if layer.in_features != w.shape[0]:
            return False
        extra = layer.weight @ b
        layer.weight.copy_(layer.weight @ w)
    elif isinstance(layer, nn.Conv2d):
        padding = layer.padding
        padded = padding != "valid" and (isinstance(padding, str) or any(p != 0 for p in padding))
        if layer.groups != 1 or layer.in_channels != w.shape[0] or (padded and has_b):
            return False
        extra = torch.einsum("oikl,i->o", layer.weight, b)
        layer.weight.copy_(torch.einsum("oikl,ij->ojkl", layer.weight, w))
    else:
        return False
    if layer.bias is not None:
        layer.bias.add_(extra)
    return True


def load_affine(m: nn.Module, w: torch.Tensor, b: torch.Tensor) -> nn.Module:
    """Set an adapter-shaped layer's weights to the affine map (w, b)."""
    with torch.no_grad():
        m.weight.copy_(w.view_as(m.weight))
        m.bias.copy_(b)
    return m


def compose(first: nn.Module | None, second: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map of applying adapter `first` then adapter `second` (either may be None)."""
    mods = [m for m in (first, second) if m is not None]
    w, b = affine_of(mods[0])
    for m in mods[1:]:
        w2, b2 = affine_of(m)
        w, b = w2 @ w, w2 @ b + b2
    return w, b


def input_consumers(block: nn.Module, x: torch.Tensor) -> list[str]:
    """Paths (inside `block`) of the convolution and linear layers that read the block's input `x` itself,
    found by running the block once: in a VGG stage its first convolution, in a residual block its first
    convolution and the shortcut's."""
    found: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: found.append(name) if a and a[0] is x else None)
               for name, m in block.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was = block.training
    try:
        block.eval()
        with torch.no_grad():
            block(x)
    finally:
        block.train(was)
        for h in handles:
            h.remove()
    return list(dict.fromkeys(found))


def widened(layer: nn.Module, width: int) -> dict[str, Any]:
    """The :func:`layer` arguments of `layer` with `width` input channels (features)."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ModelError(f"cannot widen a grouped convolution ({layer})")
        return {"kind": "conv", "cin": width, "cout": layer.out_channels, "kernel_size": list(layer.kernel_size),
                "stride": list(layer.stride), "padding": list(layer.padding) if not isinstance(layer.padding, str)
                else layer.padding, "dilation": list(layer.dilation), "bias": layer.bias is not None}
    if isinstance(layer, nn.Linear):
        return {"kind": "linear", "cin": width, "cout": layer.out_features, "bias": layer.bias is not None}
    raise ModelError(f"cannot widen a {type(layer).__name__}")


def layer(kind: str, cin: int, cout: int, bias: bool = True, kernel_size: Any = 1, stride: Any = 1,
          padding: Any = 0, dilation: Any = 1) -> nn.Module:
    """A fresh convolution or linear layer (PyTorch's default initialisation): a student layer that reads a
    wider input than its architecture's (kdkit.methods.netgraft, ``input_adapter: widen``)."""
    if kind == "conv":
        return nn.Conv2d(cin, cout, tuple(kernel_size), tuple(stride),
                         padding if isinstance(padding, str) else tuple(padding), tuple(dilation), bias=bias)
    return nn.Linear(cin, cout, bias=bias)


# ---- modules the exported student may keep, rebuilt from patches by kdkit.load ------------------------
def prepend(module: nn.Module, kind: str, cin: int, cout: int) -> nn.Sequential:
    """``Sequential(adapter, module)``: a channel map kept in front of a block."""
    return nn.Sequential(Pointwise(cin, cout) if kind == "conv" else nn.Linear(cin, cout), module)


def append(module: nn.Module, kind: str, cin: int, cout: int) -> nn.Sequential:
    """``Sequential(module, adapter)``: a channel map kept after a block."""
    return nn.Sequential(module, Pointwise(cin, cout) if kind == "conv" else nn.Linear(cin, cout))


def model_block(arch: str | None, module: str | None, args: dict[str, Any], path: str) -> nn.Module:
    """The submodule at `path` of a freshly built model (the teacher's architecture for kept blocks)."""
    return resolve(build(arch, module, **args), path)


def adapter_patch(path: str, m: nn.Module, where: str) -> dict[str, Any]:
    w, _ = affine_of(m)
    kind = "conv" if isinstance(m, nn.Conv2d) else "linear"
    return {"path": path, "factory": f"kdkit.grafting:{where}", "wrap": True,
            "args": {"kind": kind, "cin": int(w.shape[1]), "cout": int(w.shape[0])}}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def l2n_mse(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The grafting loss of Shen et al.: squared distance of L2-normalised logits, summed over classes,
    averaged over the batch."""
    return (F.normalize(z.float(), dim=1) - F.normalize(t.detach().float(), dim=1)).pow(2).sum(1).mean()
