"""A pre-fork worker pool: a parent and three workers sharing one listening
unix socket, with a socketpair from the parent to each worker, restarts and
keeps serving; every worker's state survives."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from helpers import descendants, require_root, wait_for_line, wait_pid_exit
from test_checkpoint import checkpoint

BIN = Path(sys.executable).parent


def ask(path: Path, line: str) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(line.encode() + b"\n")
        return s.makefile().readline().strip()


def _serve(pool: Path, first: int, count: int, served: dict[int, list[int]]) -> None:
    """Ask `count` pings; record, per worker, the request numbers it gave."""
    for i in range(first, first + count):
        reply = ask(pool, f"ping {i}")
        m = re.fullmatch(rf"pong {i} from worker ([123]) request (\d+)", reply)
        assert m, reply
        served.setdefault(int(m[1]), []).append(int(m[2]))


def _check_pool_state(ctl: Path, served: dict[int, list[int]], total: int) -> None:
    """Which worker answers is up to the scheduler (so no byte-for-byte
    comparison with another run is possible); what must hold exactly: every
    worker numbers its requests 1, 2, 3... with none lost or repeated across
    the checkpoint, and the parent's per-worker counts agree."""
    for k, seq in served.items():
        assert seq == list(range(1, len(seq) + 1)), (k, seq)
    stats = ask(ctl, "stats")
    m = re.fullmatch(r"served (\d+)\+(\d+)\+(\d+)=(\d+)", stats)
    assert m, stats
    assert [int(x) for x in m.groups()[:3]] == [len(served.get(k, [])) for k in (1, 2, 3)], \
        (stats, served)
    assert int(m[4]) == total


def _start_pool(sample_bin, procs, tmp_path):
    proc = procs.spawn([sys.executable, sample_bin / "prefork.py", tmp_path, 3],
                       stdout=tmp_path / "pool.out", stderr=tmp_path / "pool.err")
    wait_for_line(tmp_path / "pool.out", "ready", proc=proc)
    return proc, tmp_path / "pool.sock", tmp_path / "ctl.sock"


def test_prefork_pool_restarts_and_keeps_serving(sample_bin, procs, tmp_path):
    require_root()
    proc, pool, ctl = _start_pool(sample_bin, procs, tmp_path)
    served: dict[int, list[int]] = {}
    _serve(pool, 0, 6, served)
    _check_pool_state(ctl, served, 6)
    pids = sorted([proc.pid, *descendants(proc.pid)])
    assert len(pids) == 4
    summary = checkpoint(proc.pid, tmp_path / "pool.cr", "--kill")
    assert summary["restartable"] and sorted(summary["pids"]) == pids
    proc.wait(timeout=10)
    # The killed workers were re-parented to us (the procs fixture makes this
    # process a subreaper): reap them, a zombie keeps its pid.
    for pid in pids:
        if pid != proc.pid:
            wait_pid_exit(pid)
    res = subprocess.run([str(BIN / "crrestart"), "--detach", str(tmp_path / "pool.cr")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert sorted([proc.pid, *descendants(proc.pid)]) == pids
    _check_pool_state(ctl, served, 6)
    _serve(pool, 6, 12, served)
    _check_pool_state(ctl, served, 18)


def test_prefork_pool_unchanged_by_leave_running_checkpoints(sample_bin, procs, tmp_path):
    """Checkpoints of the running pool between requests: every worker's count
    goes on from where it was, no request lost, the pool itself untouched."""
    require_root()
    proc, pool, ctl = _start_pool(sample_bin, procs, tmp_path)
    pids = sorted([proc.pid, *descendants(proc.pid)])
    served: dict[int, list[int]] = {}
    for k in range(3):
        _serve(pool, 4 * k, 4, served)
        summary = checkpoint(proc.pid, tmp_path / f"pool{k}.cr")
        assert summary["restartable"] and not summary["killed"]
        assert sorted(summary["pids"]) == pids
        _check_pool_state(ctl, served, 4 * (k + 1))
    assert sorted([proc.pid, *descendants(proc.pid)]) == pids
    assert proc.poll() is None
    assert (tmp_path / "pool.err").read_text() == ""


PEERLESS = r"""
import os, socket, time
a, b = socket.socketpair()
b.sendall(b"left behind by a peer that closed\n")
b.close()                      # a: connected, peer gone, data unread
for i in range(1, 41):
    time.sleep(0.05)
    print(f"tick {i}", flush=True)
    if i == 20:
        data = b""
        while True:
            chunk = a.recv(4096)
            if not chunk:
                break
            data += chunk
        print(f"read {data!r} then EOF", flush=True)
        try:
            a.send(b"x")
        except BrokenPipeError:
            print("send: EPIPE", flush=True)
"""


def test_socket_whose_peer_closed(procs, tmp_path):
    """A connected unix socket whose peer has closed (the JVM has one):
    restarted, its unread data is still there, then EOF, and a send fails
    with EPIPE, as in an uninterrupted run."""
    require_root()
    from test_tree import checkpoint_tree, finish, restart
    from helpers import read_lines
    prog = tmp_path / "peerless.py"
    prog.write_text(PEERLESS)
    ref = subprocess.run([sys.executable, str(prog)], capture_output=True, text=True,
                         timeout=60).stdout.splitlines()
    out = tmp_path / "p.out"
    proc = procs.spawn([sys.executable, prog], stdout=out)
    wait_for_line(out, r"^tick 5$", proc=proc)
    checkpoint_tree(proc, tmp_path / "p.cr")
    r = restart(procs, tmp_path / "p.cr")
    code, err = finish(r)
    assert code == 0, err
    assert read_lines(out) == ref
    assert "send: EPIPE" in ref
