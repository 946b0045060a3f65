"""Filtering evaluation of the bundled digits model (issue 7): writes docs/EVALUATION.md and figures.

    HF_HUB_OFFLINE=1 python python/experiments/filtering.py --out eval-out --docs docs
    HF_HUB_OFFLINE=1 python python/experiments/filtering.py --out eval-out --docs docs --reuse

The same as ``bayesdiff eval``; all logic lives in ``bayesdiff_ext.evaluation``.
"""

import sys

from bayesdiff_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
