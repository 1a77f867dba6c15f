"""Peak memory of a pacsnode receiving one very large instance, and 4 associations at once.

Each case starts a fresh `python -m node.cli serve` (SQLite index; every instance is fsynced and
indexed before it is acknowledged), sends with DCMTK storescu (TCP_NODELAY=1), samples the
node's VmRSS during the transfer and reads its VmHWM (peak resident memory since start) from
/proc at the end, then checks that what was sent was stored and indexed:

  (a) one multi-frame 16-bit instance of --size-mb MiB of uncompressed pixel data (generated
      once, streamed to disk a frame at a time, kept under --data for later runs);
  (b) --ct CT images (512x512) over --associations parallel associations.

The target is a peak RSS below --target-mb (200 MB) in both cases; the script prints whether
each case is under it and never fails on it. A benchmark, not a test.

    python bench/memory.py                    # 1 GiB instance, 200 CT images over 4 associations
    python bench/memory.py --size-mb 100      # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data import image_set, large_instance, warm
from deployed import add_node_arguments, interpreter
from peers import STORESCU, PacsNode, private_network, send


@dataclass
class Measure:
    case: str
    megabytes: float
    seconds: float
    idle_mb: float  # VmRSS once the node answered its first C-ECHO
    sampled_peak_mb: float  # highest VmRSS sampled during the transfer
    hwm_mb: float  # VmHWM at the end
    stored: str  # what the check found


def measure(work: Path, case: str, files: list[Path], associations: int,
            check: Callable[[PacsNode], str], python: str) -> Measure:
    node = PacsNode(work, python=python)
    warm(files)
    node.start()
    try:
        node.wait_ready()
        with node.sampler(interval=0.02) as sampler:
            idle = sampler.rss_kb() / 1024
            # -R: propose only the SOP classes of the files (the large one is multi-frame SC).
            seconds = send(files, associations, node.ae_title, node.port, extra=("-R",))
        hwm = node.hwm_mb()
    finally:
        node.stop()
    try:
        stored = check(node)
    except Exception as exc:
        stored = f"CHECK FAILED: {exc}"
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    node.clean()
    return Measure(case, megabytes, seconds, idle, sampler.peak_mb, hwm, stored)


def check_large(path: Path, sop_uid: str) -> Callable[[PacsNode], str]:
    def check(node: PacsNode) -> str:
        rows = node.query("select path, size from instances where sop_instance_uid = :uid",
                          uid=sop_uid)
        if not rows:
            return "NOT INDEXED"
        relpath, size = rows[0]
        on_disk = (node.storage / str(relpath)).stat().st_size
        sent = path.stat().st_size
        # The node writes the file meta it received; the data set itself is the same length.
        ok = abs(on_disk - sent) < 1024 and on_disk == size
        return (f"{'ok' if ok else 'SIZE MISMATCH'}: indexed, {on_disk} bytes on disk "
                f"(index says {size}, sent {sent})")
    return check


def check_count(count: int) -> Callable[[PacsNode], str]:
    def check(node: PacsNode) -> str:
        indexed = node.stored()
        files = sum(1 for p in node.storage.rglob("*.dcm") if ".incoming" not in p.parts)
        ok = indexed == count == files
        return f"{'ok' if ok else 'MISSING'}: {indexed} of {count} indexed, {files} files"
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024,
                        help="pixel data of the large instance, MiB")
    parser.add_argument("--ct", type=int, default=200, help="CT images for case (b)")
    parser.add_argument("--associations", type=int, default=4, help="for case (b)")
    parser.add_argument("--target-mb", type=float, default=200.0)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) /
                        "pacsnode-bench-data", help="where the generated data are kept")
    parser.add_argument("--work", type=Path, default=None,
                        help="parent of the node's data directory (default: a temporary folder)")
    add_node_arguments(parser, processes=False)
    args = parser.parse_args()

    python = interpreter(args.python, args.data)
    network = private_network(not args.no_netns)
    if not Path(STORESCU).exists():
        raise SystemExit(f"DCMTK's {STORESCU} is needed as the sender: apt-get install dcmtk")
    started = time.monotonic()
    large, sop_uid = large_instance(args.data, args.size_mb)
    made = time.monotonic() - started
    ct = image_set(args.data, args.ct, 512)
    work = args.work or Path(tempfile.mkdtemp(prefix="pacsnode-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"pacsnode memory, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
          f"{network}, work dir {work}, SQLite index, sender DCMTK storescu (TCP_NODELAY=1), "
          f"pacsnode run by {python}")
    print(f"large instance: {large} ({large.stat().st_size / 1e6:.0f} MB"
          f"{f', generated in {made:.0f} s' if made > 1 else ''})\n", flush=True)

    results = [
        measure(work, f"(a) one {args.size_mb} MiB instance, 1 assoc", [large], 1,
                check_large(large, sop_uid), python),
        measure(work, f"(b) {args.ct} CT images, {args.associations} assoc", ct,
                args.associations, check_count(len(ct)), python),
    ]
    print(f"| case | MB sent | s | MB/s | idle RSS MB | peak sampled RSS MB | VmHWM MB | "
          f"< {args.target_mb:.0f} MB | stored |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        peak = max(r.hwm_mb, r.sampled_peak_mb)
        print(f"| {r.case} | {r.megabytes:.0f} | {r.seconds:.1f} | {r.megabytes / r.seconds:.1f} "
              f"| {r.idle_mb:.0f} | {r.sampled_peak_mb:.0f} | {r.hwm_mb:.0f} | "
              f"{'yes' if peak < args.target_mb else 'NO'} | {r.stored} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
