"""The control plane between real nodes on loopback (in this process, real gRPC and DICOM):
registration, liveness, forwarding through the PARENT entry, device sync, recollect, C-MOVE to
an AE at another site, health checking and mutual TLS."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
from sqlalchemy import select, text

from hierarchy import neighbours, plane
from hierarchy.rpc import control_pb2 as pb
from hierarchy.rpc import control_pb2_grpc as rpc
from hierarchy.servicer import collect_from
from node import devices as device_table
from node.db.models import Device, DeviceChange, DeviceType, DirectoryNode, Instance
from tests.certs import make_ca
from tests.conftest import RunningNode, free_port, wait_for
from tests.dicomgen import make_instance
from tests.scu import identifier, statuses, store
from tests.tlsnode import Pki, pki_fixture, tls_section  # noqa: F401 (fixture)

FAST = "heartbeat_seconds = 0.3\nsync_seconds = 0.2\nrpc_timeout = 2\nrecollect_timeout = 6\n"
Start = Callable[..., RunningNode]


def child_of(parent: RunningNode, extra: str = "") -> str:
    return f'{FAST}parent = "{parent.control}"\n{extra}'


def stub(node: RunningNode) -> rpc.ControlStub:
    return rpc.ControlStub(grpc.insecure_channel(node.control))


def devices(node: RunningNode) -> dict[str, Device]:
    with node.db.session() as session:
        rows = {d.name: d for d in session.scalars(select(Device))}
        session.expunge_all()
    return rows


def registered(child: RunningNode, parent: RunningNode) -> bool:
    with child.db.session() as s:
        up = neighbours.parent(s)
    with parent.db.session() as s:
        down = neighbours.get(s, child.settings.node_id)
    return up is not None and down is not None


def recollect(node: RunningNode) -> dict[str, dict[str, object]]:
    """`pacsnode recollect --json` at `node`: each listed node's entry by node id."""
    result = node.cli("recollect", "--json")
    assert result.exit_code == 0, result.output
    return {n["node"]["node_id"]: n for n in json.loads(result.output)["nodes"]}


def test_registration_creates_parent_and_child_entries_and_forwarding_uses_them(
        make_node: Start) -> None:
    root = make_node(name="central", ae_title="CENTRAL", hierarchy=FAST + 'site = "HQ"')
    site = make_node(name="site-a", ae_title="SITEA", hierarchy=child_of(root, 'site = "A"'))
    assert wait_for(lambda: registered(site, root), 10)

    parent_entry = devices(site)["central"]
    assert (parent_entry.device_type, parent_entry.ae_title, parent_entry.port,
            parent_entry.ip, parent_entry.neighbour_id) == (
        DeviceType.PARENT, "CENTRAL", root.port, "127.0.0.1", "central")
    child_entry = devices(root)["site-a"]
    assert (child_entry.device_type, child_entry.ae_title, child_entry.port) == (
        DeviceType.CHILD, "SITEA", site.port)

    # An instance stored at the site is forwarded to the centre through that PARENT entry,
    # and the centre admits it as coming from its CHILD.
    ds = make_instance()
    assert statuses(store(site.port, [ds], called="SITEA", calling="MODALITY")) == [0]

    def at_root() -> bool:
        with root.db.session() as s:
            return s.scalar(select(Instance.calling_ae_title).where(
                Instance.sop_instance_uid == ds.SOPInstanceUID)) == "SITEA"
    assert wait_for(at_root, 15)

    info = stub(root).GetNodeInfo(pb.GetNodeInfoRequest(), timeout=5)
    assert info.node.node_id == "central" and info.node.role == "root"
    assert list(info.children) == ["site-a"]
    assert [p.ae_title for p in info.node.partitions] == ["CENTRAL"]


def test_liveness_follows_heartbeats(make_node: Start) -> None:
    root = make_node(name="root", hierarchy=FAST)
    leaf = make_node(name="leaf", hierarchy=child_of(root))
    assert wait_for(lambda: registered(leaf, root), 10)

    def child_alive() -> bool:
        with root.db.session() as s:
            n = neighbours.get(s, "leaf")
            return n is not None and neighbours.alive(n)

    assert child_alive()
    beat = stub(root).Heartbeat(pb.HeartbeatRequest(node_id="leaf", queue_depth=7), timeout=5)
    assert beat.known and beat.parent_id == "root"
    unknown = stub(root).Heartbeat(pb.HeartbeatRequest(node_id="stranger"), timeout=5)
    assert not unknown.known  # the child registers again

    leaf.node.stop()
    # Three missed heartbeats (0.3 s each): the child is no longer alive; nothing is deleted.
    assert wait_for(lambda: not child_alive(), 5)
    assert "leaf" in devices(root)

    # The other way: the child sees its parent unreachable, with the reason.
    leaf2 = make_node(name="leaf2", hierarchy=child_of(root))
    assert wait_for(lambda: registered(leaf2, root), 10)
    root.node.stop()

    def parent_down() -> str:
        with leaf2.db.session() as s:
            n = neighbours.parent(s)
            return "" if n is None or n.reachable else n.last_error
    assert wait_for(parent_down, 5)
    assert "UNAVAILABLE" in parent_down()

    # What the child stores meanwhile waits in its queue, and status shows it.
    assert statuses(store(leaf2.port, [make_instance()], calling="MODALITY")) == [0]
    status = {e["node"]["node_id"]: e for e in
              json.loads(leaf2.cli("hierarchy", "status", "--json").output)}
    assert not status["root"]["reachable"] and "UNAVAILABLE" in status["root"]["error"]
    assert status["leaf2"]["reachable"] and int(status["leaf2"]["queue_depth"]) == 1
    queue = json.loads(leaf2.cli("hierarchy", "queue", "--json").output)
    assert queue["node_id"] == "leaf2"
    assert [(d["device"], int(d["pending"]) + int(d["sending"]))
            for d in queue["destinations"]] == [("root", 1)]
    neighbours_out = json.loads(leaf2.cli("hierarchy", "neighbours", "--json").output)
    assert [(n["node_id"], n["role"], n["alive"]) for n in neighbours_out["neighbours"]] == [
        ("root", "parent", False)]


def test_register_refuses_a_duplicate_node_id(make_node: Start) -> None:
    root = make_node(name="root", hierarchy=FAST)
    same = pb.NodeInfo(node_id="root", control_address="127.0.0.1:1")
    with pytest.raises(grpc.RpcError) as caught:
        stub(root).Register(pb.RegisterRequest(child=same), timeout=5)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "unique" in caught.value.details()


def test_device_changes_travel_the_tree_and_do_not_loop(make_node: Start) -> None:
    root = make_node(name="root", hierarchy=FAST)
    mid = make_node(name="mid", hierarchy=child_of(root))
    leaf = make_node(name="leaf", hierarchy=child_of(mid))
    other = make_node(name="other", hierarchy=child_of(root))
    nodes = [root, mid, leaf, other]
    assert wait_for(lambda: registered(mid, root) and registered(leaf, mid)
                    and registered(other, root), 10)

    result = leaf.cli("device", "add", "VIEWER1", "--host", "localhost", "--port", "4242",
                      "--type", "VIEWER", "--scope", "hierarchy", "--description", "reading room")
    assert result.exit_code == 0, result.output
    leaf.cli("device", "add", "LOCALONLY", "--host", "127.0.0.1")

    def everywhere(name: str, check: Callable[[Device], bool]) -> bool:
        return all(name in devices(n) and check(devices(n)[name]) for n in nodes)

    assert wait_for(lambda: everywhere("VIEWER1", lambda d: d.port == 4242), 10)
    d = devices(other)["VIEWER1"]
    assert (d.device_type, d.scope, d.origin_node, d.ip, d.description) == (
        "VIEWER", "hierarchy", "leaf", "127.0.0.1", "reading room")
    assert all("LOCALONLY" not in devices(n) for n in nodes[:-1] if n is not leaf)

    # An edit at the far side comes back down; a delete is a tombstone everywhere.
    assert other.cli("device", "edit", "VIEWER1", "--port", "5555").exit_code == 0
    assert wait_for(lambda: everywhere("VIEWER1", lambda d: d.port == 5555), 10)
    assert root.cli("device", "delete", "VIEWER1").exit_code == 0
    assert wait_for(lambda: all("VIEWER1" not in devices(n) for n in nodes), 10)
    records = [json.loads(n.cli("hierarchy", "records", "--json").output) for n in nodes]
    assert all(r == records[0] for r in records)
    assert records[0][0]["deleted"] is True

    # No loop: each node logged each version once (3 versions: add, edit, delete).
    for n in nodes:
        with n.db.session() as s:
            logged = s.scalars(select(DeviceChange.version)
                               .where(DeviceChange.name == "VIEWER1")).all()
        assert len(logged) == len(set(logged)) == 3, (n.settings.node_id, logged)


def test_a_change_made_with_the_cli_leaves_without_waiting_for_sync_seconds(
        make_node: Start) -> None:
    """The CLI commits straight to the database, so nothing wakes the running node: it
    notices the change log grow (a cheap poll) and pushes at once, not a sync interval later;
    what it receives it passes on at once too."""
    slow = FAST.replace("sync_seconds = 0.2", "sync_seconds = 60")
    root = make_node(name="root", hierarchy=slow)
    leaf = make_node(name="leaf", hierarchy=f'{slow}parent = "{root.control}"\n')
    other = make_node(name="other", hierarchy=f'{slow}parent = "{root.control}"\n')
    assert wait_for(lambda: registered(leaf, root) and registered(other, root), 10)
    time.sleep(0.5)  # the first rounds (new neighbours get the current state) are over
    added = leaf.cli("device", "add", "QUICK", "--host", "127.0.0.1", "--scope", "hierarchy")
    assert added.exit_code == 0, added.output
    assert wait_for(lambda: "QUICK" in devices(other), 5)  # two hops, well within 60 s


def test_a_neighbour_far_behind_does_not_hold_up_the_others(
        make_node: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pushes go in batches of PUSH_BATCH changes; while one child is down and falls further
    and further behind, the other still gets every change."""
    monkeypatch.setattr(plane, "PUSH_BATCH", 3)
    root = make_node(name="root", hierarchy=FAST)
    up = make_node(name="up", hierarchy=child_of(root))
    down = make_node(name="down", hierarchy=child_of(root))
    assert wait_for(lambda: registered(up, root) and registered(down, root), 10)
    with root.db.transaction() as session:  # past the first push (the current state)
        device_table.add(session, name="FIRST", ae_title="FIRST", scope="hierarchy")
    assert wait_for(lambda: "FIRST" in devices(up) and "FIRST" in devices(down), 10)
    down.node.stop()
    with root.db.transaction() as session:
        for i in range(8):
            device_table.add(session, name=f"D{i}", ae_title=f"D{i}", scope="hierarchy")
    assert wait_for(lambda: {f"D{i}" for i in range(8)} <= set(devices(up)), 10)


def test_recollect_batches_entries_only_for_a_caller_that_asks(make_node: Start) -> None:
    root = make_node(name="root", hierarchy=FAST)
    kids = [make_node(name=f"kid{i}", hierarchy=child_of(root)) for i in range(3)]
    assert wait_for(lambda: all(registered(k, root) for k in kids), 10)
    for batched in (False, True):
        events = list(stub(kids[0]).Recollect(pb.RecollectRequest(batched=batched),
                                              timeout=10))
        kinds = {event.WhichOneof("event") for event in events[:-1]}
        assert kinds == ({"entries"} if batched else {"entry"}), kinds
        listed = [e.node.node_id for event in events[:-1]
                  for e in (event.entries.entries if batched else [event.entry])]
        assert sorted(listed) == ["kid0", "kid1", "kid2", "root"]
        assert events[-1].done.published == 4


@contextlib.contextmanager
def another_writer(node: RunningNode) -> Iterator[None]:
    """Another writer, as the CLI would be, holding `node`'s directory tables: on SQLite the
    writers' queue (the file lock every writer of the database takes first), on PostgreSQL
    the table."""
    if node.db.is_sqlite:
        lock = os.open(f"{node.db.engine.url.database}.writer-lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)
        return
    with node.db.engine.connect() as other, other.begin():
        other.execute(text(f"LOCK TABLE {DirectoryNode.__tablename__} IN EXCLUSIVE MODE"))
        yield


def test_a_store_slower_than_the_recollect_can_wait_is_reported_and_still_completes(
        make_node: Start, caplog: pytest.LogCaptureFixture) -> None:
    root = make_node(name="root", hierarchy=FAST)
    kid = make_node(name="kid", hierarchy=child_of(root))
    assert wait_for(lambda: registered(kid, root), 10)
    # Another writer holds the kid's directory while it is published.
    with another_writer(kid), caplog.at_level(logging.WARNING, logger="hierarchy.servicer"):
        answer = stub(kid).PublishDirectory(pb.PublishDirectoryRequest(
            root_id="root", entries=[directory_entry("root"), directory_entry("kid")]),
            timeout=1.0)
    # The lock is released: the store goes on.
    assert answer.stored == 0
    assert any("storing the directory from root here took longer than the 0.9 s" in r.message
               and "not counted as published" in r.message for r in caplog.records), \
        [r.message for r in caplog.records]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    def stored() -> set[str]:
        return {r["node_id"] for r in json.loads(
            kid.cli("hierarchy", "directory", "--json").output)}

    assert wait_for(lambda: stored() == {"root", "kid"}, 10)


class OldNode(rpc.ControlServicer):
    """A node from before CollectSubtreeBatches: it answers CollectSubtree only."""

    def CollectSubtree(self, request: pb.CollectSubtreeRequest, context: grpc.ServicerContext
                       ) -> Iterator[pb.DirectoryEntry]:
        yield directory_entry("old")
        yield directory_entry("old-child")


def test_a_child_that_cannot_batch_is_collected_one_entry_at_a_time() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_ControlServicer_to_server(OldNode(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            batches = list(collect_from(rpc.ControlStub(channel), pb.CollectSubtreeRequest(),
                                        5.0))
    finally:
        server.stop(None)
    assert [[e.node.node_id for e in batch] for batch in batches] == [["old"], ["old-child"]]


def test_recollect_stores_the_directory_everywhere_and_c_move_resolves_through_it(
        make_node: Start, tmp_path: Path, pki: Pki) -> None:
    root = make_node(name="root", ae_title="ROOT", hierarchy=FAST)
    west = make_node(name="west", ae_title="WEST", hierarchy=child_of(root),
                     extra=tls_section(pki))
    east = make_node(name="east", ae_title="EAST", hierarchy=child_of(root))
    assert wait_for(lambda: registered(west, root) and registered(east, root), 10)
    # A TLS port opened on a running child reaches the directory.
    west_tls = free_port()
    edited = west.cli("partition", "edit", "WEST", "--tls-port", str(west_tls))
    assert edited.exit_code == 0, edited.output

    def west_listed_with_tls() -> bool:
        result = east.cli("recollect", "--json")
        assert result.exit_code == 0, result.output
        answer.update(json.loads(result.output))
        found.update({n["node"]["node_id"]: n for n in answer["nodes"]})
        return found["west"]["node"]["partitions"][0]["tls_port"] == west_tls

    answer: dict = {}
    found: dict = {}
    assert wait_for(west_listed_with_tls, 10), found.get("west")
    assert answer["root_id"] == "root" and answer["published"] == 3
    assert set(found) == {"root", "west", "east"}
    assert found["west"]["node"]["partitions"][0] == {
        "ae_title": "WEST", "port": west.port, "tls_port": west_tls, "enabled": True}
    assert found["west"]["node"]["parent_id"] == "root"
    for n in (root, west, east):
        stored = json.loads(n.cli("hierarchy", "directory", "--json").output)
        assert {r["node_id"] for r in stored} == {"root", "west", "east"}
        exported = json.loads((n.settings.data_dir / "dotcom.json").read_text())
        assert exported["nodes"] == stored

    # Any node's queue, asked through the directory.
    remote = east.cli("hierarchy", "queue", "west", "--json")
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.output)["node_id"] == "west"
    unknown = east.cli("hierarchy", "queue", "nowhere")
    assert unknown.exit_code == 1 and "run pacsnode recollect" in unknown.output

    # WEST is not in east's device table, but the directory says where it is: a C-MOVE at
    # east with destination WEST sends there.
    assert "west" not in devices(east)
    ds = make_instance()
    assert statuses(store(east.port, [ds], called="EAST", calling="MODALITY")) == [0]
    ae = AE(ae_title="WEST")  # our own stand-in: the move must reach the real WEST node
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", east.port, ae_title="EAST")
    assert assoc.is_established
    try:
        query = identifier("STUDY", {"StudyInstanceUID": ds.StudyInstanceUID})
        results = [status.Status for status, _ in assoc.send_c_move(
            query, "WEST", StudyRootQueryRetrieveInformationModelMove) if status]
    finally:
        assoc.release()
    assert results[-1] == 0x0000

    def at_west() -> bool:
        with west.db.session() as s:
            return s.scalar(select(Instance.id).where(
                Instance.sop_instance_uid == ds.SOPInstanceUID)) is not None
    assert wait_for(at_west, 10)


def test_recollect_marks_a_stopped_node_unreachable_within_the_timeout(
        make_node: Start) -> None:
    root = make_node(name="root", hierarchy=FAST)
    a = make_node(name="a", hierarchy=child_of(root))
    b = make_node(name="b", hierarchy=child_of(root))
    assert wait_for(lambda: registered(a, root) and registered(b, root), 10)
    assert root.cli("recollect").exit_code == 0
    b.node.stop()
    found = recollect(a)
    assert found["a"]["reachable"] and found["root"]["reachable"]
    assert not found["b"]["reachable"] and "UNAVAILABLE" in found["b"]["error"]
    stored = {r["node_id"]: r for r in json.loads(a.cli("hierarchy", "directory",
                                                         "--json").output)}
    assert not stored["b"]["reachable"]

    status = json.loads(a.cli("hierarchy", "status", "--json").output)
    assert {e["node"]["node_id"]: e["reachable"] for e in status} == {
        "root": True, "a": True, "b": False}


def test_nodes_below_a_silent_node_are_listed_as_not_reached(make_node: Start) -> None:
    root = make_node(name="root", hierarchy=FAST)
    mid = make_node(name="mid", hierarchy=child_of(root))
    leaf = make_node(name="leaf", hierarchy=child_of(mid))
    assert wait_for(lambda: registered(mid, root) and registered(leaf, mid), 10)
    assert root.cli("recollect").exit_code == 0
    mid.node.stop()
    found = recollect(root)
    assert set(found) == {"root", "mid", "leaf"}
    assert not found["mid"]["reachable"] and "UNAVAILABLE" in found["mid"]["error"]
    assert not found["leaf"]["reachable"] and "not reached" in found["leaf"]["error"]
    assert found["leaf"]["node"]["partitions"][0]["port"] == leaf.port
    # The leaf itself still has the directory from before; the root's is the new one.
    stored = {r["node_id"]: r for r in json.loads(root.cli("hierarchy", "directory",
                                                            "--json").output)}
    assert not stored["leaf"]["reachable"]


def test_refresh_ip_across_the_tree_reports_each_node(make_node: Start) -> None:
    root = make_node(name="root", hierarchy=FAST)
    leaf = make_node(name="leaf", hierarchy=child_of(root))
    assert wait_for(lambda: registered(leaf, root), 10)
    leaf.cli("device", "add", "BYNAME", "--host", "localhost")
    with leaf.db.transaction() as s:  # as if the name had pointed elsewhere before
        s.scalar(select(Device).where(Device.name == "BYNAME")).ip = "10.9.9.9"
    result = root.cli("refresh-ip", "--hierarchy", "--json")
    assert result.exit_code == 0, result.output
    reports = {r["node_id"]: r for r in json.loads(result.output)}
    assert set(reports) == {"root", "leaf"}
    assert reports["leaf"]["changes"] == [{"device": "BYNAME", "host": "localhost",
                                           "old_ip": "10.9.9.9", "new_ip": "127.0.0.1"}]
    assert devices(leaf)["BYNAME"].ip == "127.0.0.1"


def test_health_service_and_cli_without_a_running_node(make_node: Start, tmp_path: Path) -> None:
    root = make_node(name="root", hierarchy=FAST)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(root.control))
    for service in ("", "pacsnode.control.v1.Control"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    root.node.stop()
    result = root.cli("recollect")
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.output and "pacsnode serve" in result.output


def tls_lines(ca: Path, cert: Path, key: Path) -> str:
    return f'tls_ca = "{ca}"\ntls_cert = "{cert}"\ntls_key = "{key}"\n'


def test_mutual_tls_registers_children_and_refuses_strangers(make_node: Start,
                                                            tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki", "hospital")
    rogue_ca = make_ca(tmp_path / "rogue", "rogue")
    root_id = ca.issue(tmp_path / "pki", "root")
    site_id = ca.issue(tmp_path / "pki", "site")
    stranger = rogue_ca.issue(tmp_path / "rogue", "stranger")
    root = make_node(name="root", hierarchy=FAST + tls_lines(ca.path, root_id.cert, root_id.key))
    site = make_node(name="site", hierarchy=child_of(root, tls_lines(ca.path, site_id.cert,
                                                                      site_id.key)))
    assert wait_for(lambda: registered(site, root), 10)
    assert site.cli("recollect").exit_code == 0  # the CLI presents the node's certificate

    ca_pem = ca.path.read_bytes()
    request = pb.GetNodeInfoRequest()

    def call(channel: grpc.Channel) -> grpc.StatusCode:
        try:
            rpc.ControlStub(channel).GetNodeInfo(request, timeout=5)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    good = grpc.ssl_channel_credentials(ca_pem, site_id.key.read_bytes(),
                                        site_id.cert.read_bytes())
    assert call(grpc.secure_channel(root.control, good)) == grpc.StatusCode.OK
    # No TLS at all, TLS without a client certificate, a certificate from another CA.
    assert call(grpc.insecure_channel(root.control)) == grpc.StatusCode.UNAVAILABLE
    no_cert = grpc.ssl_channel_credentials(ca_pem)
    assert call(grpc.secure_channel(root.control, no_cert)) == grpc.StatusCode.UNAVAILABLE
    wrong = grpc.ssl_channel_credentials(ca_pem, stranger.key.read_bytes(),
                                         stranger.cert.read_bytes())
    assert call(grpc.secure_channel(root.control, wrong)) == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_cannot_act_for_another_node(make_node: Start, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    ca = make_ca(tmp_path / "pki", "hospital")
    root_id = ca.issue(tmp_path / "pki", "root")
    site_id = ca.issue(tmp_path / "pki", "site")
    other_id = ca.issue(tmp_path / "pki", "other")  # a genuine node of the tree, not "site"
    root = make_node(name="root", hierarchy=FAST + tls_lines(ca.path, root_id.cert, root_id.key))
    site = make_node(name="site", hierarchy=child_of(root, tls_lines(ca.path, site_id.cert,
                                                                      site_id.key)))
    assert wait_for(lambda: registered(site, root), 10)

    credentials = grpc.ssl_channel_credentials(
        ca.path.read_bytes(), other_id.key.read_bytes(), other_id.cert.read_bytes())
    other_at_root = rpc.ControlStub(grpc.secure_channel(root.control, credentials))
    other_at_site = rpc.ControlStub(grpc.secure_channel(site.control, credentials))

    def refused(call: Callable[[], object]) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        return caught.value

    # Any node's certificate may read...
    assert other_at_root.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=5).node.node_id == "root"
    assert other_at_root.QueueStatus(pb.QueueStatusRequest(), timeout=5).node_id == "root"
    # ... but not speak for "site".
    impostor = pb.NodeInfo(node_id="site", control_address="127.0.0.1:1")
    record = pb.DeviceRecord(name="EVIL", origin_node="site", version="9999999999999.000000.site",
                             payload_json='{"ae_title": "EVIL", "host": "10.6.6.6"}')
    caplog.set_level(logging.WARNING, logger="hierarchy.authz")
    for call in (
            lambda: other_at_root.Register(pb.RegisterRequest(child=impostor), timeout=5),
            lambda: other_at_root.Heartbeat(pb.HeartbeatRequest(node_id="site"), timeout=5),
            lambda: other_at_root.PushDeviceChanges(pb.PushDeviceChangesRequest(
                from_node="site", records=[record]), timeout=5),
            lambda: list(other_at_root.Recollect(pb.RecollectRequest(via="site"), timeout=5))):
        error = refused(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        assert "'site'" in error.details() and "names other" in error.details()
    # Only the site's parent publishes a directory to it (C-MOVE destinations come from it).
    fake = pb.PublishDirectoryRequest(root_id="root", entries=[directory_entry("other")])
    error = refused(lambda: other_at_site.PublishDirectory(fake, timeout=5))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "parent root" in error.details()
    assert "control plane refused PublishDirectory" in caplog.text
    assert "control plane refused Register" in caplog.text

    # Nothing of it took effect; the real site and the CLI (the node's own certificate) still
    # change state.
    assert "EVIL" not in devices(root)
    with root.db.session() as s:
        assert neighbours.get(s, "site").control_address != "127.0.0.1:1"  # type: ignore[union-attr]
    assert site.cli("recollect").exit_code == 0
    assert {r["node_id"] for r in json.loads(site.cli("hierarchy", "directory",
                                                      "--json").output)} == {"root", "site"}


def directory_entry(node_id: str) -> pb.DirectoryEntry:
    return pb.DirectoryEntry(node=pb.NodeInfo(node_id=node_id), reachable=True)
