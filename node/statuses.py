"""Every DICOM status the node answers, in one place: the code, the standard's meaning, and
when the node sends it.

Plain ints, not an enum: they go straight into struct.pack and pydicom's Status on the
C-STORE path. `ANSWERS` holds what a conformance statement needs (service, code, when); the
standard's name of each code is pynetdicom's (`pynetdicom.status`), checked by
tests/unit/test_statuses.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- codes: the name the node's code uses, the standard's meaning -------------------------------
SUCCESS = 0x0000  # Success
PENDING = 0xFF00  # Pending: a match or a sub-operation follows
CANCELLED = 0xFE00  # Cancel: the requestor cancelled the operation
PROCESSING_FAILURE = 0x0110  # Failure: Processing Failure
DUPLICATE_REJECTED = 0x0111  # Failure: Duplicate SOP Instance
# Failure: No Such Object Instance; also the failure reason of an instance a storage
# commitment report says is not held.
NO_SUCH_OBJECT_INSTANCE = 0x0112
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Failure: Refused: SOP Class Not Supported
NO_SUCH_ACTION = 0x0123  # Failure: No Such Action
REFUSED_NOT_AUTHORISED = 0x0124  # Failure: Refused: Not Authorised
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
ALL_SUB_OPERATIONS_FAILED = 0xA702  # Refused: Out of Resources, unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801  # Refused: Move Destination Unknown
SOP_CLASS_MISMATCH = 0xA900  # Error: Data Set Does Not Match SOP Class
SUB_OPERATIONS_FAILED = 0xB000  # Warning: sub-operations complete, one or more failures
CANNOT_PARSE = 0xC000  # Error: Cannot Understand (C-STORE)
UNABLE_TO_PROCESS = 0xC000  # Failure: Unable to Process (C-FIND, C-MOVE, C-GET)
INVALID_UID = 0xC001  # Error: Cannot Understand, a UID that is missing or not valid (C-STORE)
NO_MATCH_KEY = 0xC001  # Failure: Unable to Process, a retrieve with no unique key
SOP_INSTANCE_MISMATCH = 0xC002  # Error: Cannot Understand, the instance UID differs (C-STORE)

# Names of the query/retrieve service for codes above.
LIMIT_EXCEEDED = OUT_OF_RESOURCES  # more matches than the partition's limit
# A sub-operation that failed here (no file, no context, no decoder), as pynetdicom counts it.
FAILED = PROCESSING_FAILURE


@dataclass(frozen=True)
class Answer:
    """One status of one service and when the node sends it (the conformance statement)."""

    service: str  # "C-STORE", "C-FIND", "C-MOVE", "C-GET", "N-ACTION", ...
    code: int
    when: str


_STORE = "C-STORE"
_QR = ("C-FIND", "C-MOVE", "C-GET")
ANSWERS: tuple[Answer, ...] = (
    Answer("C-ECHO", SUCCESS, "always"),
    Answer(_STORE, SUCCESS, "stored (or a duplicate under the `send-success` or `compare`"
           " policy)"),
    Answer(_STORE, PROCESSING_FAILURE, "the index database is unavailable, or an internal"
           " error: nothing stored"),
    Answer(_STORE, DUPLICATE_REJECTED, "duplicate SOP instance refused (policy `reject`)"),
    Answer(_STORE, REFUSED_NOT_AUTHORISED, "the calling device may not store"
           " (`--no-storage`)"),
    Answer(_STORE, OUT_OF_RESOURCES, "storage is suspended (critical watermark), the instance"
           " would cross it, or the file could not be written"),
    Answer(_STORE, SOP_CLASS_MISMATCH, "the dataset's SOP Class UID differs from the"
           " request's"),
    Answer(_STORE, CANNOT_PARSE, "the dataset cannot be parsed, or its framing is"
           " inconsistent (checked before anything is stored)"),
    Answer(_STORE, INVALID_UID, "a Study, Series or SOP Instance UID is missing or could name"
           " another path or value, or the SOP Class UID is not a valid UID"),
    Answer(_STORE, SOP_INSTANCE_MISMATCH, "the dataset's SOP Instance UID differs from the"
           " request's"),
    Answer(_STORE, SOP_CLASS_NOT_SUPPORTED, "never on the network (such a class gets no"
           " presentation context); `pacsnode import` reports it for a file of a SOP class the"
           " node does not accept"),
    *(Answer(service, code, when) for service in _QR for code, when in (
        (SUCCESS, "every match sent, or every sub-operation succeeded"),
        (PENDING, "a match (C-FIND) or a sub-operation done (C-MOVE, C-GET)"),
        (CANCELLED, "cancelled by the requestor"),
        (REFUSED_NOT_AUTHORISED, "the calling device has no query (C-FIND) or retrieve"
         " (C-MOVE, C-GET) right"),
        (LIMIT_EXCEEDED, "more matches (C-FIND: after sending the first N) or instances than"
         " the partition's limit"),
        (UNABLE_TO_PROCESS, "the identifier cannot be answered (e.g. no or an unknown"
         " Query/Retrieve Level), or the index database is unavailable"),
    )),
    *(Answer(service, code, when) for service in _QR[1:] for code, when in (
        (NO_MATCH_KEY, "a retrieve without any unique key (it would fetch the whole"
         " partition)"),
        (SUB_OPERATIONS_FAILED, "some sub-operations failed (the failed instances are listed)"),
        (ALL_SUB_OPERATIONS_FAILED, "every sub-operation failed"),
    )),
    Answer("C-MOVE", MOVE_DESTINATION_UNKNOWN, "the move destination is not in the device"
           " table, or it cannot be reached (pynetdicom sends it)"),
    Answer("N-ACTION", SUCCESS, "storage commitment request taken; the report follows"),
    Answer("N-ACTION", NO_SUCH_ACTION, "not a storage commitment request, or no Transaction"
           " UID"),
    Answer("N-EVENT-REPORT", SUCCESS, "a storage commitment report received"),
    Answer("N-EVENT-REPORT", NO_SUCH_OBJECT_INSTANCE, "sent: the failure reason of each"
           " instance of a commitment request that is not held"),
)
