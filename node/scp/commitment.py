"""Storage commitment, push model (PS3.4 J): confirm what this node holds, record what others do.

As SCP: an N-ACTION names instances; each one is checked in the index and on disk, the N-ACTION
is answered at once, and the result follows in an N-EVENT-REPORT on a new association to the
requesting device (found in the device table by its AE title).
As SCU (forwarding): the N-EVENT-REPORT a destination sends back, on any association, marks
each forward job committed or failed (forwarding/commitment.py records it).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import select

from node.activity import ActivityLog, Event
from node.config import Settings
from node.db.database import Database
from node.db.models import Instance
from node.forwarding.commitment import WELL_KNOWN_INSTANCE, on_report, reference
from node.implementation import identify
from node.ingest import lookup
from node.ingest.pipeline import Peer
from node.internals.tuning import CONNECTION_HANDLERS
from node.statuses import NO_SUCH_ACTION, NO_SUCH_OBJECT_INSTANCE, SUCCESS
from node.tls import endpoint

log = logging.getLogger(__name__)



class StorageCommitment:
    def __init__(self, settings: Settings, db: Database, storage_root: Path,
                 activity: ActivityLog | None = None) -> None:
        """`activity`: where one row per commitment request goes (None: not recorded)."""
        self.settings = settings
        self.db = db
        self.root = storage_root
        self.activity = activity

    def on_action(self, event: evt.Event, peer: Peer) -> tuple[int, Dataset | None]:
        request = event.action_information
        transaction = str(request.get("TransactionUID", ""))
        if event.action_type != 1 or not transaction:
            return NO_SUCH_ACTION, None  # or a missing transaction UID
        refs = [(str(r.ReferencedSOPClassUID), str(r.ReferencedSOPInstanceUID))
                for r in request.get("ReferencedSOPSequence", [])]
        with self.db.session() as session:
            held = {sop: path for sop, path in session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(
                    Instance.partition_id == peer.partition.id,
                    Instance.sop_instance_uid.in_([sop for _, sop in refs])))}
        ok = [(c, s) for c, s in refs if s in held and (self.root / held[s]).is_file()]
        missing = [(c, s) for c, s in refs if (c, s) not in ok]
        log.info("storage commitment %s from %s: %d held, %d not", transaction, peer, len(ok),
                 len(missing))
        if self.activity is not None:
            self.activity.record(Event(
                "commitment", partition=peer.partition.ae_title, calling_ae=peer.calling_ae,
                called_ae=peer.partition.ae_title, peer=peer.address, count=len(refs),
                failed=len(missing),
                outcome="ok" if not missing else "warning" if ok else "failed",
                detail=f"transaction {transaction}: {len(ok)} held, {len(missing)} not"))
        threading.Thread(target=self._report, args=(peer, transaction, ok, missing),
                         name="commitment-report", daemon=True).start()
        return SUCCESS, None

    def _report(self, peer: Peer, transaction: str, ok: list[tuple[str, str]],
                missing: list[tuple[str, str]]) -> None:
        with self.db.session() as session:
            device = lookup.device_row(session, peer.partition.id, peer.calling_ae,
                                       enabled_only=True)
            target = (device.ae_title, endpoint(self.settings, host=device.host, ip=device.ip,
                                                port=device.port, tls_port=device.tls_port)
                      ) if device else None
        if target is None:
            log.error("storage commitment %s: %s is not in the device table; no report sent",
                      transaction, peer.calling_ae)
            return
        report = Dataset()
        report.TransactionUID = transaction
        report.ReferencedSOPSequence = [reference(c, s) for c, s in ok]
        if missing:
            report.FailedSOPSequence = [reference(c, s, NO_SUCH_OBJECT_INSTANCE)
                                        for c, s in missing]
        ae = identify(AE(ae_title=peer.partition.ae_title))
        ae.add_requested_context(StorageCommitmentPushModel)
        where = target[1]
        assoc = ae.associate(where.address, where.port, ae_title=target[0],
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
                             evt_handlers=CONNECTION_HANDLERS, tls_args=where.tls_args)
        if not assoc.is_established:
            log.error("storage commitment %s: cannot associate with %s to report", transaction,
                      target[0])
            return
        try:
            status, _ = assoc.send_n_event_report(report, 2 if missing else 1,
                                                  StorageCommitmentPushModel,
                                                  WELL_KNOWN_INSTANCE)
            if "Status" not in status or int(status.Status) != 0:
                log.error("storage commitment %s: report refused by %s", transaction, target[0])
        finally:
            assoc.release()

    def on_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        return on_report(self.db, event)
