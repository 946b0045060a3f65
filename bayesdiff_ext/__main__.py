"""``python -m bayesdiff_ext <command> ...``: the ``bayesdiff`` command, also as ``torchrun -m bayesdiff_ext``."""

import sys

from bayesdiff_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
