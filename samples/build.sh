#!/bin/sh
# Build the C samples (and copy pyworker.py) into DIR (default samples/bin).
#   samples/build.sh [DIR]
# Idempotent; exits non-zero on the first failure.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/bin"}
mkdir -p "$out"
for name in mt_values ticker tree bigheap unsupported mt_sync procstate; do
    gcc -O1 -g -pthread -Wall -o "$out/$name.tmp" "$here/$name.c"
    mv -f "$out/$name.tmp" "$out/$name"
done
cp -f "$here/pyworker.py" "$here/eventloop.py" "$here/aio.py" "$here/sockets.py" "$here/reconnect.py" "$here/prefork.py" "$here/../hooks/crelf_hooks.py" "$out/"
chmod +x "$out/pyworker.py"
echo "samples built in $out"
