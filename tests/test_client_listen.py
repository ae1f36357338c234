"""The accept loop takes a slot before it accepts, and never loses one.

Real loopback sockets; every wait is for the event loop to be idle
(trio.testing.wait_all_tasks_blocked), never for time.
"""

import functools
import socket

import trio
import trio.testing

from qconnect.client.listen import accept_loop


async def _listener() -> trio.socket.SocketType:
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    return listener


def _never(number: int) -> None:
    raise AssertionError(f"accept() ran out of resources: {number}")


async def test_a_connection_waits_in_the_backlog_until_a_slot_is_free() -> None:
    listener = await _listener()
    slots = trio.Semaphore(0)
    started: list[trio.socket.SocketType] = []
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    accept_loop,
                    listener,
                    acquire=slots.acquire,
                    release=slots.release,
                    start=lambda conn, peer: started.append(conn),
                    out_of_resources=_never,
                )
            )
            client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with client:
                await client.connect(listener.getsockname())
                await trio.testing.wait_all_tasks_blocked()
                assert started == []  # no slot: still in the kernel's backlog
                slots.release()
                await trio.testing.wait_all_tasks_blocked()
                assert len(started) == 1
                assert started[0].getpeername() == client.getsockname()
                assert slots.value == 0  # the slot went with the connection
                nursery.cancel_scope.cancel()
    for conn in started:
        conn.close()


async def test_a_slot_taken_for_an_accept_that_never_came_is_given_back() -> None:
    listener = await _listener()
    slots = trio.Semaphore(1)
    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    accept_loop,
                    listener,
                    acquire=slots.acquire,
                    release=slots.release,
                    start=lambda conn, peer: conn.close(),
                    out_of_resources=_never,
                )
            )
            await trio.testing.wait_all_tasks_blocked()
            assert slots.value == 0  # taken, waiting in accept()
            nursery.cancel_scope.cancel()
    assert slots.value == 1
