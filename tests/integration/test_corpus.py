"""pydicom's bundled test and character-set files, sent as their own bytes: what a PACS must
keep is stored byte for byte, indexed as pydicom reads it, found by its names in every
script, and retrieved (C-GET) as stored; the rest gets a failure status, never a crash."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from node.dicomtext import element_text, fold
from node.query.index import ATTRIBUTES
from tests.conftest import RunningNode, stored_files
from tests.hostile import dataset_bytes
from tests.integration.test_find import find
from tests.scu import send_files

DATA = Path(pydicom.__file__).parent / "data"
# pydicom-data's vendor files (every transfer syntax, Big Endian, deflate, multi-frame), those
# under 1 MB: the larger ones add time, not kinds of file.
VENDOR = Path(get_testdata_file("color-pl.dcm")).parent
FILES = [*sorted((DATA / "test_files").glob("*.dcm")),
         *sorted((DATA / "charset_files").glob("*.dcm")),
         *sorted(p for p in VENDOR.glob("*.dcm") if p.stat().st_size < 1 << 20)]
UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Sent, and refused with a failure status: what is really broken.
BROKEN = {
    # An element runs past the end of the file.
    "rtplan_truncated.dcm": 0xC000,
    "MR_truncated.dcm": 0xC000,
    # Implicit VR data sent in a context that negotiated JPEG Baseline (explicit VR).
    "SC_rgb_jpeg.dcm": 0xC000,
    "emri_small_jpeg_2k_lossless_too_short.dcm": 0xC000,
}
# Keys answered at the IMAGE level: every indexed attribute with a column.
INDEXED = [keyword for keyword, attribute in ATTRIBUTES.items()
           if attribute.column is not None and keyword != "ModalitiesInStudy"]


@dataclass(frozen=True)
class Sample:
    source: Path  # the bundled file
    sent: Path  # what is sent: the file, or a copy whose meta names the data set's instance
    header: Dataset  # as pydicom reads the file

    @property
    def name(self) -> str:
        return self.source.name


def samples(folder: Path) -> tuple[list[Sample], dict[str, str]]:
    """The files a modality could send as they are (Part 10, with the UIDs a PACS files
    them under), and why each other one cannot be."""
    out, skipped = [], {}
    for path in FILES:
        try:
            meta = read_file_meta_info(path)
            header = dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            skipped[path.name] = f"not a Part-10 file pydicom reads: {exc}"
            continue
        missing = [k for k in ("TransferSyntaxUID", "MediaStorageSOPClassUID") if k not in meta]
        missing += [k for k in UIDS if not header.get(k)]
        if missing:
            skipped[path.name] = f"no {', '.join(missing)}"
            continue
        sent = path
        if meta.get("MediaStorageSOPInstanceUID") != header.SOPInstanceUID:
            # pynetdicom takes a file's C-STORE request from its meta, a modality from its
            # data set (DCMTK storescu does): a copy's meta is made to agree, the data set's
            # bytes stay as they are.
            meta.MediaStorageSOPInstanceUID = header.SOPInstanceUID
            sent = folder / path.name
            buffer = DicomBytesIO()
            write_file_meta_info(buffer, meta, enforce_standard=True)
            sent.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + dataset_bytes(path))
        out.append(Sample(path, sent, header))
    return out, skipped


@dataclass
class Corpus:
    node: RunningNode
    kept: list[Sample]
    statuses: dict[str, int]
    skipped: dict[str, str]


@pytest.fixture
def corpus(node: RunningNode, tmp_path: Path) -> Iterator[Corpus]:
    found, skipped = samples(tmp_path)
    responses = send_files(node.port, [s.sent for s in found])
    statuses = {s.name: int(responses[s.sent].Status) for s in found}
    # Several files of pydicom-data share a SOP Instance UID: the first is stored, a later
    # one is a duplicate (answered success, the stored copy kept: the default policy).
    first: dict[str, Sample] = {}
    for sample in found:
        if sample.name not in BROKEN:
            first.setdefault(str(sample.header.SOPInstanceUID), sample)
    yield Corpus(node, list(first.values()), statuses, skipped)


def test_every_file_a_pacs_must_keep_is_stored_byte_for_byte(corpus: Corpus) -> None:
    assert {name: status for name, status in corpus.statuses.items()
            if (status != 0) != (name in BROKEN) or status != BROKEN.get(name, status)} == {}
    stored = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
              for p in stored_files(corpus.node.storage)}
    differ = [s.name for s in corpus.kept
              if dataset_bytes(stored[s.header.SOPInstanceUID]) != dataset_bytes(s.sent)]
    assert differ == []
    assert len(corpus.kept) >= 60  # the corpus really was sent (66 distinct instances)


def _first_of_each_study(kept: list[Sample]) -> dict[str, Sample]:
    """A study answers with what its first instance carried (in the order sent)."""
    first: dict[str, Sample] = {}
    for sample in kept:
        first.setdefault(str(sample.header.StudyInstanceUID), sample)
    return first


def test_every_indexed_value_answers_as_pydicom_reads_it(corpus: Corpus) -> None:
    studies = _first_of_each_study(corpus.kept)
    series: dict[str, Sample] = {}
    for sample in corpus.kept:
        series.setdefault(str(sample.header.SeriesInstanceUID), sample)
    wrong = {}
    for sample in corpus.kept:
        answers, final = find(corpus.node, "IMAGE", **{
            **dict.fromkeys(INDEXED, ""), "SOPInstanceUID": sample.header.SOPInstanceUID})
        assert final == 0 and len(answers) == 1, sample.name
        for keyword in INDEXED:
            level = ATTRIBUTES[keyword].level
            source = {"PATIENT": studies, "STUDY": studies, "SERIES": series}.get(level)
            owner = (source[str(sample.header.StudyInstanceUID if level != "SERIES"
                                else sample.header.SeriesInstanceUID)].header
                     if source is not None else sample.header)
            expected = (element_text(owner, keyword) or "").strip()
            got = (element_text(answers[0], keyword) or "").strip()
            if keyword.startswith("NumberOf"):
                continue
            if got != expected:
                wrong[(sample.name, keyword)] = (expected, got)
    assert wrong == {}


def test_names_in_every_script_are_found_ignoring_case(corpus: Corpus) -> None:
    missed = []
    for uid, sample in _first_of_each_study(corpus.kept).items():
        name = str(sample.header.get("PatientName", "") or "")
        if not name.strip("^= "):
            continue
        for variant in {name, name.upper(), name.lower()}:
            if fold(variant) != fold(name) or "*" in variant or "?" in variant:
                continue  # a letter whose case changes its length; wildcards in the name
            answers, _ = find(corpus.node, "STUDY", StudyInstanceUID="", PatientName=variant)
            if uid not in {a.StudyInstanceUID for a in answers}:
                missed.append((sample.name, variant))
    assert missed == []


def test_c_get_returns_the_stored_bytes(corpus: Corpus) -> None:
    received: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        received[event.request.AffectedSOPInstanceUID] = Path(event.dataset_path).read_bytes()
        return 0x0000

    pairs = sorted({(str(s.header.SOPClassUID), str(read_file_meta_info(s.sent)
                                                    .TransferSyntaxUID)) for s in corpus.kept})
    ae = AE(ae_title="GETTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    classes = sorted({sop_class for sop_class, _ in pairs})
    for sop_class, syntax in pairs[:127]:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", corpus.node.port, ae_title="PACSNODE",
                         ext_neg=[build_role(c, scp_role=True) for c in classes],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        for uid in _first_of_each_study(corpus.kept):
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = uid
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                assert status is not None and "Status" in status
    finally:
        assoc.release()
    differ = [s.name for s in corpus.kept
              if s.header.SOPInstanceUID not in received
              or dataset_bytes(received[s.header.SOPInstanceUID]) != dataset_bytes(s.sent)]
    assert differ == []
