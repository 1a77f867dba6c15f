"""Presentation contexts the node proposes when it sends stored instances."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))


def sub_operation_contexts(pairs: list[tuple[str, str]], extra: list[str]
                           ) -> list[PresentationContext]:
    """One context per (SOP class, stored syntax) so compressed data goes as stored, plus one
    uncompressed context per SOP class (at most 128, pynetdicom's limit)."""
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, str]] = set()
    classes: list[str] = []
    for sop_class, syntax in pairs:
        if sop_class not in classes:
            classes.append(sop_class)
        if syntax not in UNCOMPRESSED and (sop_class, syntax) not in seen:
            seen.add((sop_class, syntax))
            contexts.append(build_context(sop_class, [syntax]))
    for sop_class in classes:
        contexts.append(build_context(sop_class, [*UNCOMPRESSED, *(
            ts for ts in extra if ts not in UNCOMPRESSED)]))
    return contexts[:128]
