"""UIDs become path parts, so only valid UIDs are ever turned into paths."""

from __future__ import annotations

import re
from pathlib import Path

# PS3.5 9.1: components of digits separated by dots, at most 64 characters. Leading zeros in a
# component are invalid by the standard but common in the field; they are harmless in a path,
# so they are accepted.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def is_valid_folder_name(value: str) -> bool:
    """A partition folder: one path component, no traversal, no hidden name."""
    return _FOLDER.fullmatch(value) is not None and value not in {".", ".."}


def instance_relpath(folder: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """`<folder>/<study>/<series>/<sop>.dcm`; raises ValueError for anything unsafe."""
    if not is_valid_folder_name(folder):
        raise ValueError(f"invalid partition folder name {folder!r}")
    for what, uid in (("study", study_uid), ("series", series_uid), ("SOP instance", sop_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"invalid {what} UID {uid!r}")
    return f"{folder}/{study_uid}/{series_uid}/{sop_uid}.dcm"


def inside(root: Path, relpath: str) -> Path:
    """The absolute path of `relpath` under `root`, refusing anything that escapes it."""
    path = (root / relpath).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{relpath!r} is outside the storage root")
    return path
