"""`device ping`: what iputils' ping printed, read."""

from __future__ import annotations

from node.scu.ping import ICMP, parse_ping

# Captured from Debian 12's iputils-ping 20221126 with LC_ALL=C (`ping -n -c 3 -i 0.2 -W 1`).
REPLIES = """PING 127.0.0.1 (127.0.0.1) 56(84) bytes of data.
64 bytes from 127.0.0.1: icmp_seq=1 ttl=64 time=0.268 ms
64 bytes from 127.0.0.1: icmp_seq=2 ttl=64 time=0.045 ms
64 bytes from 127.0.0.1: icmp_seq=3 ttl=64 time=0.044 ms

--- 127.0.0.1 ping statistics ---
3 packets transmitted, 3 received, 0% packet loss, time 406ms
rtt min/avg/max/mdev = 0.044/0.119/0.268/0.105 ms
"""
# The same program without its capability, run as an unprivileged user.
NO_RAW_SOCKET = """/tmp/ping-nocap: socktype: SOCK_RAW
/tmp/ping-nocap: socket: Operation not permitted
/tmp/ping-nocap: => missing cap_net_raw+p capability or setuid?
"""
# iputils' output formats for a host that does not answer and one the gateway reports.
SILENT = """PING 10.9.9.9 (10.9.9.9) 56(84) bytes of data.

--- 10.9.9.9 ping statistics ---
3 packets transmitted, 0 received, 100% packet loss, time 415ms
"""
HOST_UNREACHABLE = """PING 10.9.9.9 (10.9.9.9) 56(84) bytes of data.
From 10.9.9.1 icmp_seq=1 Destination Host Unreachable
From 10.9.9.1 icmp_seq=2 Destination Host Unreachable

--- 10.9.9.9 ping statistics ---
3 packets transmitted, 0 received, +2 errors, 100% packet loss, time 414ms
"""
PARTLY = """PING 10.9.9.9 (10.9.9.9) 56(84) bytes of data.
64 bytes from 10.9.9.9: icmp_seq=2 ttl=63 time=12.5 ms

--- 10.9.9.9 ping statistics ---
3 packets transmitted, 1 received, 66.6667% packet loss, time 411ms
rtt min/avg/max/mdev = 12.500/12.500/12.500/0.000 ms
"""


def test_replies_give_each_round_trip() -> None:
    result = parse_ping(0, REPLIES, "", "127.0.0.1", 3)
    assert result is not None
    assert (result.method, result.sent, result.received, result.times_ms, result.reachable) == (
        ICMP, 3, 3, (0.268, 0.045, 0.044), True)
    assert result.summary() == "3 sent, 3 received; round trip min/avg/max 0.044/0.119/0.268 ms"


def test_some_replies_lost() -> None:
    result = parse_ping(0, PARTLY, "", "10.9.9.9", 3)
    assert result is not None and result.reachable
    assert (result.sent, result.received, result.times_ms, result.detail) == (
        3, 1, (12.5,), "2 lost")


def test_no_reply_is_unreachable() -> None:
    result = parse_ping(1, SILENT, "", "10.9.9.9", 3)
    assert result is not None and not result.reachable
    assert (result.sent, result.received, result.detail) == (3, 0, "no reply")


def test_gateway_report_is_the_reason() -> None:
    result = parse_ping(1, HOST_UNREACHABLE, "", "10.9.9.9", 3)
    assert result is not None and not result.reachable
    assert result.detail == "Destination Host Unreachable (from 10.9.9.1)"


def test_ping_that_cannot_send_says_so_in_its_own_words() -> None:
    result = parse_ping(2, "", "/bin/ping: connect: Network is unreachable\n", "10.9.9.9", 3)
    assert result is not None and not result.reachable
    assert result.detail == "connect: Network is unreachable"


def test_no_raw_socket_means_fall_back() -> None:
    assert parse_ping(2, "", NO_RAW_SOCKET, "127.0.0.1", 3) is None
