"""One socket service process serves 500 concurrent calls; memory per open call is measured."""

import os
import signal
from pathlib import Path

import trio

from tests.service_helpers import call, echo, start_service_process, tcp_server

CALLS = 500
CALLERS = ("work", "personal", "dev", "vault", "untrusted")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_500_concurrent_calls_are_served_by_one_process(tmp_path: Path) -> None:
    path = tmp_path / "qubes.ConnectTCP"
    log = tmp_path / "service.log"
    process = start_service_process(path, log)
    try:
        async with tcp_server(echo) as port:
            idle_rss = _rss_kib(process.pid)
            streams = []
            for index in range(CALLS):
                caller = CALLERS[index % len(CALLERS)]
                streams.append(await call(path, str(port), caller, f"{index:04d}".encode()))
            for index, stream in enumerate(streams):
                with trio.fail_after(10):
                    assert await stream.receive_some(10) == f"{index:04d}".encode()
            # All 500 calls are open at once, each with its server connection.
            busy_rss = _rss_kib(process.pid)
            children = Path(f"/proc/{process.pid}/task").iterdir()
            assert len(list(children)) == 1  # one process, one thread: no process per call
            for stream in streams:
                await stream.send_eof()
                assert await stream.receive_some(10) == b""
                await stream.aclose()
            with trio.fail_after(10):
                while log.read_text().count(" bytes in, ") < CALLS:
                    await trio.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    per_call = (busy_rss - idle_rss) / CALLS
    print(
        f"\nsocket service memory: idle {idle_rss} KiB, {CALLS} open calls {busy_rss} KiB, "
        f"{per_call:.1f} KiB per open call"
    )
    text = log.read_text()
    for caller in CALLERS:
        assert text.count(f"call from {caller} to 127.0.0.1:{port}: 4 bytes in, 4 bytes out") == 100
    assert per_call < 256, f"{per_call:.1f} KiB per open call"
    assert os.path.exists(path) is False  # it removed its socket on SIGTERM
