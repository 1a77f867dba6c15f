"""The examples run as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node import config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def test_site_example_configures_a_node(tmp_path: Path) -> None:
    example = (ROOT / "examples" / "site-node.toml").read_text()
    settings_file = tmp_path / "site-node.toml"
    settings_file.write_text(example.replace('"/var/lib/pacsnode"', f'"{tmp_path / "data"}"'))
    assert config.load(settings_file).bootstrap_partition.ae_title == "SITEA"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    result = subprocess.run([str(ROOT / "examples" / "setup-site.sh"), str(settings_file)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = subprocess.run([str(bin_dir / "pacsnode"), "partition", "list", "--json",
                             "--config", str(settings_file)], capture_output=True, text=True)
    assert {p["ae_title"] for p in json.loads(listed.stdout)} == {"SITEA", "CARDIO", "RESEARCH"}
