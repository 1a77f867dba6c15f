"""UIDs become path parts: a conformant UID as it is, any other stored UID through a hash.

Three kinds of UID value:

- conformant (`is_valid_uid`): digits and dots, at most 64 characters; the path part is the
  UID itself, so the archive stays readable;
- not conformant but harmless (`is_harmless_uid`): what real archives hold and Orthanc stores,
  such as hex hashes (pydicom's bad_sequence.dcm), letters, empty components; 1 to 64
  printable ASCII characters without a slash or backslash, and not `.` or `..`. Such a value
  never becomes a path part itself: its part is `x` and the SHA-256 of the value in hex
  (`path_part`), which cannot name anything but one entry of its folder, never collides with a
  conformant UID (those have no letters) and always maps the same value to the same path;
- anything else (a slash, a backslash, a control or non-ASCII character, `.`, `..`, longer
  than 64): refused, since it could name a path outside the storage, split into two values
  when answered (a backslash is DICOM's value delimiter) or forge log lines.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# PS3.5 9.1: components of digits separated by dots, at most 64 characters. Leading zeros in a
# component are invalid by the standard but common in the field; they are harmless in a path,
# so they are accepted.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
# Printable ASCII but space, slash and backslash.
_HARMLESS = re.compile(r"[!-.0-\[\]-~]{1,64}")
_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
MAX_UID_LENGTH = 64
HASHED_PREFIX = "x"


def is_valid_uid(value: object) -> bool:
    """A conformant UID (leading zeros allowed)."""
    return (isinstance(value, str) and len(value) <= MAX_UID_LENGTH
            and _UID.fullmatch(value) is not None)


def is_harmless_uid(value: object) -> bool:
    """A UID the node stores: conformant, or not but harmless (see the module's text)."""
    return (isinstance(value, str) and _HARMLESS.fullmatch(value) is not None
            and value not in {".", ".."})


def path_part(uid: str) -> str:
    """The path part of a UID the node stores: the UID itself when conformant, else `x` and
    its SHA-256 (the empty value too: the Study and Series UIDs a non-patient object has not)."""
    if is_valid_uid(uid):
        return uid
    if uid and not is_harmless_uid(uid):
        raise ValueError(f"UID {uid!r} may not be stored")
    return HASHED_PREFIX + hashlib.sha256(uid.encode("ascii")).hexdigest()


def is_valid_folder_name(value: str) -> bool:
    """A partition folder: one path component, no traversal, no hidden name."""
    return _FOLDER.fullmatch(value) is not None and value not in {".", ".."}


def instance_relpath(folder: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """`<folder>/<study>/<series>/<sop>.dcm`, each UID as its `path_part`; raises ValueError
    for anything unsafe. The Study and Series UIDs may be empty (a non-patient object, such as
    a Color Palette, has none), the SOP Instance UID may not."""
    if not is_valid_folder_name(folder):
        raise ValueError(f"invalid partition folder name {folder!r}")
    for what, uid in (("study", study_uid), ("series", series_uid), ("SOP instance", sop_uid)):
        if not (is_harmless_uid(uid) or (uid == "" and what != "SOP instance")):
            raise ValueError(f"invalid {what} UID {uid!r}")
    return f"{folder}/{path_part(study_uid)}/{path_part(series_uid)}/{path_part(sop_uid)}.dcm"


def study_relpath(folder: str, study_uid: str) -> str:
    """The folder of a study's files (see `instance_relpath`)."""
    if not is_valid_folder_name(folder):
        raise ValueError(f"invalid partition folder name {folder!r}")
    return f"{folder}/{path_part(study_uid)}"


def inside(root: Path, relpath: str) -> Path:
    """The absolute path of `relpath` under `root`, refusing anything that escapes it."""
    path = (root / relpath).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{relpath!r} is outside the storage root")
    return path
