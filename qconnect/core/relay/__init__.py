"""Byte relays with correct half-close: one set of splice rules, two fronts.

Each direction of a relay ends on its own EOF and hands that EOF on while the
other direction keeps flowing. Between descriptors that allow it the bytes move
with ``splice(2)`` through a kernel pipe and never enter Python.

- :mod:`qconnect.core.relay.splice`: the rules both fronts follow (pipe size, which
  errors mean "splice cannot do this" and which "the peer is gone"), standard
  library only.
- :mod:`qconnect.core.relay.trio_streams`: ``relay(a, b)`` between trio streams, for
  the long-running trio processes (the socket service, the client's relay mode).
- :mod:`qconnect.core.relay.blocking`: ``relay_fds``/``pump`` with blocking system
  calls and a thread per direction, for per-call processes (the executable
  service, the loopback ``qrexec-client-vm``) that cannot afford trio's import.

This package's ``__init__`` imports nothing: the blocking front must not pull
in trio.
"""
