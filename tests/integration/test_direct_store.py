"""C-STORE requests taken off the wire by the DUL (node/internals/direct_store.py): stored and
answered as pynetdicom would, what it does not claim still served by pynetdicom, and a
data set cut off or broken mid-transfer aborts only its own association and leaves nothing."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from sqlalchemy import select

from node.db.models import Instance
from node.internals import direct_store, prompt
from node.scp.handlers import ScpHandlers
from node.storage import files
from tests import hostile
from tests.conftest import RunningNode, incoming_files, stored_files, wait_for
from tests.dicomgen import make_instance, uid
from tests.hostile import RawPeer, is_abort
from tests.scu import statuses, store

# The receiver sits below the index: one backend is enough.
pytestmark = pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)


@pytest.fixture
def direct_stores(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """SOP instance UIDs stored through the direct receiver (not pynetdicom's EVT_C_STORE)."""
    seen: list[str] = []
    original = ScpHandlers.on_direct_store

    def counting(self: ScpHandlers, assoc: object, request: object, received: Path
                 ) -> tuple[int, str, files.DeferredSync | None]:
        seen.append(request.sop_instance)  # type: ignore[attr-defined]
        return original(self, assoc, request, received)  # type: ignore[arg-type]

    monkeypatch.setattr(ScpHandlers, "on_direct_store", counting)
    return seen


def indexed(node: RunningNode) -> list[str]:
    with node.db.session() as s:
        return list(s.scalars(select(Instance.sop_instance_uid)))


def ct_peer(node: RunningNode, max_pdu: int = 16382) -> RawPeer:
    peer = RawPeer(node.port, timeout=5)
    answer = peer.associate(hostile.associate_rq(abstract_syntaxes=(CTImageStorage,),
                                                 max_pdu=max_pdu))
    assert answer[:1] == b"\x02", f"no A-ASSOCIATE-AC: {answer[:16]!r}"
    return peer


def instance_bytes(size: int = 64) -> tuple[str, bytes]:
    ds = make_instance(size=size)
    return str(ds.SOPInstanceUID), hostile.encode(ds)


def test_stores_from_a_sender_go_through_the_direct_receiver(
        node: RunningNode, direct_stores: list[str]) -> None:
    datasets = [make_instance(size=512), make_instance(), make_instance()]
    assert statuses(store(node.port, datasets)) == [0, 0, 0]
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    assert direct_stores == sent
    assert sorted(indexed(node)) == sorted(sent)
    # Each temporary file is removed once its answer is sent.
    assert wait_for(lambda: incoming_files(node.storage) == [], 5)
    assert incoming_files(node.storage) == []


@pytest.mark.parametrize("writeback_every", [direct_store.WRITEBACK_EVERY, 8192])
def test_the_stored_file_holds_the_data_set_as_sent(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch, writeback_every: int) -> None:
    monkeypatch.setattr(direct_store, "WRITEBACK_EVERY", writeback_every)
    writebacks: list[int] = []
    real = files.start_writeback

    def spy(fd: int, offset: int = 0, count: int = 0) -> None:
        writebacks.append(os.fstat(fd).st_size)
        real(fd, offset, count)

    monkeypatch.setattr(files, "start_writeback", spy)
    sop, data = instance_bytes(size=256)  # 128 KiB: many PDUs
    with ct_peer(node) as peer:
        peer.send(hostile.store_request(data, CTImageStorage, sop, 1, max_pdu=4096))
        (answer,) = hostile.command_sets(peer.read_pdu())
    assert int(answer.Status) == 0 and answer.AffectedSOPInstanceUID == sop
    (stored,) = stored_files(node.storage)
    assert stored.read_bytes().endswith(data)
    # Pages go to disk while the data set arrives (every 8 KiB here), and the last ones as
    # soon as it is complete, before the store checks and fsyncs it.
    assert writebacks[-1] == stored.stat().st_size
    gaps = [after - before for before, after in zip([0, *writebacks[:-1]], writebacks, strict=True)]
    pdu_and_meta = 4096 + 512
    assert all(0 < gap <= writeback_every + pdu_and_meta for gap in gaps), gaps


def test_pdus_that_arrive_in_pieces_are_read_whole(node: RunningNode) -> None:
    """A PDU is read with as few calls as the socket allows (pdu_guard._recv_exactly), which
    must still gather one that arrives in many pieces, headers split included."""
    sop, data = instance_bytes(size=128)  # 32 KiB: several PDUs of up to 16 KiB
    stream = hostile.store_request(data, CTImageStorage, sop, 1, max_pdu=16382)
    with ct_peer(node) as peer:
        peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(stream), 3001):  # 3001: no piece ends on a PDU boundary
            peer.send(stream[start:start + 3001])
            time.sleep(0.002)
        (answer,) = hostile.command_sets(peer.read_pdu())
    assert int(answer.Status) == 0 and answer.AffectedSOPInstanceUID == sop
    (stored,) = stored_files(node.storage)
    assert stored.read_bytes().endswith(data)


def test_stores_sent_back_to_back_in_one_write_are_all_answered_at_once(
        node: RunningNode, direct_stores: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One receive takes several PDUs off the socket; the DUL serves the ones read ahead
    without waiting for the socket (which holds no more) or for its idle timer."""
    monkeypatch.setattr(prompt, "IDLE_WAIT", 60.0)  # longer than the peer waits
    instances = [instance_bytes() for _ in range(3)]
    with ct_peer(node) as peer:
        peer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer.send(b"".join(hostile.store_request(data, CTImageStorage, sop, 1, message_id=i + 1)
                           for i, (sop, data) in enumerate(instances)))
        answers = [answer for _ in instances for answer in hostile.command_sets(peer.read_pdu())]
    assert [(int(a.Status), a.AffectedSOPInstanceUID) for a in answers] == \
        [(0, sop) for sop, _ in instances]
    assert direct_stores == [sop for sop, _ in instances]
    for sop, data in instances:
        (stored,) = [p for p in stored_files(node.storage) if p.stem == sop]
        assert stored.read_bytes().endswith(data)


def test_the_next_temporary_file_is_made_while_the_peer_prepares_its_next_store(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Path] = []  # the temporary files the receiver made, in order
    original = direct_store.DirectStore._new_file

    def recording(self: direct_store.DirectStore) -> tuple[object, Path]:
        file, path = original(self)
        made.append(path)
        return file, path

    monkeypatch.setattr(direct_store.DirectStore, "_new_file", recording)
    instances = [instance_bytes() for _ in range(4)]

    def store_one(peer: RawPeer, index: int) -> None:
        sop, data = instances[index]
        peer.send(hostile.store_request(data, CTImageStorage, sop, 1, message_id=index + 1))
        (answer,) = hostile.command_sets(peer.read_pdu())
        assert int(answer.Status) == 0 and answer.AffectedSOPInstanceUID == sop
        (stored,) = [p for p in stored_files(node.storage) if p.stem == sop]
        assert stored.read_bytes().endswith(data)

    def spare_made(count: int) -> Path:
        """After an answer: the store's own file is removed and a spare is made."""
        assert wait_for(lambda: len(made) == count and incoming_files(node.storage) == [made[-1]],
                        5), (made, incoming_files(node.storage))
        assert made[-1].stat().st_size == 0
        return made[-1]

    with ct_peer(node) as peer:
        store_one(peer, 0)  # no spare yet: one file made for it, then the spare
        spare_made(2)
        store_one(peer, 1)  # received into the spare: only the next spare is made
        spare = spare_made(3)
        time.sleep(direct_store.SPARE_MAX_AGE + 0.2)
        store_one(peer, 2)  # too old for the storage monitor's sweep to be ruled out: a new one
        assert not spare.exists()
        spare_made(5).unlink()  # as someone might
        store_one(peer, 3)  # gone: a new one
        spare_made(7)
    assert sorted(indexed(node)) == sorted(sop for sop, _ in instances)
    assert wait_for(lambda: incoming_files(node.storage) == [], 5)  # the spare goes too


def test_the_answer_goes_out_before_the_directory_fsync_and_the_data_stays_until_it(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """The series directory's fsync runs while the peer prepares its next store; until it is
    done, the fsynced temporary file is kept (the start-up check restores from it)."""
    ds = make_instance()
    in_fsync, release = threading.Event(), threading.Event()
    seen: list[list[Path]] = []  # what .incoming held while the series directory was synced
    original = files.fsync_dir

    def holding(path: Path) -> None:
        if path.name == series:
            seen.append(incoming_files(node.storage))
            in_fsync.set()
            release.wait(10)
        original(path)
        if path.name == series:
            in_fsync.clear()

    sop, series = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
    data = hostile.encode(ds)
    monkeypatch.setattr(files, "fsync_dir", holding)
    try:
        with ct_peer(node) as peer:
            peer.send(hostile.store_request(data, CTImageStorage, sop, 1))
            (answer,) = hostile.command_sets(peer.read_pdu())
            assert int(answer.Status) == 0
            # Answered before the fsync ended (it is held until `release`), not after it.
            assert in_fsync.wait(5)
            (stored,) = [p for p in stored_files(node.storage) if p.stem == sop]
            assert stored.read_bytes().endswith(data)
            (kept,) = [p for p in seen[0] if files.same_file(p, stored)]
            release.set()
            # Then the temporary file goes (only the next store's spare is left).
            assert wait_for(lambda: not kept.exists() and not in_fsync.is_set(), 5)
    finally:
        release.set()
    assert indexed(node) == [sop]
    assert len(seen) == 1


def test_a_series_directory_is_fsynced_once_for_a_batch_of_stores(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch, synced_directories: list[Path]
        ) -> None:
    syncs = node.node.server.handlers.directory_syncs  # type: ignore[union-attr]
    monkeypatch.setattr(syncs, "delay", 30.0)  # nothing made until the test flushes
    synced = synced_directories
    study, series = uid(), uid()
    datasets = [make_instance(study_uid=study, series_uid=series) for _ in range(5)]
    assert statuses(store(node.port, datasets)) == [0] * 5
    stored = [p for p in stored_files(node.storage) if p.parent.name == series]
    assert len(stored) == 5 and sorted(indexed(node)) == sorted(
        str(ds.SOPInstanceUID) for ds in datasets)
    series_dir = stored[0].parent
    # Answered and indexed; each file's temporary copy is kept until its entry is durable.
    assert series_dir not in synced
    assert all(any(files.same_file(p, kept) for kept in incoming_files(node.storage))
               for p in stored)

    syncs.flush()

    assert synced.count(series_dir) == 1
    assert incoming_files(node.storage) == []


def test_command_and_data_in_one_pdu_are_stored(node: RunningNode) -> None:
    sop, data = instance_bytes()
    command = hostile.command(CommandField=0x0001, MessageID=9, Priority=0,
                              CommandDataSetType=0x0000, AffectedSOPClassUID=CTImageStorage,
                              AffectedSOPInstanceUID=sop)
    one = hostile.p_data(1, 0x03, command)
    two = hostile.p_data(1, 0x02, data)
    items = one[6:] + two[6:]
    with ct_peer(node) as peer:
        peer.send(hostile.pdu_header(0x04, len(items)) + items)
        (answer,) = hostile.command_sets(peer.read_pdu())
    assert int(answer.Status) == 0 and int(answer.MessageIDBeingRespondedTo) == 9
    assert indexed(node) == [sop]


def test_a_store_sent_at_once_after_the_accept_is_claimed_before_the_reactor_goes_on(
        node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom's reactor marks the association established only after it has queued the
    # A-ASSOCIATE-AC; a quick peer's first store can arrive before that. Here the reactor is
    # held after the accept until the store is done (2 s at most), which makes that race certain.
    stored = threading.Event()
    original_accept, original_store = ACSE.send_accept, ScpHandlers.on_direct_store

    def slow_accept(self: ACSE) -> None:
        original_accept(self)
        stored.wait(2)

    def store_then_release(self: ScpHandlers, *args: object) -> object:
        try:
            return original_store(self, *args)  # type: ignore[arg-type]
        finally:
            stored.set()

    monkeypatch.setattr(ACSE, "send_accept", slow_accept)
    monkeypatch.setattr(ScpHandlers, "on_direct_store", store_then_release)
    sop, data = instance_bytes()
    with ct_peer(node) as peer:
        peer.send(hostile.store_request(data, CTImageStorage, sop, 1))
        (answer,) = hostile.command_sets(peer.read_pdu())
    assert int(answer.Status) == 0
    assert stored.is_set() and indexed(node) == [sop]


def store_in_fragments(node: RunningNode) -> tuple[str, bytes]:
    """A C-STORE whose command set comes in two fragments (the direct receiver leaves it to
    pynetdicom), answered success; its SOP Instance UID and data set."""
    sop, data = instance_bytes()
    command = hostile.command(CommandField=0x0001, MessageID=3, Priority=0,
                              CommandDataSetType=0x0000, AffectedSOPClassUID=CTImageStorage,
                              AffectedSOPInstanceUID=sop)
    with ct_peer(node) as peer:
        peer.send(hostile.p_data(1, 0x01, command[:20]) + hostile.p_data(1, 0x03, command[20:])
                  + hostile.p_data(1, 0x02, data))
        (answer,) = hostile.command_sets(peer.read_pdu())
    assert int(answer.Status) == 0
    return sop, data


def test_a_command_set_in_two_fragments_is_served_by_pynetdicom(
        node: RunningNode, direct_stores: list[str]) -> None:
    sop, _ = store_in_fragments(node)
    assert indexed(node) == [sop] and direct_stores == []


def test_a_peer_with_a_tiny_maximum_pdu_gets_its_answer_in_fragments(
        node: RunningNode, direct_stores: list[str]) -> None:
    sop, data = instance_bytes()
    with ct_peer(node, max_pdu=128) as peer:
        peer.send(hostile.store_request(data, CTImageStorage, sop, 1))
        received = b""
        while not hostile.command_sets(received):
            pdu = peer.read_pdu()
            assert pdu[:1] == b"\x04" and len(pdu) <= 6 + 128
            received += pdu
    (answer,) = hostile.command_sets(received)
    assert int(answer.Status) == 0
    assert indexed(node) == [sop] and direct_stores == []


def test_a_failure_is_answered_with_its_status_and_comment(node: RunningNode) -> None:
    sop, data = instance_bytes()
    with ct_peer(node) as peer:
        # The request names another instance than the data set holds.
        peer.send(hostile.store_request(data, CTImageStorage, "1.2.3.4", 1))
        (answer,) = hostile.command_sets(peer.read_pdu())
        assert int(answer.Status) == 0xC002
        assert answer.ErrorComment.startswith("dataset SOP Instance")  # cut to 64 (LO)
        # The association goes on serving.
        peer.send(hostile.store_request(data, CTImageStorage, sop, 1, message_id=2))
        (answer,) = hostile.command_sets(peer.read_pdu())
        assert int(answer.Status) == 0
    assert indexed(node) == [sop]


BROKEN = {
    "a command PDV inside the data set": lambda command: hostile.p_data(1, 0x03, command),
    "a data PDV of another context": lambda command: hostile.p_data(3, 0x02, b"\0" * 8),
    # (the data set is answered, as broken, before the stray PDV is read)
    "a PDV after the last fragment": lambda command: _two_items(
        hostile.p_data(1, 0x02, b"\0" * 4), hostile.p_data(1, 0x00, b"\0" * 4)),
}


def _two_items(first: bytes, second: bytes) -> bytes:
    items = first[6:] + second[6:]
    return hostile.pdu_header(0x04, len(items)) + items


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_data_set_aborts_its_association_only(
        node: RunningNode, bystander: Association, name: str) -> None:
    sop, data = instance_bytes()
    command = hostile.command(CommandField=0x0001, MessageID=1, Priority=0,
                              CommandDataSetType=0x0000, AffectedSOPClassUID=CTImageStorage,
                              AffectedSOPInstanceUID=sop)
    with ct_peer(node) as peer:
        peer.send(hostile.p_data(1, 0x03, command) + hostile.p_data(1, 0x00, data[:100])
                  + BROKEN[name](command))
        answer = peer.read_pdu()
        while answer[:1] == b"\x04":
            answer = peer.read_pdu()
        assert is_abort(answer), name
    assert indexed(node) == []
    assert wait_for(lambda: incoming_files(node.storage) == [])


@pytest.mark.parametrize("ending", ["release", "abort", "close"])
def test_a_data_set_cut_off_leaves_no_file(node: RunningNode, bystander: Association,
                                           ending: str) -> None:
    sop, data = instance_bytes(size=256)
    command = hostile.command(CommandField=0x0001, MessageID=1, Priority=0,
                              CommandDataSetType=0x0000, AffectedSOPClassUID=CTImageStorage,
                              AffectedSOPInstanceUID=sop)
    with ct_peer(node) as peer:
        peer.send(hostile.p_data(1, 0x03, command) + hostile.p_data(1, 0x00, data[:4000]))
        assert wait_for(lambda: len(incoming_files(node.storage)) == 1)
        if ending == "release":
            peer.send(hostile.pdu_header(0x05, 4) + b"\0" * 4)
            peer.read_pdu()
        elif ending == "abort":
            peer.send(hostile.pdu_header(0x07, 4) + b"\0\0\0\0")
    assert wait_for(lambda: incoming_files(node.storage) == [])
    assert indexed(node) == []
