"""The client side: ``qvm-connect-tcp`` listeners that turn each accepted TCP
connection into one ``qrexec-client-vm TARGET qubes.ConnectTCP+PORT`` call.

Layout, pure modules first: :mod:`.outcome` (exit codes in words),
:mod:`.bursts` (refusal bursts logged once), :mod:`.limits` (connection caps
and RLIMIT_NOFILE), :mod:`.qrexec_call` (finding and calling
``qrexec-client-vm``), :mod:`.listeners` (binding sockets, adopting systemd's),
:mod:`.registry` (the control sockets behind ``qconnect list``/``stop``),
:mod:`.server` (the trio event loop) and :mod:`.daemon` (returning to the
shell once every listener is bound).
"""
