"""Forwarding benchmark: child -> parent throughput and latency, with and without heartbeat.

Starts a parent and a child node (SQLite, on loopback), sends CT images to the child with DCMTK
storescu while the child forwards them to the parent, and prints the child's ingest rate, the
forwarding rate, and the latency from indexing at the child to indexing at the parent
(p50/p95). A benchmark, not a test: it prints figures.

By default each node runs as deployed, `pacsnode serve` in a process of its own (with this
script's interpreter); with --in-process both nodes run in this process and share its GIL,
so the child's ingest, its forwarder and the parent's ingest all take turns on one core.

    python bench/forward.py [--images 1000] [--size 512] [--trickle 0.05] [--in-process]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from node import config  # noqa: E402
from node.db.database import Database  # noqa: E402
from node.db.models import ForwardJob, Instance, JobState  # noqa: E402
from node.service import Node  # noqa: E402
from tests.conftest import free_port, run_cli, wait_listening  # noqa: E402
from tests.dicomgen import write_study  # noqa: E402

STORESCU = "/usr/bin/storescu"


@contextmanager
def running(work: Path, name: str, heartbeat: bool, in_process: bool
            ) -> Iterator[tuple[Database, int, Path]]:
    """A node; yields a database handle on its index, its DICOM port and its config file."""
    port = free_port()
    path = work / f"{name}.toml"
    path.write_text(f'[node]\ndata_dir = "{work / name}"\nlisten_host = "127.0.0.1"\n'
                    f'log_level = "WARNING"\nname = "{name}"\n[bootstrap_partition]\n'
                    f'ae_title = "{name.upper()}"\nport = {port}\n'
                    f"[forwarding]\npoll_seconds = 0.05\n"
                    f"heartbeat = {'true' if heartbeat else 'false'}\n")
    settings = config.load(path)
    if in_process:
        node = Node(settings)
        node.start()
        assert node.db is not None
        try:
            yield node.db, port, path
        finally:
            node.stop()
        return
    with (work / f"{name}.log").open("wb") as log:  # its warnings (the readiness probe's, too)
        server = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config",
                                   str(path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(port, server)  # it listens once its database is made
        db = Database(settings.database_url)
        try:
            yield db, port, path
        finally:
            db.dispose()
    finally:
        server.terminate()
        server.wait(30)


def run(files: list[Path], heartbeat: bool, trickle: float, in_process: bool
        ) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="pacsnode-forward-"))
    try:
        with running(work, "parent", heartbeat, in_process) as (parent_db, parent_port, _), \
                running(work, "child", heartbeat, in_process) as (child_db, child_port,
                                                                   child_config):
            return transfer(files, trickle, child_db, child_port, child_config, parent_db,
                            parent_port)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def transfer(files: list[Path], trickle: float, child_db: Database, child_port: int,
             child_config: Path, parent_db: Database, parent_port: int) -> dict[str, float]:
    result = run_cli(child_config, "device", "add", "PARENT", "--ae-title", "PARENT", "--type",
                     "PARENT", "--host", "127.0.0.1", "--port", str(parent_port))
    if result.exit_code != 0:
        raise SystemExit(f"cannot add the parent device: {result.output}")
    env = {**os.environ, "TCP_NODELAY": "1"}
    started = time.perf_counter()
    if trickle:
        # One image at a time, as a modality sends them: the latency case.
        for path in files:
            subprocess.run([STORESCU, "-aec", "CHILD", "127.0.0.1", str(child_port),
                            str(path)], env=env, check=True, capture_output=True)
            time.sleep(trickle)
    else:
        subprocess.run([STORESCU, "-aec", "CHILD", "127.0.0.1", str(child_port),
                        *map(str, files)], env=env, check=True, capture_output=True)
    ingested = time.perf_counter()
    while True:
        with child_db.session() as session:
            waiting = session.scalar(select(func.count()).select_from(ForwardJob).where(
                ForwardJob.state != JobState.DONE))
        if not waiting:
            break
        time.sleep(0.02)
    forwarded = time.perf_counter()
    with child_db.session() as session:
        at_child = dict(session.execute(select(Instance.sop_instance_uid,
                                               Instance.received_at)).all())
    with parent_db.session() as session:
        at_parent = dict(session.execute(select(Instance.sop_instance_uid,
                                                Instance.received_at)).all())
    latencies = sorted((at_parent[sop] - at_child[sop]).total_seconds() * 1000
                       for sop in at_child)
    return {
        "ingest": len(files) / (ingested - started),
        "forward": len(files) / (forwarded - started),
        "p50": statistics.median(latencies),
        "p95": latencies[int(len(latencies) * 0.95) - 1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Enough for several seconds of ingest: the forwarding rate counts the time until the last
    # image is at the parent, and over a one-second burst that last image's latency alone
    # was a fifth of it.
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--trickle", type=float, default=0.05,
                        help="seconds between single-image sends in the latency runs")
    parser.add_argument("--in-process", action="store_true",
                        help="both nodes in this process instead of one `pacsnode serve` each")
    args = parser.parse_args()
    if not Path(STORESCU).exists():
        raise SystemExit("DCMTK is needed: apt-get install dcmtk")
    data = Path(tempfile.mkdtemp(prefix="pacsnode-forward-data-"))
    try:
        report(write_study(data, args.images, size=args.size), args)
    finally:
        shutil.rmtree(data, ignore_errors=True)


def report(files: list[Path], args: argparse.Namespace) -> None:
    latency_files = files[: min(40, len(files))]
    where = "both in this process" if args.in_process else "each node its own `pacsnode serve`"
    print(f"{args.images} images of {args.size}x{args.size}, child -> parent on loopback, "
          f"SQLite, {where}\n")
    print("| heartbeat | mode | child ingest img/s | forwarded img/s | latency p50 ms | p95 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for heartbeat in (True, False):
        for mode, chosen, trickle in (("burst", files, 0.0),
                                      ("one at a time", latency_files, args.trickle)):
            r = run(chosen, heartbeat, trickle, args.in_process)
            print(f"| {'on' if heartbeat else 'off'} | {mode} | {r['ingest']:.0f} | "
                  f"{r['forward']:.0f} | {r['p50']:.0f} | {r['p95']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
