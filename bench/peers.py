"""C-STORE receivers for the benchmarks: pacsnode itself and, when installed, DCMTK and Orthanc.

Each receiver is started fresh (empty storage and index) on a free loopback port, is ready once
it answers a C-ECHO, and is stopped by its own process id. While it runs, the memory of its
process tree can be sampled; its CPU time is read from /proc.

- `PacsNode`: `python -m node.cli serve` (the interpreter of `deployed.interpreter`) with its
  own data directory and index (SQLite unless a
  database URL is given); every instance is fsynced and indexed before it is acknowledged.
- `DcmtkStorescp`: `storescp --fork -od DIR`, one child process per association, files only.
- `Orthanc`: Orthanc with its default SQLite index in the storage folder, no HTTP server.

DCMTK (storescu, storescp, Orthanc's embedded DCMTK) stalls ~40 ms per small message on
loopback unless TCP_NODELAY=1 is in its environment, so every DCMTK process gets it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
# DCMTK's tools, never the venv's pynetdicom tools of the same names.
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
FINDSCU = "/usr/bin/findscu"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
_NETNS_MARK = "PACSNODE_BENCH_NETNS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_network(use: bool) -> str:
    """Re-run this script (same arguments) in a network namespace of its own, loopback only.

    storescp and Orthanc listen on every address; in the namespace nothing outside can reach
    them, and no port clashes with other processes on the machine. Needs root and unshare;
    without them (or with `use` false) the script goes on in the host's network. Returns a
    description of the network the benchmark runs in.
    """
    if in_private_network():
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return "private network namespace (loopback only)"
    if not use:
        return "host network"
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return "host network (a private namespace needs root, unshare and ip)"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "host network (unshare -n is not permitted here)"
    sys.stdout.flush()
    os.execvpe("unshare", ["unshare", "-n", "--", sys.executable, *sys.argv],
               {**os.environ, _NETNS_MARK: "1"})
    raise AssertionError("unreachable")


def in_private_network() -> bool:
    """This is the copy of the script that `private_network` started in the namespace."""
    return os.environ.get(_NETNS_MARK) == "1"


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Its live child processes, whichever of its threads started them (each thread's are
    listed under its own task: pacsnode starts its association processes from a thread)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):  # a thread that just ended
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime: the process and the children it has reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return sum(int(f) for f in fields[11:15])


class RssSampler:
    """Samples the resident memory of a process and its children (summed) in a thread."""

    def __init__(self, pid: int, interval: float = 0.05, children: bool = False) -> None:
        self.pid = pid
        self.interval = interval
        self.children = children
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_kb(self) -> int:
        pids = [self.pid, *(_children(self.pid) if self.children else [])]
        return sum(_status_kb(p, "VmRSS:") for p in pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self.rss_kb())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.rss_kb())

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


class Receiver:
    """One receiver process on a free port, each start with fresh storage in a folder of its
    own under `work`/<name>.

    A start never deletes an earlier run's files: on ext4 without a journal (this project's
    benchmark machine), each file created within a minute of a mass deletion scans past the
    deleted inodes (`recently_deleted` in the inode allocator), up to 1 ms of system CPU per
    file here, which would charge one receiver for another's clean-up. `clean` removes them all.
    """

    name: ClassVar[str]
    ae_title: ClassVar[str]
    forks: ClassVar[bool] = False  # one child process per association

    def __init__(self, work: Path) -> None:
        self.root = work / self.name
        self.starts = 0
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def work(self) -> Path:
        """The current (or last) start's folder."""
        return self.root / f"run-{self.starts}"

    @property
    def store(self) -> Path:
        return self.work / "store"

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this receiver cannot run here, or None."""
        return None

    @classmethod
    def version(cls) -> str:
        return ""

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration files (the folders exist and are empty)."""

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def log(self) -> Path:
        return self.work / f"{self.name}.log"

    def start(self) -> None:
        self.starts += 1
        self.store.mkdir(parents=True)
        self.port = free_port()
        self.prepare()
        argv, env = self.command()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the receiver answers a C-ECHO (raises if it exits or times out)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start (exit {self.proc.returncode}): "
                                   f"{self.log_tail()}")
            echo = subprocess.run([ECHOSCU, "-to", "5", "-aec", self.ae_title, "127.0.0.1",
                                   str(self.port)], env=DCMTK_ENV, capture_output=True)
            if echo.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer C-ECHO within {timeout:.0f} s")

    def log_tail(self, chars: int = 600) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """CPU time so far of the receiver, its reaped children and its live children."""
        pid = self.pid
        return (_cpu_ticks(pid) + sum(_cpu_ticks(c) for c in _children(pid))) / CLOCK_TICKS

    def hwm_mb(self) -> float:
        """The receiver process's own peak resident memory (VmHWM) so far."""
        return _status_kb(self.pid, "VmHWM:") / 1024

    def sampler(self, interval: float = 0.05) -> RssSampler:
        return RssSampler(self.pid, interval, children=self.forks)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        children = _children(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for child in children:  # storescp --fork children still finishing an association
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    def stored(self) -> int:
        """How many instances the receiver stored and indexed (after `stop`)."""
        raise NotImplementedError

    def clean(self) -> None:
        """Remove every start's files (after the timed runs: see the class's note)."""
        shutil.rmtree(self.root, ignore_errors=True)


class PacsNode(Receiver):
    name = "pacsnode"
    ae_title = "PACSNODE"

    def __init__(self, work: Path, database_url: str | None = None,
                 processes: int | None = None, python: str = sys.executable) -> None:
        super().__init__(work)
        self.database_url = database_url
        # dicom.association_processes; None: the node's default (0, one per core).
        self.processes = processes
        self.python = python  # deployed.interpreter

    def sampler(self, interval: float = 0.05) -> RssSampler:
        # Its association processes' memory is summed with its own, like storescp --fork's.
        return RssSampler(self.pid, interval, children=True)

    @classmethod
    def version(cls) -> str:
        sys.path.insert(0, str(ROOT))
        from node import __version__

        return f"pacsnode {__version__}"

    @property
    def config(self) -> Path:
        return self.work / "node.toml"

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.work / 'data' / 'pacsnode.db'}"

    @property
    def storage(self) -> Path:
        return self.work / "data" / "storage"

    def prepare(self) -> None:
        db_line = ""
        if self.database_url:
            reset_database(self.database_url)
            db_line = f'database_url = "{self.database_url}"\n'
        self.config.write_text(
            f'[node]\ndata_dir = "{self.work / "data"}"\n{db_line}listen_host = "127.0.0.1"\n'
            f'log_level = "WARNING"\n[bootstrap_partition]\nport = {self.port}\n'
            + (f'[dicom]\nassociation_processes = {self.processes}\n'
               if self.processes is not None else ""))

    def command(self) -> tuple[list[str], dict[str, str]]:
        return ([self.python, "-m", "node.cli", "serve", "--config", str(self.config)],
                dict(os.environ))

    def stored(self) -> int:
        return int(self.query("select count(*) from instances")[0][0])

    def query(self, sql: str, **params: object) -> list[tuple[object, ...]]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(sql), params)]
        finally:
            engine.dispose()


def reset_database(url: str) -> None:
    """Empty a PostgreSQL database for a fresh node (SQLite: nothing to do)."""
    if url.startswith("sqlite"):
        return
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


class DcmtkStorescp(Receiver):
    name = "dcmtk"
    ae_title = "STORESCP"
    forks = True

    @classmethod
    def unavailable(cls) -> str | None:
        return None if Path(STORESCP).exists() else f"{STORESCP} not found (apt-get install dcmtk)"

    @classmethod
    def version(cls) -> str:
        out = subprocess.run([STORESCP, "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0].strip("$ ").removeprefix("dcmtk: ") if out else "storescp"

    def command(self) -> tuple[list[str], dict[str, str]]:
        return ([STORESCP, "--fork", "-aet", self.ae_title, "-od", str(self.store),
                 str(self.port)], DCMTK_ENV)

    def stored(self) -> int:
        return sum(1 for p in self.store.rglob("*") if p.is_file())


class Orthanc(Receiver):
    name = "orthanc"
    ae_title = "ORTHANC"
    binary: ClassVar[str | None] = shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)

    @classmethod
    def unavailable(cls) -> str | None:
        return None if cls.binary else "Orthanc not found (apt-get install orthanc)"

    @classmethod
    def version(cls) -> str:
        assert cls.binary
        out = subprocess.run([cls.binary, "--version"], capture_output=True, text=True).stdout
        return "Orthanc " + (out.split()[1] if len(out.split()) > 1 else "?")

    @property
    def config(self) -> Path:
        return self.work / "orthanc.json"

    def prepare(self) -> None:
        # As in shared/peer-bench: SQLite index and files in one folder, no compression, no
        # plugins. No HTTP server: readiness is a C-ECHO, the count is read from the index.
        self.config.write_text(json.dumps({
            "Name": "BENCH",
            "StorageDirectory": str(self.store),
            "IndexDirectory": str(self.store),
            "StorageCompression": False,
            "HttpServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "SaveJobs": False,
        }, indent=2))

    def command(self) -> tuple[list[str], dict[str, str]]:
        assert self.binary
        return [self.binary, str(self.config)], DCMTK_ENV

    def stored(self) -> int:
        # Orthanc keeps its SQLite index open exclusively while it runs: read it after stop.
        db = sqlite3.connect(f"file:{self.store / 'index'}?mode=ro", uri=True)
        try:
            # resourceType 4: instance (1 patient, 2 study, 3 series)
            return int(db.execute("select count(*) from Resources where resourceType = 4")
                       .fetchone()[0])
        finally:
            db.close()


class PacsNodeNoFsync(PacsNode):
    """Diagnostic: pacsnode with os.fsync and os.fdatasync made no-ops in its processes
    (bench/nofsync/sitecustomize.py), beside the real one, to show what its durability costs.
    What it acknowledges is not durable: never a way to run a node."""

    name = "pacsnode-nofsync"

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv, env = super().command()
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "bench" / "nofsync"), *filter(None, [env.get("PYTHONPATH")])])
        return argv, env


RECEIVERS: dict[str, type[Receiver]] = {
    cls.name: cls for cls in (PacsNode, DcmtkStorescp, Orthanc, PacsNodeNoFsync)}


def send(files: list[Path], associations: int, ae_title: str, port: int,
         extra: tuple[str, ...] = ()) -> float:
    """Send `files` with DCMTK storescu over parallel associations (round-robin split).

    Returns the seconds from starting the first sender to the last one's exit (every
    C-STORE answered). Raises if a sender fails.
    """
    parts = [part for part in (files[i::associations] for i in range(associations)) if part]
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in parts]
        started = time.perf_counter()
        senders = [subprocess.Popen([STORESCU, *extra, "-aet", "BENCHSCU", "-aec", ae_title,
                                     "127.0.0.1", str(port), *map(str, part)],
                                    env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=log)
                   for part, log in zip(parts, logs, strict=True)]
        codes = [sender.wait() for sender in senders]
        seconds = time.perf_counter() - started
        for code, log in zip(codes, logs, strict=True):
            if code != 0:
                log.seek(0)
                raise RuntimeError(f"storescu exited {code}: "
                                   f"{log.read().decode(errors='replace')[-500:]}")
    return seconds
