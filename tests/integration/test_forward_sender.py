"""One forwarding association: when the destination ends it, the job waiting to be sent is
tried again later (its data is fine); no response is lost to pynetdicom's reactor, and none
is taken for the answer to a later request; idle, its DUL thread waits instead of polling."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from node.forwarding.queue import Job
from node.forwarding.sender import Connection, Target
from node.internals import prompt
from node.internals.direct_send import Wire
from node.internals.prompt import PromptRequestorDUL
from node.scu.send import StoreSender
from tests.conftest import wait_for
from tests.destination import CountingSCP
from tests.dicomgen import write_study


def target(port: int, through_pynetdicom: bool = False) -> Target:
    """`through_pynetdicom`: every instance is decoded (private tags removed) and sent by
    pynetdicom's DIMSE layer, as on TLS, instead of written to the socket (direct_send.py)."""
    return Target(device_id=1, name="DEST", ae_title="DEST", address="127.0.0.1", port=port,
                  calling_ae="PACSNODE", max_pdu=0, acse_timeout=5, dimse_timeout=5,
                  network_timeout=5, connection_timeout=5, extra_syntaxes=(), heartbeat=True,
                  remove_private_tags=through_pynetdicom)


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
        with StoreSender(connection.assoc) as sender:
            [(_, outcome)] = list(sender.send_each([second]))
        assert outcome.broken and outcome.status is None, outcome
        # The next batch opens a new association and the job arrives.
        assert connection.send([second]).done == [2]
        assert sorted(dest.received) == sorted([first.sop_instance, second.sop_instance])
    finally:
        connection.close()
        dest.stop()


class ReactorInTheGap(threading.Event):
    """pynetdicom's reactor checkpoint, held at its worst moment once: the reactor has passed
    it (so a sender sees it paused) but polls the message queue only once a message is there.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self.set()
        self.assoc = assoc
        self.holding = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        if not self.holding.is_set():
            self.holding.set()
            until_a_message(self.assoc)
        return passed


def until_a_message(assoc: Association) -> None:
    deadline = time.monotonic() + 10
    while assoc.dimse.msg_queue.empty() and time.monotonic() < deadline:
        time.sleep(0.001)


def slow_to_wait(assoc: Association) -> None:
    """The sender, descheduled between sending its request and waiting for the response."""
    send_msg = assoc.dimse.send_msg

    def sent_then_descheduled(*args: Any) -> None:
        send_msg(*args)
        until_a_message(assoc)
        time.sleep(0.2)

    assoc.dimse.send_msg = sent_then_descheduled  # type: ignore[method-assign]


def test_a_response_arriving_as_the_reactor_polls_reaches_the_sender(tmp_path: Path) -> None:
    dest = CountingSCP().start()
    connection = Connection(target(dest.port, through_pynetdicom=True))
    try:
        (first,) = (job(1, path) for path in write_study(tmp_path, 1))
        assert connection._open([first]) is None
        assert connection.assoc is not None
        gap = ReactorInTheGap(connection.assoc)
        connection.assoc._reactor_checkpoint = gap
        assert gap.holding.wait(timeout=5)
        slow_to_wait(connection.assoc)
        started = time.monotonic()
        result = connection.send([first])
        # Had the reactor taken the response: a DIMSE timeout, the association aborted, a retry.
        assert result.done == [1], result
        assert time.monotonic() - started < 4  # the target's DIMSE timeout is 5 s
        assert connection.is_open
    finally:
        connection.close()
        dest.stop()


def test_a_stray_response_between_requests_is_not_the_next_ones_answer(tmp_path: Path) -> None:
    first_path, second_path = write_study(tmp_path, 2)
    first, second = job(1, first_path), job(2, second_path)
    dest = CountingSCP(refuse={second.sop_instance}).start()
    connection = Connection(target(dest.port, through_pynetdicom=True))
    try:
        assert connection.send([first]).done == [1]
        assert connection.assoc is not None
        # A second success for the first request, from a peer that answers twice.
        stray = C_STORE()
        stray.MessageIDBeingRespondedTo = 1
        stray.Status = 0x0000
        context_id = connection.assoc.accepted_contexts[0].context_id
        connection.assoc.dimse.msg_queue.put((context_id, stray))
        assert wait_for(lambda: connection.assoc is not None
                        and connection.assoc.dimse.msg_queue.empty(), timeout=5)
        # The destination refuses the second instance; taken for its answer, the stray
        # success would mark a job done that never arrived.
        result = connection.send([second])
        assert result.done == [] and [why for _, why in result.retry] == [
            "destination answered 0xA700"], result
    finally:
        connection.close()
        dest.stop()


@pytest.mark.parametrize("through_pynetdicom", [False, True])
def test_forwarded_stores_are_written_to_the_socket_by_the_sending_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, through_pynetdicom: bool) -> None:
    """Stored as the destination accepts them, instances go out on the DUL's lent socket
    (direct_send.Wire), written by the thread that sends them; pynetdicom's DIMSE layer sends
    only what must be decoded first. A pynetdicom change that breaks the loan would send every
    store the slow way without an error (node/internals/README.md)."""
    by_wire: list[int] = []
    by_pynetdicom: list[int] = []
    wire_send, pynetdicom_send = Wire.send, Association.send_c_store

    def counted_wire(self: Wire, *args: Any, **kwargs: Any) -> Any:
        by_wire.append(threading.get_ident())
        return wire_send(self, *args, **kwargs)

    def counted_pynetdicom(self: Association, *args: Any, **kwargs: Any) -> Any:
        by_pynetdicom.append(threading.get_ident())
        return pynetdicom_send(self, *args, **kwargs)

    monkeypatch.setattr(Wire, "send", counted_wire)
    monkeypatch.setattr(Association, "send_c_store", counted_pynetdicom)
    dest = CountingSCP().start()
    connection = Connection(target(dest.port, through_pynetdicom))
    try:
        jobs = [job(n, path) for n, path in enumerate(write_study(tmp_path, 3), 1)]
        assert connection.send(jobs).done == [1, 2, 3]
        assert sorted(dest.received) == sorted(j.sop_instance for j in jobs)
        me = threading.get_ident()
        if through_pynetdicom:
            assert (by_wire, by_pynetdicom) == ([], [me, me, me])
        else:
            assert (by_wire, by_pynetdicom) == ([me, me, me], [])
    finally:
        connection.close()
        dest.stop()


def test_an_idle_forwarding_association_waits_for_work_instead_of_polling(
        tmp_path: Path, monkeypatch: Any) -> None:
    turns = {"waits": 0, "looks": 0}
    wait, look = PromptRequestorDUL._wait_for_work, PromptRequestorDUL._is_transport_event

    def counted_wait(self: PromptRequestorDUL) -> None:
        turns["waits"] += 1
        wait(self)

    def counted_look(self: PromptRequestorDUL) -> bool:
        turns["looks"] += 1
        return look(self)

    monkeypatch.setattr(PromptRequestorDUL, "_wait_for_work", counted_wait)
    monkeypatch.setattr(PromptRequestorDUL, "_is_transport_event", counted_look)
    dest = CountingSCP().start()
    connection = Connection(target(dest.port))
    try:
        first, second = (job(n, path) for n, path in enumerate(write_study(tmp_path, 2), 1))
        assert connection.send([first]).done == [1]
        assert connection.assoc is not None
        assert type(connection.assoc.dul) is PromptRequestorDUL
        before = dict(turns)
        idle = 1.0
        time.sleep(idle)
        # pynetdicom's loop, with its delay at 0 and no wait, would turn thousands of times;
        # this one looks at the socket once per wait, a wait per IDLE_WAIT while idle: a few
        # at least, or its timers (network timeout, ARTIM) are never looked at.
        looks = turns["looks"] - before["looks"]
        expected = idle / prompt.IDLE_WAIT
        assert expected * 0.4 <= looks <= expected * 1.5, looks
        assert looks - 1 <= turns["waits"] - before["waits"] <= looks + 1
        # The next batch goes out on the same association.
        assert connection.send([second]).done == [2]
        assert connection.associations_opened == 1
        assert sorted(dest.received) == sorted([first.sop_instance, second.sop_instance])
    finally:
        connection.close()
        dest.stop()


def test_an_idle_forwarding_association_reactor_waits_instead_of_polling(
        tmp_path: Path) -> None:
    dest = CountingSCP().start()
    connection = Connection(target(dest.port))
    try:
        first, second = (job(n, path) for n, path in enumerate(write_study(tmp_path, 2), 1))
        assert connection.send([first]).done == [1]
        assoc = connection.assoc
        assert assoc is not None
        looks = []
        get_msg = assoc.dimse.get_msg

        def counted(*args: Any, **kwargs: Any) -> Any:
            looks.append(time.monotonic())
            return get_msg(*args, **kwargs)

        assoc.dimse.get_msg = counted  # type: ignore[method-assign]
        time.sleep(1.0)
        # pynetdicom's reactor looks at its message queue every millisecond (a thousand
        # times a second, each time taking the GIL); this one when its DUL acts, and once per
        # IDLE_WAIT to see its timers.
        assert 1 / prompt.IDLE_WAIT * 0.4 <= len(looks) <= 1 / prompt.IDLE_WAIT * 1.5, looks
        assert connection.send([second]).done == [2]  # and it still serves
    finally:
        connection.close()
        dest.stop()


def test_a_heartbeat_on_an_idle_association_is_not_held_up_by_its_reactor(
        tmp_path: Path) -> None:
    """A send_*() from the sender's thread waits until the association's reactor says it is
    paused: one waiting for its DUL's next action must say so at once, not when its wait
    (IDLE_WAIT) runs out."""
    dest = CountingSCP().start()
    connection = Connection(target(dest.port))
    try:
        (first,) = (job(1, path) for path in write_study(tmp_path, 1))
        assert connection.send([first]).done == [1]
        took = []
        for _ in range(5):
            time.sleep(prompt.IDLE_WAIT / 3)  # the reactor is waiting
            started = time.monotonic()
            connection.keepalive(interval=0, idle_limit=60)  # a C-ECHO now
            took.append(time.monotonic() - started)
            assert connection.is_open
        assert sorted(took)[2] < prompt.IDLE_WAIT / 5, took
    finally:
        connection.close()
        dest.stop()
