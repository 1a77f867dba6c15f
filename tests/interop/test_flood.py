"""Floods of half-open and malformed connections against a real `pacsnode serve`: a
legitimate peer (DCMTK echoscu and storescu, another address) is served within a second,
during the flood and right after it; the flooder's connections are refused and recorded.

The flooder connects from 127.0.0.2 (another loopback address: another peer for the node),
the legitimate peer from 127.0.0.1. `-s` prints the figures (how long the legitimate peer
waited) for docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import hostile
from tests.conftest import dcmtk_env, free_port, wait_for, wait_listening
from tests.dicomgen import write_study
from tests.interop.test_serve import PACSNODE, start, stop

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FLOODER = "127.0.0.2"
# What the legitimate peer may wait for one C-ECHO or one C-STORE association, end to end
# (a DCMTK process's own start included).
LEGIT_LIMIT = 1.0


@dataclass
class Legit:
    """A legitimate peer trying again and again: every try and how long it took."""

    port: int
    file: Path
    tries: list[tuple[str, float, int, str]] = field(default_factory=list)

    def once(self) -> None:
        for tool, args in (("echoscu", []), ("storescu", [str(self.file)])):
            started = time.monotonic()
            done = subprocess.run(
                [f"/usr/bin/{tool}", "-aet", "LEGIT", "-aec", "PACSNODE", "-to", "5",
                 "-ta", "5", "-td", "5", "127.0.0.1", str(self.port), *args],
                env=dcmtk_env(), capture_output=True, text=True, timeout=30)
            self.tries.append((tool, time.monotonic() - started, done.returncode,
                               (done.stderr or done.stdout).strip()[-300:]))

    def failures(self) -> list[str]:
        return [f"{tool} exit {code} after {took:.2f} s: {out}"
                for tool, took, code, out in self.tries
                if code != 0 or took > LEGIT_LIMIT]

    def slowest(self) -> float:
        return max(took for _, took, _, _ in self.tries)


def flood_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((FLOODER, 0))
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def malformed_rqs() -> list[bytes]:
    """A-ASSOCIATE-RQs as the issue found them: a wrong PDU length, an item length of 0,
    truncated at 150 bytes."""
    rq = hostile.associate_rq(calling="FLOODER")
    wrong_length = rq[:2] + struct.pack(">L", len(rq) + 94) + rq[6:]
    # The first item (the application context) starts after the 6-byte header and the
    # 68-byte fixed part; its length is the 2 bytes after its type and reserved byte.
    item_zero = rq[:76] + b"\0\0" + rq[78:]
    return [wrong_length, item_zero, rq[:150]]


@contextlib.contextmanager
def serve(tmp_path: Path, extra: str = "") -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "data"\nlisten_host = "127.0.0.1"\n'
                      f"shutdown_grace_seconds = 0\n[bootstrap_partition]\nport = {port}\n"
                      f"[dicom]\nassociation_processes = 2\n{extra}")
    proc = start(tmp_path, "--config", str(config))
    try:
        wait_listening(port, proc)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)


def stopped(proc: subprocess.Popen[str]) -> str:
    return stop(proc, signal.SIGTERM)


def during_and_after(legit: Legit, flood: Callable[[], None], after: float = 3.0) -> float:
    """Run the legitimate peer while `flood` runs and for `after` seconds once it is done;
    returns how long the flood took."""
    finished = threading.Event()
    took: list[float] = []

    def flooding() -> None:
        started = time.monotonic()
        try:
            flood()
        finally:
            took.append(time.monotonic() - started)
            finished.set()

    thread = threading.Thread(target=flooding, daemon=True)
    thread.start()
    while not finished.is_set():
        legit.once()
    deadline = time.monotonic() + after
    while time.monotonic() < deadline:
        legit.once()
    thread.join()
    return took[0]


def rejects(tmp_path: Path) -> list[dict[str, object]]:
    done = subprocess.run([*PACSNODE, "activity", "--kind", "reject", "--json",
                           "--config", str(tmp_path / "node.toml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def figures(name: str, legit: Legit, flood_seconds: float, sent: int) -> None:
    print(f"\nflood {name}: {sent} connections in {flood_seconds:.2f} s; legitimate peer: "
          f"{len(legit.tries)} tries, slowest {legit.slowest():.2f} s, "
          f"failed {sum(code != 0 for _, _, code, _ in legit.tries)}")


@pytest.mark.parametrize("extra", ["", "max_connections_per_address = 0\n"],
                         ids=["defaults", "no-address-limit"])
def test_malformed_associate_requests_sent_and_closed_lock_no_one_out(
        tmp_path: Path, dcmtk: Path, extra: str) -> None:
    file = write_study(tmp_path / "in", 1)[0]
    count = 400
    with serve(tmp_path, extra) as (port, proc):
        legit = Legit(port, file)
        legit.once()  # DCMTK's first start (page cache) is not what is measured

        def flood() -> None:
            for n, rq in zip(range(count), malformed_rqs() * count, strict=False):
                with contextlib.suppress(OSError):
                    sock = flood_socket(port)
                    sock.sendall(rq)
                    sock.close()
                if n % 50 == 49:
                    time.sleep(0.01)

        legit.tries.clear()
        took = during_and_after(legit, flood)
        figures(f"malformed A-ASSOCIATE-RQ sent and closed {extra.strip()}", legit, took,
                count)
        assert not legit.failures(), "\n".join(legit.failures()[:10])
        found = wait_for(lambda: any(r["peer"].startswith(FLOODER) for r in rejects(tmp_path)),
                         timeout=10)
        recorded = rejects(tmp_path)
        output = stopped(proc)
    assert found, recorded
    reasons = " | ".join(str(r["detail"]) for r in recorded if r["peer"].startswith(FLOODER))
    assert "A-ASSOCIATE-RQ" in reasons, reasons
    assert f"{FLOODER}" in output and "refused" in output
    assert "LEGIT" in output


@pytest.mark.parametrize(("sends", "count", "extra"), [
    (b"\x01\x00\x00\x00\x10\x00", 300, ""),
    (b"", 300, ""),
    # Without the per-address limit: the gate alone (fewer than max_handshakes = 256).
    (b"\x01\x00\x00\x00\x10\x00", 200, "max_connections_per_address = 0\n"),
], ids=["pdu-header-only", "nothing", "pdu-header-only-no-address-limit"])
def test_connections_that_hold_still_lock_no_one_out(
        tmp_path: Path, dcmtk: Path, sends: bytes, count: int, extra: str) -> None:
    file = write_study(tmp_path / "in", 1)[0]
    held: list[socket.socket] = []
    with serve(tmp_path, extra) as (port, proc):
        legit = Legit(port, file)
        legit.once()

        def flood() -> None:
            for _ in range(count):
                with contextlib.suppress(OSError):
                    sock = flood_socket(port)
                    if sends:
                        sock.sendall(sends)
                    held.append(sock)
            # Held while the legitimate peer tries (the flood's "during"), then dropped.
            time.sleep(3.0)

        legit.tries.clear()
        try:
            took = during_and_after(legit, flood, after=0)
            during = len(legit.tries)
            for sock in held:
                sock.close()
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                legit.once()
        finally:
            for sock in held:
                sock.close()
        figures(f"holding ({'6-byte header' if sends else 'nothing sent'}{', ' if extra else ''}"
                f"{extra.strip()})", legit, took, count)
        assert during >= 2
        assert not legit.failures(), "\n".join(legit.failures()[:10])
        output = stopped(proc)
    assert "refused" in output


def test_one_address_is_limited_and_its_half_open_connections_are_cut_off(
        tmp_path: Path, dcmtk: Path) -> None:
    """Over `max_connections_per_address`, a connection from that address is closed at once;
    those within it that send no A-ASSOCIATE-RQ are closed after `handshake_timeout`; another
    address is served meanwhile."""
    file = write_study(tmp_path / "in", 1)[0]
    with serve(tmp_path, "handshake_timeout = 2.0\nmax_connections_per_address = 8\n") \
            as (port, proc):
        held = [flood_socket(port) for _ in range(20)]
        try:
            # The 12 beyond the limit end at once (the node closes them: EOF or reset).
            started = time.monotonic()
            ended = closed_by_node(held, timeout=1.0)
            assert len(ended) == 12, f"{len(ended)} of 20 closed at once"
            legit = Legit(port, file)
            legit.once()
            assert not legit.failures(), legit.failures()
            # The 8 within it are cut off after the handshake timeout, not the ACSE timeout.
            rest = [s for s in held if s not in ended]
            assert len(closed_by_node(rest, timeout=5.0)) == 8
            cut = time.monotonic() - started
            assert 1.5 <= cut <= 4.0, cut
        finally:
            for sock in held:
                sock.close()
        print(f"\nper-address limit 8: 12 of 20 connections refused at once, the other 8 cut "
              f"off after {cut:.2f} s (handshake_timeout 2 s)")
        assert wait_for(lambda: any("per address" in str(r["detail"])
                                    for r in rejects(tmp_path)), timeout=10)
        output = stopped(proc)
    assert "per address" in output


def closed_by_node(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets the node closes within `timeout` seconds (each read returns EOF or a
    reset); the others are left open."""
    ended: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    waiting = list(socks)
    while waiting and time.monotonic() < deadline:
        for sock in list(waiting):
            sock.settimeout(max(0.001, min(0.05, deadline - time.monotonic())))
            try:
                if sock.recv(4096):
                    continue  # an A-ABORT or A-ASSOCIATE-RJ first: read on to the close
            except TimeoutError:
                continue
            except OSError:
                pass
            ended.append(sock)
            waiting.remove(sock)
    return ended
