"""pacsnode's own implementation class UID and version name (node/implementation.py)."""

from __future__ import annotations

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID

from node.implementation import IMPLEMENTATION_CLASS_UID, implementation_version_name, version


def test_the_implementation_is_pacsnodes_own() -> None:
    assert IMPLEMENTATION_CLASS_UID.startswith("2.25.")
    assert IMPLEMENTATION_CLASS_UID != PYNETDICOM_IMPLEMENTATION_UID
    assert implementation_version_name() == f"PACSNODE_{version().replace('.', '_')}"[:16]
    assert version() != "0+unknown"  # the package metadata was found
