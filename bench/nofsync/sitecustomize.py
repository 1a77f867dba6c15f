"""Diagnostic only: loaded by the `pacsnode-nofsync` receiver of bench/ingest.py through
PYTHONPATH, it makes os.fsync and os.fdatasync do nothing in that node's processes.

It shows what pacsnode's durability costs it on the machine at hand (an fsync of each file, of
the directory it is linked into and of the index's WAL, before every acknowledgement): the
figures with and without, side by side in one run. A node started like this acknowledges
images that a power loss can take away. It is never a way to run pacsnode, and no setting
of the node does this.
"""

import os


def _skipped(fd: int) -> None:
    os.fstat(fd)  # still refuses a closed descriptor, as the real call would


os.fsync = _skipped
os.fdatasync = _skipped
