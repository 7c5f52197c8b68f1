"""More unix and inet socket state across a --kill checkpoint and a restart:
sockets whose file was deleted or replaced (by another socket, by a FIFO, a
removed directory), a datagram socket connected to itself, a datagram socket
whose peer closed with data still queued, a listening socket bound by a
relative name, an unconnected stream socket, SO_PEEK_OFF, socket options, a
TCP socket never connected, and UDP sockets bound with IP_FREEBIND to an
address this machine does not have.

Each program is run once uninterrupted (in its own directory) and once
checkpointed (first leave-running, then --kill) when it prints "ready", and
restarted; after a "go" file appears it prints what it sees.  The two outputs
must be the same bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import require_root, wait_for_line
from test_checkpoint import checkpoint
from test_restart_unpriv import NOBODY, _python_for_nobody, as_nobody

from statefile.format import reader

BIN = Path(sys.executable).parent

COMMON = r"""
import errno, os, socket, stat, struct, sys, time
D = sys.argv[1]
os.chdir(D)

def out(*a):
    os.write(1, (" ".join(map(str, a)) + "\n").encode())

def show(addr):
    if not addr:
        return "unnamed"
    if isinstance(addr, bytes):
        return repr(addr)
    return addr.replace(D, "DIR")

def ready_then_go():
    out("ready")
    while not os.path.exists(f"{D}/go"):
        time.sleep(0.02)
"""

GHOSTS = COMMON + r"""
# 1. two listeners of one name: the first one's file is at the path, the
#    second one's was replaced (rename dance)
l1 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l1.bind(f"{D}/l.sock"); l1.listen(4)
os.rename(f"{D}/l.sock", f"{D}/tmp")
l2 = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
l2.bind(f"{D}/l.sock"); l2.listen(4)
os.rename(f"{D}/tmp", f"{D}/l.sock")
# 2. a datagram server whose directory was removed, a client connected to
#    it, a datagram queued; a second server of the same name, also gone
os.mkdir(f"{D}/dg")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind(f"{D}/dg/s.sock")
cli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
cli.connect(f"{D}/dg/s.sock")
os.unlink(f"{D}/dg/s.sock")
srv2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv2.bind(f"{D}/dg/s.sock")
cli2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
cli2.connect(f"{D}/dg/s.sock")
os.unlink(f"{D}/dg/s.sock")
os.rmdir(f"{D}/dg")
cli.send(b"queued before the checkpoint")
# 3. a FIFO now at a bound datagram socket's path
fsrv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
fsrv.bind(f"{D}/f.sock")
fcli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
fcli.connect(f"{D}/f.sock")
os.unlink(f"{D}/f.sock")
os.mkfifo(f"{D}/f.sock")
fifo = os.open(f"{D}/f.sock", os.O_RDWR)
ready_then_go()
for name, s in (("l1", l1), ("l2", l2), ("srv", srv), ("srv2", srv2), ("fsrv", fsrv)):
    out(name, "name", show(s.getsockname()))
out("cli peer", show(cli.getpeername()), "cli2 peer", show(cli2.getpeername()))
out("srv queued:", srv.recv(100))
cli.send(b"to srv"); cli2.send(b"to srv2"); fcli.send(b"to fsrv")
out("srv", srv.recv(100), "srv2", srv2.recv(100), "fsrv", fsrv.recv(100))
out("f.sock is a fifo:", stat.S_ISFIFO(os.lstat(f"{D}/f.sock").st_mode))
os.write(fifo, b"p"); out("fifo:", os.read(fifo, 1))
out("dg exists:", os.path.exists(f"{D}/dg"))
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(f"{D}/l.sock")          # reaches l1 (stream), not l2 (seqpacket)
a, _ = l1.accept()
c.send(b"hello l1"); out("l1 accepted:", a.recv(100))
out("entries:", sorted(os.listdir(D)))
"""

DGRAM_ETC = COMMON + r"""
# a datagram socket bound and connected to itself, a datagram queued
me = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
me.bind(f"{D}/me.sock"); me.connect(f"{D}/me.sock")
me.send(b"to myself")
# a datagram pair whose other end closed, data queued
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
b.send(b"left behind 1"); b.send(b"left behind 2"); b.close()
a.setblocking(False)
# a listening socket bound by a relative name
rel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
rel.bind("rel.sock"); rel.listen(4)
# an unconnected stream socket bound to an abstract name
ABS = b"\0crelf-unconn-" + str(os.getpid()).encode()
un = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
un.bind(ABS)
# SO_PEEK_OFF advanced by a peek
p, q = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
q.sendall(b"abcdefgh")
p.setsockopt(socket.SOL_SOCKET, 42, 0)
out("peeked", p.recv(2, socket.MSG_PEEK))
# SO_PASSCRED on a unix socket
pc = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
pc.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
pc.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 7)
ready_then_go()
out("me", show(me.getsockname()), show(me.getpeername()), me.recv(100))
me.send(b"again"); out("me", me.recv(100))
out("a", a.recv(100), a.recv(100))
try:
    a.recv(100)
except BlockingIOError:
    out("a: nothing more")
try:
    a.send(b"x")
except OSError as e:
    out("a send:", errno.errorcode[e.errno])
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect("rel.sock"); s, _ = rel.accept(); c.send(b"rel ok"); out(s.recv(100))
out("un name ok:", un.getsockname() == ABS)
un.listen(1)
c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c2.connect(ABS)
s2, _ = un.accept(); c2.send(b"un ok"); out(s2.recv(100))
out("peek_off", p.getsockopt(socket.SOL_SOCKET, 42), "peeked", p.recv(2, socket.MSG_PEEK),
    "read", p.recv(100))
out("passcred", pc.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED),
    "rcvlowat", pc.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
"""

OPTIONS = COMMON + r"""
SO_MARK, SO_PRIORITY = 36, 12
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)     # never connected
t.setsockopt(socket.SOL_SOCKET, SO_PRIORITY, 5)
t.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 9)
t.setsockopt(socket.SOL_SOCKET, SO_MARK, 77)
t.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
t.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
t.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
t.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 3, 500000))
t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 4))
t.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 33)
t.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
t.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 4321)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)      # IP_FREEBIND kept
u.setsockopt(socket.SOL_IP, 15, 1)
u.bind(("192.0.2.77", 0))
v = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)     # IP_FREEBIND dropped after bind
v.setsockopt(socket.SOL_IP, 15, 1)
v.bind(("2001:db8::77", 0))
v.setsockopt(socket.SOL_IP, 15, 0)
v.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
names = (u.getsockname(), v.getsockname()[:2])
ready_then_go()
g = lambda s, lvl, o, n=None: s.getsockopt(lvl, o) if n is None else s.getsockopt(lvl, o, n)
out("tcp", g(t, socket.SOL_SOCKET, SO_PRIORITY), g(t, socket.SOL_SOCKET, socket.SO_RCVLOWAT),
    g(t, socket.SOL_SOCKET, SO_MARK), g(t, socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    g(t, socket.SOL_SOCKET, socket.SO_OOBINLINE), g(t, socket.SOL_SOCKET, socket.SO_SNDBUF),
    struct.unpack("ll", g(t, socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)),
    struct.unpack("ii", g(t, socket.SOL_SOCKET, socket.SO_LINGER, 8)),
    g(t, socket.IPPROTO_TCP, socket.TCP_NODELAY), g(t, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
    g(t, socket.IPPROTO_TCP, socket.TCP_CORK), g(t, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
try:
    t.recv(1)
except OSError as e:
    out("tcp recv:", errno.errorcode[e.errno])
out("udp freebind", g(u, socket.SOL_IP, 15), "udp6 freebind", g(v, socket.SOL_IP, 15),
    "broadcast", g(v, socket.SOL_SOCKET, socket.SO_BROADCAST))
out("same names:", (u.getsockname(), v.getsockname()[:2]) == names)
"""


def _run(prog: str, tmp_path: Path, procs, check_sf=None) -> None:
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    (ref_dir / "go").touch()
    ref = subprocess.run([sys.executable, "-c", prog, ref_dir], capture_output=True,
                         timeout=60)
    assert ref.returncode == 0, ref.stderr
    ref = ref.stdout.replace(str(ref_dir).encode(), b"DIR")
    out = tmp_path / "p.out"
    proc = procs.spawn([sys.executable, "-c", prog, run_dir], stdout=out,
                       stderr=tmp_path / "p.err")
    wait_for_line(out, "^ready$", proc=proc)
    checkpoint(proc.pid, tmp_path / "peek.cr")      # leave running: changes nothing
    (tmp_path / "peek.cr").unlink()
    summary = checkpoint(proc.pid, tmp_path / "p.cr", "--kill")
    assert summary["restartable"]
    proc.wait(timeout=10)
    if check_sf:
        check_sf(reader.load(str(tmp_path / "p.cr")))
    (run_dir / "go").touch()
    res = subprocess.run([str(BIN / "crrestart"), str(tmp_path / "p.cr")],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = out.read_bytes().replace(str(run_dir).encode(), b"DIR")
    assert got == ref, (got.decode(errors="replace"), (tmp_path / "p.err").read_text())


def test_sockets_whose_file_is_gone(procs, tmp_path):
    """Deleted, replaced, in a removed directory: names back, clients
    connected, queue kept, and the path left as it is (the FIFO stays, the
    directory stays removed, l.sock still reaches the socket that owns it)."""
    require_root()

    def gone(sf):
        g = sorted(f.socket.name.rsplit("/", 1)[-1] for f in sf.files
                   if f.kind == "socket" and getattr(f.socket, "file_gone", False))
        assert g == ["f.sock", "l.sock", "s.sock", "s.sock"], g
    _run(GHOSTS, tmp_path, procs, gone)
    ref = (tmp_path / "p.out").read_text()
    assert "srv queued: b'queued before the checkpoint'" in ref
    assert "f.sock is a fifo: True" in ref and "l1 accepted: b'hello l1'" in ref
    assert "l2 name DIR/l.sock" in ref and "srv2 name DIR/dg/s.sock" in ref


def test_datagram_self_peerless_relative_unconnected(procs, tmp_path):
    """A self-connected datagram socket, a datagram socket whose peer closed
    (both datagrams kept, then ECONNREFUSED), a relative listening name, an
    unconnected stream socket (its queue peek must not fail), SO_PEEK_OFF
    kept (and not changed by the leave-running checkpoint), SO_PASSCRED."""
    require_root()
    _run(DGRAM_ETC, tmp_path, procs)
    ref = (tmp_path / "p.out").read_text()
    assert "me DIR/me.sock DIR/me.sock b'to myself'" in ref
    assert "a b'left behind 1' b'left behind 2'" in ref and "a send: ECONNREFUSED" in ref
    assert "peek_off 2 peeked b'cd' read b'abcdefgh'" in ref
    assert "passcred 1 rcvlowat 7" in ref


def test_socket_options_fresh_tcp_and_freebind(procs, tmp_path):
    """Socket options of a never-connected TCP socket come back; UDP sockets
    bound with IP_FREEBIND to addresses this machine lacks are bound again,
    with IP_FREEBIND as it was (kept, or dropped after the bind)."""
    require_root()

    def fresh(sf):
        tcp = [f.socket for f in sf.files if f.kind == "socket" and f.socket.type == "stream"
               and f.socket.family == "inet"]
        assert tcp and tcp[0].fresh and tcp[0].sockopts.mark == 77
    _run(OPTIONS, tmp_path, procs, fresh)
    ref = (tmp_path / "p.out").read_text()
    assert "tcp 5 9 77 1 1 131072 (3, 500000) (1, 4) 1 33" in ref
    assert "udp freebind 1 udp6 freebind 0 broadcast 1" in ref


def test_connected_tcp_socket_is_not_fresh(procs, tmp_path):
    """A TCP socket whose peer closed its end is not a new socket: it comes
    back as the connection it is (CLOSE_WAIT, tests/test_tcp.py), and reads
    end-of-file as it would have."""
    require_root()
    prog = COMMON + r"""
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
c = socket.socket(); c.connect(l.getsockname())
s, _ = l.accept(); s.close(); l.close()
time.sleep(0.2)
ready_then_go()
print("recv", c.recv(10), flush=True)
"""

    def not_fresh(sf):
        tcp = [f.socket for f in sf.files
               if f.kind == "socket" and getattr(f.socket, "tcp", None)]
        assert tcp and not tcp[0].fresh and tcp[0].tcp.state == "close_wait"
    _run(prog, tmp_path, procs, not_fresh)
    assert "recv b''" in (tmp_path / "p.out").read_text()


@pytest.fixture
def nobody_dir():
    d = Path(tempfile.mkdtemp(prefix="crelf-unpriv-"))
    os.chmod(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_sockets_whose_file_is_gone_unprivileged(procs, nobody_dir):
    """The same, checkpointed and restarted by user 65534 (the private roots
    are made without privilege)."""
    require_root()
    py, env = _python_for_nobody()
    run_dir = nobody_dir / "run"
    run_dir.mkdir()
    os.chown(run_dir, NOBODY, NOBODY)
    out, err = nobody_dir / "p.out", nobody_dir / "p.err"
    for f in (out, err):
        f.touch()
        os.chown(f, NOBODY, NOBODY)
    proc = procs.spawn(as_nobody("/usr/bin/python3", "-c", GHOSTS, run_dir), stdout=out,
                       stderr=err, cwd=nobody_dir)
    wait_for_line(out, "^ready$", proc=proc)
    cr = nobody_dir / "p.cr"
    r = subprocess.run(as_nobody(py, "-m", "statefile.cli", proc.pid, "-o", cr, "--kill"),
                       capture_output=True, text=True, env=env, cwd=nobody_dir, timeout=60)
    assert r.returncode == 0, r.stderr
    proc.wait(timeout=10)
    (run_dir / "go").touch()
    rr = subprocess.run(as_nobody(py, "-m", "restorer.cli", cr), capture_output=True,
                        env=env, cwd=nobody_dir, timeout=60)
    assert rr.returncode == 0, rr.stderr
    text = out.read_text().replace(str(run_dir), "DIR")
    assert "srv queued: b'queued before the checkpoint'" in text, (text, err.read_text())
    for line in ("l2 name DIR/l.sock", "srv2 name DIR/dg/s.sock", "fsrv name DIR/f.sock",
                 "srv b'to srv' srv2 b'to srv2' fsrv b'to fsrv'", "f.sock is a fifo: True",
                 "dg exists: False", "l1 accepted: b'hello l1'"):
        assert line in text, (text, err.read_text())
