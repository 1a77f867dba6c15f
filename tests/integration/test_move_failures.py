"""A C-MOVE whose destination cannot be associated with: the node's log and its activity row
say which destination, where, and why (node/scp/qr.py, node/scu/failure.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from pynetdicom import AE, AllStoragePresentationContexts

from tests.conftest import RunningNode, free_port
from tests.dicomgen import make_instance, uid
from tests.integration.test_activity import recorded
from tests.integration.test_retrieve import move
from tests.scu import statuses, store

# Nothing here depends on the index backend.
pytestmark = pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)


def stored_study(node: RunningNode) -> str:
    study = uid()
    assert statuses(store(node.port, [make_instance(study_uid=study)])) == [0]
    return study


def failed_move(node: RunningNode, caplog: pytest.LogCaptureFixture, destination: str,
                study: str) -> tuple[str, str]:
    """The node's error line about the move and its activity row's detail."""
    (final,) = move(node, "STUDY", destination=destination, StudyInstanceUID=study)
    assert int(final.Status) == 0xA801
    lines = [r.getMessage() for r in caplog.records
             if r.name == "node.scp.qr" and r.levelno == logging.ERROR]
    assert len(lines) == 1, lines
    (row,) = recorded(node, kind="move")
    assert (row.outcome, row.count, row.failed) == ("failed", 1, 1)
    return lines[0], row.detail


def test_a_destination_with_nothing_listening_is_named_with_the_reason(
        node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    assert node.cli("device", "add", "DOWN", "--host", "127.0.0.1", "--port",
                    str(port)).exit_code == 0
    line, detail = failed_move(node, caplog, "DOWN", stored_study(node))
    where = f"DOWN at 127.0.0.1:{port}: Connection refused"
    assert line.endswith(f"cannot send to destination {where}"), line
    assert detail.endswith(f"destination {where} not reached"), detail


@pytest.fixture
def picky_destination() -> Iterator[int]:
    """A storage SCP that knows only its own AE title (another peer than the node's own)."""
    ae = AE(ae_title="PICKY")
    ae.require_called_aet = True
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


def test_a_destination_that_rejects_is_named_with_its_reason(
        node: RunningNode, caplog: pytest.LogCaptureFixture, picky_destination: int) -> None:
    # A device whose AE title is not the one the destination answers to.
    assert node.cli("device", "add", "NOTPICKY", "--host", "127.0.0.1",
                    "--port", str(picky_destination)).exit_code == 0
    line, detail = failed_move(node, caplog, "NOTPICKY", stored_study(node))
    where = f"NOTPICKY at 127.0.0.1:{picky_destination}: rejected (Rejected Permanent, Service" \
            " User: Called AE title not recognised)"
    assert line.endswith(f"cannot send to destination {where}"), line
    assert detail.endswith(f"destination {where} not reached"), detail
