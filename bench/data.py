"""Synthetic Part-10 data sets for the benchmarks, generated once and kept for later runs.

`image_set` writes studies of 50 CT images (tests/dicomgen.py, Explicit VR Little Endian) into a
folder named after the size and count, so runs with other sizes never overwrite each other's
data; `one_study` writes one study of them (what a retrieve fetches). `large_instance` writes
one multi-frame 16-bit instance of a chosen size, streaming the pixel data to disk a frame at a
time.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.dicomgen import ROOT as UID_ROOT  # noqa: E402
from tests.dicomgen import set_monochrome12, write_study  # noqa: E402

# Multi-frame Grayscale Word Secondary Capture Image Storage: a multi-frame 16-bit image.
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
_COMPLETE = ".complete"  # written last: a folder without it is regenerated


def image_set(root: Path, count: int, size: int) -> list[Path]:
    """`count` images of `size` x `size` 16-bit pixels in `root`/<size>x<size>-<count>/, in
    studies of 50 images, like a modality's bursts."""
    return _kept(root / f"{size}x{size}-{count}", count, size, 50)


def one_study(root: Path, count: int, size: int) -> list[Path]:
    """`count` images of `size` x `size` 16-bit pixels, all of one study and series, in
    `root`/study-<size>x<size>-<count>/."""
    return _kept(root / f"study-{size}x{size}-{count}", count, size, count)


def _kept(folder: Path, count: int, size: int, per_study: int) -> list[Path]:
    """The images of `folder`, written first if it is not complete."""
    if not (folder / _COMPLETE).exists():
        staging = folder.with_name(f".{folder.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        made = 0
        while made < count:
            part = min(per_study, count - made)
            for path in write_study(staging / f"s{made}", part, size=size):
                path.rename(staging / path.name)
            shutil.rmtree(staging / f"s{made}")
            made += part
        (staging / _COMPLETE).touch()
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    files = sorted(folder.glob("*.dcm"))
    if len(files) != count:
        raise SystemExit(f"{folder} holds {len(files)} images, not {count}: remove it")
    return files


def warm(files: list[Path]) -> None:
    """Read the files so the sender gets them from the page cache, not from the disk."""
    for path in files:
        with path.open("rb") as f:
            while f.read(1 << 20):
                pass


def large_instance(root: Path, megabytes: int, size: int = 512) -> tuple[Path, str]:
    """One multi-frame instance with about `megabytes` MiB of uncompressed 16-bit pixel data.

    The header is written with pydicom, then the Pixel Data element header and the frames are
    appended one frame at a time, so no more than one frame is ever held in memory. Returns
    the file and its SOP Instance UID (the file is kept for the next run).
    """
    frame_bytes = size * size * 2
    frames = max(1, megabytes * 1024 * 1024 // frame_bytes)
    path = root / f"multiframe-{size}x{size}x{frames}.dcm"
    uid_file = path.with_suffix(".uid")
    if path.exists() and uid_file.exists():
        return path, uid_file.read_text().strip()
    root.mkdir(parents=True, exist_ok=True)
    sop_uid = generate_uid(prefix=UID_ROOT)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_WORD_SC
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = MULTIFRAME_WORD_SC
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = "LARGE^INSTANCE"
    ds.PatientID = "PIDLARGE"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.SeriesInstanceUID = generate_uid(prefix=UID_ROOT)
    ds.StudyDate = "20240115"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACCLARGE"
    ds.StudyID = "1"
    ds.StudyDescription = "LARGE INSTANCE"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40.0
    set_monochrome12(ds, size)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    base = (np.arange(size * size, dtype=np.uint16) * 7) & 0x0FFF
    with staging.open("wb") as out:
        dcmwrite(out, ds, enforce_file_format=True)
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 32-bit length.
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * frame_bytes))
        for i in range(frames):
            out.write(((base + i) & 0x0FFF).astype("<u2").tobytes())
    staging.rename(path)
    uid_file.write_text(sop_uid + "\n")
    return path, sop_uid
