"""epoll items whose fd number was closed (also one above the fd limit the
program set afterwards), reused by another file, or shared by several items (an item is a (file, fd number) pair fixed at EPOLL_CTL_ADD)
come back under their own numbers across a --kill checkpoint and a restart;
an epoll instance watching a file its task no longer holds is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import require_root, wait_for_line
from test_checkpoint import checkpoint

from statefile.format import reader

BIN = Path(sys.executable).parent

PROG = r"""
import os, select, sys, time
D = sys.argv[1]

def out(*a):
    os.write(1, (" ".join(map(str, a)) + "\n").encode())

ep = select.epoll()
ep2 = select.epoll()
pipes = [os.pipe() for _ in range(7)]
# pipe 0: watched as fd 900, which is then closed
os.dup2(pipes[0][0], 900); ep.register(900, select.EPOLLIN); os.close(900)
# pipes 1, 2, 3: all watched as fd 901; 901 ends up holding pipe 3
for i in (1, 2, 3):
    os.dup2(pipes[i][0], 901)
    ep2.register(901, select.EPOLLIN)
# pipe 4: watched at its own number, then that number reused for pipe 5's read end
r4 = os.dup(pipes[4][0])
ep.register(r4, select.EPOLLIN)
keep4 = os.dup(r4); os.dup2(pipes[5][0], r4)
ep.register(pipes[5][0], select.EPOLLIN)      # and pipe 5 at its own number too
# pipe 6: watched as fd 3000, closed, and the fd limit lowered below it
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, max(hard, 4096)))
os.dup2(pipes[6][0], 3000); ep.register(3000, select.EPOLLIN); os.close(3000)
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, max(hard, 4096)))
out("ready")
while not os.path.exists(f"{D}/go"):
    time.sleep(0.02)
for i, (r, w) in enumerate(pipes):
    os.write(w, b"x")
    evs = ep.poll(0) + ep2.poll(0)
    out(f"pipe {i} ->", sorted(fd for fd, _ in evs))
    os.read(keep4 if i == 4 else r, 1)
"""


def test_epoll_items_under_closed_and_reused_numbers(procs, tmp_path):
    require_root()
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    (ref_dir / "go").touch()
    ref = subprocess.run([sys.executable, "-c", PROG, ref_dir], capture_output=True,
                         timeout=60)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "e.out"
    proc = procs.spawn([sys.executable, "-c", PROG, run_dir], stdout=out,
                       stderr=tmp_path / "e.err")
    wait_for_line(out, "^ready$", proc=proc)
    checkpoint(proc.pid, tmp_path / "e.cr", "--kill")
    proc.wait(timeout=10)
    eps = [f.anon.targets for f in reader.load(str(tmp_path / "e.cr")).files
           if f.kind == "anon:eventpoll"]
    tfds = sorted(t.tfd for ts in eps for t in ts)
    assert tfds.count(901) == 3 and 900 in tfds, tfds
    assert all(isinstance(t.fd, int) for ts in eps for t in ts)     # not None nor UNSET
    assert [t for ts in eps for t in ts if t.tfd == 900][0].fd != 900
    (run_dir / "go").touch()
    res = subprocess.run([str(BIN / "crrestart"), str(tmp_path / "e.cr")],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref.stdout, (out.read_text(), (tmp_path / "e.err").read_text())
    lines = ref.stdout.decode().splitlines()
    assert lines[1:5] == ["pipe 0 -> [900]", "pipe 1 -> [901]", "pipe 2 -> [901]",
                          "pipe 3 -> [901]"], lines
    assert lines[7] == "pipe 6 -> [3000]", lines

def test_epoll_watching_a_file_only_a_child_holds_is_refused(procs, tmp_path):
    require_root()
    prog = r"""
import os, select, time
ep = select.epoll()
r, w = os.pipe()
ep.register(r, select.EPOLLIN)
if os.fork() == 0:               # the child keeps the pipe open ...
    while True:
        time.sleep(1)
os.close(r)                      # ... the parent, which watches it, does not
os.write(1, b"ready\n")
while True:
    time.sleep(1)
"""
    out = tmp_path / "o"
    proc = procs.spawn([sys.executable, "-c", prog], stdout=out)
    wait_for_line(out, "^ready$", proc=proc)
    res = checkpoint(proc.pid, tmp_path / "t.cr", "--kill", check=False)
    assert res.returncode == 6, res.stderr
    assert "Traceback" not in res.stderr
    assert "watches a file its task no longer has open" in res.stderr, res.stderr
    assert not list(tmp_path.glob("t.cr*"))
    assert proc.poll() is None
