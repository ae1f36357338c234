"""qconnect: bind TCP ports between Qubes OS qubes over qrexec.

This package's top level imports nothing on purpose: the dom0 policy tool and
the per-call executables must start on the standard library alone, so trio is
only imported by the modules that run long-lived event loops.
"""

__version__ = "0.1.0"
