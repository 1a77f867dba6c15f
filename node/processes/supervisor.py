"""The node's other association processes, seen from its main process: started, given
connections, restarted when they die, stopped with the node.

Only the main process listens. Each connection it accepts goes to the process serving the
fewest (the main process itself on a tie, since it also runs forwarding and the control
plane), as a descriptor over that process's channel; the process screens it, does the TLS
handshake and serves the association like the main process would. Admission counts stay in
the main process's registry, so the node's limits hold over all processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import node
from node.config import Settings
from node.processes.channel import Channel
from node.scp.gate import Connections
from node.scp.listener import Listen
from node.scp.registry import AssociationRegistry

log = logging.getLogger(__name__)

# A process that dies is started again after this long (not at once: one that dies at start,
# e.g. on a broken installation, would otherwise be restarted in a tight loop).
RESTART_DELAY = 1.0
# A connection goes to another process with the A-ASSOCIATE-RQ already read from it, in one
# channel message; the kernel caps a message at about the socket's send buffer (~200 KiB), so
# the rare larger request is served by the main process.
MAX_HANDED_REQUEST = 64 * 1024


class _Process:
    """One association process and the thread that reads its channel."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.channel: Channel | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.ready = False
        self.serving = 0  # connections handed to it that have not ended
        self.handed = 0  # connections handed to it since the node started
        self.thread: threading.Thread | None = None


class AssociationProcesses:
    """`listener.Dispatcher` for the main process, over `count` other processes."""

    def __init__(self, settings: Settings, registry: AssociationRegistry,
                 on_queued: Callable[[], None], count: int, inherit: Sequence[int] = (),
                 connections: Connections | None = None) -> None:
        """`inherit`: descriptors each process keeps open for its lifetime (the node's storage
        lock: held until the last of its processes has exited); `connections`: the node's
        connection counts by address, kept for the connections the processes serve."""
        self.inherit = tuple(inherit)
        self.connections = connections
        self.settings = settings
        self.registry = registry
        self.on_queued = on_queued
        self._processes = [_Process(number) for number in range(1, count + 1)]
        self._lock = threading.Lock()
        self._local = 0  # connections the main process is serving
        self._stopping = threading.Event()

    def start(self, ready_timeout: float = 60.0) -> None:
        """Start the processes and wait until each is ready to take connections."""
        for process in self._processes:
            process.thread = threading.Thread(target=self._supervise, args=(process,),
                                              name=f"association-process-{process.number}",
                                              daemon=True)
            process.thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self.all_ready():
            if time.monotonic() > deadline:
                late = [p.number for p in self._processes if not p.ready]
                log.error("association process(es) %s not ready after %.0f s; the main "
                          "process serves their share until they are", late, ready_timeout)
                return
            time.sleep(0.02)

    def all_ready(self) -> bool:
        with self._lock:
            return all(p.ready for p in self._processes)

    def pids(self) -> dict[int, int]:
        """Process number -> pid, for the processes running now."""
        with self._lock:
            return {p.number: p.popen.pid for p in self._processes
                    if p.popen is not None and p.popen.poll() is None}

    def handed(self) -> dict[int, int]:
        """Process number -> connections handed to it since the node started."""
        with self._lock:
            return {p.number: p.handed for p in self._processes}

    def hand_off(self, sock: socket.socket, address: tuple[str, int], listen: Listen,
                 request: bytes = b"") -> bool:
        with self._lock:
            ready = [p for p in self._processes if p.ready]
            target = min(ready, key=lambda p: p.serving, default=None)
            if (target is None or target.serving >= self._local or target.channel is None
                    or len(request) > MAX_HANDED_REQUEST):
                self._local += 1
                return False
            target.serving += 1
            target.handed += 1
            channel = target.channel
            if self.connections is not None:
                self.connections.handshaken(address[0], target.number)
        try:
            channel.send("connection", listen.port, listen.tls, address, request,
                         fd=sock.fileno())
            return True
        except OSError as exc:
            log.warning("cannot hand the connection from %s:%d to association process %d "
                        "(%s); serving it here", address[0], address[1], target.number, exc)
            with self._lock:
                target.serving -= 1
                self._local += 1
            if self.connections is not None:
                self.connections.closed(address[0], target.number)
            return False

    def finished(self, address: tuple[str, int]) -> None:
        with self._lock:
            self._local -= 1

    def request_stop(self, grace: float) -> None:
        """Ask every process to stop: no new connections, `grace` seconds for open ones."""
        self._stopping.set()
        with self._lock:
            for process in self._processes:
                process.ready = False
            channels = [p.channel for p in self._processes if p.channel is not None]
        for channel in channels:
            with contextlib.suppress(OSError):  # already gone
                channel.send("stop", grace)

    def join(self, timeout: float) -> None:
        """Wait for the processes to end; kill what is left after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        for process in self._processes:
            popen = process.popen
            if popen is not None:
                try:
                    popen.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("association process %d (pid %d) did not stop in time; "
                                "killing it", process.number, popen.pid)
                    popen.kill()
            if process.thread is not None:
                process.thread.join(5.0)

    def _supervise(self, process: _Process) -> None:
        while not self._stopping.is_set():
            started = self._spawn(process)
            if started:
                self._serve(process)
            popen = process.popen
            code = popen.wait() if popen is not None else None
            with self._lock:
                process.ready = False
                process.serving = 0
                channel, process.channel = process.channel, None
            if channel is not None:
                channel.close()
            lost = self.registry.release_owner(process.number)
            if self.connections is not None:
                self.connections.release_owner(process.number)
            if self._stopping.is_set():
                return
            log.error("association process %d%s exited (%s); %d association(s) it served "
                      "ended with it; starting it again", process.number,
                      f" (pid {popen.pid})" if popen is not None else "",
                      f"exit status {code}" if code is not None else "not started", lost)
            self._stopping.wait(RESTART_DELAY)

    def _spawn(self, process: _Process) -> bool:
        channel, theirs = Channel.pair()
        env = dict(os.environ)
        # The process must import this very tree, also when the node runs from a checkout.
        root = str(Path(node.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        try:
            process.popen = subprocess.Popen(
                [sys.executable, "-m", "node.processes.association", str(theirs.fileno())],
                pass_fds=[theirs.fileno(), *self.inherit], env=env)
        except OSError as exc:
            log.error("cannot start association process %d: %s", process.number, exc)
            process.popen = None
            channel.close()
            return False
        finally:
            theirs.close()
        try:
            channel.send("settings", self.settings, process.number)
        except OSError as exc:
            log.error("association process %d did not take its settings: %s",
                      process.number, exc)
        with self._lock:
            process.channel = channel
        return True

    def _serve(self, process: _Process) -> None:
        """Answer the process's messages until its side of the channel closes."""
        channel = process.channel
        assert channel is not None
        while (received := channel.receive()) is not None:
            message, _ = received
            kind = message[0]
            if kind == "admit":
                _, request, partition, device, calling = message
                token, why = self.registry.admit(partition, device, calling,
                                                 owner=process.number)
                try:
                    channel.send("admitted", request, token, why)
                except OSError:
                    self.registry.release_owner(process.number)
            elif kind == "release":
                self.registry.release(message[1])
            elif kind == "closed":
                with self._lock:
                    process.serving = max(0, process.serving - 1)
                if self.connections is not None:
                    self.connections.closed(message[1], process.number)
            elif kind == "queued":
                self.on_queued()
            elif kind == "ready":
                with self._lock:
                    process.ready = not self._stopping.is_set()
                log.info("association process %d ready (pid %d)", process.number,
                         process.popen.pid if process.popen is not None else 0)
