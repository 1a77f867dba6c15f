"""Accepted associations wait for work instead of polling (node/internals/prompt.py), still end the
ways pynetdicom's own loops end them, and do not get a deep copy of the server's contexts."""

from __future__ import annotations

import threading
import time

import pytest
from pynetdicom.sop_class import Verification

from node.internals import prompt
from node.internals.prompt import PromptAssociation, PromptDUL
from node.scp.listener import Listen, ScreeningAssociationServer
from tests.conftest import RunningNode, free_port, listening, wait_for
from tests.dicomgen import make_instance
from tests.scu import associate, statuses, store


def accepted(node: RunningNode) -> list[object]:
    server = node.node.server
    assert server is not None
    return list(server.ae.active_associations)


def test_an_idle_association_wakes_only_to_check_its_timers(node: RunningNode,
                                                             monkeypatch: object) -> None:
    turns = {"dul": 0, "reactor": 0}
    original = PromptDUL._process_recv_primitive

    def counted(self: PromptDUL) -> bool:
        turns["dul"] += 1  # one per turn of the DUL thread's loop, however it waits
        return original(self)

    monkeypatch.setattr(PromptDUL, "_process_recv_primitive", counted)  # type: ignore[attr-defined]
    assoc = associate(node.port, contexts=[Verification])
    assert assoc.is_established
    try:
        assert wait_for(lambda: len(accepted(node)) == 1, 5)
        (theirs,) = accepted(node)
        assert type(theirs) is PromptAssociation and type(theirs.dul) is PromptDUL  # type: ignore[attr-defined]
        get_msg = theirs.dimse.get_msg  # type: ignore[attr-defined]

        def reactor_turn(*args: object, **kwargs: object) -> object:
            turns["reactor"] += 1  # one per turn of the reactor's loop
            return get_msg(*args, **kwargs)

        theirs.dimse.get_msg = reactor_turn  # type: ignore[attr-defined]
        assert assoc.send_c_echo().Status == 0x0000
        before = dict(turns)
        idle = 1.0
        time.sleep(idle)
        # pynetdicom's polling loops turn every millisecond (~1000 times here); these wake
        # for their timers every IDLE_WAIT (10 times), and on nothing else while idle. At
        # least a few times, or the timers (network timeout, ARTIM) are never looked at.
        expected = idle / prompt.IDLE_WAIT
        for thread in ("dul", "reactor"):
            woke = turns[thread] - before[thread]
            assert expected * 0.4 <= woke <= expected * 1.5, (thread, woke)
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


@pytest.mark.parametrize("preference", ["requestor", "node"])
def test_associations_share_the_servers_contexts_instead_of_copying_them(
        make_node: object, preference: str) -> None:
    node: RunningNode = make_node(  # type: ignore[operator]
        f'[dicom]\ntransfer_syntax_preference = "{preference}"\n')
    server = node.node.server
    assert server is not None
    (listener,) = server.listeners.values()
    first = associate(node.port, contexts=[Verification])
    second = associate(node.port, contexts=[Verification])
    try:
        assert first.is_established and second.is_established
        assert wait_for(lambda: len(accepted(node)) == 2, 5)
        lists = [theirs.acceptor.supported_contexts for theirs in accepted(node)]  # type: ignore[attr-defined]
        for contexts in lists:
            assert contexts is not listener.contexts  # each association has its own list
        if preference == "node":
            # pynetdicom's deep copy of the server's list per association gives the same
            # context objects (listener.SharedContexts), not copies of the 216.
            for contexts in lists:
                assert len(contexts) == len(listener.contexts) > 200
                assert all(a is b for a, b in zip(contexts, listener.contexts, strict=True))
        else:
            # The requestor-first handler's contexts: built once and shared (handlers.
            # ScpHandlers._context), not built again per association.
            [one], [other] = lists
            assert one is other and one.abstract_syntax == Verification
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
