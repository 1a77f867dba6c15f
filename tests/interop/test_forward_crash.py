"""A sending node killed with SIGKILL mid-queue loses nothing once it is restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, listening, run_cli, wait_for
from tests.destination import CountingSCP
from tests.dicomgen import make_instance
from tests.scu import statuses, store

pytestmark = [pytest.mark.slow, pytest.mark.interop]
ROOT = Path(__file__).parents[2]


def serve(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sigkill_mid_queue_then_restart_delivers_everything(tmp_path: Path,
                                                            new_db: object) -> None:
    port = free_port()
    config = tmp_path / "child.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\ndatabase_url = "{new_db("child")}"\n'  # type: ignore[operator]
        f'listen_host = "127.0.0.1"\n[bootstrap_partition]\nport = {port}\n'
        "[forwarding]\npoll_seconds = 0.1\nbatch_size = 5\nretry_base_seconds = 0.2\n"
        "lease_seconds = 600\n")
    dest = CountingSCP(delay=0.03).start()
    child = serve(config)
    try:
        assert wait_for(lambda: listening(port), timeout=30)
        assert run_cli(config, "device", "add", "BACKUP", "--ae-title", "DEST", "--type",
                       "BACKUP_TARGET", "--host", "127.0.0.1", "--port",
                       str(dest.port)).exit_code == 0
        sent = [make_instance() for _ in range(60)]
        assert set(statuses(store(port, sent))) == {0}
        assert wait_for(lambda: len(dest.received) >= 10, timeout=30)
        child.send_signal(signal.SIGKILL)
        child.wait()
        arrived_before = len(set(dest.received))
        assert arrived_before < 60, "the kill should come mid-queue"
        time.sleep(0.5)
        child = serve(config)
        assert wait_for(lambda: {ds.SOPInstanceUID for ds in sent} <= set(dest.received),
                        timeout=60)
        # At least once: only what was in flight at the kill may have been sent twice, a batch
        # (5) for each of the device's sender tasks (2 by default).
        assert len(dest.received) - 60 <= 2 * 5
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
        dest.stop()
