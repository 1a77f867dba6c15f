"""The documentation site builds without a warning: every page in the navigation, every link and
anchor found, every included snippet present (`mkdocs build --strict`, as scripts/test.sh runs)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_documentation_site_builds_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "reference/cli/index.html", "reference/grpc/index.html",
                 "reference/conformance/index.html", "tutorials/first-node/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # The conformance statement includes the generated SOP class tables, not the snippet line.
    conformance = (tmp_path / "site" / "reference/conformance/index.html").read_text()
    assert "1.2.840.10008.5.1.4.1.1.2" in conformance  # CT Image Storage
    assert "--8&lt;--" not in conformance and "--8<--" not in conformance
