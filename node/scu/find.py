"""C-FIND to a device of the device table: `pacsnode query` (docs/how-to/query-retrieve-remote.md).

Pure helpers build the identifier (the keys asked for plus the usual return keys of the
level, as findscu users expect them) and flatten the answers; `find` runs the association and
yields the answers, raising `FindError` with one line of words when the query fails and
`FindCancelled` after it cancelled the query on Ctrl-C.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS

from node.config import Settings
from node.internals.tuning import CONNECTION_HANDLERS
from node.scu.failure import AssociationFailure
from node.scu.requestor import Own, requestor
from node.statuses import CANCELLED, PENDING, SUCCESS
from node.tls import Endpoint

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODELS = {"study": StudyRootQueryRetrieveInformationModelFind,
          "patient": PatientRootQueryRetrieveInformationModelFind}

# The return keys findscu users expect at each level; the unique keys of the levels above go
# with them so that an answer says where it belongs.
RETURN_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies"),
    "STUDY": ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyDescription", "ModalitiesInStudy", "StudyInstanceUID",
              "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "SeriesInstanceUID", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber", "SOPClassUID",
              "SOPInstanceUID"),
}
# What the node sends and can decode in every answer, whatever it carries (PS3.5 6.1).
CHARACTER_SET = "ISO_IR 192"
_NUMBERS = {"US": int, "UL": int, "SS": int, "SL": int, "UV": int, "SV": int,
            "FL": float, "FD": float}
_SKIPPED = {"SpecificCharacterSet", "QueryRetrieveLevel"}
_MESSAGE_ID = 1
# Pending, and Pending with a warning (optional keys not supported, PS3.4 C.4.1.1.4).
PENDING_CODES = (PENDING, 0xFF01)


class FindError(Exception):
    """A query that could not be sent or failed, in one line of words."""


class FindCancelled(Exception):
    """The query was cancelled (Ctrl-C, or the peer answered Cancel)."""


def parse_key(text: str) -> tuple[BaseTag, str | None]:
    """`Keyword=Value`, `0010,0020=Value` or `(0010,0020)=Value`; no `=`: a return key."""
    name, sep, value = text.partition("=")
    name = name.strip()
    tag = _tag(name)
    if tag is None:
        raise FindError(f"-k {text!r}: {name!r} is neither a DICOM keyword nor a tag gggg,eeee")
    return tag, value if sep else None


def _tag(name: str) -> BaseTag | None:
    found = tag_for_keyword(name)
    if found is not None:
        return Tag(found)
    digits = name.strip("()").replace(",", "").replace(" ", "")
    if len(digits) == 8:
        try:
            return Tag(int(digits, 16))
        except ValueError:
            return None
    return None


def model_for(level: str, model: str | None) -> str:
    """The information model's key: Patient Root for PATIENT level, else Study Root unless
    asked."""
    if level not in LEVELS:
        raise FindError(f"--level must be one of {', '.join(LEVELS)}, not {level!r}")
    if model is not None and model not in MODELS:
        raise FindError(f"--model must be study or patient, not {model!r}")
    if level == "PATIENT":
        if model == "study":
            raise FindError("PATIENT level is in the Patient Root model only (--model patient)")
        return "patient"
    return model or "study"


def identifier(level: str, keys: list[str]) -> Dataset:
    """The C-FIND identifier: the level's return keys (empty), then the keys asked for."""
    if level not in LEVELS:
        raise FindError(f"--level must be one of {', '.join(LEVELS)}, not {level!r}")
    ds = Dataset()
    ds.SpecificCharacterSet = CHARACTER_SET
    ds.QueryRetrieveLevel = level
    for keyword in RETURN_KEYS[level]:
        tag = Tag(keyword)
        ds[tag] = DataElement(tag, dictionary_VR(tag), None)
    for text in keys:
        tag, value = parse_key(text)
        ds[tag] = _element(tag, value, text)
    return ds


def _element(tag: BaseTag, value: str | None, text: str) -> DataElement:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise FindError(f"-k {text!r}: {tag} is not in the DICOM dictionary") from None
    if vr == "SQ":
        raise FindError(f"-k {text!r}: sequence matching is not supported")
    if value is None or value == "":
        return DataElement(tag, vr, None)
    convert = _NUMBERS.get(vr.split(" or ")[0])
    if convert is None:
        return DataElement(tag, vr, value)
    try:
        return DataElement(tag, vr, [convert(v) for v in value.split("\\")]
                           if "\\" in value else convert(value))
    except ValueError:
        raise FindError(f"-k {text!r}: {vr} takes a number") from None


def flatten(ds: Dataset) -> dict[str, Any]:
    """An answer as keyword -> value: strings (decoded with the character set the answer
    carries), lists of strings for several values, "" for an empty one."""
    answer: dict[str, Any] = {}
    for element in ds:
        keyword = element.keyword or keyword_for_tag(element.tag) or str(element.tag)
        if keyword in _SKIPPED:
            continue
        value = element.value
        if element.VR == "SQ":
            answer[keyword] = f"({len(value)} item(s))"
        elif isinstance(value, MultiValue | list):
            answer[keyword] = [str(v) for v in value]
        elif isinstance(value, bytes):
            answer[keyword] = f"({len(value)} bytes)"
        else:
            answer[keyword] = "" if value is None else str(value)
    return answer


def status_words(code: int, comment: str = "") -> str:
    """`status 0xA700 (Refused: Out of Resources): <Error Comment>`."""
    _, meaning = QR_FIND_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))
    words = f"status 0x{code:04X} ({meaning or 'unknown status'})"
    return f"{words}: {comment}" if comment else words


def find(settings: Settings, *, endpoint: Endpoint, called_ae: str, calling_ae: str,
         query: Dataset, model: str, own: Own | None = None) -> Iterator[Dataset]:
    """Send one C-FIND and yield its answers (decoded on access, with their own character
    set). A Ctrl-C while waiting sends a C-CANCEL and raises FindCancelled."""
    sop_class = MODELS[model]
    ae = requestor(settings, calling_ae, own)
    ae.add_requested_context(sop_class)
    failure = AssociationFailure()
    assoc = ae.associate(endpoint.address, endpoint.port, ae_title=called_ae,
                         evt_handlers=[*CONNECTION_HANDLERS, *failure.handlers()],
                         **endpoint.associate_kwargs())  # type: ignore[arg-type]
    if not assoc.is_established:
        raise FindError(f"no association with {called_ae} at {endpoint}: {failure.reason()}")
    try:
        for code, status, answer in _responses(assoc, query, sop_class):
            if code in PENDING_CODES:
                if answer is not None:
                    yield answer
                continue
            if code == SUCCESS:
                return
            if code == CANCELLED:
                raise FindCancelled(f"{called_ae} cancelled the query")
            comment = str(status.get("ErrorComment", ""))
            raise FindError(f"C-FIND to {called_ae} failed: {status_words(code, comment)}")
    finally:
        if assoc.is_established:
            assoc.release()


def _responses(assoc: Any, query: Dataset, sop_class: str
               ) -> Iterator[tuple[int, Dataset, Dataset | None]]:
    """(status code, status, identifier) of each response; an abort or timeout is a FindError."""
    responses = assoc.send_c_find(query, sop_class, msg_id=_MESSAGE_ID)
    while True:
        try:
            status, answer = next(responses)
        except StopIteration:
            return
        except KeyboardInterrupt:
            _cancel(assoc, sop_class)
            raise FindCancelled("cancelled (C-CANCEL sent)") from None
        if "Status" not in status:
            raise FindError("the association was aborted (the peer may not know this calling"
                            " AE title), or no answer came within the DIMSE timeout (the"
                            " device's --dimse-timeout, else dicom.dimse_timeout)")
        yield int(status.Status), status, answer


def _cancel(assoc: Any, sop_class: str) -> None:
    """C-CANCEL the query, then leave: the peer's last answer (Cancel) is not waited for."""
    if assoc.is_established:
        try:
            assoc.send_c_cancel(_MESSAGE_ID, query_model=sop_class)
        finally:
            assoc.abort()
