"""`pacsnode serve` as a real process: embedded defaults, DCMTK peers, clean stop on signals."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage

from node.storage import storagelock
from tests import hostile
from tests.conftest import (
    dcmtk_env,
    free_port,
    incoming_files,
    listening,
    stored_files,
    wait_for,
    wait_listening,
)
from tests.dicomgen import make_instance, write_study
from tests.hostile import RawPeer

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PACSNODE = [sys.executable, "-m", "hierarchy.cli"]  # the `pacsnode` console script


def start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*PACSNODE, "serve", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


def stop(proc: subprocess.Popen[str], sig: int) -> str:
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"pacsnode serve did not stop within 60 s:\n{output}") from None
    assert proc.returncode == 0, output
    return output


def test_serve_with_no_arguments_runs_the_embedded_default(tmp_path: Path, dcmtk: Path) -> None:
    if listening(11112):
        pytest.fail("port 11112 is taken by another program: the default node cannot start")
    proc = start(tmp_path)
    try:
        wait_listening(11112, proc)
        echo = subprocess.run([str(dcmtk / "echoscu"), "-aec", "PACSNODE", "127.0.0.1", "11112"],
                              env=dcmtk_env(), capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        files = write_study(tmp_path / "in", 3)
        sent = subprocess.run([str(dcmtk / "storescu"), "-aet", "MODALITY", "-aec", "PACSNODE",
                               "127.0.0.1", "11112", *map(str, files)],
                              env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
    finally:
        output = stop(proc, signal.SIGINT)  # Ctrl-C
    assert "received SIGINT, stopping" in output
    data = tmp_path / "pacsnode-data"
    assert (data / "pacsnode.db").is_file()
    stored = sorted((data / "storage" / "PACSNODE").rglob("*.dcm"))
    assert len(stored) == 3
    with sqlite3.connect(data / "pacsnode.db") as db:
        assert db.execute("select count(*) from instances").fetchone() == (3,)


def archived(storage: Path) -> list[Path]:
    """The images stored so far; .incoming also holds the temporary files of stores that are
    not yet answered, or whose directory's fsync is still to come."""
    return [p for p in stored_files(storage) if p.suffix == ".dcm"]


def test_sigterm_during_transfer_leaves_only_complete_indexed_files(
        tmp_path: Path, dcmtk: Path) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    # No grace, and enough images that the transfer outlasts the stop by a wide margin: the
    # node ingests a few hundred images a second, and 130 CT images once went in before a
    # stop (with 0.2 s of grace) took effect.
    config.write_text(f'[node]\ndata_dir = "data"\nlisten_host = "127.0.0.1"\n'
                      f"shutdown_grace_seconds = 0\n[bootstrap_partition]\nport = {port}\n")
    files = write_study(tmp_path / "in", 1000, size=128)
    proc = start(tmp_path, "--config", str(config))
    wait_listening(port, proc)
    sender = subprocess.Popen([str(dcmtk / "storescu"), "-aec", "PACSNODE", "127.0.0.1",
                               str(port), *map(str, files)], env=dcmtk_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = tmp_path / "data" / "storage"
    deadline = time.monotonic() + 30
    while len(archived(storage)) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    output = stop(proc, signal.SIGTERM)
    sender.wait(timeout=30)
    assert "received SIGTERM, stopping" in output

    stored = archived(storage)
    assert 20 <= len(stored) < len(files), "the stop should have come mid-transfer"
    originals = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    for path in stored:
        ds = dcmread(path)  # complete and parseable
        assert ds.PixelData == dcmread(originals[ds.SOPInstanceUID]).PixelData
    with sqlite3.connect(tmp_path / "data" / "pacsnode.db") as db:
        indexed = {row[0] for row in db.execute("select path from instances")}
    assert indexed == {str(p.relative_to(storage)) for p in stored}
    # A restart sweeps whatever temporary file the stop left behind.
    proc = start(tmp_path, "--config", str(config))
    wait_listening(port, proc)
    stop(proc, signal.SIGTERM)
    assert incoming_files(storage) == []


def test_a_second_node_on_the_same_control_port_stops_with_a_clear_error(tmp_path: Path) -> None:
    control = free_port()
    configs = []
    for name in ("first", "second"):
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[node]\ndata_dir = "{name}"\nlisten_host = "127.0.0.1"\n'
                          f"[bootstrap_partition]\nport = {free_port()}\n"
                          f'[hierarchy]\ncontrol_listen = "127.0.0.1:{control}"\n')
        configs.append(config)
    first = start(tmp_path, "--config", str(configs[0]))
    try:
        wait_listening(control, first)
        second = start(tmp_path, "--config", str(configs[1]))
        output, _ = second.communicate(timeout=60)
        assert second.returncode == 1, output
        assert f"the control plane cannot listen on 127.0.0.1:{control}" in output
    finally:
        stop(first, signal.SIGTERM)


def child_processes(pid: int) -> list[int]:
    """Started by any thread of the process: each lists its own under its task."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def running(pid: int) -> bool:
    """The process exists and has not exited (an orphan's zombie waits for a reaper that this
    machine's init may never be)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_sigterm_stops_every_association_process_and_loses_nothing_acknowledged(
        tmp_path: Path, dcmtk: Path) -> None:
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "data"\nlisten_host = "127.0.0.1"\n'
                      f"shutdown_grace_seconds = 0\n[bootstrap_partition]\nport = {port}\n"
                      "[dicom]\nassociation_processes = 2\n")
    studies = [write_study(tmp_path / f"in{n}", 400, size=128) for n in range(2)]
    proc = start(tmp_path, "--config", str(config))
    try:
        wait_listening(port, proc)
        children = child_processes(proc.pid)
        assert len(children) == 1  # the other association process
        senders = [subprocess.Popen([str(dcmtk / "storescu"), "-aec", "PACSNODE", "127.0.0.1",
                                     str(port), *map(str, files)], env=dcmtk_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for files in studies]
        storage = tmp_path / "data" / "storage"
        deadline = time.monotonic() + 30
        while len(archived(storage)) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        output = stop(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:  # a failed step: the node's processes must not outlive it
            proc.kill()
            proc.wait()
    for sender in senders:
        sender.wait(timeout=30)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children), output
    stored = archived(storage)
    assert 40 <= len(stored) < 800, "the stop should have come mid-transfer"
    with sqlite3.connect(tmp_path / "data" / "pacsnode.db") as db:
        indexed = {row[0] for row in db.execute("select path from instances")}
    assert indexed == {str(p.relative_to(storage)) for p in stored}
    # The second sender was served by the other process (its log lines say so).
    assert "[association process 1]: association from" in output


def test_a_node_restarted_after_its_main_process_was_killed_waits_for_its_other_processes(
        tmp_path: Path) -> None:
    """SIGKILL of the main process leaves an association process storing. A node started at
    once on the same storage must not take that process's temporary file for a crash's
    leftover (the start-up check and sweep): it waits for the process to end, which ends the
    association after the instance in hand. Then nothing is answered with a failure, and what
    was acknowledged is indexed and on disk."""
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "data"\nlisten_host = "127.0.0.1"\n'
                      f"shutdown_grace_seconds = 5\n[bootstrap_partition]\nport = {port}\n"
                      f'[dicom]\nassociation_processes = 2\n[hierarchy]\n'
                      f'control_listen = "127.0.0.1:{free_port()}"\n')
    first = start(tmp_path, "--config", str(config))
    second: subprocess.Popen[str] | None = None
    storage = tmp_path / "data" / "storage"
    try:
        wait_listening(port, first)
        [child] = child_processes(first.pid)
        # The other process holds the node's storage lock, inherited (storagelock.py).
        lock = storage / ".incoming" / storagelock.LOCK_NAME
        assert lock in {Path(os.readlink(fd)) for fd in Path(f"/proc/{child}/fd").iterdir()
                        if fd.is_symlink()}
        # The main process serves the first association, the other process the second.
        with RawPeer(port, timeout=10) as idle, RawPeer(port, timeout=10) as peer:
            for raw in (idle, peer):
                answer = raw.associate(hostile.associate_rq(abstract_syntaxes=(CTImageStorage,)))
                assert answer[:1] == b"\x02"
            ds = make_instance(size=1024)
            request = hostile.store_request(hostile.encode(ds), CTImageStorage,
                                            ds.SOPInstanceUID, 1)
            peer.send(request[: len(request) // 2])
            assert wait_for(lambda: incoming_files(storage), 10), "no transfer under way"
            first.kill()  # SIGKILL: the main process only
            first.wait(timeout=30)
            assert running(child)
            second = start(tmp_path, "--config", str(config))
            time.sleep(1.0)  # long enough for a node that does not wait to sweep .incoming
            peer.send(request[len(request) // 2:])
            statuses = [int(c.Status) for c in hostile.command_sets(peer.answer()[0])]
        assert statuses in ([], [0]), f"answered {statuses}, never a failure"
        wait_listening(port, second)
        assert not running(child)
        with sqlite3.connect(tmp_path / "data" / "pacsnode.db") as db:
            indexed = [row[0] for row in db.execute("select path from instances")]
        assert indexed == ([] if not statuses else [str(p.relative_to(storage))
                                                    for p in stored_files(storage)])
        stop(second, signal.SIGTERM)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def linked_since(storage: Path, before: set[Path]) -> list[Path]:
    """New temporary files in .incoming that a store has linked into the archive."""
    found = []
    for path in set(incoming_files(storage)) - before:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_nlink == 2:
                found.append(path)
    return found


def test_an_association_process_killed_before_indexing_leaves_no_orphan(
        tmp_path: Path, dcmtk: Path) -> None:
    """An association process killed after placing a file but before committing its row
    (here: while another program holds the database's write lock) leaves a file no row points
    to. The running node's sweep removes it with the temporary file that names it; it must not
    remove the temporary file alone, the only trace of the orphan (issue 25, item 4)."""
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "data"\nlisten_host = "127.0.0.1"\n'
                      f"shutdown_grace_seconds = 0\n[bootstrap_partition]\nport = {port}\n"
                      "[dicom]\nassociation_processes = 2\nnetwork_timeout = 1\n"
                      "[storage]\ncheck_interval_seconds = 0.5\n"
                      f'[hierarchy]\ncontrol_listen = "127.0.0.1:{free_port()}"\n')
    proc = start(tmp_path, "--config", str(config))
    storage = tmp_path / "data" / "storage"
    senders: list[subprocess.Popen[str]] = []
    try:
        wait_listening(port, proc)
        [child] = child_processes(proc.pid)
        locker = sqlite3.connect(tmp_path / "data" / "pacsnode.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        try:
            # Which process takes a connection depends on what each serves: the stores held
            # up by the lock keep the main process busy until one goes to the other process
            # (the main one cannot be killed alone).
            while len(senders) < 4:
                before = set(incoming_files(storage))
                image = write_study(tmp_path / f"in{len(senders)}", 1)
                senders.append(subprocess.Popen(
                    [str(dcmtk / "storescu"), "-aec", "PACSNODE", "127.0.0.1", str(port),
                     *map(str, image)], env=dcmtk_env(), text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
                assert wait_for(lambda before=before: linked_since(storage, before), 20), (
                    "nothing placed")
                [temporary] = linked_since(storage, before)
                if temporary.name.startswith(f"tmp{child}-"):
                    placed = set(archived(storage))
                    os.kill(child, signal.SIGKILL)
                    break
            else:
                raise AssertionError("no store reached the other association process")
        finally:
            locker.rollback()
            locker.close()
        for each in senders:
            each.communicate(timeout=30)

        def indexed() -> set[Path]:
            with sqlite3.connect(tmp_path / "data" / "pacsnode.db") as db:
                return {storage / row[0] for row in db.execute("select path from instances")}

        assert wait_for(lambda: set(archived(storage)) == indexed()
                        and not incoming_files(storage), 15), (
            f"left behind: {set(archived(storage)) - indexed()} {incoming_files(storage)}")
        assert len(placed) - len(archived(storage)) == 1  # the orphan, and only it, went
        # The node goes on: another association process took the killed one's place.
        assert wait_for(lambda: len(child_processes(proc.pid)) == 1, 15)
        echo = subprocess.run([str(dcmtk / "echoscu"), "-aec", "PACSNODE", "127.0.0.1",
                               str(port)], env=dcmtk_env(), capture_output=True, text=True,
                              timeout=30)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        output = stop(proc, signal.SIGTERM)
        assert "placed by a store whose process ended before indexing it" in output
    finally:
        for running_proc in (*senders, proc):
            if running_proc.poll() is None:
                running_proc.kill()
                running_proc.wait()
