"""The structural checks of the C-STORE path, on crafted files (no sockets)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.db.indexer import INDEX_TAGS
from node.storage import structure
from node.storage.structure import Encoding, StructureError, bytes_reader, read_header, walk
from tests import hostile
from tests.dicomgen import ROOT, make_instance

EXPLICIT = Encoding(implicit_vr=False, little_endian=True)
IMPLICIT = Encoding(implicit_vr=True, little_endian=True)
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010


def header_of(tmp_path: Path, data: bytes) -> Dataset:
    path = tmp_path / "in.dcm"
    path.write_bytes(data)
    return read_header(path, INDEX_TAGS)


def refusal(tmp_path: Path, data: bytes) -> str:
    with pytest.raises(StructureError) as info:
        header_of(tmp_path, data)
    return str(info.value)


def element(tag: int, vr: bytes, value: bytes, *, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element (4-byte length for the long VRs)."""
    length = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + b"\0\0" + struct.pack("<L", length) + value
    return head + struct.pack("<H", length) + value


def item(value: bytes = b"", *, length: int | None = None, tag: int = 0xFFFEE000) -> bytes:
    length = len(value) if length is None else length
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length) + value


ITEM_END = item(tag=0xFFFEE00D)
SEQ_END = item(tag=0xFFFEE0DD)


# --- well-formed files pass, in every encoding -------------------------------------------

@pytest.mark.parametrize("data", [
    pytest.param(hostile.instance_file(), id="explicit-little"),
    pytest.param(hostile.instance_file(implicit=True), id="implicit-little"),
    pytest.param(hostile.instance_file(little=False), id="explicit-big"),
    pytest.param(hostile.encapsulated_file(), id="encapsulated"),
    pytest.param(hostile.with_sequences(), id="undefined-length-sequences-explicit"),
    pytest.param(hostile.with_sequences(implicit=True), id="undefined-length-sequences-implicit"),
    pytest.param(hostile.deflated_file(), id="deflated"),
])
def test_well_formed_files_pass(tmp_path: Path, data: bytes) -> None:
    ds = header_of(tmp_path, data)
    assert ds.SOPInstanceUID.startswith(ROOT)
    assert "PixelData" not in ds


def test_walk_follows_sequences_after_the_pixel_data_item_by_item(tmp_path: Path) -> None:
    data = hostile.with_sequences(depth=3)
    start = hostile.element_offset(data, PIXEL_DATA)
    # A nested undefined-length sequence after the pixel data: 1 + 3 * (item + 2 elements +
    # sequence) + delimiters; with too few steps allowed the walk must run out.
    walk(bytes_reader(data), start, len(data), EXPLICIT)
    with pytest.raises(StructureError, match="too many elements"):
        walk(bytes_reader(data), start, len(data), EXPLICIT, max_steps=5)
    with pytest.raises(StructureError, match="nested deeper"):
        walk(bytes_reader(data), start, len(data), EXPLICIT, max_depth=2)


def test_file_without_dataset_passes_the_checks(tmp_path: Path) -> None:
    # Nothing to walk; Ingest refuses it for its missing UIDs (0xC001).
    ds = header_of(tmp_path, hostile.part10(b"", ExplicitVRLittleEndian, "1.2.3"))
    assert "SOPInstanceUID" not in ds


# --- broken framing is refused -----------------------------------------------------------

def test_truncated_pixel_data(tmp_path: Path) -> None:
    assert "(7FE0,0010)" in refusal(tmp_path, hostile.instance_file()[:-100])


def test_truncated_encapsulated_pixel_data(tmp_path: Path) -> None:
    data = hostile.encapsulated_file()
    assert "item of (7FE0,0010)" in refusal(tmp_path, data[:-60])  # inside the last fragment
    assert "truncated" in refusal(tmp_path, data[:-8])  # the sequence delimiter is missing


def test_pixel_data_length_that_does_not_match_its_value(tmp_path: Path) -> None:
    data = hostile.instance_file()
    length = len(data) - hostile.element_offset(data, PIXEL_DATA) - 12
    shorter = hostile.set_length(data, PIXEL_DATA, length - 2)  # 2 bytes left over
    assert "truncated element header" in refusal(tmp_path, shorter)
    longer = hostile.set_length(data, PIXEL_DATA, length + 2)
    assert "past the end" in refusal(tmp_path, longer)


@pytest.mark.parametrize("length", [0xFFFFFFF0, 0x7FFFFFFF, 100_000])
def test_absurd_length_before_the_indexed_tags(tmp_path: Path, length: int) -> None:
    # Image Type is not indexed: pydicom seeks over it, past the end, and stops there quietly.
    ds = make_instance()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    data = hostile.set_length(hostile.instance_file(ds, implicit=True), 0x00080008, length,
                              implicit=True)
    assert "past the end of the file" in refusal(tmp_path, data)


def test_absurd_length_of_an_indexed_element(tmp_path: Path) -> None:
    # pydicom reads the rest of the file as the patient's name and would index it.
    data = hostile.set_length(hostile.instance_file(implicit=True), 0x00100010, 0xFFFFFFF0,
                              implicit=True)
    assert "(0010,0010)" in refusal(tmp_path, data)


def test_absurd_length_after_the_indexed_tags(tmp_path: Path) -> None:
    ds = make_instance()
    ds.add_new(0x00291010, "OB", b"\0" * 16)  # private, between the indexed tags and pixels
    ds.add_new(0x00290010, "LO", "HOSTILE")
    data = hostile.set_length(hostile.instance_file(ds), 0x00291010, 0xFFFFFFF0)
    assert "past the end of the file" in refusal(tmp_path, data)


def test_absurd_length_after_the_pixel_data(tmp_path: Path) -> None:
    ds = make_instance()
    ds.DataSetTrailingPadding = b"\0" * 8
    data = hostile.set_length(hostile.instance_file(ds), 0xFFFCFFFC, 0xFFFFFFF0)
    assert "(FFFC,FFFC)" in refusal(tmp_path, data)


def test_absurd_length_inside_a_sequence_after_the_pixel_data(tmp_path: Path) -> None:
    data = hostile.with_sequences()
    start = hostile.element_offset(data, PIXEL_DATA)
    # The first Referenced SOP Class UID after the pixel data: its 2-byte length, made huge.
    at = hostile.element_offset(data, 0x00081150, start=start) + 6
    broken = data[:at] + struct.pack("<H", 0xFFFF) + data[at + 2:]
    assert "past the end" in refusal(tmp_path, broken)


@pytest.mark.parametrize("tail", [b"\x01\x02\x03", b"\0" * 7, ITEM_END, SEQ_END, item(b"xx"),
                                  element(0xFFFCFFFC, b"OB", b"\0\0", length=UNDEFINED)])
def test_trailing_garbage(tmp_path: Path, tail: bytes) -> None:
    refusal(tmp_path, hostile.instance_file() + tail)


def test_truncated_sequence_before_the_pixel_data(tmp_path: Path) -> None:
    # pydicom raises a bare OSError for the item it cannot read; it must count as unparseable.
    data = hostile.with_sequences()
    cut = hostile.element_offset(data, 0x00081150) + 4
    with pytest.raises(ValueError):  # StructureError, or pydicom's own ValueError
        header_of(tmp_path, data[:cut])


def test_header_cut_inside_an_element_header(tmp_path: Path) -> None:
    # Cut between the VR and the 4-byte length of Pixel Data: pydicom raises struct.error.
    data = hostile.instance_file()
    cut = hostile.element_offset(data, PIXEL_DATA) + 9
    assert "struct" in refusal(tmp_path, data[:cut]) or "error" in refusal(tmp_path, data[:cut])


def test_absurdly_nested_sequences_before_the_pixel_data(tmp_path: Path) -> None:
    # pydicom reads sequences before the pixel data itself, recursively: RecursionError.
    data = hostile.instance_file()
    at = hostile.element_offset(data, PIXEL_DATA)
    opening = element(0x7FDF1010, b"SQ", b"", length=UNDEFINED) + item(length=UNDEFINED)
    nested = opening * 2000 + (ITEM_END + SEQ_END) * 2000
    assert "RecursionError" in refusal(tmp_path, data[:at] + nested + data[at:])


@pytest.mark.parametrize(("implicit", "claimed", "found"), [
    (True, ExplicitVRLittleEndian, "implicit"),
    (False, ImplicitVRLittleEndian, "explicit"),
])
def test_file_meta_that_lies_about_the_transfer_syntax(tmp_path: Path, implicit: bool,
                                                       claimed: str, found: str) -> None:
    data = hostile.instance_file(implicit=implicit, transfer_syntax=claimed)
    assert f"{found} VR dataset" in refusal(tmp_path, data)


def test_deflated_dataset_that_is_truncated_or_followed_by_data(tmp_path: Path) -> None:
    data = hostile.deflated_file()
    assert "truncated" in refusal(tmp_path, data[:-20])
    assert "16 bytes of data after the end" in refusal(tmp_path, data + b"\0" * 16)
    start = structure.read_meta(bytes_reader(data)).dataset_start
    # Block type 3 in the first block header is reserved (RFC 1951 3.2.3).
    invalid = data[:start] + bytes([data[start] | 0b110]) + data[start + 1:]
    assert "corrupt" in refusal(tmp_path, invalid)


def deflated_of_parity(odd: bool) -> tuple[bytes, int]:
    """A deflated file whose stream has odd (or even) length, and the stream's length."""
    for size in range(8, 64):
        data = hostile.deflated_file(make_instance(size=size))
        length = len(data) - structure.read_meta(bytes_reader(data)).dataset_start
        if length % 2 == odd:
            return data, length
    raise AssertionError("no stream of that parity")


def gzip_trailer(data: bytes) -> bytes:
    inflated = zlib.decompress(data[structure.read_meta(bytes_reader(data)).dataset_start:],
                               -zlib.MAX_WBITS)
    return struct.pack("<LL", zlib.crc32(inflated), len(inflated))


def test_deflated_dataset_padded_to_even_length_is_accepted(tmp_path: Path) -> None:
    """storescu sends an odd-length deflate stream with one 00 byte after it (PDVs have even
    length); only that byte, and only after an odd-length stream, is padding."""
    odd, _ = deflated_of_parity(odd=True)
    even, _ = deflated_of_parity(odd=False)
    assert header_of(tmp_path, odd + b"\0").SOPInstanceUID.startswith(ROOT)
    assert "1 bytes of data after the end" in refusal(tmp_path, even + b"\0")
    assert "after the end" in refusal(tmp_path, odd + b"\x01")
    assert "after the end" in refusal(tmp_path, odd + b"\0\0")


def test_deflated_dataset_with_the_gzip_trailer_is_accepted(tmp_path: Path) -> None:
    """pydicom's image_dfl.dcm: the stream is followed by the gzip member trailer (CRC-32 and
    length of the inflated dataset); it is accepted when it matches, padded as above."""
    sample = Path(get_testdata_file("image_dfl.dcm"))  # type: ignore[arg-type]
    assert header_of(tmp_path, sample.read_bytes()).Modality == "OT"
    for odd in (True, False):
        data, _ = deflated_of_parity(odd)
        trailer = gzip_trailer(data)
        assert header_of(tmp_path, data + trailer).SOPInstanceUID.startswith(ROOT)
        padded = data + trailer + b"\0"
        if odd:
            assert header_of(tmp_path, padded).SOPInstanceUID.startswith(ROOT)
        else:
            assert "after the end" in refusal(tmp_path, padded)
        wrong_crc = bytes([trailer[0] ^ 1]) + trailer[1:]
        assert "8 bytes of data after the end" in refusal(tmp_path, data + wrong_crc)
        wrong_length = trailer[:4] + struct.pack("<L", len(data))
        assert "after the end" in refusal(tmp_path, data + wrong_length)
        assert "after the end" in refusal(tmp_path, data + trailer + trailer)


def test_a_second_deflate_stream_is_not_padding(tmp_path: Path) -> None:
    data = hostile.deflated_file()
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    second = compressor.compress(b"\0" * 4) + compressor.flush()
    assert "after the end" in refusal(tmp_path, data + second)


@pytest.mark.parametrize(("tail", "stream_length", "ok"), [
    (b"", 11, True), (b"", 12, True),
    (b"\0", 11, True), (b"\0", 12, False), (b"\x20", 11, False), (b"\0\0", 12, False),
    (struct.pack("<LL", 0xDEADBEEF, 70000), 12, True),
    (struct.pack("<LL", 0xDEADBEEF, 70000) + b"\0", 11, True),
    (struct.pack("<LL", 0xDEADBEEF, 70000) + b"\0", 12, False),
    (struct.pack("<LL", 0xDEADBEEE, 70000), 12, False),
    (struct.pack("<LL", 0xDEADBEEF, 70001), 12, False),
    (struct.pack("<LL", 0xDEADBEEF, 70000)[:7], 12, False),
    (b"\0" + struct.pack("<LL", 0xDEADBEEF, 70000), 11, False),
])
def test_deflate_tail_rule(tail: bytes, stream_length: int, ok: bool) -> None:
    assert structure.deflate_tail_ok(tail, stream_length, 0xDEADBEEF, 70000) is ok


def test_gzip_trailer_length_is_modulo_four_gigabytes() -> None:
    trailer = struct.pack("<LL", 7, 5)
    assert structure.deflate_tail_ok(trailer, 12, 7, (1 << 32) + 5)


def test_deflate_bomb(tmp_path: Path) -> None:
    data = hostile.deflate_bomb(8 << 20)
    meta = structure.read_meta(bytes_reader(data))
    with pytest.raises(StructureError, match="inflates to more than"):
        structure.check_deflated(bytes_reader(data), meta.dataset_start, len(data),
                                 limit=4 << 20)
    structure.check_deflated(bytes_reader(data), meta.dataset_start, len(data), limit=8 << 20)


def test_value_that_cannot_be_decoded(tmp_path: Path) -> None:
    # A UID sent as UL (26 bytes are not a multiple of 4): pydicom raises only when the value is
    # first read, which would be in the middle of indexing.
    data = hostile.set_vr(hostile.instance_file(), 0x00080016, b"UL")
    assert "(0008,0016) cannot be decoded" in refusal(tmp_path, data)


def test_not_a_part10_file(tmp_path: Path) -> None:
    assert "DICM" in refusal(tmp_path, b"\0" * 200)


# --- the walker on hand-made byte strings -------------------------------------------------

def walk_bytes(data: bytes, encoding: Encoding = EXPLICIT, **limits: int) -> None:
    walk(bytes_reader(data), 0, len(data), encoding, **limits)


def test_walk_accepts_empty_and_exact_data() -> None:
    walk_bytes(b"")
    walk_bytes(element(0x00100010, b"PN", b"DOE^JANE") + element(0x7FE00010, b"OW", b"\0" * 4))
    # Implicit VR: tag + 4-byte length, and an undefined-length private sequence.
    implicit_item = struct.pack("<HHL", 0x0008, 0x1155, 2) + b"1\0"
    walk_bytes(struct.pack("<HHL", 0x0029, 0x1010, UNDEFINED) + item(implicit_item)
               + item(implicit_item, length=UNDEFINED) + ITEM_END + SEQ_END, IMPLICIT)


def test_walk_tolerates_implicit_items_inside_explicit_sequences() -> None:
    # Some writers do this and pydicom reads it, so it is not refused.
    implicit_item = struct.pack("<HHL", 0x0008, 0x1155, 2) + b"1\0"
    walk_bytes(element(0x00081140, b"SQ", b"", length=UNDEFINED)
               + item(implicit_item, length=UNDEFINED) + ITEM_END + SEQ_END)


@pytest.mark.parametrize(("data", "reason"), [
    (element(0x00100010, b"PN", b"DOE") + b"\0", "truncated element header"),
    (element(0x00100010, b"\0\0", b"DOE"), "no valid VR"),
    (element(0x00100010, b"ZZ", b"DOE"), "no valid VR"),
    (element(0x00104000, b"UT", b"", length=UNDEFINED) + SEQ_END, "undefined length"),
    (element(0x7FE00010, b"OB", b"", length=UNDEFINED) + item(length=UNDEFINED) + SEQ_END,
     "fragment of undefined length"),
    (element(0x7FE00010, b"OB", b"", length=UNDEFINED) + element(0x00100010, b"PN", b"X"),
     "expected an item"),
    (element(0x7FE00010, b"OB", b"", length=UNDEFINED) + item(b"\0" * 4), "truncated"),
    (element(0x00081140, b"SQ", b"", length=UNDEFINED) + item(length=UNDEFINED)
     + element(0x00081155, b"UI", b"1\0"), "truncated"),
    (element(0x00081140, b"SQ", b"", length=UNDEFINED) + item(length=UNDEFINED) + SEQ_END,
     "unexpected delimiter"),
    (ITEM_END, "unexpected delimiter"),
    (item(b"abcd"), "unexpected delimiter"),
])
def test_walk_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(StructureError, match=reason):
        walk_bytes(data)


def test_walk_refuses_a_start_beyond_the_end() -> None:
    with pytest.raises(StructureError, match="past the end of the file"):
        walk(bytes_reader(b""), 10, 0, EXPLICIT)


def test_deep_nesting_is_bounded() -> None:
    depth = 1000  # would overflow the stack of a naive recursive walk
    opening = element(0x00081140, b"SQ", b"", length=UNDEFINED) + item(length=UNDEFINED)
    data = opening * depth + (ITEM_END + SEQ_END) * depth
    with pytest.raises(StructureError, match="nested deeper"):
        walk_bytes(data)
    walk_bytes(opening * 10 + (ITEM_END + SEQ_END) * 10)


def test_many_tiny_elements_are_bounded() -> None:
    data = element(0x00091010, b"OB", b"") * 2000
    walk_bytes(data)
    with pytest.raises(StructureError, match="too many elements"):
        walk_bytes(data, max_steps=1000)


def test_big_endian_walk() -> None:
    big = struct.pack(">HH", 0x0010, 0x0010) + b"PN" + struct.pack(">H", 4) + b"DOE "
    walk_bytes(big, Encoding(implicit_vr=False, little_endian=False))
    with pytest.raises(StructureError):
        walk_bytes(big[:-1], Encoding(implicit_vr=False, little_endian=False))
