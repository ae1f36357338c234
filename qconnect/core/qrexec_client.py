"""The installed ``qrexec-client-vm``: what it is called, what it supports, where it runs.

Shared by the client (each call), ``persist`` (the units it writes) and the
loopback machine (which plays qrexec-client-vm inside its qubes), so that
the probe and the names are defined once.
"""

import subprocess

QREXEC_CLIENT_VM = "qrexec-client-vm"

#: The option that lets qrexec-client-vm use an accepted socket as its only
#: stream (qubes-core-qrexec >= 4.2, agent/qrexec-client-vm.c). Older agents
#: do not list it in their usage text.
STDIN_SOCKET_OPTION = "--use-stdin-socket"

#: Set by a loopback machine in the processes "inside" one of its qubes: the
#: machine's directory and that qube's name. (``qconnect.loopback.forkcall``
#: repeats the first: it must start without importing anything of ours.)
LOOPBACK_MACHINE_ENV = "QCONNECT_LOOPBACK_MACHINE"
LOOPBACK_QUBE_ENV = "QCONNECT_LOOPBACK_QUBE"

#: How long ``qrexec-client-vm --help`` may take before we give up and use
#: the relay, which works with every version.
PROBE_TIMEOUT = 5.0


def supports_stdin_socket(executable: str) -> bool:
    """Whether this ``qrexec-client-vm`` accepts ``--use-stdin-socket`` (asked once, via --help).

    Its usage text goes partly to stdout and partly to stderr, and older
    versions print it on stderr for an unknown option, so both are read.
    """
    try:
        probe = subprocess.run(
            [executable, "--help"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return STDIN_SOCKET_OPTION.encode() in probe.stdout + probe.stderr
