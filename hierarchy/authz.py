"""Who may call what on the control plane.

Every RPC that changes state on the node it reaches needs an authenticated peer: with mutual
TLS a verified client certificate, and where the request says which node it comes from, that
certificate must name that node (its CN or a subject alternative name), so one node's
certificate cannot register, heartbeat or push device changes as another node. What only a
node's parent sends (the directory it publishes, the subtree refresh-IP) must come from the
registered parent's certificate. Without TLS nothing identifies a peer, so only loopback
clients may change state (unless hierarchy.allow_insecure_remote says otherwise).

`decide` is the rule, a pure function; `Authorizer` is the gRPC server interceptor that applies
it to every Control RPC before its handler runs.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from hierarchy.rpc import control_pb2 as pb
from node.config import is_loopback

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Control"].full_name

# Answers built from what the node holds. CollectSubtree(Batches) and HierarchyStatus also ask
# the children and note whether each answered, but that is this node's own observation:
# nothing in the request is written anywhere.
READ_ONLY = frozenset({"GetNodeInfo", "CollectSubtree", "CollectSubtreeBatches",
                       "HierarchyStatus", "QueueStatus"})
# Register, Heartbeat, PushDeviceChanges: neighbours and devices written from the request.
# Recollect: the root stores and publishes a new directory on every node. PublishDirectory:
# the directory (which C-MOVE destinations are resolved through) stored here and below.
# RefreshIp: device addresses re-resolved and written. An RPC missing from READ_ONLY is
# treated as changing state, so a new one is guarded until classified.
STATE_CHANGING = frozenset({"Register", "Heartbeat", "PushDeviceChanges", "Recollect",
                            "PublishDirectory", "RefreshIp"})


@dataclass(frozen=True)
class Claim:
    """Whom a request says it comes from."""

    node_id: str = ""  # the node the request names as its sender ("": none)
    parent: bool = False  # only this node's registered parent sends it


def claim_of(method: str, request: Any) -> Claim:
    match method:
        case "Register":
            return Claim(request.child.node_id)
        case "Heartbeat":
            return Claim(request.node_id)
        case "PushDeviceChanges":
            return Claim(request.from_node)
        case "Recollect":  # `via`: the child passing the request up; empty from the CLI
            return Claim(request.via)
        case "PublishDirectory":  # root_id names the root, not the parent passing it on
            return Claim(parent=True)
        case "RefreshIp":  # a subtree request is a parent walking down its tree
            return Claim(parent=bool(request.subtree))
    return Claim()


@dataclass(frozen=True)
class Peer:
    address: str  # as gRPC reports it: "ipv4:127.0.0.1:40312", "ipv6:%5B::1%5D:40312", ...
    names: tuple[str, ...] = ()  # CN and SANs of its verified client certificate


@dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str


def is_local(address: str) -> bool:
    """A loopback TCP peer or a Unix socket (both can only be this machine)."""
    scheme, _, rest = address.partition(":")
    if scheme.startswith("unix"):
        return True
    if scheme not in ("ipv4", "ipv6"):
        return False
    host = urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    if host.startswith("::ffff:"):  # an IPv4 client on a dual-stack socket
        host = host.removeprefix("::ffff:")
    return is_loopback(host)


def decide(method: str, claim: Claim, peer: Peer, *, tls: bool, allow_insecure_remote: bool,
           parent_id: str | None = None) -> Refusal | None:
    """None if `peer` may call `method` with a request claiming `claim`, else why not.

    `tls`: the control plane requires client certificates (so `peer.names` are verified);
    `parent_id`: this node's registered parent, needed for claims of being it.
    """
    if method in READ_ONLY:
        return None
    if not tls:
        if allow_insecure_remote or is_local(peer.address):
            return None
        return Refusal(grpc.StatusCode.UNAUTHENTICATED,
                       f"{method} changes this node's state: without TLS (hierarchy.tls_cert,"
                       f" tls_key, tls_ca) only loopback clients may call it, not {peer.address}")
    if not peer.names:
        return Refusal(grpc.StatusCode.UNAUTHENTICATED,
                       f"{method} changes this node's state and needs a client certificate"
                       " signed by the control plane's CA")
    named = ", ".join(peer.names)
    if claim.node_id and claim.node_id not in peer.names:
        return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                       f"{method} for node {claim.node_id!r} refused: the client certificate"
                       f" names {named}, not {claim.node_id} (a node's certificate must have"
                       " its node id as CN or subject alternative name)")
    if claim.parent:
        if not parent_id:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"{method} is only accepted from this node's parent, and no parent"
                           " is registered")
        if parent_id not in peer.names:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"{method} is only accepted from this node's parent {parent_id};"
                           f" the client certificate names {named}")
    return None


def peer_of(context: grpc.ServicerContext) -> Peer:
    """The caller's address and, over TLS, the names its verified certificate carries."""
    auth = context.auth_context()
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth.get(key, ()):
            name = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            if name not in names:
                names.append(name)
    return Peer(context.peer(), tuple(names))


class Authorizer(grpc.ServerInterceptor):
    """Applies `decide` to every state-changing Control RPC before its handler runs."""

    def __init__(self, tls: bool, allow_insecure_remote: bool,
                 parent_id: Callable[[], str | None]) -> None:
        self.tls = tls
        self.allow_insecure_remote = allow_insecure_remote
        self.parent_id = parent_id  # read per call: the parent is learnt at registration

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                        grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        service, _, method = handler_call_details.method.strip("/").rpartition("/")
        if handler is None or service != SERVICE_NAME or method in READ_ONLY:
            return handler
        return _guarded(handler, lambda request, context: self.check(method, request, context))

    def check(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        claim = claim_of(method, request)
        peer = peer_of(context)
        # Only a parent claim needs the database; without TLS there is nothing to compare.
        parent_id = self.parent_id() if claim.parent and self.tls else None
        refusal = decide(method, claim, peer, tls=self.tls,
                         allow_insecure_remote=self.allow_insecure_remote, parent_id=parent_id)
        if refusal is not None:
            log.warning("control plane refused %s from %s (certificate: %s): %s", method,
                        peer.address, ", ".join(peer.names) or "none", refusal.message)
            context.abort(refusal.code, refusal.message)


def _guarded(handler: grpc.RpcMethodHandler,
             check: Callable[[Any, grpc.ServicerContext], None]) -> grpc.RpcMethodHandler:
    """The same handler, with `check` run on the request first (abort raises out of it)."""
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(request, context)
            return unary(request, context)
        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            check(request, context)
            yield from streaming(request, context)
        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer)
    # Client-streaming RPCs carry no single request to read a claim from: the peer alone.
    inner: Any = handler.stream_unary or handler.stream_stream
    wrap = (grpc.stream_unary_rpc_method_handler if handler.stream_unary is not None
            else grpc.stream_stream_rpc_method_handler)

    def streamed(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        check(None, context)
        return inner(requests, context)
    return wrap(streamed, handler.request_deserializer, handler.response_serializer)
