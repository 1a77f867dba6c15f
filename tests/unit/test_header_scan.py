"""header_scan reads the index values exactly as pydicom does, or declines."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.db.indexer import INDEX_ELEMENTS, INDEX_KEYWORDS, INDEX_TAGS, attributes, extract
from node.storage.header_scan import scan_header
from node.storage.structure import StructureError, read_header
from tests import hostile
from tests.dicomgen import make_instance

# Values a sender may well put in the index elements: padding, empty values, signs, odd
# lengths, characters that need a character set, several values.
PLAIN = ["", " ", "A", "AB", " LEADING", "TRAILING  ", "MID DLE", "DOE^JOHN", "DOE^JOHN^^^",
         "DOE^JOHN=ID^EO", "x" * 70, "12", "a-b_c.d(e)/f'g\"h*?", "~}{|`"]
INTEGERS = ["1", " 12", "+7", "-3", "007 ", "1.0", ""]
NOT_PLAIN = ["Müller^Jürgen", "A\\B", "tab\there"]


def write(tmp_path: Path, ds: Dataset, syntax: str, name: str = "x.dcm") -> Path:
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / name
    body = hostile.encode(ds, implicit=syntax == ImplicitVRLittleEndian,
                          little=syntax != ExplicitVRBigEndian)
    path.write_bytes(hostile.part10(body, syntax, str(ds.SOPInstanceUID)))
    return path


def pydicom_attributes(path: Path) -> dict[str, str] | str:
    try:
        return extract(read_header(path, INDEX_TAGS)).values
    except ValueError as exc:
        return f"refused: {type(exc).__name__}"


def scanned_attributes(path: Path) -> dict[str, str] | str | None:
    try:
        scanned = scan_header(path, INDEX_ELEMENTS)
    except StructureError as exc:
        return f"refused: {type(exc).__name__}"
    return None if scanned is None else attributes(scanned[1]).values


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_random_headers_read_as_pydicom_reads_them(tmp_path: Path, syntax: str) -> None:
    rng = random.Random(8)
    scanned = 0
    for i in range(300):
        ds = make_instance(size=4)
        for keyword in INDEX_KEYWORDS:
            if keyword in ("SOPInstanceUID", "SOPClassUID", "SpecificCharacterSet"):
                continue
            roll = rng.random()
            if roll < 0.1:
                if keyword in ds:
                    del ds[keyword]
            elif keyword in ("SeriesNumber", "InstanceNumber"):
                setattr(ds, keyword, rng.choice(INTEGERS))
            elif keyword.endswith("InstanceUID"):
                setattr(ds, keyword, rng.choice([ds[keyword].value, "1.2.3", "1.2.34", ""]))
            else:
                setattr(ds, keyword, rng.choice(PLAIN + (NOT_PLAIN if roll > 0.9 else [])))
        if rng.random() < 0.3:
            ds.SpecificCharacterSet = rng.choice(["ISO_IR 100", "ISO_IR 192", "ISO_IR 13",
                                                  "\\ISO 2022 IR 87"])
        if rng.random() < 0.3:
            inner = Dataset()
            inner.PatientID = "NOT-THE-TOP-LEVEL-ONE"  # nested: not an index value
            ds.OtherPatientIDsSequence = Sequence([inner])
        path = write(tmp_path, ds, syntax, f"{i}.dcm")
        fast = scanned_attributes(path)
        if fast is not None:
            scanned += 1
            assert fast == pydicom_attributes(path), path
    assert scanned > 100  # (with these odds of odd values) most are read without pydicom


def test_typical_instances_are_scanned(tmp_path: Path) -> None:
    path = write(tmp_path, make_instance(), ExplicitVRLittleEndian)
    scanned = scan_header(path, INDEX_ELEMENTS)
    assert scanned is not None
    syntax, texts = scanned
    assert syntax == ExplicitVRLittleEndian and texts["PatientName"] == "DOE^JANE"


@pytest.mark.parametrize("case", ["big endian", "name in latin-1", "two values",
                                  "UID sent as UL", "IS that is no integer",
                                  "ISO_IR 13 character set"])
def test_what_pydicom_might_read_differently_is_left_to_it(tmp_path: Path, case: str) -> None:
    ds = make_instance()
    syntax = ExplicitVRLittleEndian
    if case == "big endian":
        syntax = ExplicitVRBigEndian
    elif case == "name in latin-1":
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
    elif case == "two values":
        ds.StudyDescription = ["A", "B"]
    elif case == "IS that is no integer":
        ds.InstanceNumber = "1.0"
    elif case == "ISO_IR 13 character set":
        ds.SpecificCharacterSet = "ISO_IR 13"
    path = write(tmp_path, ds, syntax)
    if case == "UID sent as UL":
        data = path.read_bytes()
        path.write_bytes(data[:132] + hostile.set_vr(data[132:], 0x0020000D, b"UL"))
    assert scan_header(path, INDEX_ELEMENTS) is None


def test_broken_framing_is_refused_like_read_header(tmp_path: Path) -> None:
    path = write(tmp_path, make_instance(), ExplicitVRLittleEndian)
    path.write_bytes(path.read_bytes()[:-10])  # pixel data cut short
    with pytest.raises(StructureError):
        scan_header(path, INDEX_ELEMENTS)
    with pytest.raises(StructureError):
        read_header(path, INDEX_TAGS)
