"""C-FIND, C-MOVE and C-GET answered from the index (pynetdicom generator handlers)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import build_context, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from node.activity import ActivityLog, Event
from node.config import QuerySettings, Settings
from node.db.database import Database
from node.db.models import Device, Instance, Study, utcnow
from node.ingest import lookup
from node.ingest.pipeline import Peer
from node.internals.direct_answers import FindAnswers, RetrieveAnswers
from node.internals.direct_send import Sent, answers_sent, released_in_the_background
from node.internals.prompt import prompt_requestor
from node.internals.tuning import CONNECTION_HANDLERS
from node.query.conditions import Match, Query, QueryError, parse_identifier
from node.query.index import (
    MatchSettings,
    answer_values,
    encoded_identifier,
    identifier,
    statement,
)
from node.scu.contexts import sub_operation_contexts
from node.scu.failure import AssociationFailure
from node.scu.send import StoreSender
from node.statuses import (
    ALL_SUB_OPERATIONS_FAILED,
    CANCELLED,
    FAILED,
    LIMIT_EXCEEDED,
    NO_MATCH_KEY,
    PENDING,
    REFUSED_NOT_AUTHORISED,
    SUB_OPERATIONS_FAILED,
    UNABLE_TO_PROCESS,
)
from node.tls import endpoint

log = logging.getLogger(__name__)

MAX_SUBOPERATIONS = 65535  # the response counters are US


def status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def _opened(event: evt.Event, opened: list[Any]) -> None:
    """EVT_CONN_OPEN of a C-MOVE's sub-operation association: the handler sends on it."""
    opened.append(event.assoc)


def match_settings(peer: Peer, defaults: QuerySettings, dialect: str) -> MatchSettings:
    p = peer.partition
    return MatchSettings(
        prefix_as_range=dialect == "sqlite",
        case_sensitive=(p.case_sensitive_matching if p.case_sensitive_matching is not None
                        else defaults.case_sensitive),
        empty_matching=(p.empty_matching if p.empty_matching is not None
                        else defaults.empty_matching),
        limit=p.query_limit if p.query_limit is not None else defaults.limit,
    )


def _message_id(event: evt.Event) -> int:
    """The request's Message ID. pynetdicom serves only requests with every required
    parameter (is_valid_request; it ignores the others), so it and a C-MOVE's Move
    Destination are set."""
    message_id = event.request.MessageID
    assert message_id is not None
    return message_id


class Stored(NamedTuple):
    """A matching instance (a tuple: made a thousand at a time from the index's rows)."""

    path: str
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    study_pk: int = 0
    study_uid: str = ""


@dataclass
class Report:
    """How one request went, filled in as it runs; becomes its activity row at the end."""

    detail: str = ""
    count: int = 0
    failed: int = 0
    outcome: str = "ok"
    study_uid: str = ""
    note: str = ""  # how it ended, when not simply done

    def end(self, outcome: str, note: str) -> None:
        self.outcome, self.note = outcome, note


def describe(query: Query) -> str:
    """The request's level and matching keys, briefly (the activity row's detail)."""
    keys = []
    for c in query.conditions:
        if c.match is Match.RANGE:
            value = "-".join(c.values)
        elif c.match is Match.LIST:
            value = f"{len(c.values)} UIDs" if len(c.values) > 2 else "\\".join(c.values)
        else:
            value = c.values[0] if c.values else ""
        keys.append(f"{c.keyword}={value}")
    return " ".join([query.level, *keys])[:500]


def single_study(query: Query) -> str:
    """The Study Instance UID a request names, if it names exactly one."""
    c = query.condition("StudyInstanceUID")
    return c.values[0] if c is not None and c.match is Match.SINGLE and c.values else ""


class QueryRetrieve:
    def __init__(self, db: Database, settings: Settings, storage_root: Path,
                 activity: ActivityLog | None = None) -> None:
        """`activity`: where one row per C-FIND, C-MOVE and C-GET goes (None: not recorded)."""
        self.db = db
        self.settings = settings
        self.root = storage_root
        self.activity = activity

    def _record(self, kind: str, peer: Peer, report: Report) -> None:
        if self.activity is None:
            return
        detail = "; ".join(part for part in (report.detail, report.note) if part)
        # The called AE title is the partition's: admission matched it exactly.
        self.activity.record(Event(
            kind, partition=peer.partition.ae_title, calling_ae=peer.calling_ae,
            called_ae=peer.partition.ae_title, peer=peer.address,
            study_instance_uid=report.study_uid, count=report.count, failed=report.failed,
            outcome=report.outcome, detail=detail))

    def _match(self, peer: Peer) -> MatchSettings:
        return match_settings(peer, self.settings.query, self.db.engine.dialect.name)

    # C-FIND -------------------------------------------------------------------------------
    def find(self, event: evt.Event, peer: Peer) -> Iterator[tuple[Any, Dataset | None]]:
        report = Report()
        try:
            yield from self._find(event, peer, report)
        finally:
            # Also when pynetdicom drops the generator (the association went away).
            self._record("find", peer, report)

    def _find(self, event: evt.Event, peer: Peer, report: Report
              ) -> Iterator[tuple[Any, Dataset | None]]:
        if peer.device is not None and not peer.device.allow_query:
            log.warning("C-FIND from %s refused: device %s has no query right", peer,
                        peer.device.name)
            report.end("failed", "refused: this device may not query")
            yield status(REFUSED_NOT_AUTHORISED, "this device may not query"), None
            return
        try:
            query = parse_identifier(event.identifier)
        except (QueryError, ValueError, KeyError) as exc:
            report.end("failed", f"unable to process: {exc}")
            yield status(UNABLE_TO_PROCESS, str(exc)), None
            return
        report.detail = describe(query)
        settings = self._match(peer)
        try:
            yield from self._answers(event, peer, query, settings, report)
        except SQLAlchemyError as exc:
            log.error("C-FIND from %s: index unavailable: %s", peer, exc)
            report.end("failed", "index database unavailable")
            yield status(UNABLE_TO_PROCESS, "the index database is unavailable"), None
        except Exception as exc:
            # A defect of the node, not of the request: a failure status and one line (the
            # traceback at debug level) rather than pynetdicom's traceback, and the
            # association goes on.
            log.error("C-FIND %s from %s failed: %s: %s", report.detail, peer,
                      type(exc).__name__, exc)
            log.debug("C-FIND failure", exc_info=True)
            report.end("failed", f"internal error: {type(exc).__name__}")
            yield status(UNABLE_TO_PROCESS, "internal error while answering"), None

    def _answers(self, event: evt.Event, peer: Peer, query: Query, settings: MatchSettings,
                 report: Report) -> Iterator[tuple[Any, Dataset | None]]:
        started = time.perf_counter()
        sent = 0
        syntax = UID(event.context.transfer_syntax)  # answers are encoded in it
        direct = FindAnswers.for_event(event)
        with self.db.session() as session:
            stmt = statement(query, peer.partition.id, settings)
            if settings.limit:
                stmt = stmt.limit(settings.limit + 1)
            for row in session.execute(stmt.execution_options(yield_per=200)):
                if event.is_cancelled:
                    log.info("C-FIND from %s cancelled after %d matches", peer, sent)
                    report.end("warning", "cancelled")
                    yield CANCELLED, None
                    return
                if settings.limit and sent == settings.limit:
                    log.warning("C-FIND %s from %s stopped at the limit of %d matches",
                                query.level, peer, settings.limit)
                    report.end("warning", f"stopped at the limit of {settings.limit} matches")
                    yield status(LIMIT_EXCEEDED, f"more than {settings.limit} matches: "
                                 "narrow the query"), None
                    return
                pairs = answer_values(query, row, peer.partition.ae_title)
                encoded = (encoded_identifier(pairs, implicit_vr=direct.implicit)
                           if direct is not None else None)
                if encoded is None or direct is None or not direct.send_encoded(encoded):
                    answer = identifier(pairs, implicit_vr=syntax.is_implicit_VR,
                                        little_endian=syntax.is_little_endian)
                    if direct is None or not direct.send(answer):
                        yield PENDING, answer
                sent += 1
                report.count = sent
        log.info("C-FIND %s from %s: %d matches in %.1f ms", query.level, peer, sent,
                 (time.perf_counter() - started) * 1000)

    # Retrieve -----------------------------------------------------------------------------
    def _instances(self, query: Query, peer: Peer) -> list[Stored]:
        settings = self._match(peer)
        # The matching rows' columns a send needs, not ORM objects: loading a Study and an
        # Instance object per row took 40 ms of a 1000-image C-GET.
        stmt = statement(query, peer.partition.id, settings, level="IMAGE").with_only_columns(
            Instance.path, Instance.sop_class_uid, Instance.sop_instance_uid,
            Instance.transfer_syntax_uid, Study.id, Study.study_instance_uid)
        root = str(self.root)
        with self.db.session() as session:
            return [Stored(f"{root}/{path}", sop_class, sop, syntax, study_pk, study_uid)
                    for path, sop_class, sop, syntax, study_pk, study_uid
                    in session.execute(stmt)]

    def _resolve(self, event: evt.Event, peer: Peer, verb: str, report: Report
                 ) -> tuple[list[Stored] | None, Dataset | None]:
        """The instances to send, or the failure status that ends the request (and the
        reason, in `report`)."""
        instances, failure = self._lookup(event, peer, verb, report)
        if failure is not None:
            report.end("failed", str(failure.get("ErrorComment", "")))
        elif instances is not None:
            report.count = len(instances)
            studies = {item.study_uid for item in instances}
            if len(studies) == 1:
                report.study_uid = studies.pop()
        return instances, failure

    def _lookup(self, event: evt.Event, peer: Peer, verb: str, report: Report
                ) -> tuple[list[Stored] | None, Dataset | None]:
        if peer.device is not None and not peer.device.allow_retrieve:
            log.warning("%s from %s refused: device %s has no retrieve right", verb, peer,
                        peer.device.name)
            return None, status(REFUSED_NOT_AUTHORISED, "this device may not retrieve")
        try:
            query = parse_identifier(event.identifier)
        except (QueryError, ValueError, KeyError) as exc:
            return None, status(UNABLE_TO_PROCESS, str(exc))
        report.detail = " ".join(part for part in (report.detail, describe(query)) if part)
        report.study_uid = single_study(query)
        if not query.conditions:
            return None, status(NO_MATCH_KEY, "a retrieve needs a unique key")
        try:
            instances = self._instances(query, peer)
        except SQLAlchemyError as exc:
            log.error("%s from %s: index unavailable: %s", verb, peer, exc)
            return None, status(UNABLE_TO_PROCESS, "the index database is unavailable")
        limit = self._match(peer).limit
        if (limit and len(instances) > limit) or len(instances) > MAX_SUBOPERATIONS:
            cap = min(limit, MAX_SUBOPERATIONS) if limit else MAX_SUBOPERATIONS
            log.warning("%s from %s refused: %d instances, more than %d", verb, peer,
                        len(instances), cap)
            return None, status(LIMIT_EXCEEDED, f"{len(instances)} instances, more than {cap}")
        log.info("%s %s from %s: %d instances", verb, query.level, peer, len(instances))
        return instances, None

    def _retrieved(self, kind: str, peer: Peer, report: Report, delivered: list[Stored],
                   destination: str = "") -> None:
        """After the sends: the studies that went out count as accessed; the request's row.
        `destination`: the C-MOVE destination and why it could not be associated with, if
        it could not."""
        studies = {item.study_pk for item in delivered if item.study_pk}
        if report.outcome == "ok" and report.failed:
            report.outcome = "failed" if report.failed >= report.count else "warning"
        if report.outcome == "ok" and report.count and not delivered:
            # pynetdicom could not associate with the move destination, or the association
            # ended first: nothing was tried.
            report.failed = report.count
            if kind == "move":
                # pynetdicom's own log lines do not say which destination, nor always why.
                log.error("C-MOVE from %s: cannot send to destination %s", peer, destination)
            report.end("failed", f"destination {destination} not reached" if kind == "move"
                       else "the association ended before any sub-operation")
        if studies:
            try:
                # One UPDATE for the request, in its own short transaction: the purge order
                # "accessed" reads it, and nothing here may fail a retrieve that was done.
                # Not waiting for the disk (it runs before pynetdicom's final response): a
                # power cut may lose it, and only makes the study look accessed earlier.
                with self.db.transaction(durable=False) as session:
                    session.execute(update(Study).where(Study.id.in_(sorted(studies)))
                                    .values(accessed_at=utcnow()))
            except SQLAlchemyError as exc:
                log.error("%s from %s: studies not marked accessed: %s", kind, peer, exc)
        self._record(kind, peer, report)

    def _sub_operations(self, event: evt.Event, assoc: Any, destination: str,
                        instances: list[Stored], delivered: list[Stored], report: Report,
                        originator: tuple[str, int] | None = None
                        ) -> Iterator[tuple[Any, Dataset | None]]:
        """Send each instance on `assoc` (scu/send.py: as stored where the destination
        accepted its syntax) and yield a pending (0xFF00, Sent) for it, whose outcome
        pynetdicom's service class counts and, if it failed, lists in the final response's
        Failed SOP Instance UID List.

        An instance that could not be sent (its file missing or unreadable, no context, no
        decoder) fails with its reason logged, and the next one is tried: the association
        goes on. If the association the sub-operations go on ends, the ones left are failed
        too. `delivered` fills with the instances the destination stored.
        """
        failed: list[str] = []
        cancelled = False
        wanted = len(instances)

        def until_cancelled() -> Iterator[Stored]:
            nonlocal cancelled
            for item in instances:
                if event.is_cancelled:
                    cancelled = True
                    return
                yield item

        request_id = _message_id(event)
        answers = RetrieveAnswers.for_event(event)
        sent = 0
        with contextlib.ExitStack() as stack:
            if answers is not None:
                stack.enter_context(answers)
            sender = stack.enter_context(StoreSender(
                assoc, peer=destination, message_id=request_id % 65535 + 1,
                originator=originator))
            for item, outcome in sender.send_each(until_cancelled()):
                sent += 1
                if outcome.stored:
                    delivered.append(item)
                else:
                    failed.append(item.sop_instance)
                    report.failed += 1
                    if outcome.status is None:
                        log.error("%s not sent to %s: %s", item.sop_instance, destination,
                                  outcome.error)
                    else:
                        log.warning("%s refused by %s: 0x%04X %s", item.sop_instance,
                                    destination, outcome.status, outcome.error)
                if outcome.broken and sent < wanted:
                    failed += [i.sop_instance for i in instances[sent:]]
                    report.failed += wanted - sent
                    report.end("failed", f"the association ended after {sent} instances: "
                               f"{outcome.error}")
                yield PENDING, Sent.of(item.sop_instance,
                                       outcome.status if outcome.status is not None else FAILED)
                if outcome.broken:
                    break
        if cancelled:
            report.end("warning", f"cancelled after {sent} instances")
            yield CANCELLED, None
            return
        if sent < wanted:
            # The sub-operations' association ended first: our final response, which counts
            # and names the unsent ones as failed (after the last sub-operation pynetdicom
            # makes it itself, from the outcomes).
            final = status(SUB_OPERATIONS_FAILED if len(failed) < len(instances)
                           else ALL_SUB_OPERATIONS_FAILED)
            identifier = Dataset()
            identifier.FailedSOPInstanceUIDList = failed
            yield final, identifier

    def move(self, event: evt.Event, peer: Peer) -> Iterator[Any]:
        destination = event.move_destination
        assert destination is not None  # (see _message_id)
        destination_ae = destination.strip()
        report = Report(detail=f"to {destination_ae}:")
        instances, failure = self._resolve(event, peer, "C-MOVE", report)
        with self.db.session() as session:
            device = (lookup.device_row(session, peer.partition.id, destination_ae,
                                        enabled_only=True)
                      or lookup.directory_device(session, destination_ae))
            if device is None:
                log.warning("C-MOVE from %s: destination %r is in neither the device table"
                            " nor the DotCom directory",
                            peer, destination_ae)
                report.count = 0
                report.end("failed", "move destination unknown")
                self._record("move", peer, report)
                yield None, None  # pynetdicom answers MOVE_DESTINATION_UNKNOWN (0xA801)
                return
            where = endpoint(self.settings, host=device.host, ip=device.ip,
                             port=device.port, tls_port=device.tls_port)
            address, port = where.address, where.port
            kwargs = {**self._outbound(device, instances or []), **where.associate_kwargs()}
        if failure is not None:
            self._record("move", peer, report)
            # pynetdicom associates with the destination before it sends any status, so the
            # destination sees a short association (Verification only) and no sub-operation.
            yield address, port, {**kwargs, "contexts": [build_context(Verification)]}
            yield 1
            yield failure, None
            return
        assert instances is not None
        delivered: list[Stored] = []
        unreached = AssociationFailure()
        opened: list[Any] = []  # the sub-operations' association, once pynetdicom opens it
        kwargs["evt_handlers"] = [*kwargs["evt_handlers"], *unreached.handlers(),
                                  (evt.EVT_CONN_OPEN, _opened, [opened])]
        try:
            yield address, port, kwargs
            yield len(instances)
            # pynetdicom asks for the first sub-operation once it has associated.
            store_assoc = opened[-1]
            answers_sent(store_assoc)
            released_in_the_background(store_assoc)
            yield from self._sub_operations(
                event, store_assoc, destination_ae, instances, delivered, report,
                originator=(peer.calling_ae, _message_id(event)))
        finally:
            self._retrieved("move", peer, report, delivered,
                            f"{destination_ae} at {address}:{port}: {unreached.reason()}")

    def get(self, event: evt.Event, peer: Peer) -> Iterator[Any]:
        report = Report()
        instances, failure = self._resolve(event, peer, "C-GET", report)
        if failure is not None:
            self._record("get", peer, report)
            yield 1
            yield failure, None
            return
        assert instances is not None
        delivered: list[Stored] = []
        answers_sent(event.assoc)
        try:
            yield len(instances)
            yield from self._sub_operations(event, event.assoc, peer.calling_ae or "the requestor",
                                            instances, delivered, report)
        finally:
            self._retrieved("get", peer, report, delivered)

    def _outbound(self, device: Device, instances: list[Stored]) -> dict[str, Any]:
        """Association settings for sub-operations to `device` (its own, else the node's)."""
        d = self.settings.dicom
        extra = [ts.strip() for ts in device.transfer_syntaxes.split(",") if ts.strip()]
        timeouts = {
            "acse_timeout": device.acse_timeout or d.acse_timeout,
            "dimse_timeout": device.dimse_timeout or d.dimse_timeout,
            "network_timeout": device.network_timeout or d.network_timeout,
        }

        def on_open(event: evt.Event) -> None:
            for name, value in timeouts.items():
                setattr(event.assoc, name, value)

        return {
            "contexts": sub_operation_contexts(
                [(i.sop_class, i.transfer_syntax) for i in instances], extra),
            "max_pdu": device.max_pdu_size or d.max_pdu_size,
            # As the forwarder's associations: TCP_NODELAY, PDU checks, the DUL waiting in
            # select() (and lending its socket to the sub-operations, scu/send.py).
            "evt_handlers": [(evt.EVT_CONN_OPEN, on_open), *CONNECTION_HANDLERS,
                             (evt.EVT_CONN_OPEN, prompt_requestor)],
        }
