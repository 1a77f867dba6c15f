"""A real, small filesystem that really fills: a size-limited tmpfs mounted for one test.

Mounting needs root (or password-less sudo). Where neither is possible the tests that need it
are skipped, unless PACSNODE_REQUIRE_SMALL_FS is set (scripts/test.sh, CI), where they fail.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REQUIRE = os.environ.get("PACSNODE_REQUIRE_SMALL_FS") == "1"
MiB = 1024 * 1024


def _sudo() -> list[str]:
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run([*_sudo(), "mount", "-t", "tmpfs", "-o",
                                 f"size={size},mode=0777", "tmpfs", str(point)],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            message = f"cannot mount a {size}-byte tmpfs: {result.stderr.strip()}"
            if REQUIRE:
                pytest.fail(message)
            pytest.skip(message)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run([*_sudo(), "umount", "-l", str(point)], check=False)


def fill(path: Path, nbytes: int) -> None:
    """Take `nbytes` of the filesystem with a file that is not DICOM (ballast)."""
    with open(path, "wb") as out:
        out.write(b"\x00" * nbytes)
        out.flush()
        os.fsync(out.fileno())
