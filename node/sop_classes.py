"""Which SOP classes the node stores: pure decisions over pydicom's and pynetdicom's tables.

pynetdicom's storage list (AllStoragePresentationContexts) leaves out the retired storage
classes (the old Ultrasound ones of color-pl.dcm, the trial SR classes, ...) and the
non-patient objects (Color Palette, Hanging Protocol, implant templates); a PACS must keep
what modalities of every age send, so the node takes every SOP class pydicom names a storage
class, retired ones included, and, with `dicom.accept_unknown_sop_classes`, a SOP class
neither library knows (a vendor's private storage class) when a sender proposes one. A class
that either library knows for another service (query/retrieve, worklist, print, commitment,
a transfer syntax proposed as an abstract syntax) is never taken as storage.
`supported_contexts`: the presentation contexts the node accepts (its listeners and, to
check a file against them, `pacsnode import`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Container, Iterable

from pynetdicom import AE, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import NonPatientObjectStorageServiceClass, ServiceClass
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
    uid_to_service_class,
)

from node.internals.uids import UID_dictionary
from node.storage.paths import is_valid_uid

# Named "... Storage ..." by pydicom but not storage objects sent by C-STORE: the DICOMDIR
# (media only; PS3.4 lists it in no service) and the Storage Commitment classes (their own
# service, served separately).
_NOT_STORED = re.compile(r"Storage Commitment|Media Storage Directory")
_STORAGE_WORD = re.compile(r"\bStorage\b")


def _pydicom_storage_classes() -> set[str]:
    return {uid for uid, (name, kind, *_) in UID_dictionary.items()
            if kind == "SOP Class" and _STORAGE_WORD.search(name)
            and not _NOT_STORED.search(name)}


# pynetdicom's list first (the order its supported contexts have always had), then the rest.
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(
    [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    + sorted(_pydicom_storage_classes())))
_STORAGE = frozenset(STORAGE_SOP_CLASSES)


def is_known(uid: str) -> bool:
    """pydicom names the UID (any kind: SOP class, transfer syntax, ...) or pynetdicom has a
    service for it."""
    return uid in UID_dictionary or uid_to_service_class(uid) is not ServiceClass


def is_stored(uid: str) -> bool:
    """A C-STORE of this SOP class, on a context the node accepted, is stored: a storage class
    the node lists, or one no library knows (accepted only with accept_unknown_sop_classes)."""
    return uid in _STORAGE or not is_known(uid)


def unknown_storage_classes(proposed: Iterable[str], supported: Container[str]) -> list[str]:
    """The abstract syntaxes among `proposed` to accept as storage of a SOP class the node does
    not know: not in `supported`, conformant UIDs, known to neither library. Each once, in the
    requestor's order."""
    return list(dict.fromkeys(uid for uid in proposed if uid not in supported
                              and is_valid_uid(uid) and not is_known(uid)))


def has_no_study(uid: str) -> bool:
    """A non-patient object (PS3.4 GG: Color Palette, Hanging Protocol, implant templates,
    protocols, inventories): its IOD has no Study or Series UID."""
    return uid_to_service_class(uid) is NonPatientObjectStorageServiceClass


QR_MODELS = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
)


@functools.cache
def supported_contexts(syntaxes: tuple[str, ...]) -> tuple[PresentationContext, ...]:
    """The node's presentation contexts, built once per process for a list of syntaxes.

    pynetdicom checks every transfer syntax of a context as it is added: 0.06-0.17 s for the
    216 contexts of ~40 syntaxes, paid by every node and association process start otherwise. The
    contexts are only read once built (listener.SharedContexts shares them the same way).
    """
    ae = AE()
    ae.add_supported_context(Verification, syntaxes)
    for model in QR_MODELS:
        ae.add_supported_context(model, syntaxes)
    # Both roles: requests come in as N-ACTION; reports for our own requests may come in as
    # N-EVENT-REPORT from a destination acting as SCP on its association.
    ae.add_supported_context(StorageCommitmentPushModel, syntaxes, scu_role=True, scp_role=True)
    for sop_class in STORAGE_SOP_CLASSES:
        # scp_role: a C-GET requestor proposes to be the storage SCP on its own association.
        ae.add_supported_context(sop_class, syntaxes, scu_role=False, scp_role=True)
    return tuple(ae.supported_contexts)
