"""A `pacsnode serve` whose wall clock the test steps while it runs (libfaketime).

libfaketime shifts CLOCK_REALTIME by the offset written in a file, read again at every call
(FAKETIME_NO_CACHE), so writing "-3600" steps the node's wall clock back an hour at once, as an
administrator or NTP stepping a wrong clock does. CLOCK_MONOTONIC is left alone
(FAKETIME_DONT_FAKE_MONOTONIC), as a real step leaves it.

libfaketime 0.9.10 (Debian 12) breaks clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME), which
Python 3.11's time.sleep uses, when it does not fake the monotonic clock (EINVAL; libfaketime
issue #426): `monotonic_sleep.c`, loaded before it, passes that call to the kernel unchanged.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REQUIRE_FAKETIME = os.environ.get("PACSNODE_REQUIRE_FAKETIME") == "1"
ROOT = Path(__file__).parents[2]
SHIM_SOURCE = Path(__file__).with_name("monotonic_sleep.c")
PACSNODE = [sys.executable, "-m", "hierarchy.cli"]  # the `pacsnode` console script


def libfaketime() -> Path:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found or shutil.which("cc") is None:
        if REQUIRE_FAKETIME:
            pytest.fail("libfaketime and a C compiler are required: "
                        "/usr/lib/*/faketime/libfaketime.so.1 or cc is missing")
        pytest.skip("libfaketime or cc not installed (apt-get install libfaketime gcc; "
                    "scripts/test.sh does)")
    return Path(found[0])


class SteppedClock:
    """The offset of a node's wall clock from the real one, changed while the node runs."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "faketime"
        self.set(0)
        preload = libfaketime()
        shim = folder / "monotonic_sleep.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM_SOURCE)],
                       check=True)
        self.env = {"LD_PRELOAD": f"{shim}:{preload}",
                    "FAKETIME_TIMESTAMP_FILE": str(self.file), "FAKETIME_NO_CACHE": "1",
                    "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def set(self, seconds: int) -> None:
        """Step the wall clock to `seconds` from the real one (negative: behind it)."""
        part = self.file.with_suffix(".new")
        part.write_text(f"{seconds:+d}\n")
        part.replace(self.file)  # never a half-written offset

    def serve(self, config: Path, log: Path) -> subprocess.Popen[bytes]:
        """`pacsnode serve` with this clock (its association processes inherit it)."""
        with log.open("ab") as out:
            return subprocess.Popen([*PACSNODE, "serve", "--config", str(config)], cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT, env=self._environ())

    def run(self, config: Path, *args: str) -> str:
        """A `pacsnode` command with this clock (on a machine whose clock was stepped, the CLI
        sees the step too); its output."""
        done = subprocess.run([*PACSNODE, *args, "--config", str(config)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60, env=self._environ())
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def _environ(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(ROOT), **self.env}

    def offset(self) -> float:
        """How far a process started with this clock is from the real one now (seconds): that
        libfaketime is in effect, or a test that steps nothing could pass."""
        probe = subprocess.run(
            [sys.executable, "-c", "import time; time.sleep(0.01); print(time.time())"],
            env={**os.environ, **self.env}, capture_output=True, text=True, check=True)
        return float(probe.stdout) - time.time()
