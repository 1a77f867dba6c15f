"""Rewrite the header of a received file without touching its pixel data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian


def rewrite_header(src: Path, dst: Path, mutate: Callable[[Dataset], object]) -> Dataset:
    """Write `src` to `dst` with `mutate` applied to its header; fsyncs `dst`.

    Everything from the Pixel Data element on is copied byte for byte, so compressed or large
    pixel data is neither decoded nor held in memory. Returns the (mutated) header.
    """
    with open(src, "rb") as f:
        ds = dcmread(f, stop_before_pixels=True)
        tail_offset = f.tell()
        deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        if deflated:
            # The whole dataset is one deflate stream: there is no byte offset to copy from.
            ds = dcmread(src)
        mutate(ds)
        for tag in [elem.tag for elem in ds if elem.tag.element == 0]:
            del ds[tag]  # group lengths would be stale after the change
        with open(dst, "wb") as out:
            ds.save_as(out, enforce_file_format=True)
            if not deflated:
                f.seek(tail_offset)
                shutil.copyfileobj(f, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
    return ds
