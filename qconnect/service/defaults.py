"""The socket service's defaults, in a module without trio.

``qconnect service --help`` shows them and ``service install`` writes the
socket path into units; neither may import the daemon (and trio with it)
for a constant: ``--help`` must start in tens of milliseconds.
"""

from qconnect.core.qrexec import SERVICE

#: Where qrexec-agent looks first for services (DESIGN.md §2: /run/qubes-rpc
#: comes before /usr/local/etc/qubes-rpc and /etc/qubes-rpc).
DEFAULT_SOCKET = "/run/qubes-rpc/" + SERVICE

# Calls open at once, in total. Each holds two sockets (four with the
# agent's side) and, while bytes flow, up to one relay chunk per direction;
# 1024 calls stay well under the fd limit we raise to at start and under
# ~100 MB even if every call is busy. Above it a call is refused, not queued.
DEFAULT_MAX_CALLS = 1024

# Calls open at once from one calling qube. qrexec lets one qube start at
# most 128 calls at once (MAX_CALLS_IN_FLIGHT); the default leaves one
# caller able to use all of them, and a lower value keeps a noisy qube from
# starving the others of DEFAULT_MAX_CALLS.
DEFAULT_MAX_CALLS_PER_CALLER = 128

# qrexec-agent writes the descriptor as soon as it connects; a peer that has
# not sent it within this many seconds is not the agent (or is stuck) and is
# dropped, so it cannot hold a call slot forever.
DEFAULT_DESCRIPTOR_TIMEOUT = 5.0

# A local server that never completes the handshake (full backlog) would
# leave the call hanging; after this many seconds per address it fails.
DEFAULT_CONNECT_TIMEOUT = 10.0
