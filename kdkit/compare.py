"""``kdkit compare``: several recipes (arms) over paired seeds, run as a resumable queue, compared with
confidence intervals.

A spec (YAML, or a dict from Python) names the arms, the seeds and the baseline::

    name: mnist-lowlabel-kd
    seeds: 10                       # 0..9, or a list
    baseline: student               # every other arm is compared with it, seed by seed
    set: [data.root=../shared/data/mnist]       # overrides for every run
    arms_set: ["data.name={data}"]  # overrides for every arm (not the prepare runs): may use cell variables
    prepare:                        # runs made once, before the arms: {teacher} is the run's folder
      teacher: {command: train, config: configs/mnist/teacher_lenet5.yaml, dir: runs/teachers/mnist_lenet5}
    arms:
      student: {command: train, config: configs/mnist/lowlabel_student.yaml}
      kd: {command: distill, config: configs/mnist/lowlabel_kd.yaml, set: ["teacher.checkpoint={teacher}/model.pt"]}
    cells: {shots: [1, 10]}         # optional: a grid; {shots} in overrides; each cell is its own comparison
    # an arm may add `seeds: [0, 1, 2]`: it runs only those of the spec's seeds (a retired setting kept on record)
    # and `cells: {shots: [10]}`: it runs only in the cells where each named variable takes one of those values
    contrasts: [[kd, student]]      # optional: further pairs than every arm against the baseline

Pairing: the run of arm A with seed s and the run of arm B with seed s share the seed, hence (where the
architectures allow) the student's initial weights and the order and augmentation of the images; every
summary records fingerprints of both (``pairing``) and the report says, per pair, whether they matched.

The queue runs one ``kdkit`` process at a time, in the order seed, cell, arm (so early results are balanced
across arms). It can be killed at any point and started again with the same command: finished runs (a
``summary.json``) are never redone, an interrupted run continues from its checkpoint (``--resume``). Several
queues may run one spec at once on one machine (one per core, say): each takes the next run no other holds
(``OUT/claims/``), and arms wait for the prepare runs. Each run's command, exit status, wall and CPU time and
the machine's load when it started are kept in ``queue.json``; its output in ``logs/``. The report
(``compare.md``, ``compare.json``, ``compare.png``) gives per arm the mean and 95% interval of the metric, the
kept (best validation) state against the last one, the cost per run, and per pair the mean paired difference
with its interval.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, KdkitError, did_you_mean
from .jsonfile import write_json
from .stats import Interval, Paired, mean_ci, paired
from .stop_signals import on_stop_signals

SPEC_KEYS = ("name", "out", "seeds", "metric", "also", "baseline", "set", "arms_set", "prepare", "arms", "cells",
             "contrasts", "level", "base")
RUN_KEYS = ("command", "config", "set", "dir", "seeds", "cells")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class RunSpec:
    """One arm (or prepare run): ``kdkit <command> <config> <set...>``."""

    name: str
    command: str
    config: str | None
    overrides: list[str]
    dir: str | None = None  # prepare runs: a folder of their own, shared by the specs that name it
    seeds: list[int] | None = None  # arms: a subset of the spec's seeds (e.g. a retired arm kept for the record)
    cells: dict[str, list[Any]] | None = None  # arms: the cells they run in (values of some cell variables)

    def runs_in(self, cell: dict[str, Any]) -> bool:
        """Whether this arm runs in ``cell`` (every restricted variable takes one of the arm's values there)."""
        return all(cell.get(k) in v for k, v in (self.cells or {}).items())


@dataclass
class Spec:
    name: str
    out: Path
    seeds: list[int]
    metric: str
    baseline: str
    overrides: list[str]
    arm_overrides: list[str]
    prepare: dict[str, RunSpec]
    arms: dict[str, RunSpec]
    cells: dict[str, list[Any]]
    contrasts: list[tuple[str, str]]
    level: float = 0.95
    #: further metrics, each reported like the main one in compare.<metric>.md/.json/.png (not used by the queue)
    also: list[str] = field(default_factory=list)


@dataclass
class Run:
    """A run of the queue: an arm in a cell with a seed (or a prepare run)."""

    key: str
    arm: str
    cell: str
    seed: int | None
    command: str
    argv: list[str]  # kdkit's arguments after the command, for a fresh start
    run_dir: Path
    log: Path

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()

    @property
    def started(self) -> bool:
        return (self.run_dir / "config.yaml").is_file()


# ---- the spec --------------------------------------------------------------------------------------
def _as_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where}: expected a list of key=value overrides, got {value!r}")
    return list(value)


def _run_spec(name: str, data: Any, where: str) -> RunSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with command, config and set, got {data!r}")
    for k in data:
        if k not in RUN_KEYS:
            raise ConfigError(f"{where}: unknown key {k!r}{did_you_mean(str(k), RUN_KEYS)}; keys: "
                              f"{', '.join(RUN_KEYS)}")
    command = data.get("command", "distill")
    if command not in ("train", "distill"):
        raise ConfigError(f"{where}.command: 'train' or 'distill', got {command!r}")
    config = data.get("config")
    if config is not None and not _PLACEHOLDER.search(str(config)) and not Path(config).is_file():
        raise ConfigError(f"{where}.config: {config!r} not found (paths are relative to the folder kdkit compare "
                          f"runs in: {os.getcwd()})")
    if data.get("dir") is not None and not where.startswith("prepare."):
        raise ConfigError(f"{where}.dir: only prepare runs take a folder of their own (arms live under 'out')")
    seeds = data.get("seeds")
    if seeds is not None and (where.startswith("prepare.") or not isinstance(seeds, list) or not seeds
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"{where}.seeds: an arm may run a subset of the spec's seeds, given as a non-empty list "
                          f"of integers (prepare runs have no seed), got {seeds!r}")
    cells = data.get("cells")
    if cells is not None and (where.startswith("prepare.") or not isinstance(cells, dict) or not cells
                              or not all(isinstance(v, list) and v for v in cells.values())):
        raise ConfigError(f"{where}.cells: an arm may run in some of the spec's cells, given as a mapping of cell "
                          f"variables to non-empty lists of their values, e.g. {{shots: [10]}} (prepare runs have "
                          f"no cell), got {cells!r}")
    return RunSpec(name, command, config, _as_list(data.get("set"), f"{where}.set"), data.get("dir"), seeds,
                   {str(k): v for k, v in cells.items()} if cells is not None else None)


def _with_base(spec: str | os.PathLike | dict[str, Any], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The spec's keys, over those of the spec its ``base:`` names (a YAML file, relative to this spec's folder, or
    to the working directory for a spec given as a dict): each key given here replaces the base's whole value,
    so a spec can rerun another's arms with, say, different ``arms_set`` overrides without copying them. The base's
    ``name`` and ``out`` are not inherited."""
    from .config import load_yaml

    raw = load_yaml(spec) if not isinstance(spec, dict) else dict(spec)
    if not isinstance(raw, dict):
        raise ConfigError(f"compare spec {spec}: a spec is a mapping of keys ({', '.join(SPEC_KEYS)})")
    for k in raw:
        if k not in SPEC_KEYS:
            raise ConfigError(f"compare spec: unknown key {k!r}{did_you_mean(str(k), SPEC_KEYS)}; "
                              f"keys: {', '.join(SPEC_KEYS)}")
    if "base" not in raw:
        return raw
    here = Path(spec).parent if not isinstance(spec, dict) else Path(".")
    base = (here / str(raw.pop("base"))).resolve()
    if not base.is_file():
        raise ConfigError(f"compare spec: base {base} does not exist (a path to another spec, relative to "
                          f"{here.resolve()})")
    if base in seen:
        raise ConfigError(f"compare spec: base {base} names itself through {' -> '.join(map(str, seen))}")
    inherited = {k: v for k, v in _with_base(base, (*seen, base)).items() if k not in ("name", "out")}
    return {**inherited, **raw}  # name and out are this spec's own: two specs never share a results folder


def load_spec(spec: str | os.PathLike | dict[str, Any]) -> Spec:
    """Read and check a comparison spec (a YAML file or a dict): one clear error for any mistake."""
    raw = _with_base(spec)
    default_name = Path(spec).stem if not isinstance(spec, dict) else "compare"
    name = str(raw.get("name") or default_name)
    seeds = raw.get("seeds", 10)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(
            seeds):
        raise ConfigError(f"compare spec: seeds is a count or a list of distinct integers, got {raw.get('seeds')!r}")
    arms_raw = raw.get("arms") or {}
    prepare_raw = raw.get("prepare") or {}
    if not isinstance(prepare_raw, dict):
        raise ConfigError("compare spec: 'prepare' is a mapping {name: {command, config, set}}")
    if not isinstance(arms_raw, dict) or not (arms_raw or prepare_raw):
        raise ConfigError("compare spec: 'arms' must name at least one arm: {arm_name: {command, config, set}} "
                          "(a spec of prepare runs alone, e.g. shared teachers, may leave it out)")
    arms = {str(a): _run_spec(str(a), v, f"arms.{a}") for a, v in arms_raw.items()}
    for a, rs in arms.items():
        extra = sorted(set(rs.seeds or []) - set(seeds))
        if extra:
            raise ConfigError(f"compare spec: arms.{a}.seeds {extra} are not among the spec's seeds {seeds}; an "
                              f"arm's seeds are a subset of them")
    prepare = {str(p): _run_spec(str(p), v, f"prepare.{p}") for p, v in prepare_raw.items()}
    clash = sorted(set(prepare) & set(arms))
    if clash:
        raise ConfigError(f"compare spec: {', '.join(clash)} is both a prepare run and an arm; rename one")
    baseline = raw.get("baseline", next(iter(arms), ""))
    if arms and baseline not in arms:
        raise ConfigError(f"compare spec: baseline {baseline!r} is not an arm{did_you_mean(str(baseline), arms)}; "
                          f"arms: {', '.join(arms)}")
    cells = raw.get("cells") or {}
    if not isinstance(cells, dict) or not all(isinstance(v, list) and v for v in cells.values()):
        raise ConfigError("compare spec: 'cells' maps a name to a non-empty list of values, e.g. {shots: [1, 10]}")
    for a, rs in arms.items():
        for k, values in (rs.cells or {}).items():
            if k not in cells:
                raise ConfigError(f"compare spec: arms.{a}.cells names {k!r}, which is not a cell variable of the "
                                  f"spec{did_you_mean(k, cells) if cells else ' (it has no cells)'}")
            unknown = [v for v in values if v not in cells[k]]
            if unknown:
                raise ConfigError(f"compare spec: arms.{a}.cells.{k} {unknown} are not among the spec's values "
                                  f"{cells[k]}")
    contrasts = []
    for c in raw.get("contrasts") or []:
        if not (isinstance(c, list) and len(c) == 2 and all(x in arms for x in c)):
            raise ConfigError(f"compare spec: contrast {c!r} is not a pair of arm names [arm, other]")
        contrasts.append((c[0], c[1]))
    level = float(raw.get("level", 0.95))
    if not 0 < level < 1:
        raise ConfigError(f"compare spec: level is a confidence level in (0, 1), got {level}")
    out = Path(raw.get("out") or Path("runs") / "compare" / name)
    also = raw.get("also") or []
    also = [also] if isinstance(also, str) else also
    if not isinstance(also, list) or not all(isinstance(m, str) and m for m in also):
        raise ConfigError(f"compare spec: also is a list of further metrics (keys of summary.json, or dotted paths "
                          f"into it such as test_metrics.eer), got {raw.get('also')!r}")
    return Spec(name, out, seeds, str(raw.get("metric", "test_accuracy")), baseline,
                _as_list(raw.get("set"), "set"), _as_list(raw.get("arms_set"), "arms_set"), prepare, arms,
                {str(k): v for k, v in cells.items()}, contrasts, level, also)


def _fill(text: str, values: dict[str, Any], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise ConfigError(f"{where}: unknown placeholder {{{m.group(1)}}} in {text!r}; known: "
                              f"{', '.join('{' + k + '}' for k in sorted(values))}")
        return str(values[m.group(1)])

    return _PLACEHOLDER.sub(sub, text)


def _cell_label(cell: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in cell.items()) or "all"


def plan(spec: Spec) -> list[Run]:
    """Every run of the comparison, prepare runs first, then seed by seed, cell by cell, arm by arm."""
    runs: list[Run] = []
    prep_dirs = {p: Path(rs.dir) if rs.dir else spec.out / "prepare" / p for p, rs in spec.prepare.items()}
    base_values: dict[str, Any] = {k: str(v) for k, v in prep_dirs.items()} | {"out": str(spec.out)}
    for p, rs in spec.prepare.items():
        argv = [*([_fill(rs.config, base_values, f"prepare.{p}")] if rs.config else []),
                *(_fill(o, base_values, f"prepare.{p}") for o in [*spec.overrides, *rs.overrides])]
        runs.append(Run(f"prepare/{p}", p, "prepare", None, rs.command, argv, prep_dirs[p],
                        spec.out / "logs" / "prepare" / f"{p}.log"))
    names = list(spec.cells)
    cells = [dict(zip(names, combo)) for combo in itertools.product(*spec.cells.values())] or [{}]
    for seed in spec.seeds:
        for cell in cells:
            label = _cell_label(cell)
            values = base_values | {k: v for k, v in cell.items()} | {"seed": seed}
            for a, rs in spec.arms.items():
                if (rs.seeds is not None and seed not in rs.seeds) or not rs.runs_in(cell):
                    continue
                where = f"arms.{a}"
                argv = [*([_fill(rs.config, values, where)] if rs.config else []),
                        *(_fill(o, values, where) for o in [*spec.overrides, *spec.arm_overrides, *rs.overrides]),
                        f"seed={seed}"]
                run_dir = spec.out / label / a / f"seed{seed}"
                runs.append(Run(f"{label}/{a}/seed{seed}", a, label, seed, rs.command, argv, run_dir,
                                spec.out / "logs" / label / a / f"seed{seed}.log"))
    return runs


def run_config(r: Run) -> Any:
    """The validated config `r` runs with (its recipe and overrides), or a ConfigError naming the run."""
    from .config import load_config

    cfg_path = r.argv[0] if r.argv and "=" not in r.argv[0] else None
    if cfg_path is not None and not Path(cfg_path).is_file():
        raise ConfigError(f"run {r.key}: config {cfg_path!r} not found (paths are relative to {os.getcwd()})")
    overrides = [a for a in r.argv if a is not cfg_path] + [f"output_dir={r.run_dir}", "train.progress=lines"]
    try:
        return load_config(cfg_path, overrides, default_method="supervised" if r.command == "train" else "kd")
    except KdkitError as e:
        raise ConfigError(f"run {r.key} ({r.command}): {e}") from None


def check(runs: list[Run]) -> None:
    """Validate every run's config (recipe, overrides, method options) before any work starts. A prepare run
    whose folder already holds a run must hold this very run (its saved config equal to the planned one)."""
    import yaml

    from .run import config_differences, named_for_data

    for r in runs:
        cfg = run_config(r)
        if r.started:
            saved = yaml.safe_load((r.run_dir / "config.yaml").read_text(encoding="utf-8"))
            diff = config_differences(saved, named_for_data(cfg))
            if diff and r.seed is None:
                raise ConfigError(f"prepare run {r.key}: {r.run_dir} holds a run with another config (in: "
                                  f"{', '.join(diff)}); give this prepare run another dir, or remove that folder")
            if diff:
                raise ConfigError(f"run {r.key}: {r.run_dir} was made with another config than the spec now gives "
                                  f"(in: {', '.join(diff)}); restore the spec, or give the comparison another 'out'")


# ---- the queue -------------------------------------------------------------------------------------
def _read_queue(path: Path) -> dict[str, Any]:
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
    return {"runs": {}}


def command_line(run: Run) -> list[str]:
    """The kdkit command that (re)starts `run`: a fresh start, or ``--resume`` when it was interrupted."""
    head = [sys.executable, "-m", "kdkit", run.command]
    if run.started:
        return [*head, "--resume", str(run.run_dir)]
    return [*head, *run.argv, f"output_dir={run.run_dir}", "train.progress=lines"]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _Claims:
    """Which worker runs which run, so that several ``kdkit compare`` processes on one spec (one machine) share
    its queue: a run is claimed by creating ``OUT/claims/<key>`` exclusively, holding the worker's process id; a
    claim whose process has ended is stale and taken over."""

    def __init__(self, out: Path):
        self.dir = out / "claims"
        self.mine: set[Path] = set()

    def _path(self, r: Run) -> Path:
        return self.dir / (r.key.replace("/", "__") + ".pid")

    def holder(self, r: Run) -> int | None:
        """The live process that holds `r`, or None."""
        try:
            pid = int(self._path(r).read_text(encoding="utf-8").strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and pid != os.getpid() and _alive(pid) else None

    def take(self, r: Run) -> bool:
        path = self._path(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the claim appears with its process id already in it (a hard link of a written file is atomic and
        # exclusive), so another worker never reads an empty claim and takes it for a stale one
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(str(os.getpid()), encoding="utf-8")
        try:
            for _ in range(2):
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    if self.holder(r) is not None:
                        return False
                    path.unlink(missing_ok=True)  # stale: its worker ended
                    continue
                self.mine.add(path)
                return True
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def release(self, r: Run) -> None:
        path = self._path(r)
        if path in self.mine:
            path.unlink(missing_ok=True)
            self.mine.discard(path)


def _record(qpath: Path, spec_name: str, key: str, attempt: dict[str, Any], status: str) -> dict[str, Any]:
    """Add `attempt` to run `key` in ``queue.json``, re-read under a lock so that concurrent workers' records
    are all kept."""
    import fcntl

    qpath.parent.mkdir(parents=True, exist_ok=True)
    with open(qpath.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        queue = _read_queue(qpath)
        queue["spec"] = spec_name
        entry = queue["runs"].setdefault(key, {"attempts": []})
        entry["attempts"].append(attempt)
        entry["status"] = status
        write_json(qpath, queue)
    return queue


def parse_until(text: str, now: float | None = None) -> float:
    """The deadline `text` names, as a POSIX time: ``+90m``, ``+2h``, ``+600s`` (from `now`), ``HH:MM`` (its
    next occurrence, local time) or ``YYYY-MM-DD HH:MM`` (local time)."""
    now = time.time() if now is None else now
    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if t.startswith("+") and t[-1:] in units:
            return now + float(t[1:-1]) * units[t[-1]]
        if len(t) <= 5 and ":" in t:
            hh, mm = (int(x) for x in t.split(":"))
            if not (0 <= hh < 24 and 0 <= mm < 60):
                raise ValueError(t)
            day = time.localtime(now)
            at = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, hh, mm, 0, 0, 0, -1))
            return at if at > now else at + 86400
        return time.mktime(time.strptime(t, "%Y-%m-%d %H:%M"))
    except (ValueError, OverflowError):
        pass
    raise KdkitError(f"--until {text!r}: not a deadline; give +90m, +2h, +600s, HH:MM or 'YYYY-MM-DD HH:MM'")


def run_queue(spec: Spec, *, max_runs: int | None = None, retry_failed: bool = False,
              echo: bool = True, wait_s: float = 5.0, until: float | None = None,
              longest_first: bool = False) -> dict[str, Any]:
    """Run what is not finished, one at a time; returns the queue record (also in ``OUT/queue.json``).

    With `until` (a POSIX time) no run is started that would, at the mean wall time of its arm's finished runs,
    end after it (a run of an arm with none finished yet: at its `train.time_budget_min` plus
    `BUDGET_MARGIN`, or, without a budget, started while the deadline is ahead); a shorter run
    further on that still fits is started instead, so a long arm does not leave a worker idle until the
    deadline. The queue stops between runs, so nothing is killed half-way. `longest_first` takes the runs in
    `longest_first_order` instead of the plan's (seed by seed): with a deadline, the long runs are started
    while they still fit and the short ones fill the end.

    A run that fails after it started is recorded (``failed``), skipped from then on unless `retry_failed`
    (it resumes from its last checkpoint), and the queue goes on; one that fails before starting (a config
    the checks could not see) or is interrupted (Ctrl-C) stops the queue.

    Several workers may run the same spec at once on one machine (``kdkit compare SPEC`` started twice, say
    one per core): each takes the next run no other live worker holds, and waits (polling every `wait_s`
    seconds) for prepare runs another worker is making before it starts any arm.

    Stopping a worker (Ctrl-C, or SIGTERM) stops its run at the next step with a checkpoint, records the
    attempt as ``interrupted`` and raises KeyboardInterrupt; the same command continues the run from there."""
    runs = plan(spec)
    check(runs)
    qpath = spec.out / "queue.json"
    records = _read_queue(qpath)["runs"]
    failed = {k for k, v in records.items() if v.get("status") == "failed"} if not retry_failed else set()
    todo = [r for r in runs if not r.finished and r.key not in failed]
    claims = _Claims(spec.out)
    say = print if echo else (lambda *a, **k: None)
    if failed:
        say(f"kdkit compare {spec.name}: {len(failed)} failed run(s) skipped (--retry-failed runs them again)",
            flush=True)
    say(f"kdkit compare {spec.name}: {len(runs) - len(todo)} of {len(runs)} runs finished, {len(todo)} to go "
        f"(results in {spec.out})", flush=True)
    walls = finished_walls(runs)  # by arm: for the estimate below and for `until`
    if longest_first:
        todo = longest_first_order(todo, walls)
    if todo:
        minutes, untimed = minutes_left(todo, walls)
        if len(untimed) < len({r.arm for r in todo}):
            say(f"about {minutes:.0f} worker-minutes to go, from the wall times of each arm's finished runs" +
                (f" (not counting {', '.join(untimed)}: no finished run to time them by)" if untimed else ""),
                flush=True)
    done_now, left_for_later = 0, 0
    for r in todo:
        if max_runs is not None and done_now >= max_runs:
            say(f"stopped after {done_now} run(s) (--max-runs); run the same command to continue", flush=True)
            break
        if until is not None and not r.finished:
            # other workers may have timed the arm since this one started: read its finished runs again
            walls[r.arm] = finished_walls([p for p in runs if p.arm == r.arm]).get(r.arm, [])
            need = 60 * minutes_left([r], walls)[0]  # 0 for an arm with no finished run yet
            if not walls.get(r.arm):
                need = budget_estimate_s(r)
            if time.time() + need > until:
                if not claims.holder(r):
                    say(f"skipped {r.key} (about {need / 60:.0f} min): it would end after the --until deadline "
                        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(until))}", flush=True)
                    left_for_later += 1
                continue  # a shorter run further on may still fit
        if r.seed is not None:  # an arm: every prepare run must be finished first, whoever makes it
            for p in (p for p in runs if p.seed is None and not p.finished):
                if claims.holder(p) is None:
                    continue  # neither finished nor being made (it failed): the arm's own run will say so
                say(f"waiting for {p.key}, made by worker {claims.holder(p)}", flush=True)
                while claims.holder(p) is not None:  # released once its process has ended and is recorded
                    time.sleep(wait_s)
        if r.finished or not claims.take(r):
            continue  # finished or taken by another worker meanwhile
        try:
            code, attempt = _run_one(r, runs, say)
        finally:
            claims.release(r)
        status = "finished" if r.finished else ("interrupted" if code == 130 else "failed")
        _record(qpath, spec.name, r.key, attempt, status)
        done_now += 1
        if code == 130 or attempt.get("stop_asked"):
            raise KeyboardInterrupt
        if not r.finished:
            tail = " | ".join(r.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:])
            if not r.started:
                raise KdkitError(f"run {r.key} failed before it started (exit {code}): {tail[-400:]}; see {r.log}")
            say(f"    failed (exit {code}): {tail[-300:]}", flush=True)
            continue
        s = json.loads((r.run_dir / "summary.json").read_text(encoding="utf-8"))
        say(f"    {spec.metric} {_fmt(_lookup(s, spec.metric), spec.metric)} in {attempt['wall_s']:.0f} s", flush=True)
    if left_for_later:
        say(f"{left_for_later} run(s) left for after the --until deadline; run the same command to continue",
            flush=True)
    return _read_queue(qpath)


BUDGET_MARGIN = (1.05, 60.0)  # a budget-stopped run: its budget x 1.05 + 60 s (start-up, the final evaluation)


def budget_estimate_s(r: Run) -> float:
    """How long `r` should take by its own config when nothing has timed its arm yet: its
    ``train.time_budget_min`` plus `BUDGET_MARGIN`, or 0 when it has no budget (nothing known)."""
    budget = run_config(r).train.time_budget_min
    if budget is None:
        return 0.0
    scale, extra = BUDGET_MARGIN
    return 60 * budget * scale + extra


def finished_walls(runs: list[Run], summary_of: Callable[[Run], Path | None] | None = None
                   ) -> dict[str, list[float]]:
    """The wall times (s) of the finished runs, by arm (a prepare run's arm is its key). `summary_of` gives a
    run's summary.json, or None while it is not finished (default: the one in its run folder)."""
    def own(r: Run) -> Path | None:
        return r.run_dir / "summary.json" if r.finished else None

    walls: dict[str, list[float]] = {}
    for r in runs:
        summary = (summary_of or own)(r)
        if summary is not None:
            wall = json.loads(summary.read_text(encoding="utf-8")).get("wall_time_s")
            if isinstance(wall, (int, float)):
                walls.setdefault(r.arm, []).append(float(wall))
    return walls


def minutes_left(todo: list[Run], walls: dict[str, list[float]]) -> tuple[float, list[str]]:
    """Worker-minutes the runs `todo` should take at the mean wall time of their arm's finished runs, and the
    arms of `todo` with no finished run to time them by (left out of the sum)."""
    total, untimed = 0.0, []
    for r in todo:
        if walls.get(r.arm):
            total += sum(walls[r.arm]) / len(walls[r.arm]) / 60
        elif r.arm not in untimed:
            untimed.append(r.arm)
    return total, untimed


def longest_first_order(todo: list[Run], walls: dict[str, list[float]]) -> list[Run]:
    """`todo` with the runs of arms not timed yet first (finishing one times its arm), then the longest by the
    mean wall time of their arm's finished runs; the plan's order among equals (prepare runs stay ahead)."""
    def need(r: Run) -> float:
        minutes, untimed = minutes_left([r], walls)
        return math.inf if r.seed is None or untimed else minutes  # a prepare run: every arm waits for it

    return sorted(todo, key=lambda r: -need(r))


def _run_one(r: Run, runs: list[Run], say: Any) -> tuple[int, dict[str, Any]]:
    """Start (or resume) one run as a kdkit process, its output to its log; its exit code and attempt record."""
    argv = command_line(r)
    attempt: dict[str, Any] = {"command": shlex.join(argv), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "load_avg_1min": round(os.getloadavg()[0], 2), "resumed": r.started, "pid": os.getpid()}
    done = sum(x.finished for x in runs)
    say(f"[{done + 1}/{len(runs)}] {r.key}{' (resuming)' if r.started else ''}", flush=True)
    r.log.parent.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), _cpu_seconds()
    with open(r.log, "a", encoding="utf-8") as log:
        log.write(f"$ {attempt['command']}\n")
        log.flush()
        # its own session: a Ctrl-C on the terminal reaches the run only through the worker, once
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code, asked = _wait_passing_on_stops(proc)
    if asked:
        attempt["stop_asked"] = True
    attempt.update(exit_code=code, wall_s=round(time.time() - t0, 2), cpu_s=round(_cpu_seconds() - c0, 2))
    return code, attempt


def _wait_passing_on_stops(proc: subprocess.Popen) -> tuple[int, bool]:
    """Wait for the run `proc`; its exit code (130 if the worker was asked to stop and the run did not finish)
    and whether a stop was asked (the queue then ends after recording the run, even one that just finished).

    SIGINT (Ctrl-C) or SIGTERM (``kill``, ``pkill -f "kdkit compare"``) to the worker is passed on to the run as
    SIGTERM, once per signal: kdkit's trainer then checkpoints at its next step and exits, so stopping a worker
    loses no more than a step, and the attempt's wall and CPU time are still recorded; a second signal stops the
    run at once (its last checkpoint kept)."""
    asked: list[int] = []

    def pass_on(signum: int, frame: Any) -> None:
        asked.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    with on_stop_signals(pass_on):
        code = proc.wait()
    return (130 if asked and code != 0 else code), bool(asked)


# ---- the report ------------------------------------------------------------------------------------
def _percent(metric: str) -> bool:
    return "accuracy" in metric or metric.startswith("test_") or metric.startswith("val_")


def _fmt(v: Any, metric: str, digits: int = 2) -> str:
    if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.{digits}f}" if _percent(metric) else f"{v:.4g}"


@dataclass
class ArmResult:
    values: dict[int, float] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)
    wall: dict[int, float] = field(default_factory=dict)
    cpu: dict[int, float] = field(default_factory=dict)
    pairing: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    stopped: dict[int, str] = field(default_factory=dict)
    #: seed -> (where the summary was read, the summary): the values of any other metric come from these
    summaries: dict[int, tuple[Path, dict[str, Any]]] = field(default_factory=dict, repr=False)

    def with_metric(self, metric: str) -> ArmResult:
        """The same results scored on `metric` (its values, and its last-epoch values where the summary has them)."""
        values = {seed: metric_value(s, metric, where) for seed, (where, s) in self.summaries.items()}
        last = {seed: float(s[f"{metric}_last"]) for seed, (_, s) in self.summaries.items()
                if isinstance(s.get(f"{metric}_last"), (int, float))}
        return replace(self, values=values, last=last)


def since_fresh_start(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The attempts that made the run as it stands: from its last fresh start (``resumed`` false) on. Earlier
    ones belong to a run folder that was removed and started again, and their work is not in the result."""
    fresh = [i for i, a in enumerate(attempts) if a.get("resumed") is False]
    return attempts[fresh[-1]:] if fresh else attempts


def run_wall(attempts: list[dict[str, Any]], summary: dict[str, Any]) -> float:
    """A finished run's wall time (s): the larger of its queue attempts' sum and its summary's ``wall_time_s``.

    Each can miss time: an attempt killed with its worker (a session's end) is not always recorded, while the
    summary counts every process of the run up to its checkpoints (summaries written before kdkit summed resumed
    processes count the last one only). Neither overcounts, so the larger is the closer."""
    queued = sum(a.get("wall_s", 0.0) for a in attempts)
    own = summary.get("wall_time_s")
    own = float(own) if isinstance(own, (int, float)) else 0.0
    return max(queued, own) or math.nan


def collect(spec: Spec) -> dict[str, dict[str, ArmResult]]:
    """cell -> arm -> the results of its finished runs (and which seeds failed or are pending), scored on the
    spec's metric; each summary is read once (``ArmResult.with_metric`` scores them on another)."""
    queue = _read_queue(spec.out / "queue.json")["runs"]
    out: dict[str, dict[str, ArmResult]] = {}
    for r in plan(spec):
        if r.seed is None:
            continue
        res = out.setdefault(r.cell, {}).setdefault(r.arm, ArmResult())
        if not r.finished:
            (res.failed if queue.get(r.key, {}).get("status") == "failed" else res.pending).append(r.seed)
            continue
        s = json.loads((r.run_dir / "summary.json").read_text(encoding="utf-8"))
        res.summaries[r.seed] = (r.run_dir / "summary.json", s)
        attempts = since_fresh_start(queue.get(r.key, {}).get("attempts", []))
        res.wall[r.seed] = run_wall(attempts, s)
        if attempts:
            res.cpu[r.seed] = sum(a.get("cpu_s", 0.0) for a in attempts)
        res.pairing[r.seed] = s.get("pairing") or {}
        if s.get("stopped_by"):
            res.stopped[r.seed] = str(s["stopped_by"])
    return {cell: {arm: res.with_metric(spec.metric) for arm, res in arms.items()} for cell, arms in out.items()}


def _numbers(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _numbers(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(prefix + k)
    return out


def _lookup(summary: dict[str, Any], metric: str) -> Any:
    v: Any = summary.get(metric)
    if v is None and "." in metric:
        v = summary
        for part in metric.split("."):
            v = v.get(part) if isinstance(v, dict) else None
    return v


def metric_value(summary: dict[str, Any], metric: str, where: Path) -> float:
    """A number of a run's summary: a top-level key, or a dotted path into it (``test_metrics.eer``)."""
    v = _lookup(summary, metric)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        numeric = [k for k in _numbers(summary) if not k.startswith(("report_card.", "pairing."))]
        raise ConfigError(f"metric {metric!r} is not a number in {where}; numbers there: {', '.join(sorted(numeric))}")
    return float(v)


def _pair_match(a: ArmResult, b: ArmResult, seeds: list[int]) -> dict[str, int]:
    same = {"student_init": 0, "data_order": 0}
    for s in seeds:
        for k in same:
            same[k] += bool(a.pairing.get(s, {}).get(k)) and a.pairing[s].get(k) == b.pairing.get(s, {}).get(k)
    return same


def summarize(spec: Spec, results: dict[str, dict[str, ArmResult]]) -> dict[str, Any]:
    """The numbers of the report, per cell: arms (mean and interval, best against last, cost) and pairs."""
    report: dict[str, Any] = {"name": spec.name, "metric": spec.metric, "baseline": spec.baseline,
                              "level": spec.level, "seeds": spec.seeds, "cells": {}}
    for cell, arms in results.items():
        c: dict[str, Any] = {"arms": {}, "pairs": []}
        for name, r in arms.items():
            kept_minus_last = paired(r.values, r.last, spec.level) if r.last else None
            c["arms"][name] = {
                "metric": mean_ci(list(r.values.values()), spec.level).to_dict(),
                "last": mean_ci(list(r.last.values()), spec.level).to_dict() if r.last else None,
                "kept_minus_last": kept_minus_last.to_dict() if kept_minus_last else None,
                "per_seed": {str(s): v for s, v in sorted(r.values.items())},
                "wall_s": mean_ci(list(r.wall.values()), spec.level).to_dict(),
                "cpu_s": mean_ci(list(r.cpu.values()), spec.level).to_dict() if r.cpu else None,
                "failed": r.failed, "pending": r.pending, "stopped": {str(k): v for k, v in r.stopped.items()},
            }
        pairs = [(a, spec.baseline) for a in arms if a != spec.baseline] + list(spec.contrasts)
        for a, b in dict.fromkeys(pairs):
            if a not in arms or b not in arms:
                continue
            p = paired(arms[a].values, arms[b].values, spec.level)
            c["pairs"].append({"arm": a, "against": b, **p.to_dict(),
                               "same": _pair_match(arms[a], arms[b], p.seeds)})
        report["cells"][cell] = c
    if len(results) > 1:
        report["across_cells"] = _across_cells(spec, results)
    return report


def _across_cells(spec: Spec, results: dict[str, dict[str, ArmResult]]) -> dict[str, Any]:
    """Robustness over a grid: per arm and seed, the mean, the worst and the spread (sd) of the metric over the
    cells; their intervals over seeds, and the paired differences against the baseline (only seeds finished in
    every cell count)."""
    arms = set.intersection(*(set(cell) for cell in results.values()))  # an arm restricted to some cells is left out
    per: dict[str, dict[str, dict[int, float]]] = {}
    for a in sorted(arms):
        seeds = set.intersection(*(set(cell[a].values) for cell in results.values()))
        vals = {s: [cell[a].values[s] for cell in results.values()] for s in seeds}
        per[a] = {"mean": {s: sum(v) / len(v) for s, v in vals.items()},
                  "worst": {s: min(v) for s, v in vals.items()},
                  "spread": {s: mean_ci(v).sd for s, v in vals.items()}}
    out: dict[str, Any] = {"cells": list(results), "arms": {}, "pairs": []}
    for a, stats in per.items():
        out["arms"][a] = {k: mean_ci(list(v.values()), spec.level).to_dict() for k, v in stats.items()}
    pairs = [(a, spec.baseline) for a in per if a != spec.baseline] + list(spec.contrasts)
    for a, b in dict.fromkeys(pairs):
        if a in per and b in per:
            out["pairs"].append({"arm": a, "against": b, **{k: paired(per[a][k], per[b][k], spec.level).to_dict()
                                                             for k in ("mean", "worst", "spread")}})
    return out


def _ci_text(iv: dict[str, Any], metric: str) -> str:
    if iv["n"] == 0:
        return "n/a"
    if iv["n"] < 2:
        return f"{_fmt(iv['mean'], metric)} (1 seed)"
    return f"{_fmt(iv['mean'], metric)} +- {_fmt(iv['half_width'], metric)}"


def _diff_text(iv: dict[str, Any], metric: str) -> str:
    if iv["n"] == 0:
        return "n/a"
    sign = "+" if iv["mean"] >= 0 else ""
    if iv["n"] < 2:
        return f"{sign}{_fmt(iv['mean'], metric)} (1 seed)"
    return f"{sign}{_fmt(iv['mean'], metric)} [{_fmt(iv['low'], metric)}, {_fmt(iv['high'], metric)}]"


def markdown(report: dict[str, Any]) -> str:
    m, level = report["metric"], report["level"]
    unit = " (%)" if _percent(m) else ""
    pct = round(100 * level)
    lines = [f"# Comparison: {report['name']}", "",
             f"Metric: `{m}`{unit}, mean +- half-width of the {pct}% Student-t interval over seeds; the kept state "
             f"(selected on validation) against the last epoch's; paired differences against `{report['baseline']}` "
             f"(and the listed contrasts) over the seeds both arms have, with their {pct}% interval. "
             "'higher'/'lower': the interval excludes 0; 'cannot tell': it holds 0.", ""]
    for cell, c in report["cells"].items():
        if cell != "all":
            lines += [f"## {cell}", ""]
        lines += [f"| arm | seeds | {m}{unit} | sd | last epoch | kept - last | wall s / run | cpu s / run | "
                  "not finished |", "|---|---|---|---|---|---|---|---|---|"]
        for name, a in c["arms"].items():
            iv = a["metric"]
            last = _ci_text(a["last"], m) if a["last"] else "n/a"
            kml = _diff_text(a["kept_minus_last"]["diff"], m) if a["kept_minus_last"] else "n/a"
            cpu = f"{a['cpu_s']['mean']:.0f}" if a["cpu_s"] and a["cpu_s"]["n"] else "n/a"
            wall = f"{a['wall_s']['mean']:.0f}" if a["wall_s"]["n"] else "n/a"
            missing = ", ".join(x for x in (f"failed: {a['failed']}" if a["failed"] else "",
                                            f"pending: {a['pending']}" if a["pending"] else "") if x) or ""
            sd = _fmt(iv["sd"], m) if iv["n"] > 1 else "n/a"
            lines.append(f"| {name} | {iv['n']} | {_ci_text(iv, m)} | {sd} | {last} | {kml} | "
                         f"{wall} | {cpu} | {missing} |")
        if c["pairs"]:
            lines += ["", f"| arm | against | paired seeds | difference [{pct}% interval] | wins / losses / ties | "
                          "same init / same data order | verdict |", "|---|---|---|---|---|---|---|"]
            for p in c["pairs"]:
                n = p["diff"]["n"]
                lines.append(f"| {p['arm']} | {p['against']} | {n} | {_diff_text(p['diff'], m)} | "
                             f"{p['wins']} / {p['losses']} / {p['ties']} | {p['same']['student_init']}/{n} / "
                             f"{p['same']['data_order']}/{n} | {p['verdict']} |")
        lines.append("")
    x = report.get("across_cells")
    if x:
        lines += ["## Across the cells (robustness over the grid)", "",
                  f"Per seed, over the {len(x['cells'])} cells: the mean, the worst cell and the spread (standard "
                  f"deviation); then {pct}% intervals over the seeds finished in every cell.", "",
                  "| arm | seeds | mean over cells | worst cell | spread over cells |", "|---|---|---|---|---|"]
        for a, st in x["arms"].items():
            lines.append(f"| {a} | {st['mean']['n']} | {_ci_text(st['mean'], m)} | {_ci_text(st['worst'], m)} | "
                         f"{_ci_text(st['spread'], m)} |")
        if x["pairs"]:
            lines += ["", "| arm | against | mean: difference | worst: difference | spread: difference |",
                      "|---|---|---|---|---|"]
            for p in x["pairs"]:
                lines.append(f"| {p['arm']} | {p['against']} | " + " | ".join(
                    f"{_diff_text(p[k]['diff'], m)} ({p[k]['verdict']})" for k in ("mean", "worst", "spread")) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per cell: each arm's seeds and mean with its interval; the paired differences with theirs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(report["cells"].items())
    scale = 100.0 if _percent(report["metric"]) else 1.0
    fig, axes = plt.subplots(len(cells), 2, figsize=(11, 2.2 + 1.2 * max(len(c["arms"]) for _, c in cells)),
                             squeeze=False)
    for row, (cell, c) in zip(axes, cells):
        ax, bx = row
        names = list(c["arms"])
        for i, name in enumerate(names):
            a = c["arms"][name]
            vals = [scale * v for v in a["per_seed"].values()]
            ax.scatter(vals, [i] * len(vals), s=12, alpha=0.5, color="gray")
            iv = a["metric"]
            if iv["n"] >= 1:
                err = scale * iv["half_width"] if iv["n"] > 1 else 0
                ax.errorbar(scale * iv["mean"], i, xerr=err, fmt="o", color="C0", capsize=3)
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(-0.6, len(names) - 0.4)
        ax.set_xlabel(report["metric"] + (" (%)" if scale == 100 else ""))
        ax.set_title(cell if cell != "all" else report["name"], fontsize=9)
        labels = [f"{p['arm']} - {p['against']}" for p in c["pairs"]]
        for i, p in enumerate(c["pairs"]):
            d = p["diff"]
            if d["n"] >= 1:
                err = scale * d["half_width"] if d["n"] > 1 else 0
                color = {"higher": "C2", "lower": "C3"}.get(p["verdict"], "C7")
                bx.errorbar(scale * d["mean"], i, xerr=err, fmt="o", color=color, capsize=3)
        bx.axvline(0, color="black", lw=0.8)
        bx.set_yticks(range(len(labels)), labels)
        bx.set_ylim(-0.6, max(1, len(labels)) - 0.4)
        bx.set_xlabel(f"paired difference ({round(100 * report['level'])}% interval)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def also_stem(metric: str) -> str:
    """The file stem of the report on a further metric (``also``): compare.<metric, dots and slashes as _>."""
    return "compare." + re.sub(r"[^A-Za-z0-9_-]+", "_", metric)


def render(spec: Spec) -> dict[str, Any]:
    """Write compare.md, compare.json and compare.png from the finished runs, and the same three files for each
    further metric of ``also`` (compare.<metric>.*); return the main report (its ``also`` key: the others)."""
    spec.out.mkdir(parents=True, exist_ok=True)
    results = collect(spec)
    reports = {}
    for metric in [spec.metric, *spec.also]:
        scored = {cell: {arm: res.with_metric(metric) for arm, res in arms.items()} for cell, arms in results.items()}
        report = summarize(replace(spec, metric=metric), scored)
        stem = "compare" if metric == spec.metric else also_stem(metric)
        text = markdown(report)
        if metric == spec.metric and spec.also:
            text += "\nThe same report on further metrics: " + ", ".join(
                f"[{m}]({also_stem(m)}.md)" for m in spec.also) + ".\n"
        write_json(spec.out / f"{stem}.json", report)
        (spec.out / f"{stem}.md").write_text(text, encoding="utf-8")
        if any(a["metric"]["n"] for c in report["cells"].values() for a in c["arms"].values()):
            plot(report, spec.out / f"{stem}.png")
        reports[metric] = report
    main = reports.pop(spec.metric)
    if reports:
        main["also"] = reports
    return main


def dry_run(spec: str | os.PathLike | dict[str, Any]) -> list[str]:
    """Check the spec and every run's config; the command each run would be started (or resumed) with."""
    s = load_spec(spec)
    runs = plan(s)
    check(runs)
    def fresh(r: Run) -> list[str]:
        return [sys.executable, "-m", "kdkit", r.command, *r.argv, f"output_dir={r.run_dir}", "train.progress=lines"]

    return [("done     " + shlex.join(fresh(r))) if r.finished else
            ("resume   " if r.started else "pending  ") + shlex.join(command_line(r)) for r in runs]


def compare(spec: str | os.PathLike | dict[str, Any], *, run: bool = True, max_runs: int | None = None,
            retry_failed: bool = False, echo: bool = True, until: float | str | None = None,
            longest_first: bool = False) -> dict[str, Any]:
    """Run the comparison `spec` (what is not finished yet) and write its report; return the report.

    ``run=False`` only renders the report of the runs finished so far. `until`: start no run that would end
    after this deadline (a POSIX time, or text for `parse_until`: ``+2h``, ``17:30``). `longest_first`: take
    the longest runs first (see `run_queue`)."""
    s = load_spec(spec)
    if isinstance(until, str):
        until = parse_until(until)
    if run:
        run_queue(s, max_runs=max_runs, retry_failed=retry_failed, echo=echo, until=until,
                  longest_first=longest_first)
    return render(s)


__all__ = ["ArmResult", "Interval", "Paired", "Run", "Spec", "budget_estimate_s", "compare", "dry_run", "load_spec",
           "longest_first_order", "parse_until", "plan", "render", "run_config", "run_queue"]
