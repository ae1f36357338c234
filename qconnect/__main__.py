"""``python3 -m qconnect``: the same front door as the ``qconnect`` command.

Useful where the console script is not on PATH (a source checkout, a venv that
is not activated, a package unpacked for inspection).
"""

import sys

from qconnect.cli import main

if __name__ == "__main__":
    sys.exit(main())
