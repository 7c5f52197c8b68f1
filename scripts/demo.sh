#!/usr/bin/env bash
# The main job on a built-in sample: run a ticker, checkpoint it (killing it),
# inspect the statefile, look at it with gdb, restart it and watch it go on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
B=.venv/bin
work=$(mktemp -d /tmp/crelf-demo.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
sh samples/build.sh "$work/bin" >/dev/null

echo "== a ticker that prints a memory checksum every 100 ms"
# Only stdout (a file) and /dev/null: no stray inherited fds (a pipe to a
# process outside the tree cannot be restored, and crcheckpoint would refuse it).
$B/python -c 'import os, sys; os.closerange(3, 4096); os.execv(sys.argv[1], sys.argv[1:])' \
    "$work/bin/ticker" 40 > "$work/ticker.out" 2>/dev/null </dev/null & pid=$!
sleep 1
tail -n 3 "$work/ticker.out"

echo "== crcheckpoint $pid -o app.cr --kill"
$B/crcheckpoint "$pid" -o "$work/app.cr" --kill
wait "$pid" 2>/dev/null || true
pid=
echo "   (the ticker is gone; its output stopped at: $(tail -n 1 "$work/ticker.out"))"

echo "== crinspect app.cr"
$B/crinspect "$work/app.cr"
$B/crinspect verify "$work/app.cr"

if command -v gdb >/dev/null; then
    echo "== gdb reads it as a core file"
    gdb -nx -batch -ex bt "$work/bin/ticker" -c "$work/app.cr" 2>/dev/null | grep '^#' || true
fi

if [ -x $B/crrestart ]; then
    echo "== crrestart app.cr (the ticker goes on where it stopped)"
    $B/crrestart "$work/app.cr"   # reopens ticker.out at its saved offset
    tail -n 3 "$work/ticker.out"
    echo "== compare with an uninterrupted run"
    "$work/bin/ticker" 40 > "$work/straight.out"
    if cmp -s "$work/ticker.out" "$work/straight.out"; then
        echo "   identical, byte for byte"
    else
        echo "   DIFFERENT"; diff "$work/ticker.out" "$work/straight.out" | head; exit 1
    fi
fi
