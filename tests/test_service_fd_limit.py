"""The socket service under LimitNOFILE=64, without IPv6, flooded with calls: it keeps serving.

The service runs as its own process with 64 open files at most (prlimit, as
systemd's LimitNOFILE=64 sets both limits) on a kernel path without IPv6:
every socket(AF_INET6) in that process fails with EAFNOSUPPORT, as on a qube
booted with ipv6.disable=1 (the process's socket constructor is replaced
before qconnect is imported; nothing else changes). Far more calls arrive at
once than 64 descriptors can hold; a third go to a port with nothing on
127.0.0.1, so the service tries ::1 for them and meets EAFNOSUPPORT.

Every call it accepted must end as it should: served with every byte, or (the
unreachable port) closed without one, each with its one log line; the
service must not exit, and must serve the next call.
"""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from tests.service_helpers import echo, receive_all, tcp_server

FD_LIMIT = 64
CALLS = 240
TIMEOUT = 60.0

# Runs the socket service with IPv6 missing from the kernel's point of view.
NO_IPV6_SERVICE = """
import errno, os, socket, sys

_real_init = socket.socket.__init__

def _without_ipv6(self, family=-1, type=-1, proto=-1, fileno=None):
    if fileno is None and family == socket.AF_INET6:
        raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
    _real_init(self, family, type, proto, fileno)

socket.socket.__init__ = _without_ipv6
from qconnect.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(path: Path, log: Path) -> "subprocess.Popen[bytes]":
    argv = ["prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"]
    argv += [sys.executable, "-c", NO_IPV6_SERVICE, "service", "run", "--socket", str(path)]
    argv += ["--allow-file", str(log.parent / "no-such.allow")]
    project = Path(__file__).resolve().parent.parent
    with open(log, "wb") as log_file:
        process = subprocess.Popen(argv, stderr=log_file, cwd=project)
    deadline = time.monotonic() + TIMEOUT
    while " socket service listening on " not in log.read_text():  # listen() done
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the socket service did not start"
        time.sleep(0.02)
    return process


async def test_flooded_service_with_64_files_and_no_ipv6_serves_every_call_it_accepts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    log = tmp_path / "service.log"
    process = _start(path, log)
    outcomes: dict[str, int] = {"served": 0, "closed": 0}
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))  # bound, never listening: 127.0.0.1 refuses
        dead_port = dead.getsockname()[1]
        try:
            async with tcp_server(echo) as port:

                async def one(index: int) -> None:
                    reachable = index % 3 != 0
                    payload = f"{index:06d}".encode() * 4096  # 24 KiB each
                    stream = await trio.open_unix_socket(str(path))
                    got = b""
                    async with stream:
                        target = port if reachable else dead_port
                        try:
                            await stream.send_all(
                                f"qubes.ConnectTCP+{target} call-{index}\0".encode() + payload
                            )
                            await stream.send_eof()
                            got = await receive_all(stream)
                        except trio.BrokenResourceError:
                            # Closed with our bytes unread: a reset, as good as EOF.
                            assert not reachable, f"call {index} was reset"
                    if reachable:
                        assert got == payload, f"call {index}: {len(got)} bytes"
                        outcomes["served"] += 1
                    else:
                        assert got == b""
                        outcomes["closed"] += 1

                with trio.fail_after(TIMEOUT):
                    async with trio.open_nursery() as nursery:
                        for index in range(CALLS):
                            nursery.start_soon(one, index)
                    assert process.poll() is None, log.read_text()
                    # ... and it serves the next call.
                    await one(CALLS + 1)
                    # One line per call, the unreachable ones with their reason.
                    while log.read_text().count("call from call-") < CALLS + 1:
                        assert process.poll() is None, log.read_text()
                        await trio.sleep(0.05)
        finally:
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(TIMEOUT)
    text = log.read_text()
    assert returncode == 0, text
    assert outcomes == {"served": CALLS * 2 // 3 + 1, "closed": CALLS // 3}
    assert f"open-file limit {FD_LIMIT}: at most " in text
    unreachable = [line for line in text.splitlines() if " unreachable: " in line]
    assert len(unreachable) == CALLS // 3
    assert all(
        "127.0.0.1: connection refused; ::1: address family not supported by protocol" in line
        for line in unreachable
    ), unreachable[:3]
    assert " failed: " not in text and "Traceback" not in text
