"""How idle the machine's CPUs were between two samples of /proc/stat (purge waits for idle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuTimes:
    idle: int  # idle + iowait, in clock ticks
    total: int


def parse_proc_stat(text: str) -> CpuTimes:
    """The aggregate `cpu` line: user nice system idle iowait irq softirq steal ..."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:]]
            # guest and guest_nice are already counted in user and nice.
            counted = values[:8]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return CpuTimes(idle, sum(counted))
    raise ValueError("no aggregate cpu line in /proc/stat")


def idle_percent(before: CpuTimes, after: CpuTimes) -> float:
    """Percentage of CPU time spent idle between two samples (100 when no time passed)."""
    total = after.total - before.total
    if total <= 0:
        return 100.0
    return max(0.0, min(100.0, 100.0 * (after.idle - before.idle) / total))


def sample() -> CpuTimes | None:
    """None where /proc/stat cannot be read (not Linux): purge then never waits for the CPU."""
    try:
        return parse_proc_stat(PROC_STAT.read_text())
    except (OSError, ValueError):
        return None
