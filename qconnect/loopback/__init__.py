"""The loopback qrexec: a whole Qubes machine (qubes, dom0 policy, qrexec) on one Linux host.

``machine`` builds and describes a machine directory (the API tests use),
``client`` is the ``qrexec-client-vm`` that runs once per call, ``cli`` is
``qconnect loopback``. Nothing is imported here, so the per-call client
loads only what it needs.
"""
