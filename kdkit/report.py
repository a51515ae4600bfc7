"""``kdkit report RUN_DIR [RUN_DIR ...]``: plots and a ``report.md`` from a run's files.

For each run it draws, from ``metrics.jsonl``: the training losses and validation accuracy per epoch
(``curves.png``, stage boundaries marked); when the method logged them, the effective per-path loss weights
(``weights.png``, adaptive), the generated samples' class histogram and diversity per epoch
(``generated.png``, data-free; the latest sample grid is linked), and the last training loss of every stage
(``stages.png``, multi-stage methods such as block-by-block grafting). ``report.md`` adds the report card of
``summary.json`` (teacher against student: accuracy, parameters, MACs, size, CPU latency, agreement).
With several runs, ``--out`` (default: the folder holding them all) receives one ``report.md`` comparing them.
It works on finished runs and on runs still in progress (no ``summary.json`` yet).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import KdkitError

#: the picture of test images, ground truth and predictions a dense-task run writes (kdkit.tasks)
EXAMPLES = "examples.png"


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


def _save(plt: Any, fig: Any, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _kept(rows: list[dict[str, Any]], epochs: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(x position, label) of each stage's kept epoch on the curves' axis of all epochs in order."""
    out = []
    for r in rows:
        if r.get("event") == "stage_end" and r.get("selected_epoch"):
            for i, e in enumerate(epochs):
                if e.get("stage") == r.get("stage") and e.get("epoch") == r["selected_epoch"]:
                    out.append((i + 1, f"kept: {r['stage']} epoch {r['selected_epoch']}"))
    return out


def plot_curves(rows: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Training losses (one panel per update of a several-update stage, e.g. a generator and a student) and the
    validation accuracy when there is one, with the kept epoch of each stage marked."""
    epochs = _epochs(rows)
    if not epochs:
        return None
    plt = _figure()
    x = list(range(1, len(epochs) + 1))
    keys = sorted({k for r in epochs for k in r if k.startswith("train/") and not k.endswith("grad_norm")})
    groups: dict[str, list[str]] = {}
    for k in keys:
        name = k[len("train/"):]
        groups.setdefault(name.split("/", 1)[0] if "/" in name and not name.startswith("path/") else "", []).append(k)
    val_key = next((k for k in VAL_KEYS if any(k in r for r in epochs)), "val/accuracy")
    val = [r.get(val_key) for r in epochs]
    has_val = any(v is not None for v in val)
    panels = len(groups) + (1 if has_val else 0)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(5.5 * max(1, panels), 4), squeeze=False)
    kept = _kept(rows, epochs)
    for ax, (group, ks) in zip(axes[0], groups.items()):
        for k in ks:
            ax.plot(x, [r.get(k, float("nan")) for r in epochs], label=k[len("train/"):].split("/", 1)[-1]
                    if group else k[len("train/"):])
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{group + ' ' if group else ''}training loss (epoch mean)")
        positive = all(r.get(k, 1) is None or r.get(k, 1) > 0 for r in epochs for k in ks)
        ax.set_yscale("log" if positive else "linear")
        ax.legend(fontsize=7)
    if has_val:
        ax2 = axes[0][-1]
        ax2.plot(x, [100 * v if v is not None else float("nan") for v in val], marker=".")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(f"validation {METRIC_NAMES.get(val_key[4:], val_key[4:])} (%)")
    for ax in axes[0]:
        for pos, _ in kept:
            ax.axvline(pos, color="gray", linestyle="--", linewidth=0.8)
        if kept:
            ax.annotate(kept[-1][1], (kept[-1][0], 1), xycoords=("data", "axes fraction"), fontsize=7,
                        ha="right", va="top", color="gray", rotation=90)
    fig.suptitle(title)
    return _save(plt, fig, out)


def plot_weights(rows: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    epochs = _epochs(rows)
    keys = sorted({k for r in epochs for k in r if k.startswith("weight/")})
    if not keys:
        return None
    plt = _figure()
    x = list(range(1, len(epochs) + 1))
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [r.get(k) for r in epochs for k in keys if isinstance(r.get(k), (int, float)) and r.get(k) > 0]
    styles = ["-", "--", "-.", ":"]
    for i, k in enumerate(keys):
        ax.plot(x, [r.get(k, float("nan")) for r in epochs], label=k[len("weight/"):], linestyle=styles[i % 4],
                marker="o" if len(x) <= 30 else None, markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("effective loss weight")
    if values and max(values) / min(values) > 10:  # weights far apart: a log scale, with plain tick labels
        ax.set_yscale("log")
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(ScalarFormatter() if values and max(values) / min(values) <= 10 else fmt)
    ax.set_title(f"{title}: per-path weights")
    ax.legend(fontsize=7)
    return _save(plt, fig, out)


def plot_generated(rows: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Class histogram of the generated samples per epoch (a heat map) and their diversity (data-free)."""
    epochs = [r for r in _epochs(rows) if "gen/class_histogram" in r]
    if not epochs:
        return None
    import numpy as np

    plt = _figure()
    hist = np.array([r["gen/class_histogram"] for r in epochs], dtype=float)
    hist /= np.maximum(1.0, hist.sum(1, keepdims=True))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    im = ax1.imshow(hist.T, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                    extent=(0.5, len(epochs) + 0.5, -0.5, hist.shape[1] - 0.5))
    fig.colorbar(im, ax=ax1, label="fraction of generated samples")
    ax1.set_xlabel("epoch (all stages)")
    ax1.set_ylabel("teacher's class")
    ax2.plot(range(1, len(epochs) + 1), [r.get("gen/diversity") for r in epochs], marker=".", label="diversity")
    ax2.plot(range(1, len(epochs) + 1), [r.get("gen/class_entropy") for r in epochs], marker=".",
             label="class entropy (1 = balanced)")
    ax2.set_xlabel("epoch (all stages)")
    ax2.legend(fontsize=7)
    fig.suptitle(f"{title}: generated samples")
    return _save(plt, fig, out)


def plot_stages(rows: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """The last epoch's training losses of every stage, in order (one bar group per stage)."""
    last: dict[str, dict[str, Any]] = {}
    for r in _epochs(rows):
        last[r.get("stage", "?")] = r
    if len(last) < 2:
        return None
    plt = _figure()
    keys = sorted({k for r in last.values() for k in r if k.startswith("train/")})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(last)), 4))
    width = 0.8 / max(1, len(keys))
    for i, k in enumerate(keys):
        ax.bar([j + i * width for j in range(len(last))], [r.get(k, 0.0) for r in last.values()], width,
               label=k[len("train/"):])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(last))], list(last), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("training loss, last epoch of the stage")
    ax.set_title(f"{title}: stages")
    ax.legend(fontsize=7)
    return _save(plt, fig, out)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _ms(v: float | None, decimals: int, unit: str = " ms") -> str:
    return "-" if v is None else f"{v:.{decimals}f}{unit}"


#: validation keys of the tasks' primary metrics in metrics.jsonl, and their names in plots and tables
VAL_KEYS = ("val/accuracy", "val/miou", "val/map",
            *(f"val/{k}" for k in ("tar_far1e-2", "tar_far1e-3", "tar_far1e-4", "recall_at_1")))
METRIC_NAMES = {"accuracy": "accuracy", "miou": "mIoU", "map": "mAP@[.5:.95]", "map50": "mAP@.5",
                "pixel_accuracy": "pixel accuracy", "eer": "EER", "recall_at_1": "recall@1",
                "tar_far1e-2": "TAR@FAR=1e-2", "tar_far1e-3": "TAR@FAR=1e-3", "tar_far1e-4": "TAR@FAR=1e-4"}


def plot_roc(summary: dict[str, Any], out: Path, title: str) -> Path | None:
    """Teacher and student ROC curves (verification: TAR against FAR, log FAR axis), from summary.json."""
    curves = {name: summary.get(key, {}).get("roc") for name, key in
              (("student" if summary.get("teacher") else "model", "test_metrics"), ("teacher", "teacher_test_metrics"))}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, roc in curves.items():
        pts = [(f, t) for f, t in zip(roc["far"], roc["tar"]) if f > 0]
        ax.plot([f for f, _ in pts], [t for _, t in pts], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate (impostor pairs accepted)")
    ax.set_ylabel("true accept rate (genuine pairs accepted)")
    ax.set_title(f"{title}: verification on the test identities")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(plt, fig, out)


def _metric(d: dict[str, Any]) -> str:
    """The primary metric a summary or a card reports (accuracy, miou)."""
    if "primary_metric" in d:
        return d["primary_metric"]
    return next((m for m in METRIC_NAMES if f"test_{m}" in d), "accuracy")


def card_lines(card: dict[str, Any]) -> list[str]:
    """The report card as a markdown table (teacher and student, or the one trained model)."""
    roles = [r for r in ("teacher", "student", "model") if r in card]
    if not roles:
        return []
    m = _metric(card[roles[0]])
    further = [k for k in card[roles[0]] if k.startswith("test_") and k != f"test_{m}"]
    rows = [(f"test {METRIC_NAMES.get(m, m)}", lambda c: _pct(c.get(f"test_{m}"))),
            *[(f"test {METRIC_NAMES.get(k[5:], k[5:])}", lambda c, k=k: _pct(c.get(k))) for k in further],
            ("parameters", lambda c: f"{c['params']:,}"),
            ("MACs per image", lambda c: f"{c['macs']:,}"),
            ("size on disk", lambda c: f"{c['size_bytes'] / 1e6:.3f} MB"),
            ("CPU latency, batch 1", lambda c: _ms(c["cpu_latency_ms_batch1"], 3)),
            ("CPU latency per image, batch 64", lambda c: _ms(c["cpu_latency_ms_per_image_batch64"], 4))]
    out = ["| | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    out += [f"| {name} | " + " | ".join(fn(card[r]) for r in roles) + " |" for name, fn in rows]
    agree = card.get("top1_agreement", card.get("pixel_agreement"))
    if agree is not None:
        c = card["compression"]
        speed = (f"{c['speedup_batch1']:.2f}x faster at batch 1" if c.get("speedup_batch1") is not None
                 else "of unmeasured speed (see below)")
        what = "test images (top-1)" if "top1_agreement" in card else "labelled test pixels (per-pixel class)"
        out += ["", f"Student and teacher agree on {_pct(agree)} of the {what}. "
                f"The student is {c['params']:.1f}x smaller in parameters, {c['macs']:.1f}x in MACs and {speed}."]
    out += _data_free_lines(card)
    if card.get("latency_note"):
        timed = any(card[r]["cpu_latency_ms_batch1"] is not None for r in roles)
        advice = "; time the models on a quiet machine" if timed else ""
        out += ["", f"Latency: {card['latency_note']}{advice}."]
    return out


def _data_free_lines(card: dict[str, Any]) -> list[str]:
    """What a data-free run's card says about its generator (collapses and their handling) and its student."""
    out: list[str] = []
    gc = card.get("generator_collapse")
    if gc is not None:
        if gc["events"]:
            acts = "; ".join(a for a in gc["actions"] if a) or "none"
            end = "still collapsed at the end" if gc["collapsed_at_end"] else "not collapsed at the end"
            out.append(f"The generator collapsed {gc['events']} time(s) (method.on_collapse={gc['handling']}; "
                       f"done: {acts}); {end}.")
        else:
            out.append(f"The generator never collapsed (method.on_collapse={gc['handling']}).")
    stuck = card.get("student_stuck")
    if stuck:
        out.append(f"The student was not learning: it gave class {stuck['class']} to every generated image for "
                   f"{stuck['epochs']} epochs ([{stuck['stage']}] epoch {stuck['epoch']}).")
    return ["", *out] if out else []


def _summary(d: Path) -> dict[str, Any]:
    path = d / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}  # being written


def report_run(d: Path) -> list[Path]:
    """Plots and report.md for one run directory; the files written."""
    rows = read_metrics(d)
    summary = _summary(d)
    title = d.name if summary.get("name") in (None, "run") else summary["name"]
    plots = [plot_curves(rows, d / "curves.png", title), plot_weights(rows, d / "weights.png", title),
             plot_generated(rows, d / "generated.png", title), plot_stages(rows, d / "stages.png", title),
             plot_roc(summary, d / "roc.png", title)]
    files = [f for f in plots if f is not None]
    lines = [f"# {title}", "", f"Run directory: `{d}`", ""]
    if summary:
        m = _metric(summary)
        for key in ("task", "method", "model", "teacher", f"test_{m}", f"val_{m}", f"teacher_test_{m}",
                    "wall_time_s", "seed"):
            if summary.get(key) is not None:
                v = summary[key]
                lines.append(f"- {key}: {_pct(v)}" if key.endswith(m) else f"- {key}: {v}")
        per_class = summary.get("test_metrics", {}).get("per_class_iou")
        if per_class:
            names = summary.get("classes") or [str(i) for i in range(len(per_class))]
            lines.append("- test IoU per class: " + ", ".join(f"{n} {_pct(v)}" for n, v in zip(names, per_class)))
        for f in summary.get("faults", []):
            lines.append(f"- fault: {f.get('kind')} at step {f.get('global_step')}: {f.get('action')}")
        card = card_lines(summary.get("report_card", {}))
        if card:
            lines += ["", "## Report card", "", *card]
        weights = summary.get("final_weights")
        if weights:
            lines += ["", "Final effective weights:", ""] + [f"- {k}: {v:.4g}" for k, v in weights.items()]
    else:
        lines.append(f"In progress: {len(_epochs(rows))} epoch(s) logged.")
    lines += ["", "## Plots", ""] + [f"![{f.stem}]({f.name})" for f in files]
    if (d / EXAMPLES).is_file():
        lines += ["", "Test images, their ground truth and the models' predictions:", "", f"![examples]({EXAMPLES})"]
    grids = sorted((d / "samples").glob("*.png"), key=lambda p: p.stat().st_mtime) if (d / "samples").is_dir() else []
    if grids:
        lines += ["", f"Latest generated samples ({grids[-1].name}, {len(grids)} grids in samples/):", "",
                  f"![samples](samples/{grids[-1].name})"]
    (d / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [*files, d / "report.md"]


def comparison(run_dirs: list[Path], out: Path) -> Path:
    """One markdown table comparing runs (finished or not) side by side."""
    head = ("run", "method", "model", "test score", "teacher score", "agreement", "params", "MACs",
            "latency b1 (ms)", "wall time (s)", "status")
    lines = ["# Comparison", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in run_dirs:
        s = _summary(d)
        card = s.get("report_card", {})
        mine = card.get("student") or card.get("model") or {}
        status = "finished" if s else f"in progress ({len(_epochs(read_metrics(d)))} epochs)"
        link = f"[{d.parent.name}/{d.name}]({os.path.relpath(d / 'report.md', out)})"
        m = _metric(s)
        tag = "" if m == "accuracy" else f" {METRIC_NAMES.get(m, m)}"
        cells = [link, s.get("method", "-"), s.get("model", "-"), _pct(s.get(f"test_{m}")) + tag,
                 _pct(s.get(f"teacher_test_{m}")), _pct(card.get("top1_agreement", card.get("pixel_agreement"))),
                 f"{mine['params']:,}" if mine else "-", f"{mine['macs']:,}" if mine else "-",
                 _ms(mine["cpu_latency_ms_batch1"], 3, "") if mine else "-", str(s.get("wall_time_s", "-")), status]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def report(run_dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write plots and ``report.md`` into each run directory, and with several runs a comparison
    ``report.md`` into `out` (default: the folder holding them all); return the files written."""
    dirs = [Path(d) for d in run_dirs]
    written: list[Path] = []
    for d in dirs:
        written += report_run(d)
    if len(dirs) > 1:
        target = Path(out) if out is not None else Path(os.path.commonpath([d.resolve() for d in dirs]))
        if target.resolve() in {d.resolve() for d in dirs}:
            raise KdkitError(f"--out {target} is one of the runs; give another folder for the comparison")
        written.append(comparison(dirs, target))
    return written
