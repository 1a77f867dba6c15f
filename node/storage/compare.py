"""Compare a duplicate with the stored copy (duplicate policy "compare",
docs/how-to/partitions.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from node.policy.matching import Difference

# File meta (group 0002) describes the transfer, not the object: never a difference.
_SHOWN = 64


def _tail_digest(path: Path) -> str:
    """Digest of everything from the Pixel Data element on, streamed (never held in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        dcmread(f, stop_before_pixels=True)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _element_differences(stored: Dataset, received: Dataset) -> list[Difference]:
    out: list[Difference] = []
    for tag in sorted(set(stored.keys()) | set(received.keys())):
        a = stored.get(tag)
        b = received.get(tag)
        if a is not None and b is not None and a.value == b.value:
            continue
        element = a if a is not None else b
        keyword = element.keyword or str(element.tag)
        out.append(Difference(
            keyword,
            _short(a.value) if a is not None else "(absent)",
            _short(b.value) if b is not None else "(absent)",
        ))
    return out


def differences(stored_path: Path, received_path: Path) -> list[Difference]:
    """What differs between two files of the same SOP instance (empty: identical)."""
    stored = dcmread(stored_path, stop_before_pixels=True)
    received = dcmread(received_path, stop_before_pixels=True)
    out = _element_differences(stored, received)
    ts_a = str(stored.file_meta.get("TransferSyntaxUID", ""))
    ts_b = str(received.file_meta.get("TransferSyntaxUID", ""))
    if ts_a != ts_b:
        out.append(Difference("TransferSyntaxUID", ts_a, ts_b))
    elif _tail_digest(stored_path) != _tail_digest(received_path):
        out.append(Difference("PixelData", "(stored pixel data)", "(different pixel data)"))
    return out
