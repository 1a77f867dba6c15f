"""C-MOVE and C-GET from the index, with DCMTK storescp as the move destination."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet as PatientRootGet,
)
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelMove as PatientRootMove,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet as StudyRootGet,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelMove as StudyRootMove,
)
from sqlalchemy import select

from node.db.models import Instance, Partition, Study
from tests.conftest import RunningNode, dcmtk_env, free_port, listening, wait_for
from tests.destination import CountingSCP
from tests.dicomgen import make_instance
from tests.indexfill import fill
from tests.integration.test_find import Archive, populate
from tests.scu import associate, identifier, statuses, store


def body(path: Path) -> bytes:
    """A Part-10 file's dataset bytes (after the file meta, which each writer makes its own)."""
    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


def stored_files(node: RunningNode) -> dict[str, Path]:
    with node.db.session() as session:
        return {i.sop_instance_uid: node.storage / i.path for i in session.scalars(
            select(Instance))}


@dataclass
class Destination:
    port: int
    folder: Path
    process: subprocess.Popen[str]

    def received(self) -> dict[str, Path]:
        return {p.name.split(".", 1)[1]: p for p in self.folder.iterdir()}


@pytest.fixture
def destination(node: RunningNode, dcmtk: Path, tmp_path: Path) -> Iterator[Destination]:
    """DCMTK storescp (accepting every syntax) registered in the node as device DEST."""
    port, folder = free_port(), tmp_path / "received"
    folder.mkdir()
    process = subprocess.Popen([str(dcmtk / "storescp"), "-d", "+xa", "-aet", "DEST", "-od",
                                str(folder), str(port)], env=dcmtk_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # A C-MOVE is not retried: the destination must be up before the first one.
    assert wait_for(lambda: listening(port), timeout=10), "storescp did not start listening"
    assert node.cli("device", "add", "DEST", "--host", "127.0.0.1", "--port", str(port),
                    "--max-pdu", "32768").exit_code == 0
    yield Destination(port, folder, process)
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def archive(node: RunningNode) -> Archive:
    return populate(node)


def move(node: RunningNode, level: str, destination: str = "DEST", model: str = "study",
         calling: str = "MOVER", **keys: object) -> list[Dataset]:
    """Every C-MOVE response (pending ones, then the final one), with the final response's
    identifier (the failed SOP instances) as its `identifier` attribute."""
    sop_class = StudyRootMove if model == "study" else PatientRootMove
    assoc = associate(node.port, calling=calling, contexts=[sop_class])
    assert assoc.is_established
    query = identifier(level, keys)
    try:
        responses = []
        for status, answer in assoc.send_c_move(query, destination, sop_class):
            status.identifier = answer
            responses.append(status)
        return responses
    finally:
        assoc.release()


def counts(rsp: Dataset) -> tuple[int, ...]:
    return tuple(int(rsp.get(k, -1)) for k in (
        "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
        "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"))


def test_move_study_counts_and_byte_identical_files(node: RunningNode, archive: Archive,
                                                    destination: Destination) -> None:
    responses = move(node, "STUDY", StudyInstanceUID=archive.studies["S1"])
    *pending, final = responses
    assert [int(r.Status) for r in pending] == [0xFF00] * 4
    assert [counts(r)[:3] for r in pending] == [(3, 1, 0), (2, 2, 0), (1, 3, 0), (0, 4, 0)]
    assert int(final.Status) == 0x0000
    assert counts(final)[1:] == (4, 0, 0)
    stored = stored_files(node)
    received = destination.received()
    assert set(received) == set(archive.sops["S1-CT"] + archive.sops["S1-SR"])
    for sop, path in received.items():
        assert body(path) == body(stored[sop])


def test_move_at_every_level_and_of_several_uids(node: RunningNode, archive: Archive,
                                                 destination: Destination) -> None:
    final = move(node, "PATIENT", model="patient", PatientID="PID3")[-1]
    assert (int(final.Status), counts(final)[1]) == (0, 2)
    two_series = f"{archive.series['S1-CT']}\\{archive.series['S2-MR']}"
    final = move(node, "SERIES", StudyInstanceUID="", SeriesInstanceUID=two_series)[-1]
    assert counts(final)[1] == 5
    two_sops = f"{archive.sops['S1-CT'][0]}\\{archive.sops['S2-MR'][1]}"
    final = move(node, "IMAGE", SOPInstanceUID=two_sops)[-1]
    assert counts(final)[1] == 2
    assert set(destination.received()) == set(
        archive.sops["S3-CT"] + archive.sops["S4-US"] + archive.sops["S1-CT"]
        + archive.sops["S2-MR"])


def test_sub_operations_use_the_destination_device_settings(
        node: RunningNode, archive: Archive, destination: Destination) -> None:
    move(node, "IMAGE", SOPInstanceUID=archive.sops["S3-CT"][0])
    destination.process.terminate()
    log, _ = destination.process.communicate(timeout=10)
    # The device's --max-pdu (32768), not the node's default 1 MiB, reached the destination.
    assert re.search(r"Their Max PDU Receive Size:\s+32768", log)


def test_unknown_destination_and_failed_sub_operations(
        node: RunningNode, archive: Archive, destination: Destination) -> None:
    [final] = move(node, "STUDY", destination="NOWHERE", StudyInstanceUID=archive.studies["S1"])
    assert int(final.Status) == 0xA801
    missing = archive.sops["S1-CT"][1]
    stored_files(node)[missing].unlink()
    final = move(node, "STUDY", StudyInstanceUID=archive.studies["S1"])[-1]
    assert int(final.Status) == 0xB000  # warning: some sub-operations failed
    assert counts(final)[1:3] == (3, 1)
    failed = final.identifier["FailedSOPInstanceUIDList"].value
    assert (failed if isinstance(failed, str) else list(failed)) in (missing, [missing])


def test_retrieve_refusals(node: RunningNode, archive: Archive,
                           destination: Destination) -> None:
    [final] = move(node, "STUDY", StudyInstanceUID="")[-1:]
    assert int(final.Status) == 0xC001  # no unique key: not the whole partition
    assert node.cli("device", "add", "NORETRIEVE", "--no-retrieve").exit_code == 0
    final = move(node, "STUDY", calling="NORETRIEVE", StudyInstanceUID=archive.studies["S1"])[-1]
    assert int(final.Status) == 0x0124
    assert node.cli("partition", "edit", "PACSNODE", "--query-limit", "3").exit_code == 0
    final = move(node, "STUDY", StudyInstanceUID=archive.studies["S1"])[-1]
    assert int(final.Status) == 0xA700
    assert destination.received() == {}


def test_c_cancel_stops_a_running_move(node: RunningNode, destination: Destination) -> None:
    assert statuses(store(node.port, [make_instance()])) == [0]
    with node.db.session() as session:
        partition_id = session.scalar(select(Partition.id))
    assert partition_id is not None
    # 3000 index rows sharing one real file: each sub-operation is a real C-STORE.
    [real] = stored_files(node).values()
    fill(node.db, partition_id, 1, series_per_study=1, instances_per_series=3000,
         path=str(real.relative_to(node.storage)))
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(StudyRootMove)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    with node.db.session() as session:
        query.StudyInstanceUID = session.scalar(
            select(Study.study_instance_uid).where(Study.num_instances == 3000))
    seen, final = 0, None
    for status, _ in assoc.send_c_move(query, "DEST", StudyRootMove, msg_id=9):
        if int(status.Status) == 0xFF00:
            seen += 1
            if seen == 3:
                assoc.send_c_cancel(9, assoc.accepted_contexts[0].context_id)
        else:
            final = status
    assoc.release()
    assert final is not None and int(final.Status) == 0xFE00
    assert counts(final)[0] > 0  # sub-operations were left undone


def get(node: RunningNode, level: str, folder: Path, model: str = "study",
        calling: str = "GETTER", **keys: object) -> list[Dataset]:
    sop_class = StudyRootGet if model == "study" else PatientRootGet
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class)
    roles = []
    for cx in StoragePresentationContexts[:120]:
        ae.add_requested_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1",
                                                      "1.2.840.10008.1.2"])
        roles.append(build_role(cx.abstract_syntax, scp_role=True))

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0

    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = identifier(level, keys)
    try:
        return [status for status, _ in assoc.send_c_get(query, sop_class)]
    finally:
        assoc.release()


def test_c_get_on_the_same_association(node: RunningNode, archive: Archive,
                                       tmp_path: Path) -> None:
    tmp_path = tmp_path / "got"
    tmp_path.mkdir()
    final = get(node, "SERIES", tmp_path, SeriesInstanceUID=archive.series["S1-CT"])[-1]
    assert (int(final.Status), counts(final)[1:3]) == (0, (3, 0))
    assert {p.stem for p in tmp_path.iterdir()} == set(archive.sops["S1-CT"])
    final = get(node, "PATIENT", tmp_path, model="patient", PatientID="PID2")[-1]
    assert counts(final)[1] == 2
    assert node.cli("device", "add", "NORETRIEVE", "--no-retrieve").exit_code == 0
    final = get(node, "STUDY", tmp_path, calling="NORETRIEVE",
                StudyInstanceUID=archive.studies["S1"])[-1]
    assert int(final.Status) == 0x0124


@pytest.mark.interop
def test_dcmtk_movescu_and_getscu(node: RunningNode, archive: Archive, dcmtk: Path,
                                  destination: Destination, tmp_path: Path) -> None:
    jpeg2000 = Path(get_testdata_file("JPEG2000.dcm"))  # type: ignore[arg-type]
    stored_j2k = dcmread(jpeg2000)
    sent = subprocess.run([str(dcmtk / "storescu"), "-xw", "-aec", "PACSNODE", "127.0.0.1",
                           str(node.port), str(jpeg2000)], env=dcmtk_env(), capture_output=True)
    assert sent.returncode == 0
    moved = subprocess.run(
        [str(dcmtk / "movescu"), "-S", "-aec", "PACSNODE", "-aem", "DEST",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={stored_j2k.StudyInstanceUID}",
         "127.0.0.1", str(node.port)], env=dcmtk_env(), capture_output=True, text=True,
        timeout=60)
    assert moved.returncode == 0, moved.stderr
    assert wait_for(lambda: stored_j2k.SOPInstanceUID in destination.received())
    stored = stored_files(node)
    received = destination.received()[stored_j2k.SOPInstanceUID]
    assert dcmread(received).file_meta.TransferSyntaxUID == stored_j2k.file_meta.TransferSyntaxUID
    assert body(received) == body(stored[stored_j2k.SOPInstanceUID])  # compressed, as stored

    get_dir = tmp_path / "get"
    get_dir.mkdir()
    got = subprocess.run(
        [str(dcmtk / "getscu"), "-S", "-aec", "PACSNODE", "-od", str(get_dir),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={archive.studies['S2']}",
         "127.0.0.1", str(node.port)], env=dcmtk_env(), capture_output=True, text=True,
        timeout=60)
    assert got.returncode == 0, got.stderr
    files = {p.name.split(".", 1)[1]: p for p in get_dir.iterdir()}
    assert set(files) == set(archive.sops["S2-MR"])
    for sop, path in files.items():
        assert body(path) == body(stored[sop])


def test_sub_operations_refused_by_the_destination_are_listed(node: RunningNode,
                                                              archive: Archive) -> None:
    refused = archive.sops["S1-CT"][0]
    dest = CountingSCP("PICKY", refuse={refused}).start()
    try:
        assert node.cli("device", "add", "PICKY", "--host", "127.0.0.1",
                        "--port", str(dest.port)).exit_code == 0
        final = move(node, "STUDY", destination="PICKY",
                     StudyInstanceUID=archive.studies["S1"])[-1]
        assert int(final.Status) == 0xB000
        assert counts(final)[1:3] == (3, 1)
        listed = final.identifier["FailedSOPInstanceUIDList"].value
        assert (listed if isinstance(listed, str) else list(listed)) in (refused, [refused])
    finally:
        dest.stop()
