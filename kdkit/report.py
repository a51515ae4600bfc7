"""``kdkit report RUN_DIR [RUN_DIR ...]``: plots and a short ``report.md`` from a run's files.

For each run it draws, from ``metrics.jsonl``, the training losses and validation accuracy per epoch
(``curves.png``) and, when the method logged them, the effective per-path loss weights over time
(``weights.png``). It works on finished runs and on runs still in progress.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import KdkitError


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise KdkitError(f"{run_dir} has no metrics.jsonl; give the folder of a kdkit run")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < sum(1 for _ in path.open(encoding="utf-8")):  # only the line being written may be partial
                raise KdkitError(f"{path}: line {i} is not JSON; the file is damaged") from None
    return rows


def _epochs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("event") == "epoch"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    epochs = _epochs(rows)
    if not epochs:
        return None
    plt = _figure()
    x = list(range(1, len(epochs) + 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({k for r in epochs for k in r if k.startswith("train/")})
    for k in keys:
        ax1.plot(x, [r.get(k, float("nan")) for r in epochs], label=k[len("train/"):])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (epoch mean)")
    ax1.set_yscale("log" if all(r.get(k, 1) > 0 for r in epochs for k in keys) else "linear")
    ax1.legend(fontsize=7)
    val = [r.get("val/accuracy") for r in epochs]
    if any(v is not None for v in val):
        ax2.plot(x, [100 * v if v is not None else float("nan") for v in val], marker=".")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_weights(rows: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    epochs = _epochs(rows)
    keys = sorted({k for r in epochs for k in r if k.startswith("weight/")})
    if not keys:
        return None
    plt = _figure()
    x = list(range(1, len(epochs) + 1))
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot(x, [r.get(k, float("nan")) for r in epochs], label=k[len("weight/"):])
    ax.set_xlabel("epoch")
    ax.set_ylabel("effective loss weight")
    ax.set_yscale("log")
    ax.set_title(f"{title}: per-path weights")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(run_dirs: list[str | Path]) -> list[Path]:
    """Write plots and ``report.md`` into each run directory; return the files written."""
    written: list[Path] = []
    for d in map(Path, run_dirs):
        rows = read_metrics(d)
        summary_path = d / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        title = summary.get("name") or d.name
        files = [f for f in (plot_curves(rows, d / "curves.png", title), plot_weights(rows, d / "weights.png", title))
                 if f is not None]
        lines = [f"# {title}", "", f"Run directory: `{d}`", ""]
        if summary:
            for key in ("method", "test_accuracy", "val_accuracy", "teacher_test_accuracy", "params", "wall_time_s"):
                if summary.get(key) is not None:
                    v = summary[key]
                    lines.append(f"- {key}: {100 * v:.2f}%" if "accuracy" in key else f"- {key}: {v}")
            weights = summary.get("final_weights")
            if weights:
                lines += ["", "Final effective weights:", ""] + [f"- {k}: {v:.4g}" for k, v in weights.items()]
        else:
            epochs = _epochs(rows)
            lines.append(f"In progress: {len(epochs)} epoch(s) logged.")
        lines += [""] + [f"![{f.stem}]({f.name})" for f in files]
        (d / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written += [*files, d / "report.md"]
    return written
