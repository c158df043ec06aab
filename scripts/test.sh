#!/usr/bin/env bash
# The whole test suite twice, in a random order each time (pytest-randomly prints the seed:
# rerun one order with `-p randomly -p "randomly_seed=SEED"`), under 1 and 2 BLAS/OpenMP
# threads: a test may not depend on the thread count, the order or a kernel's last bits.
# The distributed tests run in the first pass only: their ranks pin one thread each (and
# their torchrun launches set OMP_NUM_THREADS=1), so a second pass would repeat the first;
# so do the examples (marked "once": they print, and assert only what no thread count changes).
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m pytest -q -p randomly "$@"
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python -m pytest -q -p randomly -m "not distributed and not once" "$@"
