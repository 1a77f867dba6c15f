"""Hierarchy benchmark: device-change propagation and recollect over trees of 7 to 127 nodes.

Builds complete binary trees of nodes (control plane and SQLite database only, no DICOM
listener) on loopback, all in this process, or with --processes each in a process of its own as
deployed (`pacsnode serve` runs one node per process), and for each tree prints
  - how long a hierarchy-wide device change made at the deepest, last leaf takes to reach every
    node, as an administrator sees it: the change is committed as `pacsnode device` commits it,
    from outside the node's threads, so nothing wakes the leaf's sync loop: the leaf notices
    it by polling its change log (hierarchy.plane.LOCAL_POLL_SECONDS). "propagate" is polled
    from every node's database by this script (plain sqlite3 reads, which take no lock and
    little of the GIL the nodes share); "applied" is the same span read from the nodes'
    change-log timestamps (free of the polling). Both are the median of --repeat changes (an
    add, then edits);
  - how long `recollect`, asked at that leaf (or --recollect-at root), takes to return with the
    CLI's deadline (recollect_timeout + 5 s), of which "collect" is until the last directory
    entry arrived, and how many nodes its summary says it listed, found unreachable and
    published the directory to (-1: no summary came). Between recollects it waits for the
    process to be idle again and logs which directory every node then holds.
It also prints the CPU the idle tree uses (with --processes, of all its processes together):
in one process every node shares one GIL, so once that nears 100% of a CPU the figures
measure this process rather than the product. Once the tree has started, its objects are
frozen out of the garbage collector's full passes (gc.freeze(); --no-gc-freeze to keep them):
127 nodes' heaps in one process make each full pass stop every thread for about half a
second, which a node in its own process does not see. With --processes each node's process
is tuned as `pacsnode serve` tunes its own (node.processes.tuning). Every node's process then
holds its own copy of the code: about 100 MB each, 13 GB for 127.
A benchmark, not a test: it prints figures and never fails on them.

    python bench/hierarchy.py                               # 7, 31, 127 nodes; 1 s / 5 s
    python bench/hierarchy.py --sizes 127 --processes       # one process per node
    python bench/hierarchy.py --sizes 127 --no-gc-freeze
    python bench/hierarchy.py --sizes 7 31 --repeat 5 --recollect-at root

Progress goes to stderr; `kill -USR1 <pid>` dumps every thread's stack there.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # first: this file's own name would shadow the package

import grpc  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from hierarchy import neighbours  # noqa: E402
from hierarchy.plane import ControlPlane  # noqa: E402
from hierarchy.rpc import control_pb2 as pb  # noqa: E402
from hierarchy.rpc import control_pb2_grpc as rpc  # noqa: E402
from node import config, devices  # noqa: E402
from node.config import Settings  # noqa: E402
from node.db.database import Database  # noqa: E402
from node.db.models import (  # noqa: E402
    Device,
    DeviceChange,
    DirectoryNode,
    ReplicatedDevice,
)
from node.processes.tuning import tune_process  # noqa: E402
from node.service import ensure_bootstrap_partition, open_database  # noqa: E402

DEVICE = "BENCHDEV"
POLL_SECONDS = 0.01
SATURATED = 0.7  # idle CPU share above which the process, not the product, sets the pace


@dataclass
class Member:
    index: int  # breadth-first position: the parent of i is (i - 1) // 2
    settings: Settings
    db: Database
    plane: ControlPlane | None  # None: the node runs in `process`
    process: subprocess.Popen[bytes] | None = None
    _reader: sqlite3.Connection | None = None

    @property
    def reader(self) -> sqlite3.Connection:
        """A plain connection for polling: autocommit reads take no lock (WAL) and, unlike a
        session, do not hold the GIL the nodes share for long."""
        if self._reader is None:
            self._reader = sqlite3.connect(self.settings.data_dir / "pacsnode.db",
                                           isolation_level=None, check_same_thread=False)
        return self._reader

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def control(self) -> str:
        return self.settings.hierarchy.control_listen


@dataclass
class Recollected:
    seconds: float
    collect_seconds: float  # until the last directory entry arrived
    cpu_seconds: float  # the tree's CPU meanwhile (every node's work, and the idle load)
    done: pb.RecollectDone | None


@dataclass
class Figures:
    nodes: int
    levels: int
    startup_s: float
    idle_cpu: float  # CPU seconds per second the idle tree spends (all its processes)
    propagate_s: float  # polled: change committed at the leaf -> seen in every database
    applied_s: float  # change-log timestamps: committed at the leaf -> applied at the last node
    recollect: Recollected  # the median run
    threads: int
    fds: int

    @property
    def hops(self) -> int:
        """From the last leaf to the first: up to the root and down again."""
        return 2 * (self.levels - 1)


# --- the tree ------------------------------------------------------------------------------

def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: every socket is held until all are chosen."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def levels_of(nodes: int) -> int:
    levels = (nodes + 1).bit_length() - 1
    if nodes < 1 or 2 ** levels - 1 != nodes:
        raise SystemExit(f"{nodes} nodes is not a complete binary tree (7, 15, 31, 63, 127...)")
    return levels


def node_toml(work: Path, name: str, dicom_port: int, control_port: int,
              parent_port: int | None, args: argparse.Namespace) -> Path:
    parent = f'parent = "127.0.0.1:{parent_port}"\n' if parent_port is not None else ""
    path = work / f"{name}.toml"
    path.write_text(f'[node]\nname = "{name}"\ndata_dir = "{work / name}"\n'
                    f'log_level = "WARNING"\n'
                    f'[bootstrap_partition]\nae_title = "{name.upper()}"\nport = {dicom_port}\n'
                    f'[hierarchy]\nnode_id = "{name}"\n'
                    f'control_listen = "127.0.0.1:{control_port}"\n{parent}'
                    f"heartbeat_seconds = {args.heartbeat_seconds}\n"
                    f"sync_seconds = {args.sync_seconds}\n"
                    f"rpc_timeout = {args.rpc_timeout}\n"
                    f"recollect_timeout = {args.recollect_timeout}\n")
    return path


def template_database(work: Path, args: argparse.Namespace) -> Path:
    """A migrated, empty database to copy for every node: running the migrations takes about
    0.3 s a node, and far longer once the nodes already started keep the process busy."""
    settings = config.load(node_toml(work, "template", 40000, free_ports(1)[0], None, args))
    open_database(settings).dispose()
    path = settings.data_dir / "pacsnode.db"
    conn = sqlite3.connect(path)
    try:
        with conn:  # each node records its own id when it opens its copy
            conn.execute("DELETE FROM node_meta WHERE key = 'node_id'")
    finally:
        conn.close()
    return path


def start_tree(work: Path, nodes: int, args: argparse.Namespace) -> list[Member]:
    """Breadth-first, so every parent serves before its children register."""
    ports = free_ports(nodes)
    template = template_database(work, args)
    members: list[Member] = []
    try:
        for i in range(nodes):
            parent_port = ports[(i - 1) // 2] if i else None
            toml = node_toml(work, f"n{i}", 40000 + i, ports[i], parent_port, args)
            settings = config.load(toml)
            settings.data_dir.mkdir(parents=True)
            shutil.copyfile(template, settings.data_dir / "pacsnode.db")
            if args.processes:
                # This process opens the node's database as the CLI does (no migration: the
                # node's process runs them), to make changes and read results.
                members.append(Member(i, settings, Database(settings.database_url), None,
                                      start_node_process(toml, args)))
                continue
            db = open_database(settings)
            ensure_bootstrap_partition(db, settings)
            plane = ControlPlane(settings)
            members.append(Member(i, settings, db, plane))
            plane.start_with(db)
    except BaseException:
        stop_tree(members)
        raise
    return members


def start_node_process(toml: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """One node in a process of its own (serve_node), which stops when its stdin closes."""
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-node",
                             str(toml), "--log-level", args.log_level], stdin=subprocess.PIPE)


def serve_node(toml: Path) -> None:
    """--serve-node: run one node of a --processes tree until this process's stdin closes
    (the benchmark is done with it, or died)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the benchmark's to handle
    settings = config.load(toml)
    db = open_database(settings)
    ensure_bootstrap_partition(db, settings)
    plane = ControlPlane(settings)
    plane.start_with(db)
    tune_process()
    sys.stdin.buffer.read()
    plane.stop()
    db.dispose()


def registered(child: Member, parent: Member) -> bool:
    with child.db.session() as s:
        up = neighbours.parent(s)
    with parent.db.session() as s:
        down = neighbours.get(s, child.node_id)
    return up is not None and down is not None


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def wait_registered(members: list[Member], timeout: float) -> None:
    pending = list(members[1:])

    def done() -> bool:
        pending[:] = [m for m in pending if not registered(m, members[(m.index - 1) // 2])]
        return not pending

    wait_until(done, timeout, "every node to register with its parent")


def stop_tree(members: list[Member]) -> None:
    """Deepest level first, each level's planes in parallel (one stop takes up to 1 s); node
    processes all at once."""
    for m in members:
        if m.process is not None and m.process.stdin is not None:
            m.process.stdin.close()
    for m in members:
        if m.process is not None:
            try:
                m.process.wait(10)
            except subprocess.TimeoutExpired:
                m.process.kill()
                m.process.wait()
    by_level: dict[int, list[ControlPlane]] = {}
    for m in members:
        if m.plane is not None:
            by_level.setdefault((m.index + 1).bit_length(), []).append(m.plane)
    for level in sorted(by_level, reverse=True):
        threads = [threading.Thread(target=plane.stop) for plane in by_level[level]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for m in members:
        if m._reader is not None:
            m._reader.close()
        m.db.dispose()


# --- measurements --------------------------------------------------------------------------

def change_device(leaf: Member, round_: int) -> tuple[str, str]:
    """Add the device (round 0) or edit its description: (the description, the version)."""
    description = f"v{round_}"
    with leaf.db.transaction() as session:
        if round_ == 0:
            devices.add(session, name=DEVICE, ae_title=DEVICE, host="127.0.0.1", port=104,
                        scope="hierarchy", description=description)
        else:
            devices.edit(session, DEVICE, description=description)
    with leaf.db.session() as session:
        row = session.get(ReplicatedDevice, DEVICE)
        assert row is not None
        return description, row.version


def description_at(member: Member) -> str | None:
    row = member.reader.execute(f"SELECT description FROM {Device.__tablename__} "
                                "WHERE name = ?", (DEVICE,)).fetchone()
    return row[0] if row else None


def applied_at(member: Member, version: str) -> datetime | None:
    row = member.reader.execute(f"SELECT created_at FROM {DeviceChange.__tablename__} "
                                "WHERE name = ? AND version = ? ORDER BY seq LIMIT 1",
                                (DEVICE, version)).fetchone()
    return datetime.fromisoformat(row[0]) if row else None


def propagate_once(members: list[Member], round_: int, timeout: float) -> tuple[float, float]:
    """(seconds until every database shows the change, the same from change-log timestamps)."""
    leaf = members[-1]
    started, cpu = time.monotonic(), tree_cpu(members)
    description, version = change_device(leaf, round_)
    pending = [m for m in members if m is not leaf]
    while pending:
        pending = [m for m in pending if description_at(m) != description]
        if pending and time.monotonic() - started > timeout:
            raise SystemExit(f"change v{round_} reached only {len(members) - len(pending)} of "
                             f"{len(members)} nodes in {timeout:.0f} s (missing: "
                             f"{', '.join(m.node_id for m in pending[:10])})")
        if pending:
            time.sleep(POLL_SECONDS)
    seconds = time.monotonic() - started
    progress(f"{len(members)} nodes: change v{round_} everywhere after {seconds:.3f} s "
             f"({tree_cpu(members) - cpu:.1f} CPU s)")
    stamps = [applied_at(m, version) for m in members]
    first = stamps[-1]
    if first is None or any(s is None for s in stamps):
        return seconds, float("nan")
    return seconds, max((s - first).total_seconds() for s in stamps if s is not None)


def recollect_once(members: list[Member], member: Member, timeout: float) -> Recollected:
    """Recollect asked at `member`, as `pacsnode recollect` asks it (entries in batches)."""
    with grpc.insecure_channel(member.control) as channel:
        stub = rpc.ControlStub(channel)
        started, cpu = time.monotonic(), tree_cpu(members)
        collected = 0.0
        done = None
        for event in stub.Recollect(pb.RecollectRequest(batched=True), timeout=timeout):
            if event.HasField("done"):
                done = event.done
            else:
                collected = time.monotonic() - started
        return Recollected(time.monotonic() - started, collected, tree_cpu(members) - cpu,
                           done)


def settle(members: list[Member], idle: float, limit: float) -> float:
    """Seconds until this process is back to its idle CPU use: a walk that overran its
    deadline goes on below the nodes that gave up on it, and would slow the next one."""
    started = time.monotonic()
    while (time.monotonic() - started < limit
           and idle_cpu(members, 1.0) > 1.5 * idle + 0.05):
        pass
    return time.monotonic() - started


def directory_census(members: list[Member]) -> dict[int, int]:
    """{directory size: how many nodes hold a directory of that size}."""
    sizes: dict[int, int] = {}
    for m in members:
        with m.db.session() as s:
            size = s.scalar(select(func.count()).select_from(DirectoryNode)) or 0
        sizes[size] = sizes.get(size, 0) + 1
    return dict(sorted(sizes.items()))


def freeze_heap() -> None:
    """Keep the started tree's objects out of the garbage collector's full passes.

    Every node's heap is in this one process (each node's SQLAlchemy engine alone caches tens
    of thousands of compiled-statement objects), so at 127 nodes a full collection walks
    600,000+ objects and stops every thread for about half a second, every few seconds: a
    pause a node in a process of its own, with a heap a hundredth that size, does not have.
    gc.freeze() is what long-running servers do for the objects they keep."""
    gc.collect()
    gc.freeze()


def idle_cpu(members: list[Member], seconds: float) -> float:
    cpu, wall = tree_cpu(members), time.monotonic()
    time.sleep(seconds)
    return (tree_cpu(members) - cpu) / (time.monotonic() - wall)


def node_processes(members: list[Member]) -> list[int]:
    return [m.process.pid for m in members if m.process is not None]


def tree_cpu(members: list[Member]) -> float:
    """CPU seconds used so far by this process and the node processes."""
    total = time.process_time()
    for pid in node_processes(members):
        try:  # utime and stime, the 14th and 15th fields ("comm" may hold spaces)
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def threads_and_fds(members: list[Member]) -> tuple[int, int]:
    """Threads and open files of this process and the node processes together."""
    threads, fds = threading.active_count(), open_fds("self")
    for pid in node_processes(members):
        fds += open_fds(str(pid))
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        threads += next(int(line.split()[1]) for line in status.splitlines()
                        if line.startswith("Threads:"))
    return threads, fds


def open_fds(pid: str) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def progress(message: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_tree(nodes: int, args: argparse.Namespace) -> Figures:
    levels = levels_of(nodes)
    work = Path(tempfile.mkdtemp(prefix=f"pacsnode-hierarchy-{nodes}-", dir=args.work))
    members: list[Member] = []
    try:
        started = time.monotonic()
        members = start_tree(work, nodes, args)
        progress(f"{nodes} nodes: started in {time.monotonic() - started:.1f} s")
        wait_registered(members, args.timeout)
        startup = time.monotonic() - started
        progress(f"{nodes} nodes: all registered after {startup:.1f} s")
        # Let the re-registrations that follow a node's first child (its role changes) pass.
        time.sleep(2 * args.heartbeat_seconds)
        if args.gc_freeze and not args.processes:
            freeze_heap()
        idle = idle_cpu(members, args.idle_seconds)
        progress(f"{nodes} nodes: idle, the tree uses {100 * idle:.0f}% of a CPU")
        rounds = []
        for i in range(args.repeat):
            rounds.append(propagate_once(members, i, args.timeout))
        recollects = []
        for _ in range(args.repeat):
            asked = members[0] if args.recollect_at == "root" else members[-1]
            recollects.append(recollect_once(members, asked, args.recollect_call_timeout))
            r = recollects[-1]
            d = r.done
            summary = (f"{d.nodes} listed, {d.unreachable} unreachable, {d.published} "
                       "published" if d is not None else "no done event")
            progress(f"{nodes} nodes: recollect returned after {r.seconds:.3f} s (collected "
                     f"{r.collect_seconds:.3f} s, {r.cpu_seconds:.1f} CPU s): {summary}")
            waited = settle(members, idle, args.timeout)
            progress(f"{nodes} nodes: idle again {waited:.0f} s later; directories held "
                     f"({{entries: nodes}}): {directory_census(members)}")
        threads, fds = threads_and_fds(members)
        return Figures(
            nodes=nodes, levels=levels, startup_s=startup, idle_cpu=idle,
            propagate_s=statistics.median(r[0] for r in rounds),
            applied_s=statistics.median(r[1] for r in rounds),
            recollect=sorted(recollects, key=lambda r: r.seconds)[len(recollects) // 2],
            threads=threads, fds=fds)
    finally:
        stopping = time.monotonic()
        stop_tree(members)
        progress(f"{nodes} nodes: stopped in {time.monotonic() - stopping:.1f} s")
        shutil.rmtree(work, ignore_errors=True)


# --- report --------------------------------------------------------------------------------

HEADER = ("| nodes | levels | hops | idle CPU % | propagate s | applied s | recollect s "
          "| collect s | listed | unreachable | published | start s | threads | fds |")


def row(f: Figures) -> str:
    done = f.recollect.done
    listed, unreachable, published = ((done.nodes, done.unreachable, done.published)
                                      if done is not None else (-1, -1, -1))
    return (f"| {f.nodes:>5} | {f.levels:>6} | {f.hops:>4} | {100 * f.idle_cpu:>10.0f} "
            f"| {f.propagate_s:>11.3f} | {f.applied_s:>9.3f} | {f.recollect.seconds:>11.3f} "
            f"| {f.recollect.collect_seconds:>9.3f} | {listed:>6} | {unreachable:>11} "
            f"| {published:>9} | {f.startup_s:>7.1f} | {f.threads:>7} | {f.fds:>3} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 31, 127],
                        help="tree sizes (complete binary trees: 7, 15, 31, 63, 127...)")
    # Shorter intervals than these keep 127 nodes sharing one process (one GIL) busy doing
    # nothing, and the figures then measure the process, not the product.
    parser.add_argument("--sync-seconds", type=float, default=1.0,
                        help="[hierarchy] sync_seconds of every node")
    parser.add_argument("--heartbeat-seconds", type=float, default=5.0,
                        help="[hierarchy] heartbeat_seconds of every node")
    parser.add_argument("--rpc-timeout", type=float, default=5.0,
                        help="[hierarchy] rpc_timeout of every node")
    parser.add_argument("--recollect-timeout", type=float, default=30.0,
                        help="[hierarchy] recollect_timeout of every node")
    parser.add_argument("--recollect-call-timeout", type=float, default=None,
                        help="deadline of the Recollect call (default: recollect_timeout + 5, "
                             "as the CLI)")
    parser.add_argument("--recollect-at", choices=("leaf", "root"), default="leaf",
                        help="where recollect is asked (a leaf relays it up to the root)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="device changes and recollects per tree (the median is printed)")
    parser.add_argument("--idle-seconds", type=float, default=3.0,
                        help="how long the idle tree's CPU use is measured")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="give up waiting for registration or a change after this long")
    parser.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                        help="leave the started tree's objects to the garbage collector's "
                             "full passes (half-second pauses at 127 nodes)")
    parser.add_argument("--processes", action="store_true",
                        help="run every node in a process of its own, as deployed (start-up "
                             "takes about 1 s of CPU and 100 MB per node)")
    parser.add_argument("--serve-node", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None,
                        help="parent of the temporary data directories (default: system temp)")
    parser.add_argument("--log-level", default="ERROR", help="level of the nodes' log (stderr)")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.serve_node is not None:
        serve_node(args.serve_node)
        return
    if args.recollect_call_timeout is None:
        args.recollect_call_timeout = args.recollect_timeout + 5
    for size in args.sizes:
        levels_of(size)
    raise_fd_limit()
    faulthandler.register(signal.SIGUSR1)
    where = "in a process of its own" if args.processes else "in this process"
    print(f"pacsnode hierarchy, {os.cpu_count()} CPUs, SQLite, every node {where} on "
          f"loopback\nsync_seconds={args.sync_seconds} heartbeat_seconds="
          f"{args.heartbeat_seconds} rpc_timeout={args.rpc_timeout} recollect_timeout="
          f"{args.recollect_timeout} (Recollect call deadline {args.recollect_call_timeout} s); "
          f"median of {args.repeat}; gc.freeze() after start: "
          f"{True if args.processes else args.gc_freeze}\n"
          "change made at the last leaf, sync loop not woken (it polls); "
          f"recollect asked at the {'root' if args.recollect_at == 'root' else 'last leaf'}\n")
    print(HEADER)
    print("|" + "---:|" * (HEADER.count("|") - 1))
    saturated = []
    for size in args.sizes:
        figures = run_tree(size, args)
        print(row(figures), flush=True)
        if figures.idle_cpu > SATURATED and not args.processes:
            saturated.append(size)
    if saturated:
        print(f"\nnote: idle, the {', '.join(map(str, saturated))}-node tree(s) already kept this "
              f"process {100 * SATURATED:.0f}%+ busy (one GIL for every node): their figures "
              "are set by this process; longer --sync-seconds/--heartbeat-seconds lighten it")


if __name__ == "__main__":
    main()
