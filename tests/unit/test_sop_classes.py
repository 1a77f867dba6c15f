"""Which SOP classes the node takes as storage (node/sop_classes.py)."""

from __future__ import annotations

import pytest
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.service_class import (
    NonPatientObjectStorageServiceClass,
    ServiceClass,
    StorageServiceClass,
)
from pynetdicom.sop_class import uid_to_service_class

from node.sop_classes import (
    STORAGE_SOP_CLASSES,
    has_no_study,
    is_stored,
    unknown_storage_classes,
)

RETIRED_US = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired): color-pl.dcm
COLOR_PALETTE = "1.2.840.10008.5.1.4.39.1"
PRIVATE = "1.2.840.113619.4.26"  # a vendor's private storage class: no library knows it


@pytest.mark.parametrize("uid", [
    RETIRED_US,
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image Storage (Retired)
    "1.2.840.10008.5.1.4.1.1.88.1",  # Text SR Storage - Trial (Retired)
    "1.2.840.10008.5.1.4.1.1.77.1",  # VL Image Storage - Trial (Retired)
    "1.2.840.10008.5.1.1.29",  # Hardcopy Grayscale Image Storage (Retired, a storage class)
    COLOR_PALETTE,
    "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage
    "1.2.840.10008.5.1.4.1.1.501.1",  # DICOS CT Image Storage
])
def test_storage_classes_pynetdicom_does_not_list_are_taken(uid: str) -> None:
    assert uid in STORAGE_SOP_CLASSES
    assert is_stored(uid)


def test_every_class_pynetdicom_lists_is_taken_once() -> None:
    listed = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    assert STORAGE_SOP_CLASSES[:len(listed)] == tuple(listed)
    assert len(set(STORAGE_SOP_CLASSES)) == len(STORAGE_SOP_CLASSES)
    assert len(STORAGE_SOP_CLASSES) >= len(listed) + 35  # pydicom's retired and others


def test_no_class_of_another_service_is_taken_as_storage() -> None:
    services = {uid_to_service_class(uid) for uid in STORAGE_SOP_CLASSES}
    assert services <= {StorageServiceClass, NonPatientObjectStorageServiceClass, ServiceClass}
    for uid in STORAGE_SOP_CLASSES:
        name = UID(uid).name  # the UID itself for the few classes newer than pydicom's table
        assert ("Storage" in name and "Commitment" not in name) or name == uid, name


@pytest.mark.parametrize("uid", [
    "1.2.840.10008.1.3.10",  # Media Storage Directory Storage: the DICOMDIR, media only
    "1.2.840.10008.1.20.1",  # Storage Commitment Push Model
    "1.2.840.10008.5.1.4.31",  # Modality Worklist FIND
    "1.2.840.10008.5.1.4.1.2.2.1",  # Study Root FIND
    "1.2.840.10008.5.1.1.1",  # Basic Film Session (print)
    "1.2.840.10008.1.1",  # Verification
    ExplicitVRLittleEndian,  # a transfer syntax
])
def test_known_classes_of_other_services_are_not_stored(uid: str) -> None:
    assert uid not in STORAGE_SOP_CLASSES
    assert not is_stored(uid)
    assert unknown_storage_classes([uid], set()) == []


def test_unknown_classes_are_those_no_library_knows_once_each_in_order() -> None:
    proposed = ["1.2.3.4.5", CTImageStorage, PRIVATE, "1.2.840.10008.5.1.4.31", "1.2.3.4.5",
                "../x", "1.2.3.4.5 ", "", RETIRED_US, "9.8.7"]
    supported = {CTImageStorage, RETIRED_US}
    assert unknown_storage_classes(proposed, supported) == ["1.2.3.4.5", PRIVATE, "9.8.7"]
    assert is_stored(PRIVATE)


def test_non_patient_objects_have_no_study() -> None:
    assert has_no_study(COLOR_PALETTE)
    assert has_no_study("1.2.840.10008.5.1.4.38.1")  # Hanging Protocol
    assert not has_no_study(CTImageStorage)
    assert not has_no_study(RETIRED_US)
    assert not has_no_study(PRIVATE)
