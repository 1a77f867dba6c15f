"""A stalled database does not stall the node (issue 25, item 2): `pacsnode serve` as a real
process, DCMTK as the peer.

PostgreSQL frozen: a PostgreSQL cluster of the test's own (initdb, pg_ctl) whose postmaster
and every backend are stopped with SIGSTOP, as a hung server or host would be, then continued.
SQLite locked: another process holds the database's write lock (BEGIN EXCLUSIVE).
While the database does not answer, C-ECHO is answered at once, C-STORE gets a failure status
within the node's database timeout and leaves nothing behind, C-FIND a failure status; when
the database answers again, the same store succeeds without a restart.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from tests.conftest import dcmtk_env, free_port, stored_files, wait_listening
from tests.dicomgen import write_study

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PACSNODE = [sys.executable, "-m", "hierarchy.cli"]
TIMEOUT = 3.0  # node.database_timeout of these nodes
ECHO_BOUND = 1.5  # C-ECHO while the database does not answer (first association: 0.5 s look-up)
FIGURES: list[str] = []  # printed at the end (-s): the report's figures


@dataclass
class FrozenCluster:
    """A throwaway PostgreSQL cluster that can be frozen and thawed."""

    data: Path
    url: str

    def _pids(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)],
                                  capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def signal(self, sig: int) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def frozen_cluster() -> Iterator[FrozenCluster]:
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.fail("PostgreSQL server binaries missing (scripts/test.sh installs them)")
    # initdb refuses to run as root: the cluster is the postgres user's then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="pacsnode-frozen-pg-"))
    if as_user:
        shutil.chown(home, "postgres")
    data = home / "data"
    port = free_port()
    subprocess.run([*as_user, str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "pacs", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(home / "log"),
                    "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off",
                    "-w", "start"], check=True, capture_output=True)
    cluster = FrozenCluster(data, f"postgresql+psycopg://pacs@127.0.0.1:{port}/postgres")
    try:
        yield cluster
    finally:
        cluster.signal(signal.SIGCONT)
        subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def start_node(tmp_path: Path, database_url: str = "") -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    config = tmp_path / "node.toml"
    url = f'database_url = "{database_url}"\n' if database_url else ""
    config.write_text(f'[node]\ndata_dir = "data"\nlisten_host = "127.0.0.1"\n{url}'
                      f"database_timeout = {TIMEOUT}\n[bootstrap_partition]\nport = {port}\n"
                      "[hierarchy]\nenabled = false\n")
    proc = subprocess.Popen([*PACSNODE, "serve", "--config", str(config)], cwd=tmp_path,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    wait_listening(port, proc, timeout=60)
    return proc, port


def stop_node(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return output


def timed(args: list[str], timeout: float = 60) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    done = subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True,
                          timeout=timeout)
    return time.monotonic() - started, done


def echo(dcmtk: Path, port: int) -> tuple[float, subprocess.CompletedProcess[str]]:
    return timed([str(dcmtk / "echoscu"), "-aet", "MODALITY", "-aec", "PACSNODE", "127.0.0.1",
                  str(port)])


def store(dcmtk: Path, port: int, file: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    return timed([str(dcmtk / "storescu"), "-v", "-aet", "MODALITY", "-aec", "PACSNODE",
                  "127.0.0.1", str(port), str(file)])


def find(dcmtk: Path, port: int) -> tuple[float, subprocess.CompletedProcess[str]]:
    return timed([str(dcmtk / "findscu"), "-v", "-S", "-aet", "MODALITY", "-aec", "PACSNODE",
                  "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "127.0.0.1",
                  str(port)])


def archived_sops(storage: Path) -> set[str]:
    return {p.stem for p in stored_files(storage) if p.suffix == ".dcm"
            and ".incoming" not in p.parts}


def check_stall(tmp_path: Path, dcmtk: Path, port: int, storage: Path, stall: Callable[[], None],
                release: Callable[[], None], indexed: Callable[[], set[str]], label: str,
                reads_stall: bool) -> None:
    """The same checks for either database: store one, stall it, echo/store/find, release,
    the refused store again."""
    first, second = write_study(tmp_path / "in", 2)
    took, done = store(dcmtk, port, first)
    assert done.returncode == 0, done.stderr
    sop = str(dcmread(second, stop_before_pixels=True).SOPInstanceUID)

    stall()
    try:
        took, done = echo(dcmtk, port)
        assert done.returncode == 0, done.stderr
        assert took < ECHO_BOUND, f"C-ECHO took {took:.2f} s while the database stalled"
        echo_first = took
        took, done = echo(dcmtk, port)
        assert done.returncode == 0 and took < ECHO_BOUND, done.stderr
        echo_next = took

        took, done = store(dcmtk, port, second)
        output = done.stdout + done.stderr
        assert done.returncode != 0, output
        assert re.search(r"Store Response \(.*0x0?110\)", output), output  # DCMTK: 0x110
        # Bounded on both sides: it waited for the database, and not longer than its timeout.
        assert TIMEOUT - 1.5 <= took <= TIMEOUT + 1.5, f"C-STORE answered after {took:.2f} s"
        store_failed = took
        # Nothing half-stored: no file, no evidence left that the start-up check would need.
        assert sop not in archived_sops(storage)
        assert not list((storage / ".incoming").glob("*.unconfirmed"))

        took, done = find(dcmtk, port)
        output = done.stdout + done.stderr
        if reads_stall:
            assert re.search(r"Find Response.*(0xc000|Unable ?To ?Process)", output, re.I), \
                output
            assert took <= TIMEOUT + 1.5, f"C-FIND answered after {took:.2f} s"
        else:  # SQLite's readers read the WAL, whoever holds the write lock
            assert "Final Find Response (Success)" in output, output
            assert took < ECHO_BOUND, f"C-FIND answered after {took:.2f} s"
        find_took = took
    finally:
        release()

    released = time.monotonic()
    while True:
        took, done = store(dcmtk, port, second)
        if done.returncode == 0:
            break
        assert time.monotonic() - released < 3 * TIMEOUT, done.stdout + done.stderr
        time.sleep(0.1)
    recovery = time.monotonic() - released
    assert sop in archived_sops(storage)
    assert sop in indexed()
    find_end = "failed" if reads_stall else "answered"
    FIGURES.append(f"{label}: echo {echo_first:.2f} s / {echo_next:.2f} s, store failed after "
                   f"{store_failed:.2f} s, find {find_end} after {find_took:.2f} s, stored "
                   f"again {recovery:.2f} s after the database was back (timeout {TIMEOUT} s)")
    print(FIGURES[-1])


def test_frozen_postgresql(tmp_path: Path, dcmtk: Path, frozen_cluster: FrozenCluster) -> None:
    proc, port = start_node(tmp_path, frozen_cluster.url)
    engine = create_engine(frozen_cluster.url)

    def indexed() -> set[str]:
        with engine.connect() as conn:
            return set(conn.scalars(text("select sop_instance_uid from instances")))

    try:
        check_stall(tmp_path, dcmtk, port, tmp_path / "data" / "storage",
                    lambda: frozen_cluster.signal(signal.SIGSTOP),
                    lambda: frozen_cluster.signal(signal.SIGCONT), indexed, "PostgreSQL frozen",
                    reads_stall=True)
    finally:
        output = stop_node(proc)
        engine.dispose()
    assert "Traceback" not in output, output
    assert "the index database answers again" in output, output


def test_sqlite_locked_by_another_process(tmp_path: Path, dcmtk: Path) -> None:
    proc, port = start_node(tmp_path)
    path = tmp_path / "data" / "pacsnode.db"
    holder = sqlite3.connect(path, isolation_level=None)

    def indexed() -> set[str]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return {row[0] for row in db.execute("select sop_instance_uid from instances")}

    try:
        check_stall(tmp_path, dcmtk, port, tmp_path / "data" / "storage",
                    lambda: holder.execute("BEGIN EXCLUSIVE"),
                    lambda: holder.execute("ROLLBACK"), indexed, "SQLite locked",
                    reads_stall=False)
    finally:
        holder.close()
        output = stop_node(proc)
    assert "Traceback" not in output, output
