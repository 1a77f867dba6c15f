"""`pacsnode import` while `pacsnode serve` runs in another process: the node's forwarder
sends what the import queued, to DCMTK's storescp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.conftest import dcmtk_env, free_port, run_cli, wait_for, wait_listening

pytestmark = [pytest.mark.interop, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
PACSNODE = [sys.executable, "-m", "hierarchy.cli"]  # the `pacsnode` console script
DICOMDIR = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "DICOMDIR"  # type: ignore[arg-type]


def test_imported_instances_are_forwarded_by_the_running_node(
        tmp_path: Path, new_db: Callable[..., str], dcmtk: Path) -> None:
    port, dest_port = free_port(), free_port()
    config = tmp_path / "node.toml"
    # Default forwarding settings: the node notices jobs another process queued at its
    # forwarder's poll (forwarding.poll_seconds, 1 s).
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\ndatabase_url = "{new_db("node")}"\n'
        f'listen_host = "127.0.0.1"\n[bootstrap_partition]\nport = {port}\n'
        '[hierarchy]\nenabled = false\n')
    received = tmp_path / "received"
    received.mkdir()
    result = run_cli(config, "device", "add", "ARCHIVE", "--type", "BACKUP_TARGET", "--host",
                     "127.0.0.1", "--port", str(dest_port), "--ae-title", "STORESCP")
    assert result.exit_code == 0, result.output
    result = run_cli(config, "device", "add", "SCANNER", "--type", "SELF", "--rule",
                     'set InstitutionName "SCANNED HERE"')
    assert result.exit_code == 0, result.output
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    scp = subprocess.Popen([str(dcmtk / "storescp"), "-aet", "STORESCP", "-od", str(received),
                            str(dest_port)], env=dcmtk_env())
    node = subprocess.Popen([*PACSNODE, "serve", "--config", str(config)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(port, node)
        wait_listening(dest_port, scp)
        imported = subprocess.run([*PACSNODE, "import", str(DICOMDIR), "--json", "--config",
                                   str(config)], env=env, capture_output=True, text=True,
                                  timeout=120, cwd=tmp_path)
        assert imported.returncode == 0, imported.stderr + imported.stdout
        finished = time.monotonic()
        summary = json.loads(imported.stdout)
        assert (summary["stored"], summary["self_device"]) == (31, "SCANNER")
        sops = {f["sop_instance_uid"] for f in summary["files"]}

        def arrived() -> set[str]:
            return {p.name.split(".", 1)[1] for p in received.iterdir()
                    if not p.name.startswith(".")}

        assert wait_for(lambda: arrived() == sops, timeout=30), (
            f"{len(arrived())} of 31 arrived")
        # Within a poll or two of the node's forwarder, not at some later retry.
        assert time.monotonic() - finished < 10
    finally:
        node.send_signal(signal.SIGTERM)
        output, _ = node.communicate(timeout=60)
        scp.terminate()
        scp.wait()
    assert node.returncode == 0, output
    # What arrived is what the node stored: the Self device's coercion, the pixels untouched.
    for path in received.iterdir():
        if path.name.startswith("."):
            continue
        sent = dcmread(path)
        original = next(f for f in summary["files"]
                        if f["sop_instance_uid"] == sent.SOPInstanceUID)
        source = dcmread(original["path"])
        assert sent.InstitutionName == "SCANNED HERE"
        assert sent.PixelData == source.PixelData
