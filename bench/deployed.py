"""pacsnode as the README's first command installs it, for the benchmarks that measure its
processes.

The test environment (`.venv`, made by `scripts/test.sh`) also holds numpy and the other test
tools, and pydicom imports numpy whenever it is installed: about 12 MB more in every process
of the node (two of them with `dicom.association_processes = 0` on two cores), and more
start-up time. A node installed with `pip install .` has none of that. So the benchmarks run
pacsnode from such an installation: a virtual environment kept beside the generated images,
made on first use, and given this checkout's code again on every run (without its
dependencies when they are already there).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from peers import in_private_network

ROOT = Path(__file__).resolve().parents[1]


def interpreter(choice: str, data: Path) -> str:
    """The Python to run pacsnode with: `deployed` (the default: an installation of this
    checkout without test extras, under `data`), `current` (this script's own), or a path.

    Called before `peers.private_network`: pip needs the package index, which the private
    namespace cannot reach; the copy of the script started there finds the installation made."""
    if choice == "current":
        return sys.executable
    if choice != "deployed":
        if not Path(choice).is_file():
            raise SystemExit(f"--python {choice}: no such interpreter")
        return choice
    venv = data / "pacsnode-venv"
    python = venv / "bin" / "python"
    if in_private_network() and python.exists():
        return str(python)
    quiet = ["--quiet", "--disable-pip-version-check"]
    if not python.exists():
        print(f"making {venv}: pip install . (the README's first command)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *quiet, str(ROOT)], check=True)
    else:
        # The dependencies as pyproject.toml has them now, then this checkout's code.
        subprocess.run([str(python), "-m", "pip", "install", *quiet, str(ROOT)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *quiet, "--no-deps",
                        "--force-reinstall", str(ROOT)], check=True)
    return str(python)


def add_node_arguments(parser: argparse.ArgumentParser, *, processes: bool = True,
                       netns_note: str = "") -> None:
    """The options every benchmark that runs pacsnode takes: its interpreter, its association
    processes, and the network it runs in."""
    if processes:
        parser.add_argument("--pacsnode-processes", type=int, default=None,
                            help="pacsnode's dicom.association_processes (default: not set, "
                                 "the node's default, 0: one per core)")
    parser.add_argument("--python", default="deployed",
                        help="pacsnode's interpreter: deployed (default: this checkout installed "
                             "with `pip install .`, no test extras, in a venv under --data), "
                             "current (this script's), or a path")
    parser.add_argument("--no-netns", action="store_true",
                        help="stay in the host's network (default: a private loopback-only "
                             f"namespace when root{netns_note})")


def print_medians(title: str, first: str, columns: Sequence[str],
                  rows: dict[str, Sequence[Sequence[float]]], ranges: bool = True) -> None:
    """A markdown table of the median of each cell's runs (with their range): one row per
    receiver, `rows[name]` its cells in the order of `columns`; a cell without runs failed."""
    print(f"\n{title}\n")
    print(f"| {first} | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, cells in rows.items():
        values = [(f"{statistics.median(v):.0f}"
                   + (f" ({min(v):.0f}-{max(v):.0f})" if ranges else "")) if v else "failed"
                  for v in cells]
        print(f"| {name} | " + " | ".join(values) + " |")


def finish(failures: Sequence[Sequence[str]], keep: bool, clean: Callable[[], None],
           kept_in: Path) -> None:
    """After a benchmark's runs: `clean` up when every run went well (and nothing is to be
    kept), else say how many runs failed, the first failure, and where their files are, and
    exit with status 1. `failures`: each cell's failures."""
    failed = [cell for cell in failures if cell]
    if not failed:
        if not keep:
            clean()
        return
    print(f"\n{sum(len(cell) for cell in failed)} run(s) failed (kept in {kept_in}); "
          f"first: {failed[0][0]}")
    raise SystemExit(1)
