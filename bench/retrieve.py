"""C-GET and C-MOVE benchmark: pacsnode against Orthanc, in one run.

Both archives are started once with empty storage (pacsnode with its default settings, as
`pacsnode serve` runs it; Orthanc with its SQLite index, as in bench/ingest.py) and given the
same studies with DCMTK storescu: one study of small (64x64) images and one of CT-sized
(512x512 by default) 16-bit images. Each study is then retrieved whole, at STUDY level, with
DCMTK getscu (C-GET: the images come back on getscu's own association and are written to a
fresh folder) and with DCMTK movescu (C-MOVE to a DCMTK storescp, started fresh for the run
with a folder of its own), and the time the SCU takes, from its start to its exit after the
final response, is recorded with the CPU seconds the archive used meanwhile. What arrives is
written to `--received` (default: /dev/shm, so that the receivers' disk writes do not decide
the figures) and removed after each run's check: every image arrived, and for pacsnode each
received file's data set is byte for byte the stored file's (the file meta aside: each
writer makes its own).

The runs are interleaved (run 1 of every case, then run 2, ...; the archives in a rotating
order) so drift hits both alike; each cell is the median of the runs with min-max. Every
DCMTK process gets TCP_NODELAY=1 (without it DCMTK stalls ~40 ms per small message on
loopback). A benchmark, not a test: it never fails on the figures. As root it runs in a network
namespace of its own with only loopback (`--no-netns`: the host's).

    python bench/retrieve.py                                   # 3 runs, both archives
    python bench/retrieve.py --runs 1 --small 200 --ct 50      # a quick check
    python bench/retrieve.py --ct-size 256 --ct 300            # the issue's 300 256x256 images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import one_study, warm
from deployed import add_node_arguments, finish, interpreter, print_medians
from peers import (
    DCMTK_ENV,
    STORESCP,
    STORESCU,
    Orthanc,
    PacsNode,
    Receiver,
    free_port,
    private_network,
    send,
)

GETSCU = "/usr/bin/getscu"
MOVESCU = "/usr/bin/movescu"
DESTINATION = "DEST"  # the C-MOVE destination's AE title, known to both archives
OPERATIONS = ("C-GET", "C-MOVE")


class OrthancArchive(Orthanc):
    """Orthanc as in bench/ingest.py, answering C-GET and C-MOVE from any AE, with the
    benchmark's storescp as its C-MOVE destination."""

    def __init__(self, work: Path, destination_port: int) -> None:
        super().__init__(work)
        self.destination_port = destination_port

    def prepare(self) -> None:
        super().prepare()
        settings = json.loads(self.config.read_text())
        settings.update({
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {DESTINATION: [DESTINATION, "127.0.0.1",
                                              self.destination_port]},
        })
        self.config.write_text(json.dumps(settings, indent=2))


class PacsNodeArchive(PacsNode):
    """pacsnode with its default settings (no [dicom] section unless `processes` is given),
    the benchmark's storescp in its device table as the C-MOVE destination."""

    def __init__(self, work: Path, destination_port: int, python: str,
                 processes: int | None = None) -> None:
        super().__init__(work, processes=processes, python=python)
        self.destination_port = destination_port

    def add_destination(self) -> None:
        subprocess.run([self.python, "-m", "node.cli", "device", "add", DESTINATION,
                        "--config", str(self.config), "--host", "127.0.0.1",
                        "--port", str(self.destination_port)],
                       cwd=Path(__file__).resolve().parents[1], check=True,
                       capture_output=True)


@dataclass
class Run:
    seconds: float
    cpu_seconds: float


@dataclass
class Cell:
    archive: str
    dataset: str
    operation: str
    images: int
    megabytes: float
    runs: list[Run] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [self.images / r.seconds for r in self.runs]

    def row(self) -> str:
        head = f"| {self.archive:<8} | {self.dataset:<5} | {self.operation:<6} | {self.images:>6} |"
        if not self.runs:
            return f"{head} failed: {self.failures[0][:80] if self.failures else '?'} |"
        seconds = statistics.median(r.seconds for r in self.runs)
        rates = self.rates()
        note = f" ({len(self.failures)} failed)" if self.failures else ""
        return (f"{head} {self.images / seconds:>7.0f} | {min(rates):>5.0f}-{max(rates):<5.0f} | "
                f"{self.megabytes / seconds:>7.1f} | "
                f"{statistics.median(r.cpu_seconds for r in self.runs):>5.2f} |{note}")


def study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
               .StudyInstanceUID)


def dataset_bytes(path: Path) -> bytes:
    """A Part-10 file's data set: what follows its file meta group."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with path.open("rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


def received(folder: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, as DCMTK names what it receives (<modality>.<UID>)."""
    return {p.name.split(".", 1)[1]: p for p in folder.iterdir() if p.is_file()}


def retrieve(operation: str, archive: Receiver, uid: str, folder: Path) -> float:
    """One retrieve of the study into `folder`; the seconds the SCU took."""
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}"]
    where = ["127.0.0.1", str(archive.port)]
    destination = None
    if operation == "C-GET":
        argv = [GETSCU, "-S", "-aet", "GETSCU", "-aec", archive.ae_title, "-od", str(folder),
                *keys, *where]
    else:
        port = archive.destination_port  # type: ignore[attr-defined]
        destination = subprocess.Popen([STORESCP, "-aet", DESTINATION, "-od", str(folder),
                                        str(port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        wait_listening(port, destination)
        argv = [MOVESCU, "-S", "-aet", "MOVESCU", "-aec", archive.ae_title, "-aem",
                DESTINATION, *keys, *where]
    try:
        started = time.perf_counter()
        done = subprocess.run(argv, env=DCMTK_ENV, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
    finally:
        if destination is not None:
            destination.terminate()
            destination.wait(timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} exited {done.returncode}: {done.stderr[-400:]}")
    return seconds


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {proc.returncode} at start")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"storescp did not listen on {port} within {timeout:.0f} s")


def check(archive: Receiver, folder: Path, sent: list[Path], stored: dict[str, Path]) -> None:
    got = received(folder)
    if len(got) != len(sent):
        raise RuntimeError(f"{archive.name}: {len(got)} of {len(sent)} images arrived")
    for sop, path in stored.items():
        if dataset_bytes(got[sop]) != dataset_bytes(path):
            raise RuntimeError(f"{archive.name}: {sop} arrived with other bytes than stored")


def stored_files(node: PacsNode) -> dict[str, Path]:
    return {str(sop): node.storage / str(path)
            for sop, path in node.query("select sop_instance_uid, path from instances")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000, help="64x64 images (0: none)")
    parser.add_argument("--ct", type=int, default=300, help="CT-sized images (0: none)")
    parser.add_argument("--ct-size", type=int, default=512, help="CT images' rows and columns")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median printed)")
    parser.add_argument("--archives", default="pacsnode,orthanc")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) /
                        "pacsnode-bench-data", help="where the generated images are kept")
    parser.add_argument("--work", type=Path, default=None,
                        help="the archives' storage and what was retrieved (default: a "
                             "temporary folder, removed at the end unless --keep)")
    parser.add_argument("--received", type=Path, default=None,
                        help="where getscu and storescp write what they receive (default: "
                             "/dev/shm when it exists, else the work folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    add_node_arguments(parser)
    args = parser.parse_args()

    wanted = [name.strip() for name in args.archives.split(",") if name.strip()]
    python = interpreter(args.python, args.data) if "pacsnode" in wanted else ""
    network = private_network(not args.no_netns)
    for tool in (STORESCU, STORESCP, GETSCU, MOVESCU):
        if not Path(tool).exists():
            raise SystemExit(f"DCMTK's {tool} is needed: apt-get install dcmtk")
    names = []
    for name in wanted:
        why = {"pacsnode": None, "orthanc": Orthanc.unavailable()}.get(name, "unknown archive")
        if why:
            print(f"note: skipping {name}: {why}")
        else:
            names.append(name)
    if not names:
        raise SystemExit("no archive to measure")

    sizes = {"CT": (args.ct_size, args.ct), "64x64": (64, args.small)}
    studies = {label: one_study(args.data, count, size)
               for label, (size, count) in sizes.items() if count > 0}
    uids = {label: study_uid(files[0]) for label, files in studies.items()}
    work = args.work or Path(tempfile.mkdtemp(prefix="pacsnode-retrieve-"))
    work.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")
    received_root = args.received or (Path(tempfile.mkdtemp(prefix="pacsnode-retrieve-",
                                                            dir=shm))
                                      if shm.is_dir() else work / "retrieved")
    archives: dict[str, Receiver] = {}
    for name in names:
        if name == "pacsnode":
            archives[name] = PacsNodeArchive(work, free_port(), python,
                                             args.pacsnode_processes)
        else:
            archives[name] = OrthancArchive(work, free_port())
    cells = {(name, label, op): Cell(name, label, op, len(files),
                                     sum(f.stat().st_size for f in files) / 1e6)
             for name in names for label, files in studies.items() for op in OPERATIONS}

    settings = ("default settings" if args.pacsnode_processes is None else
                f"dicom.association_processes = {args.pacsnode_processes}")
    print(f"C-GET and C-MOVE, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
          f"{network}, work dir {work}, {args.runs} run(s) per cell")
    print("archives: " + "; ".join(
        (archives[n].version() + (f" ({settings}, run by {python})"
                                  if n == "pacsnode" else "")) for n in names))
    print(f"SCUs: DCMTK getscu (-od) and movescu to DCMTK storescp (-od), TCP_NODELAY=1, "
          f"writing into {received_root}")
    print("data: " + "; ".join(f"{label} one study of {len(files)} images, "
                               f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB"
                               for label, files in studies.items()) + "\n", flush=True)

    stored: dict[str, dict[str, Path]] = {}
    try:
        for name, archive in archives.items():
            archive.start()
            archive.wait_ready()
            if isinstance(archive, PacsNodeArchive):
                archive.add_destination()
            for files in studies.values():
                send(files, 1, archive.ae_title, archive.port)
            if isinstance(archive, PacsNodeArchive):
                stored[name] = stored_files(archive)
        # Per archive and study: SOP Instance UID -> the file whose bytes must arrive.
        expected = {name: {label: {p.stem: stored[name][p.stem] for p in files}
                           if name in stored else {} for label, files in studies.items()}
                    for name in names}
        started = time.monotonic()
        for run in range(args.runs):
            order = names[run % len(names):] + names[:run % len(names)]
            for label, files in studies.items():
                warm(files)
                for op in OPERATIONS:
                    for name in order:
                        cell, archive = cells[(name, label, op)], archives[name]
                        folder = received_root / f"{name}-{label}-{op}-{run + 1}"
                        folder.mkdir(parents=True)
                        try:
                            cpu = archive.cpu_seconds()
                            seconds = retrieve(op, archive, uids[label], folder)
                            cpu = archive.cpu_seconds() - cpu
                            check(archive, folder, files, expected[name][label])
                        except Exception as exc:
                            cell.failures.append(str(exc))
                            print(f"  run {run + 1}: {name} {label} {op}: FAILED: {exc}",
                                  file=sys.stderr, flush=True)
                            continue
                        shutil.rmtree(folder, ignore_errors=True)
                        cell.runs.append(Run(seconds, cpu))
                        print(f"  run {run + 1}: {name:<8} {label:<5} {op:<6}: "
                              f"{len(files) / seconds:7.0f} img/s, CPU {cpu:.2f} s",
                              file=sys.stderr, flush=True)
        print(f"({time.monotonic() - started:.0f} s)\n")
    finally:
        for archive in archives.values():
            archive.stop()
        if args.received is None:
            shutil.rmtree(received_root, ignore_errors=True)

    print("| archive  | data  | op     | images |   img/s | min-max     |    MB/s | CPU s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for cell in cells.values():
        print(cell.row())
    columns = [(label, op) for label in studies for op in OPERATIONS]
    print_medians(f"images/s, median of {args.runs} run(s) (min-max):", "archive",
                  [f"{label} {op}" for label, op in columns],
                  {name: [cells[(name, label, op)].rates() for label, op in columns]
                   for name in names})
    finish([c.failures for c in cells.values()], args.keep,
           lambda: shutil.rmtree(work, ignore_errors=True), work)


if __name__ == "__main__":
    main()
