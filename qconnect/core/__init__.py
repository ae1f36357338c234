"""The shared core beneath every feature: grammars, conventions and mechanisms, no policy.

What lives here is used by more than one feature package and decides
nothing on its own: the binding spec and qrexec's naming rules, the error
types, the one escaper for text from outside, atomic writes and fenced
blocks, the byte relay (``relay``) and the install engine (``install``).
Nothing here imports a feature package or an entry point; see
docs/ARCHITECTURE.md.
"""
