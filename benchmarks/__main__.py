"""``python -m benchmarks``: the benchmark suite (see :mod:`benchmarks.suite` for the options).

The thread count is put into OMP/OPENBLAS/MKL_NUM_THREADS here, before anything imports NumPy,
because OpenBLAS sizes its thread pool when it loads. Only the full option name is read here, and
the suite's parser refuses abbreviations (``allow_abbrev=False``), so the two cannot disagree.
"""
import os
import sys


def _early_threads(argv):
    n = "1"                                      # the suite's default (see benchmarks.suite)
    for i, a in enumerate(argv):                 # the last one wins, as in argparse
        if a == "--threads" and i + 1 < len(argv):
            n = argv[i + 1]
        elif a.startswith("--threads="):
            n = a.split("=", 1)[1]
    return n


_n = _early_threads(sys.argv[1:])
if _n.isdecimal() and int(_n) >= 1:
    from benchmarks.common import THREAD_VARS    # stdlib-only at import time
    for _var in THREAD_VARS:
        os.environ[_var] = _n

from benchmarks.suite import main  # noqa: E402  (after the thread variables)

sys.exit(main())
