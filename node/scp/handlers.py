"""pynetdicom event handlers: admission (EVT_REQUESTED), C-ECHO, C-STORE and clean-up."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from sqlalchemy.exc import SQLAlchemyError

from node.db.database import Database
from node.scp import admission, lookup
from node.scp.coercion import CoercionError, parse_rules
from node.scp.commitment import StorageCommitment
from node.scp.contexts import requestor_first
from node.scp.qr import QueryRetrieve
from node.scp.store import PROCESSING_FAILURE, Ingest, Peer

log = logging.getLogger(__name__)


def _peer_address(assoc: Association) -> tuple[str, int]:
    return assoc.requestor.address, assoc.requestor.port


class ScpHandlers:
    """One instance per node; the port a listener serves is bound as a handler argument."""

    def __init__(self, db: Database, ingest: Ingest, qr: QueryRetrieve,
                 commitment: StorageCommitment,
                 supported: Mapping[str, PresentationContext], by_requestor: bool) -> None:
        """`supported`: the AE's contexts by abstract syntax; `by_requestor`: the requestor's
        order of transfer syntaxes decides (dicom.transfer_syntax_preference = "requestor")."""
        self.db = db
        self.ingest = ingest
        self.qr = qr
        self.commitment = commitment
        self.supported = supported
        self.requestor_order: dict[str, list[str]] | None = (
            {uid: [str(ts) for ts in cx.transfer_syntax] for uid, cx in supported.items()}
            if by_requestor else None)
        self._peers: dict[Association, Peer] = {}
        self._lock = threading.Lock()

    def for_port(self, port: int) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.on_requested, [port]),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_N_ACTION, self.on_n_action),
            (evt.EVT_N_EVENT_REPORT, self.on_n_event_report),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
        ]

    def peer(self, assoc: Association) -> Peer | None:
        with self._lock:
            return self._peers.get(assoc)

    def on_requested(self, event: evt.Event, port: int) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        called = primitive.called_ae_title.strip()
        calling = primitive.calling_ae_title.strip()
        ip, peer_port = _peer_address(assoc)
        try:
            with self.db.session() as session:
                partition = lookup.partition_for(session, called, port)
                device = (lookup.device_for(session, partition.id, calling)
                          if partition is not None else None)
                routes, send_updates = (lookup.routes_for(session, partition.id)
                                        if partition is not None else ((), {}))
        except SQLAlchemyError as exc:
            log.error("association from %s@%s:%s refused: index unavailable: %s",
                      calling, ip, peer_port, exc)
            self._reject(assoc, admission.RejectReason.LOCAL_LIMIT_EXCEEDED)
            return
        decision = admission.decide(partition, device, calling, called)
        if not decision.accepted:
            assert decision.reason is not None
            log.warning("association from %s@%s:%s to %s on port %d rejected: %s",
                        calling, ip, peer_port, called, port, decision.explanation)
            self._reject(assoc, decision.reason)
            return
        assert partition is not None
        if decision.auto_insert:
            lookup.auto_insert(self.db, partition, calling, ip)
        rules = ()
        if device is not None and device.coercion_rules.strip():
            try:
                rules = tuple(parse_rules(device.coercion_rules))
            except CoercionError as exc:
                # Only reachable if the table was edited behind the CLI's back.
                log.error("device %s has invalid coercion rules, none applied: %s",
                          device.name, exc)
        if self.requestor_order is not None:
            requested = [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
                         for cx in primitive.presentation_context_definition_list]
            assoc.acceptor.supported_contexts = [
                self._context(abstract, syntaxes)
                for abstract, syntaxes in requestor_first(requested, self.requestor_order)
            ]
        with self._lock:
            self._peers[assoc] = Peer(partition, device, rules, calling, f"{ip}:{peer_port}",
                                      routes, send_updates)
        log.info("association from %s@%s:%s to %s accepted", calling, ip, peer_port, called)

    def _context(self, abstract: str, syntaxes: list[str]) -> PresentationContext:
        """A supported context with the syntaxes reordered, keeping its role selection."""
        context = build_context(abstract, syntaxes)
        context.scu_role = self.supported[abstract].scu_role
        context.scp_role = self.supported[abstract].scp_role
        return context

    @staticmethod
    def _reject(assoc: Association, reason: admission.RejectReason) -> None:
        result, source, diagnostic = reason.value
        assoc.acse.send_reject(result, source, diagnostic)
        # Without kill() the peer would see an A-ABORT instead of the A-ASSOCIATE-RJ.
        assoc.kill()

    def on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def on_store(self, event: evt.Event) -> Dataset:
        peer = self.peer(event.assoc)
        request = event.request
        rsp = Dataset()
        if peer is None:
            rsp.Status = PROCESSING_FAILURE
            rsp.ErrorComment = "association was not admitted"
            return rsp
        outcome = self.ingest.store(peer, Path(event.dataset_path),
                                    str(request.AffectedSOPClassUID),
                                    str(request.AffectedSOPInstanceUID))
        rsp.Status = outcome.status
        if outcome.comment:
            rsp.ErrorComment = outcome.comment[:64]
        return rsp

    def on_find(self, event: evt.Event) -> Iterator[Any]:
        peer = self.peer(event.assoc)
        if peer is None:
            yield PROCESSING_FAILURE, None
            return
        yield from self.qr.find(event, peer)

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        peer = self.peer(event.assoc)
        if peer is None:
            yield None, None
            return
        yield from self.qr.move(event, peer)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        peer = self.peer(event.assoc)
        if peer is None:
            yield 0
            return
        yield from self.qr.get(event, peer)

    def on_n_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        peer = self.peer(event.assoc)
        if peer is None:
            return PROCESSING_FAILURE, None
        return self.commitment.on_action(event, peer)

    def on_n_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        return self.commitment.on_event_report(event)

    def on_aborted(self, event: evt.Event) -> None:
        peer = self.peer(event.assoc)
        ip, port = _peer_address(event.assoc)
        log.warning("association with %s aborted", peer or f"{ip}:{port}")

    def on_conn_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            peer = self._peers.pop(assoc, None)
        _discard_partial_dataset(assoc)
        if peer is None and not assoc.is_rejected:
            ip, port = _peer_address(assoc)
            log.warning("connection from %s:%s closed without an accepted association "
                        "(no or invalid A-ASSOCIATE-RQ)", ip, port)


def _discard_partial_dataset(assoc: Association) -> None:
    """Remove the temporary file of a C-STORE cut off mid-transfer (pynetdicom leaves it)."""
    message = getattr(assoc.dimse, "message", None)
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    with contextlib.suppress(OSError):
        partial.close()
    with contextlib.suppress(OSError):
        Path(partial.name).unlink()
