"""The TCP servers every benchmark chain ends at: echo, sink (upload), source (download), mux.

They are the test suite's servers (:mod:`tests.servers`, its "bench" set), so
the benchmarks and the tests measure against the same code. ``python -m
bench.servers`` runs them in a process of their own (the load generator's
interpreter lock then cannot slow them), prints one JSON line with the ports,
and exits when its stdin closes.

- ``echo``: sends back every byte; after the client's EOF, shuts its write side.
- ``sink``: counts what it receives until EOF, then answers the count as ``N\\n``.
- ``source``: reads a line ``N\\n`` and sends N bytes, then closes.
- ``mux``: one port for all three, chosen by the first byte (``E``: echo, the
  ``E`` included; ``U``: sink; ``D``: source), so a chain needs one binding.
"""

import sys

from tests.servers import BUFFER, Servers, handler_set, main

__all__ = ["BUFFER", "bench_servers"]


def bench_servers() -> Servers:
    """The bench set in this process; ``close()`` stops it."""
    return Servers(handler_set("bench"))


if __name__ == "__main__":
    sys.exit(main(["bench"]))
