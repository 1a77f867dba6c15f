"""A forwarding association that the destination ends between two jobs: the job waiting to
be sent is tried again later, never failed for good (its data is fine)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian

from node.forwarding.queue import Job
from node.forwarding.sender import Connection, Target
from tests.conftest import wait_for
from tests.destination import CountingSCP
from tests.dicomgen import write_study


def target(port: int) -> Target:
    return Target(device_id=1, name="DEST", ae_title="DEST", address="127.0.0.1", port=port,
                  calling_ae="PACSNODE", max_pdu=0, acse_timeout=5, dimse_timeout=5,
                  network_timeout=5, connection_timeout=5, extra_syntaxes=(), heartbeat=True,
                  remove_private_tags=False)


def job(number: int, path: Path) -> Job:
    ds = dcmread(path, stop_before_pixels=True)
    return Job(id=number, device_id=1, path=path, sop_class=str(ds.SOPClassUID),
               sop_instance=str(ds.SOPInstanceUID), transfer_syntax=ExplicitVRLittleEndian,
               attempts=0)


def test_a_job_on_an_association_the_destination_ended_is_retried(tmp_path: Path) -> None:
    dest = CountingSCP().start()
    connection = Connection(target(dest.port))
    try:
        first, second = (job(n, path) for n, path in enumerate(write_study(tmp_path, 2), 1))
        assert connection.send([first]).done == [1]
        assert connection.is_open  # kept for the next batch (heartbeat)
        assert dest._server is not None
        for assoc in dest._server.active_associations:
            assoc.abort()
        assert wait_for(lambda: not connection.is_open)
        # What a sender task in the middle of a batch meets: the next job of the batch.
        outcome = connection._send_one(second)
        assert outcome.startswith("broken:"), outcome
        # The next batch opens a new association and the job arrives.
        assert connection.send([second]).done == [2]
        assert sorted(dest.received) == sorted([first.sop_instance, second.sop_instance])
    finally:
        connection.close()
        dest.stop()
