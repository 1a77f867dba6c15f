"""Who pacsnode says it is: its version, and the DICOM implementation class UID and version
name it gives in the associations it accepts and requests and in the file meta of the files
it writes."""

from __future__ import annotations

import functools
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pynetdicom import AE

# pacsnode's own, made once from a UUID (PS3.5 B.2: "2.25." and the UUID as an integer); it
# names the implementation, not a release, so it never changes.
IMPLEMENTATION_CLASS_UID = "2.25.176015933634333751361337281313842740489"


@functools.cache
def version() -> str:
    """The installed distribution's version (looked up once: it scans the installed ones)."""
    try:
        return metadata.version("pacsnode")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


@functools.cache
def implementation_version_name() -> str:
    """PACSNODE_<version> (an SH value: at most 16 characters)."""
    return f"PACSNODE_{version().replace('.', '_')}"[:16]


def identify(ae: AE, *, version_name: bool = True) -> AE:
    """`ae` with pacsnode's implementation class UID and (unless left out) version name."""
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = implementation_version_name() if version_name else None
    return ae
