"""C-STORE ingest benchmark: pacsnode against DCMTK storescp and Orthanc, in one run.

For every receiver, dataset (small 64x64 and CT-sized 512x512 images) and association count
(1 and 4), a fresh receiver with empty storage is started, the images are sent with DCMTK
storescu (TCP_NODELAY=1) over parallel associations, every image is checked to have been
stored (pacsnode: indexed), and images/s, MB/s, the receiver's peak RSS and the CPU seconds it
used during the send are recorded. The runs are interleaved (run 1 of every case, then run 2,
and so on, the receivers in a rotating order) so drift hits every receiver alike; each cell is
the median of the runs, with min-max. A benchmark, not a test: it never fails on the figures.
Every run's files are kept until all runs are done (see `peers.Receiver`): deleting them between
runs slowed the next receiver's file creation on this machine's journal-less ext4. Allow for
the disk space (images x runs x receivers x association counts), and start a second
benchmark a minute after the first has removed its files.

Receivers (`--receivers`, default: every one installed; one that is not is skipped with a note):
  pacsnode  `python -m node.cli serve`, fresh data directory and index; every instance is
            fsynced and indexed before it is acknowledged, with the default settings.
            `--pacsnode-processes` sets its dicom.association_processes (default: left to the
            node, one per CPU core); `--python` what runs
            it (default: this checkout as `pip install .` installs it, see deployed.py).
  dcmtk     DCMTK `storescp --fork -od DIR` (a process per association, files only, no fsync).
  orthanc   Orthanc with its SQLite index in a fresh storage folder (no fsync by default).
  pacsnode-nofsync
            a diagnostic, not a way to run a node: pacsnode as above with os.fsync and
            os.fdatasync made no-ops (bench/nofsync/), so its row beside pacsnode's shows what
            the three syncs per image (file, directory, WAL) cost on this machine.

    python bench/ingest.py                                  # all installed receivers, 3 runs
    python bench/ingest.py --runs 1 --small 200 --ct 50     # a quick check
    python bench/ingest.py --receivers pacsnode --database-url postgresql+psycopg://u:p@host/db

Peak RSS is the receiver process's VmHWM, or for storescp --fork and for pacsnode with more
than one association process the highest sampled sum over the parent and its children.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import image_set, warm
from deployed import add_node_arguments, finish, interpreter, print_medians
from peers import RECEIVERS, STORESCU, PacsNode, Receiver, private_network, send

DATASETS = {"CT": 512, "64x64": 64}  # label -> image size, in the matrix's column order


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float


@dataclass
class Cell:
    receiver: str
    dataset: str
    associations: int
    images: int
    megabytes: float
    runs: list[Run] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def rate(self, seconds: float) -> float:
        return self.images / seconds

    @property
    def median_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)

    def row(self) -> str:
        head = f"| {self.receiver:<8} | {self.dataset:<5} | {self.associations:>5} | " \
               f"{self.images:>6} |"
        if not self.runs:
            return f"{head} failed: {self.failures[0][:80] if self.failures else '?'} |"
        rates = [self.rate(r.seconds) for r in self.runs]
        seconds = self.median_seconds
        note = f" ({len(self.failures)} failed)" if self.failures else ""
        return (f"{head} {self.rate(seconds):>7.0f} | {min(rates):>5.0f}-{max(rates):<5.0f} | "
                f"{self.megabytes / seconds:>7.1f} | "
                f"{max(r.peak_rss_mb for r in self.runs):>11.0f} | "
                f"{statistics.median(r.cpu_seconds for r in self.runs):>5.2f} |{note}")

    def median_rate(self) -> list[float]:
        """The rate of the median run, or nothing when every run failed."""
        return [self.rate(self.median_seconds)] if self.runs else []


def make_receiver(name: str, work: Path, database_url: str | None,
                  pacsnode_processes: int | None, python: str) -> Receiver:
    receiver = RECEIVERS[name]
    if issubclass(receiver, PacsNode):
        return receiver(work, database_url, pacsnode_processes, python)
    return receiver(work)


def run_case(receiver: Receiver, files: list[Path], associations: int) -> Run:
    warm(files)
    receiver.start()
    try:
        receiver.wait_ready()
        cpu_before = receiver.cpu_seconds()
        with receiver.sampler() as sampler:
            seconds = send(files, associations, receiver.ae_title, receiver.port)
            cpu = receiver.cpu_seconds() - cpu_before
        peak = max(receiver.hwm_mb(), sampler.peak_mb)
    finally:
        receiver.stop()
    try:
        stored = receiver.stored()
    except Exception as exc:  # an index that cannot be read counts as nothing stored
        raise RuntimeError(f"cannot count what {receiver.name} stored: {exc}") from exc
    if stored != len(files):
        raise RuntimeError(f"{receiver.name} stored {stored} of {len(files)} images; log: "
                           f"{receiver.log_tail(300)}")
    os.sync()  # write this run's files back now, not in the next case's timed window
    return Run(seconds, peak, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receivers", default=",".join(RECEIVERS),
                        help="comma-separated, from: " + ", ".join(RECEIVERS))
    parser.add_argument("--small", type=int, default=2000, help="number of 64x64 images (0: none)")
    parser.add_argument("--ct", type=int, default=200, help="number of 512x512 images (0: none)")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median is printed)")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--database-url", default=None,
                        help="pacsnode's index (default: SQLite in its data directory)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) /
                        "pacsnode-bench-data", help="where the generated images are kept")
    parser.add_argument("--work", type=Path, default=None,
                        help="parent of the receivers' storage (default: a temporary folder; "
                             "put it on the filesystem you want to measure)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the received files (deleting them makes files created in "
                             "the next minutes slower on ext4 without a journal: use it when "
                             "another benchmark follows)")
    add_node_arguments(parser, netns_note="; always off with --database-url")
    args = parser.parse_args()

    python = interpreter(args.python, args.data) if "pacsnode" in args.receivers else ""
    network = private_network(not args.no_netns and not args.database_url)
    if not Path(STORESCU).exists():
        raise SystemExit(f"DCMTK's {STORESCU} is needed as the sender: apt-get install dcmtk")
    wanted = [name.strip() for name in args.receivers.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in RECEIVERS]
    if unknown:
        raise SystemExit(f"unknown receiver(s) {', '.join(unknown)}; known: {', '.join(RECEIVERS)}")
    names: list[str] = []
    for name in wanted:
        why = RECEIVERS[name].unavailable()
        if why:
            print(f"note: skipping {name}: {why}")
        else:
            names.append(name)
    if not names:
        raise SystemExit("no receiver to measure")

    counts = {label: args.small if size == 64 else args.ct for label, size in DATASETS.items()}
    datasets = {label: image_set(args.data, counts[label], size)
                for label, size in DATASETS.items() if counts[label] > 0}  # 0: not measured
    if not datasets:
        raise SystemExit("nothing to send: --small and --ct are both 0")
    work = args.work or Path(tempfile.mkdtemp(prefix="pacsnode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    receivers = {name: make_receiver(name, work, args.database_url, args.pacsnode_processes,
                                     python)
                 for name in names}
    cells = {(name, label, n): Cell(name, label, n, len(files),
                                    sum(f.stat().st_size for f in files) / 1e6)
             for name in names for label, files in datasets.items()
             for n in args.associations}

    index = "SQLite" if not args.database_url else args.database_url.split("@")[-1]
    print(f"C-STORE ingest, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
          f"{network}, work dir {work}, pacsnode index {index}, {args.runs} run(s) per cell")
    print("receivers: " + "; ".join(RECEIVERS[n].version() or n for n in names)
          + (" (pacsnode dicom.association_processes = "
             f"{'default' if args.pacsnode_processes is None else args.pacsnode_processes}, "
             f"run by {python})" if "pacsnode" in names else ""))
    print("sender: DCMTK storescu, TCP_NODELAY=1, files split round-robin over the associations")
    print("data: " + "; ".join(f"{cell.dataset} {cell.images} images, {cell.megabytes:.1f} MB"
                               for cell in cells.values() if cell.receiver == names[0]
                               and cell.associations == args.associations[0]) + "\n",
          flush=True)

    started = time.monotonic()
    for run in range(args.runs):
        order = names[run % len(names):] + names[:run % len(names)]
        for label, files in datasets.items():
            for n in args.associations:
                for name in order:
                    cell = cells[(name, label, n)]
                    try:
                        result = run_case(receivers[name], files, n)
                    except Exception as exc:
                        cell.failures.append(str(exc))
                        print(f"  run {run + 1}: {name} {label} x{n}: FAILED: {exc}",
                              file=sys.stderr, flush=True)
                        continue
                    cell.runs.append(result)
                    print(f"  run {run + 1}: {name:<8} {label:<5} x{n}: "
                          f"{cell.rate(result.seconds):7.0f} img/s, "
                          f"peak RSS {result.peak_rss_mb:.0f} MB, CPU {result.cpu_seconds:.2f} s",
                          file=sys.stderr, flush=True)
    print(f"({time.monotonic() - started:.0f} s)\n")

    print("| receiver | data  | assoc | images |   img/s | min-max     |    MB/s | peak RSS MB "
          "| CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for cell in cells.values():
        print(cell.row())
    columns = [(label, n) for label in datasets for n in args.associations]
    print_medians(f"images/s, median of {args.runs} run(s):", "receiver",
                  [f"{label} {n} assoc" for label, n in columns],
                  {name: [cells[(name, label, n)].median_rate() for label, n in columns]
                   for name in names}, ranges=False)
    def clean() -> None:
        for receiver in receivers.values():
            receiver.clean()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    finish([c.failures for c in cells.values()], args.keep, clean, work)


if __name__ == "__main__":
    main()
