"""The DICOM trace's lines (node/dicomtrace.py), from values and from pynetdicom's primitives."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from io import BytesIO

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, dimse_messages, dimse_primitives, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import (
    A_ABORT,
    A_ASSOCIATE,
    A_P_ABORT,
    A_RELEASE,
    ImplementationVersionNameNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification

from node import config, dicomtrace
from node.cli.serve import trace
from node.dicomtrace import Context

DCMTK_UID = "1.2.276.0.7230010.3.0.3.6.8"


@pytest.fixture(autouse=True)
def _trace_left_off() -> Iterator[None]:
    yield
    dicomtrace.configure(False)


def test_request_line_names_titles_pdu_implementation_and_every_context() -> None:
    line = dicomtrace.associate_request(
        "MODALITY        ", "PACSNODE", 16384, DCMTK_UID, "OFFIS_DCMTK_368",
        [Context(1, CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
         Context(3, "1.2.3.4.999", [ImplicitVRLittleEndian])])
    assert line == (
        "A-ASSOCIATE-RQ calling=MODALITY called=PACSNODE max_pdu=16384"
        f" implementation={DCMTK_UID} OFFIS_DCMTK_368 contexts(2):"
        " 1 CTImageStorage [ExplicitVRLittleEndian ImplicitVRLittleEndian],"
        " 3 1.2.3.4.999 [ImplicitVRLittleEndian]")


def test_accept_line_counts_accepted_contexts_and_says_why_others_were_refused() -> None:
    line = dicomtrace.associate_accept(
        1048576, "2.25.1", "PACSNODE_0_1", [
            Context(1, CTImageStorage, [ExplicitVRLittleEndian], 0),
            Context(3, "", [ImplicitVRLittleEndian], 3),
            Context(5, "", [], 4)])
    assert line == (
        "A-ASSOCIATE-AC max_pdu=1048576 implementation=2.25.1 PACSNODE_0_1"
        " contexts(1/3 accepted): 1 CTImageStorage accepted ExplicitVRLittleEndian,"
        " 3 refused (abstract syntax not supported), 5 refused (transfer syntaxes not supported)")


@pytest.mark.parametrize(("result", "source", "diagnostic", "words"), [
    (1, 1, 3, "rejected permanent, source service user: calling AE title not recognised"),
    (1, 1, 7, "rejected permanent, source service user: called AE title not recognised"),
    (2, 3, 2, "rejected transient, source service provider (presentation): local limit"
              " exceeded"),
    (1, 2, 2, "rejected permanent, source service provider (ACSE): protocol version not"
              " supported"),
    (2, 1, 9, "rejected transient, source service user: reason 9"),
])
def test_reject_line_gives_result_source_and_reason_in_words(
        result: int, source: int, diagnostic: int, words: str) -> None:
    assert dicomtrace.associate_reject(result, source, diagnostic) == f"A-ASSOCIATE-RJ {words}"


def test_release_and_abort_lines() -> None:
    assert dicomtrace.release(False) == "A-RELEASE-RQ"
    assert dicomtrace.release(True) == "A-RELEASE-RP"
    assert dicomtrace.abort(0) == "A-ABORT source service user"
    assert dicomtrace.abort(2) == "A-ABORT source service provider"
    assert dicomtrace.provider_abort(2) == "A-P-ABORT: unexpected PDU"


def test_dimse_line_carries_ids_classes_status_and_data_set_size() -> None:
    assert dicomtrace.dimse(0x0001, context_id=41, message_id=7, sop_class=CTImageStorage,
                            sop_instance="1.2.3", data_set=8726) == (
        "C-STORE-RQ id=7 context=41 class=CTImageStorage instance=1.2.3 data set 8726 bytes")
    assert dicomtrace.dimse(0x8001, responded_to=7, status=0xA700,
                            comment="storage suspended") == (
        "C-STORE-RSP answers=7 status=0xA700 Failure comment='storage suspended'")
    assert dicomtrace.dimse(0x8010, status=0xFF00, extra=dicomtrace.suboperations(3, 1, 0, 0)) \
        == "C-GET-RSP status=0xFF00 Pending remaining=3 completed=1 failed=0 warning=0"
    assert dicomtrace.dimse(0x8020, status=0xFF00, data_set=-1) == \
        "C-FIND-RSP status=0xFF00 Pending data set"
    assert dicomtrace.dimse(0x4242) == "command 0x4242"


def test_ae_title_filter() -> None:
    assert dicomtrace.wanted("ANY", "ONE", frozenset())
    assert dicomtrace.wanted("MODALITY ", "PACSNODE", frozenset({"MODALITY"}))
    assert dicomtrace.wanted("PACSNODE", "ARCHIVE", frozenset({"ARCHIVE"}))
    assert not dicomtrace.wanted("OTHER", "PACSNODE", frozenset({"MODALITY"}))


def test_label_says_direction_titles_and_peer() -> None:
    assert dicomtrace.label(True, "MODALITY", "PACSNODE", "10.0.0.9", 40412) == \
        "[in MODALITY->PACSNODE 10.0.0.9:40412]"
    assert dicomtrace.label(False, "PACSNODE", "ARCHIVE", "10.0.0.7", 104) == \
        "[out PACSNODE->ARCHIVE 10.0.0.7:104]"


# --- pynetdicom's primitives and messages, as its ACSE and DIMSE events carry them -----------


def _request() -> A_ASSOCIATE:
    primitive = A_ASSOCIATE()
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "PACSNODE"
    primitive.maximum_length_received = 16384
    primitive.implementation_class_uid = DCMTK_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "OFFIS_DCMTK_368"
    primitive.user_information.append(version)
    context = PresentationContext()
    context.context_id = 1
    context.abstract_syntax = Verification
    context.transfer_syntax = [ImplicitVRLittleEndian]
    primitive.presentation_context_definition_list = [context]
    return primitive


def test_acse_line_of_a_request_primitive() -> None:
    assert dicomtrace.acse_line(_request()) == (
        "A-ASSOCIATE-RQ calling=MODALITY called=PACSNODE max_pdu=16384"
        f" implementation={DCMTK_UID} OFFIS_DCMTK_368 contexts(1):"
        " 1 Verification [ImplicitVRLittleEndian]")


def test_acse_line_of_an_accept_names_contexts_from_the_request() -> None:
    accept = A_ASSOCIATE()
    accept.result = 0
    accept.maximum_length_received = 0
    accept.implementation_class_uid = "2.25.1"
    result = PresentationContext()
    result.context_id = 1
    result.transfer_syntax = [ImplicitVRLittleEndian]
    result.result = 0
    accept.presentation_context_definition_results_list = [result]
    assert dicomtrace.acse_line(accept, _request()) == (
        "A-ASSOCIATE-AC max_pdu=0 implementation=2.25.1 contexts(1/1 accepted):"
        " 1 Verification accepted ImplicitVRLittleEndian")


def test_acse_line_of_reject_release_and_aborts(caplog: pytest.LogCaptureFixture) -> None:
    reject = A_ASSOCIATE()
    reject.result, reject.result_source, reject.diagnostic = 1, 1, 7
    assert dicomtrace.acse_line(reject) == ("A-ASSOCIATE-RJ rejected permanent, source service"
                                            " user: called AE title not recognised")
    assert not caplog.records  # (pynetdicom logs an error for a missing implementation UID)
    rq, rp = A_RELEASE(), A_RELEASE()
    rp.result = "affirmative"
    assert (dicomtrace.acse_line(rq), dicomtrace.acse_line(rp)) == ("A-RELEASE-RQ",
                                                                    "A-RELEASE-RP")
    abort = A_ABORT()
    abort.abort_source = 2
    assert dicomtrace.acse_line(abort) == "A-ABORT source service provider"
    # A primitive whose parameter was never set reads as unknown, never as an error.
    assert dicomtrace.acse_line(A_ABORT()) == "A-ABORT source None"
    provider = A_P_ABORT()
    provider.provider_reason = 6
    assert dicomtrace.acse_line(provider) == "A-P-ABORT: invalid PDU parameter value"


def test_dimse_line_of_pynetdicom_messages() -> None:
    request = dimse_primitives.C_STORE()
    request.MessageID = 5
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request.Priority = 0
    request.DataSet = BytesIO(b"\0" * 100)
    message = dimse_messages.C_STORE_RQ()
    message.primitive_to_message(request)
    message.context_id = 3
    assert dicomtrace.dimse_line(message) == (
        "C-STORE-RQ id=5 context=3 class=CTImageStorage instance=1.2.3.4 data set 100 bytes")

    response = dimse_primitives.C_MOVE()
    response.MessageIDBeingRespondedTo = 9
    response.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    response.Status = 0x0000
    response.NumberOfCompletedSuboperations = 4
    response.NumberOfFailedSuboperations = 0
    response.NumberOfWarningSuboperations = 0
    answer = dimse_messages.C_MOVE_RSP()
    answer.primitive_to_message(response)
    answer.context_id = 1
    assert dicomtrace.dimse_line(answer) == (
        "C-MOVE-RSP answers=9 context=1 class=StudyRootQueryRetrieveInformationModelMove"
        " status=0x0000 Success remaining=0 completed=4 failed=0 warning=0")


# --- switching it on -----------------------------------------------------------------------


def test_configure_sets_the_trace_logger_to_debug_and_back() -> None:
    dicomtrace.configure(True, [" MODALITY ", ""])
    assert dicomtrace.enabled()
    assert logging.getLogger("pacsnode.dicom.trace").isEnabledFor(logging.DEBUG)
    dicomtrace.configure(False)
    assert not dicomtrace.enabled()
    assert logging.getLogger("pacsnode.dicom.trace").level == logging.NOTSET


TRACED_EVENTS = (evt.EVT_ACSE_RECV, evt.EVT_ACSE_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


@pytest.mark.parametrize("on", [False, True])
def test_an_association_gets_trace_handlers_only_while_the_trace_is_on(on: bool) -> None:
    """Off, nothing is bound: pynetdicom's events find no handler, as without the trace."""
    dicomtrace.configure(on)
    assoc = Association(AE(), "acceptor")
    before = {event: list(assoc.get_handlers(event)) for event in TRACED_EVENTS}
    dicomtrace.on_open(evt.Event(assoc, evt.EVT_CONN_OPEN, {}))
    bound = [event for event in TRACED_EVENTS if assoc.get_handlers(event) != before[event]]
    assert bound == (list(TRACED_EVENTS) if on else [])
    assert dicomtrace.traced(assoc) is on


def test_command_line_switches_the_settings_on() -> None:
    settings = config.Settings()
    trace(settings, False, "")
    assert not settings.node.trace_dicom
    trace(settings, False, "MODALITY, ARCHIVE")
    assert settings.node.trace_dicom
    assert settings.node.trace_dicom_ae_titles == ["MODALITY", "ARCHIVE"]


def test_setting_refuses_what_is_no_ae_title(tmp_path: object) -> None:
    settings = config.Settings()
    settings.node.trace_dicom_ae_titles = ["A" * 17]
    with pytest.raises(config.ConfigError, match=r"node\.trace_dicom_ae_titles"):
        config.validate(settings)
