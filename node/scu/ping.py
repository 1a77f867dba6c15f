"""Ping a device's host (`pacsnode device ping`, docs/how-to/devices.md).

An administrator's ping is ICMP echo, as eRAD's is. Sending ICMP takes a raw socket (root or
CAP_NET_RAW), so the system's `ping` (Debian's iputils-ping, installed with that capability)
sends it. Where there is no such program, or it may not open its socket, a TCP connection to
the device's DICOM port measures the same two things, whether the host answers and how fast;
the result says which was used.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass

PING_PROGRAMS = ("/bin/ping", "/usr/bin/ping")
INTERVAL = 0.2  # seconds between echo requests: the shortest iputils allows every user
ICMP = "icmp"
TCP = "tcp"

_REPLY_TIME = re.compile(r"icmp_seq=\d+ .*time[=<]([\d.]+) ms")
_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_ICMP_ERROR = re.compile(r"^From (\S+) icmp_seq=\d+ (.+)$", re.MULTILINE)
# The ping program could not send at all: no raw socket for this user.
_NOT_PERMITTED = ("socket: Operation not permitted", "socket: Permission denied",
                  "missing cap_net_raw")


@dataclass(frozen=True)
class PingResult:
    method: str  # ICMP or TCP
    target: str  # the address pinged (TCP: address:port)
    sent: int
    received: int
    times_ms: tuple[float, ...]  # one per answer
    detail: str = ""  # why nothing (or not everything) answered, or what answered

    @property
    def reachable(self) -> bool:
        return self.received > 0

    def summary(self) -> str:
        """`3 sent, 3 received; round trip min/avg/max 0.04/0.12/0.27 ms`, and the detail."""
        text = f"{self.sent} sent, {self.received} received"
        if self.times_ms:
            low, high = min(self.times_ms), max(self.times_ms)
            mean = sum(self.times_ms) / len(self.times_ms)
            text += f"; round trip min/avg/max {low:.3f}/{mean:.3f}/{high:.3f} ms"
        return f"{text}: {self.detail}" if self.detail else text


def parse_ping(returncode: int, stdout: str, stderr: str, target: str,
               count: int) -> PingResult | None:
    """What iputils `ping -n -c count` printed (in the C locale); None when it could not
    send (no raw socket for this user: the caller falls back to TCP)."""
    times = tuple(float(t) for t in _REPLY_TIME.findall(stdout))
    counts = _COUNTS.search(stdout)
    sent, received = (int(counts[1]), int(counts[2])) if counts else (0, len(times))
    if returncode == 0 or received:
        lost = "" if received == sent else f"{sent - received} lost"
        return PingResult(ICMP, target, sent, received, times, lost)
    errors = _ICMP_ERROR.findall(stdout)
    if errors:
        gateway, message = errors[-1]
        return PingResult(ICMP, target, sent, 0, (), f"{message.strip()} (from {gateway})")
    if returncode == 1:
        return PingResult(ICMP, target, sent or count, 0, (), "no reply")
    if any(marker in stderr for marker in _NOT_PERMITTED):
        return None
    message = _last_line(stderr) or _last_line(stdout) or f"ping exited with {returncode}"
    return PingResult(ICMP, target, sent, 0, (), message)


_PROGRAM_PREFIX = re.compile(r"^\S*ping: ")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # "/bin/ping: connect: Network is unreachable" -> "connect: Network is unreachable"
    return _PROGRAM_PREFIX.sub("", lines[-1]) if lines else ""


def ping_program() -> str | None:
    """The system's ping, never one on the PATH of a virtual environment."""
    for path in PING_PROGRAMS:
        if os.access(path, os.X_OK):
            return path
    return None


def icmp(program: str, address: str, count: int, timeout: float) -> PingResult | None:
    """ICMP echo with the system's ping; None when it cannot send (see parse_ping)."""
    command = [program, "-n", "-c", str(count), "-i", str(INTERVAL), "-W", f"{timeout:g}",
               address]
    deadline = count * INTERVAL + timeout + 5.0
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=deadline,
                              env={**os.environ, "LC_ALL": "C"}, check=False)
    except subprocess.TimeoutExpired:
        return PingResult(ICMP, address, count, 0, (), f"no answer within {deadline:g} s")
    except OSError:
        return None
    return parse_ping(done.returncode, done.stdout, done.stderr, address, count)


def tcp(address: str, port: int, count: int, timeout: float) -> PingResult:
    """TCP connections to address:port, each timed until the host answered (accepted or
    refused: a refusal is an answer too)."""
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    times: list[float] = []
    sent = 0
    refused = False
    failure = ""
    for attempt in range(count):
        if attempt:
            time.sleep(INTERVAL)
        sent += 1
        started = time.perf_counter()
        try:
            with socket.create_connection((address, port), timeout=timeout):
                times.append((time.perf_counter() - started) * 1000)
        except ConnectionRefusedError:
            times.append((time.perf_counter() - started) * 1000)
            refused = True
        except TimeoutError:
            failure = f"no answer within {timeout:g} s"
        except OSError as exc:
            failure = _os_reason(exc)
            if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                break  # the answer will not change within a second
    detail = failure
    if refused and not failure:
        detail = f"the host answered, but port {port} refused the connection"
    return PingResult(TCP, target, sent, len(times), tuple(times), detail)


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.EHOSTUNREACH:
        return "no route to host"
    if exc.errno == errno.ENETUNREACH:
        return "network is unreachable"
    return (exc.strerror or str(exc)).lower()


def ping(address: str, port: int, count: int, timeout: float, *,
         use_tcp: bool = False) -> tuple[PingResult, str]:
    """ICMP with the system's ping where it can, else (or with `use_tcp`) TCP to `port`;
    and how it was done, for the administrator."""
    program = None if use_tcp else ping_program()
    if program is not None:
        result = icmp(program, address, count, timeout)
        if result is not None:
            return result, f"ICMP echo ({program})"
        why = f"{program} may not send ICMP here (no raw socket for this user)"
    else:
        why = "asked with --tcp" if use_tcp else "no ping program on this machine"
    if port <= 0:
        return PingResult(TCP, address, 0, 0, (), "the device has no DICOM port to connect "
                          "to"), f"TCP connect ({why})"
    return tcp(address, port, count, timeout), f"TCP connect to port {port} ({why})"
