"""Storage commitment asked again against Orthanc: after the destination died or hung between
a batch's C-STOREs and its N-ACTION, after a report that never came, from `queue retry` and
`queue commit`, and for what was delivered before commitment was switched on."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db.models import ForwardJob, Study
from node.forwarding.admin import stored_elsewhere
from tests import orthanc
from tests.conftest import RunningNode, free_port, wait_for
from tests.dicomgen import make_instance
from tests.scu import statuses, store

pytestmark = [pytest.mark.slow, pytest.mark.interop,
              pytest.mark.skipif(not orthanc.available(), reason="Orthanc is not installed")]

# (0000,0100) Command Field = 0x0130 (N-ACTION-RQ), as every command set is encoded:
# Implicit VR Little Endian.
N_ACTION_RQ = b"\x00\x00\x00\x01\x02\x00\x00\x00\x30\x01"
C_STORE_RQ = b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x00"
SETTINGS = """
[forwarding]
poll_seconds = 0.1
retry_base_seconds = {base}
retry_max_seconds = {cap}
commitment_timeout = {timeout}
heartbeat_interval = 0.5
heartbeat_idle_seconds = 30
"""


class NActionTrap:
    """A TCP relay from the node to Orthanc that calls `at_n_action` (kill or freeze Orthanc)
    when the node sends an N-ACTION-RQ after `stores` C-STORE-RQs went through, and drops
    that request: the destination dies or hangs after a batch's C-STOREs and before its
    storage commitment request. Connections wait for `open()` before they are relayed (so
    what the test stores is queued before anything is sent); every connection after the
    trap fired is relayed as it is."""

    def __init__(self, upstream_port: int, stores: int, at_n_action: Callable[[], None]
                 ) -> None:
        self.upstream_port = upstream_port
        self.stores = stores
        self.at_n_action = at_n_action
        self.seen_stores = 0
        self.fired = threading.Event()
        self.gate = threading.Event()
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def open(self) -> None:
        self.gate.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        self.gate.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), 5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._sockets += [client, upstream]
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket, from_node: bool) -> None:
        tail = b""
        held = False
        try:
            while chunk := source.recv(65536):
                if from_node and not self.fired.is_set():
                    window = tail + chunk  # a command split between two reads is seen too
                    self.seen_stores += window.count(C_STORE_RQ)
                    if self.seen_stores >= self.stores and N_ACTION_RQ in window:
                        self.fired.set()
                        held = True
                        self.at_n_action()
                    tail = window[-(len(N_ACTION_RQ) - 1):]
                if held:
                    continue  # the request and what follows never reach the destination
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.gate.set()
        self._server.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes the pumps (close alone does not)
            s.close()


def commitments(node: RunningNode) -> list[str]:
    with node.db.session() as session:
        return list(session.scalars(select(ForwardJob.commitment).order_by(ForwardJob.id)))


def states(node: RunningNode) -> list[str]:
    with node.db.session() as session:
        return list(session.scalars(select(ForwardJob.state).order_by(ForwardJob.id)))


def study_commitments(node: RunningNode) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with node.db.session() as session:
        for study, state in session.execute(select(ForwardJob.study_instance_uid,
                                                   ForwardJob.commitment)):
            out.setdefault(study, []).append(state)
    return out


def purgeable(node: RunningNode) -> list[bool]:
    with node.db.session() as session:
        return [stored_elsewhere(session, pk)
                for pk in session.scalars(select(Study.id).order_by(Study.id))]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[..., orthanc.Orthanc]]:
    started: list[orthanc.Orthanc] = []

    def start(node: RunningNode) -> orthanc.Orthanc:
        o = orthanc.Orthanc(tmp_path / "orthanc", modalities={"node": ("PACSNODE", node.port)})
        started.append(o.start())
        return o

    yield start
    for o in started:
        o.stop()


def studies(count: int, size: int) -> list[object]:
    out = []
    for _ in range(count):
        first = make_instance()
        out += [first, *(make_instance(study_uid=first.StudyInstanceUID)
                         for _ in range(size - 1))]
    return out


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_commitment_is_asked_again_once_the_destination_is_back(
        make_node: object, peer: Callable[..., orthanc.Orthanc], fault: str) -> None:
    node = make_node(SETTINGS.format(base=0.5, cap=2, timeout=5))  # type: ignore[operator]
    dest = peer(node)
    trap = NActionTrap(dest.port, 10, dest.kill if fault == "kill"
                       else lambda: dest.signal(signal.SIGSTOP))
    try:
        assert node.cli("device", "add", "ORTHANC", "--type", "PARENT", "--host", "127.0.0.1",
                        "--port", str(trap.port), "--storage-commitment", "--acse-timeout", "5",
                        "--dimse-timeout", "2").exit_code == 0
        assert statuses(store(node.port, studies(1, 10))) == [0] * 10
        trap.open()
        assert wait_for(trap.fired.is_set, timeout=30)
        # Every C-STORE was answered, the last batch's N-ACTION never arrived: delivered, and
        # not committed.
        assert wait_for(lambda: "failed" in commitments(node), timeout=15)
        assert set(commitments(node)) <= {"committed", "failed"}
        failed = commitments(node).count("failed")
        assert purgeable(node) == [False]
        time.sleep(3)  # retries meanwhile find the destination gone (or not answering)
        assert commitments(node).count("committed") == 10 - failed
        back = time.monotonic()
        if fault == "kill":
            dest.start()
        else:
            dest.signal(signal.SIGCONT)
        assert wait_for(lambda: set(commitments(node)) == {"committed"}, timeout=30)
        took = time.monotonic() - back
        print(f"\ncommitment {fault}: {failed} of 10 not requested; all committed {took:.1f} s"
              " after the destination returned")
        # At most the backoff ceiling (2 s) plus the request, the report, and the timeouts of
        # an association to a destination that does not answer.
        assert took < 2 + 5 + 2 + 3
        assert purgeable(node) == [True]
    finally:
        trap.close()


def test_queue_retry_and_queue_commit_ask_again_at_once(
        make_node: object, peer: Callable[..., orthanc.Orthanc]) -> None:
    # Backoff of a minute: only the commands can make the node ask within the test.
    node = make_node(SETTINGS.format(base=60, cap=120, timeout=60))  # type: ignore[operator]
    dest = peer(node)
    trap = NActionTrap(dest.port, 10, dest.kill)
    try:
        assert node.cli("device", "add", "ORTHANC", "--type", "PARENT", "--host", "127.0.0.1",
                        "--port", str(trap.port), "--storage-commitment").exit_code == 0
        sent = studies(2, 5)
        assert statuses(store(node.port, sent)) == [0] * 10
        trap.open()
        assert wait_for(lambda: "failed" in commitments(node), timeout=30)
        dest.start()
        time.sleep(1)
        by_study = study_commitments(node)
        waiting = {uid: states.count("failed") for uid, states in by_study.items()}
        assert sum(waiting.values()) >= 5 and set(commitments(node)) <= {"committed", "failed"}
        last = sent[-1].StudyInstanceUID  # has all its 5 in the failed (last) batch
        assert waiting[last] == 5
        result = node.cli("queue", "commit", "--device", "ORTHANC", "--study", last)
        assert result.exit_code == 0, result.output
        assert result.output.strip() == ("storage commitment of 5 delivered instance(s) in 1"
                                         " study(ies) is asked from ORTHANC now (by the"
                                         " running node)")
        asked = time.monotonic()
        assert wait_for(lambda: set(study_commitments(node)[last]) == {"committed"},
                        timeout=10)
        print(f"\nqueue commit: committed {time.monotonic() - asked:.1f} s after the command")
        first = sent[0].StudyInstanceUID
        assert study_commitments(node)[first].count("failed") == waiting[first]
        result = node.cli("queue", "retry", "--device", "ORTHANC")
        assert result.exit_code == 0, result.output
        assert waiting[first] >= 1  # its first instance went alone, before the gate opened
        assert result.output.splitlines() == [
            "0 job(s) queued again", f"{waiting[first]} delivered job(s) not committed"
            " yet: storage commitment asked again now"]
        asked = time.monotonic()
        assert wait_for(lambda: set(commitments(node)) == {"committed"}, timeout=10)
        print(f"queue retry: committed {time.monotonic() - asked:.1f} s after the command")
        assert purgeable(node) == [True, True]
    finally:
        trap.close()


def test_a_report_that_never_comes_is_asked_for_again_after_the_timeout(
        make_node: object, peer: Callable[..., orthanc.Orthanc]) -> None:
    timeout = 4.0
    node = make_node(SETTINGS.format(base=0.5, cap=2, timeout=timeout))  # type: ignore[operator]
    dest = peer(node)
    # Orthanc answers the N-ACTION, then cannot deliver its report: nobody at that port.
    dest.stop()
    dest.modalities = {"node": ("PACSNODE", free_port())}
    dest.start()
    assert node.cli("device", "add", "ORTHANC", "--type", "PARENT", "--host", "127.0.0.1",
                    "--port", str(dest.port), "--storage-commitment").exit_code == 0
    assert statuses(store(node.port, studies(1, 5))) == [0] * 5
    assert wait_for(lambda: set(commitments(node)) == {"requested"}, timeout=20)
    requested = time.monotonic()
    dest.stop()  # back with the right address (its stored instances kept)
    dest.modalities = {"node": ("PACSNODE", node.port)}
    dest.start()
    assert set(commitments(node)) == {"requested"}
    assert wait_for(lambda: set(commitments(node)) == {"committed"}, timeout=20)
    took = time.monotonic() - requested
    print(f"\nreport never came: asked again and committed {took:.1f} s after the request"
          f" (commitment_timeout {timeout:.0f} s)")
    assert timeout - 0.5 <= took <= timeout + 5
    assert purgeable(node) == [True]


def test_switching_commitment_on_asks_for_what_was_delivered_before(
        make_node: object, peer: Callable[..., orthanc.Orthanc]) -> None:
    node = make_node(SETTINGS.format(base=0.5, cap=2, timeout=5))  # type: ignore[operator]
    dest = peer(node)
    assert node.cli("device", "add", "ORTHANC", "--type", "PARENT", "--host", "127.0.0.1",
                    "--port", str(dest.port)).exit_code == 0
    assert node.cli("device", "add", "TAPE", "--type", "BACKUP_TARGET", "--host",
                    "127.0.0.1", "--port", str(free_port()), "--disabled"
                    ).exit_code == 0
    assert statuses(store(node.port, studies(2, 3))) == [0] * 6
    assert wait_for(lambda: states(node) == ["done"] * 6, timeout=20)
    assert commitments(node) == [""] * 6
    assert purgeable(node) == [True, True]
    result = node.cli("device", "edit", "ORTHANC", "--storage-commitment")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "updated device ORTHANC",
        "storage commitment on: 6 instance(s) in 2 study(ies) already delivered to ORTHANC"
        " count as stored elsewhere (may be purged) only once ORTHANC commits them; the"
        " running node asks it now"]
    switched = time.monotonic()
    assert wait_for(lambda: set(commitments(node)) == {"committed"}, timeout=15)
    print(f"\ncommitment switched on: 6 delivered instances committed"
          f" {time.monotonic() - switched:.1f} s later")
    assert purgeable(node) == [True, True]
    result = node.cli("queue", "commit", "--device", "ORTHANC")
    assert (result.exit_code, result.output.strip()) == (
        0, "nothing delivered to ORTHANC waits for storage commitment")
    result = node.cli("queue", "commit", "--device", "TAPE")
    assert result.exit_code == 1
    assert "device TAPE does not ask for storage commitment" in result.output
