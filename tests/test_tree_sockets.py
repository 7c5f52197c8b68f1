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


def test_prefork_pool_restarts_and_keeps_serving(sample_bin, procs, tmp_path):
    require_root()
    proc = procs.spawn([sys.executable, sample_bin / "prefork.py", tmp_path, 3],
                       stdout=tmp_path / "pool.out", stderr=tmp_path / "pool.err")
    wait_for_line(tmp_path / "pool.out", "ready", proc=proc)
    pool, ctl = tmp_path / "pool.sock", tmp_path / "ctl.sock"
    for i in range(6):
        assert re.fullmatch(rf"pong {i} from worker [123] request \d", ask(pool, f"ping {i}"))
    assert ask(ctl, "stats").endswith("=6")
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
    before = ask(ctl, "stats")
    assert before.endswith("=6"), before
    for i in range(6, 12):
        assert re.fullmatch(rf"pong {i} from worker [123] request \d+", ask(pool, f"ping {i}"))
    after = ask(ctl, "stats")
    assert after.endswith("=12"), after
