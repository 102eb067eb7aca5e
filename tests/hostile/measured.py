"""`python tests/hostile/measured.py ARGS` runs `llmops ARGS` and, at exit, writes its peak
resident memory in bytes to the file named by $LLMOPS_PEAK_RSS_FILE.

The peak is /proc/self/status VmHWM, which exec resets. `ru_maxrss` from wait4 is not: a child
forked from a test process that has loaded torch starts out "resident" with the parent's pages,
so it would report the parent's size, not its own.
"""

from __future__ import annotations

import atexit
import os
import resource
import runpy
import sys


def _peak() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # no /proc: the best there is


def _report() -> None:
    with open(os.environ["LLMOPS_PEAK_RSS_FILE"], "w", encoding="ascii") as fh:
        fh.write(str(_peak()))


atexit.register(_report)
sys.argv = ["llmops", *sys.argv[1:]]
sys.path[0] = os.getcwd()  # as `python -m llmops` has it, not this script's folder
runpy.run_module("llmops", run_name="__main__", alter_sys=True)
