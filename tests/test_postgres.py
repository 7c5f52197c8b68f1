"""A real database: a PostgreSQL server (postmaster and its background
workers: a process tree with a SysV segment, MAP_SHARED memory, POSIX shm,
listening unix and TCP sockets, pipes) is checkpointed with --kill between two
client sessions and restarted; the second session's output is byte-identical
to the same sessions against a server that ran uninterrupted."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import require_root
from test_tree import checkpoint_tree, finish, restart

BIN = Path(sys.executable).parent

SQL1 = """
CREATE TABLE t(a int PRIMARY KEY, b text);
INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
CREATE INDEX ON t(b);
SELECT count(*), sum(a), min(b), max(b) FROM t;
"""
SQL2 = """
INSERT INTO t SELECT g, md5(g::text) FROM generate_series(20001, 30000) g;
UPDATE t SET b = upper(b) WHERE a % 7 = 0;
SELECT count(*), sum(a), min(b), max(b) FROM t;
SELECT a, b FROM t WHERE b LIKE 'ABC%' ORDER BY a LIMIT 5;
"""


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        found = []
    if not found or not shutil.which("psql"):
        pytest.fail("PostgreSQL is missing (scripts/setup.sh installs it)", pytrace=False)
    return Path(found[-1]).parent


def _as_postgres(*argv) -> list[str]:
    return ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--clear-groups",
            *map(str, argv)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _psql(sock, sql: str) -> bytes:
    """Run sql through the server's unix socket (sock = (dir, port)) or, with
    sock = ("127.0.0.1", port), over TCP."""
    host, port = sock
    deadline = time.monotonic() + 30
    while True:
        r = subprocess.run(["psql", "-X", "-h", str(host), "-p", str(port), "-U", "postgres",
                            "-v",
                            "ON_ERROR_STOP=1", "-c", sql], capture_output=True, timeout=60)
        if r.returncode == 0:
            return r.stdout
        if time.monotonic() > deadline or b"No such file" not in r.stderr and \
                b"starting up" not in r.stderr and b"Connection refused" not in r.stderr:
            raise AssertionError(f"psql failed: {r.stderr.decode()}")
        time.sleep(0.1)


def _server(procs, pg: Path, root: Path, name: str):
    data, sock = root / f"{name}-data", root / f"{name}-sock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    subprocess.run(_as_postgres(pg / "initdb", "-D", data, "-A", "trust", "-U", "postgres"),
                   check=True, capture_output=True, timeout=120)
    port = _free_port()
    proc = procs.spawn(_as_postgres(pg / "postgres", "-D", data,
                                    "-c", "listen_addresses=127.0.0.1", "-c", f"port={port}",
                                    "-c", f"unix_socket_directories={sock}",
                                    "-c", "logging_collector=off"),
                       stdout=root / f"{name}.log", stderr=subprocess.STDOUT)
    return proc, (sock, port)


def _stop(pid: int) -> None:
    """Fast shutdown: the server removes its shared memory itself."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.05)


@pytest.fixture
def pg_dir():
    """A directory user postgres can reach (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="crelf-pg-"))
    os.chmod(d, 0o755)
    shutil.chown(d, "postgres", "postgres")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_postgres_serves_on_after_restart(procs, pg_dir):
    require_root()
    pg = _pg_bin()
    root = pg_dir

    ref_proc, ref_sock = _server(procs, pg, root, "ref")
    try:
        ref = _psql(ref_sock, SQL1) + _psql(ref_sock, SQL2)
    finally:
        _stop(ref_proc.pid)

    proc, sock = _server(procs, pg, root, "cr")
    try:
        got = _psql(sock, SQL1)
        summary = checkpoint_tree(proc, root / "pg.cr")
        assert len(summary["pids"]) >= 4          # postmaster and its workers
        r = restart(procs, root / "pg.cr", "--detach")
        code, err = finish(r)
        assert code == 0, err
        got += _psql(sock, SQL2)
        # and over TCP: the listening socket is back on its port
        assert b"30000" in _psql(("127.0.0.1", sock[1]), "SELECT count(*) FROM t;")
    finally:
        _stop(proc.pid)
    assert got == ref
