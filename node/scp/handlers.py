"""pynetdicom event handlers: admission (EVT_REQUESTED), C-ECHO, C-STORE and clean-up."""

from __future__ import annotations

import logging
import threading
import time
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from pydicom.dataset import Dataset
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy.exc import SQLAlchemyError

from node.activity import ActivityLog, Event
from node.db.database import Database
from node.ingest import lookup
from node.ingest.pipeline import Ingest, Outcome, Peer
from node.internals.direct_store import DirectStore, StoreRequest
from node.internals.pdu_guard import discard_partial_dataset
from node.internals.prompt import PromptDUL
from node.policy import admission
from node.policy.contexts import requestor_first
from node.scp.commitment import StorageCommitment
from node.scp.qr import QueryRetrieve
from node.scp.registry import Admissions
from node.sop_classes import unknown_storage_classes
from node.statuses import PROCESSING_FAILURE, SUCCESS
from node.storage.dirsync import DirectorySyncs
from node.storage.files import DeferredSync, ReceivedFile

log = logging.getLogger(__name__)


def _peer_address(assoc: Association) -> tuple[str, int]:
    return assoc.requestor.address, assoc.requestor.port


def _request(assoc: Association) -> A_ASSOCIATE:
    """The peer's A-ASSOCIATE-RQ (received before any handler that asks for it runs)."""
    primitive = assoc.requestor.primitive
    assert primitive is not None
    return primitive


class _Parties(TypedDict):
    """Who an association's activity rows name."""
    partition: str
    calling_ae: str
    called_ae: str
    peer: str


# Contexts in requestor order kept for reuse (see ScpHandlers._context).
_MAX_CACHED_CONTEXTS = 4096

# How a reject reads in the activity log: what the peer was told, then why.
REJECTED = {
    admission.RejectReason.CALLED_AE_NOT_RECOGNISED: "called AE not recognised",
    admission.RejectReason.CALLING_AE_NOT_RECOGNISED: "calling AE not recognised",
    admission.RejectReason.LOCAL_LIMIT_EXCEEDED: "local limit exceeded",
}


@dataclass
class Usage:
    """What one accepted association did; written as activity rows when it closes."""

    called_ae: str
    opened: float = field(default_factory=time.monotonic)
    echoes: int = 0
    stored: int = 0
    store_failures: int = 0
    finds: int = 0
    moves: int = 0
    gets: int = 0
    commitments: int = 0
    aborted: bool = False
    studies: dict[str, list[int]] = field(default_factory=dict)  # study UID -> [ok, failed]
    last_failure: dict[str, str] = field(default_factory=dict)  # study UID -> status, comment

    def study(self, uid: str) -> list[int]:
        return self.studies.setdefault(uid, [0, 0])

    def summary(self) -> str:
        parts = [(self.stored, "store"), (self.store_failures, "failed store"),
                 (self.finds, "find"), (self.moves, "move"), (self.gets, "get"),
                 (self.commitments, "commitment"), (self.echoes, "echo")]
        text = ", ".join(f"{n} {word}{'es' if word == 'echo' else 's'}" if n != 1
                         else f"{n} {word}" for n, word in parts if n)
        return text or "nothing"


class ScpHandlers:
    """One instance per node; the port a listener serves is bound as a handler argument."""

    def __init__(self, db: Database, ingest: Ingest, qr: QueryRetrieve,
                 commitment: StorageCommitment,
                 supported: Mapping[str, PresentationContext], by_requestor: bool,
                 activity: ActivityLog | None, admissions: Admissions, *,
                 accept_unknown: bool = False) -> None:
        """`supported`: the AE's contexts by abstract syntax; `by_requestor`: the requestor's
        order of transfer syntaxes decides (dicom.transfer_syntax_preference = "requestor");
        `activity`: where association, reject and store rows go (None: not recorded);
        `admissions`: counts inbound associations against the node's limits;
        `accept_unknown`: a proposed SOP class no library knows is accepted as storage
        (dicom.accept_unknown_sop_classes)."""
        self.db = db
        self.lookups = lookup.AdmissionLookups(db)
        self.admissions = admissions
        self.activity = activity if activity is not None and activity.enabled else None
        self.ingest = ingest
        self.qr = qr
        self.commitment = commitment
        self.supported = supported
        self.accept_unknown = accept_unknown
        # What a storage context of a SOP class the node does not know is made of: the
        # syntaxes (in the node's order) and roles of its other storage contexts.
        self._storage = supported[CTImageStorage]
        self._storage_syntaxes = [str(ts) for ts in self._storage.transfer_syntax]
        self.requestor_order: dict[str, list[str]] | None = (
            {uid: [str(ts) for ts in cx.transfer_syntax] for uid, cx in supported.items()}
            if by_requestor else None)
        self._peers: dict[Association, Peer] = {}
        self._usage: dict[Association, Usage] = {}
        self._tokens: dict[Association, int] = {}
        # The log line of an admitted association, written once pynetdicom has accepted it.
        self._admitted: dict[Association, str] = {}
        self._lock = threading.Lock()
        self._contexts: dict[tuple[str, tuple[str, ...]], PresentationContext] = {}
        # The direct receivers' directory fsyncs, deferred past their answers; the server
        # closes it once its associations have ended.
        self.directory_syncs = DirectorySyncs()

    def for_port(self, port: int, tls: bool = False) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.on_requested, [port, tls]),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_N_ACTION, self.on_n_action),
            (evt.EVT_N_EVENT_REPORT, self.on_n_event_report),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected, [port, tls]),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
        ]

    def peer(self, assoc: Association) -> Peer | None:
        with self._lock:
            return self._peers.get(assoc)

    def _used(self, assoc: Association) -> Usage | None:
        with self._lock:
            return self._usage.get(assoc)

    def _record(self, event: Event) -> None:
        if self.activity is not None:
            self.activity.record(event)

    def on_requested(self, event: evt.Event, port: int, tls: bool) -> None:
        assoc = event.assoc
        assoc.acse_timeout = assoc.ae.acse_timeout  # (shortened until now: listener.py)
        primitive = _request(assoc)
        called = primitive.called_ae_title.strip()
        calling = primitive.calling_ae_title.strip()
        ip, peer_port = _peer_address(assoc)
        try:
            found = self.lookups.find(called, port, tls, calling, f"{ip}:{peer_port}")
        except SQLAlchemyError as exc:
            log.error("association from %s@%s:%s refused: index unavailable: %s",
                      calling, ip, peer_port, exc)
            self._reject(assoc, admission.RejectReason.LOCAL_LIMIT_EXCEEDED)
            self._record(Event("reject", calling_ae=calling, called_ae=called,
                               peer=f"{ip}:{peer_port}", outcome="failed",
                               detail="local limit exceeded: index database unavailable"))
            return
        partition, device, peer = found.partition, found.device, found.peer
        decision = admission.decide(partition, device, calling, called, found.device_checked)
        if not decision.accepted:
            assert decision.reason is not None
            self._refuse(assoc, decision, port, tls, partition)
            return
        assert partition is not None and peer is not None
        proposed = primitive.presentation_context_definition_list
        unknown = unknown_storage_classes(
            (str(cx.abstract_syntax) for cx in proposed), self.supported) \
            if self.accept_unknown else []
        added = dict.fromkeys(unknown, self._storage_syntaxes)
        if self.requestor_order is not None:
            requested = [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
                         for cx in proposed]
            order: ChainMap[str, list[str]] = ChainMap(self.requestor_order, added)
            assoc.acceptor.supported_contexts = [
                self._context(abstract, syntaxes) for abstract, syntaxes
                in requestor_first(requested, order)
            ]
        elif added:
            assoc.acceptor.supported_contexts = [
                *assoc.acceptor.supported_contexts,
                *(self._context(abstract, syntaxes) for abstract, syntaxes in added.items())]
        with self._lock:
            # pynetdicom ends some associations without EVT_CONN_CLOSE (an exception in its
            # reactor, e.g. the disk filling mid-transfer): forget those here, and drop the
            # temporary file they were writing.
            dead = [a for a in self._peers if not a.is_alive() and a is not assoc]
            for gone in dead:
                self._peers.pop(gone, None)
                self._usage.pop(gone, None)
                self._admitted.pop(gone, None)
            tokens = [self._tokens.pop(gone) for gone in dead if gone in self._tokens]
        for gone in dead:
            _discard_partial_dataset(gone)
        for held in tokens:
            self.admissions.release(held)
        token, too_many = self.admissions.admit(partition, device, calling)
        if token is not None:
            with self._lock:
                self._peers[assoc] = peer
                self._tokens[assoc] = token
                if self.activity is not None:
                    self._usage[assoc] = Usage(called)
        if too_many is not None:
            self._refuse(assoc, admission.Admission(
                False, admission.RejectReason.LOCAL_LIMIT_EXCEEDED, too_many), port, tls,
                partition)
            return
        if decision.auto_insert and self.db.answering():
            with self.db.deadline(lookup.ADMISSION_WAIT):
                lookup.auto_insert(self.db, partition, calling, ip)
        if isinstance(assoc.dul, PromptDUL):
            assoc.dul.store_receiver = DirectStore(assoc, self.on_direct_store,
                                                   self.ingest.incoming, self.directory_syncs)
        with self._lock:
            self._admitted[assoc] = (
                f"association from {calling}@{ip}:{peer_port} to {called} accepted"
                + (" (TLS)" if tls else "")
                + (f"; SOP classes no library knows, taken as storage: {', '.join(unknown)}"
                   if unknown else ""))

    def on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            line = self._admitted.pop(event.assoc, None)
        if line is not None:
            log.info("%s", line)

    def on_rejected(self, event: evt.Event, port: int, tls: bool) -> None:
        """pynetdicom rejected an association the node had admitted (its own association
        limit, counted per process over every association thread, or a check of its own):
        logged and recorded like the node's own rejects, and its admission released."""
        assoc = event.assoc
        with self._lock:
            self._admitted.pop(assoc, None)
            peer = self._peers.pop(assoc, None)
            self._usage.pop(assoc, None)
            token = self._tokens.pop(assoc, None)
        if token is not None:
            self.admissions.release(token)
        acceptors = sum(a.is_acceptor for a in assoc.ae.active_associations)
        if acceptors > assoc.ae.maximum_associations:
            why = (f"local limit exceeded: {acceptors} association threads in this process "
                   f"(pynetdicom's limit {assoc.ae.maximum_associations})")
        else:
            why = "rejected by pynetdicom's own negotiation (e.g. user identity)"
        primitive = _request(assoc)
        called = primitive.called_ae_title.strip()
        calling = primitive.calling_ae_title.strip()
        ip, peer_port = _peer_address(assoc)
        log.warning("association from %s@%s:%s to %s on %sport %d rejected: %s", calling, ip,
                    peer_port, called, "TLS " if tls else "", port, why)
        self._record(Event("reject", partition=peer.partition.ae_title if peer else "",
                           calling_ae=calling, called_ae=called, peer=f"{ip}:{peer_port}",
                           outcome="failed", detail=why))

    def _refuse(self, assoc: Association, decision: admission.Admission, port: int,
                tls: bool, partition: admission.PartitionPolicy | None) -> None:
        assert decision.reason is not None
        primitive = _request(assoc)
        called = primitive.called_ae_title.strip()
        calling = primitive.calling_ae_title.strip()
        ip, peer_port = _peer_address(assoc)
        log.warning("association from %s@%s:%s to %s on %sport %d rejected: %s",
                    calling, ip, peer_port, called, "TLS " if tls else "", port,
                    decision.explanation)
        self._reject(assoc, decision.reason)
        self._record(Event("reject", partition=partition.ae_title if partition else "",
                           calling_ae=calling, called_ae=called, peer=f"{ip}:{peer_port}",
                           outcome="failed",
                           detail=f"{REJECTED[decision.reason]}: {decision.explanation}"))

    def _context(self, abstract: str, syntaxes: list[str]) -> PresentationContext:
        """A supported context with the syntaxes reordered, keeping its role selection.

        Built once per order and then shared, as the server's own contexts are (listener.
        SharedContexts): negotiation only reads them, and building one validates every
        syntax UID again, about 1 ms per context, so a sender proposing 64 storage classes
        paid some 70 ms of CPU for every association."""
        key = (abstract, tuple(syntaxes))
        context = self._contexts.get(key)
        if context is None:
            context = build_context(abstract, syntaxes)
            # A SOP class the node does not know is taken as storage (sop_classes.py).
            roles = self.supported.get(abstract, self._storage)
            context.scu_role = roles.scu_role
            context.scp_role = roles.scp_role
            if len(self._contexts) >= _MAX_CACHED_CONTEXTS:
                self._contexts.clear()  # peers propose few distinct orders; never grow unbounded
            self._contexts[key] = context
        return context

    @staticmethod
    def _reject(assoc: Association, reason: admission.RejectReason) -> None:
        result, source, diagnostic = reason.value
        assoc.acse.send_reject(result, source, diagnostic)
        # Without kill() the peer would see an A-ABORT instead of the A-ASSOCIATE-RJ.
        assoc.kill()

    def on_echo(self, event: evt.Event) -> int:
        usage = self._used(event.assoc)
        if usage is not None:
            usage.echoes += 1
        return SUCCESS

    def on_store(self, event: evt.Event) -> Dataset:
        """A C-STORE that pynetdicom decoded (the direct receiver passed it on)."""
        request = event.request
        assert isinstance(request, C_STORE)
        outcome = self._store(event.assoc, str(request.AffectedSOPClassUID),
                              str(request.AffectedSOPInstanceUID), Path(event.dataset_path))
        rsp = Dataset()
        rsp.Status = outcome.status
        if outcome.comment:
            rsp.ErrorComment = outcome.comment[:64]
        return rsp

    def on_direct_store(self, assoc: Association, request: StoreRequest,
                        received: ReceivedFile | OSError
                        ) -> tuple[int, str, DeferredSync | None]:
        """A C-STORE taken off the wire by direct_store.DirectStore (`received`: its file, or
        why it could not be written), which hands the deferred sync to `directory_syncs` once
        it has answered."""
        outcome = self._store(assoc, request.sop_class, request.sop_instance, received,
                              defer_sync=True)
        return outcome.status, outcome.comment, outcome.deferred

    def _store(self, assoc: Association, sop_class: str, sop_instance: str,
               received: Path | ReceivedFile | OSError, defer_sync: bool = False) -> Outcome:
        peer = self.peer(assoc)
        if peer is None:
            return Outcome(PROCESSING_FAILURE, "association was not admitted")
        if isinstance(received, OSError):
            outcome = self.ingest.write_failed(peer, sop_instance, received)
        else:
            outcome = self.ingest.store(peer, received, sop_class, sop_instance, defer_sync)
        usage = self._used(assoc)
        if usage is not None:
            # One association's stores run one at a time (on its reactor or its DUL thread):
            # no lock needed for `usage`.
            counts = usage.study(outcome.study)
            if outcome.ok:
                usage.stored += 1
                counts[0] += 1
            else:
                usage.store_failures += 1
                counts[1] += 1
                usage.last_failure[outcome.study] = (
                    f"last failure 0x{outcome.status:04X}"
                    + (f": {outcome.comment}" if outcome.comment else ""))
        return outcome

    def on_find(self, event: evt.Event) -> Iterator[Any]:
        peer = self.peer(event.assoc)
        if peer is None:
            yield PROCESSING_FAILURE, None
            return
        usage = self._used(event.assoc)
        if usage is not None:
            usage.finds += 1
        yield from self.qr.find(event, peer)

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        peer = self.peer(event.assoc)
        if peer is None:
            yield None, None
            return
        usage = self._used(event.assoc)
        if usage is not None:
            usage.moves += 1
        yield from self.qr.move(event, peer)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        peer = self.peer(event.assoc)
        if peer is None:
            yield 0
            return
        usage = self._used(event.assoc)
        if usage is not None:
            usage.gets += 1
        yield from self.qr.get(event, peer)

    def on_n_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        peer = self.peer(event.assoc)
        if peer is None:
            return PROCESSING_FAILURE, None
        usage = self._used(event.assoc)
        if usage is not None:
            usage.commitments += 1
        return self.commitment.on_action(event, peer)

    def on_n_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        return self.commitment.on_event_report(event)

    def on_aborted(self, event: evt.Event) -> None:
        peer = self.peer(event.assoc)
        ip, port = _peer_address(event.assoc)
        log.warning("association with %s aborted", peer or f"{ip}:{port}")
        usage = self._used(event.assoc)
        if usage is not None:
            usage.aborted = True

    def on_conn_close(self, event: evt.Event) -> None:
        assoc = event.assoc
        with self._lock:
            peer = self._peers.pop(assoc, None)
            usage = self._usage.pop(assoc, None)
            token = self._tokens.pop(assoc, None)
            self._admitted.pop(assoc, None)
        if token is not None:
            self.admissions.release(token)
        _discard_partial_dataset(assoc)
        if peer is None and not assoc.is_rejected:
            ip, port = _peer_address(assoc)
            log.warning("connection from %s:%s closed without an accepted association "
                        "(no or invalid A-ASSOCIATE-RQ)", ip, port)
        if peer is not None and usage is not None:
            try:
                self._record_association(assoc, peer, usage)
            except Exception:
                log.exception("activity of the association with %s not recorded", peer)

    def _record_association(self, assoc: Association, peer: Peer, usage: Usage) -> None:
        """One row for the association, one per study it stored into."""
        who: _Parties = {"partition": peer.partition.ae_title, "calling_ae": peer.calling_ae,
                         "called_ae": usage.called_ae, "peer": peer.address}
        for study, (ok, failed) in usage.studies.items():
            self._record(Event(
                "store", **who, study_instance_uid=study, count=ok, failed=failed,
                outcome="ok" if not failed else "warning" if ok else "failed",
                detail=usage.last_failure.get(study, "")))
        if usage.aborted or assoc.is_aborted:
            end = "aborted"
        elif assoc.is_released:
            end = "released"
        else:
            end = "connection closed"
        self._record(Event(
            "association", **who,
            count=(usage.stored + usage.store_failures + usage.finds + usage.moves
                   + usage.gets + usage.commitments + usage.echoes),
            failed=usage.store_failures, outcome="ok" if end == "released" else "warning",
            detail=f"{usage.summary()}; {end} after {time.monotonic() - usage.opened:.1f} s"))


def _discard_partial_dataset(assoc: Association) -> None:
    discard_partial_dataset(getattr(assoc.dimse, "message", None))
