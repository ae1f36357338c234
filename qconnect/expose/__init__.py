"""``qconnect expose``: a qube's port reachable from the outside world, the qrexec way.

Modules: :mod:`.model` (pure: the target, the firewall rules, the files),
:mod:`.via` (the via qube's part: settings, nftables, rc.local, persist),
:mod:`.cli` (the command, in dom0 or in the via qube). Standard library only.
"""
