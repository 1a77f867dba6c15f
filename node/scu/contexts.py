"""Presentation contexts the node proposes when it sends stored instances, and which accepted
context an instance goes on."""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.presentation import PresentationContext

UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))

# An accepted context: (context ID, SOP class, transfer syntax).
Accepted = tuple[int, str, str]


def sub_operation_contexts(pairs: list[tuple[str, str]], extra: list[str]
                           ) -> list[PresentationContext]:
    """One context per (SOP class, stored syntax), that syntax alone, so that the destination
    cannot pick another for it and every instance can go as stored; then one uncompressed
    context per SOP class, for what must be decoded (at most 128, pynetdicom's limit)."""
    contexts: list[PresentationContext] = []
    seen: set[tuple[str, str]] = set()
    classes: list[str] = []
    for sop_class, syntax in pairs:
        if sop_class not in classes:
            classes.append(sop_class)
        if (sop_class, syntax) not in seen:
            seen.add((sop_class, syntax))
            contexts.append(build_context(sop_class, [syntax]))
    for sop_class in classes:
        contexts.append(build_context(sop_class, [*UNCOMPRESSED, *(
            ts for ts in extra if ts not in UNCOMPRESSED)]))
    return contexts[:128]


def as_stored(accepted: Iterable[Accepted], sop_class: str, syntax: str) -> int | None:
    """The accepted context an instance stored in `syntax` can be sent on as it is."""
    return by_syntax(accepted).get((sop_class, syntax))


def by_syntax(accepted: Iterable[Accepted]) -> dict[tuple[str, str], int]:
    """(SOP class, transfer syntax) -> the first accepted context of that pair."""
    found: dict[tuple[str, str], int] = {}
    for context_id, abstract, transfer in accepted:
        found.setdefault((abstract, transfer), context_id)
    return found


def decodable(accepted: Iterable[Accepted], sop_class: str) -> bool:
    """An accepted context of the class takes uncompressed data: a decoded (and, if need be,
    decompressed) instance can go on it."""
    return any(abstract == sop_class and not UID(transfer).is_compressed
               for _, abstract, transfer in accepted)
