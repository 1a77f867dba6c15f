"""Seven `pacsnode serve` processes in a 3-level tree on loopback: a device change at a leaf
reaches every node; with the middle node stopped, changes on both sides of it converge once it
returns; recollect lists every node and marks a stopped one unreachable within its timeout."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from hierarchy.rpc import control_pb2 as pb
from hierarchy.rpc import control_pb2_grpc as rpc
from tests.conftest import free_port, wait_for

pytestmark = [pytest.mark.interop, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
PACSNODE = [sys.executable, "-m", "hierarchy.cli"]  # the `pacsnode` console script
RECOLLECT_TIMEOUT = 6.0

# node id -> parent id: a centre, two regions, four sites.
TREE = {"central": "", "north": "central", "south": "central", "n1": "north", "n2": "north",
        "s1": "south", "s2": "south"}


@dataclass
class Proc:
    name: str
    config: Path
    dicom_port: int
    control_port: int
    data: Path
    process: subprocess.Popen[str] | None = None
    log: list[Path] = field(default_factory=list)

    @property
    def ae(self) -> str:
        return self.name.upper()

    @property
    def control(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    def start(self) -> None:
        log = self.data.parent / f"{self.name}-{len(self.log)}.log"
        self.log.append(log)
        self.process = subprocess.Popen(
            [*PACSNODE, "serve", "--config", str(self.config)], cwd=ROOT, text=True,
            stdout=log.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)})

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*PACSNODE, *args, "--config", str(self.config)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    def query(self, sql: str) -> list[tuple[object, ...]]:
        with sqlite3.connect(self.data / "pacsnode.db", timeout=30) as db:
            return db.execute(sql).fetchall()

    def children(self) -> list[str]:
        try:
            answer = rpc.ControlStub(grpc.insecure_channel(self.control)).GetNodeInfo(
                pb.GetNodeInfoRequest(), timeout=2)
        except grpc.RpcError:
            return []
        return sorted(answer.children)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.log)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[dict[str, Proc]]:
    procs: dict[str, Proc] = {}
    for name in TREE:
        procs[name] = Proc(name, tmp_path / f"{name}.toml", free_port(), free_port(),
                           tmp_path / name)
    for name, parent in TREE.items():
        p = procs[name]
        parent_line = f'parent = "{procs[parent].control}"' if parent else ""
        p.config.write_text(f"""
[node]
name = "{name}"
data_dir = "{p.data}"
listen_host = "127.0.0.1"
shutdown_grace_seconds = 2
[bootstrap_partition]
ae_title = "{p.ae}"
port = {p.dicom_port}
[hierarchy]
site = "Site {name}"
control_listen = "{p.control}"
{parent_line}
heartbeat_seconds = 0.5
sync_seconds = 0.3
rpc_timeout = 2
recollect_timeout = {RECOLLECT_TIMEOUT}
""")
    for p in procs.values():
        p.start()
    try:
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def expected_children(name: str) -> list[str]:
    return sorted(child for child, parent in TREE.items() if parent == name)


def all_registered(procs: dict[str, Proc]) -> bool:
    return all(procs[name].children() == expected_children(name) for name in TREE
               if expected_children(name))


def replicated(p: Proc) -> list[tuple[object, ...]]:
    return p.query("select name, origin_node, version, deleted, payload from replicated_devices"
                   " order by name")


def shared_devices(p: Proc) -> list[tuple[object, ...]]:
    return p.query("select name, ae_title, host, port, device_type, description, origin_node"
                   " from devices where scope = 'hierarchy' order by name")


def converged(procs: dict[str, Proc], names: set[str]) -> bool:
    tables = [shared_devices(p) for p in procs.values()]
    return all(t == tables[0] for t in tables) and {row[0] for row in tables[0]} == names \
        and all(replicated(p) == replicated(procs["central"]) for p in procs.values())


def test_seven_node_tree(tree: dict[str, Proc]) -> None:
    assert wait_for(lambda: all_registered(tree), 60), "\n".join(p.logs() for p in tree.values())

    # A device added at a leaf reaches every node.
    added = tree["s2"].cli("device", "add", "MODALITY-X", "--host", "127.0.0.1", "--port",
                           "4104", "--scope", "hierarchy", "--description", "mobile CT")
    assert added.returncode == 0, added.stderr
    assert wait_for(lambda: converged(tree, {"MODALITY-X"}), 20)
    assert shared_devices(tree["n1"])[0] == (
        "MODALITY-X", "MODALITY-X", "127.0.0.1", 4104, "DICOM", "mobile CT", "s2")

    # Recollect from a leaf lists every node with its AE title and port, on every node.
    result = tree["n2"].cli("recollect", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    listed = {n["node"]["node_id"]: n for n in answer["nodes"]}
    assert set(listed) == set(TREE) and answer["published"] == 7
    for name, p in tree.items():
        entry = listed[name]
        assert entry["reachable"], entry
        assert entry["node"]["parent_id"] == TREE[name]
        assert [(q["ae_title"], q["port"]) for q in entry["node"]["partitions"]] == [
            (p.ae, p.dicom_port)]
    assert all(len(p.query("select * from directory_nodes")) == 7 for p in tree.values())

    # The middle node goes away; changes are made on both sides of it.
    north = tree["north"]
    north.stop()
    started = time.monotonic()
    result = tree["central"].cli("recollect", "--json")
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    listed = {n["node"]["node_id"]: n for n in json.loads(result.stdout)["nodes"]}
    assert not listed["north"]["reachable"] and listed["north"]["error"]
    assert took < RECOLLECT_TIMEOUT + 10  # it never hangs on the stopped node
    stored = dict(tree["central"].query("select node_id, reachable from directory_nodes"))
    assert stored["north"] == 0 and stored["n1"] == 0 and stored["s1"] == 1

    below = tree["n1"].cli("device", "add", "BELOW", "--host", "127.0.0.1", "--scope",
                           "hierarchy")
    above = tree["central"].cli("device", "add", "ABOVE", "--host", "127.0.0.1", "--scope",
                                "hierarchy")
    assert below.returncode == 0 and above.returncode == 0
    # The same record edited on both sides: the later edit wins everywhere.
    assert tree["n1"].cli("device", "edit", "MODALITY-X", "--port", "1111").returncode == 0
    time.sleep(0.05)
    assert tree["s1"].cli("device", "edit", "MODALITY-X", "--port", "2222").returncode == 0
    assert wait_for(lambda: {r[0] for r in shared_devices(tree["s2"])} ==
                    {"MODALITY-X", "ABOVE"}, 20)
    assert {r[0] for r in shared_devices(tree["n2"])} == {"MODALITY-X"}  # cut off

    north.start()
    assert wait_for(lambda: converged(tree, {"MODALITY-X", "ABOVE", "BELOW"}), 40), \
        north.logs()
    assert tree["n2"].query("select port from devices where name = 'MODALITY-X'") == [(2222,)]

    status = tree["s1"].cli("hierarchy", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert {e["node"]["node_id"] for e in json.loads(status.stdout)
            if e["reachable"]} == set(TREE)
