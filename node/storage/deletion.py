"""Delete, keep and restore studies without ever leaving the index and the disk disagreeing.

A delete holds the study's row lock (so no association can add to the study meanwhile), moves
the study's files into a holding folder inside the partition's folder (a rename on the same
filesystem), and deletes the index rows, all before one commit. The holding folder carries a
manifest written first, so a crash at any moment is undone or finished at the next start by
`recover`: files whose index rows are still there go back, the rest go.

- purge and untracked deletes hold in `<folder>/.trash/<id>/`, removed after the commit;
- tracked deletes (the partition's delete management, docs/how-to/storage.md) hold in
  `<folder>/.deleted/<id>/`, recorded in deleted_studies, from where `restore` puts the study
  back or `discard` removes it for good.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from node.db.database import Database
from node.db.indexer import INDEX_TAGS, StoredInstance, extract, index_instance
from node.db.models import DeletedStudy, Instance, Partition, Patient, Series, Study
from node.storage import files
from node.storage.paths import instance_relpath, study_relpath

log = logging.getLogger(__name__)

TRASH = ".trash"
DELETED = ".deleted"
MANIFEST = "manifest.json"


class DeletionError(Exception):
    """A delete or restore that cannot be done; the message says why."""


@dataclass(frozen=True)
class Removed:
    study_instance_uid: str
    partition: str  # AE title
    instances: int
    size: int
    deleted_id: int | None  # the deleted_studies row when kept


def delete_study(db: Database, root: Path, study_pk: int, *, keep: bool, reason: str,
                 still_wanted: Callable[[Session], bool] | None = None) -> Removed | None:
    """Delete one study; None when it is gone already or `still_wanted` says no.

    `still_wanted` runs inside the transaction, after the study's row is locked: purge checks
    there that the study is still stored elsewhere, so an instance that arrived since it was
    chosen is never purged.
    """
    holding: Path | None = None
    moved: list[tuple[Path, Path]] = []
    try:
        with db.transaction() as session:
            study = session.scalar(select(Study).where(Study.id == study_pk).with_for_update())
            if study is None or (still_wanted is not None and not still_wanted(session)):
                return None
            partition = session.get(Partition, study.partition_id)
            assert partition is not None
            rows = session.execute(
                select(Instance.id, Instance.path, Instance.size)
                .join(Series, Series.id == Instance.series_pk)
                .where(Series.study_pk == study_pk)).all()
            holding = root / partition.folder / (DELETED if keep else TRASH) / uuid.uuid4().hex
            files.ensure_dir(holding)
            _write_manifest(holding, study.study_instance_uid, [path for _, path, _ in rows])
            for _, path, _ in rows:
                source = root / path
                target = holding / _held_name(path)
                target.parent.mkdir(exist_ok=True)
                try:
                    os.rename(source, target)
                except FileNotFoundError:
                    log.warning("deleting study %s: %s was already missing",
                                study.study_instance_uid, source)
                    continue
                moved.append((source, target))
            _fsync_tree(holding)
            _delete_rows(session, study)
            deleted_id = None
            if keep:
                record = DeletedStudy(
                    partition_id=partition.id, study_instance_uid=study.study_instance_uid,
                    patient_id=study.patient_id, patient_name=study.patient_name,
                    study_date=study.study_date, accession_number=study.accession_number,
                    study_description=study.study_description, modalities=study.modalities,
                    num_instances=len(rows), size=sum(size for _, _, size in rows),
                    folder=str(holding.relative_to(root)), reason=reason)
                session.add(record)
                session.flush()
                deleted_id = record.id
            # Inside the transaction: an association storing into this study waits on its row
            # lock, so it cannot be creating these folders while they are removed.
            _remove_empty_dirs(root / study_relpath(partition.folder, study.study_instance_uid))
            removed = Removed(study.study_instance_uid, partition.ae_title, len(rows),
                              sum(size for _, _, size in rows), deleted_id)
    except BaseException:
        for source, target in reversed(moved):
            with contextlib.suppress(OSError):
                files.ensure_dir(source.parent)
                os.rename(target, source)
        if holding is not None:
            shutil.rmtree(holding, ignore_errors=True)
        raise
    if not keep and holding is not None:
        shutil.rmtree(holding, ignore_errors=True)
    log.info("study %s deleted from %s (%d instances, %d bytes)%s: %s",
             removed.study_instance_uid, removed.partition, removed.instances, removed.size,
             " and kept in the deleted folder" if keep else "", reason)
    return removed


def restore(db: Database, root: Path, deleted_id: int) -> tuple[str, int, int]:
    """Put a kept study back into its partition; (study UID, instances restored, skipped).

    Instances the partition holds again meanwhile (received anew) are left as they are.
    Restored instances are not forwarded again.
    """
    with db.transaction() as session:
        record = session.scalar(select(DeletedStudy).where(DeletedStudy.id == deleted_id)
                                .with_for_update())
        if record is None:
            raise DeletionError(f"no deleted study with id {deleted_id}")
        partition = session.get(Partition, record.partition_id)
        assert partition is not None
        holding = root / record.folder
        restored = skipped = 0
        for held in sorted(holding.glob("*/*.dcm")):
            ds = dcmread(held, stop_before_pixels=True, specific_tags=INDEX_TAGS)
            attrs = extract(ds)
            try:
                relpath = instance_relpath(partition.folder, attrs["StudyInstanceUID"],
                                           attrs["SeriesInstanceUID"], attrs["SOPInstanceUID"])
            except ValueError as exc:
                raise DeletionError(f"{held} does not hold valid UIDs: {exc}") from exc
            if isinstance(index_instance(
                    session, partition.id, attrs, relpath=relpath, size=held.stat().st_size,
                    transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
                    calling_ae=""), StoredInstance):
                skipped += 1
                continue
            # A link, so the held copy stays until the commit: a crash before it leaves the
            # deleted study as it was (the linked file is an unindexed orphan that the next
            # store of that instance replaces).
            if not files.place_new(held, root / relpath):
                files.replace_keeping_source(held, root / relpath)
            restored += 1
        session.delete(record)
        uid = record.study_instance_uid
    shutil.rmtree(holding, ignore_errors=True)
    log.info("deleted study %s restored to %s: %d instances (%d already there)", uid,
             partition.ae_title, restored, skipped)
    return uid, restored, skipped


def discard(db: Database, root: Path, deleted_id: int) -> DeletedStudy:
    """Remove a kept study for good."""
    with db.transaction() as session:
        record = session.get(DeletedStudy, deleted_id)
        if record is None:
            raise DeletionError(f"no deleted study with id {deleted_id}")
        session.delete(record)
    shutil.rmtree(root / record.folder, ignore_errors=True)
    return record


def recover(db: Database, root: Path) -> int:
    """At start: finish or undo deletes a crash interrupted; returns how many were found."""
    found = 0
    with db.session() as session:
        folders = list(session.scalars(select(Partition.folder)))
        kept = set(session.scalars(select(DeletedStudy.folder)))
    for folder in folders:
        for kind in (TRASH, DELETED):
            base = root / folder / kind
            if not base.is_dir():
                continue
            for holding in base.iterdir():
                relative = str(holding.relative_to(root))
                if kind == DELETED and relative in kept:
                    continue  # a committed, tracked delete
                found += 1
                _recover_one(db, root, holding)
    return found


def _recover_one(db: Database, root: Path, holding: Path) -> None:
    try:
        manifest = json.loads((holding / MANIFEST).read_text())
        paths: list[str] = manifest["files"]
    except (OSError, ValueError, KeyError):
        paths = []
    with db.session() as session:
        indexed = set(session.scalars(select(Instance.path).where(Instance.path.in_(paths))))
    back = 0
    for path in paths:
        held = holding / _held_name(path)
        target = root / path
        if path in indexed and held.exists() and not target.exists():
            files.ensure_dir(target.parent)
            os.rename(held, target)
            back += 1
    shutil.rmtree(holding, ignore_errors=True)
    log.warning("interrupted delete in %s: %d file(s) put back (the delete had not committed),"
                " the rest removed", holding, back)


def _held_name(relpath: str) -> str:
    series, sop = Path(relpath).parts[-2:]
    return f"{series}/{sop}"


def _write_manifest(holding: Path, study_uid: str, paths: list[str]) -> None:
    manifest = holding / MANIFEST
    with open(manifest, "w", encoding="utf-8") as out:
        json.dump({"study_instance_uid": study_uid, "files": paths}, out)
        out.flush()
        os.fsync(out.fileno())
    files.fsync_dir(holding)


def _fsync_tree(holding: Path) -> None:
    for directory in [holding, *[p for p in holding.iterdir() if p.is_dir()]]:
        files.fsync_dir(directory)


def _delete_rows(session: Session, study: Study) -> None:
    series_ids = select(Series.id).where(Series.study_pk == study.id)
    session.execute(delete(Instance).where(Instance.series_pk.in_(series_ids)))
    session.execute(delete(Series).where(Series.study_pk == study.id))
    patient_pk = study.patient_pk
    session.delete(study)
    session.flush()
    if not session.scalar(select(func.count()).select_from(Study)
                          .where(Study.patient_pk == patient_pk)):
        session.execute(delete(Patient).where(Patient.id == patient_pk))


def _remove_empty_dirs(study_dir: Path) -> None:
    if not study_dir.is_dir():
        return
    for series_dir in study_dir.iterdir():
        with contextlib.suppress(OSError):
            series_dir.rmdir()
    with contextlib.suppress(OSError):
        study_dir.rmdir()
