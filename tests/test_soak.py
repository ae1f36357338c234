"""Soak: thousands of connections with every way a stream can end, through each qconnect chain.

A random mix (seeded, so a failure can be replayed) of: echo of a random size
checked by sha256, client half-close with a late reply, server half-close
(the client still sends after the server's EOF), reset in mid-stream, a call
dom0 refuses, a port nothing listens on, and (executable service) the
service process killed in mid-stream. Afterwards the binding's and the
service's open descriptors and the binding's child processes are back to
their baseline, every byte arrived exactly once and in order, and every
failure was reported as the right kind.

``make test`` runs a bounded version (SOAK_DEFAULT connections per chain);
``make soak`` (``-m slow``) runs SOAK_FULL per chain.
"""

import hashlib
import os
import random
import signal
import socket
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import trio

from qconnect.core.relay.trio_streams import PIPES_KEPT
from tests.servers import GREETING, SLOW_FIRST, SoakServers
from tests.soak_world import SoakChain, soak_chain

SOAK_DEFAULT = 60
SOAK_FULL = 10_000

#: Connections in flight at once: enough to overlap calls, under the
#: client's 64 per binding so the soak measures behaviour, not queueing.
PARALLEL = 24

#: Largest echo payload; sizes are drawn log-uniformly up to it.
MAX_ECHO = 256 * 1024

#: Seconds one connection may take on a loaded 2-core machine.
CONNECTION_TIMEOUT = 60.0

#: Seconds for descriptors and children to return to baseline after the soak.
SETTLE_TIMEOUT = 20.0

SCENARIOS = {
    "echo": 40,
    "late": 14,
    "early": 14,
    "reset": 10,
    "denied": 8,
    "closed": 8,
    "killed": 6,
}

CHAINS = {
    "default": ("svc-socket", False),
    "exec": ("svc-exec", False),
    "relay": ("svc-socket", True),
}


async def _receive_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(65536):
        chunks.append(data)
    return b"".join(chunks)


async def _receive_or_reset(stream: trio.SocketStream) -> bytes:
    """What arrives before EOF; a reset counts as EOF (a refused call may end either way)."""
    try:
        return await _receive_all(stream)
    except trio.BrokenResourceError:
        return b""


class Soak:
    def __init__(self, chain: SoakChain, servers: SoakServers, rng: random.Random) -> None:
        self.chain, self.servers, self.rng = chain, servers, rng
        self.done: Counter[str] = Counter()
        self.early_sent: list[str] = []
        self.victim_lock = trio.Lock()

    async def connect(self, behaviour: str) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.chain.local[behaviour])

    async def echo(self) -> None:
        payload = self.rng.randbytes(int(2 ** self.rng.uniform(0, 18)) % MAX_ECHO)
        async with await self.connect("echo") as stream, trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            got = await _receive_all(stream)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), (
            f"echo of {len(payload)} bytes came back as {len(got)} different bytes"
        )

    async def late(self) -> None:
        payload = self.rng.randbytes(self.rng.randrange(1, 100_000))
        async with await self.connect("late") as stream:
            await stream.send_all(payload)
            await stream.send_eof()
            reply = await _receive_all(stream)
        assert reply == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()

    async def early(self) -> None:
        payload = self.rng.randbytes(self.rng.randrange(1, 100_000))
        async with await self.connect("early") as stream:
            assert await _receive_all(stream) == GREETING
            await stream.send_all(payload)  # after the server's EOF: must still arrive
            await stream.send_eof()
            self.early_sent.append(hashlib.sha256(payload).hexdigest())
            await _receive_or_reset(stream)

    async def reset(self) -> None:
        stream = await self.connect("big")
        try:
            await stream.receive_some(65536)
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            await stream.aclose()  # with linger 0: a reset, not a FIN

    async def denied(self) -> None:
        async with await self.connect("denied") as stream:
            with trio.move_on_after(0):  # the request may already be gone
                await stream.send_all(b"never served\n")
            assert await _receive_or_reset(stream) == b""

    async def closed(self) -> None:
        async with await self.connect("closed") as stream:
            assert await _receive_or_reset(stream) == b""

    async def killed(self) -> None:
        """Executable service only: SIGKILL it in mid-stream; the client sees the stream end."""
        if self.chain.target != "svc-exec":
            await self.echo()
            self.done["echo"] += 1
            self.done["killed"] -= 1
            return
        # one victim at a time: its process is found by the port it serves
        async with self.victim_lock, await self.connect("slow") as stream:
            first = b""
            while len(first) < SLOW_FIRST:
                first += await stream.receive_some(65536)
            (victim,) = self.chain.executable_services(self.chain.remote["slow"])
            os.kill(victim, signal.SIGKILL)
            await _receive_or_reset(stream)

    async def run(self, count: int) -> None:
        # QCONNECT_SOAK_SCENARIOS=reset,early narrows the mix to replay a failure.
        chosen = os.environ.get("QCONNECT_SOAK_SCENARIOS")
        names = chosen.split(",") if chosen else list(SCENARIOS)
        plan = self.rng.choices(names, weights=[SCENARIOS[n] for n in names], k=count)
        limiter = trio.CapacityLimiter(PARALLEL)

        async def one(name: str) -> None:
            async with limiter:
                with trio.fail_after(CONNECTION_TIMEOUT):
                    await getattr(self, name)()
                self.done[name] += 1

        async with trio.open_nursery() as nursery:
            for name in plan:
                nursery.start_soon(one, name)


def _wait_for_baseline(chain: SoakChain, baseline: dict[str, int]) -> dict[str, int]:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        now = chain.snapshot()
        if now == baseline or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def _wait_for_warm_up_call(chain: SoakChain) -> None:
    """Wait for the event that the warm-up call has ended: logged, no process of it left."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        now = chain.snapshot()
        ended = chain.remote["echo"] in chain.client_outcomes()
        if ended and now["client_children"] == 0 and now["qrexec_calls"] == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the warm-up call did not end: {now}")
        time.sleep(0.05)


async def _soak(chain_name: str, count: int, tmp_path: Path) -> None:
    # A short machine path: the client's control socket lives under it, and a
    # unix socket path must fit in 107 bytes (pytest's tmp_path can be longer).
    with tempfile.TemporaryDirectory(prefix="soak-") as short:
        await _soak_in(chain_name, count, Path(short))


async def _soak_in(chain_name: str, count: int, tmp_path: Path) -> None:
    target, relay = CHAINS[chain_name]
    seed = int(os.environ.get("QCONNECT_SOAK_SEED", "6"))
    with soak_chain(tmp_path, target=target, relay=relay) as chain:
        servers = chain.servers
        soak = Soak(chain, servers, random.Random(seed))
        await soak.echo()  # warm-up: every lazy import and first start done
        await trio.to_thread.run_sync(_wait_for_warm_up_call, chain)
        baseline = chain.snapshot()
        await soak.run(count)
        after = await trio.to_thread.run_sync(_wait_for_baseline, chain, baseline)
        assert after == baseline, (
            f"seed {seed}: {after} after the soak, {baseline} before; {soak.done}\n"
            + chain.service_log.read_text()[-1500:]
        )
        assert sum(soak.done.values()) == count
        pooled = chain.pooled_pipes()
        assert max(pooled.values()) <= 2 * PIPES_KEPT, pooled
        # server half-close: what the client sent after the server's EOF arrived, whole
        await trio.to_thread.run_sync(servers.wait_early_received, set(soak.early_sent), 10)
        chain.client.send_signal(signal.SIGTERM)  # flushes the refusal-burst counts
        await trio.to_thread.run_sync(chain.client.wait, 30)
        outcomes = chain.client_outcomes()
        client_log = chain.client_log.read_text()
        service_log = chain.service_log.read_text()
    refused = outcomes.get(chain.remote["denied"], [])
    assert len(refused) == soak.done["denied"], (
        f"seed {seed}: {len(refused)} refusals logged for {soak.done['denied']} denied calls: "
        f"{Counter(words[:60] for words in refused)}\n"
        + "\n".join(
            line for line in client_log.splitlines() if f":{chain.remote['denied']}" in line
        )[-3000:]
    )
    assert all("refused" in words for words in refused), refused
    unreachable = outcomes.get(chain.remote["closed"], [])
    assert len(unreachable) == soak.done["closed"]
    if target == "svc-exec":
        # the executable's exit code says it: 125
        assert all("could not connect" in words for words in unreachable), unreachable
        killed = outcomes.get(chain.remote["slow"], [])
        assert len(killed) == soak.done["killed"]
        assert all("SIGKILL" in words for words in killed), killed
    else:
        # a socket service cannot set the exit code: it closes at once and logs why
        closed_port = chain.remote["closed"]
        logged = service_log.count(f"to port {closed_port} unreachable")
        assert logged == soak.done["closed"], service_log[-2000:]
    for behaviour in ("echo", "late", "early", "big"):
        words = outcomes.get(chain.remote[behaviour], [])
        assert all(w.startswith("closed") for w in words), (behaviour, set(words))


@pytest.mark.parametrize("chain_name", list(CHAINS))
async def test_soak_bounded_mix_keeps_bytes_exact_and_returns_to_baseline(
    chain_name: str, tmp_path: Path
) -> None:
    await _soak(chain_name, SOAK_DEFAULT, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("chain_name", list(CHAINS))
async def test_soak_ten_thousand_connections_keep_bytes_exact_and_return_to_baseline(
    chain_name: str, tmp_path: Path
) -> None:
    await _soak(chain_name, SOAK_FULL, tmp_path)
