"""The signals that ask a kdkit process to stop (Ctrl-C's SIGINT, and SIGTERM from ``kill`` or a scheduler),
routed to one handler for the length of a ``with`` block: the trainer checkpoints on them, a ``kdkit compare``
worker passes them on to its run."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Call `handler(signum, frame)` on SIGINT and SIGTERM inside the block, then restore the previous handlers.
    Outside the main thread (where Python cannot set handlers) the signals are left alone."""
    old = {}
    try:
        for s in STOP_SIGNALS:
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
