"""Persist one received instance: validate, coerce, write durably, index, then answer.

Success is answered only after the file is fsynced and linked into place and the index
transaction that covers it has committed (and its WAL is on disk). The directory entry of the
new link is fsynced before the answer too, unless the caller defers it (`defer_sync`: the
direct receiver, whose storage/dirsync.DirectorySyncs makes it durable in a batch after the
answer; files.DeferredSync says why that is safe).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from node.db.database import CommitUncertain, Database
from node.db.indexer import (
    INDEX_ELEMENTS,
    INDEX_TAGS,
    InstanceAttributes,
    StoredInstance,
    StoredStudy,
    attributes,
    extract,
    index_instance,
)
from node.db.models import (
    DuplicatePolicy,
    ForwardJob,
    Instance,
    IntegrityItem,
    IntegrityKind,
    JobState,
)
from node.policy.admission import DeviceView, PartitionPolicy
from node.policy.coercion import Rule, apply_rules
from node.policy.matching import Difference, demographic_differences, patient_differences
from node.policy.routing import Received, Route, destinations
from node.sop_classes import has_no_study
from node.statuses import (
    CANNOT_PARSE,
    DUPLICATE_REJECTED,
    INVALID_UID,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    REFUSED_NOT_AUTHORISED,
    SOP_CLASS_MISMATCH,
    SOP_INSTANCE_MISMATCH,
    SUCCESS,
)
from node.storage import compare, files
from node.storage.header_scan import scan_header
from node.storage.paths import instance_relpath, is_harmless_uid, is_valid_uid
from node.storage.rewrite import rewrite_header
from node.storage.space import StorageGuard
from node.storage.structure import read_header

log = logging.getLogger(__name__)

_NO_STUDY_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID")

_INDEX_ATTEMPTS = 3
# Whether a study already went to a device (for devices that are not sent updates).
_SENT_BEFORE = (select(ForwardJob.id)
                .where(ForwardJob.device_id == bindparam("device_id"),
                       ForwardJob.study_instance_uid == bindparam("study_uid"),
                       ForwardJob.state == JobState.DONE).limit(1))


@dataclass(frozen=True)
class Peer:
    """Who is sending, resolved once when the association was accepted."""

    partition: PartitionPolicy
    device: DeviceView | None
    rules: tuple[Rule, ...]
    calling_ae: str
    address: str
    routes: tuple[Route, ...] = ()
    send_updates: dict[int, bool] = field(default_factory=dict)  # device id -> override

    def __str__(self) -> str:
        return f"{self.calling_ae}@{self.address} -> {self.partition.ae_title}"


@dataclass(frozen=True)
class Outcome:
    status: int
    comment: str = ""
    integrity: list[Difference] = field(default_factory=list)
    study: str = ""  # the dataset's Study Instance UID, once it was read (activity log)
    duplicate: bool = False  # answered success for an instance held already (stored copy kept)
    # Stores with defer_sync: what the caller must complete once it has answered.
    deferred: files.DeferredSync | None = None

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


@dataclass(frozen=True)
class Unconfirmed:
    """A store whose commit the database never confirmed (it stopped answering during it):
    the file stays linked at `final`, and `evidence` (a link to the same file in .incoming)
    names it to the start-up check until the index says whether the row was committed."""

    partition_id: int
    sop_instance: str
    relpath: str
    final: Path
    evidence: Path


class Refused(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment


class Ingest:
    def __init__(self, db: Database, storage_root: Path, send_updates: bool = True,
                 on_queued: Callable[[], None] | None = None,
                 guard: StorageGuard | None = None) -> None:
        """`send_updates`: the node default for forwarding new instances of a study that
        was already forwarded to a device; `on_queued`: called after forward jobs commit;
        `guard`: refuses stores while the partition's disk is above the critical watermark."""
        self.guard = guard
        self.db = db
        self.root = storage_root
        self.incoming = storage_root / files.INCOMING
        self.send_updates = send_updates
        self.on_queued = on_queued
        self._unconfirmed: list[Unconfirmed] = []
        self._unconfirmed_lock = threading.Lock()

    def store(self, peer: Peer, file: Path | files.ReceivedFile, sop_class: str,
              sop_instance: str, defer_sync: bool = False) -> Outcome:
        """Handle one C-STORE whose dataset was written to `file` (with file meta).

        `defer_sync`: the new file's directory entry is left unsynced and the outcome's
        `deferred` says what to complete after answering; the received file (and a coerced
        copy) must stay until then, and `files.complete` removes them."""
        received = files.path_of(file)
        coerced: Path | None = None
        study = ""
        try:
            if peer.device is not None and not peer.device.allow_storage:
                raise Refused(REFUSED_NOT_AUTHORISED,
                              f"device {peer.device.name} may not store to this node")
            size = file.size if isinstance(file, files.ReceivedFile) else received.stat().st_size
            if self.guard is not None:
                admitted, why = self.guard.admit(peer.partition.folder, size)
                if not admitted:
                    raise Refused(OUT_OF_RESOURCES, why)
            # Framing checked before anything is trusted (structure.py): refusals are 0xC000.
            if peer.rules:
                self._read(received, lambda: read_header(received, INDEX_TAGS))
                # (`target` for the lambda: a closure does not see `coerced` narrowed)
                coerced = target = self.incoming / f"{received.name}.coerced"
                header = self._read(received, lambda: rewrite_header(
                    received, target, lambda ds: apply_rules(list(peer.rules), ds)))
                attrs, transfer_syntax = extract(header), str(header.file_meta.TransferSyntaxUID)
                source = coerced
                size = coerced.stat().st_size
            else:
                attrs, transfer_syntax = self._index_values(file)
                files.fsync_file(file)
                source = received
            study = attrs["StudyInstanceUID"][:64]
            odd = _validate(attrs, sop_class, sop_instance)
            if odd:
                log.warning("C-STORE %s from %s: stored with a UID that is not conformant: %s",
                            sop_instance, peer, ", ".join(f"{kw} {attrs[kw]!r}" for kw in odd))
            keep = None if not defer_sync else (source, received) if coerced else (received,)
            outcome = self._persist(peer, source, size, attrs, transfer_syntax, keep)
            if outcome.deferred is not None:
                coerced = None  # kept until the caller completes the deferred sync
            return dataclasses.replace(outcome, study=study)
        except Refused as refused:
            log.warning("C-STORE %s from %s refused (0x%04X): %s",
                        sop_instance, peer, refused.status, refused.comment)
            return Outcome(refused.status, refused.comment, study=study)
        except OSError as exc:
            return self.write_failed(peer, sop_instance, exc)
        except SQLAlchemyError as exc:
            log.error("C-STORE %s from %s: index unavailable: %s", sop_instance, peer, exc)
            return Outcome(PROCESSING_FAILURE, "index database unavailable, nothing stored",
                           study=study)
        except Exception:
            # Never let an exception reach pynetdicom: it would skip removing the temporary file.
            log.exception("C-STORE %s from %s failed", sop_instance, peer)
            return Outcome(PROCESSING_FAILURE, "internal error while storing")
        finally:
            if coerced is not None:
                files.remove_quietly(coerced)

    def write_failed(self, peer: Peer, sop_instance: str, exc: OSError) -> Outcome:
        """The answer to a C-STORE whose data could not be written or placed; a full disk
        also makes the guard refuse the next stores up front, until space is freed."""
        if exc.errno == errno.ENOSPC and self.guard is not None:
            self.guard.disk_full(peer.partition.folder)
        log.error("C-STORE %s from %s failed: %s", sop_instance, peer, exc)
        return Outcome(OUT_OF_RESOURCES,
                       f"storage write failed: {os.strerror(exc.errno or errno.EIO)}")

    def _index_values(self, file: Path | files.ReceivedFile) -> tuple[InstanceAttributes, str]:
        """The index attributes and transfer syntax of a received file (not coerced)."""
        try:
            scanned = scan_header(file, INDEX_ELEMENTS)
        except ValueError as exc:  # StructureError
            raise Refused(CANNOT_PARSE, f"cannot parse: {exc}") from exc
        if scanned is not None:
            transfer_syntax, texts = scanned
            return attributes(texts), transfer_syntax
        path = files.path_of(file)
        header = self._read(path, lambda: read_header(path, INDEX_TAGS))
        return extract(header), str(header.file_meta.TransferSyntaxUID)

    @staticmethod
    def _read(path: Path, reader: Callable[[], Dataset]) -> Dataset:
        try:
            ds = reader()
        except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError,
                NotImplementedError, AttributeError, OverflowError) as exc:
            raise Refused(CANNOT_PARSE, f"cannot parse: {exc}") from exc
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            raise Refused(CANNOT_PARSE, "the dataset has no transfer syntax")
        return ds

    def _persist(self, peer: Peer, source: Path, size: int, attrs: InstanceAttributes,
                 transfer_syntax: str, keep: tuple[Path, ...] | None) -> Outcome:
        """`keep`: None to fsync the new file's directory now, else the temporary files to
        keep until the caller completes the outcome's `deferred` sync."""
        partition = peer.partition
        relpath = instance_relpath(partition.folder, attrs["StudyInstanceUID"],
                                   attrs["SeriesInstanceUID"], attrs["SOPInstanceUID"])
        final = self.root / relpath
        # The file goes into place before its index row, outside the index's write
        # transaction (SQLite's is one at a time for the whole node, and the directory's fsync
        # was half of what it held it for). Two stores of one instance at once cannot undo
        # each other: whoever indexes it first wins (the unique row), a store replaces a file
        # only once it holds the new row, and a store removes only its own link (same_file).
        # Either way the temporary file stays in .incoming until the commit (with a deferred
        # sync, until the new entry is on disk): after a crash it is what names this file to
        # the start-up check (storage/reconcile.py), and what it restores an indexed one from.
        # placed is False when an indexed copy, or a crash's orphan, is there already.
        placed = files.place_new(source, final, sync=keep is None)
        try:
            indexed = self._index(peer, source, size, attrs, transfer_syntax, relpath, placed)
        except CommitUncertain as exc:
            if files.same_file(source, final):
                self._keep_unconfirmed(Unconfirmed(
                    partition.id, attrs["SOPInstanceUID"], relpath, final,
                    source.with_name(f"{source.name}.unconfirmed")), source)
            log.error("C-STORE %s from %s: the index database did not confirm the commit: %s",
                      attrs["SOPInstanceUID"], peer, exc)
            raise Refused(PROCESSING_FAILURE, "index database did not confirm: send again"
                          ) from None
        except BaseException:
            if files.same_file(source, final):
                files.remove_quietly(final)
            raise
        if isinstance(indexed, Outcome):
            if placed and keep is not None:
                return dataclasses.replace(indexed, deferred=files.DeferredSync(final.parent, keep))
            return indexed
        if placed and files.same_file(source, final):
            # Indexed already (under this or another path): leave what was there as it was.
            files.remove_quietly(final)
        return self._duplicate(peer, source, self.root / indexed.path, attrs)

    def _index(self, peer: Peer, source: Path, size: int, attrs: InstanceAttributes,
               transfer_syntax: str, relpath: str, placed: bool) -> Outcome | StoredInstance:
        """Index the instance whose file is at `relpath` (`placed`: this store put it there;
        else the file there is an orphan to replace), or the instance indexed already."""
        partition = peer.partition
        for _ in range(_INDEX_ATTEMPTS):
            try:
                with self.db.write() as conn:
                    study = index_instance(conn, partition.id, attrs, relpath=relpath,
                                           size=size, transfer_syntax=transfer_syntax,
                                           calling_ae=peer.calling_ae)
                    if isinstance(study, StoredInstance):
                        return study
                    if not placed:
                        # Not indexed (this transaction holds the new row): what is there is an
                        # earlier crash's orphan, or the link of a store that lost the race.
                        files.replace_keeping_source(source, self.root / relpath)
                    queued = self._enqueue(conn, peer, attrs, study)
                    kind, mismatch = _mismatch(study, attrs, partition.match_fields)
                    if mismatch:
                        conn.execute(insert(IntegrityItem), _integrity(
                            partition, attrs, peer, kind, mismatch))
            except IntegrityError:
                # Another association created the same patient/study/series first.
                continue
            if self._unconfirmed:
                self.settle_unconfirmed()  # the database answers again
            if queued and self.on_queued is not None:
                self.on_queued()
            if mismatch:
                log.warning("C-STORE %s from %s: demographics differ from the stored %s: %s",
                            attrs["SOPInstanceUID"], peer,
                            "study" if kind is IntegrityKind.DEMOGRAPHICS_MISMATCH
                            else "patient", ", ".join(d.keyword for d in mismatch))
            return Outcome(SUCCESS, integrity=mismatch)
        raise Refused(PROCESSING_FAILURE, "could not index the instance (concurrent updates)")

    def _keep_unconfirmed(self, unconfirmed: Unconfirmed, source: Path) -> None:
        try:
            os.link(source, unconfirmed.evidence)
        except OSError as exc:
            # Without evidence the start-up check could not tell an orphan: no file rather
            # than a file that may have no row (the peer was told to send it again).
            log.error("%s removed, its store unconfirmed: cannot keep %s: %s",
                      unconfirmed.final, unconfirmed.evidence, exc)
            files.remove_quietly(unconfirmed.final)
            return
        with self._unconfirmed_lock:
            self._unconfirmed.append(unconfirmed)

    def settle_unconfirmed(self) -> int:
        """Ask the index about the stores whose commit it never confirmed: a committed one's
        file stays (its directory entry made durable), another's goes, unless a later store
        of the instance has put its own file there. Returns how many are still unknown."""
        with self._unconfirmed_lock:
            pending, self._unconfirmed = self._unconfirmed, []
        unknown = []
        for each in pending:
            try:
                with self.db.session() as session:
                    indexed = session.scalar(select(Instance.path).where(
                        Instance.partition_id == each.partition_id,
                        Instance.sop_instance_uid == each.sop_instance))
            except SQLAlchemyError:
                unknown.append(each)
                continue
            if indexed == each.relpath:
                files.complete([files.DeferredSync(each.final.parent, (each.evidence,))])
                log.warning("%s: its unconfirmed commit was made after all; kept", each.relpath)
                continue
            if files.same_file(each.evidence, each.final):
                files.remove_quietly(each.final)
            files.remove_quietly(each.evidence)
            log.warning("%s: its unconfirmed commit was not made; file removed", each.relpath)
        with self._unconfirmed_lock:
            self._unconfirmed.extend(unknown)
        return len(unknown)

    def _enqueue(self, conn: Connection, peer: Peer, attrs: InstanceAttributes,
                 study: StoredStudy) -> int:
        """Forward jobs for the new instance, in the transaction that indexes it."""
        if not (peer.partition.forwarding_enabled and peer.routes):
            return 0
        received = Received(peer.partition.id, attrs["Modality"], peer.calling_ae,
                            attrs["SOPClassUID"])
        jobs = [{"partition_id": peer.partition.id, "instance_pk": study.instance_pk,
                 "device_id": device_id, "study_instance_uid": attrs["StudyInstanceUID"]}
                for device_id in destinations(peer.routes, received)
                if peer.send_updates.get(device_id, self.send_updates) or study.is_new
                or conn.execute(_SENT_BEFORE, {
                    "device_id": device_id,
                    "study_uid": attrs["StudyInstanceUID"]}).first() is None]
        # (A device left out: the study went there already and updates are not sent.)
        if jobs:
            conn.execute(insert(ForwardJob), jobs)
        return len(jobs)

    def _duplicate(self, peer: Peer, received: Path, stored_path: Path,
                   attrs: InstanceAttributes) -> Outcome:
        policy = peer.partition.duplicate_policy
        sop = attrs["SOPInstanceUID"]
        if policy == DuplicatePolicy.REJECT:
            raise Refused(DUPLICATE_REJECTED, f"duplicate SOP instance {sop} rejected by policy")
        if policy == DuplicatePolicy.COMPARE:
            diffs = compare.differences(stored_path, received)
            if diffs:
                with self.db.write() as conn:
                    conn.execute(insert(IntegrityItem), _integrity(
                        peer.partition, attrs, peer, IntegrityKind.DUPLICATE_DIFFERS, diffs))
                log.warning("duplicate %s from %s differs from the stored copy: %s",
                            sop, peer, ", ".join(d.keyword for d in diffs))
            return Outcome(SUCCESS, integrity=diffs, duplicate=True)
        log.info("duplicate %s from %s ignored (stored copy kept)", sop, peer)
        return Outcome(SUCCESS, duplicate=True)


def _mismatch(study: StoredStudy, attrs: InstanceAttributes, keywords: tuple[str, ...]
              ) -> tuple[IntegrityKind, list[Difference]]:
    """How an indexed instance's demographics differ from what the index held: from its
    study's (an instance of a known study), or from its patient's (the first instance of a
    new study of a known patient)."""
    if not study.is_new:
        return IntegrityKind.DEMOGRAPHICS_MISMATCH, demographic_differences(
            study.demographics, attrs.demographics, keywords)
    if study.patient_demographics is not None:
        return IntegrityKind.PATIENT_MISMATCH, patient_differences(
            study.patient_demographics, attrs.demographics, keywords)
    return IntegrityKind.DEMOGRAPHICS_MISMATCH, []


def _validate(attrs: InstanceAttributes, sop_class: str, sop_instance: str) -> list[str]:
    """Refuse an instance whose UIDs cannot be stored or do not match the request; returns
    the keywords of the UIDs that are stored although not conformant (paths.is_harmless_uid:
    Orthanc stores them too; their path parts are hashes). A non-patient object (Color
    Palette, Hanging Protocol, ...) has no Study and Series UIDs: it is stored without."""
    odd = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = attrs[keyword]
        if is_valid_uid(value):
            continue
        if not value and keyword in _NO_STUDY_KEYWORDS and has_no_study(sop_class):
            continue  # indexed with empty Study/Series UIDs, as received
        # The SOP Class UID is the accepted context's, which is always conformant.
        if keyword != "SOPClassUID" and is_harmless_uid(value):
            odd.append(keyword)
            continue
        raise Refused(INVALID_UID, f"{keyword} {value!r} is missing or not a valid UID"
                      if value else f"{keyword} is missing")
    if attrs["SOPClassUID"] != sop_class:
        raise Refused(SOP_CLASS_MISMATCH,
                      f"dataset SOP Class {attrs['SOPClassUID']} differs from the request's "
                      f"{sop_class}")
    if attrs["SOPInstanceUID"] != sop_instance:
        raise Refused(SOP_INSTANCE_MISMATCH,
                      f"dataset SOP Instance {attrs['SOPInstanceUID']} differs from the "
                      f"request's {sop_instance}")
    return odd


def _integrity(partition: PartitionPolicy, attrs: InstanceAttributes, peer: Peer,
               kind: IntegrityKind, diffs: list[Difference]) -> dict[str, object]:
    """An integrity_items row."""
    return {"partition_id": partition.id, "kind": kind.value,
            "study_instance_uid": attrs["StudyInstanceUID"],
            "sop_instance_uid": attrs["SOPInstanceUID"], "calling_ae_title": peer.calling_ae,
            "details": json.dumps([d.as_dict() for d in diffs])}
