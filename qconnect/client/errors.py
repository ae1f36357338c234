"""The client's exception type (one per area, see :mod:`qconnect.core.errors`)."""

from qconnect.core.errors import QconnectError


class ClientError(QconnectError):
    """A binding cannot be set up: the message says which and what to do instead."""

    exit_code = 1
