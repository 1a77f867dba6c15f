"""A serving node's DICOM side, assembled in one place: the node's main process (service.Node)
and each of its association processes (processes/association.py) build the same server with
the same wiring; they differ only in what they pass in (how admissions are counted, where
connections go, what wakes forwarding)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from node.activity import ActivityLog
from node.config import Settings
from node.db.database import Database
from node.ingest.pipeline import Ingest
from node.internals.configure import configure_pynetdicom
from node.scp.commitment import StorageCommitment
from node.scp.gate import Connections
from node.scp.listener import Dispatcher
from node.scp.qr import QueryRetrieve
from node.scp.registry import Admissions
from node.scp.server import DicomServer
from node.storage import files
from node.storage.space import StorageGuard


def prepare_process(storage: Path) -> None:
    """Process-wide settings a process needs before it builds a server (once per process)."""
    # pynetdicom streams each incoming dataset to a temporary file; on the storage
    # filesystem, putting it into the archive is a link, not a copy.
    files.use_incoming_for_temporary_files(storage)
    configure_pynetdicom()


def dicom_server(settings: Settings, db: Database, activity: ActivityLog, *,
                 guard: StorageGuard, on_queued: Callable[[], None], admissions: Admissions,
                 dispatcher: Dispatcher | None, connections: Connections | None = None,
                 process_number: int = 0) -> DicomServer:
    """The server of one process, with its ingest pipeline, query/retrieve and storage
    commitment (DicomServer says what each argument is for); not started."""
    storage = settings.storage_dir
    ingest = Ingest(db, storage, settings.forwarding.send_updates, on_queued=on_queued,
                    guard=guard)
    return DicomServer(settings, db, ingest,
                       QueryRetrieve(db, settings, storage, activity),
                       StorageCommitment(settings, db, storage, activity), activity,
                       admissions=admissions, dispatcher=dispatcher,
                       process_number=process_number, connections=connections)
