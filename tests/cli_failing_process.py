"""A ``torchrun`` entry for tests/test_cli_scaleout.py: ``bayesdiff <argv>`` in which process 1 fails in
its second batch (a fault put in on purpose: the sampler raises as an out-of-memory error would)."""

import os
import sys

from bayesdiff_ext import cli
from bayesdiff_ext.sampler import BayesDiffSampler

MESSAGE = "process one ran out of memory"


def failing_on_second_call(sample):
    calls = []

    def sample_or_fail(self, *args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError(MESSAGE)
        return sample(self, *args, **kwargs)

    return sample_or_fail


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        BayesDiffSampler.sample = failing_on_second_call(BayesDiffSampler.sample)
    sys.exit(cli.main())
