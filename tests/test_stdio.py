"""Programs whose stdin/stdout are pipes to the harness that started them
(subprocess.PIPE, a shell reading their output): the restart connects those
fds to crrestart's own stdin/stdout, as it does with a terminal, so the
harness reads the rest of the output from crrestart.  A pipe to an outsider
at any other fd is still refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import require_root
from test_tree import reap

BIN = Path(sys.executable).parent
PIPELINE = ("seq 1 400000 | awk '{ s += $1; if ($1 % 20000 == 0) "
            "{ print $1, s; system(\"sleep 0.1\") } }'")


def test_pipeline_writing_to_the_harness(procs, tmp_path):
    require_root()
    ref = subprocess.run(["sh", "-c", PIPELINE], capture_output=True, timeout=60).stdout
    p = procs.spawn(["sh", "-c", PIPELINE], stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL)
    got = p.stdout.readline() + p.stdout.readline()
    r = subprocess.run([BIN / "crcheck", str(p.pid), "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    keys = {f["key"] for f in json.loads(r.stdout)["findings"]}
    assert "fd:stdio-external" in keys and "fd:pipe-external" not in keys
    r = subprocess.run([BIN / "crcheckpoint", str(p.pid), "-o", str(tmp_path / "p.cr"),
                        "--kill", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got += p.stdout.read()            # what the old pipe still held
    p.wait(timeout=10)
    reap(json.loads(r.stdout)["pids"][1:])
    rs = subprocess.run([BIN / "crrestart", str(tmp_path / "p.cr")], capture_output=True,
                        timeout=120)
    assert rs.returncode == 0, rs.stderr
    assert got + rs.stdout == ref


ADDER = r"""
import sys
s = 0
for line in sys.stdin:
    s += int(line)
    print(f"{line.strip()} -> {s}", flush=True)
print("end", s, flush=True)
"""


def test_filter_reading_the_harness_stdin(procs, tmp_path):
    """A filter fed line by line through a pipe: after the restart the
    harness feeds crrestart's stdin and reads its stdout."""
    require_root()
    prog = tmp_path / "adder.py"
    prog.write_text(ADDER)
    lines = [f"{i * 7}\n".encode() for i in range(1, 41)]
    ref = subprocess.run([sys.executable, prog], input=b"".join(lines), capture_output=True,
                         timeout=60).stdout
    p = procs.spawn([sys.executable, prog], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL)
    got = b""
    for line in lines[:20]:           # one at a time: nothing left in flight
        p.stdin.write(line)
        p.stdin.flush()
        got += p.stdout.readline()
    r = subprocess.run([BIN / "crcheckpoint", str(p.pid), "-o", str(tmp_path / "a.cr"),
                        "--kill"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    p.wait(timeout=10)
    rs = subprocess.run([BIN / "crrestart", str(tmp_path / "a.cr")],
                        input=b"".join(lines[20:]), capture_output=True, timeout=120)
    assert rs.returncode == 0, rs.stderr
    assert got + rs.stdout == ref


def test_outsider_pipe_at_another_fd_is_refused(procs, tmp_path):
    """fd 5 on a pipe whose read end this test holds: refused, with the reason,
    no file, and the program runs on."""
    require_root()
    r_end, w_end = os.pipe()
    try:
        q = procs.spawn([sys.executable, "-c", f"import os, time; os.dup2({w_end}, 5); "
                         f"os.close({w_end}); print('up', flush=True); time.sleep(30)"],
                        stdout=subprocess.PIPE, pass_fds=(w_end,))
        os.close(w_end)
        w_end = -1
        assert q.stdout.readline() == b"up\n"
        r = subprocess.run([BIN / "crcheckpoint", str(q.pid), "-o", str(tmp_path / "x.cr")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 6, r.stderr
        assert "fd 5" in r.stderr and "outside the tree" in r.stderr
        assert not (tmp_path / "x.cr").exists()
        assert q.poll() is None
    finally:
        os.close(r_end)
        if w_end >= 0:
            os.close(w_end)
