"""The request handler of the node's DICOM servers: pynetdicom's, with its
`_create_association` hook overridden (for scp/listener.py; node/internals/README.md)."""

from __future__ import annotations

from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler

from node.internals import pdu_guard


class RememberingRequestHandler(RequestHandler):
    """pynetdicom's handler, keeping the association it started (it runs in its own thread),
    whose DUL first reads the A-ASSOCIATE-RQ the gate already took off the socket."""

    assoc: Association | None = None

    def _create_association(self) -> Association:
        self.assoc = super()._create_association()
        request = getattr(self.server.connection, "request", b"")  # type: ignore[attr-defined]
        if request and self.assoc.dul.socket is not None:
            pdu_guard.guard(self.assoc.dul.socket, request)
            # The whole request is in hand: its A-ASSOCIATE indication comes at once, or never
            # (a peer gone before pynetdicom read it, a request its state machine drops).
            # Waiting the whole ACSE timeout for it would hold a slot and the address's count;
            # handlers.on_requested puts the ACSE timeout back.
            self.assoc.acse_timeout = self.server.handshake_timeout  # type: ignore[attr-defined]
        return self.assoc
