"""The Control service: what a node answers to its neighbours and to its own CLI.

Who may call each RPC is decided before it gets here (hierarchy/authz.py: an interceptor).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TypeVar

import grpc
from sqlalchemy import select

from hierarchy import directory, neighbours
from hierarchy.channels import Peers, describe
from hierarchy.fanout import WAIT_SHARE, Call, fan_out_batches, up_timeout
from hierarchy.identity import local_info
from hierarchy.rpc import control_pb2 as pb
from hierarchy.rpc import control_pb2_grpc as rpc
from node import devices, replication
from node.config import Settings
from node.db.database import Database
from node.db.models import Neighbour, utcnow
from node.forwarding import admin

log = logging.getLogger(__name__)

T = TypeVar("T")
# Threads for calls to children and background bookkeeping: a node has a few children, and
# a few walks (recollect, status, refresh-IP, publish) may run at once.
WORKERS = 32


def records_to_pb(records: list[replication.Record]) -> list[pb.DeviceRecord]:
    return [pb.DeviceRecord(name=r.name, origin_node=r.origin_node, version=r.version,
                            deleted=r.deleted, payload_json=r.payload) for r in records]


def collect_from(stub: rpc.ControlStub, request: pb.CollectSubtreeRequest, timeout: float
                 ) -> Iterator[list[pb.DirectoryEntry]]:
    """A child's subtree in batches; from a node too old to batch, one entry at a time."""
    try:
        for batch in stub.CollectSubtreeBatches(request, timeout=timeout):
            yield list(batch.entries)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        for entry in stub.CollectSubtree(request, timeout=timeout):
            yield [entry]


class ControlServicer(rpc.ControlServicer):
    def __init__(self, settings: Settings, db: Database, peers: Peers,
                 on_change: Callable[[], None],
                 on_applied: Callable[[replication.Logged], None] | None = None) -> None:
        self.settings = settings
        self.db = db
        self.peers = peers
        self.on_change = on_change  # wakes the sync loop: a neighbour registered
        # Wakes it with what was just applied, which it can pass on without reading it back.
        self.on_applied = on_applied or (lambda _logged: on_change())
        # Calls to children and bookkeeping off the answer path run here: reused threads, as
        # starting one per child and walk costs more than the call itself on a busy node.
        self._workers = futures.ThreadPoolExecutor(max_workers=WORKERS,
                                                   thread_name_prefix="control-walk")
        # Children change only when one registers (here): every walk reads this copy.
        self._children_read: dict[str, str] | None = None
        self._registrations = 0  # a copy read before the latest registration is not kept
        # Children this node last recorded as reachable: a walk they answer writes nothing.
        self._noted_reachable: set[str] = set()

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _background(self, work: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # shut down: the node is stopping
            self._workers.submit(work)

    # --- helpers ------------------------------------------------------------------------

    @property
    def me(self) -> str:
        return self.settings.node_id

    def _remaining(self, context: grpc.ServicerContext) -> float:
        left = context.time_remaining()
        return self.settings.hierarchy.recollect_timeout if left is None else max(0.0, left)

    def _own_entry(self) -> pb.DirectoryEntry:
        with self.db.session() as session:
            return directory.entry(local_info(session, self.settings), last_seen=utcnow(),
                                   queue=admin.depth(session))

    def _children(self) -> dict[str, str]:
        """{node id: control address} of the registered children."""
        children = self._children_read
        if children is not None:
            return children
        registrations = self._registrations
        with self.db.session() as session:
            children = dict(session.execute(
                select(Neighbour.node_id, Neighbour.control_address)
                .where(Neighbour.role == neighbours.CHILD).order_by(Neighbour.node_id)).all())
        if registrations == self._registrations:
            self._children_read = children
        return children

    def _neighbour(self, node_id: str) -> Neighbour | None:
        with self.db.session() as session:
            n = neighbours.get(session, node_id)
            session.expunge_all()
        return n

    def _note(self, answered: list[str], failed: dict[str, str]) -> None:
        """Record which children answered a walk and which did not, in one transaction.

        A child already recorded as reachable is not written again (its heartbeats keep its
        last_seen): a recollect walks the tree twice and would otherwise write on every node.
        """
        back = [node_id for node_id in answered if node_id not in self._noted_reachable]
        if not back and not failed:
            return
        try:
            with self.db.transaction(durable=False) as session:
                neighbours.seen_all(session, back)
                for node_id, error in failed.items():
                    neighbours.unreachable(session, node_id, error)
        except Exception:  # liveness bookkeeping must not take a walk down with it
            log.exception("recording the children's liveness failed")
            return
        self._noted_reachable.update(back)
        self._noted_reachable.difference_update(failed)

    def _unreachable_entry(self, n: Neighbour | None, node_id: str, reason: str
                           ) -> pb.DirectoryEntry:
        info = neighbours.info_of(n) if n is not None else pb.NodeInfo(node_id=node_id)
        if n is not None and n.role == neighbours.CHILD:
            info.parent_id = self.me
        return directory.entry(info, reachable=False, error=reason,
                               last_seen=n.last_seen if n is not None else None,
                               queue=(n.queue_depth, 0) if n is not None else (0, 0))

    def _over_children(self, remaining: float,
                       ask: Callable[[rpc.ControlStub, float], Iterator[T]],
                       failed: Callable[[Neighbour, str], T | None],
                       children: dict[str, str] | None = None) -> Iterator[list[T]]:
        """`ask` every registered child (`children`, else read now) at once, starting now,
        and yield their answers in batches, each everything that arrived meanwhile. Whether
        each child answered is written once the walk is over, off the answer path (it is
        bookkeeping, not part of any answer)."""
        if children is None:
            children = self._children()
        answered: list[str] = []
        errors: dict[str, str] = {}

        def on_failure(key: str, reason: str) -> T | None:
            errors[key] = reason
            n = self._neighbour(key)
            if n is None:  # gone meanwhile: what is known of it is its id
                n = Neighbour(node_id=key, role=neighbours.CHILD, queue_depth=0,
                              info=json.dumps({"node_id": key}))
            return failed(n, reason)

        def asking(address: str) -> Callable[[float], Iterator[T]]:
            return lambda timeout: ask(self.peers.stub(address), timeout)

        calls = [Call(node_id, asking(address)) for node_id, address in children.items()]
        return self._noting(fan_out_batches(calls, remaining, on_failure, answered.append,
                                            spawn=self._workers.submit), answered, errors)

    def _noting(self, batches: Iterator[list[T]], answered: list[str],
                errors: dict[str, str]) -> Iterator[list[T]]:
        try:
            yield from batches
        finally:
            if answered or errors:
                self._background(lambda: self._note(answered, errors))

    def _via_root(self, context: grpc.ServicerContext,
                  ask_parent: Callable[[rpc.ControlStub, float], Iterator[T]],
                  parent_failed: Callable[[Neighbour | None, str], T],
                  at_root: Callable[[float], Iterator[T]]) -> Iterator[T]:
        """Pass a tree-wide request up to the root and relay its answers; a node whose
        parent does not answer serves the part of the tree below itself instead."""
        remaining = self._remaining(context)
        address = self.settings.hierarchy.parent
        if address:
            relayed = False
            try:
                for item in ask_parent(self.peers.stub(address), up_timeout(remaining)):
                    relayed = True
                    yield item
                return
            except grpc.RpcError as exc:
                reason = describe(exc)
                if relayed:
                    log.warning("parent %s stopped answering part-way: %s", address, reason)
                    return
            with self.db.transaction() as session:
                parent = neighbours.parent(session)
                if parent is not None:
                    neighbours.unreachable(session, parent.node_id, reason)
                session.expunge_all()
            log.warning("parent at %s did not answer (%s): serving this subtree only",
                        address, reason)
            yield parent_failed(parent, reason)
            remaining = self._remaining(context)
        yield from at_root(remaining)

    def _collect(self, remaining: float, with_queue: bool
                 ) -> Iterator[list[pb.DirectoryEntry]]:
        """This node's entry at once, then its subtree's in batches as they arrive (the
        children are asked first, so they work while this node reads its own)."""
        request = pb.CollectSubtreeRequest(with_queue=with_queue)
        below = self._over_children(
            remaining, lambda stub, timeout: collect_from(stub, request, timeout),
            lambda child, reason: [self._unreachable_entry(child, child.node_id, reason)])
        yield [self._own_entry()]
        for batch in below:
            yield [e for entries in batch for e in entries]

    # --- RPCs -----------------------------------------------------------------------------

    def GetNodeInfo(self, request: pb.GetNodeInfoRequest, context: grpc.ServicerContext
                    ) -> pb.GetNodeInfoResponse:
        with self.db.session() as session:
            return pb.GetNodeInfoResponse(
                node=local_info(session, self.settings),
                children=[c.node_id for c in neighbours.children(session)])

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext
                 ) -> pb.RegisterResponse:
        child = request.child
        if not child.node_id or not child.control_address:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "registration needs the child's node_id and control_address")
        if child.node_id == self.me:
            context.abort(grpc.StatusCode.ALREADY_EXISTS,
                          f"node id {child.node_id} is this parent's own id; node ids must be"
                          " unique in the tree")
        with self.db.transaction() as session:
            known = neighbours.get(session, child.node_id)
            if known is not None and known.role == neighbours.PARENT:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{child.node_id} is this node's parent: it cannot be its child")
            neighbours.record_child(session, child)
        self._registrations += 1
        self._children_read = None
        with self.db.session() as session:
            info = local_info(session, self.settings)
        log.info("child %s registered from %s", child.node_id, child.control_address)
        self.on_change()
        return pb.RegisterResponse(parent=info)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
                  ) -> pb.HeartbeatResponse:
        with self.db.transaction(durable=False) as session:  # bookkeeping
            known = neighbours.seen(session, request.node_id, request.queue_depth,
                                    role=neighbours.CHILD)
        return pb.HeartbeatResponse(parent_id=self.me, known=known)

    def PushDeviceChanges(self, request: pb.PushDeviceChangesRequest,
                          context: grpc.ServicerContext) -> pb.PushDeviceChangesResponse:
        records = [replication.Record(r.name, r.origin_node, r.version, r.deleted,
                                      r.payload_json) for r in request.records]
        with self.db.transaction() as session:
            if not neighbours.seen(session, request.from_node):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{request.from_node} is not a registered neighbour of {self.me}")
            logged = replication.apply_all(session, records, request.from_node)
        applied = len(logged.records)
        if applied:  # committed: now it may be passed on
            log.info("applied %d device change(s) from %s", applied, request.from_node)
            self.on_applied(logged)
        return pb.PushDeviceChangesResponse(applied=applied,
                                            ignored=len(request.records) - applied)

    def CollectSubtree(self, request: pb.CollectSubtreeRequest, context: grpc.ServicerContext
                       ) -> Iterator[pb.DirectoryEntry]:
        for batch in self._collect(self._remaining(context), request.with_queue):
            yield from batch

    def CollectSubtreeBatches(self, request: pb.CollectSubtreeRequest,
                              context: grpc.ServicerContext) -> Iterator[pb.DirectoryEntries]:
        for batch in self._collect(self._remaining(context), request.with_queue):
            yield pb.DirectoryEntries(entries=batch)

    def HierarchyStatus(self, request: pb.HierarchyStatusRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.DirectoryEntry]:
        forwarded = pb.HierarchyStatusRequest(via=self.me)
        yield from self._via_root(
            context, lambda stub, timeout: stub.HierarchyStatus(forwarded, timeout=timeout),
            lambda parent, reason: self._unreachable_entry(
                parent, parent.node_id if parent else self.settings.hierarchy.parent, reason),
            lambda remaining: (e for batch in self._collect(remaining, True) for e in batch))

    def Recollect(self, request: pb.RecollectRequest, context: grpc.ServicerContext
                  ) -> Iterator[pb.RecollectEvent]:
        forwarded = pb.RecollectRequest(via=self.me, batched=True)
        events = self._via_root(
            context, lambda stub, timeout: stub.Recollect(forwarded, timeout=timeout),
            lambda parent, reason: pb.RecollectEvent(entry=self._unreachable_entry(
                parent, parent.node_id if parent else self.settings.hierarchy.parent, reason)),
            self._gather_and_publish)
        if request.batched:
            yield from events
            return
        for event in events:  # a caller that takes one node per event
            if event.HasField("entries"):
                yield from (pb.RecollectEvent(entry=e) for e in event.entries.entries)
            else:
                yield event

    def _gather_and_publish(self, remaining: float) -> Iterator[pb.RecollectEvent]:
        """At the root (or the highest node that answers): collect, store, publish down."""
        entries = []
        # Both phases walk the whole tree; what is left at the end carries the summary back.
        for batch in self._collect(remaining * 0.45, False):
            entries.extend(batch)
            yield pb.RecollectEvent(entries=pb.DirectoryEntries(entries=batch))
        with self.db.session() as session:
            missing = directory.not_reached(session, {e.node.node_id for e in entries})
        if missing:
            entries.extend(missing)
            yield pb.RecollectEvent(entries=pb.DirectoryEntries(entries=missing))
        publish = pb.PublishDirectoryRequest(root_id=self.me, collected_ms=directory.ms(utcnow()),
                                             entries=entries)
        published = self._store_and_pass_on(publish, remaining * 0.35)
        unreachable = sum(1 for e in entries if not e.reachable)
        yield pb.RecollectEvent(done=pb.RecollectDone(
            root_id=self.me, nodes=len(entries), unreachable=unreachable, published=published))

    def _store_and_pass_on(self, request: pb.PublishDirectoryRequest, remaining: float) -> int:
        """Pass the directory on and store it here at the same time: the walk down the tree
        does not wait for any node's database. Returns how many nodes stored it."""
        deadline = time.monotonic() + remaining * WAIT_SHARE
        # The children first: the walk down the tree waits for no node's database.
        below = self._over_children(
            remaining,
            lambda stub, timeout: iter([stub.PublishDirectory(request, timeout=timeout)]),
            lambda _child, _reason: None, self._children())
        try:
            here = self._workers.submit(self._store, request)
        except RuntimeError:  # shut down: the node is stopping
            here = None
        stored = sum(answer.stored for answers in below for answer in answers)
        if here is not None:
            waited = max(0.05, deadline - time.monotonic())
            try:
                here.result(timeout=waited)
                stored += 1
            except futures.TimeoutError:  # what the children stored still counts
                log.warning("storing the directory from %s here took longer than the %.1f s"
                            " the recollect could wait: not counted as published (it goes"
                            " on)", request.root_id, waited)
            except Exception as exc:
                log.error("storing the directory from %s failed: %s", request.root_id,
                          str(exc) or type(exc).__name__)
        return stored

    def _store(self, request: pb.PublishDirectoryRequest) -> None:
        with self.db.transaction() as session:
            stored = directory.store(session, list(request.entries), request.root_id,
                                     directory.from_ms(request.collected_ms))
            directory.export(session, self.settings.data_dir, stored)

    def PublishDirectory(self, request: pb.PublishDirectoryRequest,
                         context: grpc.ServicerContext) -> pb.PublishDirectoryResponse:
        return pb.PublishDirectoryResponse(
            stored=self._store_and_pass_on(request, self._remaining(context)))

    def RefreshIp(self, request: pb.RefreshIpRequest, context: grpc.ServicerContext
                  ) -> Iterator[pb.RefreshIpReport]:
        if request.subtree:
            yield from self._refresh_subtree(self._remaining(context))
        elif request.hierarchy:
            forwarded = pb.RefreshIpRequest(hierarchy=True)
            yield from self._via_root(
                context, lambda stub, timeout: stub.RefreshIp(forwarded, timeout=timeout),
                lambda parent, reason: pb.RefreshIpReport(
                    node_id=parent.node_id if parent else self.settings.hierarchy.parent,
                    reachable=False, error=reason),
                self._refresh_subtree)
        else:
            yield self._refresh_here()

    def _refresh_here(self) -> pb.RefreshIpReport:
        with self.db.transaction() as session:
            changes = devices.refresh_ips(session)
        return pb.RefreshIpReport(node_id=self.me, reachable=True, changes=[
            pb.IpChange(device=c.device, host=c.host, old_ip=c.old, new_ip=c.new)
            for c in changes])

    def _refresh_subtree(self, remaining: float) -> Iterator[pb.RefreshIpReport]:
        yield self._refresh_here()
        request = pb.RefreshIpRequest(hierarchy=True, subtree=True)
        for batch in self._over_children(
                remaining, lambda stub, timeout: stub.RefreshIp(request, timeout=timeout),
                lambda child, reason: pb.RefreshIpReport(node_id=child.node_id,
                                                         reachable=False, error=reason)):
            yield from batch

    def QueueStatus(self, request: pb.QueueStatusRequest, context: grpc.ServicerContext
                    ) -> pb.QueueStatusResponse:
        with self.db.session() as session:
            stats = admin.stats(session)
        response = pb.QueueStatusResponse(node_id=self.me)
        for s in stats:
            c = s.counts
            response.destinations.append(pb.QueueDestination(
                device=s.device, pending=c.get("pending", 0), sending=c.get("sending", 0),
                failed=c.get("failed", 0), done=c.get("done", 0)))
            for state in ("pending", "sending", "failed", "done"):
                setattr(response, state, getattr(response, state) + c.get(state, 0))
        return response

