"""File descriptors in flight in unix sockets (SCM_RIGHTS messages sent and not
received yet) across a checkpoint and a restart (statefile/dump/scm.py,
restorer/restore/scm.py).

One program sets up every case, then waits for a "go" file and receives and
uses what is in flight: a datagram pair with five messages (a pipe read end,
a message without fds, a regular file the task holds too plus an eventfd and
the file again, a stream socket with its own unread queue, an epoll watching
the receiving socket, each held only by its message); a stream pair with
bytes without fds before and after those sent with them (same read
boundaries), then end-of-file; a seqpacket pair whose sender closed; two datagram sockets in
each other's queues, one held only in flight (a cycle); a child holding one
end of a pair the parent sent a pipe end through.  It is run once
uninterrupted and once checkpointed and restarted: the two outputs must be the
same bytes.  Also: a leave-running checkpoint (the tree runs on, its queues
intact), what is refused and why, and a pair bound to abstract names with each
end in flight through each end (scm06's case)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import descendants, require_root, wait_for_line, wait_pid_exit
from test_checkpoint import checkpoint

from statefile.format import reader
from statefile.check.crcheck import check

BIN = Path(sys.executable).parent

PROG = r"""
import array, os, select, socket, sys, time
D = sys.argv[1]
os.chdir(D)
SOL, RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS

def out(*a):
    os.write(1, (" ".join(map(str, a)) + "\n").encode())

def send(s, data, *fds):
    return s.sendmsg([data], [(SOL, RIGHTS, array.array("i", fds))] if fds else [])

def recv(s, n=100):
    data, anc, flags, _ = s.recvmsg(n, socket.CMSG_SPACE(4 * 8))
    fds = array.array("i")
    for level, kind, d in anc:
        if (level, kind) == (SOL, RIGHTS):
            fds.frombytes(d[:len(d) - len(d) % 4])
    return data, list(fds), flags

def ready_then_go():
    out("ready")
    while not os.path.exists(f"{D}/go"):
        time.sleep(0.02)

# A: a datagram pair, four messages
a1, a2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
r1, w1 = os.pipe()
os.write(w1, b"in the pipe ")
send(a1, b"m1", r1)                        # a read end held only by the message
os.close(r1)
send(a1, b"plain")                         # no fds
reg = os.open(f"{D}/data", os.O_RDWR | os.O_CREAT, 0o600)
os.write(reg, b"0123456789")
os.lseek(reg, 4, os.SEEK_SET)
ev = os.eventfd(7)
send(a1, b"m3", reg, ev, reg)              # a file the task holds too, an eventfd, twice
os.close(ev)
y1, y2 = socket.socketpair()               # a stream pair, its own queue not read
y1.send(b"inner")
send(a1, b"m4", y2.fileno())
y2.close()
ep = select.epoll()
ep.register(a2.fileno(), select.EPOLLIN)
send(a1, b"m5", ep.fileno())               # an epoll held only in flight, watching a2
ep.close()

# B: a stream pair: bytes without fds before and after those with
s1, s2 = socket.socketpair()
f2 = os.open(f"{D}/other", os.O_RDWR | os.O_CREAT, 0o600)
os.write(f2, b"other file")
s1.send(b"AAAA")
send(s1, b"BBB", f2)
os.close(f2)
s1.send(b"CC")
send(s1, b"DD", w1)
s1.shutdown(socket.SHUT_WR)                # then end-of-file

# C: a seqpacket pair whose sender closed
q1, q2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
r3, w3 = os.pipe()
send(q1, b"q-one", w3, r3)
send(q1, b"q-two")
os.close(r3); os.close(w3)
q1.close()

# D: a datagram pair in each other's queue: x1 held only in flight
x1, x2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
send(x1, b"x1 in x2", x1.fileno())
send(x2, b"x2 in x1", x2.fileno())
x1.close()

# E: a child holds one end of a pair; the parent sends it a pipe end
c1, c2 = socket.socketpair()
rq, wq = os.pipe()
send(c1, b"for the child", wq)
os.close(wq)
pid = os.fork()
if pid == 0:
    c1.close(); os.close(rq)
    ready_child = True
    while not os.path.exists(f"{D}/go"):
        time.sleep(0.02)
    data, fds, _ = recv(c2)
    os.write(fds[0], b"child wrote through " + data)
    os._exit(0)
c2.close()

ready_then_go()
for i in range(5):
    data, fds, flags = recv(a2)
    out("A", data, len(fds), flags)
    if data == b"m1":
        out("  pipe:", os.read(fds[0], 100))
        pipe_r = fds[0]
    if data == b"m3":
        out("  same file:", os.fstat(fds[0]).st_ino == os.fstat(reg).st_ino,
            "shared offset:", os.lseek(fds[0], 0, os.SEEK_CUR),
            "read:", os.read(fds[2], 3), "offset now:", os.lseek(reg, 0, os.SEEK_CUR),
            "eventfd:", os.eventfd_read(fds[1]))
    if data == b"m4":
        y = socket.socket(fileno=fds[0])
        out("  inner:", y.recv(100))
        y.send(b"back"); out("  y1 got:", y1.recv(100))
    if data == b"m5":
        e = select.epoll.fromfd(fds[0])
        out("  epoll (a2 empty):", e.poll(0))
        a1.send(b"wake"); out("  epoll:", [(fd == a2.fileno(), ev) for fd, ev in e.poll(0)])
        out("  a2:", a2.recv(10))
for i in range(3):
    data, fds, flags = recv(s2)
    out("B", data, len(fds), flags)
    for fd in fds:
        if os.fstat(fd).st_ino == os.fstat(w1).st_ino:
            os.write(fd, b"through the write end")
            out("  pipe:", os.read(pipe_r, 100))
        else:
            os.lseek(fd, 0, os.SEEK_SET); out("  file:", os.read(fd, 100))
for i in range(3):
    data, fds, flags = recv(q2)
    out("C", data, len(fds), flags)
    if len(fds) == 2:
        os.write(fds[0], b"seq pipe"); out("  pipe:", os.read(fds[1], 100))
data, fds, _ = recv(x2)
x = socket.socket(fileno=fds[0])
out("D", data, len(fds), "peer is x2:", x.getpeername() == x2.getsockname())
data, fds, _ = recv(x)
out("D", data, len(fds), "is x2:", os.fstat(fds[0]).st_ino == os.fstat(x2.fileno()).st_ino)
_, status = os.waitpid(pid, 0)
out("E child", status, os.read(rq, 100))
"""


def _reference(tmp_path: Path, prog: str = PROG) -> bytes:
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    (ref_dir / "go").touch()
    ref = subprocess.run([sys.executable, "-c", prog, ref_dir], capture_output=True,
                         timeout=60)
    assert ref.returncode == 0, ref.stderr
    return ref.stdout


def _start(tmp_path: Path, procs, prog: str = PROG):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = tmp_path / "p.out"
    proc = procs.spawn([sys.executable, "-c", prog, run_dir], stdout=out,
                       stderr=tmp_path / "p.err")
    wait_for_line(out, "^ready$", proc=proc)
    return proc, run_dir, out


def _restart(cr: Path, *extra) -> None:
    res = subprocess.run([str(BIN / "crrestart"), *extra, str(cr)], capture_output=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr


def _in_flight_files(sf) -> dict:
    """Which files the statefile holds only in flight, by kind; the `scm`
    of every socket."""
    only = sorted(f.kind for f in sf.files if f.in_flight)
    scm = [f.socket.scm for f in sf.files
           if f.kind == "socket" and getattr(f.socket, "scm", None)]
    return {"only": only, "scm": scm}


def test_fds_in_flight_restart(procs, tmp_path):
    """--kill and restart: every message comes back with its files, at the
    same boundaries; a leave-running checkpoint before changes nothing."""
    require_root()
    ref = _reference(tmp_path)
    assert b"B b'AAAABBB' 1 0" in ref and b"B b'CCDD' 1 0\n" in ref, ref
    assert b"B b'' 0 0\n" in ref and b"C b'' 0 0\n" in ref, ref
    proc, run_dir, out = _start(tmp_path, procs)
    checkpoint(proc.pid, tmp_path / "peek.cr")          # leave running: changes nothing
    (tmp_path / "peek.cr").unlink()
    pids = [proc.pid, *descendants(proc.pid)]
    summary = checkpoint(proc.pid, tmp_path / "p.cr", "--kill")
    assert summary["restartable"] and sorted(summary["pids"]) == sorted(pids)
    for pid in pids:        # (the child comes to us, a subreaper: a zombie keeps its pid)
        wait_pid_exit(pid)
    got = _in_flight_files(reader.load(str(tmp_path / "p.cr")))
    # held only by their message: the pipe read end r1, the eventfd, the
    # stream socket y2, the epoll, the file "other", the seqpacket's two pipe
    # ends, x1, the child's pipe end
    assert got["only"] == sorted(["pipe", "anon:eventfd", "socket", "anon:eventpoll",
                                  "regular", "pipe", "pipe", "socket", "pipe"]), got
    # messages (stream: segments) per queue: A, B, C, x2, x1, the child's
    assert sorted(len(s) for s in got["scm"]) == [1, 1, 1, 2, 2, 5], got
    assert sorted(len(ids) for s in got["scm"] for ids in s) == \
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3], got
    (run_dir / "go").touch()
    _restart(tmp_path / "p.cr")
    assert out.read_bytes() == ref, (out.read_text(), (tmp_path / "p.err").read_text())


def test_fds_in_flight_leave_running(procs, tmp_path):
    """A leave-running checkpoint: the tree runs on unharmed, its queues intact
    (the same output as without a checkpoint), and crelf keeps none of the
    fds it received; the statefile restarts too, with the same result."""
    require_root()
    ref = _reference(tmp_path)
    proc, run_dir, out = _start(tmp_path, procs)
    # crcheck's survey, run here: it receives every fd in flight, and closes them
    before = sorted(os.listdir("/proc/self/fd"))
    assert check(proc.pid)["checkpointable"]
    assert sorted(os.listdir("/proc/self/fd")) == before
    checkpoint(proc.pid, tmp_path / "p.cr")
    (run_dir / "go").touch()
    assert proc.wait(timeout=20) == 0
    assert out.read_bytes() == ref, (out.read_text(), (tmp_path / "p.err").read_text())
    # the statefile, restarted once the original is done: the same messages
    # again (its files changed size meanwhile: --force-files)
    _restart(tmp_path / "p.cr", "--force-files")
    assert out.read_bytes() == ref, (out.read_text(), (tmp_path / "p.err").read_text())


REFUSED = r"""
import array, os, socket, sys, time
D = sys.argv[1]
SOL, RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
def send(s, data, *fds, to=None):
    anc = [(SOL, RIGHTS, array.array("i", fds))]
    return s.sendmsg([data], anc, 0, to) if to else s.sendmsg([data], anc)
a1, a2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
m = os.memfd_create("in-flight")
os.write(m, b"memfd data")
send(a1, b"memfd", m)                     # a memfd held only by its message
os.close(m)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind(f"{D}/srv.sock")
cli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
r, w = os.pipe()
send(cli, b"to a name", r, to=f"{D}/srv.sock")   # sent to a name, not by a peer
c1, c2 = socket.socketpair()
c2.setsockopt(SOL, socket.SO_PASSCRED, 1)        # its reader gets the sender's credentials
send(c1, b"with creds", w)
print("ready", flush=True)
while not os.path.exists(f"{D}/go"):
    time.sleep(0.02)
for s in (a2, srv, c2):
    data, anc, flags, _ = s.recvmsg(100, 100)
    fds = array.array("i")
    for level, kind, d in anc:
        if (level, kind) == (SOL, RIGHTS):
            fds.frombytes(d)
    print(data, len(fds), flush=True)
"""


def test_fds_in_flight_refused(procs, tmp_path):
    """What a restart cannot send again is refused up front with the reason
    (exit 6, nothing written), and the tree runs on with its queues intact."""
    require_root()
    proc, run_dir, out = _start(tmp_path, procs, REFUSED)
    res = checkpoint(proc.pid, tmp_path / "t.cr", "--kill", check=False)
    assert res.returncode == 6, res.stderr
    assert "Traceback" not in res.stderr
    assert "memfd:in-flight (deleted) in flight" in res.stderr, res.stderr
    assert "datagrams sent to its name by other sockets" in res.stderr, res.stderr
    assert "(SO_PASSCRED, SCM_CREDENTIALS)" in res.stderr, res.stderr
    assert not list(tmp_path.glob("t.cr*"))
    assert proc.poll() is None
    (run_dir / "go").touch()
    assert proc.wait(timeout=10) == 0
    assert out.read_text().splitlines()[1:] == ["b'memfd' 1", "b'to a name' 1",
                                                "b'with creds' 1"]


OVER_THEMSELVES = r"""
import array, os, socket, sys, time
D = sys.argv[1]
SOL, RIGHTS = socket.SOL_SOCKET, socket.SCM_RIGHTS
ska = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(2):
    ska[i].bind(b"\0crelf-test-scm-%d-%d" % (os.getpid(), i))
for i in range(2):              # each end sent through each end
    for j in range(2):
        ska[i].sendmsg([b"%d via %d" % (j, i)], [(SOL, RIGHTS, array.array("i", [ska[j].fileno()]))])
print("ready", flush=True)
while not os.path.exists(f"{D}/go"):
    time.sleep(0.02)
sk = ska[0]
for i in range(3):              # (the fourth would wait: ska[0]'s queue is empty by then)
    data, anc, _, _ = sk.recvmsg(100, 100)
    sk = socket.socket(fileno=array.array("i", anc[0][2])[0])
    print(data, sk.getsockname()[-2:], sk.getpeername()[-2:], flush=True)
"""


def test_sockets_sent_over_themselves(procs, tmp_path):
    """A pair bound to abstract names, each end in flight in both queues (a
    cycle: after the kill, the kernel frees those names only when its
    garbage collector runs): the names, the peers and every message come back."""
    require_root()
    ref = _reference(tmp_path, OVER_THEMSELVES)
    assert ref.count(b"-0'") + ref.count(b"-1'") == 6, ref
    proc, run_dir, out = _start(tmp_path, procs, OVER_THEMSELVES)
    assert checkpoint(proc.pid, tmp_path / "p.cr", "--kill")["restartable"]
    proc.wait(timeout=10)
    (run_dir / "go").touch()
    res = subprocess.run([str(BIN / "crrestart"), str(tmp_path / "p.cr")], capture_output=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"not given back" not in res.stderr, res.stderr
    assert out.read_bytes() == ref, (out.read_text(), (tmp_path / "p.err").read_text())
