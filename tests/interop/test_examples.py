"""The examples run as documented."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
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


def _free_range(count: int, offset: int) -> int:
    """A base port with base..base+count and base+offset..+count all free on loopback."""
    for _ in range(50):
        base = random.randrange(20000, 60000 - offset - count)
        ports = [*range(base, base + count), *range(base + offset, base + offset + count)]
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise AssertionError("no free port range")


@pytest.mark.interop
def test_three_sites_example_runs(tmp_path: Path, dcmtk: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "BASE_PORT": str(_free_range(7, 100))}
    result = subprocess.run([str(ROOT / "examples" / "three-sites" / "run.sh"),
                             str(tmp_path / "work")], env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for line in ("siten1   holds 3 of 3 images", "north    holds 3 of 3 images",
                 "central  holds 3 of 3 images", "south    holds 2 of 2 images",
                 "central  holds 2 of 2 images", "7 node(s), 0 unreachable",
                 "stored on 7 node(s)", "stopped 7 nodes"):
        assert line in output, output
    assert output.count("● ") == 7  # the status tree: seven reachable nodes
