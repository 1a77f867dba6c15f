"""pacsnode names itself, not pynetdicom: the implementation class UID and version name of the
associations it accepts and requests, and of the file meta of the files it stores."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove, Verification

from node.implementation import IMPLEMENTATION_CLASS_UID, implementation_version_name
from tests.conftest import RunningNode, dcmtk_env, free_port, listening, stored_files, wait_for
from tests.dicomgen import make_instance
from tests.integration.test_direct_store import store_in_fragments
from tests.scu import associate, identifier, statuses, store

# What is asserted sits above the index: one backend is enough.
pytestmark = pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)


def test_associations_the_node_accepts_name_pacsnode(node: RunningNode) -> None:
    assoc = associate(node.port, contexts=[Verification])
    assert assoc.is_established
    acceptor = assoc.acceptor
    assoc.release()
    assert acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert acceptor.implementation_version_name == implementation_version_name()


def test_files_the_node_stores_name_pacsnode_on_either_receive_path(node: RunningNode) -> None:
    # The direct receiver (node/internals/direct_store.py) writes the file meta itself ...
    assert statuses(store(node.port, [make_instance()])) == [0]
    # ... and pynetdicom writes it for a C-STORE the direct receiver leaves to it (a command
    # set in two fragments).
    sop, data = store_in_fragments(node)
    files = stored_files(node.storage)
    assert len(files) == 2
    for path in files:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID, path
        assert meta.ImplementationVersionName == implementation_version_name(), path
    (pynetdicoms,) = [p for p in files if p.name == f"{sop}.dcm"]
    assert pynetdicoms.read_bytes().endswith(data)  # the data set as sent, nothing re-encoded


class Storescp:
    """DCMTK storescp in debug mode: it prints the implementation of every requestor."""

    def __init__(self, folder: Path, dcmtk: Path) -> None:
        self.port = free_port()
        folder.mkdir()
        self.log = folder.parent / "storescp.log"
        self.process = subprocess.Popen(
            [str(dcmtk / "storescp"), "-d", "+xa", "-aet", "DEST", "-od", str(folder),
             str(self.port)], env=dcmtk_env(), stdout=self.log.open("w"),
            stderr=subprocess.STDOUT)
        assert wait_for(lambda: listening(self.port), timeout=10)
        self.folder = folder

    def requestors(self) -> list[tuple[str, str]]:
        """(implementation class UID, version name) of each association requested of it
        (bare TCP connections, which storescp lists with neither, left out)."""
        requests = re.findall(r"BEGIN A-ASSOCIATE-RQ(.*?)END A-ASSOCIATE-RQ",
                              self.log.read_text(errors="replace"), re.DOTALL)
        found = [(re.search(r"Their Implementation Class UID:[ \t]*(\S*)", rq),
                  re.search(r"Their Implementation Version Name:[ \t]*(\S*)", rq))
                 for rq in requests]
        pairs = [(uid.group(1), name.group(1)) for uid, name in found if uid and name]
        return [pair for pair in pairs if any(pair)]


@pytest.fixture
def storescp(tmp_path: Path, dcmtk: Path) -> Iterator[Storescp]:
    scp = Storescp(tmp_path / "received", dcmtk)
    yield scp
    scp.process.terminate()
    scp.process.wait(timeout=10)


@pytest.mark.interop
def test_associations_the_node_requests_name_pacsnode(node: RunningNode,
                                                      storescp: Storescp) -> None:
    ours = (IMPLEMENTATION_CLASS_UID, implementation_version_name())
    # `device echo`
    assert node.cli("device", "add", "DEST", "--host", "127.0.0.1", "--port",
                    str(storescp.port)).exit_code == 0
    assert node.cli("device", "echo", "DEST").exit_code == 0
    assert wait_for(lambda: storescp.requestors() == [ours])
    # C-MOVE sub-operations
    instance = make_instance()
    assert statuses(store(node.port, [instance])) == [0]
    assoc = associate(node.port, contexts=[StudyRootQueryRetrieveInformationModelMove])
    query = identifier("STUDY", {"StudyInstanceUID": instance.StudyInstanceUID})
    *_, final = [status for status, _ in assoc.send_c_move(
        query, "DEST", StudyRootQueryRetrieveInformationModelMove)]
    assoc.release()
    assert int(final.Status) == 0
    assert wait_for(lambda: storescp.requestors() == [ours] * 2)
    # forwarding
    assert node.cli("device", "edit", "DEST", "--type", "BACKUP_TARGET").exit_code == 0
    assert statuses(store(node.port, [make_instance()])) == [0]
    assert wait_for(lambda: len(list(storescp.folder.iterdir())) == 2, timeout=20)
    assert storescp.requestors() == [ours] * 3
