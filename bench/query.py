"""C-FIND latency on a large index: p50/p95 of typical queries over real associations.

Fills a node's index with 100,000 studies / 1,000,000 instances (index rows only, no files),
starts the node (`pacsnode serve`, a process of its own) and times C-FIND requests from a
pynetdicom SCU on loopback: study-level
queries by patient ID, by patient name with a wildcard, by date range + modality, by accession
number, and a series-level query for one study. When DCMTK is installed it also times the
date-range query with `findscu`, a native client, as a check that the figures are the
node's and not the Python client's. A benchmark, not a test: it prints figures.

    python bench/query.py                          # SQLite in a temporary folder
    python bench/query.py --database-url postgresql+psycopg://user:pw@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from peers import FINDSCU, free_port, reset_database  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from node import config  # noqa: E402
from node.db.models import Instance, Partition, Study  # noqa: E402
from node.internals.tuning import CONNECTION_HANDLERS  # noqa: E402
from node.service import Node  # noqa: E402
from tests.indexfill import FAMILIES, fill  # noqa: E402
from tests.indexfill import ROOT as UID_ROOT  # noqa: E402


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("pacsnode serve exited at start")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("pacsnode serve did not start listening")


def eager(event: evt.Event) -> None:
    """The measuring client's DUL looks for the next answer every 50 us instead of every
    1 ms (pynetdicom's default), so the figures are the node's, not this client's polling
    (DCMTK findscu reads answers as they arrive)."""
    event.assoc.dul._run_loop_delay = 0.00005


def timed_find(assoc, query: Dataset) -> tuple[float, int]:
    started = time.perf_counter()
    matches = 0
    for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01):
            matches += 1
    return (time.perf_counter() - started) * 1000, matches


def findscu_mean(port: int, weeks: list[str], repeats: int) -> float:
    """Mean ms per week-range query as DCMTK findscu sees it: each week asked `repeats` + 1
    times on one association, minus a run that asks once (its start and association)."""
    env = {**os.environ, "TCP_NODELAY": "1"}

    def run(date_range: str, times: int) -> float:
        started = time.perf_counter()
        subprocess.run([FINDSCU, "-S", "-aec", "PACSNODE", "--repeat", str(times),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyDate={date_range}",
                        "-k", "ModalitiesInStudy=CT", "-k", "StudyInstanceUID",
                        "-k", "PatientName", "-k", "PatientID", "-k", "AccessionNumber",
                        "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", str(port)],
                       env=env, check=True, capture_output=True)
        return (time.perf_counter() - started) * 1000

    extra = [run(w, repeats + 1) - run(w, 1) for w in weeks]
    return sum(extra) / (repeats * len(weeks))


def study_query(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                    "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):
        setattr(ds, keyword, keys.get(keyword, ""))
    return ds


def week(rng: random.Random) -> str:
    year, month, day = rng.randint(2015, 2024), rng.randint(1, 12), rng.randint(1, 21)
    return f"{year}{month:02d}{day:02d}-{year}{month:02d}{day + 7:02d}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=50, help="queries timed per kind")
    parser.add_argument("--database-url", default=None, help="default: SQLite")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="pacsnode-query-"))
    port = free_port()
    db_line = f'database_url = "{args.database_url}"\n' if args.database_url else ""
    if args.database_url:
        reset_database(args.database_url)
    settings_file = work / "bench.toml"
    work.mkdir(parents=True, exist_ok=True)
    # A control port of its own: the default one may be another node's on this machine.
    settings_file.write_text(f'[node]\ndata_dir = "{work / "node"}"\n{db_line}'
                             f'listen_host = "127.0.0.1"\nlog_level = "WARNING"\n'
                             f"[bootstrap_partition]\nport = {port}\n"
                             f'[hierarchy]\ncontrol_listen = "127.0.0.1:{free_port()}"\n')
    node = Node(config.load(settings_file))
    node.start()
    assert node.db is not None
    try:
        with node.db.session() as session:
            partition_id, port = session.execute(select(Partition.id, Partition.port)).first()
            have = session.scalar(select(func.count()).select_from(Study)) or 0
        if have < args.studies:
            started = time.perf_counter()
            # 2 series x 5 instances per study: 1,000,000 instances for 100,000 studies.
            fill(node.db, partition_id, args.studies - have)  # type: ignore[arg-type]
            print(f"filled {args.studies - have} studies in {time.perf_counter() - started:.0f} s")
        with node.db.session() as session:
            instances = session.scalar(select(func.count()).select_from(Instance))
    finally:
        node.stop()
    print(f"index: {args.studies} studies, {instances} instances, database "
          f"{'SQLite' if not args.database_url else 'PostgreSQL'}\n")
    # Queried in a `pacsnode serve` process of its own, so the figures do not include this
    # client's decoding of the answers competing for the same GIL.
    server = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config",
                               str(settings_file)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, server)
        rng = random.Random(7)
        n = args.studies

        def pick_study() -> int:
            return rng.randint(1, n)

        kinds = {
            "patient ID": lambda: study_query(PatientID=f"P{(pick_study() + 1) // 2:07d}"),
            "patient name wildcard": lambda: study_query(
                PatientName=f"{rng.choice(FAMILIES)}{rng.randint(0, n // 2)}*"),
            "date range (a week) + modality": lambda: study_query(
                StudyDate=week(rng), ModalitiesInStudy=rng.choice(["CT", "MR", "MG"])),
            "accession number": lambda: study_query(AccessionNumber=f"A{pick_study():08d}"),
        }
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE",
                             evt_handlers=[*CONNECTION_HANDLERS, (evt.EVT_CONN_OPEN, eager)])
        assert assoc.is_established
        print("| query | p50 ms | p95 ms | mean matches |")
        print("|---|---:|---:|---:|")
        for name, make in kinds.items():
            timings, matches = zip(*(timed_find(assoc, make()) for _ in range(args.repeats)),
                                   strict=True)
            print(f"| {name} | {statistics.median(timings):.1f} | "
                  f"{statistics.quantiles(timings, n=20)[18]:.1f} | "
                  f"{statistics.mean(matches):.1f} |", flush=True)
        series_timings = []
        for _ in range(args.repeats):
            ds = Dataset()
            ds.QueryRetrieveLevel = "SERIES"
            ds.StudyInstanceUID = f"{UID_ROOT}.{pick_study()}"
            ds.SeriesInstanceUID = ""
            ds.Modality = ""
            ds.NumberOfSeriesRelatedInstances = ""
            series_timings.append(timed_find(assoc, ds)[0])
        print(f"| series of one study | {statistics.median(series_timings):.1f} | "
              f"{statistics.quantiles(series_timings, n=20)[18]:.1f} | 2 |")
        assoc.release()
        if Path(FINDSCU).exists():
            weeks = [week(rng) for _ in range(5)]
            per_query = findscu_mean(port, weeks, args.repeats // len(weeks) or 1)
            print(f"\nDCMTK findscu, a week's range + modality CT, {len(weeks)} weeks, one "
                  f"association each: {per_query:.1f} ms per query (mean)")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
