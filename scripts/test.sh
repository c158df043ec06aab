#!/usr/bin/env bash
# The test suite twice, in a random order each time (pytest-randomly prints the seed:
# rerun one order with `-p randomly -p "randomly_seed=SEED"`), under 1 and 2 BLAS/OpenMP
# threads: a test may not depend on the thread count, the order or a kernel's last bits.
#
# Pass 1: every test, one thread a process, two worker processes (pytest-xdist; a file's
#   tests stay in one worker, so module fixtures are built once).
# Pass 2: two threads, one process, over the tests whose results can depend on the
#   thread count: not the distributed tests (their ranks pin one thread each, and their
#   torchrun launches set OMP_NUM_THREADS=1, so a second pass would repeat the first) and
#   not those marked "once" (the examples, which print and assert nothing a thread count
#   changes; the CLI, the report, training's files, memory peaks, lint and layers, whose
#   numbers come from library calls that pass 2 runs itself).
# --durations prints the slowest tests of each pass. Arguments go on to both passes.
set -euo pipefail
cd "$(dirname "$0")/.."
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m pytest -q -p randomly -n 2 --dist loadfile \
    --durations=15 "$@"
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 python -m pytest -q -p randomly \
    -m "not distributed and not once" --durations=15 "$@"
