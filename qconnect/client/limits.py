"""How many calls one client process may have in flight, and how long they may take.

The command line checks these bounds (``client/cli.py``, ``core/argtypes``);
the open-file limit is raised by ``core/fdlimit`` as in every daemon.
"""

from qconnect.core.qrexec import MAX_CALLS_IN_FLIGHT

#: Default cap on open connections of one binding. Half of what qrexec lets a
#: qube have in flight, so two busy bindings still fit without refusals.
DEFAULT_MAX_CONNECTIONS = 64

#: Cap on open connections of all bindings of one process. A target qube
#: serves at most MAX_CALLS_IN_FLIGHT calls at once from the qubes on one
#: side of its domain id, this one among them; other qubes (and this qube's
#: own calls, clipboard, updates) may share that half, so we keep 16 free.
#: At the cap we stop accepting and the kernel's listen backlog holds new
#: connections until a call ends. Ports outlive their calls in dom0: the
#: per-target pacing of pacing.py counts that.
PROCESS_MAX_CONNECTIONS = MAX_CALLS_IN_FLIGHT - 16

#: Default seconds open connections may keep running after a stop request.
#: Long enough for a page load or a short transfer to complete, short enough
#: that a shutdown does not hang on an idle keep-alive connection.
DEFAULT_GRACE = 10.0

#: Default seconds a call may take to be accepted (see acceptance.py) before,
#: if the client's bytes still wait unread, it is ended and its connection
#: closed. dom0 itself waits up to a qube's qrexec_timeout (60 s by default)
#: for a target qube to start; an `ask` policy then waits for a person to
#: click. Two minutes lets both happen, and still frees the slot of a call
#: that will never be answered long before anyone would call it a leak.
DEFAULT_CALL_TIMEOUT = 120.0

#: Listen backlog asked of the kernel (capped by net.core.somaxconn). While
#: every slot is busy, new connections wait here rather than being refused;
#: the original's socat used 5, so a burst of 1,000 connections saw resets.
LISTEN_BACKLOG = 4096
