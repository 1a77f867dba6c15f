"""Storage commitment, push model: as SCP (reports what is held), as SCU (after forwarding)."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import select

from node.db.models import Study
from node.forwarding.admin import stored_elsewhere
from node.scp.commitment import WELL_KNOWN_INSTANCE, request_dataset
from tests.conftest import RunningNode, free_port, wait_for
from tests.dicomgen import make_instance
from tests.integration.test_forward import FAST, jobs
from tests.scu import statuses, store

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_forwarded_study_counts_as_stored_elsewhere_once_committed(make_node: object) -> None:
    parent = make_node(FAST, name="parent")  # type: ignore[operator]
    child = make_node(FAST, name="child")  # type: ignore[operator]
    # Both sides know each other: the parent sends its report to the child's AE.
    assert parent.cli("device", "add", "CHILD", "--ae-title", "PACSNODE", "--type", "CHILD",
                      "--host", "127.0.0.1", "--port", str(child.port)).exit_code == 0
    assert child.cli("device", "add", "PARENT", "--ae-title", "PACSNODE", "--type", "PARENT",
                     "--host", "127.0.0.1", "--port", str(parent.port),
                     "--storage-commitment").exit_code == 0
    first = make_instance()
    sent = [first, *(make_instance(study_uid=first.StudyInstanceUID) for _ in range(3))]
    assert statuses(store(child.port, sent)) == [0] * 4
    assert wait_for(lambda: [j.commitment for j in jobs(child)] == ["committed"] * 4,
                    timeout=30)
    with child.db.session() as session:
        study_pk = session.scalar(select(Study.id))
        assert study_pk is not None and stored_elsewhere(session, study_pk)


def test_a_study_is_not_stored_elsewhere_before_commitment(make_node: object) -> None:
    child = make_node(FAST)  # type: ignore[operator]
    port = free_port()  # nobody there: nothing is delivered, nothing committed
    assert child.cli("device", "add", "PARENT", "--type", "PARENT", "--host", "127.0.0.1",
                     "--port", str(port), "--storage-commitment").exit_code == 0
    assert statuses(store(child.port, [make_instance()])) == [0]
    with child.db.session() as session:
        study_pk = session.scalar(select(Study.id))
        assert study_pk is not None and not stored_elsewhere(session, study_pk)


def test_scp_reports_held_and_missing_instances(node: RunningNode) -> None:
    held = make_instance()
    assert statuses(store(node.port, [held])) == [0]
    reports: list[tuple[int, Dataset]] = []

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((event.event_type, event.event_information))
        return 0x0000, None

    listener = AE(ae_title="REQUESTER")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    port = free_port()
    server = listener.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        assert node.cli("device", "add", "REQUESTER", "--host", "127.0.0.1",
                        "--port", str(port)).exit_code == 0
        requester = AE(ae_title="REQUESTER")
        requester.add_requested_context(StorageCommitmentPushModel)
        assoc = requester.associate("127.0.0.1", node.port, ae_title="PACSNODE",
                                    ext_neg=[build_role(StorageCommitmentPushModel,
                                                        scu_role=True)])
        assert assoc.is_established
        status, _ = assoc.send_n_action(
            request_dataset("1.2.3.4.5", [(CT, held.SOPInstanceUID), (CT, "1.2.3.999")]), 1,
            StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        assoc.release()
        assert int(status.Status) == 0
        assert wait_for(lambda: reports, timeout=10)
        event_type, report = reports[0]
        assert event_type == 2  # some instances failed
        assert report.TransactionUID == "1.2.3.4.5"
        assert [r.ReferencedSOPInstanceUID for r in report.ReferencedSOPSequence] == [
            held.SOPInstanceUID]
        [failed] = report.FailedSOPSequence
        assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == ("1.2.3.999", 0x0112)
    finally:
        server.shutdown()
