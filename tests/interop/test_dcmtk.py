"""DCMTK's echoscu and storescu as independent peers of a running node."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_palette_files, get_testdata_file
from sqlalchemy import func, select

from node.db.models import Instance
from node.storage.space import measure
from tests.conftest import RunningNode, dcmtk_env, stored_files
from tests.dicomgen import make_instance, write_study
from tests.integration.test_find import find
from tests.smallfs import MiB, fill, small_fs  # noqa: F401  (the fixture)

pytestmark = pytest.mark.interop

# storescu proposes one compressed syntax per run, first in a context with the uncompressed ones.
COMPRESSED = {"JPEG2000.dcm": "-xw", "MR_small_RLE.dcm": "-xr", "SC_rgb_jpeg_gdcm.dcm": "-xs",
              "MR_small_jp2klossless.dcm": "-xv"}


def run(tool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tool), *args], env=dcmtk_env(), capture_output=True, text=True,
                          timeout=120)


def storescu(dcmtk: Path, node: RunningNode, *files: Path, calling: str = "STORESCU",
             called: str = "PACSNODE", options: tuple[str, ...] = ()
             ) -> subprocess.CompletedProcess[str]:
    return run(dcmtk / "storescu", *options, "-aet", calling, "-aec", called, "127.0.0.1",
               str(node.port), *map(str, files))


def stored_path(node: RunningNode, original: Path) -> Path:
    ds = dcmread(original, stop_before_pixels=True)
    return (node.storage / "PACSNODE" / ds.StudyInstanceUID / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm")


def test_echoscu(node: RunningNode, dcmtk: Path) -> None:
    assert run(dcmtk / "echoscu", "-aec", "PACSNODE", "127.0.0.1", str(node.port)).returncode == 0
    wrong = run(dcmtk / "echoscu", "-aec", "NOBODY", "127.0.0.1", str(node.port))
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr + wrong.stdout


@pytest.mark.parametrize(("name", "flag"), COMPRESSED.items())
def test_compressed_data_is_stored_as_received(node: RunningNode, dcmtk: Path, name: str,
                                               flag: str) -> None:
    original = Path(get_testdata_file(name))  # type: ignore[arg-type]
    result = storescu(dcmtk, node, original, options=(flag,))
    assert result.returncode == 0, result.stderr
    sent = dcmread(original)
    kept = dcmread(stored_path(node, original))
    assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert kept.PixelData == sent.PixelData  # never transcoded


def test_calling_ae_not_recognised_by_a_closed_partition(node: RunningNode, dcmtk: Path,
                                                         tmp_path: Path) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--no-accept-any").exit_code == 0
    [file] = write_study(tmp_path, 1)
    refused = storescu(dcmtk, node, file, calling="UNKNOWN")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    assert node.cli("device", "add", "KNOWN", "--host", "127.0.0.1").exit_code == 0
    assert storescu(dcmtk, node, file, calling="KNOWN").returncode == 0
    assert stored_path(node, file).is_file()


def test_storescu_sees_the_failure_status_for_a_hostile_uid(node: RunningNode, dcmtk: Path,
                                                            tmp_path: Path) -> None:
    ds = make_instance()
    ds.StudyInstanceUID = "1.2.3.4.5/../../../evil"
    path = tmp_path / "hostile.dcm"
    ds.save_as(path, enforce_file_format=True)
    result = run(dcmtk / "storescu", "-d", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
                 str(path))
    output = result.stdout + result.stderr
    assert "0xc001" in output.lower()
    assert "StudyInstanceUID" in output  # the Error Comment says what was wrong
    assert list(node.storage.rglob("*.dcm")) == []


@pytest.mark.slow
def test_four_parallel_storescu_associations(node: RunningNode, dcmtk: Path,
                                             tmp_path: Path) -> None:
    studies = [write_study(tmp_path / f"s{i}", 25, size=128) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda files: storescu(dcmtk, node, *files), studies))
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    with node.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 100
    for files in studies:
        for original in files:
            assert dcmread(stored_path(node, original)).PixelData == dcmread(original).PixelData


def test_node_order_when_configured(make_node: object, dcmtk: Path) -> None:
    """transfer_syntax_preference = "node": the node's list decides; the sender converts."""
    node = make_node('[dicom]\ntransfer_syntax_preference = "node"\n')  # type: ignore[operator]
    original = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    # -xr proposes [RLE, uncompressed...]; DCMTK can compress to RLE, so both orders work here.
    assert storescu(dcmtk, node, original, options=("-xr",)).returncode == 0
    kept = dcmread(stored_path(node, original))
    assert kept.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_storescu_sees_out_of_resources_while_storage_is_suspended_and_findscu_works(
        small_fs: Callable[[int], Path],  # noqa: F811  (first: unmounted last)
        make_node: Callable[..., RunningNode], dcmtk: Path, tmp_path: Path) -> None:
    disk = small_fs(8 * MiB)
    node = make_node("[storage]\nlow_watermark = 50\nhigh_watermark = 60\n"
                     "critical_watermark = 70\nauto_purge = false\n",
                     storage_dir=disk / "storage")
    fill(disk / "ballast", int(measure(disk).total * 0.8))
    node.node.monitor.check()  # type: ignore[union-attr]  (the interval's check, now)
    [path] = write_study(tmp_path / "s", 1, size=64)
    refused = run(dcmtk / "storescu", "-d", "-aec", "PACSNODE", "127.0.0.1", str(node.port),
                  str(path))
    output = refused.stdout + refused.stderr
    assert "0xa700" in output.lower() and "storage suspended" in output
    assert list(node.storage.rglob("*.dcm")) == []
    found = run(dcmtk / "findscu", "-S", "-aec", "PACSNODE", "-k", "QueryRetrieveLevel=STUDY",
                "-k", "StudyInstanceUID", "127.0.0.1", str(node.port))
    assert found.returncode == 0, found.stderr
    (disk / "ballast").unlink()
    assert storescu(dcmtk, node, path).returncode == 0
    assert len(stored_files(node.storage)) == 1


@pytest.mark.parametrize("name", ["color-pl.dcm", "color-px.dcm", "bad_sequence.dcm",
                                  "hotiron.dcm"])
def test_storescu_sends_objects_a_pacs_must_keep(node: RunningNode, dcmtk: Path,
                                                 name: str) -> None:
    """Retired Ultrasound, a hex-hash UID object and a Color Palette from storescu, which
    proposes exactly the files' SOP classes with -R (it refuses to send a SOP class it does
    not know at all: those are tested with pynetdicom, tests/integration/test_sop_classes)."""
    original = Path(get_testdata_file(name) or get_palette_files(name)[0])
    result = storescu(dcmtk, node, original, options=("-R", "-xs"))
    assert result.returncode == 0, result.stdout + result.stderr
    ds = dcmread(original, stop_before_pixels=True)
    [stored] = stored_files(node.storage)
    # storescu re-encodes (sequence lengths, group lengths): the same dataset, stored as sent.
    assert dcmread(stored) == dcmread(original)
    found, final = find(node, "IMAGE", SOPInstanceUID=ds.SOPInstanceUID, StudyInstanceUID="")
    assert final == 0 and [f.StudyInstanceUID for f in found] == [ds.get("StudyInstanceUID",
                                                                         "")]
