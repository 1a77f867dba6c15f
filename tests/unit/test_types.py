"""node/ and hierarchy/ type-check: mypy run as scripts/test.sh runs it ([tool.mypy] in
pyproject.toml), so pytest alone catches a type error too."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)  # a first run, without mypy's cache, takes a while on 2 cores
def test_node_and_hierarchy_type_check() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every module was read: the sources, less the generated message modules, which mypy
    # reads through their stubs (hierarchy/rpc/*.pyi).
    sources = [p for top in ("node", "hierarchy") for p in (ROOT / top).rglob("*.py")
               if not re.fullmatch(r"control_pb2(_grpc)?\.py", p.name)]
    stubs = list((ROOT / "hierarchy" / "rpc").glob("*.pyi"))
    checked = re.search(r"no issues found in (\d+) source files", result.stdout)
    assert checked is not None, result.stdout
    assert int(checked.group(1)) == len(sources) + len(stubs), result.stdout
