"""The reference pages generated from the code (scripts/gen_docs.py: the CLI, the gRPC API, the
conformance tables; the settings, scripts/gen_settings_docs.py) are what the code generates
now."""

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


def test_settings_reference_is_current() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_settings_docs.py", "--check"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_settings_reference_names_every_key() -> None:
    from node.config import SECTIONS
    from node.config_docs import keys

    page = (ROOT / "docs" / "reference" / "settings.md").read_text(encoding="utf-8")
    for section, cls in SECTIONS.items():
        assert f"## [{section}]" in page
        for name, _kind, _default, _spec in keys(cls):
            assert f"| `{section}.{name}` |" in page
