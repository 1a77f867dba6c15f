"""An association process other than the node's main one (`dicom.association_processes`).

Started by the main process (`supervisor.AssociationProcesses`) as
`python -m node.processes.association FD`, FD being its end of the channel. It serves the
connections the main process hands it, with the node's settings, database and storage, and
asks the main process to admit each association and to wake forwarding. It stops when told
to, or when the main process is gone (its channel closes).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys

from node import permissions, serving
from node.activity import ActivityLog
from node.config import Settings
from node.db.database import Database
from node.logs import configure_logging
from node.processes.channel import Channel, RemoteAdmissions
from node.processes.tuning import tune_process
from node.scp.listener import Listen
from node.storage.space import StorageGuard

log = logging.getLogger(__name__)


class _Served:
    """`listener.Dispatcher` here: every connection is served here, and its end reported."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def hand_off(self, sock: socket.socket, address: tuple[str, int], listen: Listen,
                 request: bytes = b"") -> bool:
        return False

    def finished(self, address: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            self.channel.send("closed", address[0])


def serve(channel: Channel, settings: Settings, number: int) -> None:
    storage = settings.storage_dir
    serving.prepare_process(storage)
    db = Database(settings.database_url,
                  connect_timeout=settings.node.database_connect_timeout,
                  timeout=settings.node.database_timeout)
    activity = ActivityLog(db, settings.storage.activity_log)
    activity.start()

    def queued() -> None:
        with contextlib.suppress(OSError):
            channel.send("queued")

    admissions = RemoteAdmissions(channel)
    served = _Served(channel)
    server = serving.dicom_server(
        settings, db, activity,
        guard=StorageGuard(storage, settings.storage.critical_watermark), on_queued=queued,
        admissions=admissions, dispatcher=served, process_number=number)
    tune_process()
    channel.send("ready")
    grace = settings.node.shutdown_grace_seconds
    while (received := channel.receive()) is not None:
        message, sock = received
        kind = message[0]
        if kind == "connection" and sock is not None:
            _, port, tls, address, request = message
            try:
                server.adopt(sock, address, Listen(port, tls), request)
            except Exception:
                log.exception("cannot serve the connection from %s:%s", *address)
                sock.close()
                served.finished(address)
        elif kind == "admitted":
            admissions.answered(*message[1:])
        elif kind == "stop":
            grace = message[1]
            break
    else:
        # The node is going down with it and may be restarted at once: its associations end
        # after the instance in hand, not after a grace that would hold the restart up
        # (storage/storagelock.py).
        log.error("the node's main process is gone; stopping")
        grace = 0.0
    admissions.close()  # nothing reads its answers any more
    server.stop(grace)
    activity.stop()
    db.dispose()


def main(argv: list[str]) -> None:
    # Ctrl-C reaches the whole process group: the main process decides when this one stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    permissions.tighten_umask()
    channel = Channel(socket.socket(fileno=int(argv[1])))
    first = channel.receive()
    if first is None:
        return
    (_, settings, number), _ = first
    configure_logging(settings, f"association process {number}")
    serve(channel, settings, number)


if __name__ == "__main__":
    main(sys.argv)
