"""`pacsnode import`: files taken in locally go through the C-STORE path.

Each file is copied into the storage's `.incoming/` folder (the original is never moved or
changed), as a received data set is written there, and handed to `Ingest.store` with the
SOP Class and Instance UIDs a sender would have put in its C-STORE request: the same framing
and UID checks, the coercion rules of the node's Self device (the node itself, for scanning:
docs/how-to/devices.md), durability, duplicate policy, integrity queue and forward jobs.
The negotiation a C-STORE passes first is checked too: a file whose SOP class or transfer
syntax the node accepts no presentation context for is refused. A file counts as stored
only when Ingest answered success.

Forward jobs are committed with each instance; a node running meanwhile (another process)
finds them at its forwarder's next poll (`forwarding.poll_seconds`).
"""

from __future__ import annotations

import enum
import itertools
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.uid import CTImageStorage
from sqlalchemy import select
from sqlalchemy.orm import Session

from node import partitions
from node.activity import Event
from node.config import Settings
from node.db.database import Database
from node.db.models import Partition
from node.importing.sources import Kind, Sniffed, sniff
from node.ingest import lookup
from node.ingest.pipeline import Ingest, Peer
from node.internals.direct_store import file_meta
from node.partitions import AdminError
from node.sop_classes import supported_contexts, unknown_storage_classes
from node.statuses import CANNOT_PARSE, INVALID_UID, SOP_CLASS_NOT_SUPPORTED
from node.storage import files
from node.storage.space import StorageGuard

ADDRESS = "import"  # where imported instances come from, in logs and the activity log

_numbers = itertools.count()


class Result(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # held already: the stored copy is kept (partition policy)
    REFUSED = "refused"
    NOT_DICOM = "not-dicom"
    SKIPPED = "skipped"  # DICOM, but not an instance: a DICOMDIR met in a folder


@dataclass(frozen=True)
class FileResult:
    path: str
    result: Result
    status: int | None = None  # the C-STORE status Ingest answered, if it got that far
    comment: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    integrity: int = 0  # integrity queue items recorded for it (differences)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["result"] = self.result.value
        return out


@dataclass
class Summary:
    partition: str
    self_device: str | None
    rules: int  # coercion rules applied to every file
    files: list[FileResult] = field(default_factory=list)
    interrupted: bool = False

    def count(self, result: Result) -> int:
        return sum(1 for f in self.files if f.result is result)

    @property
    def refused(self) -> list[FileResult]:
        return [f for f in self.files if f.result is Result.REFUSED]

    def as_dict(self) -> dict[str, Any]:
        return {"partition": self.partition, "self_device": self.self_device,
                "coercion_rules": self.rules, "interrupted": self.interrupted,
                "total": len(self.files),
                "stored": self.count(Result.STORED),
                "duplicates": self.count(Result.DUPLICATE),
                "refused": self.count(Result.REFUSED),
                "not_dicom": self.count(Result.NOT_DICOM),
                "skipped": self.count(Result.SKIPPED),
                "files": [f.as_dict() for f in self.files]}

    def activity(self, calling_ae: str) -> list[Event]:
        """One `import` row per study, as a `store` row per study of an association."""
        studies: dict[str, list[FileResult]] = defaultdict(list)
        for f in self.files:
            if f.result in (Result.STORED, Result.DUPLICATE, Result.REFUSED):
                studies[f.study_instance_uid].append(f)
        events = []
        for study, done in studies.items():
            ok = [f for f in done if f.result is not Result.REFUSED]
            failed = [f for f in done if f.result is Result.REFUSED]
            duplicates = sum(1 for f in ok if f.result is Result.DUPLICATE)
            detail = f"{len(ok) - duplicates} stored, {duplicates} duplicates"
            if failed:
                last = failed[-1]
                detail += f"; last failure {_status(last.status)}: {last.comment}"
            events.append(Event("import", partition=self.partition, calling_ae=calling_ae,
                                called_ae=self.partition, peer=ADDRESS,
                                study_instance_uid=study, count=len(ok), failed=len(failed),
                                outcome="ok" if not failed else "warning" if ok else "failed",
                                detail=detail))
        return events


def _status(status: int | None) -> str:
    return "(no status)" if status is None else f"0x{status:04X}"


def choose_partition(session: Session, ae_title: str | None) -> Partition:
    """The partition to import into: the one named, else the node's only enabled one."""
    if ae_title:
        partition = partitions.get(session, ae_title)
    else:
        enabled = list(session.scalars(select(Partition).where(Partition.enabled.is_(True))
                                       .order_by(Partition.ae_title)))
        if not enabled:
            raise AdminError("no enabled partition to import into")
        if len(enabled) > 1:
            raise AdminError("the node has several partitions: choose one with --partition ("
                             + ", ".join(p.ae_title for p in enabled) + ")")
        partition = enabled[0]
    if not partition.enabled:
        raise AdminError(f"partition {partition.ae_title} is disabled (pacsnode partition "
                         f"enable {partition.ae_title})")
    return partition


def storage_syntaxes(settings: Settings) -> dict[str, frozenset[str]]:
    """Storage SOP class -> the transfer syntaxes a C-STORE of it is accepted in: the
    presentation contexts the node's listeners offer (sop_classes.supported_contexts makes the
    storage ones, and only those, with the SCP role alone, for C-GET requestors)."""
    return {str(cx.abstract_syntax): frozenset(map(str, cx.transfer_syntax))
            for cx in supported_contexts(tuple(settings.accepted_transfer_syntaxes))
            if cx.scp_role is True and cx.scu_role is False}


def negotiation_refusal(syntaxes: dict[str, frozenset[str]], sniffed: Sniffed,
                        accept_unknown: bool) -> tuple[int | None, str] | None:
    """Why no C-STORE of this file could be sent to the node (a sender needs its SOP Class
    and Instance UIDs, and a presentation context for them), or None. `accept_unknown`:
    dicom.accept_unknown_sop_classes, under which an association gets a storage context for
    a SOP class no library knows, in the syntaxes of the node's storage contexts."""
    for keyword, value in (("SOPClassUID", sniffed.sop_class),
                           ("SOPInstanceUID", sniffed.sop_instance)):
        if not value:
            return INVALID_UID, f"{keyword} is missing"
    accepted = syntaxes.get(sniffed.sop_class)
    if accepted is None and accept_unknown \
            and unknown_storage_classes([sniffed.sop_class], syntaxes):
        accepted = syntaxes[CTImageStorage]
    if accepted is None:
        return (SOP_CLASS_NOT_SUPPORTED,
                f"SOP class {sniffed.sop_class} is not a storage class this node accepts")
    if sniffed.transfer_syntax not in accepted:
        return (None, f"transfer syntax {sniffed.transfer_syntax} is not accepted by this "
                "node (dicom.transfer_syntaxes)")
    return None


class Importer:
    """Imports files into one partition of the node as its Self device would send them."""

    def __init__(self, settings: Settings, db: Database, partition: str | None) -> None:
        """AdminError when there is no such partition (or no single one to choose)."""
        with db.session() as session:
            chosen = choose_partition(session, partition)
            policy = lookup.policy_of(chosen)
            self_row = lookup.self_device(session)
            self.self_device = self_row.name if self_row is not None else None
            self.self_enabled = self_row is not None and self_row.enabled
            device = lookup.view_of(self_row) if self_row is not None and self_row.enabled \
                else None
            # Stored as the calling AE of what the node takes in itself (forwarding rules'
            # calling-ae, the index): the Self device's, else the partition's own.
            self.calling_ae = device.ae_title if device is not None else policy.ae_title
            self.peer: Peer = lookup.peer_for(session, policy, device, self.calling_ae, ADDRESS)
        storage = settings.storage_dir
        files.ensure_dir(storage / files.INCOMING)
        self.incoming = storage / files.INCOMING
        self.ingest = Ingest(db, storage, settings.forwarding.send_updates,
                             guard=StorageGuard(storage, settings.storage.critical_watermark))
        self.syntaxes = storage_syntaxes(settings)
        self.accept_unknown = settings.dicom.accept_unknown_sop_classes
        self.summary = Summary(policy.ae_title, self.self_device, len(self.peer.rules))
        self.copy: Path | None = None  # the temporary copy being stored

    def add(self, result: FileResult) -> FileResult:
        self.summary.files.append(result)
        return result

    def import_file(self, path: Path) -> FileResult:
        """Import one file; its result is also added to the summary."""
        return self.add(self._import(path))

    def _import(self, path: Path) -> FileResult:
        shown = str(path)
        try:
            sniffed = sniff(path)
        except OSError as exc:
            return FileResult(shown, Result.REFUSED, None,
                              f"cannot read: {exc.strerror or exc}")
        if sniffed.kind is Kind.NOT_DICOM:
            return FileResult(shown, Result.NOT_DICOM, comment=sniffed.reason)
        if sniffed.kind is Kind.DICOMDIR:
            return FileResult(shown, Result.SKIPPED, comment="DICOMDIR (a media directory, "
                              "not an instance; give it as an argument to import what it "
                              "references)")
        if sniffed.kind is Kind.BROKEN:
            return FileResult(shown, Result.REFUSED, CANNOT_PARSE,
                              f"cannot parse: {sniffed.reason}")
        refusal = negotiation_refusal(self.syntaxes, sniffed, self.accept_unknown)
        if refusal is not None:
            return FileResult(shown, Result.REFUSED, refusal[0], refusal[1],
                              sniffed.sop_instance)
        return self._store(path, sniffed)

    def _new_copy(self) -> tuple[int, Path]:
        """A new temporary file in .incoming, named like no other process's; its name is
        `self.copy` from before it exists, so an interrupted import removes it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        while True:
            self.copy = self.incoming / f"import{os.getpid()}-{next(_numbers)}.dcm"
            try:
                return os.open(self.copy, flags, 0o600), self.copy
            except FileExistsError:
                self.copy = None  # left by an earlier process of the same ID: not ours

    def _store(self, path: Path, sniffed: Sniffed) -> FileResult:
        shown = str(path)
        meta = b""
        try:
            reader = open(path, "rb")  # noqa: SIM115 (closed in the finally below)
            if sniffed.dataset_offset is not None:
                meta = file_meta(sniffed.sop_class, sniffed.sop_instance,
                                 sniffed.transfer_syntax)
                reader.seek(sniffed.dataset_offset)
        except OSError as exc:
            return FileResult(shown, Result.REFUSED, None, f"cannot read: {exc.strerror or exc}",
                              sniffed.sop_instance)
        try:
            try:
                fd, copy = self._new_copy()
                _copy(reader, fd, meta)
            except _ReadError as exc:
                return FileResult(shown, Result.REFUSED, None,
                                  f"cannot read: {exc.error.strerror or exc.error}",
                                  sniffed.sop_instance)
            except OSError as exc:  # writing the copy: out of space, as a C-STORE would be
                outcome = self.ingest.write_failed(self.peer, sniffed.sop_instance, exc)
            else:
                outcome = self.ingest.store(self.peer, copy, sniffed.sop_class,
                                            sniffed.sop_instance)
        finally:
            reader.close()
            # The store has linked the copy into place and made it durable, or refused it.
            if self.copy is not None:
                files.remove_quietly(self.copy)
                self.copy = None
        if not outcome.ok:
            return FileResult(shown, Result.REFUSED, outcome.status, outcome.comment,
                              sniffed.sop_instance, outcome.study)
        return FileResult(shown, Result.DUPLICATE if outcome.duplicate else Result.STORED,
                          outcome.status, sniffed.reason, sniffed.sop_instance, outcome.study,
                          len(outcome.integrity))


class _ReadError(Exception):
    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _copy(reader: BinaryIO, fd: int, meta: bytes) -> None:
    """The rest of `reader` into the new file `fd` (closed here), after `meta`; _ReadError when
    `reader` fails, OSError when the copy cannot be written. Not fsynced: the store does it."""
    with os.fdopen(fd, "wb") as writer:
        writer.write(meta)
        while True:
            try:
                chunk = reader.read(1 << 20)
            except OSError as exc:
                raise _ReadError(exc) from exc
            if not chunk:
                return
            writer.write(chunk)
