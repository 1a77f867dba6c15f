"""The control plane of one node: the gRPC server, registration with the parent, device sync.

Started by `pacsnode serve` alongside the DICOM listeners (a node Extension). Three things run:
the server (Control + grpc.health.v1.Health), a registrar that registers with the parent and
then heartbeats it, and a syncer that pushes each neighbour the device changes after its cursor.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hierarchy import neighbours
from hierarchy.authz import Authorizer
from hierarchy.channels import Peers, describe, server_credentials, uses_tls
from hierarchy.identity import local_info
from hierarchy.rpc import control_pb2 as pb
from hierarchy.rpc import control_pb2_grpc as rpc
from hierarchy.servicer import ControlServicer, records_to_pb
from node import replication
from node.config import Settings
from node.db.database import Database
from node.forwarding import admin

if TYPE_CHECKING:
    from node.service import Node

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Control"].full_name
PUSH_BATCH = 500


class ControlPlane:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db: Database | None = None
        self.peers = Peers(settings)
        self.server: grpc.Server | None = None
        self.health = health.HealthServicer()
        self.port = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._registered: bytes | None = None  # the NodeInfo the parent last accepted
        self._parent_ok: bool | None = None

    # --- lifecycle --------------------------------------------------------------------

    def start(self, node: Node) -> None:
        assert node.db is not None
        self.start_with(node.db)

    def start_with(self, db: Database) -> None:
        """Serve and start the background work, on an open, migrated database."""
        self.db = db
        h = self.settings.hierarchy
        tls = uses_tls(self.settings)
        if not tls and h.allow_insecure_remote:
            log.warning("hierarchy.allow_insecure_remote: the control plane has no TLS, so any"
                        " client that reaches %s may register, push device changes and"
                        " publish the directory", h.control_listen)
        # Streams (recollect, status) hold a worker for their lifetime, and each tree walk
        # holds one per level: leave room for several at once.
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="control"),
            # gRPC sets SO_REUSEPORT by default: a second node on the same control port would
            # start and silently share it. Fail instead.
            options=[("grpc.so_reuseport", 0)],
            interceptors=[Authorizer(tls, h.allow_insecure_remote, self._parent_id)])
        rpc.add_ControlServicer_to_server(
            ControlServicer(self.settings, db, self.peers, self.wake), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        try:
            if tls:
                port = self.server.add_secure_port(h.control_listen,
                                                   server_credentials(self.settings))
            else:
                port = self.server.add_insecure_port(h.control_listen)
        except RuntimeError as exc:  # grpcio's way of saying the address is taken
            port = 0
            log.debug("binding %s: %s", h.control_listen, exc)
        if not port:
            raise OSError(f"the control plane cannot listen on {h.control_listen} (in use by"
                          " another node? set hierarchy.control_listen)")
        self.port = port
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("control plane of node %s listening on %s (%s)", self.settings.node_id,
                 h.control_listen, "mutual TLS" if tls else "no TLS")
        self._spawn("control-sync", self._sync_loop)
        if h.parent:
            self._spawn("control-registrar", self._registrar_loop)

    def _spawn(self, name: str, target: object) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            self.server.stop(grace=1.0).wait(5)
            self.server = None
        for thread in self._threads:
            thread.join(timeout=self.settings.hierarchy.rpc_timeout + 1)
        self._threads.clear()
        self.peers.close()
        log.info("control plane stopped")

    def wake(self) -> None:
        self._wake.set()

    def _parent_id(self) -> str | None:
        """The registered parent, whose certificate alone may send what flows down the tree
        (a root whose parent setting was removed keeps the old row: it has no parent)."""
        assert self.db is not None
        if not self.settings.hierarchy.parent:
            return None
        with self.db.session() as session:
            parent = neighbours.parent(session)
            return parent.node_id if parent is not None else None

    # --- registration and heartbeat ----------------------------------------------------

    def _registrar_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.register_or_heartbeat()
            except Exception:  # the loop must outlive a database hiccup
                log.exception("registration/heartbeat failed")
            self._stop.wait(self.settings.hierarchy.heartbeat_seconds)

    def register_or_heartbeat(self) -> None:
        assert self.db is not None
        h = self.settings.hierarchy
        with self.db.session() as session:
            info = local_info(session, self.settings)
            waiting, _failed = admin.depth(session)
            parent = neighbours.parent(session)
            parent_id = parent.node_id if parent is not None else ""
        # Registering again whenever this changes keeps the parent's copy current (partitions,
        # addresses, and the role, which changes when this node gains its first child).
        digest = info.SerializeToString(deterministic=True)
        stub = self.peers.stub(h.parent)
        try:
            if digest != self._registered or not parent_id:
                answer = stub.Register(pb.RegisterRequest(child=info), timeout=h.rpc_timeout)
                if answer.parent.node_id == self.settings.node_id:
                    raise RuntimeError(f"the parent at {h.parent} has this node's own id")
                with self.db.transaction() as session:
                    target = neighbours.record_parent(session, answer.parent, self.settings)
                self._registered = digest
                log.info("registered with parent %s at %s; forwarding to %s",
                         answer.parent.node_id, h.parent, target or "(no usable partition)")
                self._report(True, "")
                self.wake()
                return
            beat = stub.Heartbeat(pb.HeartbeatRequest(node_id=self.settings.node_id,
                                                      queue_depth=waiting),
                                  timeout=h.rpc_timeout)
            if not beat.known:
                log.warning("parent %s does not know this node: registering again", parent_id)
                self._registered = None
                return
            with self.db.transaction() as session:
                neighbours.seen(session, parent_id)
            self._report(True, "")
        except grpc.RpcError as exc:
            reason = describe(exc)
            if parent_id:
                with self.db.transaction() as session:
                    neighbours.unreachable(session, parent_id, reason)
            self._report(False, reason)

    def _report(self, ok: bool, reason: str) -> None:
        """Log changes of the parent's reachability, not every heartbeat."""
        if ok != self._parent_ok:
            if ok:
                log.info("parent at %s is reachable", self.settings.hierarchy.parent)
            else:
                log.warning("parent at %s is unreachable: %s", self.settings.hierarchy.parent,
                            reason)
        self._parent_ok = ok

    # --- device-table sync -------------------------------------------------------------

    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.hierarchy.sync_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync_once()
            except Exception:
                log.exception("device sync failed")

    def sync_once(self) -> None:
        """Push every neighbour what it has not had yet (in parallel: one slow neighbour must
        not hold up the others)."""
        assert self.db is not None
        with self.db.session() as session:
            # A parent that is no longer configured is no longer talked to.
            parent = neighbours.parent(session) if self.settings.hierarchy.parent else None
            targets = [(n.node_id, n.control_address, n.cursor)
                       for n in (parent, *neighbours.children(session))
                       if n is not None and n.control_address]
            top = replication.last_seq(session)
        targets = [t for t in targets if t[2] < top]
        if not targets:
            return
        threads = [threading.Thread(target=self._push, args=t, daemon=True) for t in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _push(self, node_id: str, address: str, cursor: int) -> None:
        assert self.db is not None
        with self.db.session() as session:
            if cursor == 0:
                # A new neighbour gets the current state rather than the whole history. The
                # sequence is read first: a change that commits meanwhile is sent again later.
                upto = replication.last_seq(session)
                records = replication.snapshot(session)
                more = False
            else:
                rows = replication.changes_after(session, cursor, PUSH_BATCH)
                upto = rows[-1][0] if rows else cursor
                records = [r for _seq, source, r in rows if source != node_id]
                more = len(rows) == PUSH_BATCH
        if upto == cursor:
            return
        if records:
            request = pb.PushDeviceChangesRequest(from_node=self.settings.node_id,
                                                  records=records_to_pb(records))
            try:
                self.peers.stub(address).PushDeviceChanges(
                    request, timeout=self.settings.hierarchy.rpc_timeout)
            except grpc.RpcError as exc:
                log.debug("pushing device changes to %s failed: %s", node_id, describe(exc))
                return  # the cursor stays: the same changes go next time
        with self.db.transaction() as session:
            n = neighbours.get(session, node_id)
            if n is not None and n.cursor == cursor:
                n.cursor = upto
        if more:
            self.wake()
