"""The DICOM trace: one log line per association event, for debugging a peer (`node.trace_dicom`,
`pacsnode serve --trace-dicom`; docs: how-to/troubleshooting).

The node sends and receives most DIMSE messages without pynetdicom's DIMSE layer (C-STOREs
received and sent, C-FIND, C-GET and C-MOVE pending answers) and turns pynetdicom's own logging
off, so neither pynetdicom's `debug_logger()` nor its log shows them. With the trace on, each
association's A-ASSOCIATE-RQ/AC/RJ, every DIMSE message, A-RELEASE and A-ABORT go to the logger
`pacsnode.dicom.trace` at DEBUG, one line each, in both directions, as Orthanc's --trace-dicom
and DCMTK's -d show them: pynetdicom's ACSE and DIMSE notification events, bound to the
association when its connection opens (`on_open`), and a call from each direct path, which
asks `traced(assoc)` once per association or request. Off, nothing is bound and the direct paths
test one boolean.

The line builders (`associate_request`, `dimse`, ...) are pure; the rest reads pynetdicom's
public primitives and events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.pdu_primitives import (
    A_ABORT,
    A_ASSOCIATE,
    A_P_ABORT,
    A_RELEASE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
)
from pynetdicom.status import code_to_category

LOGGER_NAME = "pacsnode.dicom.trace"
log = logging.getLogger(LOGGER_NAME)

# Set by `configure` before any association starts (both the main and association processes);
# read once per association or request.
_on = False
_ae_titles: frozenset[str] = frozenset()

COMMANDS = {
    0x0001: "C-STORE-RQ", 0x8001: "C-STORE-RSP",
    0x0010: "C-GET-RQ", 0x8010: "C-GET-RSP",
    0x0020: "C-FIND-RQ", 0x8020: "C-FIND-RSP",
    0x0021: "C-MOVE-RQ", 0x8021: "C-MOVE-RSP",
    0x0030: "C-ECHO-RQ", 0x8030: "C-ECHO-RSP",
    0x0100: "N-EVENT-REPORT-RQ", 0x8100: "N-EVENT-REPORT-RSP",
    0x0110: "N-GET-RQ", 0x8110: "N-GET-RSP",
    0x0120: "N-SET-RQ", 0x8120: "N-SET-RSP",
    0x0130: "N-ACTION-RQ", 0x8130: "N-ACTION-RSP",
    0x0140: "N-CREATE-RQ", 0x8140: "N-CREATE-RSP",
    0x0150: "N-DELETE-RQ", 0x8150: "N-DELETE-RSP",
    0x0FFF: "C-CANCEL-RQ",
}
# Presentation context results (PS3.8 table 9-18).
CONTEXT_RESULTS = {0: "accepted", 1: "user rejection", 2: "no reason",
                   3: "abstract syntax not supported", 4: "transfer syntaxes not supported"}
# A-ASSOCIATE-RJ (PS3.8 table 9-21): source -> diagnostic -> words.
REJECT_SOURCES = {1: "service user", 2: "service provider (ACSE)",
                  3: "service provider (presentation)"}
REJECT_REASONS = {
    1: {1: "no reason given", 2: "application context name not supported",
        3: "calling AE title not recognised", 7: "called AE title not recognised"},
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}
REJECT_RESULTS = {1: "rejected permanent", 2: "rejected transient"}
# A-ABORT sources and A-P-ABORT reasons (PS3.8 tables 9-26, 9-27).
ABORT_SOURCES = {0: "service user", 1: "reserved", 2: "service provider"}
PROVIDER_REASONS = {0: "reason not specified", 1: "unrecognized PDU", 2: "unexpected PDU",
                    4: "unrecognized PDU parameter", 5: "unexpected PDU parameter",
                    6: "invalid PDU parameter value"}
NO_DATA_SET = 0x0101


def configure(on: bool, ae_titles: Iterable[str] = ()) -> None:
    """Trace associations (those with one of `ae_titles` as calling or called AE; none: all)."""
    global _on, _ae_titles
    _on = on
    _ae_titles = frozenset(t.strip() for t in ae_titles if t.strip())
    log.setLevel(logging.DEBUG if on else logging.NOTSET)


def enabled() -> bool:
    return _on


def wanted(calling: str, called: str, titles: frozenset[str]) -> bool:
    """Whether an association between these AE titles is traced under the filter `titles`."""
    return not titles or calling.strip() in titles or called.strip() in titles


def uid_name(uid: str) -> str:
    """A UID's keyword where pydicom knows it (CTImageStorage), else the UID."""
    uid = str(uid)
    return UID(uid).keyword or uid


def label(inbound: bool, calling: str, called: str, address: str, port: int | str) -> str:
    """Who an association is between: calling->called and the peer's address."""
    return f"[{'in' if inbound else 'out'} {calling.strip()}->{called.strip()} {address}:{port}]"


@dataclass(frozen=True)
class Context:
    """A presentation context as proposed, or its result."""

    context_id: int
    abstract_syntax: str = ""  # "" where the A-ASSOCIATE-AC does not say (requestor side)
    transfer_syntaxes: Sequence[str] = ()
    result: int | None = None  # None: proposed; else CONTEXT_RESULTS


def _implementation(uid: str, version: str) -> str:
    return f"{uid or '-'} {version}".rstrip()


def associate_request(calling: str, called: str, max_pdu: int | None, implementation_uid: str,
                      implementation_version: str, contexts: Sequence[Context]) -> str:
    """An A-ASSOCIATE-RQ: AE titles, maximum PDU, implementation, contexts proposed."""
    proposed = ", ".join(
        f"{cx.context_id} {uid_name(cx.abstract_syntax)} "
        f"[{' '.join(uid_name(ts) for ts in cx.transfer_syntaxes)}]" for cx in contexts)
    implementation = _implementation(implementation_uid, implementation_version)
    return (f"A-ASSOCIATE-RQ calling={calling.strip()} called={called.strip()}"
            f" max_pdu={max_pdu or 0} implementation={implementation}"
            f" contexts({len(contexts)}): {proposed}")


def associate_accept(max_pdu: int | None, implementation_uid: str, implementation_version: str,
                     contexts: Sequence[Context]) -> str:
    """An A-ASSOCIATE-AC: maximum PDU, implementation, each context's result."""
    results = []
    for cx in contexts:
        what = f"{cx.context_id}{' ' + uid_name(cx.abstract_syntax) if cx.abstract_syntax else ''}"
        if cx.result == 0:
            syntax = uid_name(cx.transfer_syntaxes[0]) if cx.transfer_syntaxes else "?"
            results.append(f"{what} accepted {syntax}")
        else:
            results.append(f"{what} refused ({CONTEXT_RESULTS.get(cx.result or 0, cx.result)})")
    accepted = sum(1 for cx in contexts if cx.result == 0)
    return (f"A-ASSOCIATE-AC max_pdu={max_pdu or 0}"
            f" implementation={_implementation(implementation_uid, implementation_version)}"
            f" contexts({accepted}/{len(contexts)} accepted): {', '.join(results)}")


def associate_reject(result: int | None, source: int | None, diagnostic: int | None) -> str:
    """An A-ASSOCIATE-RJ with its result, source and reason in words."""
    reason = REJECT_REASONS.get(source or 0, {}).get(diagnostic or 0, f"reason {diagnostic}")
    return (f"A-ASSOCIATE-RJ {REJECT_RESULTS.get(result or 0, f'result {result}')},"
            f" source {REJECT_SOURCES.get(source or 0, source)}: {reason}")


def release(response: bool) -> str:
    return "A-RELEASE-RP" if response else "A-RELEASE-RQ"


def abort(source: int | None) -> str:
    """An A-ABORT and who ended the association."""
    return f"A-ABORT source {ABORT_SOURCES.get(source, source) if source is not None else None}"


def provider_abort(reason: int | None) -> str:
    """An A-P-ABORT: the service provider (the DUL, here or at the peer) ended it."""
    return f"A-P-ABORT: {PROVIDER_REASONS.get(reason or 0, f'reason {reason}')}"


def dimse(command: int, *, context_id: int | None = None, message_id: int | None = None,
          responded_to: int | None = None, sop_class: str = "", sop_instance: str = "",
          status: int | None = None, comment: str = "", data_set: int | None = None,
          extra: str = "") -> str:
    """A DIMSE message: command, message ID (or the one answered), SOP class and instance,
    status, the data set's size in bytes (-1: present, size unknown; None: none)."""
    parts = [COMMANDS.get(command, f"command 0x{command:04X}")]
    if message_id is not None:
        parts.append(f"id={message_id}")
    if responded_to is not None:
        parts.append(f"answers={responded_to}")
    if context_id is not None:
        parts.append(f"context={context_id}")
    if sop_class:
        parts.append(f"class={uid_name(sop_class)}")
    if sop_instance:
        parts.append(f"instance={sop_instance}")
    if status is not None:
        parts.append(f"status=0x{status:04X} {code_to_category(status)}")
    if comment:
        parts.append(f"comment={comment!r}")
    if extra:
        parts.append(extra)
    if data_set is not None:
        parts.append("data set" if data_set < 0 else f"data set {data_set} bytes")
    return " ".join(parts)


def _fields(command_set: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The trace's fields of a command set (a pydicom Dataset of group 0000)."""
    def value(keyword: str) -> Any:
        return command_set.get(keyword) if keyword in command_set else None

    sop_class = value("AffectedSOPClassUID") or value("RequestedSOPClassUID") or ""
    sop_instance = value("AffectedSOPInstanceUID") or value("RequestedSOPInstanceUID") or ""
    extra = []
    destination = value("MoveDestination")
    if destination:
        extra.append(f"destination={str(destination).strip()}")
    counts = [value(k) for k in ("NumberOfRemainingSuboperations",
                                 "NumberOfCompletedSuboperations",
                                 "NumberOfFailedSuboperations",
                                 "NumberOfWarningSuboperations")]
    if any(c is not None for c in counts):
        extra.append(suboperations(*(c or 0 for c in counts)))
    for keyword, name in (("EventTypeID", "event"), ("ActionTypeID", "action")):
        if value(keyword) is not None:
            extra.append(f"{name}={value(keyword)}")
    status = value("Status")
    return {"message_id": value("MessageID"), "responded_to": value("MessageIDBeingRespondedTo"),
            "sop_class": str(sop_class), "sop_instance": str(sop_instance),
            "status": int(status) if status is not None else None,
            "comment": str(value("ErrorComment") or ""), "extra": " ".join(extra)}


def suboperations(remaining: int, completed: int, failed: int, warning: int) -> str:
    return f"remaining={remaining} completed={completed} failed={failed} warning={warning}"


# Reading pynetdicom's objects (only while the trace is on).

def _peer(assoc: Any) -> tuple[str, int | str]:
    user = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    try:
        return user.address, user.port
    except (ValueError, AttributeError):  # no address yet
        return "?", "?"


def _titles(assoc: Any, primitive: A_ASSOCIATE | None = None) -> tuple[str, str]:
    """(calling, called) AE titles: from the request once there is one."""
    request = primitive if primitive is not None and primitive.result is None \
        else assoc.requestor.primitive
    if request is not None:
        return str(request.calling_ae_title), str(request.called_ae_title)
    return str(assoc.requestor.ae_title), str(assoc.acceptor.ae_title)


def traced(assoc: Any) -> bool:
    """Whether this association is traced: asked once per association (or request) by the
    direct paths, which then trace with no further look-up."""
    if not _on:
        return False
    return wanted(*_titles(assoc), _ae_titles)


def emit(assoc: Any, sent: bool, line: str, primitive: A_ASSOCIATE | None = None) -> None:
    """Log `line` for `assoc` (`sent`: by the node, else received from the peer)."""
    calling, called = _titles(assoc, primitive)
    log.debug("%s %s %s", label(assoc.is_acceptor, calling, called, *_peer(assoc)),
              "sent" if sent else "received", line)


def _user_information(primitive: A_ASSOCIATE, kind: type, name: str) -> str:
    """A user information item's value ("" if absent: pynetdicom's properties log an error)."""
    for item in primitive.user_information:
        if isinstance(item, kind):
            return str(getattr(item, name) or "")
    return ""


def acse_line(primitive: Any, requested: A_ASSOCIATE | None = None) -> str:
    """The trace line of an ACSE primitive (`requested`: the association's A-ASSOCIATE-RQ,
    naming the abstract syntax of each context result)."""
    if isinstance(primitive, A_ASSOCIATE):
        implementation = (_user_information(primitive, ImplementationClassUIDNotification,
                                            "implementation_class_uid"),
                          _user_information(primitive, ImplementationVersionNameNotification,
                                            "implementation_version_name"))
        if primitive.result is None:
            return associate_request(
                str(primitive.calling_ae_title), str(primitive.called_ae_title),
                primitive.maximum_length_received, *implementation,
                [Context(int(cx.context_id or 0), str(cx.abstract_syntax or ""),
                         [str(ts) for ts in cx.transfer_syntax])
                 for cx in primitive.presentation_context_definition_list])
        if primitive.result == 0:
            names = {} if requested is None else {
                cx.context_id: str(cx.abstract_syntax or "")
                for cx in requested.presentation_context_definition_list}
            return associate_accept(
                primitive.maximum_length_received, *implementation,
                [Context(int(cx.context_id or 0),
                         str(cx.abstract_syntax or names.get(cx.context_id, "")),
                         [str(ts) for ts in cx.transfer_syntax],
                         cx.result if cx.result is not None else 0)
                 for cx in primitive.presentation_context_definition_results_list])
        return associate_reject(primitive.result, primitive.result_source, primitive.diagnostic)
    if isinstance(primitive, A_RELEASE):
        return release(primitive.result is not None)
    if isinstance(primitive, A_ABORT):
        return abort(_unless_unset(lambda: primitive.abort_source))
    if isinstance(primitive, A_P_ABORT):
        return provider_abort(_unless_unset(lambda: primitive.provider_reason))
    return type(primitive).__name__


def _unless_unset(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except ValueError:  # pynetdicom raises for a parameter that was never set
        return None


def _data_set_size(message: Any, command_set: Any) -> int | None:
    if command_set.get("CommandDataSetType", NO_DATA_SET) == NO_DATA_SET:
        return None
    data = getattr(message, "data_set", None)
    if data is not None and hasattr(data, "getbuffer"):
        with data.getbuffer() as view:
            if view.nbytes:
                return view.nbytes
    return -1  # streamed to or from a file: present, size not known here


def dimse_line(message: Any) -> str:
    """The trace line of a pynetdicom DIMSE message (EVT_DIMSE_RECV / EVT_DIMSE_SENT)."""
    command_set = message.command_set
    return dimse(int(command_set.CommandField), context_id=message.context_id,
                 data_set=_data_set_size(message, command_set), **_fields(command_set))


def _on_acse(event: evt.Event, sent: bool) -> None:
    primitive = getattr(event, "primitive", None)  # (set for the ACSE events only)
    assoc = event.assoc
    request = primitive if isinstance(primitive, A_ASSOCIATE) and primitive.result is None \
        else None
    if not wanted(*_titles(assoc, request), _ae_titles):
        return
    emit(assoc, sent, acse_line(primitive, assoc.requestor.primitive), request)


def _on_dimse(event: evt.Event, sent: bool) -> None:
    if wanted(*_titles(event.assoc), _ae_titles):
        emit(event.assoc, sent, dimse_line(event.message))


def on_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler of every association, inbound and outbound: with the trace on,
    its ACSE and DIMSE events are traced (off: nothing is bound)."""
    if not _on:
        return
    assoc = event.assoc
    assoc.bind(evt.EVT_ACSE_RECV, _on_acse, [False])
    assoc.bind(evt.EVT_ACSE_SENT, _on_acse, [True])
    assoc.bind(evt.EVT_DIMSE_RECV, _on_dimse, [False])
    assoc.bind(evt.EVT_DIMSE_SENT, _on_dimse, [True])
    request = assoc.requestor.primitive
    if assoc.is_requestor and request is not None and wanted(*_titles(assoc), _ae_titles):
        # pynetdicom queued it (EVT_ACSE_SENT) before it connected; it goes out now.
        emit(assoc, True, acse_line(request))


def refused(address: str, port: int, told: str, why: str) -> None:
    """A connection the node refused before an association began (scp/gate.py): traced
    without an AE title filter only, since the request may name none."""
    if not _ae_titles:
        log.debug("[in ?->? %s:%s] connection refused (%s): %s", address, port, told, why)


HANDLERS = [(evt.EVT_CONN_OPEN, on_open)]
