"""C-ECHO to a device: the DICOM "ping" of the device table (docs/how-to/devices.md)."""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from pynetdicom.sop_class import Verification

from node.config import Settings
from node.internals.tuning import CONNECTION_HANDLERS
from node.scu.requestor import requestor
from node.tls import Endpoint, tls_reason


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    status: int | None
    round_trip_ms: float
    detail: str


def echo(settings: Settings, *, endpoint: Endpoint, called_ae: str,
         calling_ae: str) -> EchoResult:
    d = settings.dicom
    ae = requestor(settings, calling_ae)
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    address, port = endpoint.address, endpoint.port
    # pynetdicom reports a failed TCP connect or TLS handshake as an abort; try them first so
    # the administrator sees "connection refused", "timed out" or "certificate verify failed".
    try:
        with socket.create_connection((address, port), timeout=d.connection_timeout) as sock:
            if endpoint.tls_args is not None:
                context, server_name = endpoint.tls_args
                context.wrap_socket(sock, server_hostname=server_name).close()
    except ssl.SSLError as exc:
        return EchoResult(False, None, (time.perf_counter() - started) * 1000,
                          f"TLS with {endpoint} failed: {tls_reason(exc)}")
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return EchoResult(False, None, (time.perf_counter() - started) * 1000,
                          f"TCP connection to {address}:{port} failed: {reason.lower()}")
    assoc = ae.associate(address, port, ae_title=called_ae, evt_handlers=CONNECTION_HANDLERS,
                         tls_args=endpoint.tls_args)
    if not assoc.is_established:
        elapsed = (time.perf_counter() - started) * 1000
        if assoc.is_rejected:
            detail = "association rejected"
            rsp = assoc.acceptor.primitive
            if rsp is not None:
                detail += f" ({rsp.reason_str})"
        elif assoc.is_aborted:
            detail = "association aborted by the peer"
        else:
            detail = f"no association with {address}:{port} (connection refused or timed out)"
        return EchoResult(False, None, elapsed, detail)
    try:
        status = assoc.send_c_echo()
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        assoc.release()
    if "Status" not in status:
        return EchoResult(False, None, elapsed, "no C-ECHO response (timeout or abort)")
    code = int(status.Status)
    return EchoResult(code == 0, code, elapsed,
                      "success" if code == 0 else f"C-ECHO status 0x{code:04X}")
