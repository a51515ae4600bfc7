"""The stolen share of CPU time (``/proc/stat`` steal) recorded with every run, and the warning when it is high."""

from __future__ import annotations

import pytest

from kdkit import cpu_steal
from kdkit.cpu_steal import StealMeter, cpu_times
from kdkit.errors import RunWarning

from .conftest import train_run

# cpu  user nice system idle iowait irq softirq steal guest guest_nice
BEFORE = "cpu  1000 10 200 5000 40 5 5 0 0 0\ncpu0 500 5 100 2500 20 2 3 0 0 0\n"
AFTER = "cpu  1600 10 300 5200 60 5 15 300 0 0\ncpu0 800 5 150 2600 30 2 8 150 0 0\n"


def test_steal_is_the_stolen_share_of_the_busy_time(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(BEFORE)
    assert cpu_times(stat) == (0, 1000 + 10 + 200 + 5 + 5 + 0)
    meter = StealMeter(stat)
    stat.write_text(AFTER)
    # busy grew by 600 user + 100 system + 10 softirq + 300 steal = 1010 (idle and iowait do not count)
    assert meter.fraction() == pytest.approx(round(300 / 1010, 4))


def test_steal_is_none_where_the_kernel_does_not_count_it(tmp_path):
    assert cpu_times(tmp_path / "absent") is None and StealMeter(tmp_path / "absent").fraction() is None
    (tmp_path / "odd").write_text("intr 1 2 3\n")
    assert cpu_times(tmp_path / "odd") is None
    (tmp_path / "same").write_text(BEFORE)
    assert StealMeter(tmp_path / "same").fraction() is None  # no busy time between the readings


def test_a_run_records_its_steal_and_warns_when_the_host_took_much(tmp_path, monkeypatch):
    res = train_run(tmp_path / "quiet", **{"train.epochs": 1})
    steal = res.summary["cpu_steal"]
    assert steal is None or 0.0 <= steal <= 1.0
    monkeypatch.setattr(cpu_steal.StealMeter, "fraction", lambda self: 0.5)
    with pytest.warns(RunWarning, match=r"quiet2: the host took 50% of this machine's CPU time.*cpu_steal"):
        res = train_run(tmp_path / "quiet2", **{"train.epochs": 1})
    assert res.summary["cpu_steal"] == 0.5
