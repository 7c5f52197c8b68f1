"""Established TCP connections checkpointed and restarted with the kernel's TCP
repair mode (statefile/dump/tcp.py, restorer/restore/tcp.py) behind a
firewall lock (statefile/control/netlock.py), docs/NETWORK.md: the peer,
inside the tree or outside it, sees a pause and nothing else: no reset, no
byte lost, none twice.  Every test checks that no firewall rule is left."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import msgspec
import pytest

from helpers import read_lines, require_root, wait_for_line
from test_checkpoint import checkpoint
from test_tree import checkpoint_tree, finish, restart

from statefile.control import netlock


@pytest.fixture(autouse=True)
def no_rule_left():
    require_root()
    if shutil.which("nft") is None and not os.path.exists("/usr/sbin/nft"):
        pytest.fail("nftables (nft) is not installed: scripts/setup.sh installs it")
    yield
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    if "crelf c=" in ruleset:     # (a failed test: its lock must not outlive it)
        subprocess.run(["nft", "delete", "table", "inet", netlock.TABLE], capture_output=True)
    assert "crelf c=" not in ruleset, ruleset


def pattern(start: int, n: int) -> bytes:
    """Bytes start .. start+n of an endless stream (a byte lost, doubled or
    moved shows)."""
    return bytes((i * 7 + i // 251) & 0xFF for i in range(start, start + n))


ECHO_SERVER = r"""
import socket, sys
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[2], 0))
srv.listen(4)
if len(sys.argv) > 3:              # a connection that never gets through too (SYN_SENT)
    half = socket.socket()
    half.setblocking(False)
    half.connect_ex(("127.0.0.1", int(sys.argv[3])))
print("port", srv.getsockname()[1], flush=True)
c, _ = srv.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77)
print("accepted", flush=True)
n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    c.sendall(d)
    n += len(d)
print("done", n, c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
      c.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), flush=True)
"""


class Client:
    """A client outside the tree: sends the pattern at a steady pace and checks
    every byte echoed back."""

    def __init__(self, fam, addr, port, rate=2000):
        self.sock = socket.create_connection((addr, port), timeout=60)
        self.sent = self.got = 0
        self.error = None
        self.stop = threading.Event()
        self.rate = rate
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._recv, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self):
        try:
            while not self.stop.is_set():
                self.sock.sendall(pattern(self.sent, self.rate // 100))
                self.sent += self.rate // 100
                time.sleep(0.01)
        except OSError as e:
            self.error = f"send: {e!r}"

    def _recv(self):
        try:
            while True:
                d = self.sock.recv(65536)
                if not d:
                    if not self.stop.is_set():
                        self.error = self.error or "the server closed the connection"
                    return
                if d != pattern(self.got, len(d)):
                    self.error = f"wrong bytes at offset {self.got}"
                    return
                self.got += len(d)
        except OSError as e:
            self.error = self.error or f"recv: {e!r}"

    def progress(self, more: int, timeout: float = 30):
        """Wait until `more` further bytes came back."""
        want = self.got + more
        deadline = time.monotonic() + timeout
        while self.got < want and self.error is None:
            assert time.monotonic() < deadline, f"stuck at {self.got} of {want} bytes"
            time.sleep(0.05)
        assert self.error is None, self.error

    def finish(self, timeout: float = 60):
        self.stop.set()
        self.threads[0].join(10)
        deadline = time.monotonic() + timeout
        while self.got < self.sent and self.error is None:
            assert time.monotonic() < deadline, f"{self.got} of {self.sent} bytes came back"
            time.sleep(0.05)
        assert self.error is None, self.error
        assert self.got == self.sent
        self.sock.shutdown(socket.SHUT_WR)    # (the server sees the end, says done, exits)
        self.threads[1].join(30)
        self.sock.close()


def _echo(procs, tmp_path, v6=False, half=None):
    prog = tmp_path / "echo.py"
    prog.write_text(ECHO_SERVER)
    out = tmp_path / "echo.out"
    addr = "::1" if v6 else "127.0.0.1"
    proc = procs.spawn([sys.executable, prog, "6" if v6 else "4", addr,
                        *([str(half)] if half else [])], stdout=out)
    port = int(wait_for_line(out, r"^port ", proc=proc).split()[1])
    client = Client(socket.AF_INET6 if v6 else socket.AF_INET, addr, port)
    wait_for_line(out, "^accepted$", proc=proc)
    client.progress(2000)
    return proc, out, client


@pytest.mark.parametrize("v6,args", [(False, ()), (True, ()), (False, ("--pidns",))],
                         ids=["ipv4", "ipv6", "ipv4-pidns"])
def test_outside_client_sees_no_reset_after_kill_and_restart(procs, tmp_path, v6, args):
    """A server in the tree, its client outside: checkpoint --kill in the middle
    of the stream, restart (also into a new pid namespace); the client sees a
    pause, then every byte echoed back in order (the socket options with it)."""
    proc, out, client = _echo(procs, tmp_path, v6)
    sf = tmp_path / "echo.cr"
    checkpoint(proc.pid, sf, "--kill")
    proc.wait(timeout=10)
    assert any("crelf c=" in r["comment"] for r in netlock.rules())   # held until restart
    time.sleep(0.5)          # the client keeps sending into the lock
    rr = restart(procs, sf, "--detach", *args)
    code, err = finish(rr)
    assert code == 0, err
    assert netlock.rules() == [], err      # lifted once the socket is live
    client.progress(5000)
    client.finish()
    wait_for_line(out, r"^done ", timeout=30)
    done = read_lines(out)[-1].split()
    assert int(done[1]) == client.sent
    assert done[2:] == ["1", "77"]


def test_leave_running_checkpoint_keeps_the_connection(procs, tmp_path):
    """The default checkpoint (the tree runs on) with a live client: the
    connection pauses while the tree is frozen and goes on, unharmed."""
    proc, out, client = _echo(procs, tmp_path)
    checkpoint(proc.pid, tmp_path / "live.cr")
    assert netlock.rules() == []          # unlocked as the tree was thawed
    assert proc.poll() is None
    client.progress(5000)
    client.finish()
    wait_for_line(out, r"^done ", timeout=30)
    assert int(read_lines(out)[-1].split()[1]) == client.sent
    os.unlink(tmp_path / "live.cr")       # (its connection has ended: nothing to restart)


PAIR = r"""
import os, select, socket, sys
def pattern(start, n):
    return bytes((i * 7 + i // 251) & 0xFF for i in range(start, start + n))
srv = socket.socket(socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET)
srv.bind((sys.argv[2], 0))
srv.listen(1)
port = srv.getsockname()[1]
if os.fork() == 0:
    srv.close()
    s, who = socket.create_connection((sys.argv[2], port)), "child"
else:
    (s, _), who = srv.accept(), "parent"
    srv.close()
s.setblocking(False)
sent = got = mark = 0
while True:
    r, w, _ = select.select([s], [s], [], 1)
    if w:
        try:
            sent += s.send(pattern(sent, 500))
        except BlockingIOError:
            pass
    if r:
        d = s.recv(65536)
        if d != pattern(got, len(d)) or not d:
            os.write(1, f"BAD {who} at {got}\n".encode())
            sys.exit(1)
        got += len(d)
        if got >= mark:
            os.write(1, f"{who} got {got}\n".encode())
            mark += 200000
    select.select([], [], [], 0.002)
"""


def _got(out, who) -> int:
    lines = [ln for ln in read_lines(out) if ln.startswith(who + " got ")]
    return int(lines[-1].split()[2]) if lines else 0


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_pair_inside_the_tree_streams_on(procs, tmp_path, v6):
    """Parent and child talking both ways over loopback, killed mid-stream and
    restarted: both streams go on, every byte in order (a wrong byte is BAD)."""
    prog = tmp_path / "pair.py"
    prog.write_text(PAIR)
    out = tmp_path / "pair.out"
    proc = procs.spawn([sys.executable, prog, "6" if v6 else "4", "::1" if v6 else "127.0.0.1"],
                       stdout=out)
    wait_for_line(out, r"^parent got [1-9]", proc=proc, timeout=30)
    wait_for_line(out, r"^child got [1-9]", proc=proc, timeout=30)
    sf = tmp_path / "pair.cr"
    checkpoint_tree(proc, sf)          # (--kill; the old tree reaped)
    shown = subprocess.run([os.path.join(os.path.dirname(sys.executable), "crinspect"),
                            "shared", str(sf)],
                           capture_output=True, text=True, timeout=60)
    assert shown.stdout.count("TCP established") == 2, shown.stdout + shown.stderr
    assert shown.stdout.count("peer in the tree") == 2, shown.stdout
    before = {w: _got(out, w) for w in ("parent", "child")}
    rr = restart(procs, sf, "--detach")
    code, err = finish(rr)
    assert code == 0, err
    assert netlock.rules() == []
    deadline = time.monotonic() + 60
    while not all(_got(out, w) > before[w] + 400000 for w in before):
        assert time.monotonic() < deadline, read_lines(out)[-5:]
        assert not any(ln.startswith("BAD") for ln in read_lines(out)), read_lines(out)[-5:]
        time.sleep(0.1)
    assert not any(ln.startswith("BAD") for ln in read_lines(out))


QUEUES = r"""
import os, socket, sys, time
def pattern(start, n):
    return bytes((i * 7 + i // 251) & 0xFF for i in range(start, start + n))
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print("port", srv.getsockname()[1], flush=True)
c, _ = srv.accept()
c.setblocking(False)
sent, idle = 0, 0
while idle < 50:                   # until the peer's window and our buffer are full
    try:
        sent += c.send(pattern(sent, 65536))
        idle = 0
    except BlockingIOError:
        idle += 1
        time.sleep(0.01)
print("full", sent, flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
c.setblocking(True)
want, got = int(sys.argv[2]), b""
while len(got) < want:
    got += c.recv(want - len(got))
print("read", "ok" if got == pattern(0, want) else "BAD", flush=True)
c.sendall(b"end")
print("done", flush=True)
"""


def test_queues_full_both_ways(procs, tmp_path):
    """At the checkpoint the server's send queue is full (its client stopped
    reading: part of it never sent) and its receive queue holds bytes it has
    not read: after the restart both arrive, complete and in order."""
    from statefile.format.reader import load
    prog = tmp_path / "q.py"
    prog.write_text(QUEUES)
    out = tmp_path / "q.out"
    go = tmp_path / "go"
    want = 50000
    proc = procs.spawn([sys.executable, prog, go, want], stdout=out)
    port = int(wait_for_line(out, r"^port ", proc=proc).split()[1])
    c = socket.create_connection(("127.0.0.1", port), timeout=60)
    c.sendall(pattern(0, want))                 # (the server does not read yet)
    total = int(wait_for_line(out, r"^full ", proc=proc, timeout=60).split()[1])
    sf = tmp_path / "q.cr"
    checkpoint(proc.pid, sf, "--kill")
    proc.wait(timeout=10)
    tcp = [f.socket.tcp for f in load(str(sf)).files
           if f.kind == "socket" and getattr(f.socket, "tcp", None)][0]
    assert tcp.inq == want and tcp.outq > 0 and tcp.unsent > 0, \
        {k: v for k, v in msgspec.structs.asdict(tcp).items() if "queue" not in k}
    rr = restart(procs, sf, "--detach")
    code, err = finish(rr)
    assert code == 0, err
    go.touch()
    got = b""
    while len(got) < total + 3:
        d = c.recv(1 << 20)
        assert d, f"connection ended after {len(got)} of {total + 3} bytes"
        got += d
    assert got[:total] == pattern(0, total) and got[total:] == b"end"
    wait_for_line(out, r"^done$", timeout=30)
    assert "read ok" in read_lines(out)
    c.close()


def _refused(procs, tmp_path, code: str, state: str, srv=None):
    out = tmp_path / "t.out"
    proc = procs.spawn([sys.executable, "-c", code], stdout=out)
    if srv is not None:       # the peer closes its end: ours is in CLOSE_WAIT
        peer, _ = srv.accept()
        peer.shutdown(socket.SHUT_WR)
    wait_for_line(out, "^ready$", proc=proc, timeout=20)
    res = checkpoint(proc.pid, tmp_path / "t.cr", check=False)
    assert res.returncode == 6, res.stderr
    assert f"({state})" in res.stderr, res.stderr
    assert not (tmp_path / "t.cr").exists()
    assert netlock.rules() == []
    time.sleep(0.2)
    assert proc.poll() is None
    return res.stderr


CLOSE_WAIT = r"""
import os, socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
got = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    got += d
print("got", got.decode(), flush=True)
c.sendall(b"still writing")
c.close()
time.sleep(60)
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_closed_by_the_peer_comes_back(procs, tmp_path, v6):
    """The peer sent its bytes and its FIN (CLOSE_WAIT), the program has not
    read them: after the restart it reads them, then end-of-file (the peer's
    FIN replayed), and its own bytes and FIN still reach the peer."""
    fam, addr = (socket.AF_INET6, "::1") if v6 else (socket.AF_INET, "127.0.0.1")
    srv = socket.socket(fam)
    srv.bind((addr, 0))
    srv.listen(1)
    srv.settimeout(30)
    prog = tmp_path / "cw.py"
    prog.write_text(CLOSE_WAIT.replace('"127.0.0.1"', repr(addr)))
    out = tmp_path / "cw.out"
    go = tmp_path / "go"
    proc = procs.spawn([sys.executable, prog, srv.getsockname()[1], go], stdout=out)
    peer, _ = srv.accept()
    srv.close()
    wait_for_line(out, "^ready$", proc=proc)
    peer.sendall(b"bytes then FIN")
    peer.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    sf = tmp_path / "cw.cr"
    checkpoint(proc.pid, sf, "--kill")
    proc.wait(timeout=10)
    rr = restart(procs, sf, "--detach")
    code, err = finish(rr)
    assert code == 0, err
    assert netlock.rules() == [], err
    go.touch()
    assert wait_for_line(out, "^got ", timeout=30) == "got bytes then FIN"
    got = b""
    while True:
        d = peer.recv(100)
        if not d:
            break
        got += d
    assert got == b"still writing"
    peer.close()


HALF = r"""
import os, socket, sys, time
def pattern(start, n):
    return bytes((i * 7 + i // 251) & 0xFF for i in range(start, start + n))
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.setblocking(False)
sent, idle = 0, 0
while sent < int(sys.argv[2]) and idle < 50:    # (up to a full buffer, for FIN_WAIT1)
    try:
        sent += c.send(pattern(sent, min(65536, int(sys.argv[2]) - sent)))
        idle = 0
    except BlockingIOError:
        idle += 1
        time.sleep(0.01)
c.setblocking(True)
c.shutdown(socket.SHUT_WR)
print("ready", sent, flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.05)
got = b""
while True:
    d = c.recv(65536)
    if not d:
        break
    got += d
print("got", got.decode(), flush=True)
"""


@pytest.mark.parametrize("state", ["fin_wait2", "fin_wait1"])
def test_shut_down_for_writing_comes_back(procs, tmp_path, state):
    """A connection the program shut down for writing: its FIN acknowledged
    (FIN_WAIT2), or not even sent, behind a full send queue the peer does
    not read (FIN_WAIT1).  After the restart the peer gets every byte then
    end-of-file, and the program still reads what the peer sends."""
    from statefile.format.reader import load
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(30)
    prog = tmp_path / "half.py"
    prog.write_text(HALF)
    out = tmp_path / "half.out"
    go = tmp_path / "go"
    size = 1000 if state == "fin_wait2" else 50 << 20
    proc = procs.spawn([sys.executable, prog, srv.getsockname()[1], size, go], stdout=out)
    peer, _ = srv.accept()
    srv.close()
    got = b""
    if state == "fin_wait2":
        while len(got) < size:
            got += peer.recv(65536)
    sent = int(wait_for_line(out, "^ready ", proc=proc, timeout=60).split()[1])
    time.sleep(0.2)
    sf = tmp_path / "half.cr"
    checkpoint(proc.pid, sf, "--kill")
    proc.wait(timeout=10)
    tcp = [f.socket.tcp for f in load(str(sf)).files
           if f.kind == "socket" and getattr(f.socket, "tcp", None)][0]
    assert tcp.state == state
    rr = restart(procs, sf, "--detach")
    code, err = finish(rr)
    assert code == 0, err
    while True:
        d = peer.recv(1 << 20)
        if not d:
            break
        got += d
    assert len(got) == sent and got == pattern(0, sent)
    go.touch()
    peer.sendall(b"after the restart")
    peer.shutdown(socket.SHUT_WR)
    assert wait_for_line(out, "^got ", timeout=30) == "got after the restart"
    peer.close()


def test_connect_in_progress_refused_with_its_reason(procs, tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)                  # one connection fills its queue: the next stays SYN_SENT
    first = socket.create_connection(srv.getsockname(), timeout=10)
    try:
        err = _refused(procs, tmp_path, "import socket, time\n"
                       "c = socket.socket()\nc.setblocking(False)\n"
                       f"c.connect_ex(('127.0.0.1', {srv.getsockname()[1]}))\ntime.sleep(0.3)\n"
                       "print('ready', flush=True)\ntime.sleep(60)", "syn_sent")
        assert "repair mode cannot resume a handshake" in err
    finally:
        first.close()
        srv.close()


class Incr:
    """A redis client outside the tree in a loop of INCR: every reply must be
    the one before plus one (a lost or doubled increment shows)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.f = self.sock.makefile("rb")
        self.last, self.error = 0, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        try:
            while not self.stop.is_set():
                self.sock.sendall(b"INCR counter\r\n")
                reply = self.f.readline()
                if reply != f":{self.last + 1}\r\n".encode():
                    self.error = f"INCR number {self.last + 1} answered {reply!r}"
                    return
                self.last += 1
                time.sleep(0.002)
        except OSError as e:
            self.error = repr(e)

    def wait(self, n, timeout=60):
        want = self.last + n
        deadline = time.monotonic() + timeout
        while self.last < want and self.error is None:
            assert time.monotonic() < deadline, f"stuck at INCR {self.last}"
            time.sleep(0.05)
        assert self.error is None, self.error


def _ask(sock, cmd: bytes) -> bytes:
    sock.sendall(cmd + b"\r\n")
    return sock.recv(100)


def test_redis_keeps_its_clients(procs, tmp_path):
    """redis-server checkpointed (--kill) in the middle of a client's loop of
    INCR commands, with a second client idle: after the restart the loop goes
    on with no increment lost or doubled, and the idle client is answered."""
    redis = shutil.which("redis-server")
    if redis is None:
        pytest.fail("redis-server is not installed (scripts/setup.sh installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "redis.out"
    proc = procs.spawn([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(tmp_path), "--daemonize", "no"],
                       stdout=out, close_fds=True)
    wait_for_line(out, "Ready to accept connections", proc=proc, timeout=30)
    idle = socket.create_connection(("127.0.0.1", port), timeout=60)
    assert _ask(idle, b"PING") == b"+PONG\r\n"
    loop = Incr(port)
    loop.wait(200)
    sf = tmp_path / "redis.cr"
    checkpoint(proc.pid, sf, "--kill")
    proc.wait(timeout=10)
    at_checkpoint = loop.last
    rr = restart(procs, sf, "--detach")
    code, err = finish(rr)
    assert code == 0, err
    assert netlock.rules() == [], err
    loop.wait(500)
    assert loop.last > at_checkpoint + 400
    assert _ask(idle, b"PING") == b"+PONG\r\n"
    loop.stop.set()
    loop.thread.join(10)
    assert loop.error is None, loop.error
    assert _ask(idle, b"GET counter") == f"${len(str(loop.last))}\r\n{loop.last}\r\n".encode()
    idle.close()
    loop.sock.close()


def test_failed_checkpoint_leaves_the_connection_unharmed(procs, tmp_path):
    """A tree with a live connection (read in repair mode, locked) and one
    still connecting: refused once all is read, so the live one must leave
    repair mode and its lock go: it keeps working, nothing is written."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)                  # one connection fills its queue: the next stays SYN_SENT
    first = socket.create_connection(srv.getsockname(), timeout=10)
    try:
        proc, out, client = _echo(procs, tmp_path, half=srv.getsockname()[1])
        time.sleep(0.2)
        res = checkpoint(proc.pid, tmp_path / "x.cr", check=False)
        assert res.returncode == 6, res.stderr
        assert "(syn_sent)" in res.stderr and "(established)" not in res.stderr, res.stderr
        assert not (tmp_path / "x.cr").exists()
        assert netlock.rules() == []
        client.progress(5000)
        client.finish()
        wait_for_line(out, r"^done ", timeout=30)
        assert read_lines(out)[-1].split()[2:] == ["1", "77"]   # (its options as they were)
    finally:
        first.close()
        srv.close()


def test_rules_of_a_dead_crelf_are_swept(procs, tmp_path):
    """A crelf that died with a connection locked leaves its rule only until
    the next run that uses the lock."""
    code = ("from statefile.control import netlock\n"
            "netlock.NetLock().lock(netlock.Conn('127.0.0.1', 1, '127.0.0.1', 2))\n"
            "print('locked', flush=True)\nimport time; time.sleep(60)")
    out = tmp_path / "l.out"
    p = procs.spawn([sys.executable, "-c", code], stdout=out, close_fds=True)
    wait_for_line(out, "^locked$", proc=p, timeout=30)
    assert len(netlock.rules()) == 1
    assert netlock.sweep() == 0            # (its owner lives: kept)
    p.kill()
    p.wait()
    assert netlock.sweep() == 1
    assert netlock.rules() == []


SHUT_RD = r"""
import os, socket, sys, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print("port", srv.getsockname()[1], flush=True)
c, _ = srv.accept()
c.shutdown(socket.SHUT_RD)
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print("recv", c.recv(10), flush=True)
c.sendall(b"ok")
time.sleep(60)
"""


def test_shut_rd_comes_back(procs, tmp_path):
    """shutdown(SHUT_RD) leaves the connection established: after the restart
    the program still reads end-of-file, and still writes."""
    prog = tmp_path / "shut.py"
    prog.write_text(SHUT_RD)
    out = tmp_path / "shut.out"
    go = tmp_path / "go"
    proc = procs.spawn([sys.executable, prog, go], stdout=out)
    port = int(wait_for_line(out, r"^port ", proc=proc).split()[1])
    c = socket.create_connection(("127.0.0.1", port), timeout=30)
    wait_for_line(out, "^ready$", proc=proc)
    sf = tmp_path / "shut.cr"
    checkpoint(proc.pid, sf, "--kill")
    proc.wait(timeout=10)
    rr = restart(procs, sf, "--detach")
    code, err = finish(rr)
    assert code == 0, err
    go.touch()
    assert c.recv(10) == b"ok"
    assert wait_for_line(out, "^recv ", timeout=10) == "recv b''"
    c.close()


def test_local_address_gone_refused_then_restored_when_back(procs, tmp_path):
    """A connection whose local address this host no longer has: the restart
    fails with one line naming the address, leaves nothing running and keeps
    the lock; once the address is back, the same statefile restarts and the
    client goes on as if nothing happened."""
    addr = "10.231.77.1"
    ip = shutil.which("ip") or "/usr/sbin/ip"
    subprocess.run([ip, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
    try:
        prog = tmp_path / "echo.py"
        prog.write_text(ECHO_SERVER)
        out = tmp_path / "echo.out"
        proc = procs.spawn([sys.executable, prog, "4", addr], stdout=out)
        port = int(wait_for_line(out, r"^port ", proc=proc).split()[1])
        client = Client(socket.AF_INET, addr, port)
        wait_for_line(out, "^accepted$", proc=proc)
        client.progress(2000)
        sf = tmp_path / "gone.cr"
        checkpoint(proc.pid, sf, "--kill")
        proc.wait(timeout=10)
        subprocess.run([ip, "addr", "del", f"{addr}/32", "dev", "lo"], check=True)
        rr = restart(procs, sf, "--detach")
        code, err = finish(rr)
        assert code != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"the local address {addr} does not exist" in lines[0], err
        assert netlock.rules() != []          # (kept: the statefile may restart later)
        subprocess.run([ip, "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        rr = restart(procs, sf, "--detach")
        code, err = finish(rr)
        assert code == 0, err
        assert netlock.rules() == [], err
        client.progress(5000)
        client.finish()
    finally:
        subprocess.run([ip, "addr", "del", f"{addr}/32", "dev", "lo"], capture_output=True)


def test_killed_checkpoints_leave_the_connection_unharmed(procs, tmp_path):
    """crcheckpoint SIGKILLed at moments spread over its run, and just after
    it locked the connection and read it in repair mode: its guard removes
    the rule at once, and the connection goes on (a socket left in repair
    mode would fail the server's recv with EPERM)."""
    from test_checkpoint import CRCHECKPOINT
    proc, out, client = _echo(procs, tmp_path)
    # (None: it dies right after it locked the connection and read it in repair mode)
    for i, delay in enumerate((None, 0.25, 0.35, 0.45, 0.55, 0.65, 0.8, 1.0, None)):
        env = {**os.environ, "CRELF_CHECKPOINT_DIE_AT": "tcp-locked" if delay is None else ""}
        cr = subprocess.Popen([CRCHECKPOINT, str(proc.pid), "-o", str(tmp_path / f"k{i}.cr")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if delay is not None:
            time.sleep(delay)
            cr.kill()
        assert cr.wait() != 0 or delay is not None
        time.sleep(0.2)         # (the guard's work, after its crcheckpoint is gone)
        if delay is None:
            assert netlock.rules() == []      # (the guard removed it)
        client.progress(3000, timeout=60)
        assert proc.poll() is None
        for f in tmp_path.glob(f"k{i}.cr"):
            f.unlink()          # (one that finished first: not this test's subject)
    netlock.sweep()             # (what the next crelf run does)
    assert netlock.rules() == []
    client.finish()
