"""What `pacsnode import` finds in files, folders and DICOMDIRs, and what it makes of a file."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.importing.importer import negotiation_refusal
from node.importing.sources import (
    Kind,
    Sniffed,
    collect,
    match_name,
    meta_end,
    resolve_file_id,
    sniff,
    valid_component,
)
from node.statuses import INVALID_UID, SOP_CLASS_NOT_SUPPORTED

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
DICOMDIR = TEST_FILES / "dicomdirtests" / "DICOMDIR"
CT = "1.2.840.10008.5.1.4.1.1.2"


def test_part10_file_is_stored_as_it_is() -> None:
    sniffed = sniff(TEST_FILES / "CT_small.dcm")
    ds = dcmread(TEST_FILES / "CT_small.dcm", stop_before_pixels=True)
    assert sniffed == Sniffed(Kind.PART10, ds.SOPClassUID, ds.SOPInstanceUID,
                              ds.file_meta.TransferSyntaxUID)
    assert sniffed.dataset_offset is None


@pytest.mark.parametrize(("name", "syntax"), [
    ("rtstruct.dcm", ImplicitVRLittleEndian),
    ("ExplVR_LitEndNoMeta.dcm", ExplicitVRLittleEndian),
    ("ExplVR_BigEndNoMeta.dcm", ExplicitVRBigEndian),
])
def test_bare_data_set_gets_file_meta_in_its_own_encoding(name: str, syntax: str) -> None:
    sniffed = sniff(TEST_FILES / name)
    ds = dcmread(TEST_FILES / name, force=True, stop_before_pixels=True)
    assert (sniffed.kind, sniffed.sop_class, sniffed.sop_instance, sniffed.transfer_syntax,
            sniffed.dataset_offset) == (Kind.DATASET, ds.SOPClassUID, ds.SOPInstanceUID,
                                        syntax, 0)


def test_file_meta_naming_another_instance_is_made_anew_from_the_data_set() -> None:
    # rtplan.dcm's meta names ...999... while its data set is ...777... (a C-STORE sender
    # puts the data set's UIDs in its request, and the receiver writes meta for them).
    sniffed = sniff(TEST_FILES / "rtplan.dcm")
    ds = dcmread(TEST_FILES / "rtplan.dcm", stop_before_pixels=True)
    assert sniffed.kind is Kind.PART10 and sniffed.sop_instance == ds.SOPInstanceUID
    assert sniffed.sop_instance != ds.file_meta.MediaStorageSOPInstanceUID
    assert sniffed.dataset_offset == _pydicom_dataset_offset(TEST_FILES / "rtplan.dcm")
    assert "made anew" in sniffed.reason


@pytest.mark.parametrize("name", ["CT_small.dcm", "rtplan.dcm", "no_meta_group_length.dcm",
                                  "JPEG2000.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm"])
def test_meta_end_is_where_pydicom_starts_the_data_set(name: str) -> None:
    head = (TEST_FILES / name).read_bytes()[:65536]
    assert meta_end(head) == _pydicom_dataset_offset(TEST_FILES / name)


def test_meta_end_of_a_cut_header_is_unknown() -> None:
    head = (TEST_FILES / "CT_small.dcm").read_bytes()
    end = meta_end(head)
    assert end is not None
    assert meta_end(head[:end - 3]) is None


def _pydicom_dataset_offset(path: Path) -> int:
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        return fp.tell()


@pytest.mark.parametrize(("name", "kind"), [
    ("README.txt", Kind.NOT_DICOM),
    ("zipMR.gz", Kind.NOT_DICOM),
    ("crayons.icc", Kind.NOT_DICOM),
    ("test1.json", Kind.NOT_DICOM),
    ("no_meta.dcm", Kind.NOT_DICOM),  # a stray byte before its first element
    ("meta_missing_tsyntax.dcm", Kind.BROKEN),
    ("dicomdirtests/DICOMDIR", Kind.DICOMDIR),
    ("dicomdirtests/DICOMDIR-implicit", Kind.DICOMDIR),
])
def test_what_is_not_an_instance(name: str, kind: Kind) -> None:
    sniffed = sniff(TEST_FILES / name)
    assert sniffed.kind is kind
    assert kind is Kind.DICOMDIR or sniffed.reason


def test_a_large_file_that_is_not_dicom_is_told_from_its_first_bytes(tmp_path: Path) -> None:
    # A disc image or a video on a CD: pydicom, forced to read 8 MB of zeros as a data set,
    # walks a million empty elements (2.5 s here) before it finds no SOP Class UID.
    (tmp_path / "image.iso").write_bytes(bytes(8_000_000))
    started = time.perf_counter()
    assert sniff(tmp_path / "image.iso").kind is Kind.NOT_DICOM
    assert time.perf_counter() - started < 0.5


def test_a_fifo_is_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # opening it to read would wait for a writer forever
    assert sniff(tmp_path / "pipe") == Sniffed(Kind.NOT_DICOM, reason="not a regular file")


def test_empty_file_is_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    assert sniff(tmp_path / "empty").kind is Kind.NOT_DICOM


def test_no_warnings_from_pydicom_while_sniffing(recwarn: pytest.WarningsRecorder) -> None:
    for path in sorted(TEST_FILES.iterdir()):
        if path.is_file():
            sniff(path)
    assert [str(w.message) for w in recwarn] == []


def test_media_names_match_in_any_case_and_with_iso9660_versions() -> None:
    names = ["im000001", "IM000002.;1", "Im000003;1", "IM000004.", "OTHER"]
    assert match_name("IM000001", names) == "im000001"
    assert match_name("IM000002", names) == "IM000002.;1"
    assert match_name("im000003", names) == "Im000003;1"
    assert match_name("IM000004", names) == "IM000004."
    assert match_name("IM000005", names) is None
    assert match_name("IM00000", names) is None  # no prefix matching


@pytest.mark.parametrize("component", ["..", ".", "", "a/b", "a\\b", "a\0b"])
def test_file_id_components_cannot_leave_the_media(component: str) -> None:
    assert not valid_component(component)


def test_file_id_with_dot_dot_is_refused(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    (tmp_path / "secret").write_bytes(b"x")
    path, why = resolve_file_id(tmp_path / "media", ["..", "secret"])
    assert path is None and "invalid file ID component" in why


def _lower_case_copy(tmp_path: Path) -> Path:
    """pydicom's DICOMDIR media as a Linux mount of an ISO 9660 disc shows it: names in
    lower case (the DICOMDIR's file IDs stay upper case, as written)."""
    media = tmp_path / "cdrom"
    shutil.copytree(DICOMDIR.parent, media)
    for path in sorted(media.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.name != path.name.lower():
            path.rename(path.with_name(path.name.lower()))
    return media


def test_dicomdir_references_resolve_case_insensitively(tmp_path: Path) -> None:
    media = _lower_case_copy(tmp_path)
    assert (media / "77654033" / "cr1").is_dir() and not (media / "77654033" / "CR1").exists()
    found, problems = collect([media / "dicomdir"])
    original, _ = collect([DICOMDIR])
    assert problems == []
    assert len(found) == len(original) == 31
    assert [p.relative_to(media) for p in found] == [
        Path(*(part.lower() for part in p.relative_to(DICOMDIR.parent).parts))
        for p in original]
    ds = dcmread(DICOMDIR)
    referenced = {tuple(r.ReferencedFileID) for r in ds.DirectoryRecordSequence
                  if "ReferencedFileID" in r}
    assert {tuple(p.relative_to(DICOMDIR.parent).parts) for p in original} == referenced


def test_missing_referenced_file_is_a_problem_the_others_still_import(tmp_path: Path) -> None:
    media = _lower_case_copy(tmp_path)
    (media / "77654033" / "cr2" / "6247").unlink()
    found, problems = collect([media / "dicomdir"])
    assert len(found) == 30
    [problem] = problems
    assert problem.path == media / "77654033" / "CR2" / "6247"
    assert "referenced by" in problem.reason and "not found" in problem.reason


def test_unreadable_dicomdir_is_a_problem(tmp_path: Path) -> None:
    broken = tmp_path / "DICOMDIR"
    data = DICOMDIR.read_bytes()
    broken.write_bytes(data[:400])
    found, problems = collect([broken])
    assert found == []
    [problem] = problems
    assert problem.path == broken and "cannot read the DICOMDIR" in problem.reason


def test_folder_and_dicomdir_reaching_the_same_files_import_each_once() -> None:
    found, problems = collect([DICOMDIR.parent, DICOMDIR, DICOMDIR.parent / "77654033"])
    assert problems == []
    walked = sorted(p for p in DICOMDIR.parent.rglob("*") if p.is_file())
    assert sorted(found) == walked
    assert len(set(found)) == len(found)


def test_folders_are_walked_in_name_order(tmp_path: Path) -> None:
    for name in ("b/2", "b/1", "a/z", "c"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found, _ = collect([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["c", "a/z", "b/1", "b/2"]


def test_negotiation_refusals() -> None:
    syntaxes = {CT: frozenset({str(ExplicitVRLittleEndian)})}
    ok = Sniffed(Kind.PART10, CT, "1.2.3", str(ExplicitVRLittleEndian))
    assert negotiation_refusal(syntaxes, ok, accept_unknown=False) is None
    unknown = Sniffed(Kind.PART10, "1.2.3.4", "1.2.3", str(ExplicitVRLittleEndian))
    status, why = negotiation_refusal(syntaxes, unknown, accept_unknown=False) or (0, "")
    assert status == SOP_CLASS_NOT_SUPPORTED and "1.2.3.4" in why
    # dicom.accept_unknown_sop_classes: a class no library knows gets the storage syntaxes...
    assert negotiation_refusal(syntaxes, unknown, accept_unknown=True) is None
    # ... but a known class of another service is never storage.
    worklist = Sniffed(Kind.PART10, "1.2.840.10008.5.1.4.31", "1.2.3",
                       str(ExplicitVRLittleEndian))
    status, _ = negotiation_refusal(syntaxes, worklist, accept_unknown=True) or (0, "")
    assert status == SOP_CLASS_NOT_SUPPORTED
    status, why = negotiation_refusal(syntaxes, Sniffed(Kind.PART10, CT, "1.2.3",
                                                        str(ImplicitVRLittleEndian)),
                                      accept_unknown=True) or (0, "")
    assert status is None and "transfer syntax 1.2.840.10008.1.2 is not accepted" in why
    status, why = negotiation_refusal(syntaxes, Sniffed(Kind.PART10, CT, "",
                                                        str(ExplicitVRLittleEndian)),
                                      accept_unknown=True) or (0, "")
    assert (status, why) == (INVALID_UID, "SOPInstanceUID is missing")

