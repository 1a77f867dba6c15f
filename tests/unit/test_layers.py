"""The import contract in pyproject.toml (issue 26): layers that hold, policy that does no I/O,
node never importing hierarchy. scripts/test.sh runs `lint-imports` too; this runs the same
check, so `pytest` alone catches an import that breaks a layer."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import node

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pyproject.toml"


def test_the_import_contracts_are_kept() -> None:
    # In a process of its own: import-linter sets up logging, which would take the records
    # later tests capture.
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr


def _layered_names() -> set[str]:
    contract = next(c for c in tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]
                    ["contracts"] if c["id"] == "node-layers")
    names: set[str] = set()
    for layer in contract["layers"]:
        for part in layer.replace(":", "|").split("|"):
            # (a package split over layers by module, as node.internals, counts once;
            # test_internals_fence checks that each of its modules has a layer)
            names.add(part.strip().strip("()").split(".")[0])
    return names


def test_every_module_of_node_is_in_a_layer() -> None:
    # A module left out of the layers is checked against nothing: a new package or top-level
    # module must be given its place in pyproject.toml's node-layers contract.
    present = {m.name for m in pkgutil.iter_modules(node.__path__)}
    missing = present - _layered_names()
    assert not missing, f"not in a layer of pyproject.toml's node-layers contract: {missing}"
