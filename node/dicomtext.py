"""An element's value as DICOM text: what coercion, indexing and query matching compare."""

from __future__ import annotations

import unicodedata

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

# A person name has up to three component groups (PS3.5 6.2.1): alphabetic, ideographic,
# phonetic; each has up to five components.
NAME_GROUPS = 3
NAME_COMPONENTS = 5


def element_text(ds: Dataset, key: str | BaseTag) -> str | None:
    """The value as text, multiple values joined by backslash; '' if empty, None if absent."""
    if key not in ds:
        return None
    value = ds[key].value
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def fold(text: str) -> str:
    """`text` as case-insensitive matching compares it: composed (NFC), every letter that has
    a one-letter upper case in it (Greek final sigma, accented and Cyrillic letters included).

    Computed here, never by the database: SQLite's upper() changes ASCII letters only and
    PostgreSQL's follows the database's locale, so the same query would match differently on
    each. A letter whose upper case is longer (German sharp s: SS) stays as it is, so a `?`
    wildcard still stands for one letter of the stored value.
    """
    composed = unicodedata.normalize("NFC", text)
    if composed.isascii():
        return composed.upper()
    return "".join(_fold_letter(ch) for ch in composed)


def _fold_letter(ch: str) -> str:
    upper = ch.upper()
    return upper if len(upper) == 1 else ch


def name_groups(value: str) -> list[list[str]]:
    """The component groups of a person name, each as its five components ('' where absent);
    a value of more than three groups or five components keeps the rest in the last one, as
    it was received."""
    groups = value.split("=", NAME_GROUPS - 1)
    return [(group.split("^", NAME_COMPONENTS - 1) + [""] * NAME_COMPONENTS)[:NAME_COMPONENTS]
            for group in groups]
