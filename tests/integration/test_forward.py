"""Forwarding from a child node to its parent and to DCMTK storescp backup targets."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select

from node.db.models import ForwardJob, Instance
from tests.conftest import RunningNode, dcmtk_env, free_port, wait_for
from tests.destination import CountingSCP, Gauge
from tests.dicomgen import make_instance, write_study
from tests.integration.test_retrieve import body
from tests.scu import statuses, store

FAST = """
[forwarding]
poll_seconds = 0.1
retry_base_seconds = 0.2
retry_max_seconds = 1
heartbeat_interval = 0.5
heartbeat_idle_seconds = 30
"""


def jobs(node: RunningNode) -> list[ForwardJob]:
    with node.db.session() as session:
        return list(session.scalars(select(ForwardJob).order_by(ForwardJob.id)))


def instances(node: RunningNode) -> dict[str, str]:
    with node.db.session() as session:
        return {i.sop_instance_uid: i.path for i in session.scalars(select(Instance))}


def test_child_forwards_to_parent_byte_identical(make_node: object, tmp_path) -> None:
    parent = make_node(FAST, name="parent")  # type: ignore[operator]
    child = make_node(FAST, name="child")  # type: ignore[operator]
    assert child.cli("device", "add", "PARENT", "--ae-title", "PACSNODE", "--type", "PARENT",
                     "--host", "127.0.0.1", "--port", str(parent.port)).exit_code == 0
    files = write_study(tmp_path / "in", 5)
    assert statuses(store(child.port, files)) == [0] * 5
    assert len(jobs(child)) == 5  # queued in the transaction that indexed them
    assert wait_for(lambda: all(j.state == "done" for j in jobs(child)), timeout=20)
    at_parent, at_child = instances(parent), instances(child)
    assert set(at_parent) == set(at_child)
    for sop, path in at_child.items():
        assert body(parent.storage / at_parent[sop]) == body(child.storage / path)
    listed = json.loads(child.cli("queue", "list", "--json", "--state", "done").output)
    assert len(listed) == 5


def backup(node: RunningNode, dest: CountingSCP, name: str = "BACKUP", *options: str) -> None:
    result = node.cli("device", "add", name, "--ae-title", dest.ae_title, "--type",
                      "BACKUP_TARGET", "--host", "127.0.0.1", "--port", str(dest.port), *options)
    assert result.exit_code == 0, result.output


def all_done(node: RunningNode, count: int) -> bool:
    states = [j.state for j in jobs(node)]
    return len(states) == count and all(s == "done" for s in states)


def test_heartbeat_association_is_reused_across_studies(make_node: object) -> None:
    node = make_node(FAST)  # type: ignore[operator]
    dest = CountingSCP().start()
    try:
        backup(node, dest)
        for study in range(3):
            assert statuses(store(node.port, [make_instance() for _ in range(2)])) == [0, 0]
            assert wait_for(lambda n=2 * (study + 1): all_done(node, n), timeout=20)
        assert dest.associations == 1
        assert wait_for(lambda: dest.echoes >= 1, timeout=5)  # kept alive while idle
        assert sorted(dest.received) == sorted(set(dest.received)) and len(dest.received) == 6
    finally:
        dest.stop()


def test_a_backlog_opens_a_second_association_by_default_and_never_a_third(
        make_node: object) -> None:
    node = make_node(FAST + "batch_size = 2\n")  # type: ignore[operator]
    dest = CountingSCP(delay=0.05).start()  # slower than the stores arrive
    try:
        backup(node, dest)  # no --max-tasks: the default
        assert statuses(store(node.port, [make_instance() for _ in range(16)])) == [0] * 16
        assert wait_for(lambda: all_done(node, 16), timeout=60)
        assert dest.max_open == 2
        assert sorted(dest.received) == sorted(set(dest.received)) and len(dest.received) == 16
    finally:
        dest.stop()


def test_without_heartbeat_each_batch_has_its_own_association(make_node: object) -> None:
    node = make_node(FAST)  # type: ignore[operator]
    dest = CountingSCP().start()
    try:
        backup(node, dest, "BACKUP", "--heartbeat", "off")
        for study in range(2):
            assert statuses(store(node.port, [make_instance()])) == [0]
            assert wait_for(lambda n=study + 1: all_done(node, n), timeout=20)
        assert dest.associations == 2
        assert dest.open == 0  # released after the batch
    finally:
        dest.stop()


def test_destination_down_then_back_everything_arrives_once(make_node: object, dcmtk,
                                                             tmp_path) -> None:
    node = make_node(FAST)  # type: ignore[operator]
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    assert node.cli("device", "add", "STORESCP", "--type", "BACKUP_TARGET", "--host",
                    "127.0.0.1", "--port", str(port)).exit_code == 0
    sent = [make_instance(size=256) for _ in range(30)]
    assert set(statuses(store(node.port, sent))) == {0}
    assert wait_for(lambda: any(j.attempts > 0 for j in jobs(node)), timeout=10)
    assert "cannot associate" in jobs(node)[0].last_error

    def storescp() -> subprocess.Popen[bytes]:
        return subprocess.Popen([str(dcmtk / "storescp"), "-aet", "STORESCP", "-od",
                                 str(received), str(port)], env=dcmtk_env())

    scp = storescp()
    # Stopped in the middle of the transfer, then started again.
    assert wait_for(lambda: len(list(received.iterdir())) >= 3, timeout=20)
    scp.kill()
    scp.wait()
    time.sleep(1)
    scp = storescp()
    try:
        assert wait_for(lambda: all_done(node, 30), timeout=60)
    finally:
        scp.terminate()
        scp.wait()
    arrived = {p.name.split(".", 1)[1] for p in received.iterdir()}
    assert arrived == {ds.SOPInstanceUID for ds in sent}  # every one, each once on disk


def test_task_and_category_limits(make_node: object) -> None:
    node = make_node(FAST + "batch_size = 2\nworkers = 8\n")  # type: ignore[operator]
    gauge = Gauge()  # both destinations: the category's open associations
    one = CountingSCP("ONE", delay=0.05, gauge=gauge).start()
    two = CountingSCP("TWO", delay=0.05, gauge=gauge).start()
    try:
        backup(node, one, "ONE", "--max-tasks", "3")
        assert statuses(store(node.port, [make_instance() for _ in range(24)])) == [0] * 24
        assert wait_for(lambda: all_done(node, 24), timeout=60)
        assert one.max_open == 3  # the device's limit was used and never exceeded

        assert node.cli("category", "add", "SHARED", "--max-connections", "2").exit_code == 0
        assert node.cli("device", "edit", "ONE", "--category", "SHARED").exit_code == 0
        backup(node, two, "TWO", "--max-tasks", "3", "--category", "SHARED")
        assert statuses(store(node.port, [make_instance()])) == [0]  # sheds ONE's extra one
        assert wait_for(lambda: all_done(node, 24 + 2), timeout=30)
        gauge.peak = gauge.value
        assert gauge.value <= 2
        assert statuses(store(node.port, [make_instance() for _ in range(24)])) == [0] * 24
        assert wait_for(lambda: all_done(node, 26 + 48), timeout=90)
        assert gauge.peak == 2  # the category's limit was used and never exceeded
        assert len(two.received) == 25
    finally:
        one.stop()
        two.stop()


def test_routing_rules_private_tags_and_no_duplicate_jobs(make_node: object) -> None:
    node = make_node(FAST)  # type: ignore[operator]
    plain, mr_only = CountingSCP("PLAIN").start(), CountingSCP("MRONLY").start()
    try:
        backup(node, plain, "PLAIN", "--remove-private-tags", "on")
        backup(node, mr_only, "MRONLY", "--forward-rule", "modality MR")
        assert node.cli("device", "add", "WS", "--type", "VIEWER", "--host", "127.0.0.1",
                        "--port", str(free_port())).exit_code == 0  # no rules: nothing
        ct, mr = make_instance(modality="CT"), make_instance(modality="MR")
        ct.add_new(0x00091010, "LO", "SECRET")
        assert statuses(store(node.port, [ct, mr, ct])) == [0, 0, 0]  # ct twice: duplicate
        assert wait_for(lambda: all_done(node, 3), timeout=20)
        assert sorted(plain.received) == sorted([ct.SOPInstanceUID, mr.SOPInstanceUID])
        assert mr_only.received == [mr.SOPInstanceUID]
        assert (0x0009, 0x1010) not in plain.datasets[ct.SOPInstanceUID]
        # A partition with forwarding off queues nothing.
        assert node.cli("partition", "edit", "PACSNODE", "--no-forwarding").exit_code == 0
        assert statuses(store(node.port, [make_instance(modality="MR")])) == [0]
        assert len(jobs(node)) == 3
    finally:
        plain.stop()
        mr_only.stop()


def test_send_updates_off_skips_new_instances_of_a_sent_study(make_node: object) -> None:
    node = make_node(FAST)  # type: ignore[operator]
    dest = CountingSCP().start()
    try:
        backup(node, dest, "BACKUP", "--send-updates", "off")
        first = make_instance()
        assert statuses(store(node.port, [first])) == [0]
        assert wait_for(lambda: all_done(node, 1), timeout=20)
        later = make_instance(study_uid=first.StudyInstanceUID)
        other_study = make_instance()
        assert statuses(store(node.port, [later, other_study])) == [0, 0]
        assert wait_for(lambda: all_done(node, 2), timeout=20)
        assert sorted(dest.received) == sorted([first.SOPInstanceUID,
                                                other_study.SOPInstanceUID])
    finally:
        dest.stop()


def test_queue_cli_retry_cancel_stats(make_node: object) -> None:
    node = make_node(FAST.replace("retry_base_seconds = 0.2", "retry_base_seconds = 60"))  # type: ignore[operator]
    port = free_port()
    assert node.cli("device", "add", "DOWN", "--type", "PARENT", "--host", "127.0.0.1",
                    "--port", str(port)).exit_code == 0
    assert statuses(store(node.port, [make_instance() for _ in range(3)])) == [0] * 3
    assert wait_for(lambda: all(j.attempts == 1 for j in jobs(node)), timeout=10)
    stats = json.loads(node.cli("queue", "stats", "--json").output)
    assert stats == [{"device": "DOWN", "pending": 3}]
    first = jobs(node)[0].id
    shown = json.loads(node.cli("queue", "show", str(first), "--json").output)
    assert shown["attempts"] == 1 and "cannot associate" in shown["last_error"]
    assert "3 job(s) cancelled" in node.cli("queue", "cancel", "--device", "DOWN").output
    assert {j.state for j in jobs(node)} == {"cancelled"}
    assert node.cli("queue", "stats", "--follow").exit_code == 0  # nothing waits: returns
    dest = CountingSCP(port=port).start()
    try:
        assert "1 job(s) queued again" in node.cli("queue", "retry", str(first)).output
        assert wait_for(lambda: len(dest.received) == 1, timeout=20)
        assert node.cli("queue", "retry", "--device", "DOWN").exit_code == 0
        assert wait_for(lambda: all_done(node, 3), timeout=20)
    finally:
        dest.stop()


def test_refresh_ip_reports_and_stores_changes(node: RunningNode) -> None:
    assert node.cli("device", "add", "BYNAME", "--host", "localhost").exit_code == 0
    with node.db.transaction() as session:
        from node.db.models import Device

        session.scalars(select(Device)).one().ip = "192.0.2.1"  # as if it had moved
    result = node.cli("refresh-ip", "--json")
    assert json.loads(result.output) == [{"device": "BYNAME", "host": "localhost",
                                          "old": "192.0.2.1", "new": "127.0.0.1"}]
    assert json.loads(node.cli("refresh-ip", "--json").output) == []


def test_refused_syntax_fails_with_a_clear_error(make_node: object) -> None:
    node = make_node(FAST)  # type: ignore[operator]
    dest = CountingSCP().start()  # accepts Explicit/Implicit VR Little Endian only
    try:
        backup(node, dest)
        j2k = Path(get_testdata_file("JPEG2000.dcm"))  # type: ignore[arg-type]
        explicit = make_instance()
        assert statuses(store(node.port, [j2k], syntaxes=["1.2.840.10008.1.2.4.91"])) == [0]
        assert statuses(store(node.port, [explicit])) == [0]
        assert wait_for(lambda: {j.state for j in jobs(node)} <= {"done", "failed"}
                        and len(jobs(node)) == 2, timeout=20)
        by_state = {j.state: j for j in jobs(node)}
        assert dest.received == [explicit.SOPInstanceUID]
        # pydicom here has no JPEG 2000 decoder: the job fails at once, saying why.
        failed = by_state["failed"]
        assert failed.attempts == 1
        assert "accepts no context" in failed.last_error and "1.2.840.10008.1.2.4.91" in \
            failed.last_error
    finally:
        dest.stop()


def test_jobs_fail_after_max_attempts_and_idle_associations_are_released(
        make_node: object) -> None:
    node = make_node(FAST.replace("heartbeat_idle_seconds = 30", "heartbeat_idle_seconds = 1")
                     + "max_attempts = 2\n")  # type: ignore[operator]
    down = free_port()
    assert node.cli("device", "add", "GONE", "--type", "BACKUP_TARGET", "--host", "127.0.0.1",
                    "--port", str(down)).exit_code == 0
    dest = CountingSCP().start()
    try:
        backup(node, dest)
        assert statuses(store(node.port, [make_instance()])) == [0]
        assert wait_for(lambda: sorted(j.state for j in jobs(node)) == ["done", "failed"],
                        timeout=20)
        failed = next(j for j in jobs(node) if j.state == "failed")
        assert failed.attempts == 2 and "cannot associate" in failed.last_error
        # Idle past heartbeat_idle_seconds: released (not aborted) by the node.
        assert wait_for(lambda: dest.open == 0, timeout=10)
        assert dest.associations == 1
    finally:
        dest.stop()


def test_concurrent_claims_never_take_the_same_job(node: RunningNode) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from node.forwarding import queue

    assert node.cli("device", "add", "NOWHERE", "--type", "BACKUP_TARGET", "--host",
                    "127.0.0.1", "--port", str(free_port()), "--no-forward").exit_code == 0
    assert statuses(store(node.port, [make_instance() for _ in range(40)])) == [0] * 40
    with node.db.transaction() as session:
        from node.db.models import Device

        device = session.scalars(select(Device)).one()
        for instance_pk in session.scalars(select(Instance.id)):
            session.add(ForwardJob(partition_id=1, instance_pk=instance_pk,
                                   device_id=device.id, study_instance_uid="1.2"))
        device_id = device.id
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda n: queue.claim(node.db, device_id, 7, f"w{n}", 600,
                                                      node.storage), range(8)))
    claimed = [job.id for batch in claims for job in batch]
    assert len(claimed) == len(set(claimed)) == 40


def test_refused_syntax_is_decompressed_when_pydicom_can(make_node: object) -> None:
    node = make_node(FAST)  # type: ignore[operator]
    dest = CountingSCP().start()  # uncompressed only
    try:
        backup(node, dest)
        rle = Path(get_testdata_file("MR_small_RLE.dcm"))  # type: ignore[arg-type]
        assert statuses(store(node.port, [rle], syntaxes=["1.2.840.10008.1.2.5"])) == [0]
        assert wait_for(lambda: all_done(node, 1), timeout=20)
        [received] = dest.datasets.values()
        original = dcmread(rle)
        assert received.SOPInstanceUID == original.SOPInstanceUID  # the same instance
        original.decompress()
        assert received.PixelData == original.PixelData  # sent in a syntax the peer accepts
    finally:
        dest.stop()
