"""Accepted associations wait for work instead of polling (node/scp/prompt.py), still end the
ways pynetdicom's own loops end them, and do not get a deep copy of the server's contexts."""

from __future__ import annotations

import copy
import threading
import time

from pynetdicom.sop_class import Verification

from node.scp import prompt
from node.scp.listener import Listen, ScreeningAssociationServer
from node.scp.prompt import PromptAssociation, PromptDUL
from tests.conftest import RunningNode, free_port, listening, wait_for
from tests.dicomgen import make_instance
from tests.scu import associate, statuses, store


def accepted(node: RunningNode) -> list[object]:
    server = node.node.server
    assert server is not None
    return list(server.ae.active_associations)


def test_an_idle_association_wakes_only_to_check_its_timers(node: RunningNode,
                                                             monkeypatch: object) -> None:
    waits = {"dul": 0}
    original = PromptDUL._wait_for_work

    def counted(self: PromptDUL) -> None:
        waits["dul"] += 1
        original(self)

    monkeypatch.setattr(PromptDUL, "_wait_for_work", counted)  # type: ignore[attr-defined]
    assoc = associate(node.port, contexts=[Verification])
    assert assoc.is_established
    try:
        assert wait_for(lambda: len(accepted(node)) == 1, 5)
        (theirs,) = accepted(node)
        assert type(theirs) is PromptAssociation and type(theirs.dul) is PromptDUL  # type: ignore[attr-defined]
        assert assoc.send_c_echo().Status == 0x0000
        before = waits["dul"]
        time.sleep(0.5)
        # pynetdicom's polling loop turns every millisecond (~500 times here); this one wakes
        # for its timers every IDLE_WAIT (50 times), and on nothing else while idle.
        assert waits["dul"] - before <= 0.5 / prompt.IDLE_WAIT * 1.5
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert wait_for(lambda: not accepted(node), 5)


def test_stores_then_release_and_abort_end_the_association(node: RunningNode) -> None:
    assert statuses(store(node.port, [make_instance() for _ in range(5)])) == [0] * 5
    assert wait_for(lambda: not accepted(node), 5)
    assoc = associate(node.port, contexts=[Verification])
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.abort()
    assert wait_for(lambda: not accepted(node), 5)


def test_associations_share_the_servers_contexts_instead_of_copying_them(
        node: RunningNode) -> None:
    server = node.node.server
    assert server is not None
    (listener,) = server.listeners.values()
    first = associate(node.port, contexts=[Verification])
    second = associate(node.port, contexts=[Verification])
    try:
        assert first.is_established and second.is_established
        assert wait_for(lambda: len(accepted(node)) == 2, 5)
        shared = {id(cx) for cx in listener.contexts}
        for theirs in accepted(node):
            # The requestor-first handler gave each its own list of new contexts; neither
            # association got a deep copy of the server's 178.
            assert theirs.acceptor.supported_contexts is not listener.contexts  # type: ignore[attr-defined]
        copied = copy.deepcopy(listener.contexts)  # what pynetdicom does per association
        assert copied is not listener.contexts and {id(cx) for cx in copied} == shared
    finally:
        first.release()
        second.release()


def test_a_listener_ends_when_shut_down_not_at_its_next_poll(node: RunningNode) -> None:
    # A node's stop, or a partition's port taken away, shuts its listener down: socketserver's
    # own accept loop only notices at its next poll. Here that poll would be an hour away.
    server = node.node.server
    assert server is not None
    listener = server._server(Listen(free_port(), False), ScreeningAssociationServer)
    serving = threading.Thread(target=listener.serve_forever, args=(3600,), daemon=True)
    serving.start()
    # It serves: no partition has this port, so the association is rejected, as it should be.
    assert associate(listener.server_address[1], contexts=[Verification]).is_rejected
    closing = threading.Thread(target=listener.shutdown, daemon=True)
    closing.start()
    closing.join(5)
    serving.join(5)
    assert not closing.is_alive() and not serving.is_alive()
    assert not listening(listener.server_address[1])
