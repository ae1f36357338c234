"""The open-file limit of a long-running process of ours, raised once at its start.

Every daemon here holds a few descriptors per connection or call: the client
three per relayed connection and more while a handed-off one starts, the
socket service up to six per call, the loopback fork-server one connection
per call in flight. The usual soft limit (1,024) would be reached long before
the hard one (systemd gives 524,288), so each raises its soft limit to the
hard one when it starts; what it then admits is its own business (the
service budgets its calls from the value returned here).
"""

import logging
import resource

logger = logging.getLogger(__name__)

#: The soft limit asked for when the hard limit is "unlimited". Linux never
#: allows that for open files (the ceiling is fs.nr_open, 1,048,576 by
#: default, and setrlimit refuses more), but other kernels may; 65,536 holds
#: the service's 1,024 calls at six descriptors each ten times over, without
#: asking for a number a kernel might refuse.
UNLIMITED_TARGET = 65536


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    The hard limit is left as it is, so a child that wants the old soft limit
    back can still set it. Error handling: a kernel that refuses (a hard
    limit it does not honour) is not fatal; the soft limit stays, is
    returned, and the refusal is logged at debug level: the caller lives with
    fewer descriptors, its connections meeting EMFILE one at a time.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    target = max(soft, UNLIMITED_TARGET) if hard == resource.RLIM_INFINITY else hard
    if target <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        logger.debug("could not raise the open file limit from %d to %d: %s", soft, target, error)
        return soft
    return target
