"""`pacsnode serve --trace-dicom`: every association's A-ASSOCIATE, DIMSE messages, release and
abort in the node's log, for stores, queries, retrieves and forwarding with DCMTK peers; none
when the trace is off, and only the chosen AE titles' with --trace-dicom-ae."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import dcmtk_env, free_port, run_cli, wait_for, wait_listening
from tests.dicomgen import write_study

pytestmark = [pytest.mark.interop, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
PACSNODE = [sys.executable, "-m", "hierarchy.cli"]  # the `pacsnode` console script
TRACE = "DEBUG pacsnode.dicom.trace"


def dcmtk_tool(dcmtk: Path, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(dcmtk / tool), *args], env=dcmtk_env(), capture_output=True,
                          text=True, timeout=60)


@dataclass
class Site:
    """A node run by `pacsnode serve` (association processes as installed: one per core),
    forwarding everything to DCMTK's storescp (AE STORESCP), which is also a C-MOVE
    destination (--fork: the forwarding association stays open meanwhile)."""

    port: int
    received: Path
    node: subprocess.Popen[str]
    scp: subprocess.Popen[str]

    def log(self) -> str:
        """Stop the node; what it logged."""
        self.node.send_signal(signal.SIGTERM)
        output, _ = self.node.communicate(timeout=60)
        assert self.node.returncode == 0, output
        return output

    def arrived(self) -> set[str]:
        return {p.name.split(".", 1)[1] for p in self.received.iterdir()
                if not p.name.startswith(".")}


@pytest.fixture
def site(tmp_path: Path, dcmtk: Path) -> Iterator[Callable[..., Site]]:
    """Starts a Site (SQLite: the trace is the same over either database)."""
    started: list[Site] = []

    def start(*options: str) -> Site:
        port, dest_port = free_port(), free_port()
        name = f"node{len(started)}"
        folder = tmp_path / name
        folder.mkdir()
        config = folder / "node.toml"
        config.write_text(
            f'[node]\ndata_dir = "{folder / "data"}"\n'
            f'listen_host = "127.0.0.1"\n[bootstrap_partition]\nport = {port}\n'
            '[hierarchy]\nenabled = false\n')
        result = run_cli(config, "device", "add", "ARCHIVE", "--type", "BACKUP_TARGET",
                         "--host", "127.0.0.1", "--port", str(dest_port), "--ae-title",
                         "STORESCP")
        assert result.exit_code == 0, result.output
        received = folder / "received"
        received.mkdir()
        scp = subprocess.Popen([str(dcmtk / "storescp"), "--fork", "-aet", "STORESCP", "-od",
                                str(received), str(dest_port)], env=dcmtk_env(), text=True)
        node = subprocess.Popen(
            [*PACSNODE, "serve", "--config", str(config), *options], cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        running = Site(port, received, node, scp)
        started.append(running)
        wait_listening(port, node)
        wait_listening(dest_port, scp)
        return running

    yield start
    for running in started:
        if running.node.poll() is None:
            running.node.kill()
            running.node.communicate()
        running.scp.terminate()
        running.scp.wait()


def exchange(site: Site, dcmtk: Path, folder: Path) -> tuple[list[str], str]:
    """A store (forwarded), a query, a C-GET and a C-MOVE from DCMTK's tools; the SOP
    instances stored and the study."""
    files = write_study(folder / "in", 2)
    sops = [str(dcmread(f).SOPInstanceUID) for f in files]
    study = str(dcmread(files[0]).StudyInstanceUID)
    address = ["127.0.0.1", str(site.port)]
    stored = dcmtk_tool(dcmtk, "storescu", "-aet", "MODALITY", "-aec", "PACSNODE", *address,
                        *map(str, files))
    assert stored.returncode == 0, stored.stderr
    assert wait_for(lambda: site.arrived() == set(sops), timeout=30), "not forwarded"
    study_key = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    found = dcmtk_tool(dcmtk, "findscu", "-S", "-aet", "QUERIER", "-aec", "PACSNODE",
                       *study_key, *address)
    assert found.returncode == 0, found.stderr
    got_folder = folder / "got"
    got_folder.mkdir()
    got = dcmtk_tool(dcmtk, "getscu", "-S", "-aet", "GETTER", "-aec", "PACSNODE", "-od",
                     str(got_folder), *study_key, *address)
    assert got.returncode == 0, got.stderr
    assert len(list(got_folder.iterdir())) == 2
    moved = dcmtk_tool(dcmtk, "movescu", "-S", "-aet", "MOVER", "-aec", "PACSNODE", "-aem",
                       "STORESCP", *study_key, *address)
    assert moved.returncode == 0, moved.stderr
    return sops, study


def traced(log: str, association: str, line: str) -> bool:
    """Whether the trace has a line of this association (`in CALLING->CALLED`, `out ...`)
    that says `line` (a regular expression)."""
    pattern = re.compile(rf"{TRACE}: \[{re.escape(association)} 127\.0\.0\.1:\d+\] {line}")
    return any(pattern.search(row) for row in log.splitlines())


def test_trace_shows_each_association_event_of_stores_queries_retrieves_and_forwarding(
        site: Callable[..., Site], dcmtk: Path, tmp_path: Path) -> None:
    running = site("--trace-dicom")
    sops, _study = exchange(running, dcmtk, tmp_path)
    address = ["127.0.0.1", str(running.port)]
    refused = dcmtk_tool(dcmtk, "echoscu", "-aet", "ECHOER", "-aec", "NOBODY", *address)
    assert refused.returncode != 0
    aborted = dcmtk_tool(dcmtk, "echoscu", "--abort", "-aet", "ABORTER", "-aec", "PACSNODE",
                         *address)
    assert aborted.returncode == 0, aborted.stderr
    log = running.log()
    store = "in MODALITY->PACSNODE"
    expected = {
        # storescu's association, served by the direct C-STORE receiver
        store: [
            r"received A-ASSOCIATE-RQ calling=MODALITY called=PACSNODE max_pdu=\d+"
            r" implementation=1\.2\.276\.0\.7230010\S* OFFIS_DCMTK_\d+ contexts\(\d+\):"
            r" .*CTImageStorage \[",
            r"sent A-ASSOCIATE-AC max_pdu=1048576 implementation=\S+ PACSNODE\S* contexts\("
            r"\d+/\d+ accepted\): .*CTImageStorage accepted ExplicitVRLittleEndian",
            *(rf"received C-STORE-RQ id=\d+ context=\d+ class=CTImageStorage instance={sop}"
              r" data set \d+ bytes" for sop in sops),
            *(rf"sent C-STORE-RSP answers=\d+ context=\d+ class=CTImageStorage instance={sop}"
              r" status=0x0000 Success" for sop in sops),
            "received A-RELEASE-RQ", "sent A-RELEASE-RP"],
        # the forwarder's association to storescp, its C-STOREs sent by direct_send
        "out PACSNODE->STORESCP": [
            "sent A-ASSOCIATE-RQ calling=PACSNODE called=STORESCP",
            r"received A-ASSOCIATE-AC .*CTImageStorage accepted",
            *(rf"sent C-STORE-RQ id=\d+ context=\d+ class=CTImageStorage instance={sop}"
              r" data set \d+ bytes$" for sop in sops),
            "received C-STORE-RSP answers=\\d+ status=0x0000 Success"],
        "in QUERIER->PACSNODE": [
            "received C-FIND-RQ id=1 context=1 class=StudyRootQueryRetrieveInformationModelFind"
            r" data set \d+ bytes",
            r"sent C-FIND-RSP answers=1 .* status=0xFF00 Pending data set \d+ bytes",
            "sent C-FIND-RSP answers=1 .* status=0x0000 Success"],
        "in GETTER->PACSNODE": [
            "received C-GET-RQ id=1",
            *(rf"sent C-STORE-RQ id=\d+ context=\d+ class=CTImageStorage instance={sop}"
              for sop in sops),
            "received C-STORE-RSP .* status=0x0000 Success",
            "sent C-GET-RSP answers=1 .* status=0xFF00 Pending remaining=1 completed=1",
            "sent C-GET-RSP answers=1 .* status=0x0000 Success remaining=0 completed=2"],
        "in ECHOER->NOBODY": [
            "received A-ASSOCIATE-RQ calling=ECHOER called=NOBODY .* 1 Verification",
            "sent A-ASSOCIATE-RJ rejected permanent, source service user: called AE title not"
            " recognised"],
        "in ABORTER->PACSNODE": [
            "received C-ECHO-RQ id=1 context=1 class=Verification",
            "sent C-ECHO-RSP answers=1 context=1 class=Verification status=0x0000 Success",
            "received A-ABORT source service user"],
        "in MOVER->PACSNODE": [
            "received C-MOVE-RQ id=1 .* destination=STORESCP",
            "sent C-MOVE-RSP answers=1 .* status=0x0000 Success remaining=0 completed=2"],
    }
    missing = [f"[{who}] {line}" for who, lines in expected.items() for line in lines
               if not traced(log, who, line)]
    assert not missing, f"not traced: {missing}\n{log}"
    # The C-MOVE's sub-operations go on an association of their own, naming their originator.
    moved = [row for row in log.splitlines()
             if "[out PACSNODE->STORESCP" in row and "move_originator=MOVER/1" in row]
    assert len(moved) == 2, log
    # A connection that never became an association (the test's own wait for the port).
    assert re.search(rf"{TRACE}: \[in \?->\? 127\.0\.0\.1:\d+\] connection refused"
                     r" \(connection closed\): connection closed before a complete"
                     " A-ASSOCIATE-RQ", log), log


def test_no_trace_when_off_and_only_the_chosen_ae_titles_with_a_filter(
        site: Callable[..., Site], dcmtk: Path, tmp_path: Path) -> None:
    running = site()
    exchange(running, dcmtk, tmp_path / "off")
    log = running.log()
    assert "pacsnode.dicom.trace" not in log
    assert "association from MODALITY@127.0.0.1" in log  # (the node did log at INFO)
    running.scp.terminate()
    running.scp.wait()
    running = site("--trace-dicom-ae", "QUERIER,NOBODY")
    exchange(running, dcmtk, tmp_path / "filtered")
    log = running.log()
    assert traced(log, "in QUERIER->PACSNODE", "received C-FIND-RQ")
    others = [row for row in log.splitlines() if TRACE in row and "QUERIER" not in row]
    assert not others, "\n".join(others)
