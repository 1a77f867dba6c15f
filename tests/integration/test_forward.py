"""Forwarding from a child node to its parent and to DCMTK storescp backup targets."""

from __future__ import annotations

import json

from sqlalchemy import select

from node.db.models import ForwardJob, Instance
from tests.conftest import RunningNode, wait_for
from tests.dicomgen import write_study
from tests.integration.test_retrieve import body
from tests.scu import statuses, store

FAST = """
[forwarding]
poll_seconds = 0.1
retry_base_seconds = 0.2
retry_max_seconds = 1
heartbeat_interval = 0.5
heartbeat_idle_seconds = 30
"""


def jobs(node: RunningNode) -> list[ForwardJob]:
    with node.db.session() as session:
        return list(session.scalars(select(ForwardJob).order_by(ForwardJob.id)))


def instances(node: RunningNode) -> dict[str, str]:
    with node.db.session() as session:
        return {i.sop_instance_uid: i.path for i in session.scalars(select(Instance))}


def test_child_forwards_to_parent_byte_identical(make_node: object, tmp_path) -> None:
    parent = make_node(FAST, name="parent")  # type: ignore[operator]
    child = make_node(FAST, name="child")  # type: ignore[operator]
    assert child.cli("device", "add", "PARENT", "--ae-title", "PACSNODE", "--type", "PARENT",
                     "--host", "127.0.0.1", "--port", str(parent.port)).exit_code == 0
    files = write_study(tmp_path / "in", 5)
    assert statuses(store(child.port, files)) == [0] * 5
    assert len(jobs(child)) == 5  # queued in the transaction that indexed them
    assert wait_for(lambda: all(j.state == "done" for j in jobs(child)), timeout=20)
    at_parent, at_child = instances(parent), instances(child)
    assert set(at_parent) == set(at_child)
    for sop, path in at_child.items():
        assert body(parent.storage / at_parent[sop]) == body(child.storage / path)
    listed = json.loads(child.cli("queue", "list", "--json", "--state", "done").output)
    assert len(listed) == 5
