"""Watermarks on a real small filesystem: purge down to the low watermark, suspended storage
at the critical watermark (0xA700, nothing written), resumed when space is freed, status."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from node import activity
from node.db.models import ForwardJob, Instance, JobState, Study
from node.storage.space import measure
from tests.conftest import RunningNode, free_port, incoming_files, stored_files, wait_for
from tests.destination import CountingSCP
from tests.dicomgen import make_instance
from tests.integration.test_find import find
from tests.integration.test_forward import FAST
from tests.integration.test_retrieve import move
from tests.scu import associate, statuses, store
from tests.smallfs import MiB, fill, small_fs  # noqa: F401  (the fixture)

INSTANCES_PER_STUDY = 3
PIXELS = 256  # 256 x 256 x 2 bytes: about 128 KiB an instance


def lifecycle(*, low: float, high: float, critical: float, extra: str = "") -> str:
    # The monitor's own thread checks once at start; tests then call check() themselves.
    return f"""{FAST}
[storage]
low_watermark = {low}
high_watermark = {high}
critical_watermark = {critical}
check_interval_seconds = 3600
{extra}
"""


def send_study(node: RunningNode, called: str = "PACSNODE") -> str:
    first = make_instance(size=PIXELS)
    items = [first, *(make_instance(study_uid=first.StudyInstanceUID, size=PIXELS)
                      for _ in range(INSTANCES_PER_STUDY - 1))]
    assert statuses(store(node.port, items, called=called)) == [0] * INSTANCES_PER_STUDY
    return str(first.StudyInstanceUID)


def held_studies(node: RunningNode) -> set[str]:
    with node.db.session() as session:
        return set(session.scalars(select(Study.study_instance_uid)))


def all_forwarded(node: RunningNode) -> bool:
    with node.db.session() as session:
        states = set(session.scalars(select(ForwardJob.state)))
    return states == {JobState.DONE}


class Archive:
    """A node on its own small disk: one old study on a partition that does not forward, then
    six studies forwarded to a PARENT."""

    def __init__(self, node: RunningNode, disk: Path, parent: CountingSCP) -> None:
        self.node = node
        self.disk = disk
        self.parent = parent
        assert node.cli("partition", "add", "LOCALONLY", "--port", str(node.port),
                        "--folder", "LOCALONLY", "--no-forwarding").exit_code == 0
        assert node.cli("device", "add", "PARENT", "--ae-title", parent.ae_title, "--type",
                        "PARENT", "--host", "127.0.0.1", "--port", str(parent.port)
                        ).exit_code == 0
        before = measure(disk).used
        self.unforwarded = send_study(node, called="LOCALONLY")
        self.forwarded = [send_study(node) for _ in range(6)]
        # What one study takes on this filesystem (pages, directories), measured.
        self.study_bytes = (measure(disk).used - before) // 7
        assert wait_for(lambda: all_forwarded(node), timeout=30)

    def fill_to(self, percent_used: float) -> None:
        usage = measure(self.disk)
        fill(self.disk / "ballast", int(usage.total * percent_used / 100) - usage.used)


@pytest.fixture
def archive(small_fs: Callable[[int], Path],  # noqa: F811  (first: unmounted last)
            make_node: Callable[..., RunningNode]) -> Callable[..., Archive]:
    parent = CountingSCP(ae_title="PARENT").start()

    def build(**watermarks: object) -> Archive:
        disk = small_fs(24 * MiB)
        node = make_node(lifecycle(**watermarks), storage_dir=disk / "storage")  # type: ignore[arg-type]
        return Archive(node, disk, parent)

    yield build  # type: ignore[misc]
    parent.stop()


def test_purge_frees_down_to_the_low_watermark_oldest_forwarded_first(
        archive: Callable[..., Archive]) -> None:
    a = archive(low=40, high=44, critical=99)
    # 2.5 studies above the low watermark (and above the high one): three must go, not four.
    a.fill_to(40 + 250 * a.study_bytes / measure(a.disk).total)
    assert measure(a.disk).percent_used >= 44
    state = a.node.node.monitor.check()  # type: ignore[union-attr]
    after = measure(a.disk)
    assert after.percent_used <= 40
    assert after.percent_used > 40 - 100 * a.study_bytes / after.total  # stopped right there
    # Oldest received first, skipping the older study that was never forwarded.
    assert held_studies(a.node) == {a.unforwarded, *a.forwarded[3:]}
    with a.node.db.session() as session:
        assert len(session.scalars(select(Instance)).all()) == 4 * INSTANCES_PER_STUDY
    on_disk = {p.parts[-3] for p in stored_files(a.node.storage) if p.suffix == ".dcm"}
    assert on_disk == {a.unforwarded, *a.forwarded[3:]}
    assert not list(a.node.storage.rglob(".trash/*"))  # purged studies are not kept
    [fs] = [f for f in state.filesystems if f.partitions]
    assert not fs.purging and not fs.suspended
    assert state.last_purge is not None and state.last_purge.studies == 3
    assert state.last_purge.stopped == "low watermark reached"
    a.node.node.activity.flush()  # type: ignore[union-attr]
    with a.node.db.session() as session:
        purged = activity.query(session, kinds=["purge"])
    assert {row.study_instance_uid for row in purged} == set(a.forwarded[:3])


def test_purge_counts_deleted_files_still_held_open_as_freed(
        archive: Callable[..., Archive]) -> None:
    """A file still open elsewhere (a retrieve reading it) keeps its space until closed: the
    purge must not go on deleting studies for space that is on its way."""
    a = archive(low=40, high=44, critical=99)
    a.fill_to(40 + 250 * a.study_bytes / measure(a.disk).total)
    held = [os.open(p, os.O_RDONLY) for p in stored_files(a.node.storage)
            if p.suffix == ".dcm" and p.parts[-3] in a.forwarded[:3]]
    assert len(held) == 3 * INSTANCES_PER_STUDY
    try:
        state = a.node.node.monitor.check()  # type: ignore[union-attr]
        assert measure(a.disk).percent_used >= 44  # nothing released while open
    finally:
        for fd in held:
            os.close(fd)
    assert held_studies(a.node) == {a.unforwarded, *a.forwarded[3:]}
    assert state.last_purge is not None and state.last_purge.studies == 3
    assert "has not fallen" in state.last_purge.stopped
    after = measure(a.disk)
    assert 40 - 100 * a.study_bytes / after.total < after.percent_used <= 40
    [fs] = [f for f in a.node.node.monitor.check().filesystems  # type: ignore[union-attr]
            if f.partitions]
    assert not fs.purging
    assert held_studies(a.node) == {a.unforwarded, *a.forwarded[3:]}


def test_purge_keeps_the_protected_studies_and_says_why_it_stopped(
        archive: Callable[..., Archive]) -> None:
    a = archive(low=40, high=44, critical=99, extra="protected_studies = 5")
    a.fill_to(60)
    a.node.node.monitor.check()  # type: ignore[union-attr]
    # 7 studies held, 5 protected: two go although usage stays above the low watermark.
    assert held_studies(a.node) == {a.unforwarded, *a.forwarded[2:]}
    result = a.node.cli("status", "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    [fs] = [f for f in status["filesystems"] if "PACSNODE" in f["partitions"]]
    assert fs["purging"] and "5 studies are protected" in fs["waiting"]
    assert fs["percent_used"] > 40 and not fs["suspended"]
    assert status["last_purge"]["studies"] == 2
    assert "5 studies are protected" in status["last_purge"]["stopped"]
    table = a.node.cli("status")
    assert table.exit_code == 0 and "waiting: 5 studies are protected" in table.output


def test_purge_waits_while_the_cpu_is_busier_than_the_threshold(
        archive: Callable[..., Archive]) -> None:
    # Nothing is ever 100% idle while the test runs: the threshold cannot be met.
    a = archive(low=40, high=44, critical=99, extra="cpu_idle_threshold = 100")
    a.fill_to(60)
    state = a.node.node.monitor.check()  # type: ignore[union-attr]
    assert len(held_studies(a.node)) == 7
    [fs] = [f for f in state.filesystems if f.partitions]
    assert fs.purging and "below the 100% threshold" in fs.waiting


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[str] = []

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.messages.append(envelope.content.decode())  # type: ignore[attr-defined]
        return "250 OK"


@pytest.fixture
def mailbox() -> Mailbox:
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    box.port = controller.port  # type: ignore[attr-defined]
    yield box  # type: ignore[misc]
    controller.stop()


def test_critical_watermark_suspends_storage_and_it_resumes_by_itself(
        small_fs: Callable[[int], Path],  # noqa: F811  (first: unmounted last)
        make_node: Callable[..., RunningNode], mailbox: Mailbox,
        caplog: pytest.LogCaptureFixture) -> None:
    disk = small_fs(16 * MiB)
    node = make_node(lifecycle(low=50, high=60, critical=70, extra=f"""auto_purge = false
[notify]
email_to = "pacs-admin@example.org"
smtp_host = "127.0.0.1"
smtp_port = {mailbox.port}  # type: ignore[attr-defined]
""".replace("  # type: ignore[attr-defined]", "")), storage_dir=disk / "storage")
    kept = send_study(node)
    files_before = stored_files(node.storage)
    fill(disk / "ballast", int(measure(disk).total * 0.75))
    caplog.set_level(logging.ERROR)
    node.node.monitor.check()  # type: ignore[union-attr]  (the interval's check, now)

    refused = store(node.port, [make_instance(size=PIXELS), make_instance(size=PIXELS)])
    assert statuses(refused) == [0xA700, 0xA700]
    assert "storage suspended" in refused[0].ErrorComment
    assert "storage suspended" in caplog.text
    # Nothing written: no new file (nor a temporary one), nothing indexed.
    assert stored_files(node.storage) == files_before
    assert held_studies(node) == {kept}
    # Queries and retrieves keep working.
    found, final = find(node, "STUDY", StudyInstanceUID="")
    assert final == 0 and [str(ds.StudyInstanceUID) for ds in found] == [kept]
    viewer = CountingSCP(ae_title="VIEWER").start()
    try:
        assert node.cli("device", "add", "VIEWER", "--ae-title", "VIEWER", "--host",
                        "127.0.0.1", "--port", str(viewer.port)).exit_code == 0
        final_rsp = move(node, "STUDY", destination="VIEWER", StudyInstanceUID=kept)[-1]
        assert int(final_rsp.Status) == 0 and len(viewer.received) == INSTANCES_PER_STUDY
    finally:
        viewer.stop()
    assert wait_for(lambda: any("storage suspended" in m for m in mailbox.messages), 10)
    status = json.loads(node.cli("status", "--json").output)
    assert any(f["suspended"] for f in status["filesystems"])

    (disk / "ballast").unlink()
    # No wait for the next check: a suspended guard measures again at each store.
    again = send_study(node)
    assert held_studies(node) == {kept, again}
    assert wait_for(lambda: any("storage resumed" in m for m in mailbox.messages), 10)
    status = json.loads(node.cli("status", "--json").output)
    assert not any(f["suspended"] for f in status["filesystems"])


def test_the_guard_refuses_before_a_store_would_cross_the_critical_watermark(
        small_fs: Callable[[int], Path],  # noqa: F811  (first: unmounted last)
        make_node: Callable[..., RunningNode]) -> None:
    disk = small_fs(16 * MiB)
    node = make_node(lifecycle(low=50, high=60, critical=80, extra="auto_purge = false"),
                     storage_dir=disk / "storage")
    send_study(node)  # the guard's estimate is now fresh
    # Just below the critical watermark: one small instance fits, a large one would cross it.
    usage = measure(disk)
    fill(disk / "ballast", int(usage.total * 0.79) - usage.used)
    state = node.node.monitor.check()  # type: ignore[union-attr]
    assert not any(f.suspended for f in state.filesystems)
    big = make_instance(size=700)  # about 1 MB: 79% + 6% > 80%
    assert statuses(store(node.port, [big])) == [0xA700]
    assert statuses(store(node.port, [make_instance(size=16)])) == [0]
    with node.db.session() as session:
        assert session.scalar(select(Instance.id).where(
            Instance.sop_instance_uid == str(big.SOPInstanceUID))) is None


def test_a_disk_that_fills_mid_transfer_is_answered_and_loses_nothing(
        small_fs: Callable[[int], Path],  # noqa: F811  (first: unmounted last)
        make_node: Callable[..., RunningNode]) -> None:
    # No watermark to stop it (critical 100%): the disk really runs out while the node writes
    # the incoming data set. The sender gets 0xA700 naming the cause, its association goes on,
    # and what was stored before is intact.
    disk = small_fs(8 * MiB)
    node = make_node(lifecycle(low=100, high=100, critical=100, extra="auto_purge = false"),
                     storage_dir=disk / "storage")
    kept = send_study(node)
    files_before = stored_files(node.storage)
    fill(disk / "ballast", measure(disk).available - 200_000)
    assoc = associate(node.port)
    try:
        failed = assoc.send_c_store(make_instance(size=700))
        assert int(failed.Status) == 0xA700
        assert failed.ErrorComment == "storage write failed: No space left on device"
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        # Nothing of it is left, not even in .incoming (but the next store's empty file, once
        # the earlier stores' kept copies go with their batched directory fsync).
        assert stored_files(node.storage) == files_before
        assert wait_for(lambda: all(p.stat().st_size == 0 for p in incoming_files(node.storage)))
        assert held_studies(node) == {kept}
        # What still fits is stored (the guard measures again after a full disk).
        assert int(assoc.send_c_store(make_instance(size=16)).Status) == 0
        (disk / "ballast").unlink()
        stored = assoc.send_c_store(make_instance(size=700))
        assert int(stored.Status) == 0, stored.get("ErrorComment")
    finally:
        assoc.release()
    assert len(stored_files(node.storage)) == len(files_before) + 2
