"""Where qconnect's data files are: ``rpc-services/`` and ``systemd-units/``.

In a source checkout (``pip install -e``) they sit next to the package; a
wheel installs them under ``sys.prefix/share/qconnect`` (pyproject's
data-files). ``service install`` and ``persist add`` read them through here so
both kinds of installation work.
"""

import sys
from pathlib import Path

#: The directory that holds the ``qconnect`` package in a source checkout.
SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent


def data_path(*parts: str, prefix: str | None = None) -> Path:
    """The path of a data file or directory: the source tree's if present, else the installed one.

    When neither exists the source tree's path is returned, so the caller's
    "cannot read" error names the place a developer would look first.
    """
    candidates = [
        SOURCE_ROOT.joinpath(*parts),
        Path(sys.prefix if prefix is None else prefix, "share", "qconnect", *parts),
    ]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]
