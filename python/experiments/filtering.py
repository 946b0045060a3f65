"""Filtering evaluation (issues 7 and 18): writes one model's section of docs/EVALUATION.md and its figures.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python python/experiments/filtering.py --out eval-digits --docs docs
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python python/experiments/filtering.py --model builtin:photos --out eval-photos --docs docs
    HF_HUB_OFFLINE=1 python python/experiments/filtering.py --out eval-digits --docs docs --reuse

The same as ``bayesdiff eval``; all logic lives in ``bayesdiff_ext.evaluation``.
"""

import sys

from bayesdiff_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
