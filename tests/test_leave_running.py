"""Leave-running checkpoints change nothing a tree can observe: a parent
counting SIGCHLD and every other signal, reaping its children with wait(),
two children streaming numbered records through pipes (one of them reading
what the parent writes), checkpointed five times while it runs.  Its report
(signals seen, children reaped, every record in order) is byte-identical to
an uninterrupted run's."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from helpers import require_root, wait_for_line
from test_checkpoint import checkpoint

PROGRAM = r"""
import os, signal, sys, time
seen = {}
def count(sig, frame):
    seen[sig] = seen.get(sig, 0) + 1
for s in (signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGALRM,
          signal.SIGPIPE, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH):
    signal.signal(s, count)
up_r, up_w = os.pipe()          # child A -> parent
down_r, down_w = os.pipe()      # parent -> child B
back_r, back_w = os.pipe()      # child B -> parent
N = 600
a = os.fork()
if a == 0:
    for fd in (up_r, down_r, down_w, back_r, back_w):
        os.close(fd)
    for i in range(N):
        os.write(up_w, b"A%05d\n" % i)
        time.sleep(0.005)
    os._exit(3)
b = os.fork()
if b == 0:
    for fd in (up_r, up_w, down_w, back_r):
        os.close(fd)
    got = 0
    with os.fdopen(down_r) as f, os.fdopen(back_w, "w") as out:
        for line in f:
            out.write(line.upper())
            out.flush()
            got += 1
    os._exit(got % 256)
for fd in (up_w, down_r, back_w):
    os.close(fd)
print("ready", flush=True)
with os.fdopen(up_r) as up, os.fdopen(down_w, "w") as down, os.fdopen(back_r) as back:
    for i, line in enumerate(up):
        assert line == "A%05d\n" % i, line
        down.write("b%05d\n" % i)
        down.flush()
        reply = back.readline()
        assert reply == "B%05d\n" % i, reply
    time.sleep(0.5)             # A's exit and B's: two SIGCHLDs well apart
    down.close()
    assert back.read() == ""
reaped = sorted((("A" if p == a else "B" if p == b else "?"), os.waitstatus_to_exitcode(st))
                for p, st in (os.wait(), os.wait()))
try:
    os.wait()
    extra = "yes"
except ChildProcessError:
    extra = "no"
time.sleep(0.2)
print(f"records {i + 1} reaped {reaped} more children {extra}")
print("signals", sorted((signal.Signals(s).name, n) for s, n in seen.items()))
"""


def test_leave_running_checkpoints_are_invisible(procs, tmp_path):
    require_root()
    prog = tmp_path / "observe.py"
    prog.write_text(PROGRAM)
    ref = subprocess.run([sys.executable, prog], capture_output=True, timeout=120).stdout
    assert b"signals [('SIGCHLD', " in ref
    out = tmp_path / "o.out"
    proc = procs.spawn([sys.executable, prog], stdout=out)
    wait_for_line(out, r"^ready$", proc=proc)
    done = full = 0
    for k in range(5):
        time.sleep(0.2)
        if proc.poll() is not None:
            break
        res = checkpoint(proc.pid, tmp_path / f"o{k}.cr", check=False)
        if proc.poll() is not None:
            break
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        # child A may have sent its last record and exited by a late round
        assert summary["copy_on_write"] and proc.pid in summary["pids"], summary
        assert 2 <= len(summary["pids"]) <= 3, summary
        full += len(summary["pids"]) == 3
        done += 1
    assert done >= 3 and full >= 2, "the program ended before the checkpoints"
    assert proc.wait(timeout=120) == 0
    assert out.read_bytes() == ref
    # and the parent never saw a signal it would not have seen anyway
    assert signal.SIGUSR1.name not in out.read_text()
