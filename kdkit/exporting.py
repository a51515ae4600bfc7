"""``kdkit export RUN_DIR --format pt2|onnx|torchscript|state_dict``: the trained student as a standalone file,
and ``kdkit.export(result_or_run_dir, ...)`` from Python.

The exported model is the run's ``model.pt``: the student alone (no teacher, no distillation-only modules
such as hint adapters or projectors), with the method's export already applied (grafting adapters folded
into the student's convolutions, the chosen classifier head). After writing, the file is loaded back the
way a user would load it and its outputs are compared with the PyTorch model's on a batch of random inputs
of the model's input shape; a difference above the tolerance is an error, never a silent success.

Formats: ``pt2`` (``torch.export``, the default: load with ``torch.export.load(path).module()``), ``onnx``
(needs the ``onnx`` extra), ``torchscript`` (deprecated upstream; kept for older deployments) and
``state_dict`` (the weights alone, for the architecture in ``model.pt``). Every export writes a sidecar
``<file>.json`` with what whoever deploys it needs: the input shape, the class names, the preprocessing
(``(pixels / 255 - mean) / std``) and whether it is already inside the graph. With ``preprocessing=True``
(``--with-preprocessing``) it is: the exported graph takes pixels in 0..255.

A student passed to kdkit from Python as an object of the user's own class cannot be rebuilt from
``model.pt`` by another process (kdkit does not know its constructor's arguments). Such runs write the
exported program ``model.pt2`` at the end of training, and every export of the run starts from it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import KdkitError, ModelError
from .jsonfile import write_json
from .modelfile import ModelFile, load, read_model_file

FORMATS = ("pt2", "onnx", "torchscript", "state_dict")
SUFFIX = {"pt2": ".pt2", "torchscript": ".torchscript.pt", "onnx": ".onnx", "state_dict": ".state_dict.pt"}
#: the exported program a run keeps when its student cannot be rebuilt from model.pt (a Python object)
PROGRAM = "model.pt2"


class Preprocess(nn.Module):
    """Pixels in 0..255 -> the model's normalised input: ``(x / 255 - mean) / std`` per channel."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], scale: float = 255.0):
        super().__init__()
        self.model = model
        self.scale = scale
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return self.model((x.float() / self.scale - self.mean.view(shape)) / self.std.view(shape))


def _dynamic_batch() -> Any:
    return ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)


def _eval(model: nn.Module) -> nn.Module:
    """`model` in eval mode; the module of a loaded exported program refuses eval() (it is fixed already)."""
    with contextlib.suppress(NotImplementedError, RuntimeError):
        model.eval()
    return model


def exported_program(model: nn.Module, example: torch.Tensor) -> Any:
    """``torch.export`` of `model` with a dynamic batch size."""
    return torch.export.export(_eval(model), (example,), dynamic_shapes=_dynamic_batch())


def _pt2(model: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    try:
        program = exported_program(model, x[:2])
    except Exception as e:  # torch.export raises many types for models it cannot trace
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdkitError(f"torch.export cannot export this model ({first}); try --format onnx or torchscript") \
            from None
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()(x)


def _torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    with warnings.catch_warnings():  # torch.jit is deprecated upstream in favour of torch.export; it still works
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, x[:1], check_trace=False)
        traced.save(str(path))
        return torch.jit.load(str(path))(x)


def _onnx(model: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor | None:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise KdkitError(f"--format onnx needs the onnx and onnxscript packages ({e.name} is not installed): "
                         "pip install onnx onnxscript (and onnxruntime for the output check)") from None
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _state_dict(model: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    fresh = _copy_without_weights(model)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        return _eval(fresh)(x)


def _copy_without_weights(model: nn.Module) -> nn.Module:
    import copy

    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    return fresh


def _student(model_file: Path) -> tuple[nn.Module, ModelFile]:
    """The student of a model file: rebuilt from its architecture, or the run's exported program when the
    student was a Python object of the user's own class."""
    mf, _ = read_model_file(model_file)
    try:
        return _eval(load(model_file)), mf
    except ModelError:
        program = model_file.with_name(PROGRAM)
        if not (mf.meta.get("python_object") and program.is_file()):
            raise
        return torch.export.load(str(program)).module(), mf


def export(source: Any, fmt: str = "pt2", out: str | Path | None = None, *, preprocessing: bool = False,
           batch: int = 8, seed: int = 0, atol: float = 1e-4) -> dict[str, Any]:
    """Write the student of `source` (a run folder, its ``model.pt``, or a :class:`kdkit.Result`) in format `fmt`,
    check it, write the sidecar JSON, and return what was written and checked."""
    if fmt not in FORMATS:
        raise KdkitError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run_dir = Path(getattr(source, "run_dir", None) or source)
    model_file = run_dir / "model.pt" if run_dir.is_dir() else run_dir
    if not model_file.is_file():
        raise KdkitError(f"{run_dir} holds no model.pt: export a finished run (kdkit train/distill writes it at the "
                         "end)")
    model, mf = _student(model_file)
    if preprocessing:
        if fmt == "state_dict":
            raise KdkitError("--with-preprocessing puts the normalisation into the exported graph; a state_dict has "
                             "no graph: choose pt2, onnx or torchscript")
        model = _eval(Preprocess(model, mf.info.mean, mf.info.std))
    path = Path(out) if out else model_file.with_name("model" + SUFFIX[fmt])
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *mf.info.input_shape, generator=g)
    if preprocessing:
        x = (torch.rand(batch, *mf.info.input_shape, generator=g) * 255).round()
    with torch.no_grad():
        want = model(x)
        if fmt == "pt2":
            got = _pt2(model, x, path)
        elif fmt == "torchscript":
            got = _torchscript(model, x, path)
        elif fmt == "onnx":
            got = _onnx(model, x, path)
        else:
            got = _state_dict(model, x, path)
    result: dict[str, Any] = {
        "format": fmt, "path": str(path), "bytes": path.stat().st_size, "model": mf.label,
        "input_shape": list(mf.info.input_shape), "classes": mf.info.classes, "task": mf.info.task,
        "output": ("logits [batch, classes]" if mf.info.task == "classification" else
                   "logits [batch, classes, H, W] (per-pixel class: argmax over dimension 1; 255 marks ignored "
                   "pixels in labels, never in outputs)"),
        "preprocessing": {"in_graph": preprocessing, "input": "pixels in 0..255" if preprocessing else
                          "normalised: (pixels / 255 - mean) / std", "mean": mf.info.mean, "std": mf.info.std,
                          "pixels_scale": 255},
        "source": str(model_file), "kdkit": mf.meta.get("kdkit"),
    }
    if got is None:
        result["check"] = "skipped: onnxruntime is not installed (pip install onnxruntime to check the outputs)"
    else:
        diff = float((got.float() - want.float()).abs().max())
        if not diff <= atol:
            raise KdkitError(f"the exported {fmt} model's outputs differ from the PyTorch model's by {diff:.3g} "
                             f"(tolerance {atol}); the export is not faithful, do not use {path}")
        result["check"] = {"batch": batch, "max_abs_diff": diff, "tolerance": atol, "passed": True}
    sidecar = path.with_name(path.name + ".json")
    write_json(sidecar, result)
    result["sidecar"] = str(sidecar)
    return result
