"""The ``kdkit`` command line.

    kdkit train CONFIG [key=value ...]          train one model (teachers, students alone)
    kdkit distill CONFIG [key=value ...]        distill a student from a teacher (method.name picks how)
    kdkit train|distill --resume RUN_DIR        continue an interrupted run to the same result
    kdkit eval --checkpoint PATH [--data NAME --root DIR]
    kdkit models [NAME]                         the zoo, or one model's layer paths and parts
    kdkit report RUN_DIR [RUN_DIR ...]          curves, per-path weights and report.md of runs
    kdkit sample RUN_DIR [-n 64]                images from a data-free run's generator, as a PNG grid
    kdkit export RUN_DIR [--format pt2|onnx|torchscript|state_dict]   the student alone, checked, with its
                                                preprocessing in a sidecar JSON
    kdkit bench speed --teacher T --student S   kdkit's training step against a hand-written loop
    kdkit compare SPEC.yaml                     recipes over paired seeds (a resumable queue), 95% intervals
    kdkit demo                                  teacher, student alone and KD on digits, in a table

Every user error prints one line ``kdkit: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import KdkitError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdkit", description="Knowledge distillation for any PyTorch model, with whatever data you have.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides use dotted keys: kdkit distill configs/mnist/kd.yaml train.epochs=3 "
               "data.root=../shared/data/mnist\nMulti-process: torchrun --nproc_per_node 2 -m kdkit distill CONFIG",
    )
    p.add_argument("--version", action="version", version=f"kdkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    for name, text in (("train", "train one model on its labels with its task's loss, cross-entropy for classifiers "
                                  "(config section 'model')"),
                       ("distill", "distill a student from a teacher (sections 'student', 'teacher', 'method')")):
        from .methods import METHODS

        methods = ", ".join(n for n in sorted(METHODS) if not n.startswith("_"))
        s = sub.add_parser(name, help=text, description=text,
                           epilog=f"methods (method.name): {methods}. Every key: docs/config.md")
        s.add_argument("config", nargs="?", help="YAML recipe (e.g. configs/mnist/kd.yaml)")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")
        s.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR")
        s.add_argument("--overwrite", action="store_true",
                       help="replace a run already in output_dir (by default a recipe's folder that holds a run "
                            "gives way to a fresh -2 beside it)")

    e = sub.add_parser("eval", help="a model file's test metrics on a dataset: accuracy, mIoU, mAP or "
                                    "verification, by its task (prints JSON)")
    e.add_argument("--checkpoint", required=True, help="a model.pt written by kdkit, or its run folder")
    e.add_argument("--data", help="dataset name (default: the one the model was trained on)")
    e.add_argument("--root", help="dataset folder (default: the one the model was trained with)")
    e.add_argument("--split", default="test", choices=("test", "train"))
    e.add_argument("--batch-size", type=int, default=512)

    m = sub.add_parser("models", help="list the model zoo, or show one model's layer paths")
    m.add_argument("name", nargs="?", help="a zoo model: print its stages, classifier and module paths")
    m.add_argument("--num-classes", type=int, default=10)
    m.add_argument("--in-channels", type=int, default=None, help="default: 1 for lenet5* and mlp, 3 otherwise")

    r = sub.add_parser("report", help="plots, report card and report.md for runs (a comparison for several)")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("--out", help="folder for the comparison report.md of several runs (default: their common folder)")

    g = sub.add_parser("sample", help="images from a data-free run's generator (or synthesised set), as a PNG grid")
    g.add_argument("run_dir", metavar="RUN_DIR")
    g.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    g.add_argument("--out", help="PNG path (default RUN_DIR/samples/sample_n<N>_seed<S>.png)")
    g.add_argument("--seed", type=int, default=0, help="seed of the noise")
    g.add_argument("--tensors", action="store_true", help="also save the normalised images as a .pt tensor")

    x = sub.add_parser("export", help="the trained student as a standalone torch.export, ONNX, TorchScript or "
                                      "state_dict file, with a sidecar JSON of its preprocessing",
                       description="Write the student of a finished run (no teacher, adapters folded), check that "
                                   "the exported file's outputs match the PyTorch model's on a batch, and write "
                                   "FILE.json with the input shape, class names and preprocessing.")
    x.add_argument("run_dir", metavar="RUN_DIR", help="a finished run (or its model.pt)")
    x.add_argument("--format", default="pt2", choices=("pt2", "onnx", "torchscript", "state_dict"),
                   help="pt2 (torch.export, default), onnx, torchscript (deprecated upstream) or state_dict")
    x.add_argument("--with-preprocessing", action="store_true",
                   help="put the normalisation into the graph: the exported model takes pixels in 0..255")
    x.add_argument("--out", help="output path (default RUN_DIR/model.<format suffix>)")

    b = sub.add_parser("bench", help="measure kdkit itself (bench speed: kdkit's step against a hand-written loop)")
    bsub = b.add_subparsers(dest="bench", metavar="WHAT", required=True)
    sp = bsub.add_parser("speed", help="steps/s of kdkit's step and of a hand-written PyTorch loop (prints JSON)",
                         description="Time kdkit's training step (real engine, hooks, losses) against a minimal "
                                     "hand-written PyTorch loop doing the same mathematics, alternating step by step.")
    sp.add_argument("--teacher", required=True, help="zoo model name (random weights) or a kdkit model.pt")
    sp.add_argument("--student", required=True, help="zoo model name")
    sp.add_argument("--method", default="kd", help="kd, fitnets, adaptive or th_kd (default kd)")
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--input-shape", default="3,32,32", help="C,H,W (default 3,32,32)")
    sp.add_argument("--num-classes", type=int, default=10)
    sp.add_argument("--steps", type=int, default=50, help="timed steps per side (default 50)")
    sp.add_argument("--warmup", type=int, default=10, help="untimed steps per side first (default 10)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for both sides, e.g. train.channels_last=true method.temperature=2")

    c = sub.add_parser("compare", help="recipes over paired seeds as a resumable queue, compared with 95%% intervals",
                       description="Run the arms of a comparison spec (YAML) over paired seeds, one run at a time; "
                                   "kill it and start it again to continue. Writes compare.md, compare.json and "
                                   "compare.png with each arm's mean and interval and the paired differences.",
                       epilog="Spec format: docs/compare.md; specs of the benchmarks: benchmarks/compare/")
    c.add_argument("spec", help="a comparison spec (YAML)")
    c.add_argument("--render", action="store_true", help="only write the report of the runs finished so far")
    c.add_argument("--dry-run", action="store_true", help="check the spec and every run's config, print the commands")
    c.add_argument("--max-runs", type=int, metavar="N", help="stop after N runs (run the same command to continue)")
    c.add_argument("--retry-failed", action="store_true", help="run again the runs that failed earlier")
    c.add_argument("--until", metavar="WHEN",
                   help="start no run that would end after WHEN (+90m, +2h, 17:30 or '2026-12-24 17:30'; each run "
                        "timed by its arm's finished runs; a shorter run that fits goes first): the queue stops "
                        "between runs")
    c.add_argument("--longest-first", action="store_true",
                   help="take the longest runs first (arms not timed yet, then by their finished runs' wall time) "
                        "instead of seed by seed: with --until, long runs start while they still fit")

    d = sub.add_parser("demo", help="teacher, student alone and KD on the bundled digits data (under a minute)")
    d.add_argument("--output-dir", default=None, help="where the three runs go (default runs/demo-<time>)")
    d.add_argument("--epochs", type=int, default=None, help="override every run's epochs (for a quick look)")
    return p


def _run(args: argparse.Namespace, command: str) -> int:
    from .config import load_config
    from .run import execute

    overrides = list(args.overrides)
    if args.config and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)  # `kdkit train model.arch=mlp ...` with no recipe file
        args.config = None
    resume = args.resume is not None
    default_method = "supervised" if command == "train" else "kd"
    if resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise KdkitError(f"--resume {run_dir}: no config.yaml there; give the folder of an earlier run")
        if args.config is None and overrides:
            raise KdkitError("--resume continues a run as it was configured, so it takes no key=value overrides; "
                             "to change settings, start a new run with another output_dir")
        cfg = load_config(args.config or run_dir / "config.yaml", overrides, default_method=default_method)
        cfg.output_dir = str(run_dir)
    else:
        if args.config is None and not overrides:
            raise KdkitError(f"kdkit {command} needs a CONFIG file (see configs/) or key=value settings")
        cfg = load_config(args.config, overrides, default_method=default_method)
    result = execute(cfg, command, resume=resume, overwrite=args.overwrite)
    s = result.summary
    if not result.is_main:
        return 0
    extra = {"vs_alone_difference": s["vs_alone"]["difference"]} if "vs_alone" in s else {}
    p = s.get("primary_metric", "accuracy")
    print(json.dumps({k: s[k] for k in (f"test_{p}", f"val_{p}", "params", "wall_time_s")} | extra
                     | {"run_dir": str(result.run_dir)}))
    if "vs_alone" in s:
        v = s["vs_alone"]
        verdict = "helped" if v["helped"] else "did NOT help"
        what = "test accuracy" if p == "accuracy" else f"test {p}"
        print(f"kdkit: distillation {verdict}: {100 * v['difference']:+.2f} points of {what} against the "
              f"student alone ({100 * v[f'student_alone_test_{p}']:.2f}%, same seed, data and schedule; "
              f"{v['run_dir']}); one seed: compare several with kdkit compare", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .api import evaluate

    print(json.dumps(evaluate(args.checkpoint, data=args.data, root=args.root, split=args.split,
                              batch_size=args.batch_size)))
    return 0


def _models(args: argparse.Namespace) -> int:
    from .measure import count_params
    from .models import create, entry, model_parts, zoo_names

    def channels(name: str) -> int:
        return 1 if name.startswith("lenet") or name == "mlp" else 3

    if args.name:
        e = entry(args.name)
        args.in_channels = args.in_channels or channels(args.name)
        model = create(args.name, num_classes=args.num_classes, in_channels=args.in_channels)
        parts = model_parts(model)
        print(f"{args.name}: {e.summary}; {count_params(model):,} parameters "
              f"({args.in_channels}x{e.default_input_size}x{e.default_input_size} input, {args.num_classes} classes)")
        print(f"stages:     {', '.join(parts.stages)}")
        print(f"classifier: {parts.classifier}   embedding: {parts.embedding}")
        print("module paths (for taps and layer pairs):")
        for n, mod in model.named_modules():
            if n:
                print(f"  {n:<40} {type(mod).__name__}")
        return 0
    print(f"{'model':<14} {'params':>12}  {'input':>8}  description (params for 10 classes at that input)")
    for n in zoo_names():
        e = entry(n)
        c = args.in_channels or channels(n)
        params = count_params(create(n, num_classes=10, in_channels=c))
        size = e.default_input_size
        print(f"{n:<14} {params:>12,}  {f'{c}x{size}x{size}':>8}  {e.summary}")
    return 0


def _show_run_warnings() -> None:
    """Print kdkit's warnings about the run as one line, ``kdkit: warning: ...``; others as Python does."""
    import warnings

    from .errors import RunWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, RunWarning):
            print(f"kdkit: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    _show_run_warnings()
    if os.getcwd() not in sys.path and "" not in sys.path:  # the console script: user modules from the cwd
        sys.path.insert(0, os.getcwd())
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .engine import Interrupted

    try:
        if args.command in ("train", "distill"):
            return _run(args, args.command)
        if args.command == "eval":
            return _eval(args)
        if args.command == "models":
            return _models(args)
        if args.command == "report":
            from .report import report

            for f in report(args.run_dirs, args.out):
                print(f)
            return 0
        if args.command == "sample":
            from .generators import sample_run

            print(json.dumps(sample_run(args.run_dir, args.n, args.out, args.seed, args.tensors)))
            return 0
        if args.command == "export":
            from .exporting import export

            print(json.dumps(export(args.run_dir, args.format, args.out, preprocessing=args.with_preprocessing),
                             indent=2))
            return 0
        if args.command == "bench":
            from .bench.speed import main as bench_speed

            return bench_speed(args)
        if args.command == "compare":
            from .compare import compare, dry_run

            if args.dry_run:
                print("\n".join(dry_run(args.spec)))
                return 0
            try:
                report = compare(args.spec, run=not args.render, max_runs=args.max_runs,
                                 retry_failed=args.retry_failed, until=args.until,
                                 longest_first=args.longest_first)
            except KeyboardInterrupt:
                print("kdkit compare: stopped; the run in progress kept its checkpoint, run the same command to "
                      "continue", file=sys.stderr)
                return 130
            from .compare import load_spec

            print(f"report: {load_spec(args.spec).out / 'compare.md'}")
            return 0 if report else 1
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.output_dir, args.epochs)
            return 0
    except KdkitError as e:
        print(f"kdkit: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"kdkit: {e}; continue with --resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled: stop at once
        print("kdkit: stopped at once by a second interrupt; the last checkpoint written is kept, continue with "
              "--resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output went to a pipe closed early (`kdkit models | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    parser.error(f"unknown command {args.command}")
    return 2
