"""kdkit's error types.

Every error a user can cause (a bad config key, a missing file, a wrong layer path...) is raised as a
:class:`KdkitError` whose message is one line naming the problem and the fix. The command line prints
it without a traceback and exits with status 2.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable


class KdkitError(Exception):
    """Base class of every error kdkit raises on purpose."""


class ConfigError(KdkitError):
    """A config key or value is wrong."""


class DataError(KdkitError):
    """A dataset is missing, truncated or in the wrong format."""


class ModelError(KdkitError):
    """A model cannot be built, loaded, or does not fit the data or the method."""


class CheckpointError(KdkitError):
    """A checkpoint is missing, corrupt, or does not match the run."""


class TrainingError(KdkitError):
    """Training cannot continue (e.g. the loss is not finite)."""


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to `n` choices closest to `word` (difflib ratio), best first; far weaker ones are dropped."""
    choices = list(choices)
    found = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if found:
        best = difflib.SequenceMatcher(None, word, found[0]).ratio()
        found = [f for f in found if difflib.SequenceMatcher(None, word, f).ratio() >= best - 0.15]
    else:
        # fall back to choices sharing the last path component or a prefix
        tail = word.rsplit(".", 1)[-1]
        found = [c for c in choices if c.endswith(tail) or c.startswith(word)][:n]
    return found


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' (did you mean ...?)' suffix, or '' when nothing is close."""
    found = closest(word, choices, n)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"


class RunWarning(UserWarning):
    """Something about the user's run that they should act on (a collapsed generator, a fault recovered
    from, a checkpoint that could not be written). Its message names the run and the option to change; the
    command line prints it as ``kdkit: warning: ...``, never with a line of kdkit's own source."""


def warn(message: str) -> None:
    """Issue a :class:`RunWarning`. It is attributed to ``kdkit`` rather than to the line of kdkit's code
    that noticed the problem, which would mean nothing to the user."""
    warnings.warn_explicit(message, RunWarning, filename="kdkit", lineno=0, module="kdkit")
