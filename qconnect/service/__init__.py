"""The qubes.ConnectTCP service in the target qube, as a socket service or an executable.

This package's ``__init__`` imports nothing: the per-call executable imports
its pure, standard-library modules (descriptor, allowlist, execservice) and
must never pay for trio, which only the daemon and the CLI import.
"""
