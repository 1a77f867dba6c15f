"""C-STORE ingest benchmark: images/s and MB/s into a real `pacsnode serve`, with peak memory.

Runs a fresh node (its own data directory and database) for each case, sends with DCMTK's
storescu (TCP_NODELAY=1, as DCMTK stalls without it) over 1 and 4 parallel associations, small
(64x64) and CT-sized (512x512) images, checks every image was acknowledged and indexed, and
prints a table. A benchmark, not a test: it prints figures and never fails on them.

    python bench/ingest.py                      # SQLite, defaults below
    python bench/ingest.py --database-url postgresql+psycopg://user:pw@127.0.0.1/db --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

from tests.dicomgen import write_study  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's, never the venv's pynetdicom tool of that name


@dataclass
class Result:
    dataset: str
    associations: int
    images: int
    megabytes: float
    seconds: float
    peak_rss_mb: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data(folder: Path, count: int, size: int) -> list[Path]:
    if folder.is_dir() and len(list(folder.glob("*.dcm"))) == count:
        return sorted(folder.glob("*.dcm"))
    shutil.rmtree(folder, ignore_errors=True)
    # Several studies of 50 images, like a modality's bursts.
    files: list[Path] = []
    while len(files) < count:
        files += write_study(folder / f"s{len(files)}", min(50, count - len(files)), size=size)
    for path in files:
        path.rename(folder / path.name)
    return sorted(folder.glob("*.dcm"))


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("pacsnode serve exited at start")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("pacsnode serve did not start listening")


def reset_database(url: str) -> None:
    if url.startswith("sqlite"):
        return
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


def run_case(files: list[Path], dataset: str, associations: int, database_url: str | None,
             work: Path) -> Result:
    data_dir = work / "node"
    shutil.rmtree(data_dir, ignore_errors=True)
    port = free_port()
    db_line = f'database_url = "{database_url}"\n' if database_url else ""
    if database_url:
        reset_database(database_url)
    config = work / "bench.toml"
    config.write_text(f'[node]\ndata_dir = "{data_dir}"\n{db_line}listen_host = "127.0.0.1"\n'
                      f'log_level = "WARNING"\n[bootstrap_partition]\nport = {port}\n')
    node = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, node)
        parts = [files[i::associations] for i in range(associations)]
        env = {**os.environ, "TCP_NODELAY": "1"}
        started = time.perf_counter()
        senders = [subprocess.Popen([STORESCU, "-aec", "PACSNODE", "127.0.0.1", str(port),
                                     *map(str, part)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE) for part in parts]
        failed = [s for s in senders if s.wait() != 0]
        seconds = time.perf_counter() - started
        if failed:
            raise SystemExit(f"storescu failed: {failed[0].stderr.read().decode()[:500]}")  # type: ignore[union-attr]
        rss = peak_rss_mb(node.pid)
    finally:
        node.terminate()
        node.wait(timeout=60)
    url = database_url or f"sqlite:///{data_dir / 'pacsnode.db'}"
    engine = create_engine(url)
    with engine.connect() as conn:
        indexed = conn.execute(text("select count(*) from instances")).scalar_one()
    engine.dispose()
    if indexed != len(files):
        raise SystemExit(f"only {indexed} of {len(files)} images were indexed")
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    return Result(dataset, associations, len(files), megabytes, seconds, rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=2000, help="number of 64x64 images")
    parser.add_argument("--ct", type=int, default=200, help="number of 512x512 images")
    parser.add_argument("--runs", type=int, default=1, help="repetitions (median is printed)")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--database-url", default=None, help="default: the node's SQLite")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) /
                        "pacsnode-bench-data", help="where the generated images are kept")
    parser.add_argument("--work", type=Path, default=None,
                        help="node data directory parent (default: a temporary folder; put it "
                             "on the filesystem you want to measure)")
    args = parser.parse_args()
    if not Path(STORESCU).exists():
        raise SystemExit("DCMTK is needed: apt-get install dcmtk")
    datasets = {"small 64x64": make_data(args.data / "small", args.small, 64),
                "CT 512x512": make_data(args.data / "ct", args.ct, 512)}
    work = args.work or Path(tempfile.mkdtemp(prefix="pacsnode-bench-"))
    print(f"pacsnode ingest, {os.cpu_count()} CPUs, database "
          f"{'SQLite' if not args.database_url else args.database_url.split('@')[-1]}, "
          f"work dir {work}, median of {args.runs} run(s)\n")
    print(f"| {'dataset':<12} | assoc | images | {'img/s':>7} | {'MB/s':>7} | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, files in datasets.items():
        for n in args.associations:
            results = [run_case(files, name, n, args.database_url, work)
                       for _ in range(args.runs)]
            seconds = statistics.median(r.seconds for r in results)
            r = results[0]
            print(f"| {name:<12} | {n:>5} | {r.images:>6} | {r.images / seconds:>7.0f} | "
                  f"{r.megabytes / seconds:>7.1f} | {max(x.peak_rss_mb for x in results):>11.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
