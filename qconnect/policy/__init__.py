"""dom0 qrexec policy for qubes.ConnectTCP: grammar, evaluation, editing, lint.

Standard library only: ``qconnect policy`` runs in dom0, where trio is not
installed and every import costs start-up time. A test checks that nothing
here imports trio.

Modules, inwards to outwards:

- ``tokens``: the qube tokens of a rule (``@anyvm``, ``@tag:T``, a qube name...),
  each knowing how it matches;
- ``rules``: a rule and its action as value objects, rendered back to text;
- ``parser``: one policy file's text to rules and directives (new format);
- ``legacy``: the R4.0 format (``/etc/qubes-rpc/policy/SERVICE[+ARG]``);
- ``loader``: a policy directory with its includes to the ordered rule list;
- ``system_info``: the qubes, as qubesd's ``internal.GetSystemInfo`` describes them;
- ``evaluate``: one call against the rules, as dom0 decides it;
- ``fence``: our marked block inside a policy file;
- ``lint``: every problem, and rules that can never match;
- ``editor``, ``cli``: the ``qconnect policy`` tool.
"""
