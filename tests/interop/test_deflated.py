"""Deflated datasets from real writers: DCMTK's dcmconv and storescu, and pydicom's
image_dfl.dcm, stored byte for byte and found by C-FIND."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.conftest import RunningNode, stored_files
from tests.hostile import dataset_bytes
from tests.integration.test_find import find
from tests.interop.test_dcmtk import run, storescu
from tests.scu import statuses, store

pytestmark = pytest.mark.interop

# pydicom's files that dcmconv deflates and storescu sends as dcmconv wrote them (no group
# lengths to drop), one per SOP instance; their deflate streams have odd and even lengths.
DCMCONV_FILES = (
    "ExplVR_BigEnd.dcm", "SC_rgb_small_odd.dcm", "SC_ybr_full_422_uncompressed.dcm",
    "chrArab.dcm", "chrFren.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrH31.dcm", "chrH32.dcm",
    "chrHbrw.dcm", "chrI2.dcm", "chrJapMulti.dcm", "chrKoreanMulti.dcm", "chrRuss.dcm",
    "chrX1.dcm", "chrX2.dcm", "examples_overlay.dcm", "examples_palette.dcm", "reportsi.dcm",
    "rtplan.dcm", "rtstruct.dcm", "test-SR.dcm", "waveform_ecg.dcm",
)


def pydicom_file(name: str) -> Path:
    found = get_testdata_file(name) or get_charset_files(name)
    assert found, f"pydicom has no file {name}"
    return Path(found[0] if isinstance(found, list) else found)


def stored_by_sop(node: RunningNode) -> dict[str, Path]:
    return {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
            for p in stored_files(node.storage)}


def found_sops(node: RunningNode, sops: list[str]) -> set[str]:
    found, final = find(node, "IMAGE", SOPInstanceUID="\\".join(sops))
    assert final == 0
    return {ds.SOPInstanceUID for ds in found}


def test_storescu_deflated_data_padded_to_even_length_is_stored(
        node: RunningNode, dcmtk: Path, tmp_path: Path) -> None:
    """storescu sends a deflate stream of odd length with one 00 byte after it: the node
    stores what it sent (the stream and that byte), and finds every instance."""
    originals = [pydicom_file(name) for name in DCMCONV_FILES]
    deflated = []
    for original in originals:
        target = tmp_path / original.name
        converted = run(dcmtk / "dcmconv", "+td", str(original), str(target))
        assert converted.returncode == 0, converted.stderr
        deflated.append(target)
    odd = [p for p in deflated if len(dataset_bytes(p)) % 2]
    assert 8 <= len(odd) <= len(deflated) - 8, "both parities must be exercised"

    result = storescu(dcmtk, node, *deflated, options=("-xd", "-nh"))
    assert result.returncode == 0, result.stdout + result.stderr
    stored = stored_by_sop(node)
    sops = []
    for path in deflated:
        ds = dcmread(path, stop_before_pixels=True)
        kept = stored[ds.SOPInstanceUID]
        assert dcmread(kept, stop_before_pixels=True).file_meta.TransferSyntaxUID \
            == DeflatedExplicitVRLittleEndian
        # What storescu sent: dcmconv's stream, padded to even length.
        sent = dataset_bytes(path)
        assert dataset_bytes(kept) == sent + b"\0" * (len(sent) % 2), path.name
        sops.append(ds.SOPInstanceUID)
    assert found_sops(node, sops) == set(sops)


def test_gzip_trailer_after_the_deflate_stream_is_stored(node: RunningNode) -> None:
    """pydicom's image_dfl.dcm ends with the gzip trailer of its stream; sent as its own bytes
    it is stored byte for byte."""
    original = Path(get_testdata_file("image_dfl.dcm"))  # type: ignore[arg-type]
    assert statuses(store(node.port, [original], syntaxes=[DeflatedExplicitVRLittleEndian])) \
        == [0]
    sop = dcmread(original, stop_before_pixels=True).SOPInstanceUID
    assert dataset_bytes(stored_by_sop(node)[sop]) == dataset_bytes(original)
    assert found_sops(node, [sop]) == {sop}


def test_data_after_the_deflate_stream_that_is_not_padding_is_refused(
        node: RunningNode, tmp_path: Path) -> None:
    original = Path(get_testdata_file("image_dfl.dcm"))  # type: ignore[arg-type]
    broken = tmp_path / "trailing.dcm"
    broken.write_bytes(original.read_bytes() + b"\0" * 16)
    [response] = store(node.port, [broken], syntaxes=[DeflatedExplicitVRLittleEndian])
    assert int(response.Status) == 0xC000
    assert "after the end of the deflated" in response.ErrorComment
    assert stored_files(node.storage) == []
