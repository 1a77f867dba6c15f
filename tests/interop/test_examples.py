"""The examples run as documented."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select

from node import config
from node.db.models import Instance
from tests.conftest import RunningNode, dcmtk_env

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


RUN_SH = ROOT / "examples" / "three-sites" / "run.sh"
# What a new user's shell has: no virtual environment on PATH.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def run_example(work: Path, path: str, *, script: Path = RUN_SH, base_port: int | None = None,
                timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PATH": path,
           "BASE_PORT": str(base_port if base_port is not None else _free_range(7, 100))}
    env.pop("PACSNODE", None)
    env.pop("VIRTUAL_ENV", None)
    started = time.monotonic()
    result = subprocess.run([str(script), str(work)], env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result, time.monotonic() - started


@pytest.mark.interop
def test_three_sites_example_runs_from_a_checkout_without_the_venv_on_path(
        tmp_path: Path, dcmtk: Path) -> None:
    installed = ROOT / ".venv" / "bin" / "pacsnode"
    if not installed.exists():
        pytest.skip(f"no {installed}: the tests run from another environment")
    result, _ = run_example(tmp_path / "work", SYSTEM_PATH)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"== pacsnode {metadata.version('pacsnode')} ({installed})" in output
    for line in ("siten1   holds 3 of 3 images", "north    holds 3 of 3 images",
                 "central  holds 3 of 3 images", "south    holds 2 of 2 images",
                 "central  holds 2 of 2 images", "7 node(s), 0 unreachable",
                 "stored on 7 node(s)", "stopped 7 nodes"):
        assert line in output, output
    assert output.count("● ") == 7  # the status tree: seven reachable nodes


def test_three_sites_example_without_pacsnode_fails_at_once_saying_why(tmp_path: Path) -> None:
    # A checkout where the README's first command was not run: no .venv, nothing on PATH.
    if shutil.which("pacsnode", path=SYSTEM_PATH):
        pytest.skip("this machine has a pacsnode outside any virtual environment")
    checkout = tmp_path / "checkout"
    shutil.copytree(RUN_SH.parent, checkout / "examples" / "three-sites")
    result, took = run_example(tmp_path / "work", SYSTEM_PATH,
                               script=checkout / "examples" / "three-sites" / "run.sh")
    assert result.returncode == 1 and took < 10
    assert result.stderr == (
        f"run.sh: pacsnode is neither on PATH nor in {checkout}/.venv; install it first: cd"
        f" {checkout} && python3 -m venv .venv && .venv/bin/pip install . (or set"
        " PACSNODE=/path/to/pacsnode)\n")
    assert not (tmp_path / "work").exists()  # nothing was started


@pytest.mark.interop
def test_three_sites_example_names_a_node_that_cannot_start(tmp_path: Path, dcmtk: Path) -> None:
    bin_dir = Path(sys.executable).parent  # this time the venv is on PATH
    base = _free_range(7, 100)
    with socket.socket() as other_program:
        other_program.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other_program.bind(("127.0.0.1", base + 3))  # siten1's DICOM port
        other_program.listen()
        result, took = run_example(tmp_path / "work", f"{bin_dir}:{SYSTEM_PATH}",
                                   base_port=base, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < 50, took  # not the 60 s wait for a registration that cannot come
    assert (f"node siten1 exited; the end of {tmp_path / 'work'}/siten1.log:\n"
            f"Error: cannot listen on DICOM port {base + 3} (127.0.0.1) of partition SITEN1:"
            " address already in use") in result.stderr
    assert "stopped 7 nodes" in result.stdout


COMPRESSED = ["JPEG-lossy.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_jpeg_gdcm.dcm",
              "MR_small_RLE.dcm", "JPEG2000.dcm"]


@pytest.mark.interop
@pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)
def test_the_readme_sends_compressed_files_as_they_are_with_dcmsend(
        node: RunningNode, dcmtk: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    study.mkdir()
    for name in [*COMPRESSED, "CT_small.dcm"]:
        shutil.copy(get_testdata_file(name), study / name)
    files = sorted(study.glob("*.dcm"))
    # What docs/tutorials/first-node.md warns of: storescu proposes uncompressed syntaxes only.
    plain = subprocess.run([str(dcmtk / "storescu"), "-aet", "CT1", "-aec", "PACSNODE",
                            "127.0.0.1", str(node.port), str(study / "JPEG-lossy.dcm")],
                           env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "unable to convert" in plain.stdout + plain.stderr
    # What it says to use instead (the same tutorial, and the README's quick start).
    sent = subprocess.run([str(dcmtk / "dcmsend"), "-aet", "CT1", "-aec", "PACSNODE",
                           "127.0.0.1", str(node.port), *map(str, files)],
                          env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    with node.db.session() as session:
        stored = {i.sop_instance_uid: (node.storage / i.path, i.transfer_syntax_uid)
                  for i in session.scalars(select(Instance))}
    for path in files:
        original = dcmread(path, stop_before_pixels=True)
        kept, syntax = stored[original.SOPInstanceUID]
        assert syntax == original.file_meta.TransferSyntaxUID, path.name  # not transcoded
        assert dcmread(kept).PixelData == dcmread(path).PixelData, path.name
    assert len(stored) == len(files)
    assert {str(stored[dcmread(study / n, stop_before_pixels=True).SOPInstanceUID][1])
            for n in COMPRESSED} >= {"1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.50",
                                     "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.91"}
