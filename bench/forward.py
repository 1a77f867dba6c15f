"""Forwarding benchmark: child -> parent throughput and latency, with and without heartbeat.

Starts a parent and a child node (in this process, SQLite, on loopback), sends CT images to the
child with DCMTK storescu while the child forwards them to the parent, and prints the child's
ingest rate, the forwarding rate, and the latency from indexing at the child to indexing at the
parent (p50/p95). A benchmark, not a test: it prints figures.

    python bench/forward.py [--images 200] [--size 512] [--trickle 0.05]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from node import config  # noqa: E402
from node.db.models import ForwardJob, Instance, JobState  # noqa: E402
from node.service import Node  # noqa: E402
from tests.conftest import free_port, run_cli  # noqa: E402
from tests.dicomgen import write_study  # noqa: E402

STORESCU = "/usr/bin/storescu"


def start(work: Path, name: str, heartbeat: bool) -> tuple[Node, int, Path]:
    port = free_port()
    path = work / f"{name}.toml"
    path.write_text(f'[node]\ndata_dir = "{work / name}"\nlisten_host = "127.0.0.1"\n'
                    f'log_level = "WARNING"\nname = "{name}"\n[bootstrap_partition]\n'
                    f'ae_title = "{name.upper()}"\nport = {port}\n'
                    f"[forwarding]\npoll_seconds = 0.05\n"
                    f"heartbeat = {'true' if heartbeat else 'false'}\n")
    node = Node(config.load(path))
    node.start()
    return node, port, path


def run(files: list[Path], heartbeat: bool, trickle: float) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="pacsnode-forward-"))
    parent, parent_port, _ = start(work, "parent", heartbeat)
    child, child_port, child_config = start(work, "child", heartbeat)
    assert child.db is not None and parent.db is not None
    try:
        run_cli(child_config, "device", "add", "PARENT", "--ae-title", "PARENT", "--type",
                "PARENT", "--host", "127.0.0.1", "--port", str(parent_port))
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
            with child.db.session() as session:
                waiting = session.scalar(select(func.count()).select_from(ForwardJob).where(
                    ForwardJob.state != JobState.DONE))
            if not waiting:
                break
            time.sleep(0.02)
        forwarded = time.perf_counter()
        with child.db.session() as session:
            at_child = dict(session.execute(select(Instance.sop_instance_uid,
                                                   Instance.received_at)).all())
        with parent.db.session() as session:
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
    finally:
        child.stop()
        parent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--trickle", type=float, default=0.05,
                        help="seconds between single-image sends in the latency runs")
    args = parser.parse_args()
    if not Path(STORESCU).exists():
        raise SystemExit("DCMTK is needed: apt-get install dcmtk")
    data = Path(tempfile.mkdtemp(prefix="pacsnode-forward-data-"))
    files = write_study(data, args.images, size=args.size)
    latency_files = files[: min(40, len(files))]
    print(f"{args.images} images of {args.size}x{args.size}, child -> parent on loopback, "
          f"SQLite\n")
    print("| heartbeat | mode | child ingest img/s | forwarded img/s | latency p50 ms | p95 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for heartbeat in (True, False):
        for mode, chosen, trickle in (("burst", files, 0.0),
                                      ("one at a time", latency_files, args.trickle)):
            r = run(chosen, heartbeat, trickle)
            print(f"| {'on' if heartbeat else 'off'} | {mode} | {r['ingest']:.0f} | "
                  f"{r['forward']:.0f} | {r['p50']:.0f} | {r['p95']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
