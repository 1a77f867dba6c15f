"""A listening port the node cannot open: one line and exit 1 at start; at run time a logged
error, and the port opens as soon as it is free (node/scp/server.py, node/ports.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import make_ca
from tests.conftest import RunningNode, free_port, listening, wait_for
from tests.integration.test_admission import reject_reason

ROOT = Path(__file__).parents[2]

# Only the partitions' listeners matter here: one backend is enough.
one_backend = pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)


@contextlib.contextmanager
def held(port: int) -> Iterator[socket.socket]:
    """Another program listening on the loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock


def serve(config: Path, *, without_privileges: bool = False) -> subprocess.CompletedProcess[str]:
    """`pacsnode serve` as a user runs it; one that cannot start returns at once."""
    command = [sys.executable, "-m", "hierarchy.cli", "serve", "--config", str(config)]
    if without_privileges and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv (util-linux) is missing")
        # Root without CAP_NET_BIND_SERVICE: refused a port below 1024 like any user.
        command = [setpriv, "--bounding-set=-net_bind_service", *command]
    return subprocess.run(command, cwd=config.parent, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


def write_settings(tmp_path: Path, bootstrap: str, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "data"\nlisten_host = "127.0.0.1"\n'
                    f"[bootstrap_partition]\n{bootstrap}\n"
                    f'[hierarchy]\ncontrol_listen = "127.0.0.1:{free_port()}"\n{extra}',
                    encoding="utf-8")
    return path


def assert_one_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "│" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: {expected}"], output


@pytest.mark.slow
def test_a_port_in_use_at_start_is_one_line_naming_it_and_exit_1(tmp_path: Path) -> None:
    port = free_port()
    with held(port):
        result = serve(write_settings(tmp_path, f"port = {port}"))
    assert_one_line(result, f"cannot listen on DICOM port {port} (127.0.0.1) of partition"
                            " PACSNODE: address already in use (another program, or another"
                            " node, listens there)")


@pytest.mark.slow
def test_a_tls_port_in_use_at_start_is_one_line_naming_it(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki", "hospital")
    cert = ca.issue(tmp_path / "pki", "node")
    port = free_port()
    with held(port):
        result = serve(write_settings(tmp_path, f"port = 0\ntls_port = {port}",
                                      f'[tls]\ncert = "{cert.cert}"\nkey = "{cert.key}"\n'
                                      'verify_client = "none"\n'))
    assert_one_line(result, f"cannot listen on DICOM TLS port {port} (127.0.0.1) of partition"
                            " PACSNODE: address already in use (another program, or another"
                            " node, listens there)")


@pytest.mark.slow
def test_a_privileged_port_at_start_says_it_needs_privileges(tmp_path: Path) -> None:
    unprivileged = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if unprivileged.exists() and int(unprivileged.read_text()) <= 104:
        pytest.skip("this kernel lets anyone listen on port 104")
    result = serve(write_settings(tmp_path, "port = 104"), without_privileges=True)
    assert_one_line(result, "cannot listen on DICOM port 104 (127.0.0.1) of partition PACSNODE:"
                            " permission denied (ports below 1024 need root or"
                            " CAP_NET_BIND_SERVICE; choose a port of 1024 or above)")


@pytest.mark.slow
def test_a_control_port_in_use_at_start_is_one_line_naming_it(tmp_path: Path) -> None:
    control = free_port()
    settings = tmp_path / "node.toml"
    settings.write_text(f'[node]\ndata_dir = "data"\nlisten_host = "127.0.0.1"\n'
                        f"[bootstrap_partition]\nport = {free_port()}\n"
                        f'[hierarchy]\ncontrol_listen = "127.0.0.1:{control}"\n',
                        encoding="utf-8")
    with held(control):
        result = serve(settings)
    assert_one_line(result, f"the control plane cannot listen on 127.0.0.1:{control}: address"
                            " already in use (another program, or another node, listens"
                            " there) (set hierarchy.control_listen)")
    # gRPC's own log line about the failed bind is not printed either.
    assert "add_port" not in result.stderr


@one_backend
def test_a_partition_on_a_busy_port_opens_once_the_port_is_free(
        node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.scp.server")
    busy, later = free_port(), free_port()
    with held(busy) as other_program:
        added = node.cli("partition", "add", "BUSY", "--port", str(busy))
        assert added.exit_code == 0, added.output
        # The CLI says at once that the port is taken; the partition is added all the same.
        assert (f"warning: port {busy} cannot be opened on this host now: address already in"
                " use") in added.output
        message = (f"cannot listen on DICOM port {busy} (127.0.0.1) of partition BUSY: address"
                   " already in use (another program, or another node, listens there)")
        assert wait_for(lambda: any(message in r.getMessage() for r in caplog.records))
        # The watcher goes on: a partition added after it opens its port.
        assert node.cli("partition", "add", "LATER", "--port", str(later)).exit_code == 0
        assert wait_for(lambda: listening(later))
        failures = [r for r in caplog.records if message in r.getMessage()]
        assert len(failures) == 1 and failures[0].levelno == logging.ERROR  # once, not per poll
        other_program.close()
        assert wait_for(lambda: listening(busy))
    # (logged just after the listener opens: a connection may come first)
    assert wait_for(lambda: any(
        f"DICOM listener on 127.0.0.1:{busy} (it was unavailable)" in r.getMessage()
        for r in caplog.records))
    assert reject_reason(busy, "BUSY", "CT1") is None


@one_backend
def test_the_cli_warns_only_about_ports_the_node_does_not_hold_itself(node: RunningNode) -> None:
    # The node's own listener holds its port: sharing it is no reason for a warning.
    shared = node.cli("partition", "add", "SHARED", "--port", str(node.port))
    assert shared.exit_code == 0 and "warning" not in shared.output, shared.output
    edited = node.cli("partition", "edit", "SHARED", "--description", "same port")
    assert edited.exit_code == 0 and "warning" not in edited.output, edited.output
    with held(port := free_port()):
        moved = node.cli("partition", "edit", "SHARED", "--port", str(port))
    assert moved.exit_code == 0 and f"warning: port {port} cannot be opened" in moved.output

