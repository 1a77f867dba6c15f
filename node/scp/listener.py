"""The TCP/TLS side of a DICOM listener: screen each connection before pynetdicom takes it.

pynetdicom reads whatever arrives first as a PDU: garbage or a port scanner keeps an acceptor
thread waiting for its timers, and a peer that connects and closes holds one for the whole ACSE
timeout. On a plain DICOM port the node's gate (scp/gate.py, main process) reads and checks the
whole A-ASSOCIATE-RQ before the connection reaches this server, which then gets the request's
bytes with the socket; an adopted connection without them (and a TLS one, after its
handshake) is screened here: a peek at the first PDU header answers anything that is not a
plausible A-ASSOCIATE-RQ with an A-ABORT at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import struct
import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from node.internals.acceptor import RememberingRequestHandler
from node.tls import tls_reason

if TYPE_CHECKING:
    from node.scp.gate import Connections, HandshakeGate

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ = 0x01
# An A-ASSOCIATE-RQ with 128 presentation contexts of 64 transfer syntaxes stays well below this.
MAX_ASSOCIATE_RQ_LENGTH = 1 << 20
# A-ABORT, source: service provider (2), reason: unrecognised PDU (1) / invalid parameter (6)
_ABORT_UNRECOGNISED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 1])
ABORT_INVALID = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])


def screen(header: bytes) -> tuple[bytes, str] | None:
    """None if `header` (the first 6 bytes) may start an association, else (abort, reason)."""
    if len(header) < 6:
        return b"", "connection closed before an A-ASSOCIATE-RQ"
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type != A_ASSOCIATE_RQ:
        return _ABORT_UNRECOGNISED, f"not an A-ASSOCIATE-RQ (PDU type 0x{pdu_type:02X})"
    if length > MAX_ASSOCIATE_RQ_LENGTH:
        return ABORT_INVALID, f"A-ASSOCIATE-RQ claims an absurd length ({length} bytes)"
    return None


class SharedContexts(list[PresentationContext]):
    """The AE's supported contexts as a server hands them to each association it accepts.

    pynetdicom deep-copies them for every association: 41 ms for the node's 178 storage,
    query/retrieve and commitment contexts, paid by every modality that opens an association
    per study. Negotiation only reads them and the admission handler assigns a new list rather
    than change this one, so the association gets its own list of the shared contexts.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return list(self)


class Listen(NamedTuple):
    """One listening socket: a port, plain DICOM or DICOM over TLS."""

    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'TLS ' if self.tls else ''}port {self.port}"


class Dispatcher(Protocol):
    """Spreads accepted connections over the node's association processes."""

    def hand_off(self, sock: socket.socket, address: tuple[str, int], listen: Listen,
                 request: bytes = b"") -> bool:
        """True if another process took the connection (with `request`, the A-ASSOCIATE-RQ
        already read from it); False: serve it here (and call `finished` when it ends)."""
        ...

    def finished(self, address: tuple[str, int]) -> None: ...


class ScreeningAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, plus a screen, TCP_NODELAY and timeouts on every
    connection, and TLS handshakes done in the connection's own thread.

    pynetdicom does the handshake in its accept loop, so one client that connects and never
    sends a ClientHello would block every new association on the port.
    """

    # A connection's thread lives as long as its association when a dispatcher counts it:
    # closing the listener must not wait for them (the node's stop has its own grace).
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, gate: HandshakeGate | None = None,
                 connections: Connections | None = None, backlog: int = 5,
                 handshake_timeout: float = 5.0, **kwargs: Any) -> None:
        """`gate`: reads each plain connection's A-ASSOCIATE-RQ first (None: screened here);
        `connections`: counts connections by address (the main process's listeners);
        `backlog`: the listen backlog; `handshake_timeout`: for a TLS handshake and the
        screen's peek."""
        self.gate = gate
        self.connections = connections
        self.request_queue_size = backlog
        self.handshake_timeout = handshake_timeout
        # What the connection thread's handler replays to pynetdicom (its A-ASSOCIATE-RQ).
        self.connection = threading.local()
        # Before the socket is bound: a bind that fails (port in use) closes the server, and
        # server_close closes these with it.
        self._wake_r, self._wake_w = os.pipe()
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)
        self.listen = Listen(self.server_address[1], self.ssl_context is not None)
        self.dispatcher: Dispatcher | None = None
        self.RequestHandlerClass = RememberingRequestHandler
        self._closing = False
        self._served = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's accept loop, except that `shutdown` wakes it at once: with
        socketserver's own, every listener's close (a node's stop, a partition's port taken
        away) waits for the loop's next poll, up to half a second."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._closing:
                    ready = selector.select()
                    if self._closing:
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        # socketserver's own step per connection (accept, verify, process);
                        # typeshed does not declare this private method.
                        self._handle_request_noblock()  # type: ignore[attr-defined]
                    self.service_actions()
        finally:
            self._served.set()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if self.connections is None or not isinstance(client_address, tuple):
            return True
        if self.gate is not None:
            return not self.gate.refused(request, client_address)
        why = self.connections.open(client_address[0])  # (a TLS port: no gate)
        if why is not None:
            log.warning("connection from %s:%d refused: %s", *client_address, why)
            return False
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.gate is not None and not self.listen.tls:
            self.gate.admit(request, client_address, self.serve_connection)
        else:
            self.serve_connection(request, client_address)

    def serve_connection(self, sock: socket.socket, address: tuple[str, int],
                         request: bytes = b"") -> None:
        """Serve a connection (its A-ASSOCIATE-RQ, if already read: `request`) here or in
        another association process."""
        if self.dispatcher is not None and self.dispatcher.hand_off(
                sock, address, self.listen, request):
            # The other process holds its own descriptor: close ours without shutdown(),
            # which would end the connection for it too.
            sock.close()
            return
        if self.connections is not None:
            self.connections.handshaken(address[0], 0)
        threading.Thread(target=self.process_request_thread, args=(sock, address, request),
                         daemon=True).start()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # typeshed types RequestHandlerClass's server as Self, which mypy does not bind on
        # an attribute of Callable type (python/mypy: "Self in Callable attribute").
        handler = self.RequestHandlerClass(request, client_address, self)  # type: ignore[arg-type]
        if (self.dispatcher is not None or self.connections is not None) \
                and isinstance(handler, RememberingRequestHandler) and handler.assoc is not None:
            # The dispatcher and the connection counts count connections until they end, not
            # until the association's own thread has started.
            handler.assoc.join()

    def process_request_thread(self, request: socket.socket,  # type: ignore[override]
                               client_address: tuple[str, int], prefix: bytes = b"") -> None:
        try:
            admitted = self._admit(request, client_address, prefix)
            if admitted is None:
                self.shutdown_request(request)
                return
            self.connection.request = prefix
            try:
                self.finish_request(admitted, client_address)
            except Exception:
                self.handle_error(admitted, client_address)
                self.shutdown_request(admitted)
            finally:
                self.connection.request = b""
        finally:
            if self.connections is not None:
                self.connections.closed(client_address[0], 0)
            if self.dispatcher is not None:
                self.dispatcher.finished(client_address)

    def _admit(self, sock: socket.socket, client_address: tuple[str, int] | str,
               request: bytes = b"") -> socket.socket | None:
        """The socket pynetdicom may use (TLS-wrapped on a TLS port), or None if refused.
        `request`: the A-ASSOCIATE-RQ the gate read and checked (nothing left to screen)."""
        # Small C-STORE responses would otherwise wait for Nagle's algorithm on some peers.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = (f"{client_address[0]}:{client_address[1]}"
                if isinstance(client_address, tuple) else client_address)
        sock.settimeout(self.handshake_timeout)
        if self.ssl_context is not None:
            secured = self._handshake(sock, peer)
            if secured is None:
                return None
            sock = secured
        elif not request:
            verdict = _screen_socket(sock)
            if verdict is not None:
                abort, reason = verdict
                log.warning("connection from %s refused: %s", peer, reason)
                if abort:
                    with contextlib.suppress(OSError):
                        sock.sendall(abort)
                return None
        # pynetdicom's DUL reads a PDU's body with a blocking recv() once its header came in:
        # a peer that stops mid-PDU (or stops reading our sends) would hold the association's
        # threads for ever. The idle timer only runs between PDUs.
        sock.settimeout(None)
        bound_blocking_io(sock, self.ae.network_timeout)
        return sock

    def _handshake(self, sock: socket.socket, peer: str) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            log.warning("TLS connection from %s refused: nothing received (%s)", peer,
                        exc or "timed out")
            return None
        if first[:1] == bytes([A_ASSOCIATE_RQ]):
            # A plain DICOM peer on the TLS port: an A-ABORT it understands, not a TLS alert.
            log.warning("connection from %s refused: plain DICOM (no TLS) on TLS port %d",
                        peer, self.server_address[1])
            with contextlib.suppress(OSError):
                sock.sendall(_ABORT_UNRECOGNISED)
            return None
        try:
            secured = self.ssl_context.wrap_socket(sock, server_side=True,
                                                   do_handshake_on_connect=False)
            secured.do_handshake()
        except ssl.SSLError as exc:
            log.warning("TLS handshake with %s failed: %s", peer, tls_reason(exc))
            return None
        except OSError as exc:
            log.warning("TLS handshake with %s failed: %s", peer, exc or "timed out")
            return None
        subject = _subject(secured)
        log.info("TLS connection from %s (%s, %s)", peer, secured.version(),
                 f"client certificate {subject}" if subject else "no client certificate")
        return secured

    def shutdown(self) -> None:
        """Stop accepting and close the socket (the node keeps its own list of listeners)."""
        self._closing = True
        if self._wake_w >= 0:
            os.write(self._wake_w, b"\0")
        self._served.wait()
        self.server_close()

    def server_close(self) -> None:
        super().server_close()
        # (once only: a descriptor number closed twice may by then be another file's)
        wake, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in wake:
            if fd >= 0:
                os.close(fd)


class AdoptingAssociationServer(ScreeningAssociationServer):
    """A server that listens nowhere: it serves connections another process accepted
    (`adopt`), with the same screen, timeouts and handlers as the listener they came to."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def adopt(self, sock: socket.socket, address: tuple[str, int], request: bytes = b"") -> None:
        self.serve_connection(sock, address, request)

    def shutdown(self) -> None:
        # Nothing runs serve_forever here, so BaseServer.shutdown would wait for ever.
        self.server_close()


def bound_blocking_io(sock: socket.socket, seconds: float | None) -> None:
    """Make each blocking recv/send on `sock` fail after `seconds` without progress.

    Kernel timeouts, not `settimeout`: a Python-level timeout puts the socket in non-blocking
    mode, and pynetdicom's DUL, which only reads when it has nothing queued to send, then
    sends answers so much slower that a C-FIND streaming thousands of them never sees the
    requestor's C-CANCEL.
    """
    if not seconds:
        return
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _screen_socket(sock: socket.socket) -> tuple[bytes, str] | None:
    """Peek at the first PDU header (without consuming it) and judge it with `screen`."""
    try:
        header = sock.recv(6, socket.MSG_PEEK | socket.MSG_WAITALL)
    except (TimeoutError, OSError) as exc:
        return b"", f"no A-ASSOCIATE-RQ ({exc or 'timed out'})"
    return screen(header)


def _subject(sock: ssl.SSLSocket) -> str:
    """The client certificate's common name, when one was sent and verified."""
    cert = sock.getpeercert()
    # Relative distinguished names, each of (attribute, value) pairs (indexed, not unpacked:
    # typeshed types the field as any certificate field's value, a str among them).
    for rdn in (cert or {}).get("subject", ()):
        for attribute in rdn:
            if attribute[0] == "commonName":
                return str(attribute[1])
    return ""
