"""The reference pages generated from the code (scripts/gen_docs.py: the CLI, the gRPC API, the
conformance tables) are what the code generates now. Settings have their own test
(test_settings_docs.py)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_reference_pages_are_current():
    result = subprocess.run([sys.executable, "scripts/gen_docs.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (
        "a generated page is stale; run `python scripts/gen_docs.py` and commit it:\n"
        + result.stdout + result.stderr)
