"""`pacsnode device ping`: reachability and round trip of a device's host, on loopback."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.scu.ping import TCP, ping_program, tcp
from tests.conftest import REQUIRE_DCMTK, free_port, node_toml, run_cli, write_config


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    """A node that is not running: ping reads the device table only (SQLite is enough)."""
    return write_config(tmp_path / "node.toml", node_toml(
        tmp_path / "data", f"sqlite:///{tmp_path / 'node.db'}", free_port()))


@pytest.fixture
def system_ping() -> str:
    program = ping_program()
    if program is None:
        if REQUIRE_DCMTK:  # scripts/test.sh installs the peers: DCMTK and iputils-ping
            pytest.fail("/bin/ping is missing (apt-get install iputils-ping)")
        pytest.skip("no system ping (apt-get install iputils-ping; scripts/test.sh does)")
    return program


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A loopback port whose listen queue is full: connections to it get no answer."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    held = []
    try:
        while True:
            client = socket.socket()
            client.settimeout(0.2)
            try:
                client.connect(("127.0.0.1", port))
            except TimeoutError:
                client.close()
                break
            held.append(client)
        yield port
    finally:
        for client in held:
            client.close()
        server.close()


def ping(cfg: Path, *args: str) -> tuple[int, str]:
    result = run_cli(cfg, "device", "ping", *args)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def add(cfg: Path, name: str, *args: str) -> None:
    result = run_cli(cfg, "device", "add", name, *args)
    assert result.exit_code == 0, result.output


def test_icmp_ping_of_loopback_answers_with_times(cfg: Path, system_ping: str) -> None:
    add(cfg, "LOOP", "--host", "127.0.0.1", "--port", "104")
    code, output = ping(cfg, "LOOP", "--count", "3", "--json")
    assert code == 0, output
    answer = json.loads(output)
    assert (answer["method"], answer["reachable"], answer["sent"], answer["received"]) == (
        "icmp", True, 3, 3)
    assert answer["how"] == f"ICMP echo ({system_ping})"
    assert len(answer["round_trip_ms"]) == 3
    assert all(0 < t < 100 for t in answer["round_trip_ms"])
    code, text = ping(cfg, "LOOP", "--count", "1")
    assert code == 0
    assert text.startswith(f"ping LOOP at 127.0.0.1, ICMP echo ({system_ping}): reachable; "
                           "1 sent, 1 received; round trip min/avg/max ")


def test_host_name_is_resolved_now_and_shown(cfg: Path, system_ping: str) -> None:
    add(cfg, "NAMED", "--host", "localhost")
    code, text = ping(cfg, "NAMED", "--count", "1")
    assert code == 0, text
    assert text.startswith("ping NAMED at localhost (127.0.0.1)") or text.startswith(
        "ping NAMED at localhost (::1)")


def test_tcp_ping_to_the_dicom_port(cfg: Path, listener: int) -> None:
    add(cfg, "PORT", "--host", "127.0.0.1", "--port", str(listener))
    code, output = ping(cfg, "PORT", "--tcp", "--count", "2", "--json")
    assert code == 0, output
    answer = json.loads(output)
    assert (answer["method"], answer["reachable"], answer["received"], answer["detail"]) == (
        "tcp", True, 2, "")
    assert answer["how"] == f"TCP connect to port {listener} (asked with --tcp)"


def test_closed_port_still_proves_the_host_answers(cfg: Path) -> None:
    port = free_port()  # nothing listens there
    add(cfg, "CLOSED", "--host", "127.0.0.1", "--port", str(port))
    code, text = ping(cfg, "CLOSED", "--tcp", "--count", "1")
    assert code == 0, text
    assert "reachable; 1 sent, 1 received; round trip" in text
    assert f"the host answered, but port {port} refused the connection" in text


def test_no_answer_is_not_reachable_and_exits_1(cfg: Path, full_backlog: int) -> None:
    add(cfg, "SILENT", "--host", "127.0.0.1", "--port", str(full_backlog))
    code, text = ping(cfg, "SILENT", "--tcp", "--count", "2", "--timeout", "0.3")
    assert code == 1
    assert "not reachable; 2 sent, 0 received: no answer within 0.3 s" in text


def test_unresolvable_host_is_said_so(cfg: Path) -> None:
    # A space makes the name invalid to the resolver, which answers without asking DNS
    # (nothing leaves the machine).
    add(cfg, "NOWHERE", "--host", "no host.invalid")
    code, text = ping(cfg, "NOWHERE")
    assert code == 1
    assert "Error" in text and "device NOWHERE: host 'no host.invalid' does not resolve: " \
        "Name or service not known" in text.replace("\n", "")


def test_invalid_host_name_is_said_so(cfg: Path) -> None:
    # Python's IDNA codec refuses an empty label before any lookup (UnicodeError, once a
    # traceback in `device add`).
    add(cfg, "BADNAME", "--host", "a..b")
    code, text = ping(cfg, "BADNAME")
    assert code == 1
    assert "host 'a..b' does not resolve: not a valid host name" in text.replace("\n", "")


def test_device_without_host_or_unknown(cfg: Path) -> None:
    add(cfg, "LOCAL", "--type", "SELF")
    code, text = ping(cfg, "LOCAL")
    assert code == 1 and "device LOCAL has no host to ping" in text
    code, text = ping(cfg, "NOPE")
    assert code == 1 and "no device named 'NOPE'" in text


def test_tcp_times_each_connection(listener: int) -> None:
    result = tcp("127.0.0.1", listener, 3, 2.0)
    assert (result.method, result.sent, result.received, result.detail) == (TCP, 3, 3, "")
    assert all(0 < t < 1000 for t in result.times_ms)


def test_tcp_without_answer_is_unreachable(full_backlog: int) -> None:
    result = tcp("127.0.0.1", full_backlog, 2, 0.3)
    assert not result.reachable
    assert (result.sent, result.received, result.detail) == (2, 0, "no answer within 0.3 s")
