#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer in a
# scratch copy of the tree and run the given tests, or the fuzz harness,
# against it.
#   tools/sanitize.sh [pytest args...]         (default: the whole suite)
#   tools/sanitize.sh --fuzz [fuzz.py args...] (tools/fuzz.py, e.g. --cases 2000)
# Needs gcc with libasan/libubsan (Debian's gcc has them) and the test extras.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -C "$here" --exclude=.git --exclude='*.so' --exclude=build -cf - . | tar -C "$work" -xf -
cd "$work"
PCASURGERY_SANITIZE=1 python setup.py -q build_ext --inplace >/dev/null
# Python itself is not built with ASan: preload the runtimes, and skip leak
# checking (CPython keeps interned objects alive at exit by design). A
# failed huge allocation returns NULL (the C core turns it into MemoryError)
# instead of aborting.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PCASURGERY_SHARED="${PCASURGERY_SHARED:-$here/../shared}"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
python -c "import pcasurgery, sys; assert pcasurgery.__file__.startswith('$work'), pcasurgery.__file__"
if [ "${1:-}" = "--fuzz" ]; then
    shift
    exec python tools/fuzz.py "$@"
fi
if [ $# -eq 0 ]; then set -- tests; fi
python -m pytest -q -p no:cacheprovider "$@"
