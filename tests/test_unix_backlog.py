"""Unix connections waiting to be accepted (a listener's backlog) across a
checkpoint: a stream listener at a relative path with three clients waiting
(one in a child process, one bound to a name of its own) and its listen()
limit lowered below the queue afterwards, a seqpacket listener at an abstract
name with two, and a stream listener whose file was removed with one.

After the restart the program accept()s every connection: accept gives them
in the order they connected, each carries the client's bytes one way and the
server's answer the other, getpeername/getsockname give the same names, the
socket file keeps its mode, and a further connect() still finds the queue
full (the listen() limit is the saved one).  The same program checkpointed
with --kill and restarted, or checkpointed leave-running (it then accepts
them itself, and the statefile restarts afterwards too), prints the same
bytes as an uninterrupted run.

The refused sub-cases (a waiting connection that already carries bytes, one
whose client has closed) exit 6 with their reason and leave the program
unharmed: it accepts them and reads what was sent, as uninterrupted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_lines, require_root, wait_for_line
from test_checkpoint import CRCHECKPOINT
from test_tree import checkpoint_tree, finish, restart

PROGRAM = r"""
import errno, os, socket, stat, sys, time
D, mode = sys.argv[1], sys.argv[2]
os.chdir(D)
ABS = ("\0crelf-backlog-%d" % os.getpid()).encode()
U, SEQ = socket.AF_UNIX, socket.SOCK_SEQPACKET

def out(*a):
    os.write(1, (" ".join(map(str, a)) + "\n").encode())

def show(addr):
    if addr in (None, "", b""):
        return "unnamed"
    if isinstance(addr, bytes):
        return "@abstract" if addr == ABS else repr(addr)
    return addr.replace(D, "DIR")

lst = socket.socket(U, socket.SOCK_STREAM)
lst.bind("l.sock")                           # relative to the working directory
os.chmod("l.sock", 0o640)
lst.listen(4)
c1 = socket.socket(U, socket.SOCK_STREAM)
c1.connect("l.sock")
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
child = os.fork()
if child == 0:                               # client 2: in another process
    os.close(go_w)
    lst.close()
    c2 = socket.socket(U, socket.SOCK_STREAM)
    c2.connect(f"{D}/l.sock")
    os.write(ready_w, b"x")
    os.read(go_r, 1)                         # (at tick 18)
    c2.sendall(b"hello from c2")
    os._exit(0 if c2.recv(100) == b"ack: hello from c2" else 3)
os.read(ready_r, 1)
c3 = socket.socket(U, socket.SOCK_STREAM)
c3.bind("c3.sock")                           # a client with a name of its own
c3.connect("l.sock")
lst.listen(1)                                # the limit lowered below the queue
seq = socket.socket(U, SEQ)
seq.bind(ABS)
seq.listen(8)
s1, s2 = socket.socket(U, SEQ), socket.socket(U, SEQ)
s1.connect(ABS)
s2.connect(ABS)
s2.shutdown(socket.SHUT_WR)                  # waiting, and sends nothing more
gone = socket.socket(U, socket.SOCK_STREAM)
gone.bind("g.sock")
gone.listen(2)
if mode == "closed":
    x = socket.socket(U, socket.SOCK_STREAM)
    x.connect("g.sock")
    x.close()                                # closed while its connection waits
g1 = socket.socket(U, socket.SOCK_STREAM)
g1.connect("g.sock")
os.unlink("g.sock")
if mode == "data":
    c1.sendall(b"sent before the checkpoint")
out("ready")

def serve(name, l, clients):
    for want in clients:
        a, _ = l.accept()
        got = a.recv(100)
        out(f"{name}: accepted {got!r} peer {show(a.getpeername())} "
            f"sock {show(a.getsockname())}")
        if got:
            a.sendall(b"ack: " + got)
        a.close()

def send():
    for name, c in (("c1", c1), ("c3", c3), ("s1", s1), ("g1", g1)):
        c.sendall(f"hello from {name}".encode())
    os.write(go_w, b"x")

def check():
    out("l.sock mode", oct(stat.S_IMODE(os.stat("l.sock").st_mode)),
        "g.sock exists:", os.path.exists("g.sock"))
    for name, c in (("c1", c1), ("c3", c3), ("s1", s1), ("s2", s2), ("g1", g1)):
        out(f"{name} peer {show(c.getpeername())} sock {show(c.getsockname())}")
    extra = socket.socket(U, socket.SOCK_STREAM)
    extra.setblocking(False)
    try:
        extra.connect("l.sock")
        out("extra connect: accepted into the queue")
    except OSError as e:
        out("extra connect:", errno.errorcode[e.errno])
    extra.close()
    serve("l", lst, ("c1", "c2", "c3"))
    serve("seq", seq, ("s1", "s2"))
    serve("gone", gone, ("g1",) if mode != "closed" else ("x", "g1"))
    for name, c in (("c1", c1), ("c3", c3), ("s1", s1), ("g1", g1)):
        out(f"{name} got {c.recv(100)!r}")
    _, status = os.waitpid(child, 0)
    out("c2 exit", os.waitstatus_to_exitcode(status))

for i in range(1, 26):
    time.sleep(0.1)
    out(f"tick {i}")
    if i == 18:
        send()
    if i == 20:
        check()
"""


def _prog(tmp_path: Path) -> Path:
    prog = tmp_path / "backlog.py"
    prog.write_text(PROGRAM)
    return prog


def _reference(prog: Path, where: Path, mode: str = "ok") -> list[str]:
    where.mkdir()
    r = subprocess.run([sys.executable, str(prog), str(where), mode], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _start(procs, prog: Path, where: Path, out: Path, mode: str = "ok"):
    where.mkdir()
    proc = procs.spawn([sys.executable, prog, where, mode], stdout=out)
    wait_for_line(out, r"^tick 5$", proc=proc, timeout=30)
    return proc


def _sockets(sf: Path) -> list:
    from statefile.format.reader import load
    return [f.socket for f in load(str(sf)).files
            if f.kind == "socket" and f.socket.family == "unix"]


EXPECTED = [
    "l.sock mode 0o640 g.sock exists: False",
    "c1 peer l.sock sock unnamed",
    "c3 peer l.sock sock c3.sock",
    "s1 peer @abstract sock unnamed",
    "g1 peer g.sock sock unnamed",
    "extra connect: EAGAIN",
    "l: accepted b'hello from c1' peer unnamed sock l.sock",
    "l: accepted b'hello from c2' peer unnamed sock l.sock",
    "l: accepted b'hello from c3' peer c3.sock sock l.sock",
    "seq: accepted b'hello from s1' peer unnamed sock @abstract",
    "seq: accepted b'' peer unnamed sock @abstract",
    "gone: accepted b'hello from g1' peer unnamed sock g.sock",
    "c1 got b'ack: hello from c1'",
    "c3 got b'ack: hello from c3'",
    "s1 got b'ack: hello from s1'",
    "g1 got b'ack: hello from g1'",
    "c2 exit 0",
]


def _check_saved(sf: Path) -> None:
    """The checkpoint saw the connections waiting (it came in time)."""
    socks = _sockets(sf)
    listeners = [s for s in socks if s.listening]
    assert sorted(len(s.backlog) for s in listeners) == [1, 2, 3]
    lst = next(s for s in listeners if len(s.backlog) == 3)
    assert lst.max_backlog == 1 and lst.file_owner[2] == 0o640
    waiting = [s for s in socks if s.backlog_of]
    assert len(waiting) == 6 and not any(s.backlog_data for s in waiting)


@pytest.mark.parametrize("how", ["", "--pidns"])
def test_backlog_restarts_and_is_accepted_in_order(procs, tmp_path, how):
    require_root()
    prog = _prog(tmp_path)
    ref = _reference(prog, tmp_path / "ref")
    for line in EXPECTED:
        assert line in ref, "\n".join(ref)
    out = tmp_path / "run.out"
    proc = _start(procs, prog, tmp_path / "run", out)
    sf = tmp_path / "run.cr"
    checkpoint_tree(proc, sf)
    _check_saved(sf)
    code, err = finish(restart(procs, sf, *([how] if how else [])))
    assert code == 0, err
    assert read_lines(out) == ref


def test_backlog_leave_running_then_restart(procs, tmp_path):
    """A leave-running checkpoint takes nothing from the queues: the program
    accepts every connection itself, as uninterrupted; the statefile then
    restarts (once the program has exited) and does the same again."""
    require_root()
    prog = _prog(tmp_path)
    ref = _reference(prog, tmp_path / "ref")
    out = tmp_path / "run.out"
    proc = _start(procs, prog, tmp_path / "run", out)
    sf = tmp_path / "run.cr"
    checkpoint_tree(proc, sf, kill=False)
    _check_saved(sf)
    assert proc.wait(timeout=60) == 0
    assert read_lines(out) == ref
    # The restart writes its output from where the program was at the
    # checkpoint: cut the file back there, so what follows is the restart's.
    from statefile.format.reader import load
    pos = next(f.pos for f in load(str(sf)).files if f.path == str(out))
    os.truncate(out, pos)
    assert len(read_lines(out)) < len(ref)
    code, err = finish(restart(procs, sf, "--force-files"))   # (its output file changed)
    assert code == 0, err
    assert read_lines(out) == ref


REFUSED = {"data": "only accept() reaches it",
           "closed": "whether a closed client sent data cannot be read"}


@pytest.mark.parametrize("mode", sorted(REFUSED))
def test_refused_backlog_leaves_the_program_unharmed(procs, tmp_path, mode):
    """A waiting connection that carries bytes its client sent, or one whose
    client has closed: refused (exit 6, the sub-case's reason, no file), and
    the program then accepts it and reads what was sent, as uninterrupted."""
    require_root()
    prog = _prog(tmp_path)
    ref = _reference(prog, tmp_path / "ref", mode)
    out = tmp_path / "run.out"
    proc = _start(procs, prog, tmp_path / "run", out, mode)
    sf = tmp_path / "run.cr"
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(sf), "--kill"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert REFUSED[mode] in r.stderr, r.stderr
    for other, reason in REFUSED.items():
        if other != mode:
            assert reason not in r.stderr, r.stderr
    assert not sf.exists() and not list(tmp_path.glob("run.cr*"))
    assert proc.wait(timeout=60) == 0
    assert read_lines(out) == ref
    if mode == "data":
        assert "l: accepted b'sent before the checkpointhello from c1' peer unnamed " \
               "sock l.sock" in ref
    else:
        assert "gone: accepted b'' peer unnamed sock g.sock" in ref
