"""The TCP side of a DICOM listener: screen each connection before pynetdicom takes it.

pynetdicom reads whatever arrives first as a PDU: garbage or a port scanner keeps an acceptor
thread waiting for its timers, and a peer that connects and closes holds one for the whole ACSE
timeout. The screen peeks at the first PDU header and answers anything that is not a plausible
A-ASSOCIATE-RQ with an A-ABORT at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import struct

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
# An A-ASSOCIATE-RQ with 128 presentation contexts of 64 transfer syntaxes stays well below this.
MAX_ASSOCIATE_RQ_LENGTH = 1 << 20
# A-ABORT, source: service provider (2), reason: unrecognised PDU (1) / invalid parameter (6)
_ABORT_UNRECOGNISED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1])
_ABORT_INVALID = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])


def screen(header: bytes) -> tuple[bytes, str] | None:
    """None if `header` (the first 6 bytes) may start an association, else (abort, reason)."""
    if len(header) < 6:
        return b"", "connection closed before an A-ASSOCIATE-RQ"
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != A_ASSOCIATE_RQ:
        return _ABORT_UNRECOGNISED, f"not an A-ASSOCIATE-RQ (PDU type 0x{pdu_type:02X})"
    if length > MAX_ASSOCIATE_RQ_LENGTH:
        return _ABORT_INVALID, f"A-ASSOCIATE-RQ claims an absurd length ({length} bytes)"
    return None


class ScreeningAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, plus a screen and TCP_NODELAY on every connection."""

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: tuple[str, int] | str) -> None:
        if isinstance(request, socket.socket) and not self._admit(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _admit(self, sock: socket.socket, client_address: tuple[str, int] | str) -> bool:
        # Small C-STORE responses would otherwise wait for Nagle's algorithm on some peers.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        previous = sock.gettimeout()
        sock.settimeout(self.ae.acse_timeout)
        try:
            header = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
        except (TimeoutError, OSError) as exc:
            header, timeout_reason = b"", f"no A-ASSOCIATE-RQ ({exc or 'timed out'})"
        else:
            timeout_reason = ""
        finally:
            sock.settimeout(previous)
        verdict = screen(header)
        if verdict is None:
            return True
        abort, reason = verdict
        peer = (f"{client_address[0]}:{client_address[1]}"
                if isinstance(client_address, tuple) else client_address)
        log.warning("connection from %s refused: %s", peer, timeout_reason or reason)
        if abort:
            with contextlib.suppress(OSError):
                sock.sendall(abort)
        return False

    def shutdown(self) -> None:
        """Stop accepting and close the socket (the node keeps its own list of listeners)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
