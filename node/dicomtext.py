"""An element's value as DICOM text: what coercion, indexing and query matching compare."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag


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
