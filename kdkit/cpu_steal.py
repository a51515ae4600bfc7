"""CPU time the hypervisor took from a run (``steal``), so that a timing is never read as if the machine were idle.

On a shared virtual machine the host may run other guests on the cores this one was given. The run's own clock
cannot see that: an epoch just takes longer, and a run stopped by ``train.time_budget_min`` gets less done. Linux
counts it, per core, in the ``steal`` column of ``/proc/stat``. The fraction kept here is the share of the CPU time
the machine asked for that went to others::

    steal / (user + nice + system + irq + softirq + steal)

over the training of this process (a resumed run measures its own part). 0 on an idle host; 0.5 means every
second spent on a core was another guest's, and wall times, samples per second and results under a time budget
are then not comparable with runs on a quiet host. ``None`` where ``/proc/stat`` does not exist (macOS, Windows).
"""

from __future__ import annotations

from pathlib import Path

#: from this share of stolen CPU time on, the run warns that its timings are not those of an idle machine
STEAL_WARN = 0.05

_BUSY = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (idle 3 and iowait 4 left out)
_STEAL = 7


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(steal, busy) jiffies over all cores since boot, or None where the kernel does not give them."""
    try:
        with open(stat, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]
    return ticks[_STEAL], sum(ticks[i] for i in _BUSY)


class StealMeter:
    """The stolen share of CPU time since the meter was made (:func:`cpu_times` at both ends)."""

    def __init__(self, stat: Path = Path("/proc/stat")):
        self.stat = stat
        self.start = cpu_times(stat)

    def fraction(self) -> float | None:
        end = cpu_times(self.stat)
        if self.start is None or end is None or end[1] <= self.start[1]:
            return None
        return round((end[0] - self.start[0]) / (end[1] - self.start[1]), 4)
