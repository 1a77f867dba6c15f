"""pydicom's table of every UID it knows, with its name and kind (its private module
`pydicom._uid_dict`; node/internals/README.md).

sop_classes.py takes every storage class from it, retired ones included, which no public
pydicom name lists.
"""

from __future__ import annotations

from pydicom._uid_dict import UID_dictionary

__all__ = ["UID_dictionary"]
