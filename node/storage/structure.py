"""Is a received file framed consistently? Cheap structural checks for the C-STORE path.

pydicom reads the header with `stop_before_pixels` and `specific_tags`: it seeks over every
value it does not want, so an element whose length runs past the end of the file, a truncated
Pixel Data element or trailing garbage is accepted silently and the broken file would be stored
and indexed. These checks close that gap without reading any value:

- the dataset must be encoded as its file meta says (pynetdicom writes the meta from the
  negotiated context, so a mismatch means the sender lied about the transfer syntax);
- no element pydicom read may claim more bytes than the file holds, and pydicom must not have
  stopped beyond the end of the file (it seeks over an absurd length without complaint);
- from where pydicom stopped (the Pixel Data tag, or the end of the file) to the end, element
  headers are followed - encapsulated fragments and undefined-length sequences item by item -
  and the walk must end exactly at the end of the file;
- a deflated dataset must be one complete deflate stream that does not inflate beyond
  `MAX_INFLATED` (pydicom inflates it whole in memory), followed by nothing but padding
  (`deflate_tail_ok`).

Everything except `read_header` is pure: it works on a `Reader` (offset, count -> bytes), so the
tests feed it bytes. Refusals are `StructureError`, a `ValueError`, so `Ingest._read` answers
them 0xC000 like any other dataset that cannot be parsed.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

# (offset, count) -> at most `count` bytes from `offset`; fewer only at the end of the data.
Reader = Callable[[int, int], bytes]

DEFLATED = "1.2.840.10008.1.2.1.99"  # the one syntax pydicom inflates before reading
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"

# Nesting of undefined-length items; real data nests a few levels, a hostile file could nest
# until the stack overflows.
MAX_DEPTH = 32
# Element and item headers followed per file. A multi-frame object has a few thousand
# fragments; this bounds the CPU a file of millions of empty elements could cost (~1 s).
MAX_STEPS = 1_000_000
# pydicom inflates a deflated dataset whole in memory: a deflate bomb must be refused first.
MAX_INFLATED = 256 << 20

UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Element headers by byte order: (group, element, length) implicit, (group, element, VR,
# 16-bit length) explicit; a long VR's 32-bit length follows at offset 8.
_IMPLICIT_HEADER = {order: struct.Struct(order + "HHL") for order in "<>"}
_EXPLICIT_HEADER = {order: struct.Struct(order + "HH2sH") for order in "<>"}
_LENGTH = {order: struct.Struct(order + "L") for order in "<>"}
# Explicit VRs whose length field is 4 bytes (after 2 reserved bytes), PS3.5 7.1.2.
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
                        b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                        b"US"})
# Explicit VRs that may have an undefined length: sequences, UN holding a sequence (PS3.5
# 6.2.2) and encapsulated pixel data.
_UNDEFINED_OK = frozenset({b"SQ", b"UN", b"OB", b"OW"})
_META_START = 132  # 128-byte preamble + "DICM"
_HEAD = 4096  # one read covers the file meta and, for small files, the whole header


class StructureError(ValueError):
    """The file is not framed consistently; the message says where."""


@dataclass(frozen=True)
class Encoding:
    implicit_vr: bool
    little_endian: bool

    @staticmethod
    def of(transfer_syntax: str) -> Encoding:
        """How the dataset is encoded, as pydicom decides it (every other syntax, compressed
        ones included, is Explicit VR Little Endian)."""
        return Encoding(implicit_vr=transfer_syntax == IMPLICIT_LITTLE,
                        little_endian=transfer_syntax != EXPLICIT_BIG)

    def describe(self) -> str:
        return (f"{'implicit' if self.implicit_vr else 'explicit'} VR "
                f"{'little' if self.little_endian else 'big'} endian")


@dataclass(frozen=True)
class Meta:
    dataset_start: int
    transfer_syntax: str


def bytes_reader(data: bytes) -> Reader:
    return lambda offset, count: data[offset:offset + count]


def read_meta(read: Reader) -> Meta:
    """Where the dataset starts and its transfer syntax, from a Part-10 file meta group.

    pynetdicom always writes a preamble and the meta (Explicit VR Little Endian), so anything
    else is refused rather than guessed at.
    """
    if read(128, 4) != b"DICM":
        raise StructureError("no DICM prefix")
    pos = _META_START
    transfer_syntax = ""
    while True:
        header = read(pos, 12)
        if len(header) < 8 or struct.unpack_from("<H", header)[0] != 0x0002:
            return Meta(pos, transfer_syntax)
        tag = struct.unpack_from("<HH", header)
        vr = header[4:6]
        if vr in LONG_VRS:
            if len(header) < 12:
                raise StructureError("truncated file meta")
            length, start = struct.unpack_from("<L", header, 8)[0], pos + 12
        elif vr in _SHORT_VRS:
            length, start = struct.unpack_from("<H", header, 6)[0], pos + 8
        else:
            raise StructureError(f"file meta element ({tag[0]:04X},{tag[1]:04X}) has no VR")
        if tag == (0x0002, 0x0010):
            transfer_syntax = read(start, length).rstrip(b"\0 ").decode("ascii", "replace")
        pos = start + length


def check_first_element(read: Reader, meta: Meta, size: int) -> None:
    """Refuse a dataset not encoded as its file meta says (implicit against explicit VR).

    The meta comes from the negotiated presentation context, so the sender encoded the dataset
    in another syntax than it agreed to. pydicom would notice, warn and read it anyway, and the
    file would be stored under a transfer syntax that lies: every later reader of the file, and
    every node it is forwarded to, would misparse it. The test is pydicom's own: two upper-case
    letters after the first tag are an explicit VR.
    """
    if meta.transfer_syntax == DEFLATED or meta.dataset_start >= size:
        return
    first = read(meta.dataset_start, 6)
    if len(first) < 6:
        return  # too short to be an element; the walk or pydicom refuses it
    looks_explicit = 0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B
    declared = Encoding.of(meta.transfer_syntax)
    if looks_explicit == declared.implicit_vr:
        found = "explicit" if looks_explicit else "implicit"
        raise StructureError(
            f"{found} VR dataset, but {UID(meta.transfer_syntax).name} was negotiated "
            f"({declared.describe()})")


def check_read_elements(elements: Sequence[object], stop: int, size: int) -> None:
    """What pydicom read must lie within the file (it seeks and reads past the end silently)."""
    if stop > size:
        raise StructureError(f"an element runs past the end of the file (the header ends at "
                             f"offset {stop} of {size})")
    for elem in elements:
        if (isinstance(elem, RawDataElement) and elem.length != UNDEFINED
                and elem.value_tell + elem.length > size):
            raise StructureError(
                f"element {_name(elem.tag)} runs past the end of the file ({elem.length} bytes "
                f"at offset {elem.value_tell}, file {size} bytes)")


# Called for each top-level element of defined length: (tag, explicit VR or b"", value
# offset, value length).
OnElement = Callable[[int, bytes, int, int], None]


def walk(read: Reader, start: int, size: int, encoding: Encoding, *,
         max_depth: int = MAX_DEPTH, max_steps: int = MAX_STEPS,
         on_element: OnElement | None = None) -> None:
    """Follow element headers from `start`; they must end exactly at `size`.

    Values are never read: defined lengths are skipped, undefined-length sequences and
    encapsulated pixel data are followed item by item (items of undefined length recursively,
    at most `max_depth` deep). `on_element` is told where each top-level value is.
    """
    if start > size:
        raise StructureError(f"an element runs past the end of the file (offset {start} of "
                             f"{size})")
    _Walk(read, size, encoding.little_endian, max_depth, max_steps, on_element).dataset(
        start, size, encoding.implicit_vr, depth=0, top=True)


class _Walk:
    def __init__(self, read: Reader, size: int, little_endian: bool, max_depth: int,
                 max_steps: int, on_element: OnElement | None = None) -> None:
        self.read = read
        self.size = size
        self.order = "<" if little_endian else ">"
        self.max_depth = max_depth
        self.steps_left = max_steps
        self.on_element = on_element

    def _header(self, pos: int, count: int) -> bytes:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise StructureError("too many elements to check")
        data = self.read(pos, count)
        if len(data) < count:
            raise StructureError(f"truncated element header at offset {pos}")
        return data

    def dataset(self, pos: int, end: int, implicit: bool, depth: int, top: bool = False,
                order: str | None = None) -> int:
        """Walk elements from `pos` up to `end` (a defined-length item or the file's end) or,
        for an undefined-length item (`end` is the file's end, `top` False), up to its Item
        Delimitation Item. Returns the offset after the dataset."""
        order = order or self.order
        if not top and not implicit:
            implicit = self._switches_to_implicit(pos, end, order)
        # Every received image is walked: one precompiled unpack per element header.
        unpack = (_IMPLICIT_HEADER if implicit else _EXPLICIT_HEADER)[order].unpack
        long_length = _LENGTH[order].unpack_from
        on_element = self.on_element if top else None
        while pos < end:
            head = self._header(pos, 8)
            if implicit:
                group, element, length = unpack(head)
                vr, value = b"", pos + 8
            else:
                group, element, vr, length = unpack(head)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_END and not top:
                    return pos + 8
                raise StructureError(f"unexpected delimiter ({group:04X},{element:04X}) at "
                                     f"offset {pos}")
            if not implicit:
                if vr in LONG_VRS:
                    length = long_length(self._header(pos, 12), 8)[0]
                    value = pos + 12
                elif vr in _SHORT_VRS:
                    value = pos + 8
                else:
                    raise StructureError(f"element {_name(tag)} at offset {pos} has no valid VR "
                                         f"({vr!r})")
            if length == UNDEFINED:
                if not implicit and vr not in _UNDEFINED_OK:
                    raise StructureError(f"element {_name(tag)} ({vr.decode()}) at offset {pos} "
                                         "has an undefined length")
                fragments = tag in _PIXEL_TAGS or vr in (b"OB", b"OW")
                # UN of undefined length holds a sequence in Implicit VR Little Endian.
                un = vr == b"UN"
                pos = self._items(value, tag, fragments, implicit or un, "<" if un else order,
                                  depth)
                continue
            if on_element is not None:
                on_element(tag, vr, value, length)
            pos = value + length
            if pos > end:
                raise StructureError(
                    f"element {_name(tag)} runs past the end of "
                    f"{'the file' if end == self.size else 'its item'} ({length} bytes at "
                    f"offset {value}, end {end})")
        if pos != end or not top:
            # A nested undefined-length item ran into the end of the file without delimiter.
            raise StructureError(f"dataset truncated at offset {min(pos, end)}")
        return pos

    def _items(self, pos: int, owner: int, fragments: bool, implicit: bool, order: str,
               depth: int) -> int:
        """Items of an undefined-length value up to its Sequence Delimitation Item."""
        if depth >= self.max_depth:
            raise StructureError(f"sequences nested deeper than {self.max_depth} levels")
        while True:
            head = self._header(pos, 8)
            tag = _tag(head, order)
            length = struct.unpack_from(order + "L", head, 4)[0]
            if tag == _SEQUENCE_END:
                return pos + 8
            if tag != _ITEM:
                raise StructureError(f"expected an item of {_name(owner)} at offset {pos}, "
                                     f"found {_name(tag)}")
            if length == UNDEFINED:
                if fragments:
                    raise StructureError(f"pixel data fragment of undefined length at offset "
                                         f"{pos}")
                pos = self.dataset(pos + 8, self.size, implicit, depth + 1, order=order)
                continue
            pos += 8 + length
            if pos > self.size:
                raise StructureError(f"item of {_name(owner)} runs past the end of the file "
                                     f"({length} bytes at offset {pos - length})")

    def _switches_to_implicit(self, pos: int, end: int, order: str) -> bool:
        # Some writers encode sequence items in implicit VR inside explicit datasets; pydicom
        # reads them, so the walk does too (same test: no upper-case VR after the first tag).
        if pos + 6 > end:
            return False
        first = self.read(pos, 6)
        if len(first) < 6 or _tag(first, order) >> 16 == 0xFFFE:
            return False
        return not (0x40 < first[4] < 0x5B and 0x40 < first[5] < 0x5B)


def _tag(head: bytes, order: str) -> int:
    group, element = struct.unpack_from(order + "HH", head)
    return group << 16 | element


def _name(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def check_deflated(read: Reader, start: int, size: int, *, limit: int = MAX_INFLATED,
                   chunk: int = 1 << 20) -> None:
    """The deflated dataset must be one complete deflate stream inflating to at most `limit`
    bytes, followed by nothing but what `deflate_tail_ok` allows. Inflates in bounded pieces
    and keeps nothing."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    crc = 0
    pos = start

    def take(piece: bytes) -> None:
        nonlocal inflated, crc
        inflated += len(piece)
        if inflated > limit:
            raise StructureError(f"deflated dataset inflates to more than {limit} bytes")
        crc = zlib.crc32(piece, crc)

    try:
        while pos < size and not inflater.eof:
            data = read(pos, min(chunk, size - pos))
            if not data:
                break
            pos += len(data)
            while data and not inflater.eof:
                take(inflater.decompress(data, chunk))
                data = inflater.unconsumed_tail
        while not inflater.eof:  # output zlib may still hold once the input is consumed
            piece = inflater.decompress(b"", chunk)
            if not piece:
                break
            take(piece)
    except zlib.error as exc:
        raise StructureError(f"deflated dataset is corrupt: {exc}") from exc
    if not inflater.eof:
        raise StructureError("deflated dataset is truncated")
    stream_end = pos - len(inflater.unused_data)
    tail_length = size - stream_end
    tail = read(stream_end, tail_length) if tail_length <= _MAX_DEFLATE_TAIL else None
    if tail is None or not deflate_tail_ok(tail, stream_end - start, crc, inflated):
        raise StructureError(f"{tail_length} bytes of data after the end of the deflated "
                             "dataset")


# The longest tail `deflate_tail_ok` can allow: the gzip trailer and a pad byte.
_MAX_DEFLATE_TAIL = 9


def deflate_tail_ok(tail: bytes, stream_length: int, crc: int, inflated: int) -> bool:
    """May `tail` follow a deflate stream of `stream_length` bytes that inflated to `inflated`
    bytes of CRC-32 `crc`? Only what real writers leave there:

    - one 00 byte when the data before it has odd length: a dataset goes over the network in
      PDVs of even length, and DCMTK's storescu pads an odd-length stream so (DCMTK's reader
      ignores that byte, PS3.5 A.5 leaves padding to the encoder);
    - the 8-byte gzip member trailer (RFC 1952: CRC-32 and length of the inflated data, little
      endian), from a writer that made a gzip member and dropped only its header, as in
      pydicom's image_dfl.dcm; it must match the data, so it is not arbitrary bytes; and the
      pad byte after it on the same condition.

    Anything else (a second stream, garbage, a trailer that does not match) is refused.
    """
    gzip_trailer = struct.pack("<LL", crc, inflated & 0xFFFFFFFF)
    body = gzip_trailer if tail.startswith(gzip_trailer) else b""
    rest = tail[len(body):]
    return rest == b"" or (rest == b"\0" and (stream_length + len(body)) % 2 == 1)


def file_reader(fd: int, size: int) -> Reader:
    """A Reader of an open file of `size` bytes.

    Element headers are tiny reads: they are served from the first block when possible, else
    by one pread each (never through a buffered file). A count is never more than the file
    holds: pread allocates what it is asked for."""
    head = os.pread(fd, _HEAD, 0)

    def read(offset: int, count: int) -> bytes:
        if offset + count <= len(head):
            return head[offset:offset + count]
        count = min(count, size - offset)
        return os.pread(fd, count, offset) if count > 0 else b""

    return read


def read_header(path: Path, specific_tags: list[BaseTag] | None = None
                ) -> FileDataset:
    """pydicom's header (values before Pixel Data, only `specific_tags` if given), after
    checking that the whole file is framed consistently. Raises `StructureError`."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        read = file_reader(f.fileno(), size)
        meta = read_meta(read)
        if not meta.transfer_syntax:
            # Nothing to check against; Ingest refuses a file without a transfer syntax.
            return dcmread(f, stop_before_pixels=True, specific_tags=specific_tags)
        deflated = meta.transfer_syntax == DEFLATED
        if deflated:
            check_deflated(read, meta.dataset_start, size)
        else:
            check_first_element(read, meta, size)
        try:
            ds = dcmread(f, stop_before_pixels=True, specific_tags=specific_tags)
        except (ValueError, MemoryError):
            raise  # pydicom's own parse errors are ValueErrors already
        except OSError as exc:
            if exc.errno is not None:
                raise  # a real I/O error, not a parse error
            # pydicom raises a bare OSError for a sequence item it cannot read.
            raise StructureError(str(exc)) from exc
        except Exception as exc:
            # struct.error for a header cut short, RecursionError for absurd nesting, ...:
            # whatever else pydicom raises on these bytes means they cannot be parsed.
            raise StructureError(f"{type(exc).__name__}: {exc}") from exc
        if not deflated:  # else positions refer to the inflated copy: nothing to walk
            stop = f.tell()
            check_read_elements(list(ds.elements()), stop, size)
            walk(read, stop, size, Encoding.of(meta.transfer_syntax))
    decode_values(ds)
    return ds


def decode_values(ds: Dataset) -> None:
    """Decode every top-level value read, so one that cannot be decoded (a UID sent as UL,
    an odd-length US, ...) is refused here rather than raising later in whoever reads it.
    pydicom decodes lazily, on first access; the decoded values are kept, so this costs
    nothing extra when the caller reads them all anyway (indexing does)."""
    for tag in list(ds.keys()):
        try:
            ds[tag]
        except Exception as exc:
            raise StructureError(f"element {_name(tag)} cannot be decoded: {exc}") from exc
