"""A node whose wall clock is stepped while it runs keeps forwarding on time.

The node runs under libfaketime (tests/clockstep); the test steps its wall clock back or forward
an hour while jobs wait for a destination that is down, or while a batch is on its way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Engine

from node.db.models import ForwardJob, Instance, JobState
from tests import hostile
from tests.clockstep import SteppedClock
from tests.conftest import DCMTK_BIN, dcmtk_env, free_port, run_cli, wait_for, wait_listening
from tests.destination import CountingSCP
from tests.dicomgen import make_instance
from tests.hostile import RawPeer
from tests.scu import statuses, store

pytestmark = [pytest.mark.slow, pytest.mark.interop]

HOUR = 3600
RETRY_BASE = 2.0
RETRY_MAX = 10.0
INSTANCES = 100


class Node:
    def __init__(self, tmp_path: Path, db_url: str, clock: SteppedClock, forwarding: str) -> None:
        self.port = free_port()
        self.config = tmp_path / "node.toml"
        self.config.write_text(
            f'[node]\ndata_dir = "{tmp_path / "data"}"\ndatabase_url = "{db_url}"\n'
            f'listen_host = "127.0.0.1"\n[bootstrap_partition]\nport = {self.port}\n'
            f"[hierarchy]\nenabled = false\n[forwarding]\n{forwarding}")
        self.log = tmp_path / "node.log"
        self.proc = clock.serve(self.config, self.log)
        wait_listening(self.port, self.proc)
        self.engine: Engine = create_engine(db_url)

    def add_destination(self, port: int) -> None:
        result = run_cli(self.config, "device", "add", "DEST", "--ae-title", "DEST", "--type",
                         "BACKUP_TARGET", "--host", "127.0.0.1", "--port", str(port))
        assert result.exit_code == 0, result.output

    def attempts(self) -> list[int]:
        """Failed tries of each job still to deliver."""
        with self.engine.connect() as conn:
            return list(conn.scalars(select(ForwardJob.attempts).where(
                ForwardJob.state != JobState.DONE)))

    def done(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(ForwardJob).where(
                ForwardJob.state == JobState.DONE)) or 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.engine.dispose()


@pytest.fixture
def clock(tmp_path: Path) -> SteppedClock:
    return SteppedClock(tmp_path / "clock")


@pytest.fixture
def start_node(tmp_path: Path, new_db: Callable[..., str],
               clock: SteppedClock) -> Iterator[Callable[[str], Node]]:
    started: list[Node] = []

    def start(forwarding: str) -> Node:
        node = Node(tmp_path, new_db(), clock, forwarding)  # type: ignore[call-arg]
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def storescp(port: int, folder: Path) -> subprocess.Popen[bytes]:
    """DCMTK's storage SCP, one file per instance received (a duplicate overwrites its own)."""
    folder.mkdir()
    return subprocess.Popen([str(DCMTK_BIN / "storescp"), "-aet", "DEST", "-od", str(folder),
                             str(port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_a_clock_stepped_back_an_hour_delays_retries_by_at_most_retry_max_seconds(
        tmp_path: Path, start_node: Callable[[str], Node], clock: SteppedClock,
        dcmtk: Path) -> None:
    node = start_node(f"poll_seconds = 0.2\nretry_base_seconds = {RETRY_BASE}\n"
                      f"retry_max_seconds = {RETRY_MAX}\nmax_attempts = 1000\n")
    dest_port = free_port()
    node.add_destination(dest_port)  # nothing listens there yet: the destination is down
    sent = [make_instance() for _ in range(INSTANCES)]
    assert set(statuses(store(node.port, sent))) == {0}
    # Every job has failed twice: each waits 4 s (then 8, then 10) for its next try.
    assert wait_for(lambda: min(node.attempts(), default=0) >= 2, timeout=30)

    clock.set(-HOUR)
    assert clock.offset() == pytest.approx(-HOUR, abs=5)
    before_step = max(node.attempts())
    time.sleep(3)  # still down: the node keeps trying, at its backoff
    received = tmp_path / "received"
    dest = storescp(dest_port, received)
    back = time.monotonic()
    tries_while_down = max(node.attempts()) - before_step
    try:
        delivered = wait_for(lambda: node.done() == INSTANCES, timeout=RETRY_MAX + 20)
        waited = time.monotonic() - back
        print(f"clock stepped back {HOUR} s: {node.done()} of {INSTANCES} delivered "
              f"{waited:.1f} s after the destination came back (retry_max_seconds "
              f"{RETRY_MAX:.0f}); {tries_while_down} tries per job in the 3 s after the step")
        assert delivered, (f"{INSTANCES - node.done()} job(s) still waiting {waited:.0f} s "
                           "after the destination came back")
        # Within the retry ceiling (plus a batch's sending and a poll) of its return...
        assert waited <= RETRY_MAX + 5
        # ... and no faster than the backoff allows: the step does not make a busy loop of
        # the retries while the destination is still down (4 s and more between tries).
        assert tries_while_down <= 1
        assert wait_for(lambda: len(list(received.iterdir())) == INSTANCES, timeout=10)
    finally:
        dest.terminate()
        dest.wait(timeout=10)


def test_a_clock_stepped_forward_an_hour_mid_batch_sends_nothing_twice(
        start_node: Callable[[str], Node], clock: SteppedClock) -> None:
    # A lease shorter than the step: without care the batches on their way look abandoned.
    node = start_node("poll_seconds = 0.2\nbatch_size = 10\nlease_seconds = 600\n")
    dest = CountingSCP(delay=0.1).start()  # one batch takes a second
    try:
        node.add_destination(dest.port)
        sent = [make_instance() for _ in range(60)]
        assert set(statuses(store(node.port, sent))) == {0}
        assert wait_for(lambda: len(dest.received) >= 3, timeout=30)
        clock.set(HOUR)
        assert clock.offset() == pytest.approx(HOUR, abs=5)
        assert wait_for(lambda: node.done() == 60, timeout=60)
        assert sorted(dest.received) == sorted(ds.SOPInstanceUID for ds in sent), (
            f"{len(dest.received) - 60} instance(s) sent twice")
        # The associations (two sender tasks) lived through the step: none timed out.
        assert dest.associations <= 2, f"{dest.associations} associations for two tasks"
    finally:
        dest.stop()


def hierarchy_node(tmp_path: Path, name: str, heartbeat: float, parent: str = "") -> Path:
    folder = tmp_path / name
    control = f"127.0.0.1:{free_port()}"
    config = folder.with_suffix(".toml")
    config.write_text(
        f'[node]\nname = "{name}"\ndata_dir = "{folder}"\nlisten_host = "127.0.0.1"\n'
        f"[bootstrap_partition]\nae_title = \"{name.upper()}\"\nport = {free_port()}\n"
        f'[hierarchy]\ncontrol_listen = "{control}"\nheartbeat_seconds = {heartbeat}\n'
        f'parent = "{parent}"\n')
    return config


def alive(clock: SteppedClock, config: Path, neighbour: str) -> bool:
    rows = json.loads(clock.run(config, "hierarchy", "neighbours", "--json"))["neighbours"]
    return bool({r["node_id"]: r["alive"] for r in rows}.get(neighbour))


def test_a_step_of_the_clock_changes_no_neighbours_liveness(tmp_path: Path,
                                                            clock: SteppedClock) -> None:
    # The child heartbeats once a minute (alive for 3 minutes), the parent advertises 2 s
    # (the child counts it dead 6 s after its last answer).
    parent_config = hierarchy_node(tmp_path, "parent", heartbeat=2)
    parent_control = parent_config.read_text().split('control_listen = "')[1].split('"')[0]
    child_config = hierarchy_node(tmp_path, "child", heartbeat=60, parent=parent_control)
    parent = clock.serve(parent_config, tmp_path / "parent.log")
    child = None
    try:
        # The child registers at start, then only every minute: the parent must be up first.
        wait_listening(int(parent_control.rsplit(":", 1)[1]), parent)
        child = clock.serve(child_config, tmp_path / "child.log")
        assert wait_for(lambda: alive(clock, parent_config, "child"), timeout=30)
        # Forward an hour, seconds after the child registered: it is alive for minutes yet.
        clock.set(HOUR)
        time.sleep(0.5)
        assert wait_for(lambda: alive(clock, parent_config, "child"), timeout=5), (
            "a step forward made the child dead")
        # Back two hours with the parent gone: after its 6 s the child must count it dead,
        # not alive for the two hours its last answer now lies ahead.
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30)
        clock.set(-HOUR)
        time.sleep(6)
        assert wait_for(lambda: not alive(clock, child_config, "parent"), timeout=10), (
            "a step back kept a dead parent alive")
    finally:
        for proc in (child, parent):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


def test_a_store_under_way_when_the_clock_steps_forward_is_stored(
        start_node: Callable[[str], Node], clock: SteppedClock) -> None:
    # The storage monitor sweeps temporary files idle past network_timeout: by their age on
    # the wall clock, which a step forward makes an hour older at once.
    node = start_node("[storage]\ncheck_interval_seconds = 0.3\n")
    ds = make_instance(size=256)  # 128 KiB: many PDUs of 4 KiB
    sop = str(ds.SOPInstanceUID)
    stream = hostile.store_request(hostile.encode(ds), CTImageStorage, sop, 1, max_pdu=4096)
    with RawPeer(node.port, timeout=20) as peer:
        answer = peer.associate(hostile.associate_rq(abstract_syntaxes=(CTImageStorage,),
                                                     max_pdu=4096))
        assert answer[:1] == b"\x02", f"no A-ASSOCIATE-AC: {answer[:16]!r}"
        half = len(stream) // 2
        peer.send(stream[:half])  # the node has a temporary file for it now
        time.sleep(0.5)
        clock.set(HOUR)
        time.sleep(1.5)  # the monitor checks five times meanwhile
        peer.send(stream[half:])
        reply = peer.read_pdu()
        assert not hostile.is_abort(reply), "the node aborted the association"
        (answer_set,) = hostile.command_sets(reply)
    assert int(answer_set.Status) == 0, f"C-STORE answered 0x{int(answer_set.Status):04X}"
    with node.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Instance).where(
            Instance.sop_instance_uid == sop)) == 1
