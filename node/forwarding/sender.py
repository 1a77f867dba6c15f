"""One outbound association to a destination, kept open between batches (heartbeat)."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from node.forwarding.commitment import WELL_KNOWN_INSTANCE, request_dataset
from node.forwarding.queue import Job
from node.implementation import identify
from node.internals.prompt import prompt_requestor
from node.internals.tuning import CONNECTION_HANDLERS
from node.scu.contexts import UNCOMPRESSED, sub_operation_contexts
from node.scu.send import StoreSender

log = logging.getLogger(__name__)


def _remove_private_tags(ds: Dataset) -> None:
    ds.remove_private_tags()


@dataclass(frozen=True)
class Target:
    """A destination device as the sender needs it (a snapshot of its table row)."""

    device_id: int
    name: str
    ae_title: str
    address: str
    port: int
    calling_ae: str
    max_pdu: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    connection_timeout: float
    extra_syntaxes: tuple[str, ...]
    heartbeat: bool
    remove_private_tags: bool
    storage_commitment: bool = False
    tls_args: tuple[ssl.SSLContext, str] | None = None  # the device's TLS port is used


@dataclass
class Result:
    done: list[int] = field(default_factory=list)
    retry: list[tuple[Job, str]] = field(default_factory=list)  # try again after a backoff
    failed: list[tuple[Job, str]] = field(default_factory=list)  # no point in trying again
    untried: list[Job] = field(default_factory=list)  # the connection broke before them


class Connection:
    """An association to one device; not thread-safe: one sender task uses it at a time."""

    def __init__(self, target: Target,
                 on_report: Callable[[evt.Event], tuple[int, Dataset | None]] | None = None
                 ) -> None:
        """`on_report`: handles a storage commitment N-EVENT-REPORT sent back on this
        association (a destination may instead open a new one to our SCP)."""
        self.target = target
        self.on_report = on_report
        self.assoc: Association | None = None
        self.pairs: list[tuple[str, str]] = []  # (SOP class, syntax) negotiated so far
        self.last_used = time.monotonic()  # last transmission: what the idle limit counts from
        self.last_echo = 0.0
        self.associations_opened = 0
        self.message_id = 1  # of the next C-STORE on the association
        self.asks_commitment = False  # the open association proposed Storage Commitment
        self.lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.assoc is not None and self.assoc.is_established

    def _covers(self, jobs: list[Job]) -> bool:
        if not self.is_open:
            return False
        accepted = self._accepted()
        for job in jobs:
            syntaxes = [job.transfer_syntax, *UNCOMPRESSED]
            if not any((job.sop_class, ts) in accepted for ts in syntaxes):
                return False
        return True

    def _open(self, jobs: list[Job]) -> str | None:
        """(Re-)associate with contexts for what is queued; returns an error or None."""
        self.close()
        for pair in ((j.sop_class, j.transfer_syntax) for j in jobs):
            if pair not in self.pairs:
                self.pairs.append(pair)
        t = self.target
        ae = identify(AE(ae_title=t.calling_ae))
        ae.acse_timeout = t.acse_timeout
        ae.dimse_timeout = t.dimse_timeout
        ae.network_timeout = t.network_timeout
        ae.connection_timeout = t.connection_timeout
        extra = [build_context(StorageCommitmentPushModel)] if t.storage_commitment else []
        contexts = [build_context(Verification), *extra,
                    *sub_operation_contexts(self.pairs, list(t.extra_syntaxes))][:128]
        handlers: list[Any] = [*CONNECTION_HANDLERS, (evt.EVT_CONN_OPEN, prompt_requestor)]
        if self.on_report is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, self.on_report))
        # (The list is written in the call, where mypy infers the element type pynetdicom's
        # invariant list[...] parameter asks for.)
        assoc = ae.associate(t.address, t.port, ae_title=t.ae_title, contexts=contexts,
                             max_pdu=t.max_pdu, evt_handlers=handlers,
                             ext_neg=([build_role(StorageCommitmentPushModel, scu_role=True,
                                                  scp_role=True)]
                                      if t.storage_commitment else []),
                             tls_args=t.tls_args)
        if not assoc.is_established:
            reason = "rejected" if assoc.is_rejected else "no answer or aborted"
            secure = " over TLS" if t.tls_args else ""
            return f"cannot associate with {t.ae_title}@{t.address}:{t.port}{secure} ({reason})"
        if t.heartbeat:
            # Idle past network_timeout: release (not abort) the association.
            assoc.network_timeout_response = "A-RELEASE"
        self.assoc = assoc
        self.message_id = 1
        self.asks_commitment = t.storage_commitment
        self.associations_opened += 1
        log.info("forwarding association to %s opened (%d contexts)", t.name,
                 len(assoc.accepted_contexts))
        return None

    def send(self, jobs: list[Job]) -> Result:
        result = Result()
        with self.lock:
            self.last_used = time.monotonic()
            if not self._covers(jobs):
                error = self._open(jobs)
                if error is not None:
                    result.retry = [(job, error) for job in jobs]
                    return result
            assert self.assoc is not None
            # Stored files go as stored where the destination accepted their syntax (and no
            # private tags are removed): scu/send.py, the same way as a retrieve's.
            transform = _remove_private_tags if self.target.remove_private_tags else None
            sent = 0
            with StoreSender(self.assoc, peer=self.target.name, message_id=self.message_id,
                             transform=transform) as sender:
                for job, outcome in sender.send_each(jobs):
                    sent += 1
                    if outcome.stored:
                        result.done.append(job.id)
                    elif outcome.broken:
                        result.retry.append((job, outcome.error))
                        result.untried = jobs[sent:]
                    elif outcome.status is None:  # nothing to gain from trying again
                        result.failed.append((job, outcome.error))
                    else:
                        result.retry.append((job, f"destination answered "
                                             f"0x{outcome.status:04X} {outcome.error}".strip()))
                self.message_id = sender.message_id
            if result.untried or (jobs and sent < len(jobs)):
                self.close()
            self.last_used = time.monotonic()
            if not self.target.heartbeat and not self.target.storage_commitment:
                self.close()  # else after the commitment request (Forwarder)
        return result

    def _accepted(self) -> set[tuple[str, str]]:
        """(SOP class, transfer syntax) of each context the destination accepted."""
        assert self.assoc is not None
        return {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in self.assoc.accepted_contexts}

    def request_commitment(self, transaction: str, refs: list[tuple[str, str]]
                           ) -> tuple[str, str] | None:
        """N-ACTION storage commitment for `refs` on this association, opened (again) if it
        is closed or was opened without the Storage Commitment context.

        None when requested; else (job commitment state, error): "unsupported" when the
        destination did not accept the Storage Commitment context, "failed" otherwise.
        """
        with self.lock:
            if not (self.is_open and self.asks_commitment):
                error = self._open([])
                if error is not None:
                    return "failed", error
            assert self.assoc is not None
            try:
                status, _ = self.assoc.send_n_action(
                    request_dataset(transaction, refs), 1, StorageCommitmentPushModel,
                    WELL_KNOWN_INSTANCE)
            except ValueError as exc:
                return "unsupported", (f"{self.target.name} does not support storage"
                                       f" commitment: {exc}")
            self.last_used = time.monotonic()
            if "Status" not in status:
                return "failed", "no N-ACTION response"
            if int(status.Status) != 0:
                return "failed", f"N-ACTION answered 0x{int(status.Status):04X}"
            return None

    def keepalive(self, interval: float, idle_limit: float) -> None:
        """Heartbeat: C-ECHO on an idle association; release it after `idle_limit`."""
        if not self.lock.acquire(blocking=False):
            return  # a sender task is using it
        try:
            if not self.is_open:
                return
            now = time.monotonic()
            idle = now - self.last_used
            assert self.assoc is not None
            if idle >= idle_limit:
                log.info("forwarding association to %s idle %.0f s: released",
                         self.target.name, idle)
                self.close()
            elif now - max(self.last_used, self.last_echo) >= interval:
                status = self.assoc.send_c_echo()
                self.last_echo = time.monotonic()
                if "Status" not in status:
                    log.info("heartbeat to %s failed: association dropped", self.target.name)
                    self.close()
        finally:
            self.lock.release()

    def close(self) -> None:
        if self.assoc is not None:
            if self.assoc.is_established:
                self.assoc.release()
            self.assoc = None

