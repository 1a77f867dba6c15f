"""The Control service: what a node answers to its neighbours and to its own CLI.

Who may call each RPC is decided before it gets here (hierarchy/authz.py: an interceptor).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from hierarchy import directory, neighbours
from hierarchy.channels import Peers, describe
from hierarchy.fanout import Call, fan_out, up_timeout
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


def records_to_pb(records: list[replication.Record]) -> list[pb.DeviceRecord]:
    return [pb.DeviceRecord(name=r.name, origin_node=r.origin_node, version=r.version,
                            deleted=r.deleted, payload_json=r.payload) for r in records]


class ControlServicer(rpc.ControlServicer):
    def __init__(self, settings: Settings, db: Database, peers: Peers,
                 on_change: Callable[[], None]) -> None:
        self.settings = settings
        self.db = db
        self.peers = peers
        self.on_change = on_change  # wakes the sync loop: something new to push

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

    def _children(self) -> list[Neighbour]:
        with self.db.session() as session:
            children = neighbours.children(session)
            session.expunge_all()
        return children

    def _note(self, node_id: str, error: str | None) -> None:
        with self.db.transaction() as session:
            if error is None:
                neighbours.seen(session, node_id)
            else:
                neighbours.unreachable(session, node_id, error)

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
                       failed: Callable[[Neighbour, str], T | None]) -> Iterator[T]:
        """`ask` every registered child at once; liveness is noted as they answer or not."""
        children = {c.node_id: c for c in self._children()}

        def on_failure(key: str, reason: str) -> T | None:
            self._note(key, reason)
            return failed(children[key], reason)

        calls = [Call(c.node_id, lambda timeout, c=c: ask(self.peers.stub(c.control_address),
                                                           timeout))
                 for c in children.values()]
        yield from fan_out(calls, remaining, on_failure, lambda key: self._note(key, None))

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

    def _collect(self, remaining: float, with_queue: bool) -> Iterator[pb.DirectoryEntry]:
        yield self._own_entry()
        request = pb.CollectSubtreeRequest(with_queue=with_queue)
        yield from self._over_children(
            remaining, lambda stub, timeout: stub.CollectSubtree(request, timeout=timeout),
            lambda child, reason: self._unreachable_entry(child, child.node_id, reason))

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
        with self.db.session() as session:
            info = local_info(session, self.settings)
        log.info("child %s registered from %s", child.node_id, child.control_address)
        self.on_change()
        return pb.RegisterResponse(parent=info)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
                  ) -> pb.HeartbeatResponse:
        with self.db.transaction() as session:
            n = neighbours.get(session, request.node_id)
            known = n is not None and n.role == neighbours.CHILD
            if known:
                neighbours.seen(session, request.node_id, request.queue_depth)
        return pb.HeartbeatResponse(parent_id=self.me, known=known)

    def PushDeviceChanges(self, request: pb.PushDeviceChangesRequest,
                          context: grpc.ServicerContext) -> pb.PushDeviceChangesResponse:
        applied = 0
        with self.db.transaction() as session:
            if neighbours.get(session, request.from_node) is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"{request.from_node} is not a registered neighbour of {self.me}")
            for r in request.records:
                record = replication.Record(r.name, r.origin_node, r.version, r.deleted,
                                            r.payload_json)
                applied += replication.apply(session, record, request.from_node)
            neighbours.seen(session, request.from_node)
        if applied:
            log.info("applied %d device change(s) from %s", applied, request.from_node)
            self.on_change()
        return pb.PushDeviceChangesResponse(applied=applied,
                                            ignored=len(request.records) - applied)

    def CollectSubtree(self, request: pb.CollectSubtreeRequest, context: grpc.ServicerContext
                       ) -> Iterator[pb.DirectoryEntry]:
        yield from self._collect(self._remaining(context), request.with_queue)

    def HierarchyStatus(self, request: pb.HierarchyStatusRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.DirectoryEntry]:
        forwarded = pb.HierarchyStatusRequest(via=self.me)
        yield from self._via_root(
            context, lambda stub, timeout: stub.HierarchyStatus(forwarded, timeout=timeout),
            lambda parent, reason: self._unreachable_entry(
                parent, parent.node_id if parent else self.settings.hierarchy.parent, reason),
            lambda remaining: self._collect(remaining, True))

    def Recollect(self, request: pb.RecollectRequest, context: grpc.ServicerContext
                  ) -> Iterator[pb.RecollectEvent]:
        forwarded = pb.RecollectRequest(via=self.me)
        yield from self._via_root(
            context, lambda stub, timeout: stub.Recollect(forwarded, timeout=timeout),
            lambda parent, reason: pb.RecollectEvent(entry=self._unreachable_entry(
                parent, parent.node_id if parent else self.settings.hierarchy.parent, reason)),
            self._gather_and_publish)

    def _gather_and_publish(self, remaining: float) -> Iterator[pb.RecollectEvent]:
        """At the root (or the highest node that answers): collect, store, publish down."""
        entries = []
        # Both phases walk the whole tree; what is left at the end carries the summary back.
        for e in self._collect(remaining * 0.45, False):
            entries.append(e)
            yield pb.RecollectEvent(entry=e)
        with self.db.session() as session:
            missing = directory.not_reached(session, {e.node.node_id for e in entries})
        for e in missing:
            entries.append(e)
            yield pb.RecollectEvent(entry=e)
        publish = pb.PublishDirectoryRequest(root_id=self.me, collected_ms=directory.ms(utcnow()),
                                             entries=entries)
        published = self._store_and_pass_on(publish, remaining * 0.35)
        unreachable = sum(1 for e in entries if not e.reachable)
        yield pb.RecollectEvent(done=pb.RecollectDone(
            root_id=self.me, nodes=len(entries), unreachable=unreachable, published=published))

    def _store_and_pass_on(self, request: pb.PublishDirectoryRequest, remaining: float) -> int:
        with self.db.transaction() as session:
            directory.store(session, list(request.entries), request.root_id,
                            directory.from_ms(request.collected_ms))
            directory.export(session, self.settings.data_dir)
        stored = 1
        for answer in self._over_children(
                remaining,
                lambda stub, timeout: iter([stub.PublishDirectory(request, timeout=timeout)]),
                lambda _child, _reason: None):
            stored += answer.stored
        return stored

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
        yield from self._over_children(
            remaining, lambda stub, timeout: stub.RefreshIp(request, timeout=timeout),
            lambda child, reason: pb.RefreshIpReport(node_id=child.node_id, reachable=False,
                                                     error=reason))

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

