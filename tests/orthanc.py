"""Orthanc as a real peer in tests: a process of its own on a loopback port, its index and
files in a folder that outlives restarts, no HTTP server. Stopped, killed, frozen and
continued by its own process id."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import dcmtk_env, free_port, wait_for

BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def available() -> bool:
    return Path(BINARY).exists()


class Orthanc:
    def __init__(self, folder: Path, ae_title: str = "ORTHANC",
                 modalities: dict[str, tuple[str, int]] | None = None) -> None:
        """`modalities`: name -> (AE title, port on 127.0.0.1) of the peers Orthanc knows
        (it takes storage commitment requests only from those, and reports to them)."""
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.modalities = dict(modalities or {})
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def config(self) -> Path:
        return self.folder / "orthanc.json"

    def start(self) -> Orthanc:
        self.config.write_text(json.dumps({
            "Name": "TEST", "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"), "HttpServerEnabled": False,
            "RemoteAccessAllowed": False, "DicomServerEnabled": True,
            "DicomAet": self.ae_title, "DicomPort": self.port, "DicomCheckCalledAet": False,
            "Plugins": [], "SaveJobs": False,
            "DicomModalities": {name: [aet, "127.0.0.1", port]
                                for name, (aet, port) in self.modalities.items()},
        }))
        log = (self.folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen([BINARY, "--verbose", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT, env=dcmtk_env())
        log.close()
        assert wait_for(self.answers_echo, timeout=30), self.log_tail()
        return self

    def answers_echo(self) -> bool:
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 2
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.get("Status", -1)) == 0

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.signal(signal.SIGCONT)  # a frozen one must run to stop
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        path = self.folder / "orthanc.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
