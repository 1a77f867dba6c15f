"""File permissions: nothing the node creates is world-writable; private keys stay private.

The process umask is tightened rather than a mode passed at each place a file is made: files
and folders also come from SQLite, alembic, pynetdicom's temporary files and the CLI's delete,
restore and export paths, and whatever is added later is covered without anyone remembering.
Only the "others may write" bit is forced off: whether the group may write stays the
administrator's choice (a umask of 002 with a shared group lets other administrators run
`pacsnode` commands that move files).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from node.config import Settings

log = logging.getLogger(__name__)

NEVER = stat.S_IWOTH  # masked off everything the process creates
# A private key's mode has none of these.
KEY_EXPOSED = stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH


def tightened(umask: int) -> int:
    return umask | NEVER


def current_umask() -> int:
    """Read without changing it where Linux says (setting it to read it back would leave a
    moment in which another thread creates files under the wrong mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    previous = os.umask(0o077)  # briefly stricter, never looser
    os.umask(previous)
    return previous


def tighten_umask() -> int:
    """Make the process umask mask off world-write; returns the umask now in force."""
    old = current_umask()
    new = tightened(old)
    if new != old:
        os.umask(new)
        log.debug("umask %03o tightened to %03o: nothing the node creates is world-writable",
                  old, new)
    return new


def private_key_files(settings: Settings) -> list[tuple[str, Path]]:
    """The private keys the settings use, by the setting that names them."""
    keys: list[tuple[str, Path]] = []
    hierarchy_key = settings.tls_file("tls_key")
    if settings.hierarchy.enabled and hierarchy_key is not None:
        keys.append(("hierarchy.tls_key", hierarchy_key))
    for name in ("key", "client_key"):
        path = settings.dicom_tls_file(name)
        if path is not None and path not in [p for _, p in keys]:
            keys.append((f"tls.{name}", path))
    return keys


def exposed(mode: int) -> bool:
    """A key file others than its owner can read or change."""
    return bool(mode & KEY_EXPOSED)


def warn_about_key_files(settings: Settings) -> list[str]:
    """Log (and return) a warning for each private key group or others can read or write."""
    warnings = []
    for setting, path in private_key_files(settings):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue  # loading it reports that
        if exposed(mode):
            warnings.append(f"{setting}: the private key {path} is readable or writable by"
                            f" group or others (mode {stat.S_IMODE(mode):03o}); chmod 600 it")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings
