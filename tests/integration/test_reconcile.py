"""The start-up check: files a crash placed but never indexed go, indexed ones stay."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select

from node import config
from node.db.database import Database
from node.db.indexer import extract, index_instance
from node.db.models import Instance, Partition
from node.service import Node, ensure_bootstrap_partition, open_database
from node.storage import files
from node.storage.paths import instance_relpath, path_part
from node.storage.reconcile import reconcile
from tests.conftest import (
    RunningNode,
    free_port,
    incoming_emptied,
    incoming_files,
    node_toml,
    write_config,
)
from tests.dicomgen import make_instance, uid
from tests.scu import statuses, store


def _relpath(folder: str, ds: Dataset) -> str:
    return instance_relpath(folder, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def _temporary(incoming: Path, ds: Dataset, name: str) -> Path:
    """What pynetdicom leaves in .incoming for a received dataset."""
    path = incoming / name
    ds.save_as(path, enforce_file_format=True)
    files.fsync_file(path)
    return path


def _index(db: Database, partition_id: int, ds: Dataset, relpath: str, size: int = 1) -> None:
    with db.transaction() as session:
        index_instance(session, partition_id, extract(ds), relpath=relpath, size=size,
                       transfer_syntax=str(ds.file_meta.TransferSyntaxUID), calling_ae="CT1")


def _settings(tmp_path: Path, db_url: str) -> config.Settings:
    return config.load(write_config(tmp_path / "node.toml",
                                    node_toml(tmp_path / "node", db_url, free_port())))


@contextlib.contextmanager
def _storage(tmp_path: Path, db_url: str) -> Iterator[tuple[Database, Path, int, str, Path]]:
    """A node's database (its bootstrap partition made), storage root, partition key and
    folder, and `.incoming`, without the node."""
    settings = _settings(tmp_path, db_url)
    db = open_database(settings)
    try:
        ensure_bootstrap_partition(db, settings)
        with db.session() as session:
            partition_id, folder = session.execute(
                select(Partition.id, Partition.folder)).one()
        incoming = settings.storage_dir / files.INCOMING
        files.ensure_dir(incoming)
        yield db, settings.storage_dir, partition_id, folder, incoming
    finally:
        db.dispose()


def test_reconcile_removes_unindexed_files_named_in_incoming(
        tmp_path: Path, new_db: Callable[[str], str]) -> None:
    with _storage(tmp_path, new_db("node")) as (db, root, partition_id, folder, incoming):
        study, series = uid(), uid()

        # Committed; the crash came before pynetdicom removed its temporary file.
        kept = make_instance(study_uid=study, series_uid=series, fill=1)
        assert files.place_new(_temporary(incoming, kept, "tmpkept.dcm"),
                               root / _relpath(folder, kept))
        _index(db, partition_id, kept, _relpath(folder, kept))
        # Placed, never committed, in a series that holds the kept instance.
        orphan = make_instance(study_uid=study, series_uid=series, fill=2)
        assert files.place_new(_temporary(incoming, orphan, "tmporphan.dcm"),
                               root / _relpath(folder, orphan))
        # Coerced: the coerced copy was placed; both temporary files name the instance.
        coerced = make_instance(fill=3)
        _temporary(incoming, coerced, "tmpcoerced.dcm")
        assert files.place_new(_temporary(incoming, coerced, "tmpcoerced.dcm.coerced"),
                               root / _relpath(folder, coerced))
        # Killed inside files.replace_keeping_source: the link beside the final name is left.
        replacing = make_instance(fill=4)
        beside = (root / _relpath(folder, replacing)).with_name(
            f".{replacing.SOPInstanceUID}.dcm.4242.restore")
        files.ensure_dir(beside.parent)
        os.link(_temporary(incoming, replacing, "tmpreplacing.dcm"), beside)
        # Indexed but its file is gone, and no temporary file of its size: reported, the row
        # is left alone.
        lost = make_instance(fill=5)
        _temporary(incoming, lost, "tmplost.dcm")
        _index(db, partition_id, lost, _relpath(folder, lost))
        # Answered by the direct receiver, then a power loss took the link's directory entry
        # (it is fsynced after the answer): the kept temporary file puts it back.
        unsynced = make_instance(fill=8)
        copy = _temporary(incoming, unsynced, "tmpunsynced.dcm")
        _index(db, partition_id, unsynced, _relpath(folder, unsynced), copy.stat().st_size)
        # The same with coercion rules: the coerced copy is what was indexed.
        coerced_unsynced = make_instance(fill=9)
        _temporary(incoming, coerced_unsynced, "tmpcu.dcm")
        coerced_unsynced.PatientID = "COERCED-PID"
        coerced_copy = _temporary(incoming, coerced_unsynced, "tmpcu.dcm.coerced")
        assert coerced_copy.stat().st_size != (incoming / "tmpcu.dcm").stat().st_size
        _index(db, partition_id, coerced_unsynced, _relpath(folder, coerced_unsynced),
               coerced_copy.stat().st_size)
        # A transfer cut short: not even the UIDs can be read.
        (incoming / "tmppartial.dcm").write_bytes(b"\0" * 128 + b"DICM\x02\x00")
        # Not named by any temporary file: the check does not scan the storage.
        untouched = make_instance(fill=6)
        _temporary(tmp_path, untouched, "elsewhere.dcm")
        assert files.place_new(tmp_path / "elsewhere.dcm", root / _relpath(folder, untouched))

        result = reconcile(db, root)

        assert result.temporary == 10
        assert result.unreadable == 1
        assert sorted(result.removed) == sorted([
            _relpath(folder, orphan), _relpath(folder, coerced),
            str(beside.relative_to(root))])
        assert result.missing == [_relpath(folder, lost)]
        assert sorted(result.restored) == sorted([
            _relpath(folder, unsynced), _relpath(folder, coerced_unsynced)])
        assert files.same_file(root / _relpath(folder, unsynced), copy)
        assert files.same_file(root / _relpath(folder, coerced_unsynced), coerced_copy)
        assert (root / _relpath(folder, kept)).read_bytes() == \
            (incoming / "tmpkept.dcm").read_bytes()
        assert not (root / _relpath(folder, orphan)).exists()
        assert (root / _relpath(folder, untouched)).exists()
        # Emptied series and study folders go; the kept instance's stay.
        for gone in (coerced, replacing):
            assert not (root / folder / gone.StudyInstanceUID).exists()
        assert (root / folder / study / series).is_dir()
        # The temporary files are the sweep's business, after the check.
        assert len(incoming_files(root)) == 10
        with db.session() as session:
            assert set(session.scalars(select(Instance.sop_instance_uid))) == {
                kept.SOPInstanceUID, lost.SOPInstanceUID, unsynced.SOPInstanceUID,
                coerced_unsynced.SOPInstanceUID}


def test_node_start_reconciles_before_sweeping(tmp_path: Path,
                                               new_db: Callable[[str], str]) -> None:
    settings = _settings(tmp_path, new_db("node"))
    db = open_database(settings)
    try:
        ensure_bootstrap_partition(db, settings)
        with db.session() as session:
            folder = session.scalars(select(Partition.folder)).one()
    finally:
        db.dispose()
    root = settings.storage_dir
    incoming = root / files.INCOMING
    files.ensure_dir(incoming)
    orphan = make_instance()
    final = root / _relpath(folder, orphan)
    assert files.place_new(_temporary(incoming, orphan, "tmpcrash.dcm"), final)
    unsynced = make_instance()
    copy = _temporary(incoming, unsynced, "tmpunsynced.dcm")
    sent = copy.read_bytes()
    db = open_database(settings)
    try:
        with db.session() as session:
            partition_id = session.scalars(select(Partition.id)).one()
        _index(db, partition_id, unsynced, _relpath(folder, unsynced), len(sent))
    finally:
        db.dispose()

    node = Node(settings)
    node.start()
    try:
        assert not final.exists()
        assert not (root / folder / orphan.StudyInstanceUID).exists()
        assert (root / _relpath(folder, unsynced)).read_bytes() == sent
        assert incoming_files(root) == []
    finally:
        node.stop()


def test_store_over_an_orphan_replaces_it(node: RunningNode) -> None:
    """An orphan the check did not remove (any file without a row) is replaced by the store."""
    ds = make_instance(fill=7)
    with node.db.session() as session:
        folder = session.scalars(select(Partition.folder)).one()
    final = node.storage / _relpath(folder, ds)
    files.ensure_dir(final.parent)
    final.write_bytes(b"left by a crash")

    assert statuses(store(node.port, [ds])) == [0]

    with node.db.session() as session:
        row = session.scalars(select(Instance)).one()
    assert row.path == _relpath(folder, ds)
    assert final.read_bytes() != b"left by a crash"
    assert final.stat().st_size == row.size
    assert not list(final.parent.glob(".*"))
    assert incoming_emptied(node.storage)


def test_reconcile_finds_the_hashed_paths_of_non_conformant_uids(
        tmp_path: Path, new_db: Callable[[str], str]) -> None:
    """Instances stored under hashes of their UIDs (not conformant, or absent for a
    non-patient object) are named by their temporary files like any other."""
    with _storage(tmp_path, new_db("node")) as (db, root, partition_id, folder, incoming):
        orphan = make_instance(study_uid="05fa52f0e599f17b", series_uid="abc.def",
                               sop_uid="1..2")
        assert files.place_new(_temporary(incoming, orphan, "tmporphan.dcm"),
                               root / _relpath(folder, orphan))
        no_study = make_instance(sop_class="1.2.840.10008.5.1.4.39.1")  # Color Palette
        del no_study.StudyInstanceUID, no_study.SeriesInstanceUID
        relpath = instance_relpath(folder, "", "", no_study.SOPInstanceUID)
        copy = _temporary(incoming, no_study, "tmpnostudy.dcm")
        _index(db, partition_id, no_study, relpath, copy.stat().st_size)

        result = reconcile(db, root)

        assert result.unreadable == 0
        assert result.removed == [_relpath(folder, orphan)]
        assert result.restored == [relpath]
        assert files.same_file(root / relpath, copy)
        assert sorted(p.name for p in (root / folder).iterdir()) \
            == [path_part("")]  # the orphan's hashed study folder went with it
