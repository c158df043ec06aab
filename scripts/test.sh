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
# The two passes run side by side: pass 1 spends much of its time waiting on processes it
#   launched (ranks, the CLI, memory probes) and pass 2's small tests keep one of its two
#   threads idle, so together they fill the cores that either leaves free. Pass 2's OpenMP
#   threads wait passively (OMP_WAIT_POLICY=PASSIVE) instead of spinning on a shared core;
#   what they compute is the same. Pass 2's report is printed after pass 1's.
# --durations prints the slowest tests of each pass. Arguments go on to both passes.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp "${TMPDIR:-/tmp}/hesse-pass2.XXXXXX")
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python -m pytest -q -p randomly \
    -p no:cacheprovider -m "not distributed and not once" --durations=15 "$@" >"$log" 2>&1 &
pass2=$!
# An interrupted run stops both. Under `set -e` a failing command in the trap would itself
# end the script with status 1, and `kill` fails once pass 2 has ended: hence `|| true`.
trap 'kill "$pass2" 2>/dev/null || true; rm -f "$log"' EXIT
status=0
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m pytest -q -p randomly -n 2 --dist loadfile \
    --durations=15 "$@" || status=$?
wait "$pass2" || status=1
echo "---- pass 2 (2 threads) ----"
cat "$log"
exit "$status"
