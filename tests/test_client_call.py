"""make_call runs a real process for a real connection and returns what it did, typed.

The process stands in for qrexec-client-vm (a shell command): what matters
here is the result's shape, read by the counters, the pacing and the log.
"""

import socket

import pytest
import trio

from qconnect.client.call import make_call
from qconnect.client.outcome import CallResult, Ending, Kind, Relayed
from qconnect.client.qrexec_call import Mode


def _connected_pair() -> tuple[trio.socket.SocketType, socket.socket]:
    """The server's end of a TCP connection (as accept() gives it) and the client's, blocking.

    TCP on loopback, as the client serves: the hang watch reads TCP_INFO.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    return trio.socket.from_stdlib_socket(ours), theirs


@pytest.mark.parametrize("mode", [Mode.HANDOFF, Mode.RELAY])
async def test_dom0s_refusal_comes_back_as_a_refused_result(mode: Mode) -> None:
    conn, client = _connected_pair()
    with client:
        script = "echo 'Request refused' >&2; exit 126"
        result = await make_call(["sh", "-c", script], conn, mode, call_timeout=0)
    conn.close()
    assert result.returncode == 126 and result.stderr == b"Request refused\n"
    assert result.refused_by_dom0 and not result.allowed_by_dom0
    assert result.kind is Kind.REFUSED and result.ending is Ending.REFUSED
    assert result.hang is None
    assert (result.relayed is None) == (mode is Mode.HANDOFF)


async def test_a_relayed_call_reports_the_bytes_it_moved() -> None:
    conn, client = _connected_pair()
    with client:
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        result = await make_call(["cat"], conn, Mode.RELAY, call_timeout=0)
        echoed = b""
        while chunk := await trio.to_thread.run_sync(client.recv, 100):
            echoed += chunk
    conn.close()
    assert echoed == b"hello"
    assert result == CallResult(0, b"", Relayed(out=5, back=5), None)
    assert result.allowed_by_dom0 and result.ending is Ending.SERVED


async def test_a_call_that_never_reads_its_input_is_ended_as_hung() -> None:
    conn, client = _connected_pair()
    with client:
        client.sendall(b"waiting for dom0")
        with trio.fail_after(30):
            result = await make_call(["sleep", "60"], conn, Mode.HANDOFF, call_timeout=1.0)
    conn.close()
    assert result.hang is not None and result.hang.unread == len(b"waiting for dom0")
    assert result.ending is Ending.HUNG and not result.allowed_by_dom0
    assert result.returncode is not None and result.returncode < 0  # SIGTERM from us


async def test_a_call_that_cannot_start_raises_and_starts_nothing() -> None:
    conn, client = _connected_pair()
    with client, pytest.raises(OSError):
        await make_call(["/nonexistent/qrexec-client-vm"], conn, Mode.RELAY, call_timeout=0)
    conn.close()
