"""The control plane of one node: the gRPC server, registration with the parent, device sync.

Started by `pacsnode serve` alongside the DICOM listeners (a node Extension). Three things run:
the server (Control + grpc.health.v1.Health), a registrar that registers with the parent and
then heartbeats it, and a syncer that pushes each neighbour the device changes after its cursor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from hierarchy import neighbours
from hierarchy.authz import Authorizer
from hierarchy.channels import Peers, describe, server_credentials, uses_tls
from hierarchy.identity import local_info
from hierarchy.rpc import control_pb2 as pb
from hierarchy.rpc import control_pb2_grpc as rpc
from hierarchy.servicer import ControlServicer, records_to_pb
from node import replication
from node.clock import StepWatch
from node.config import Settings, split_address
from node.db.database import Database
from node.db.models import Neighbour
from node.db.tables import rowcount
from node.forwarding import admin
from node.ports import bind_reason, probe

if TYPE_CHECKING:
    from node.service import Node

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Control"].full_name
PUSH_BATCH = 500
# How soon a change committed by another process (`pacsnode device` commits straight to the
# database) leaves this node: it polls the change log's newest seq, one indexed read without
# a transaction, this often (or every sync_seconds, if that is shorter).
LOCAL_POLL_SECONDS = 0.2
# With every neighbour up to date, the neighbours are still read again this often (cursors
# are otherwise only re-read when something changes).
FULL_ROUND_SECONDS = 30.0


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
        self._servicer: ControlServicer | None = None
        self._top = -1  # the newest change-log seq the last sync round saw
        self._healthy = True  # the last sync round or poll did not fail
        self._clock = StepWatch()
        self._jump = 0.0  # a step of the wall clock whose last-seen times are not moved yet
        # Changes received since the last round, handed over by the servicer once committed.
        self._fresh: list[replication.Logged] = []
        self._fresh_lock = threading.Lock()
        # Every neighbour with its cursor, when all of them had everything up to self._top;
        # None when not known (a neighbour registered or lagged, a push failed, ...).
        self._known: list[Target] | None = None
        self._wakes = 0  # a round that began before a wake() does not vouch for _known

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
        self._servicer = ControlServicer(self.settings, db, self.peers, self.wake,
                                         self.applied)
        rpc.add_ControlServicer_to_server(self._servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host, wanted = split_address(h.control_listen, "hierarchy.control_listen")
        # Asked first so that the error says why (gRPC only logs its reason, from C).
        refused = probe(host, wanted)
        if refused is not None:
            raise OSError(f"the control plane cannot listen on {h.control_listen}:"
                          f" {bind_reason(refused)} (set hierarchy.control_listen)")
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

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
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
        if self._servicer is not None:
            self._servicer.close()
        self.peers.close()
        log.info("control plane stopped")

    def wake(self) -> None:
        """Push now, after reading every neighbour's cursor and the change log again."""
        self._wakes += 1
        self._known = None
        self._wake.set()

    def applied(self, logged: replication.Logged) -> None:
        """`logged` was just committed: push it now (without reading it back if it is all
        that is new since the last round)."""
        with self._fresh_lock:
            self._fresh.append(logged)
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
        parent_id = info.parent_id  # the registered parent, if any
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
            with self.db.transaction(durable=False) as session:  # bookkeeping
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
        """Push whenever there is something to push: at once when woken (changes received,
        a neighbour registered), within LOCAL_POLL_SECONDS of a change another process (the
        CLI) commits, and every sync_seconds while a neighbour has not taken its changes."""
        h = self.settings.hierarchy
        poll = min(h.sync_seconds, LOCAL_POLL_SECONDS)
        next_round = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(poll)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._watch_clock()
                now = time.monotonic()
                due = woken or now >= next_round
                if not due and self._healthy:
                    due = self._changed_locally()
                if due:
                    behind = self.sync_once()
                    next_round = now + (h.sync_seconds if behind else FULL_ROUND_SECONDS)
                    self._healthy = True
            except Exception:
                # Not polled again until the next round: a database that is down is not
                # reported five times a second.
                log.exception("device sync failed")
                self._healthy = False
                self._known = None
                next_round = time.monotonic() + h.sync_seconds

    def _watch_clock(self) -> None:
        """A step of the wall clock moves the neighbours' last-seen times with it (checked
        every LOCAL_POLL_SECONDS, so `hierarchy neighbours` never shows the step's effect)."""
        assert self.db is not None
        self._jump += self._clock.step()
        if not self._jump:
            return
        with self.db.transaction(durable=False) as session:
            moved = neighbours.shift_last_seen(session, self._jump)
        log.warning("wall clock stepped %s %.0f s: %d neighbour(s)' last-seen time moved with "
                    "it", "forward" if self._jump > 0 else "back", abs(self._jump), moved)
        self._jump = 0.0

    def _changed_locally(self) -> bool:
        """A change was logged since the last round: one indexed read, no transaction."""
        assert self.db is not None
        return replication.peek_last_seq(self.db) != self._top

    def sync_once(self) -> bool:
        """Push every neighbour what it has not had yet, to all at once (one slow neighbour
        must not hold up the others); True if one of them is still behind afterwards."""
        assert self.db is not None
        wakes = self._wakes
        with self._fresh_lock:
            fresh, self._fresh = self._fresh, []
        top, targets, pushes = self._plan(fresh) or self._plan_from_database()
        self._top = top
        calls = [(push, self._send(push)) for push in pushes]
        delivered = [push for push, call in calls if self._delivered(push, call)]
        moved = self._advance(delivered)
        behind = len(delivered) < len(pushes) or any(push.upto < top for push in delivered)
        if any(push.more for push in delivered):
            self.wake()
        # All of them have everything up to `top`: the next change received can go out
        # without reading the database first.
        everyone = not behind and moved == len(delivered) and wakes == self._wakes
        self._known = [Target(t.node_id, t.address, top) for t in targets] if everyone else None
        return behind

    def _plan(self, fresh: list[replication.Logged]
              ) -> tuple[int, list[Target], list[Push]] | None:
        """The pushes for what was just received, without reading the database: when every
        neighbour had everything before it and nothing else was logged in between."""
        known, seq = self._known, self._top
        if known is None or not fresh:
            return None
        rows: list[tuple[int, str, replication.Record]] = []
        for logged in sorted(fresh, key=lambda logged: logged.first):
            if logged.first != seq + 1:  # something else (the CLI) logged in between
                return None
            rows += [(logged.first + i, logged.received_from, record)
                     for i, record in enumerate(logged.records)]
            seq = logged.last
        if len(rows) >= PUSH_BATCH:
            return None
        return seq, known, [Push(target, seq, [r for _seq, source, r in rows
                                               if source != target.node_id], False)
                            for target in known]

    def _plan_from_database(self) -> tuple[int, list[Target], list[Push]]:
        assert self.db is not None
        with self.db.session() as session:
            top = replication.last_seq(session)
            targets = self._targets(session)
            behind = [target for target in targets if target.cursor < top]
            logs = self._logs(session, [target for target in behind if target.cursor])
            # A new neighbour gets the current state rather than the whole history. `top` was
            # read first: a change that commits meanwhile is sent again later.
            state = (replication.snapshot(session) if any(not t.cursor for t in behind)
                     else [])
        return top, targets, [self._batch(target, top, logs.get(target.node_id, []), state)
                              for target in behind]

    def _advance(self, delivered: list[Push]) -> int:
        """Move the cursors of those that took their push (each only if no other round moved
        it meanwhile); returns how many moved."""
        if not delivered:
            return 0
        assert self.db is not None
        moved = 0
        # Not synced: a cursor lost to a power cut only sends those changes again, and the
        # neighbour ignores versions it has.
        with self.db.transaction(durable=False) as session:
            for push in delivered:
                result = session.execute(update(Neighbour).where(
                    Neighbour.node_id == push.target.node_id,
                    Neighbour.cursor == push.target.cursor).values(cursor=push.upto)
                    .execution_options(synchronize_session=False))
                moved += rowcount(result)
        return moved

    def _targets(self, session: Session) -> list[Target]:
        # A parent that is no longer configured is no longer talked to.
        has_parent = bool(self.settings.hierarchy.parent)
        return [Target(node_id, address, cursor) for node_id, role, address, cursor in
                session.execute(select(Neighbour.node_id, Neighbour.role,
                                       Neighbour.control_address, Neighbour.cursor))
                if address and (role == neighbours.CHILD
                                or (role == neighbours.PARENT and has_parent))]

    @staticmethod
    def _logs(session: Session, targets: list[Target]
              ) -> dict[str, list[tuple[int, str, replication.Record]]]:
        """The change log after each target's cursor (PUSH_BATCH rows at most): one read from
        the lowest cursor, unless that one is so far behind the batch does not reach the
        others (a neighbour catching up), which then read from their own cursors."""
        if not targets:
            return {}
        rows = replication.changes_after(session, min(t.cursor for t in targets), PUSH_BATCH)
        if len(rows) == PUSH_BATCH:
            return {t.node_id: replication.changes_after(session, t.cursor, PUSH_BATCH)
                    for t in targets}
        return {t.node_id: [row for row in rows if row[0] > t.cursor] for t in targets}

    @staticmethod
    def _batch(target: Target, top: int, rows: list[tuple[int, str, replication.Record]],
               state: list[replication.Record]) -> Push:
        """What `target` gets: the current state if it is new, else `rows` (the log after its
        cursor) less what came from it."""
        if target.cursor == 0:
            return Push(target, top, state, False)
        upto = rows[-1][0] if rows else target.cursor
        records = [r for _seq, source, r in rows if source != target.node_id]
        return Push(target, upto, records, len(rows) == PUSH_BATCH)

    def _send(self, push: Push) -> grpc.Future | None:
        """Start the call (gRPC carries it; no thread per neighbour); None if nothing is to
        be sent, only the cursor moved (what it has not had came from it)."""
        if not push.records:
            return None
        request = pb.PushDeviceChangesRequest(from_node=self.settings.node_id,
                                              records=records_to_pb(push.records))
        stub = self.peers.stub(push.target.address)
        return stub.PushDeviceChanges.future(request,
                                             timeout=self.settings.hierarchy.rpc_timeout)

    @staticmethod
    def _delivered(push: Push, call: grpc.Future | None) -> bool:
        if call is None:
            return True
        try:
            call.result()
        except grpc.RpcError as exc:
            log.debug("pushing device changes to %s failed: %s", push.target.node_id,
                      describe(exc))
            return False  # the cursor stays: the same changes go next time
        return True


@dataclass(frozen=True)
class Target:
    node_id: str
    address: str
    cursor: int  # the highest local seq it has had


@dataclass(frozen=True)
class Push:
    target: Target
    upto: int  # its cursor once delivered
    records: list[replication.Record]
    more: bool  # the batch was full: another round follows at once
