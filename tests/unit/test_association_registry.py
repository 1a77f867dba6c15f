"""The one count of open associations behind the node's limits, and how an association
process asks for it over its channel."""

from __future__ import annotations

import socket
import threading

from node.policy.admission import DeviceView, Limits, PartitionPolicy
from node.processes.channel import Channel, RemoteAdmissions
from node.scp.registry import AssociationRegistry
from tests.conftest import wait_for


def partition(pid: int = 1, max_associations: int = 0) -> PartitionPolicy:
    return PartitionPolicy(id=pid, ae_title=f"P{pid}", port=104, folder="", enabled=True,
                           accept_any_device=True, auto_insert_devices=False,
                           default_remote_port=104, duplicate_policy="overwrite",
                           match_fields=(), max_associations=max_associations)


def device(did: int, limit: int = 0) -> DeviceView:
    return DeviceView(id=did, name=f"D{did}", ae_title=f"D{did}", enabled=True,
                      allow_storage=True, coercion_rules="", max_inbound_associations=limit)


def test_limits_count_the_associations_of_every_process() -> None:
    registry = AssociationRegistry(Limits(node=3, per_device=2))
    first, why = registry.admit(partition(), device(1), "D1", owner=0)
    assert first is not None and why is None
    assert registry.admit(partition(), device(1), "D1", owner=1)[0] is not None
    token, why = registry.admit(partition(), device(1), "D1", owner=2)
    assert token is None and why == "device 'D1' already has 2 associations (limit 2)"
    assert registry.admit(partition(), None, "US1", owner=2)[0] is not None
    token, why = registry.admit(partition(), None, "US2", owner=0)
    assert token is None and why == "the node already has 3 associations (limit 3)"
    registry.release(first)
    assert registry.admit(partition(), None, "US2", owner=0)[0] is not None


def test_a_partition_limit_and_a_process_that_ended() -> None:
    registry = AssociationRegistry(Limits(node=0, per_device=0))
    for _ in range(2):
        assert registry.admit(partition(1, max_associations=2), None, "A", owner=1)[0]
    token, why = registry.admit(partition(1, max_associations=2), None, "B", owner=0)
    assert token is None and why == "partition P1 already has 2 associations (limit 2)"
    assert registry.admit(partition(2, max_associations=2), None, "B", owner=0)[0]
    assert registry.open_by_owner() == {1: 2, 0: 1}
    # Its associations ended with it: they no longer count.
    assert registry.release_owner(1) == 2
    assert registry.admit(partition(1, max_associations=2), None, "B", owner=0)[0]


def answer_from(channel: Channel, registry: AssociationRegistry, owner: int) -> None:
    """What the main process does with an association process's messages."""
    while (received := channel.receive()) is not None:
        message, _ = received
        if message[0] == "admit":
            _, request, part, dev, calling = message
            channel.send("admitted", request, *registry.admit(part, dev, calling, owner=owner))
        elif message[0] == "release":
            registry.release(message[1])


def test_an_association_process_is_admitted_by_the_main_process_registry() -> None:
    registry = AssociationRegistry(Limits(node=1, per_device=0))
    main_side, theirs = Channel.pair()
    other_side = Channel(theirs)
    remote = RemoteAdmissions(other_side)
    threading.Thread(target=answer_from, args=(main_side, registry, 1), daemon=True).start()

    def read_answers() -> None:  # as processes/association.serve does
        while (received := other_side.receive()) is not None:
            message, _ = received
            if message[0] == "admitted":
                remote.answered(*message[1:])
        remote.close()

    reader = threading.Thread(target=read_answers, daemon=True)
    reader.start()
    token, why = remote.admit(partition(), None, "CT1")
    assert token is not None and why is None
    assert registry.open_by_owner() == {1: 1}
    assert remote.admit(partition(), None, "CT2") == (
        None, "the node already has 1 associations (limit 1)")
    remote.release(token)
    assert remote.admit(partition(), None, "CT2")[0] is not None
    # The main process is gone (its end of the channel closes with it): a clear refusal at
    # once, not after the admission's timeout.
    main_side.sock.shutdown(socket.SHUT_RDWR)
    main_side.close()
    reader.join(5)
    assert remote.admit(partition(), None, "CT3") == (None, "the node's main process is gone")
    other_side.close()


def test_an_admission_waiting_when_the_channel_closes_is_refused_at_once() -> None:
    main_side, theirs = Channel.pair()  # a main process that never answers
    remote = RemoteAdmissions(Channel(theirs))
    answers: list[tuple[int | None, str | None]] = []
    asking = threading.Thread(target=lambda: answers.append(
        remote.admit(partition(), None, "CT1")))
    asking.start()
    assert wait_for(lambda: remote._waiting)
    remote.close()
    asking.join(5)
    assert answers == [(None, "the node's main process is gone")]
    main_side.close()
