"""The character set a pydicom Dataset's own Specific Character Set names (pydicom's private
`Dataset._character_set`; node/internals/README.md)."""

from __future__ import annotations

from pydicom.dataset import Dataset


def character_set(ds: Dataset) -> str | list[str]:
    """The Python encoding(s) of the Specific Character Set in `ds` as it is now (its
    `original_character_set` is that of the file it was read from, not of a dataset built)."""
    return ds._character_set
