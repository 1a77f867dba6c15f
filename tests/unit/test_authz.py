"""The control plane's authorisation rule: which RPCs change state, and who may call them."""

from __future__ import annotations

import grpc
import pytest

from hierarchy.authz import (
    READ_ONLY,
    SERVICE_NAME,
    STATE_CHANGING,
    Authorizer,
    Claim,
    Peer,
    claim_of,
    decide,
    is_local,
)
from hierarchy.rpc import control_pb2 as pb

LOCAL = "ipv4:127.0.0.1:40312"
REMOTE = "ipv4:10.1.2.3:40312"


def test_every_rpc_is_classified_once() -> None:
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Control"].methods}
    assert SERVICE_NAME == "pacsnode.control.v1.Control"
    assert methods == READ_ONLY | STATE_CHANGING
    assert not READ_ONLY & STATE_CHANGING


def test_claims_name_the_sender_the_request_carries() -> None:
    assert claim_of("Register", pb.RegisterRequest(child=pb.NodeInfo(node_id="a"))) == Claim("a")
    assert claim_of("Heartbeat", pb.HeartbeatRequest(node_id="a")) == Claim("a")
    assert claim_of("PushDeviceChanges", pb.PushDeviceChangesRequest(from_node="a")) == Claim("a")
    assert claim_of("Recollect", pb.RecollectRequest(via="a")) == Claim("a")
    assert claim_of("Recollect", pb.RecollectRequest()) == Claim()  # the CLI
    assert claim_of("PublishDirectory", pb.PublishDirectoryRequest(root_id="r")) == Claim(
        parent=True)
    assert claim_of("RefreshIp", pb.RefreshIpRequest(hierarchy=True, subtree=True)) == Claim(
        parent=True)
    assert claim_of("RefreshIp", pb.RefreshIpRequest(hierarchy=True)) == Claim()


@pytest.mark.parametrize(("address", "local"), [
    (LOCAL, True), ("ipv4:127.8.9.10:1", True), ("ipv6:%5B::1%5D:55102", True),
    ("ipv6:[::1]:55102", True), ("ipv6:%5B::ffff:127.0.0.1%5D:1", True),
    ("unix:/run/pacsnode.sock", True), (REMOTE, False), ("ipv6:%5B2001:db8::1%5D:1", False),
    ("ipv6:%5B::ffff:10.0.0.1%5D:1", False), ("", False), ("weird", False),
])
def test_local_peers(address: str, local: bool) -> None:
    assert is_local(address) is local


def tls(method: str, claim: Claim, names: tuple[str, ...],
        parent_id: str | None = None) -> grpc.StatusCode | None:
    refusal = decide(method, claim, Peer(REMOTE, names), tls=True, allow_insecure_remote=False,
                     parent_id=parent_id)
    return None if refusal is None else refusal.code


def test_with_tls_a_certificate_speaks_only_for_the_node_it_names() -> None:
    assert tls("Register", Claim("site-a"), ("site-a", "site-a.lan")) is None
    assert tls("Register", Claim("site-a"), ("site-a.lan", "site-a")) is None  # a SAN
    assert tls("Register", Claim("site-a"), ("site-b",)) == grpc.StatusCode.PERMISSION_DENIED
    assert tls("Heartbeat", Claim("site-a"), ("site-b",)) == grpc.StatusCode.PERMISSION_DENIED
    assert tls("PushDeviceChanges", Claim("a"), ("b",)) == grpc.StatusCode.PERMISSION_DENIED
    # No sender in the request (the CLI with the node's own certificate): any verified peer.
    assert tls("Recollect", Claim(), ("site-a",)) is None
    assert tls("RefreshIp", Claim(), ("site-a",)) is None
    # No certificate at all (cannot pass the handshake, refused all the same).
    assert tls("RefreshIp", Claim(), ()) == grpc.StatusCode.UNAUTHENTICATED
    # Reading needs no particular identity.
    assert tls("GetNodeInfo", Claim(), ()) is None
    assert tls("HierarchyStatus", Claim(), ("anyone",)) is None


def test_what_flows_down_the_tree_comes_only_from_the_parent() -> None:
    down = Claim(parent=True)
    assert tls("PublishDirectory", down, ("region",), parent_id="region") is None
    assert tls("PublishDirectory", down, ("site-b",), parent_id="region") == \
        grpc.StatusCode.PERMISSION_DENIED
    assert tls("PublishDirectory", down, ("region",), parent_id=None) == \
        grpc.StatusCode.PERMISSION_DENIED  # a root has no parent to take it from
    assert tls("RefreshIp", down, ("site-b",), parent_id="region") == \
        grpc.StatusCode.PERMISSION_DENIED


def test_refusals_name_the_problem() -> None:
    refusal = decide("Heartbeat", Claim("site-a"), Peer(REMOTE, ("site-b", "b.lan")), tls=True,
                     allow_insecure_remote=False)
    assert refusal is not None
    assert "Heartbeat for node 'site-a'" in refusal.message
    assert "names site-b, b.lan" in refusal.message
    refusal = decide("Register", Claim("x"), Peer(REMOTE), tls=False, allow_insecure_remote=False)
    assert refusal is not None and "only loopback clients" in refusal.message
    assert REMOTE in refusal.message


def test_without_tls_only_loopback_peers_change_state() -> None:
    def plain(method: str, address: str, allow: bool = False) -> grpc.StatusCode | None:
        refusal = decide(method, Claim("x"), Peer(address), tls=False,
                         allow_insecure_remote=allow)
        return None if refusal is None else refusal.code

    for method in sorted(STATE_CHANGING):
        assert plain(method, LOCAL) is None
        assert plain(method, REMOTE) == grpc.StatusCode.UNAUTHENTICATED
        assert plain(method, REMOTE, allow=True) is None  # the administrator's explicit choice
    for method in sorted(READ_ONLY):
        assert plain(method, REMOTE) is None
    # A method nobody classified yet is guarded.
    assert plain("SomethingNew", REMOTE) == grpc.StatusCode.UNAUTHENTICATED


class Aborted(Exception):
    pass


class FakeContext:
    """What the interceptor reads of a call: its peer and certificate, and how it aborts."""

    def __init__(self, peer: str, names: tuple[bytes, ...] = ()) -> None:
        self._peer = peer
        self._auth = {"x509_common_name": list(names[:1]),
                      "x509_subject_alternative_name": list(names[1:])} if names else {}
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_the_interceptor_guards_every_kind_of_handler() -> None:
    authorizer = Authorizer(tls=True, allow_insecure_remote=False, parent_id=lambda: "region")
    calls: list[str] = []

    def intercept(method: str, handler: grpc.RpcMethodHandler,
                  service: str = SERVICE_NAME) -> grpc.RpcMethodHandler:
        guarded = authorizer.intercept_service(lambda _details: handler,
                                               Details(f"/{service}/{method}"))
        assert guarded is not None
        return guarded

    heartbeat = intercept("Heartbeat", grpc.unary_unary_rpc_method_handler(
        lambda request, _context: calls.append(request.node_id) or "ok"))
    assert heartbeat.unary_unary is not None
    assert heartbeat.unary_unary(pb.HeartbeatRequest(node_id="site-a"),
                                 FakeContext(REMOTE, (b"site-a",))) == "ok"
    context = FakeContext(REMOTE, (b"site-b", b"site-b.lan"))
    with pytest.raises(Aborted):
        heartbeat.unary_unary(pb.HeartbeatRequest(node_id="site-a"), context)
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.PERMISSION_DENIED
    assert calls == ["site-a"]  # the refused call never reached the handler

    publish = intercept("PublishDirectory", grpc.unary_stream_rpc_method_handler(
        lambda _request, _context: iter(["stored"])))
    assert publish.unary_stream is not None
    assert list(publish.unary_stream(pb.PublishDirectoryRequest(),
                                     FakeContext(REMOTE, (b"region",)))) == ["stored"]
    with pytest.raises(Aborted):
        list(publish.unary_stream(pb.PublishDirectoryRequest(), FakeContext(REMOTE, (b"x",))))

    # A client-streaming RPC (none exists yet) is guarded on its peer alone.
    upload = intercept("Upload", grpc.stream_unary_rpc_method_handler(
        lambda requests, _context: sum(requests)))
    assert upload.stream_unary is not None
    assert upload.stream_unary(iter([1, 2]), FakeContext(REMOTE, (b"any",))) == 3
    with pytest.raises(Aborted):
        upload.stream_unary(iter([1]), FakeContext(REMOTE))

    # Reads and other services pass through untouched.
    info = grpc.unary_unary_rpc_method_handler(lambda _r, _c: "info")
    assert intercept("GetNodeInfo", info) is info
    assert intercept("Check", info, service="grpc.health.v1.Health") is info
