"""The DICOM listeners: one per port that has an enabled partition, kept in step with the table."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from node import dicomtrace
from node.activity import ActivityLog
from node.affinity import PROCESS_CPUS, ReceiverPinning, process_cpu
from node.config import Settings
from node.db.database import Database
from node.db.models import Partition
from node.implementation import (
    identify,
)
from node.ingest.pipeline import Ingest
from node.internals import pdu_guard, prompt
from node.internals.configure import use_supported_contexts
from node.policy.handshake import listen_backlog
from node.ports import bind_reason
from node.scp.commitment import StorageCommitment
from node.scp.gate import Connections, HandshakeGate
from node.scp.handlers import ScpHandlers
from node.scp.listener import (
    AdoptingAssociationServer,
    Dispatcher,
    Listen,
    ScreeningAssociationServer,
)
from node.scp.qr import QueryRetrieve
from node.scp.registry import Admissions
from node.sop_classes import supported_contexts
from node.tls import TlsError, server_context

log = logging.getLogger(__name__)

def build_ae(settings: Settings) -> AE:
    d = settings.dicom
    ae = AE(ae_title="PACSNODE")
    # The called AE picks the partition in EVT_REQUESTED, so the AE itself accepts any title.
    ae.require_called_aet = False
    ae.maximum_pdu_size = d.max_pdu_size
    ae.acse_timeout = d.acse_timeout
    ae.dimse_timeout = d.dimse_timeout
    ae.network_timeout = d.network_timeout
    ae.connection_timeout = d.connection_timeout
    # The node's limit is enforced (with a logged, recorded reject) when an association is
    # admitted; pynetdicom's own count also includes threads still finishing, so it is only a
    # backstop here.
    ae.maximum_associations = 2 * d.maximum_associations
    # The C-MOVE sub-operation associations are requested by this AE too.
    identify(ae, version_name=d.send_implementation_version_name)
    use_supported_contexts(ae, supported_contexts(tuple(settings.accepted_transfer_syntaxes)))
    return ae


def somaxconn() -> int:
    """The kernel's cap on a listen backlog."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def listen_failure(host: str, listen: Listen, partitions: list[str],
                   exc: OSError | TlsError) -> str:
    """One line: which port could not be opened, for which partitions, and why."""
    why = bind_reason(exc) if isinstance(exc, OSError) else str(exc)
    return (f"cannot listen on DICOM {listen} ({host}) of partition"
            f"{'s' if len(partitions) > 1 else ''} {', '.join(partitions)}: {why}")


class DicomServer:
    def __init__(self, settings: Settings, db: Database, ingest: Ingest,
                 qr: QueryRetrieve, commitment: StorageCommitment,
                 activity: ActivityLog | None, *, admissions: Admissions,
                 dispatcher: Dispatcher | None = None, process_number: int = 0,
                 connections: Connections | None = None) -> None:
        """`admissions`: where associations are counted against the node's limits (one
        registry for all the node's processes); `dispatcher`: spreads accepted connections
        over the node's association processes (None: all served here); `process_number`:
        which of them this is (0: the main process); `connections`: the node's connections
        by address (the main process, which listens: its gate reads every plain
        connection's A-ASSOCIATE-RQ before an association is started for it)."""
        self.settings = settings
        self.db = db
        self.ae = build_ae(settings)
        by_requestor = (settings.dicom.transfer_syntax_preference == "requestor"
                        and not settings.dicom.enforce_default_transfer_syntax)
        supported = {str(cx.abstract_syntax): cx for cx in self.ae.supported_contexts}
        self.handlers = ScpHandlers(db, ingest, qr, commitment, supported, by_requestor,
                                    activity, admissions,
                                    accept_unknown=settings.dicom.accept_unknown_sop_classes)
        self.dispatcher = dispatcher
        d = settings.dicom
        self.connections = connections
        self.gate = (HandshakeGate(connections, d.handshake_timeout, activity)
                     if connections is not None else None)
        self.backlog = listen_backlog(d.maximum_associations, d.max_handshakes, somaxconn())
        self.pinning = ReceiverPinning(process_cpu(
            process_number, settings.dicom.processes(), PROCESS_CPUS,
            settings.dicom.cpu_affinity))
        self.listeners: dict[Listen, ScreeningAssociationServer] = {}
        self._adopters: dict[Listen, AdoptingAssociationServer] = {}
        self._adopters_lock = threading.Lock()
        self.ssl_context = server_context(settings)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Ports that could not be opened, with the error logged for each.
        self._failing: dict[Listen, str] = {}

    def desired(self) -> dict[Listen, list[str]]:
        """(port, TLS) of every enabled partition's TCP and TLS port, with the AE titles of
        the partitions served there."""
        with self.db.session() as session:
            rows = session.execute(select(Partition.ae_title, Partition.port, Partition.tls_port)
                                   .where(Partition.enabled.is_(True))
                                   .order_by(Partition.ae_title)).all()
        wanted: dict[Listen, list[str]] = {}
        for ae_title, port, tls_port in rows:
            for listen in ([Listen(port, False)] if port else []) + (
                    [Listen(tls_port, True)] if tls_port else []):
                wanted.setdefault(listen, []).append(ae_title)
        return wanted

    def sync_listeners(self, *, strict: bool = False) -> None:
        """Open a listener for each port with an enabled partition, close the others.

        `strict` (at start-up) raises when a port cannot be opened; later a failure is logged
        (once, and again only when the reason changes) and retried at every poll, so a port
        another program holds opens as soon as it is free and one bad partition never takes
        the node down.
        """
        desired = self.desired()
        for listen in sorted(set(self.listeners) - set(desired)):
            log.info("closing DICOM listener on %s (no enabled partition)", listen)
            self.listeners.pop(listen).shutdown()
        for listen in set(self._failing) - set(desired):
            del self._failing[listen]
        for listen in sorted(set(desired) - set(self.listeners)):
            try:
                server = self._listen(listen)
            except (OSError, TlsError) as exc:
                message = listen_failure(self.settings.node.listen_host, listen,
                                         desired[listen], exc)
                if strict:
                    raise OSError(message) from exc
                if self._failing.get(listen) != message:
                    log.error("%s; trying again every %g s", message,
                              self.settings.node.partition_poll_seconds)
                    self._failing[listen] = message
                continue
            self.listeners[listen] = server
            log.info("DICOM listener on %s:%d%s%s", self.settings.node.listen_host, listen.port,
                     " (TLS)" if listen.tls else "",
                     " (it was unavailable)" if self._failing.pop(listen, None) else "")

    def _server(self, listen: Listen,
                server_class: type[ScreeningAssociationServer]) -> ScreeningAssociationServer:
        if listen.tls and self.ssl_context is None:
            raise TlsError("a partition has this TLS port but [tls] has no cert and key")
        server = self.ae.make_server(
            (self.settings.node.listen_host, listen.port),
            evt_handlers=[*self.handlers.for_port(listen.port, listen.tls), *pdu_guard.HANDLERS,
                          *prompt.handlers(self.pinning), *dicomtrace.HANDLERS],
            server_class=server_class,
            ssl_context=self.ssl_context if listen.tls else None,
            gate=self.gate, connections=self.connections, backlog=self.backlog,
            handshake_timeout=self.settings.dicom.handshake_timeout,
        )
        assert isinstance(server, ScreeningAssociationServer)  # an instance of server_class
        server.dispatcher = self.dispatcher
        return server

    def adopt(self, sock: socket.socket, address: tuple[str, int], listen: Listen,
              request: bytes = b"") -> None:
        """Serve a connection the node's main process accepted on `listen` (`request`: the
        A-ASSOCIATE-RQ its gate read from it)."""
        with self._adopters_lock:
            server = self._adopters.get(listen)
            if server is None:
                made = self._server(listen, AdoptingAssociationServer)
                assert isinstance(made, AdoptingAssociationServer)
                server = self._adopters[listen] = made
        server.adopt(sock, address, request)

    def _listen(self, listen: Listen) -> ScreeningAssociationServer:
        server = self._server(listen, ScreeningAssociationServer)
        threading.Thread(target=server.serve_forever, name=f"dicom-listener-{listen.port}",
                         daemon=True).start()
        return server

    def start(self) -> None:
        self.sync_listeners(strict=True)
        self._watcher = threading.Thread(target=self._watch, name="partition-watcher",
                                         daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        last_failure = ""
        while not self._stop.wait(self.settings.node.partition_poll_seconds):
            try:
                self.sync_listeners()
                last_failure = ""
            except SQLAlchemyError as exc:
                log.error("cannot read partitions: %s", exc)
            except Exception as exc:
                # The watcher is what opens every partition added later: it must outlive
                # whatever one round ran into (logged once while it repeats).
                if repr(exc) != last_failure:
                    log.exception("matching the DICOM listeners to the partitions failed;"
                                  " trying again every %g s",
                                  self.settings.node.partition_poll_seconds)
                last_failure = repr(exc)

    def stop(self, grace: float) -> None:
        """Stop accepting, let in-flight associations finish for `grace` seconds, abort the rest."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        for server in self.listeners.values():
            server.shutdown()  # closes the socket; running associations carry on
        self.listeners.clear()
        if self.gate is not None:
            self.gate.stop()  # connections still in their handshake are closed
        with self._adopters_lock:
            for adopter in self._adopters.values():
                adopter.shutdown()
            self._adopters.clear()
        deadline = time.monotonic() + grace
        # Only established associations carry work worth waiting for; a connection still in
        # negotiation (or one that never sent an A-ASSOCIATE-RQ) is simply aborted.
        while (any(a.is_established for a in self.ae.active_associations)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        remaining = self.ae.active_associations
        working = [a for a in remaining if a.is_established]
        for assoc in working:
            log.warning("aborting association with %s:%s at shutdown",
                        assoc.requestor.address, assoc.requestor.port)
        for assoc in remaining:
            assoc.abort()
        # An aborted association's thread still finishes the C-STORE handler it is in (the file
        # and its index row go together); wait for those. An acceptor whose peer never sent an
        # A-ASSOCIATE-RQ sits in pynetdicom's ACSE wait, which abort() does not interrupt: it is
        # a daemon thread holding nothing, so it is not waited for.
        join_deadline = time.monotonic() + 10.0
        for assoc in working:
            assoc.join(timeout=max(0.0, join_deadline - time.monotonic()))
        # Their directory fsyncs deferred past the answers (a store still running after the
        # deadline has its own made at once).
        self.handlers.directory_syncs.close()
