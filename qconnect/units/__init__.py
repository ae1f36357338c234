"""Permanent bindings as systemd units (``qconnect persist``).

The pure parts (unit name escaping, the unit renderer, the rc.local block
editor) import neither trio nor anything that does I/O; :mod:`.install`
applies their output to a file tree and :mod:`.systemctl` talks to a running
systemd when there is one.
"""
