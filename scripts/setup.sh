#!/usr/bin/env bash
# Set up crelf in ./.venv: system tools (gdb, elfutils, gcc) when missing and we
# are root, then an editable install with the test extras.  Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v gcc >/dev/null || need+=(gcc)
command -v gdb >/dev/null || need+=(gdb)
command -v eu-stack >/dev/null || need+=(elfutils)
command -v setpriv >/dev/null || need+=(util-linux)
command -v strace >/dev/null || need+=(strace)
# The firewall lock of TCP connections (statefile/control/netlock.py).
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
# Real programs the tests checkpoint and restart.
for tool in xz:xz-utils bzip2:bzip2 zstd:zstd sqlite3:sqlite3 perl:perl node:nodejs \
            gzip:gzip gcc:gcc java:openjdk-17-jdk-headless redis-server:redis-server; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
# A database (tests/test_postgres.py runs its own server in a temp dir).
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v psql >/dev/null; then
    need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing ${need[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        # no system-wide cluster (and no server started) when postgresql installs
        mkdir -p /etc/postgresql-common
        [ -e /etc/postgresql-common/createcluster.conf ] ||
            echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "setup: missing ${need[*]}; install them (as root: apt-get install ${need[*]})" >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# Byte-compile now: with PYTHONDONTWRITEBYTECODE set (as on this project's
# machines) every command would otherwise compile crelf's modules at each start
# (~0.1 s of a checkpoint's wall time, bench/README.md).
.venv/bin/python -m compileall -q statefile restorer inspect hooks >/dev/null
