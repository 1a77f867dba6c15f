"""What `pacsnode import` is given: files, folders and DICOMDIR media, as files to ingest.

Folders are walked recursively; a DICOMDIR given as an argument is read and the files its
directory records reference are taken, their file IDs resolved relative to the DICOMDIR's
folder. Media are often written in upper case and mounted in lower case (or keep ISO 9660's
";1" version suffix), so a component of a file ID that is not there as written is looked up
case-insensitively, as DCMTK and dcm4che do for media.

`sniff` tells, from a file's first bytes and its file meta information, what a file is: a
Part 10 file, a bare data set (no preamble and no file meta, as DCMTK writes with
`-F`/`+Fd`, accepted like DCMTK's storescu does), a DICOMDIR, or not DICOM at all.
"""

from __future__ import annotations

import enum
import os
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_PREFIX = b"DICM"
_HEAD = 65536  # read at once: the preamble, the file meta information and then some
# A bare data set starts with its lowest tag: group 0008 (SOP Class UID is (0008,0016)), or a
# private group below it. Anything else is not taken for DICOM.
_FIRST_GROUPS = range(0x0002, 0x0009)


class Kind(enum.StrEnum):
    PART10 = "part10"  # preamble, "DICM", file meta information, data set
    DATASET = "dataset"  # a data set alone: file meta information is made for it
    DICOMDIR = "dicomdir"  # a media directory, not an instance
    BROKEN = "broken"  # claims to be DICOM but cannot be read: refused
    NOT_DICOM = "not-dicom"


@dataclass(frozen=True)
class Sniffed:
    kind: Kind
    sop_class: str = ""  # what a sender puts in its C-STORE request: the data set's UIDs
    sop_instance: str = ""
    transfer_syntax: str = ""
    reason: str = ""  # BROKEN, NOT_DICOM: why; PART10: why its file meta is made anew
    # None: the file is stored as it is. Else the data set starts here, and is stored after
    # file meta information made for it, as a received data set is (a bare data set, or a
    # Part 10 file whose file meta names another instance than its data set).
    dataset_offset: int | None = None


def sniff(path: Path) -> Sniffed:
    """What the file at `path` is (OSError when it cannot be read at all)."""
    if not stat.S_ISREG(path.stat().st_mode):
        # A FIFO or a device would block or never end.
        return Sniffed(Kind.NOT_DICOM, reason="not a regular file")
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    # pydicom warns about what it tolerates; what matters is said by the import's result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(head) >= 132 and head[128:132] == _PREFIX:
            return _part10(path, head)
        if len(head) >= 8 and _dataset_start(head):
            return _bare_dataset(path)
    return Sniffed(Kind.NOT_DICOM, reason="not a DICOM file")


def _dataset_start(head: bytes) -> bool:
    little = head[0] | head[1] << 8
    big = head[0] << 8 | head[1]
    return little in _FIRST_GROUPS or big in _FIRST_GROUPS


def _part10(path: Path, head: bytes) -> Sniffed:
    try:
        meta = read_file_meta_info(path)
    except Exception as exc:  # pydicom raises many kinds on a broken header
        return Sniffed(Kind.BROKEN, reason=f"cannot parse the file meta information: {exc}")
    meta_class = str(meta.get("MediaStorageSOPClassUID", "") or "")
    if meta_class == MEDIA_STORAGE_DIRECTORY:
        return Sniffed(Kind.DICOMDIR, sop_class=meta_class)
    meta_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "")
    transfer_syntax = str(meta.get("TransferSyntaxUID", "") or "")
    if not transfer_syntax:
        return Sniffed(Kind.BROKEN, reason="the dataset has no transfer syntax")
    sop_class, sop_instance = _sop_uids(path)
    if not (sop_class and sop_instance):
        # Ingest refuses the data set for what it lacks.
        return Sniffed(Kind.PART10, sop_class or meta_class, sop_instance or meta_instance,
                       transfer_syntax)
    if (sop_class, sop_instance) == (meta_class, meta_instance):
        return Sniffed(Kind.PART10, sop_class, sop_instance, transfer_syntax)
    offset = meta_end(head)
    if offset is None:
        return Sniffed(Kind.BROKEN, reason="cannot find the end of the file meta information")
    return Sniffed(Kind.PART10, sop_class, sop_instance, transfer_syntax,
                   reason=f"its file meta information named {meta_class} {meta_instance}: "
                   "made anew from the data set, as a C-STORE of it would be",
                   dataset_offset=offset)


_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})


def meta_end(data: bytes) -> int | None:
    """Where the data set starts in a Part 10 file beginning with `data`: past the file meta
    elements (group 0002, explicit VR little endian) after the preamble and prefix; None
    when they run past `data`."""
    pos = 132
    while pos + 8 <= len(data):
        group = int.from_bytes(data[pos:pos + 2], "little")
        if group != 0x0002:
            return pos
        if data[pos + 4:pos + 6] in _LONG_VRS:
            if pos + 12 > len(data):
                return None
            pos += 12 + int.from_bytes(data[pos + 8:pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6:pos + 8], "little")
    return pos if pos == len(data) else None


def _bare_dataset(path: Path) -> Sniffed:
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception:
        return Sniffed(Kind.NOT_DICOM, reason="not a DICOM file")
    if "TransferSyntaxUID" in ds.file_meta:
        # Its data set starts wherever the meta group ends; rare enough to be refused.
        return Sniffed(Kind.BROKEN, reason="file meta information without the 128-byte "
                       "preamble and 'DICM' prefix of a DICOM file")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not (sop_class and sop_instance):
        return Sniffed(Kind.NOT_DICOM,
                       reason="not a DICOM file (no DICOM prefix, no SOP Class/Instance UID)")
    implicit, little = ds.original_encoding
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    return Sniffed(Kind.DATASET, sop_class, sop_instance, str(syntax),
                   reason="a data set without file meta information: made for it, as a "
                   "C-STORE receiver writes it", dataset_offset=0)


def _sop_uids(path: Path) -> tuple[str, str]:
    """The data set's SOP Class and Instance UIDs ('' where missing or unreadable)."""
    try:
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except Exception:
        return "", ""  # Ingest's framing checks say what is wrong with it
    return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")


@dataclass(frozen=True)
class Problem:
    """Something given that cannot be imported: a missing referenced file, an unreadable
    folder or DICOMDIR. Reported as refused."""

    path: Path
    reason: str


def collect(paths: Sequence[Path]) -> tuple[list[Path], list[Problem]]:
    """The files to import, in order and each once (a file reached twice, through a folder
    and a DICOMDIR, is imported once), and what could not be reached."""
    found: dict[str, Path] = {}
    problems: list[Problem] = []
    for given in paths:
        for path in _expand(given, problems):
            found.setdefault(os.path.realpath(path), path)
    return list(found.values()), problems


def _expand(given: Path, problems: list[Problem]) -> Iterator[Path]:
    if given.is_dir():
        yield from walk(given, problems)
        return
    try:
        is_dicomdir = sniff(given).kind is Kind.DICOMDIR
    except OSError:
        is_dicomdir = False  # the import reports why it cannot be read
    if is_dicomdir:
        yield from dicomdir_files(given, problems)
    else:
        yield given


def walk(folder: Path, problems: list[Problem]) -> Iterator[Path]:
    """Every file under `folder`, in name order; symbolic links to folders are not followed."""
    def unreadable(exc: OSError) -> None:
        problems.append(Problem(Path(exc.filename or folder),
                                f"cannot read the folder: {exc.strerror or exc}"))

    for top, folders, names in os.walk(folder, onerror=unreadable):
        folders.sort()
        for name in sorted(names):
            yield Path(top, name)


def dicomdir_files(dicomdir: Path, problems: list[Problem]) -> Iterator[Path]:
    """The files a DICOMDIR's directory records reference, resolved in its folder."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(dicomdir)
            records = list(ds.get("DirectoryRecordSequence", []))
    except Exception as exc:
        problems.append(Problem(dicomdir, f"cannot read the DICOMDIR: {exc}"))
        return
    seen: set[tuple[str, ...]] = set()
    for record in records:
        file_id = record.get("ReferencedFileID")
        if not file_id:
            continue
        components = (str(file_id),) if isinstance(file_id, str) else tuple(map(str, file_id))
        if components in seen:
            continue
        seen.add(components)
        path, why = resolve_file_id(dicomdir.parent, components)
        if path is None:
            problems.append(Problem(dicomdir.parent.joinpath(*components),
                                    f"referenced by {dicomdir}: {why}"))
        else:
            yield path


def resolve_file_id(root: Path, components: Sequence[str]) -> tuple[Path | None, str]:
    """The file a DICOMDIR file ID names under `root`, or (None, why not)."""
    path = root
    for component in components:
        if not valid_component(component):
            return None, f"invalid file ID component {component!r}"
        candidate = path / component
        if not candidate.exists():
            try:
                names = os.listdir(path)
            except OSError:
                return None, "not found"
            match = match_name(component, names)
            if match is None:
                return None, "not found"
            candidate = path / match
        path = candidate
    if not path.is_file():
        return None, "not a file"
    return path, ""


def valid_component(component: str) -> bool:
    """A file ID component that stays in its folder (PS3.10 allows A-Z, 0-9 and _ only;
    anything that could leave the media's folder is refused)."""
    return (component not in ("", ".", "..")
            and not any(c in component for c in ("/", "\\", "\0")))


def match_name(component: str, names: Iterable[str]) -> str | None:
    """The directory entry `component` names on media: the same letters in any case, with
    or without ISO 9660's version suffix (";1") and trailing dot."""
    wanted = component.casefold()
    for name in sorted(names):
        if _media_name(name).casefold() == wanted:
            return name
    return None


def _media_name(name: str) -> str:
    base, semicolon, version = name.rpartition(";")
    if semicolon and version.isdigit():
        name = base
    return name[:-1] if name.endswith(".") and len(name) > 1 else name
