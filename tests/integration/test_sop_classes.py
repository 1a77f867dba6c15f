"""Objects a PACS must keep: retired and non-patient storage classes, SOP classes no library
knows, UIDs that are not conformant but harmless; and the UIDs that stay refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_palette_files, get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification
from sqlalchemy import select

from node.db.models import Instance
from node.storage.paths import instance_relpath
from tests.conftest import RunningNode
from tests.dicomgen import make_instance
from tests.hostile import dataset_bytes, part10
from tests.integration.test_bad_input import chunked_send
from tests.integration.test_find import find
from tests.scu import associate, statuses, store

UNKNOWN_CLASS = "1.2.3.4.5"  # no library knows it: a vendor's private storage class


def palette() -> Path:
    [path] = [Path(p) for p in get_palette_files("hotiron.dcm")]
    return path


def pydicom_data(name: str) -> Path:
    """A file of the pydicom-data package (pydicom's larger test files)."""
    found = get_testdata_file(name)
    assert found, f"{name}: install the pydicom-data package (pip install -e '.[test]')"
    return Path(found)


def send_as_is(node: RunningNode, path: Path, tmp_path: Path, *, dataset_uid: bool = True
               ) -> tuple[int, str]:
    """C-STORE a file's dataset bytes in a context of its SOP class and transfer syntax;
    (status, error comment). An association without that context fails the test.

    The request names the dataset's SOP Instance UID, as storescu does (bad_sequence.dcm's
    file meta still has the UID from before its anonymisation); `dataset_uid` False: the
    file meta's."""
    ds = dcmread(path, stop_before_pixels=True)
    meta = ds.file_meta
    if dataset_uid and meta.MediaStorageSOPInstanceUID != ds.SOPInstanceUID:
        path = tmp_path / f"request-{path.name}"
        path.write_bytes(part10(dataset_bytes(Path(ds.filename)), meta.TransferSyntaxUID,
                                ds.SOPInstanceUID, meta.MediaStorageSOPClassUID))
    assoc = associate(node.port, contexts=[meta.MediaStorageSOPClassUID],
                      syntaxes=[meta.TransferSyntaxUID])
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] \
            == [meta.MediaStorageSOPClassUID], "no presentation context for the SOP class"
        with chunked_send():
            rsp = assoc.send_c_store(path)
        return int(rsp.Status), str(rsp.get("ErrorComment", ""))
    finally:
        assoc.release()


def indexed_path(node: RunningNode, sop: str) -> Path:
    with node.db.session() as session:
        path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop))
    assert path is not None, f"{sop} is not indexed"
    return node.storage / path


@pytest.mark.parametrize("name", ["color-pl.dcm", "color-px.dcm", "bad_sequence.dcm",
                                  "palette"])
def test_objects_a_pacs_must_keep_are_stored_byte_for_byte_and_found(
        node: RunningNode, name: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Retired Ultrasound (color-pl, color-px), a non-patient Color Palette without Study or
    Series UID, and bad_sequence.dcm whose UIDs are hex hashes."""
    caplog.set_level(logging.WARNING)
    path = palette() if name == "palette" else pydicom_data(name)
    ds = dcmread(path, stop_before_pixels=True)
    assert send_as_is(node, path, tmp_path) == (0, "")
    stored = indexed_path(node, ds.SOPInstanceUID)
    assert dataset_bytes(stored) == dataset_bytes(path)
    study, series = ds.get("StudyInstanceUID", ""), ds.get("SeriesInstanceUID", "")
    assert stored == node.storage / instance_relpath("PACSNODE", study, series,
                                                      ds.SOPInstanceUID)
    found, final = find(node, "IMAGE", SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID="",
                        SeriesInstanceUID="", SOPClassUID="")
    assert final == 0
    assert [(f.SOPInstanceUID, f.StudyInstanceUID, f.SeriesInstanceUID, f.SOPClassUID)
            for f in found] == [(ds.SOPInstanceUID, study, series, ds.SOPClassUID)]
    if name == "bad_sequence.dcm":
        # Not conformant: stored under hashes of the UIDs, with a warning naming them.
        assert all(part.startswith("x") for part in stored.relative_to(
            node.storage / "PACSNODE").with_suffix("").parts)
        assert "not conformant" in caplog.text and ds.StudyInstanceUID in caplog.text


@pytest.mark.parametrize(("preference", "accepted"), [("requestor", ExplicitVRLittleEndian),
                                                     ("node", ImplicitVRLittleEndian)])
def test_a_sop_class_no_library_knows_is_stored_when_allowed(
        make_node: object, preference: str, accepted: str) -> None:
    node: RunningNode = make_node(  # type: ignore[operator]
        f'[dicom]\ntransfer_syntax_preference = "{preference}"\n'
        'transfer_syntaxes = ["ImplicitVRLittleEndian", "ExplicitVRLittleEndian"]\n')
    ds = make_instance(sop_class=UNKNOWN_CLASS)
    assoc = associate(node.port, contexts=[UNKNOWN_CLASS, Verification],
                      syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assert assoc.is_established
    try:
        # The transfer syntax is chosen as for every other storage class.
        assert [cx.transfer_syntax[0] for cx in assoc.accepted_contexts
                if cx.abstract_syntax == UNKNOWN_CLASS] == [accepted]
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    assert dcmread(indexed_path(node, ds.SOPInstanceUID)).SOPClassUID == UNKNOWN_CLASS
    found, final = find(node, "IMAGE", SOPInstanceUID=ds.SOPInstanceUID, SOPClassUID="")
    assert final == 0 and [f.SOPClassUID for f in found] == [UNKNOWN_CLASS]


def test_a_sop_class_no_library_knows_gets_no_context_when_not_allowed(
        make_node: object, tmp_path: Path) -> None:
    node: RunningNode = make_node(  # type: ignore[operator]
        "[dicom]\naccept_unknown_sop_classes = false\n")
    assoc = associate(node.port, contexts=[UNKNOWN_CLASS, Verification])
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
    finally:
        assoc.release()
    # Retired storage classes pydicom knows are still taken.
    assert send_as_is(node, pydicom_data("color-pl.dcm"), tmp_path) == (0, "")


@pytest.mark.parametrize("abstract", [
    ModalityWorklistInformationFind,  # a service the node does not offer
    "1.2.840.10008.5.1.1.1",  # Basic Film Session: print management, not storage
    ExplicitVRLittleEndian,  # a transfer syntax proposed as an abstract syntax
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR): media only
])
def test_classes_of_other_services_are_not_taken_as_storage(node: RunningNode,
                                                            abstract: str) -> None:
    assoc = associate(node.port, contexts=[abstract, Verification])
    assert assoc.is_established
    try:
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
    finally:
        assoc.release()


def test_a_retired_class_is_stored_when_pynetdicom_decodes_the_request(
        node: RunningNode) -> None:
    """A peer whose maximum PDU is too small for the direct receiver: pynetdicom decodes the
    C-STORE, and would abort for a storage class it does not list."""
    path = pydicom_data("color-pl.dcm")
    meta = dcmread(path, stop_before_pixels=True).file_meta
    from pynetdicom import AE

    from node.internals.tuning import CONNECTION_HANDLERS
    ae = AE(ae_title="TINYPDU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE", max_pdu=512,
                         evt_handlers=CONNECTION_HANDLERS)
    assert assoc.is_established
    try:
        with chunked_send():
            assert int(assoc.send_c_store(path).Status) == 0
    finally:
        assoc.release()
    assert dataset_bytes(indexed_path(node, meta.MediaStorageSOPInstanceUID)) \
        == dataset_bytes(path)


def test_harmless_uids_that_mean_something_to_a_shell_or_a_glob_are_stored_under_hashes(
        node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    ds = make_instance(study_uid="1.2.*", series_uid="[1]~", sop_uid="1..2")
    assert statuses(store(node.port, [ds])) == [0]
    stored = indexed_path(node, "1..2")
    assert stored == node.storage / instance_relpath("PACSNODE", "1.2.*", "[1]~", "1..2")
    assert [part[0] for part in stored.relative_to(node.storage).parts[1:]] == ["x"] * 3
    found, final = find(node, "IMAGE", SOPInstanceUID="1..2", StudyInstanceUID="",
                        SeriesInstanceUID="")
    assert final == 0
    assert [(f.StudyInstanceUID, f.SeriesInstanceUID) for f in found] == [("1.2.*", "[1]~")]
    assert "'1.2.*'" in caplog.text and "'[1]~'" in caplog.text and "'1..2'" in caplog.text
