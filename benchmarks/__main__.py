"""``python -m benchmarks``: the benchmark suite (see :mod:`benchmarks.suite` for the options).

The thread count is put into OMP/OPENBLAS/MKL_NUM_THREADS here, before anything imports NumPy,
because OpenBLAS sizes its thread pool when it loads.
"""
import os
import sys


def _early_threads(argv):
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"                                   # the suite's default (see benchmarks.suite)


_n = _early_threads(sys.argv[1:])
if _n.isdigit() and int(_n) >= 1:
    from benchmarks.common import THREAD_VARS    # stdlib-only at import time
    for _var in THREAD_VARS:
        os.environ[_var] = _n

from benchmarks.suite import main  # noqa: E402  (after the thread variables)

sys.exit(main())
