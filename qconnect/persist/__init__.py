"""Permanent bindings as systemd units (``qconnect persist``).

The pure parts (unit name escaping, the unit renderer) import neither trio
nor anything that does I/O; :mod:`.install` describes what a binding installs
and hands the plan to the one install engine (:mod:`qconnect.core.install`), which
also edits rc.local and talks to a running systemd when there is one.
"""
