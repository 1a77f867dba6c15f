"""C-MOVE and C-GET from the index, with DCMTK storescp as the move destination."""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import ssl
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
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

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


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


@contextlib.contextmanager
def storescp(node: RunningNode, dcmtk: Path, folder: Path, ae_title: str,
             *options: str) -> Iterator[Destination]:
    """DCMTK storescp writing what it receives as received (+B) into `folder`, registered in
    the node as device `ae_title`."""
    port = free_port()
    folder.mkdir()
    process = subprocess.Popen([str(dcmtk / "storescp"), "-d", "+B", *options, "-aet",
                                ae_title, "-od", str(folder), str(port)], env=dcmtk_env(),
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # A C-MOVE is not retried: the destination must be up before the first one.
        assert wait_for(lambda: listening(port), timeout=10), "storescp did not start listening"
        assert node.cli("device", "add", ae_title, "--host", "127.0.0.1", "--port", str(port),
                        "--max-pdu", "32768").exit_code == 0
        yield Destination(port, folder, process)
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def destination(node: RunningNode, dcmtk: Path, tmp_path: Path) -> Iterator[Destination]:
    """storescp accepting every transfer syntax, as device DEST."""
    with storescp(node, dcmtk, tmp_path / "received", "DEST", "+xa") as dest:
        yield dest


@pytest.fixture
def plain(node: RunningNode, dcmtk: Path, tmp_path: Path) -> Iterator[Destination]:
    """storescp accepting uncompressed transfer syntaxes only (its default), as device
    PLAIN."""
    with storescp(node, dcmtk, tmp_path / "plain", "PLAIN") as dest:
        yield dest


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


def uids(value: str | list[str]) -> list[str]:
    """A UI value of one or more UIDs, as a list."""
    return [value] if isinstance(value, str) else list(value)


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


def a_long_study(node: RunningNode, instances: int = 3000) -> str:
    """A study of `instances` index rows sharing one real file: each sub-operation is a real
    C-STORE. Its Study Instance UID."""
    assert statuses(store(node.port, [make_instance()])) == [0]
    with node.db.session() as session:
        partition_id = session.scalar(select(Partition.id))
    assert partition_id is not None
    [real] = stored_files(node).values()
    fill(node.db, partition_id, 1, series_per_study=1, instances_per_series=instances,
         path=str(real.relative_to(node.storage)))
    with node.db.session() as session:
        uid = session.scalar(select(Study.study_instance_uid)
                             .where(Study.num_instances == instances))
    assert uid is not None
    return uid


def test_c_cancel_stops_a_running_move(node: RunningNode, destination: Destination) -> None:
    study = a_long_study(node)
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(StudyRootMove)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
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


def test_c_cancel_stops_a_running_get(node: RunningNode, tmp_path: Path) -> None:
    """The C-CANCEL arrives on the socket the sub-operations are written to."""
    study = a_long_study(node)
    final = get(node, "STUDY", tmp_path, cancel_after=3, StudyInstanceUID=study)[-1]
    assert int(final.Status) == 0xFE00
    remaining, completed = counts(final)[:2]
    assert remaining > 0 and remaining + completed == 3000  # stopped, nothing lost count of


def get(node: RunningNode, level: str, folder: Path, model: str = "study",
        calling: str = "GETTER", syntaxes: tuple[str, ...] = UNCOMPRESSED,
        cancel_after: int = 0, port: int = 0,
        tls_args: tuple[ssl.SSLContext, str] | None = None, **keys: object) -> list[Dataset]:
    """As `move`, for a C-GET whose storage contexts propose `syntaxes` (by default explicit,
    then implicit VR little endian); each instance received is written to `folder` as
    received. `cancel_after`: a C-CANCEL after that many pending responses; `port`, `tls_args`:
    another port than the node's, with TLS."""
    sop_class = StudyRootGet if model == "study" else PatientRootGet
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class)
    roles = []
    for cx in StoragePresentationContexts[:120]:
        ae.add_requested_context(cx.abstract_syntax, list(syntaxes))
        roles.append(build_role(cx.abstract_syntax, scp_role=True))

    def on_store(event: evt.Event) -> int:
        target = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        try:  # (pynetdicom writes what it receives to a file in this process: the node's
            shutil.copyfile(event.dataset_path, target)  # configure_pynetdicom)
        except AttributeError:
            target.write_bytes(event.encoded_dataset())
        return 0

    assoc = ae.associate("127.0.0.1", port or node.port, ae_title="PACSNODE", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)], tls_args=tls_args)
    assert assoc.is_established
    query = identifier(level, keys)
    try:
        responses = []
        for status, answer in assoc.send_c_get(query, sop_class, msg_id=9):
            status.identifier = answer
            responses.append(status)
            if len(responses) == cancel_after:
                assoc.send_c_cancel(9, next(cx.context_id for cx in assoc.accepted_contexts
                                            if cx.abstract_syntax == sop_class))
        return responses
    finally:
        assoc.release()


def test_c_get_on_the_same_association(node: RunningNode, archive: Archive,
                                       tmp_path: Path) -> None:
    tmp_path = tmp_path / "got"
    tmp_path.mkdir()
    *pending, final = get(node, "SERIES", tmp_path, SeriesInstanceUID=archive.series["S1-CT"])
    # A pending response after each sub-operation (each written with the next C-STORE, the
    # last before the final response), then the final one.
    assert [(int(r.Status), *counts(r)[:3]) for r in pending] == [
        (0xFF00, 2, 1, 0), (0xFF00, 1, 2, 0), (0xFF00, 0, 3, 0)]
    assert (int(final.Status), counts(final)[1:3]) == (0, (3, 0))
    assert {p.stem for p in tmp_path.iterdir()} == set(archive.sops["S1-CT"])
    final = get(node, "PATIENT", tmp_path, model="patient", PatientID="PID2")[-1]
    assert counts(final)[1] == 2
    assert node.cli("device", "add", "NORETRIEVE", "--no-retrieve").exit_code == 0
    final = get(node, "STUDY", tmp_path, calling="NORETRIEVE",
                StudyInstanceUID=archive.studies["S1"])[-1]
    assert int(final.Status) == 0x0124


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


# Files kept byte for byte by the node and returned so by C-GET and C-MOVE: pydicom's files
# with group length elements (gggg,0000) in their data set, in three transfer syntaxes, and
# one in implicit VR; each with the getscu option that makes it propose that syntax first.
AS_STORED = {
    "chrKoreanMulti.dcm": (ExplicitVRLittleEndian, ()),
    "693_J2KI.dcm": (JPEG2000, ("+xw",)),
    "ExplVR_BigEnd.dcm": (ExplicitVRBigEndian, ("+xb",)),
    "MR_small_implicit.dcm": (ImplicitVRLittleEndian, None),  # getscu cannot propose it first
}


def pydicom_file(name: str) -> Path:
    found = get_testdata_file(name) or next(iter(get_charset_files(name)), None)
    assert found, name
    return Path(found)


def group_lengths(path: Path) -> list[int]:
    """The group length elements of a file's data set, at its top level."""
    return [int(e.tag) for e in dcmread(path) if e.tag.element == 0]


def store_as_is(node: RunningNode, paths: list[Path]) -> dict[str, Path]:
    """Each file sent as its own bytes, in its own transfer syntax; SOP Instance UID -> file."""
    sent = {}
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        assert statuses(store(node.port, [path], syntaxes=[
            str(ds.file_meta.TransferSyntaxUID)])) == [0], path.name
        sent[str(ds.SOPInstanceUID)] = path
    return sent


def run_scu(dcmtk: Path, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(dcmtk / tool), *args], env=dcmtk_env(), capture_output=True,
                          text=True, timeout=60)


def image_keys(*uids: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={chr(92).join(uids)}"]


@pytest.mark.interop
def test_movescu_gets_the_stored_bytes_group_lengths_and_all(
        node: RunningNode, dcmtk: Path, destination: Destination, tmp_path: Path) -> None:
    big = make_instance(size=1100)  # 2.4 MB: several pieces read, many 16 KiB PDUs each
    big.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    sent = store_as_is(node, [*map(pydicom_file, AS_STORED), tmp_path / "big.dcm"])
    moved = run_scu(dcmtk, "movescu", "-S", "-aec", "PACSNODE", "-aem", "DEST",
                    *image_keys(*sent), "127.0.0.1", str(node.port))
    assert moved.returncode == 0, moved.stderr
    received = destination.received()
    assert set(received) == set(sent)
    stored = stored_files(node)
    for sop, original in sent.items():
        # The node stored what it was sent, and sends what it stored.
        assert body(stored[sop]) == body(original)
        assert body(received[sop]) == body(original), original.name
    korean = pydicom_file("chrKoreanMulti.dcm")
    assert len(group_lengths(korean)) == 9
    assert group_lengths(received[str(dcmread(korean).SOPInstanceUID)]) == \
        group_lengths(korean)


@pytest.mark.interop
@pytest.mark.parametrize("name", AS_STORED)
def test_c_get_gets_the_stored_bytes_in_the_syntax_it_takes(
        node: RunningNode, dcmtk: Path, tmp_path: Path, name: str) -> None:
    """DCMTK getscu, proposing the file's syntax first; pynetdicom for implicit VR."""
    [(sop, original)] = store_as_is(node, [pydicom_file(name)]).items()
    syntax, options = AS_STORED[name]
    folder = tmp_path / "got"
    folder.mkdir()
    if options is None:
        final = get(node, "IMAGE", folder, syntaxes=(syntax,), SOPInstanceUID=sop)[-1]
        assert (int(final.Status), counts(final)[1:3]) == (0, (1, 0))
    else:
        got = run_scu(dcmtk, "getscu", "-S", "-aec", "PACSNODE", "+B", *options, "-od",
                      str(folder), *image_keys(sop), "127.0.0.1", str(node.port))
        assert got.returncode == 0, got.stderr
    [received] = folder.iterdir()
    assert sop in received.name
    assert dcmread(received).file_meta.TransferSyntaxUID == syntax
    assert body(received) == body(original)


def pixels(path: Path) -> object:
    return dcmread(path).pixel_array


@pytest.mark.interop
def test_compressed_data_goes_decompressed_where_only_uncompressed_is_taken(
        node: RunningNode, dcmtk: Path, plain: Destination, tmp_path: Path) -> None:
    rle = pydicom_file("MR_small_RLE.dcm")
    [(sop, _)] = store_as_is(node, [rle]).items()
    moved = run_scu(dcmtk, "movescu", "-S", "-aec", "PACSNODE", "-aem", "PLAIN",
                    *image_keys(sop), "127.0.0.1", str(node.port))
    assert moved.returncode == 0, moved.stderr
    folder = tmp_path / "got"
    folder.mkdir()
    got = run_scu(dcmtk, "getscu", "-S", "-aec", "PACSNODE", "-od", str(folder),
                  *image_keys(sop), "127.0.0.1", str(node.port))
    assert got.returncode == 0, got.stderr
    for received in [plain.received()[sop], *folder.iterdir()]:
        assert not dcmread(received).file_meta.TransferSyntaxUID.is_compressed
        assert (pixels(received) == pixels(rle)).all()


def undecodable() -> Path:
    """A compressed file pydicom cannot decompress without plugins (none installed here)."""
    path = pydicom_file("SC_rgb_jpeg_gdcm.dcm")
    try:
        dcmread(path).pixel_array  # noqa: B018
    except Exception:
        return path
    pytest.skip("a JPEG decoder is installed: nothing here is undecodable")


@pytest.mark.interop
def test_what_cannot_be_decompressed_fails_by_name_and_the_rest_goes(
        node: RunningNode, plain: Destination, tmp_path: Path) -> None:
    jpeg = undecodable()
    sent = store_as_is(node, [jpeg])
    other = make_instance()
    assert statuses(store(node.port, [other])) == [0]
    jpeg_uid = next(iter(sent))
    both = f"{jpeg_uid}\\{other.SOPInstanceUID}"
    final = move(node, "IMAGE", destination="PLAIN", SOPInstanceUID=both)[-1]
    assert int(final.Status) == 0xB000
    assert counts(final)[1:3] == (1, 1)
    assert uids(final.identifier.FailedSOPInstanceUIDList) == [jpeg_uid]
    assert set(plain.received()) == {other.SOPInstanceUID}
    folder = tmp_path / "got"
    folder.mkdir()
    final = get(node, "IMAGE", folder, SOPInstanceUID=jpeg_uid)[-1]
    assert int(final.Status) == 0xA702  # its only sub-operation failed
    assert counts(final)[1:3] == (0, 1)
    assert uids(final.identifier.FailedSOPInstanceUIDList) == [jpeg_uid]
    assert list(folder.iterdir()) == []


def large_instance(path: Path, mebibytes: int) -> str:
    """A multi-frame instance of about `mebibytes` MiB of pixel data, written a frame at a
    time; its SOP Instance UID."""
    ds = make_instance(size=512)
    del ds.PixelData
    frames = mebibytes * 4  # 512 x 512 x 2 bytes = 1/4 MiB each
    ds.NumberOfFrames = frames
    with path.open("wb") as f:
        dcmwrite(f, ds, enforce_file_format=True)
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, frames * 512 * 512 * 2))
        for i in range(frames):
            f.write(bytes([i % 251]) * (512 * 512 * 2))
    return str(ds.SOPInstanceUID)


def digest(path: Path) -> str:
    """The SHA-256 of a file's data set, read in pieces."""
    with path.open("rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        sha = hashlib.sha256()
        while piece := f.read(1 << 20):
            sha.update(piece)
    return sha.hexdigest()


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def peak_growth() -> Iterator[list[float]]:
    """The most this process's resident memory grew while the block ran, in MiB (the node
    runs in it)."""
    baseline, peak, done = resident_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], resident_mib() - baseline)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


@pytest.mark.slow
@pytest.mark.interop
def test_a_large_instance_goes_out_in_pieces(node: RunningNode, dcmtk: Path,
                                             destination: Destination, tmp_path: Path) -> None:
    original = tmp_path / "large.dcm"
    sop = large_instance(original, 192)
    sent = run_scu(dcmtk, "storescu", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
                   str(original))
    assert sent.returncode == 0, sent.stderr
    folder = tmp_path / "got"
    folder.mkdir()
    with peak_growth() as moving:
        moved = run_scu(dcmtk, "movescu", "-S", "-aec", "PACSNODE", "-aem", "DEST",
                        *image_keys(sop), "127.0.0.1", str(node.port))
    with peak_growth() as getting:
        got = run_scu(dcmtk, "getscu", "-S", "-aec", "PACSNODE", "+B", "-od", str(folder),
                      *image_keys(sop), "127.0.0.1", str(node.port))
    assert moved.returncode == 0 and got.returncode == 0, moved.stderr + got.stderr
    # The node read the 192 MiB a piece at a time (1 MiB), never the whole instance.
    assert moving[0] < 48 and getting[0] < 48, (moving, getting)
    [got_file] = folder.iterdir()
    assert digest(destination.received()[sop]) == digest(got_file) == digest(original)
