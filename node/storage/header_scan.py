"""A received file's index values read from its bytes, without pydicom, where that is exact.

pydicom's header read, its framing checks (structure.py) and the value decoding cost about
0.7 ms of a small image's CPU. Most files need none of pydicom's machinery: the index elements
are plain ASCII text in Little Endian, so one walk over the element headers (the framing check
structure.py does anyway) can note where they are and read them as they stand. `scan_header`
does that, and declines (returns None, so the caller reads the header with pydicom) whenever
pydicom might read a value differently: another encoding (Big Endian, deflated), a VR other
than the dictionary's, a character set not compatible with ASCII, a value that is not
printable ASCII or holds several values, an IS that is not an integer, an element present
twice. The tests compare its result with pydicom's on generated headers.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from node.storage.files import ReceivedFile
from node.storage.structure import (
    DEFLATED,
    EXPLICIT_BIG,
    Encoding,
    check_first_element,
    file_reader,
    read_meta,
    walk,
)

# Character sets that decode printable ASCII as ASCII (not ISO_IR 13, whose 0x5C is a yen
# sign, nor multi-valued ones with code extensions).
ASCII_CHARSETS = frozenset({
    "", "ISO_IR 6", "ISO 2022 IR 6", "ISO_IR 100", "ISO 2022 IR 100", "ISO_IR 101",
    "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127", "ISO_IR 138", "ISO_IR 144",
    "ISO_IR 148", "ISO_IR 166", "ISO_IR 203", "ISO_IR 192", "GB18030", "GBK",
})
# Printable ASCII without the backslash that separates values.
_PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\Z")
_INTEGER = re.compile(rb" *[+-]?[0-9]+ *\Z")

# Tag -> (keyword, VR): the elements wanted, with the VR pydicom decodes them as.
Wanted = Mapping[int, tuple[str, bytes]]


def scan_header(path: Path | ReceivedFile, wanted: Wanted
                ) -> tuple[str, dict[str, str]] | None:
    """(transfer syntax, keyword -> text of each wanted top-level element present), or None
    when pydicom must read the header. Raises `StructureError` for a file that is not framed
    consistently, as `structure.read_header` does."""
    with _opened(path) as (fd, size):
        read = file_reader(fd, size)
        meta = read_meta(read)
        if meta.transfer_syntax in ("", DEFLATED, EXPLICIT_BIG):
            return None
        check_first_element(read, meta, size)
        found: dict[int, tuple[bytes, int, int]] = {}
        twice: list[int] = []

        def note(tag: int, vr: bytes, offset: int, length: int) -> None:
            if tag in wanted:
                if tag in found:
                    twice.append(tag)
                found[tag] = (vr, offset, length)

        walk(read, meta.dataset_start, size, Encoding.of(meta.transfer_syntax), on_element=note)
        if twice:
            return None
        texts: dict[str, str] = {}
        for tag, (vr, offset, length) in found.items():
            keyword, expected = wanted[tag]
            if vr and vr != expected:
                return None
            text = plain_text(read(offset, length), expected)
            if text is None:
                return None
            texts[keyword] = text
    if texts.get("SpecificCharacterSet", "").strip() not in ASCII_CHARSETS:
        return None
    return meta.transfer_syntax, texts


@contextlib.contextmanager
def _opened(file: Path | ReceivedFile) -> Iterator[tuple[int, int]]:
    """(descriptor, size) of the file to read."""
    if isinstance(file, ReceivedFile):
        yield file.fd, file.size
        return
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd, os.fstat(fd).st_size
    finally:
        os.close(fd)


def plain_text(raw: bytes, vr: bytes) -> str | None:
    """A single printable-ASCII value as text (None: not one), as pydicom would give it up to
    leading and trailing spaces."""
    if vr == b"UI":
        raw = raw.rstrip(b"\0")
    if not _PLAIN.match(raw):
        return None
    if vr == b"IS" and raw.strip() and not _INTEGER.match(raw):
        return None
    return raw.decode("ascii")
