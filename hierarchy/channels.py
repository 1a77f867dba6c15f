"""gRPC channels and server credentials: mutual TLS when certificates are configured."""

from __future__ import annotations

import threading

import grpc

from hierarchy.rpc import control_pb2_grpc as rpc
from node.config import Settings

# Keepalive so a silently vanished peer is noticed; small messages, fast reconnects.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


def _read(settings: Settings, key: str) -> bytes:
    path = settings.tls_file(key)
    assert path is not None
    return path.read_bytes()


def uses_tls(settings: Settings) -> bool:
    return bool(settings.hierarchy.tls_cert)


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """Only clients whose certificate the configured CA signed may connect."""
    return grpc.ssl_server_credentials(
        [(_read(settings, "tls_key"), _read(settings, "tls_cert"))],
        root_certificates=_read(settings, "tls_ca"), require_client_auth=True)


def open_channel(settings: Settings, address: str) -> grpc.Channel:
    if not uses_tls(settings):
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings, "tls_ca"), private_key=_read(settings, "tls_key"),
        certificate_chain=_read(settings, "tls_cert"))
    options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
    if settings.hierarchy.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.hierarchy.tls_server_name))
    return grpc.secure_channel(address, credentials, options=options)


class Peers:
    """One channel per neighbour address, reused by every call (channels are thread-safe)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def stub(self, address: str) -> rpc.ControlStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = open_channel(self.settings, address)
        return rpc.ControlStub(channel)

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()


def describe(error: grpc.RpcError) -> str:
    """A one-line reason for an administrator: the status code and gRPC's detail."""
    code = error.code() if hasattr(error, "code") else None
    detail = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "ERROR"
    return f"{name}: {detail}" if detail else name
