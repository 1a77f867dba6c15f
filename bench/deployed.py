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

import subprocess
import sys
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
