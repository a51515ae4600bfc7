"""``kdkit export RUN_DIR --format torchscript|onnx|state_dict``: the trained student as a standalone file.

The exported model is the run's ``model.pt``: the student alone (no teacher, no distillation-only modules
such as hint adapters or projectors), with the method's export already applied (grafting adapters folded
into the student's convolutions, the chosen classifier head). After writing, the file is loaded back the
way a user would load it and its outputs are compared with the PyTorch model's on a batch of random inputs
of the model's input shape; a difference above the tolerance is an error, never a silent success.

The model takes *normalised* images: ``(pixels / 255 - mean) / std`` with the mean and std printed in the
export's JSON (and stored in ``model.pt``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import KdkitError
from .modelfile import load, read_model_file

FORMATS = ("torchscript", "onnx", "state_dict")
SUFFIX = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "state_dict": ".state_dict.pt"}


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
                          dynamic_shapes=({0: batch},),
                          dynamo=True, verbose=False)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _state_dict(model: nn.Module, x: torch.Tensor, path: Path, model_file: Path) -> torch.Tensor:
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    fresh = load(model_file)  # the same architecture, built anew, then these weights
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        return fresh(x)


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None, batch: int = 8, seed: int = 0,
           atol: float = 1e-4) -> dict[str, Any]:
    """Write the student of `run_dir` in format `fmt` and check it; returns what was written and checked."""
    if fmt not in FORMATS:
        raise KdkitError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    model_file = run_dir / "model.pt" if run_dir.is_dir() else run_dir
    if not model_file.is_file():
        raise KdkitError(f"{run_dir} holds no model.pt: export a finished run (kdkit train/distill writes it at the "
                         "end)")
    mf, _ = read_model_file(model_file)
    model = load(model_file).eval()
    path = Path(out) if out else model_file.with_name("model" + SUFFIX[fmt])
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(batch, *mf.info.input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(x)
        if fmt == "torchscript":
            got = _torchscript(model, x, path)
        elif fmt == "onnx":
            got = _onnx(model, x, path)
        else:
            got = _state_dict(model, x, path, model_file)
    result: dict[str, Any] = {
        "format": fmt, "path": str(path), "bytes": path.stat().st_size, "model": mf.label,
        "input_shape": list(mf.info.input_shape), "classes": mf.info.classes,
        "normalise": {"mean": mf.info.mean, "std": mf.info.std, "pixels_scale": 255},
    }
    if got is None:
        result["check"] = "skipped: onnxruntime is not installed (pip install onnxruntime to check the outputs)"
        return result
    diff = float((got.float() - want.float()).abs().max())
    if not diff <= atol:
        raise KdkitError(f"the exported {fmt} model's outputs differ from the PyTorch model's by {diff:.3g} "
                         f"(tolerance {atol}); the export is not faithful, do not use {path}")
    result["check"] = {"batch": batch, "max_abs_diff": diff, "tolerance": atol, "passed": True}
    return result


