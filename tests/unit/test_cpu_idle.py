"""CPU idle from /proc/stat samples: purging waits while the CPU is busier than the threshold."""

from __future__ import annotations

from node.storage.cpu import CpuTimes, idle_percent, parse_proc_stat, sample

STAT = """cpu  100 0 50 800 50 0 0 0 0 0
cpu0 50 0 25 400 25 0 0 0 0 0
intr 1234
"""


def test_parse_counts_iowait_as_idle() -> None:
    assert parse_proc_stat(STAT) == CpuTimes(idle=850, total=1000)


def test_idle_percent_between_samples() -> None:
    assert idle_percent(CpuTimes(850, 1000), CpuTimes(900, 1200)) == 25.0
    assert idle_percent(CpuTimes(850, 1000), CpuTimes(850, 1000)) == 100.0


def test_this_machine_can_be_sampled() -> None:
    assert sample() is not None  # Linux: purge really measures the CPU
