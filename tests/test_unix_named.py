"""Named unix sockets across a --kill checkpoint and a restart: a bound
datagram server with a connected client and datagrams queued from named and
unnamed senders; a stream connection accepted from a listening socket (names
checked); seqpacket pairs and listeners; shutdown states; and the specific
refusals (file descriptors in flight, a peer outside the tree, connections
waiting to be accepted, a sender name held outside the tree).

Every program is run once uninterrupted (in its own directory) and once
checkpointed at "tick 5" with --kill and restarted; the outputs must be the
same bytes.  The programs print socket names relative to their directory."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import read_lines, require_root, wait_for_line
from test_checkpoint import CRCHECKPOINT, assert_keeps_ticking
from test_tree import checkpoint_tree, finish, restart

COMMON = r"""
import os, socket, sys, time
D = sys.argv[1]
os.chdir(D)
ABS = ("\0crelf-test-%d" % os.getpid()).encode()

def show(addr):
    if addr is None or addr in ("", b""):
        return "unnamed"
    if isinstance(addr, bytes):
        return "@abstract" if addr == ABS else repr(addr)
    return addr.replace(D, "DIR")

def out(*a):                     # one write per line (parent and child share stdout)
    os.write(1, (" ".join(map(str, a)) + "\n").encode())

def ticks(lo, hi, at=None):
    for i in range(lo, hi + 1):
        time.sleep(0.1)
        out(f"tick {i}")
        if at and i in at:
            at[i]()
"""

DGRAM = COMMON + r"""
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind(f"{D}/srv.sock")
go_r, go_w = os.pipe()
ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:                     # the client: connected to the server's path
    srv.close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    c.connect(f"{D}/srv.sock")
    c.send(b"from the connected client")
    os.write(ready_w, b"x")
    os.read(go_r, 1)             # (blocked here across the checkpoint)
    c.send(f"client peer {show(c.getpeername())} sock {show(c.getsockname())}".encode())
    os._exit(7)
os.read(ready_r, 1)
n1 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)     # named, stays open
n1.bind(f"{D}/n1.sock")
n1.sendto(b"from n1 (open)", f"{D}/srv.sock")
u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)      # unnamed
u.sendto(b"from an unnamed socket", f"{D}/srv.sock")
u.close()
n2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)     # named, closed, file removed
n2.bind(f"{D}/n2.sock")
n2.sendto(b"from n2 (closed)", f"{D}/srv.sock")
n2.close()
os.unlink(f"{D}/n2.sock")
n3 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)     # abstract name, closed
n3.bind(ABS)
n3.sendto(b"from an abstract name", f"{D}/srv.sock")
n3.close()
n1.sendto(b"from n1 again", f"{D}/srv.sock")

def drain():
    srv.setblocking(False)
    while True:
        try:
            data, addr = srv.recvfrom(4096)
        except BlockingIOError:
            break
        out(f"got {data.decode()!r} from {show(addr)}")
    srv.setblocking(True)
    out(f"server sock {show(srv.getsockname())}; n2.sock exists: "
        f"{os.path.exists(D + '/n2.sock')}")

def later():
    os.write(go_w, b"x")
    data, addr = srv.recvfrom(4096)
    out(f"got {data.decode()!r} from {show(addr)}")
    fresh = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fresh.sendto(b"to the path after the checkpoint", f"{D}/srv.sock")
    n1.sendto(b"n1 after the checkpoint", f"{D}/srv.sock")
    for _ in range(2):
        data, addr = srv.recvfrom(4096)
        out(f"got {data.decode()!r} from {show(addr)}")
    _, status = os.waitpid(pid, 0)
    out(f"client exit {os.waitstatus_to_exitcode(status)}")

ticks(1, 30, {20: drain, 25: later})
"""

STREAM = COMMON + r"""
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lst.bind(f"{D}/srv.sock")
lst.listen(4)
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    lst.close()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(f"{D}/srv.sock")
    c.sendall(b"hello from the client\n")
    os.read(go_r, 1)             # (blocked here across the checkpoint)
    f = c.makefile("rb")
    got = f.readline().decode().strip()
    c.sendall(f"client got {got!r}; peer {show(c.getpeername())} "
              f"sock {show(c.getsockname())}\n".encode())
    os._exit(3)
a, addr = lst.accept()
a.sendall(b"welcome\n")          # unread by the client until after the checkpoint
fa = a.makefile("rb")

def talk():
    out(f"accepted sock {show(a.getsockname())} peer {show(a.getpeername())} "
        f"(accept gave {show(addr)})")
    os.write(go_w, b"x")
    for _ in range(2):
        out("server read " + fa.readline().decode().strip())
    _, status = os.waitpid(pid, 0)
    out(f"client exit {os.waitstatus_to_exitcode(status)}")

def again():                      # the listening socket still works by its path
    c2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c2.connect(f"{D}/srv.sock")
    a2, _ = lst.accept()
    c2.sendall(b"ping")
    out(f"second connection: {a2.recv(10)!r}, sock {show(a2.getsockname())}, "
        f"client peer {show(c2.getpeername())}")

ticks(1, 30, {20: talk, 25: again})
"""

SEQPACKET = COMMON + r"""
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
a.send(b"one"); a.send(b"two two"); a.send(b"")      # an empty record, too
b.send(b"back")
lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
lst.bind(f"{D}/sp.sock")
lst.listen(2)
go_r, go_w = os.pipe()
x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)   # across two tasks
pid = os.fork()
if pid == 0:
    a.close(); b.close(); lst.close(); x.close()
    y.send(b"child record 1"); y.send(b"child record 2")
    os.read(go_r, 1)
    y.send(b"child: " + y.recv(100))
    os._exit(0)
y.close()
x.send(b"to the child")

def read():
    for _ in range(3):
        out(f"b got {b.recv(100)!r}")
    out(f"a got {a.recv(100)!r}")
    for _ in range(2):
        out(f"x got {x.recv(100)!r}")
    os.write(go_w, b"x")
    out(f"x got {x.recv(100)!r}")
    os.waitpid(pid, 0)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.connect(f"{D}/sp.sock")
    s, _ = lst.accept()
    c.send(b"r1"); c.send(b"r2 longer")
    out(f"listener: {s.recv(100)!r} {s.recv(100)!r} type {s.type == socket.SOCK_SEQPACKET}"
        f" sock {show(s.getsockname())}")

ticks(1, 30, {20: read})
"""

SHUTDOWN = COMMON + r"""
import errno, signal
signal.signal(signal.SIGPIPE, signal.SIG_IGN)
pairs = {}
for kind in ("stream", "seqpacket"):
    t = socket.SOCK_STREAM if kind == "stream" else socket.SOCK_SEQPACKET
    w, r = socket.socketpair(socket.AF_UNIX, t)     # w: SHUT_WR after its data
    w.send(b"last words"); w.shutdown(socket.SHUT_WR)
    rd, peer = socket.socketpair(socket.AF_UNIX, t)  # rd: SHUT_RD
    peer.send(b"unread"); rd.shutdown(socket.SHUT_RD)
    pairs[kind] = (w, r, rd, peer)
g_r, g_w = os.pipe()
m, n = socket.socketpair()                           # across two tasks
pid = os.fork()
if pid == 0:
    m.close()
    n.sendall(b"child's last words"); n.shutdown(socket.SHUT_WR)
    os.read(g_r, 1)
    os._exit(len(n.recv(100)))     # it can still receive
n.close()

def try_send(s):
    try:
        s.send(b"x")
        return "sent"
    except OSError as e:
        return errno.errorcode[e.errno]

def check():
    for kind, (w, r, rd, peer) in pairs.items():
        out(f"{kind}: r reads {r.recv(100)!r} then {r.recv(100)!r}; w send: {try_send(w)}")
        out(f"{kind}: rd reads {rd.recv(100)!r}; peer send: {try_send(peer)}; "
            f"r send: {try_send(r)}")
    out(f"m reads {m.recv(100)!r} then {m.recv(100)!r}")
    m.sendall(b"ping")
    os.write(g_w, b"x")
    _, status = os.waitpid(pid, 0)
    out(f"the child received {os.waitstatus_to_exitcode(status)} bytes")

ticks(1, 30, {20: check})
"""


def _write(tmp_path: Path, name: str, src: str) -> Path:
    prog = tmp_path / f"{name}.py"
    prog.write_text(src)
    return prog


def _reference(prog: Path, where: Path) -> list[str]:
    where.mkdir()
    r = subprocess.run([sys.executable, str(prog), str(where)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _checkpointed(procs, prog: Path, where: Path, tmp_path: Path):
    """Run prog in `where`, checkpoint it at tick 5 with --kill, restart it;
    returns (output lines, statefile)."""
    where.mkdir()
    out = tmp_path / f"{where.name}.out"
    proc = procs.spawn([sys.executable, prog, where], stdout=out)
    wait_for_line(out, r"^tick 5$", proc=proc, timeout=30)
    sf = tmp_path / f"{where.name}.cr"
    checkpoint_tree(proc, sf)
    r = restart(procs, sf)
    code, err = finish(r)
    assert code == 0, err
    return read_lines(out), sf


def _unix_files(sf: Path) -> list:
    from statefile.format.reader import load
    return [f.socket for f in load(str(sf)).files
            if f.kind == "socket" and f.socket.family == "unix"]


def _run_both(procs, tmp_path, name, src):
    require_root()
    prog = _write(tmp_path, name, src)
    ref = _reference(prog, tmp_path / "ref")
    got, sf = _checkpointed(procs, prog, tmp_path / "run", tmp_path)
    assert got == ref, "\n".join(got)
    return ref, sf


def test_named_datagram_server_client_and_queued_senders(procs, tmp_path):
    """A bound datagram server, a client (another task) connected to its path,
    and datagrams queued from a named sender still open, an unnamed one, a
    named one closed (file removed) and an abstract one: after the restart
    recvfrom gives every datagram with its sender's address, the client is
    still connected to the path and the path still reaches the server."""
    ref, sf = _run_both(procs, tmp_path, "dgram", DGRAM)
    socks = _unix_files(sf)
    srv = next(s for s in socks if (s.name or "").endswith("/srv.sock"))
    assert len(srv.queue) == 6, "the checkpoint came too late to test anything"
    assert [s and s.name.rsplit("/", 1)[-1] for s in srv.senders] == \
        [None, "n1.sock", None, "n2.sock", srv.senders[4].name, "n1.sock"]
    assert srv.senders[4].abstract
    assert "got 'from n2 (closed)' from DIR/n2.sock" in ref
    assert "got 'from an abstract name' from @abstract" in ref
    assert "got 'from an unnamed socket' from unnamed" in ref
    assert "got 'client peer DIR/srv.sock sock unnamed' from unnamed" in ref
    assert "server sock DIR/srv.sock; n2.sock exists: False" in ref
    assert "client exit 7" in ref


def test_named_stream_connection_keeps_its_names(procs, tmp_path):
    """A connection accepted from a listening socket, open across the
    checkpoint with data queued both ways: the accepted end's name is still
    the server's path, the client's peer name too."""
    ref, sf = _run_both(procs, tmp_path, "stream", STREAM)
    socks = _unix_files(sf)
    accepted = next(s for s in socks if not s.listening and s.name)
    assert bytes.fromhex(accepted.queue[0]) == b"hello from the client\n"
    assert "accepted sock DIR/srv.sock peer unnamed (accept gave unnamed)" in ref
    assert ("server read client got 'welcome'; peer DIR/srv.sock sock unnamed") in ref
    assert ("second connection: b'ping', sock DIR/srv.sock, client peer DIR/srv.sock"
            in ref)


def test_seqpacket_pairs_and_listener(procs, tmp_path):
    ref, sf = _run_both(procs, tmp_path, "seqpacket", SEQPACKET)
    assert any(s.type == "seqpacket" and len(s.queue) == 3
               for s in _unix_files(sf)), "the checkpoint came too late"
    assert [x for x in ref if not x.startswith("tick")] == ["b got b'one'", "b got b'two two'", "b got b''", "a got b'back'",
                        "x got b'child record 1'", "x got b'child record 2'",
                        "x got b'child: to the child'",
                        "listener: b'r1' b'r2 longer' type True sock DIR/sp.sock"]


def test_shutdown_states(procs, tmp_path):
    """SHUT_WR: the peer reads the queued data then end-of-file, the end
    cannot send (EPIPE); SHUT_RD: the queued data is still read, the peer
    cannot send; also across two tasks."""
    ref, sf = _run_both(procs, tmp_path, "shutdown", SHUTDOWN)
    socks = _unix_files(sf)
    assert any(s.shutdown == 2 for s in socks)
    assert any(bytes.fromhex(q) == b"last words" for s in socks for q in s.queue), \
        "the checkpoint came too late"
    assert "stream: r reads b'last words' then b''; w send: EPIPE" in ref
    assert "seqpacket: r reads b'last words' then b''; w send: EPIPE" in ref
    assert "stream: rd reads b'unread'; peer send: EPIPE; r send: sent" in ref
    assert "seqpacket: rd reads b'unread'; peer send: EPIPE; r send: sent" in ref
    assert "m reads b\"child's last words\" then b''" in ref
    assert "the child received 4 bytes" in ref


# ---------------------------------------------------------------- refusals

TICKER = r"""
import os, socket, sys, time
D = sys.argv[1]
case = sys.argv[2]
keep = []
if case == "fds":
    a, b = socket.socketpair()
    # (a pipe or /dev/null in flight is restored: test_scm.py; a memfd is not)
    socket.send_fds(a, [b"an fd"], [os.memfd_create("in-flight")])
    keep += [a, b]
elif case == "backlog":
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(f"{D}/l.sock"); lst.listen(4)
    keep.append(lst)
elif case == "external":
    keep.append(socket.socket(fileno=int(sys.argv[3])))
elif case == "sender":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(f"{D}/srv.sock")
    keep.append(s)
print("ready", flush=True)
for i in range(1, 100000):
    time.sleep(0.05)
    print(f"tick {i}", flush=True)
"""

REASONS = {"fds": "(fd:memfd) is not sent again",
           "external": "connected to a process outside the tree",
           "backlog": "connections waiting to be accepted",
           "sender": "from its sender's address"}


@pytest.mark.parametrize("case", sorted(REASONS))
def test_refused_with_the_specific_reason(procs, tmp_path, case):
    """crcheckpoint --kill exits 6 with the reason of the case, writes no
    file, and the tree runs on."""
    require_root()
    prog = _write(tmp_path, "ticker", TICKER)
    out = tmp_path / "t.out"
    extra, held = [], []
    if case == "external":
        mine, theirs = socket.socketpair()
        held += [mine, theirs]
        extra = [str(theirs.fileno())]
    proc = procs.spawn([sys.executable, prog, tmp_path, case, *extra], stdout=out,
                       pass_fds=[int(x) for x in extra]) if extra else \
        procs.spawn([sys.executable, prog, tmp_path, case], stdout=out)
    wait_for_line(out, "^ready$", proc=proc, timeout=30)
    if case == "backlog":
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(tmp_path / "l.sock"))      # never accepted
        held.append(c)
    if case == "sender":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(tmp_path / "outside.sock"))   # a name that stays bound out here
        s.sendto(b"queued", str(tmp_path / "srv.sock"))
        held.append(s)
    wait_for_line(out, r"^tick 3$", proc=proc, timeout=30)
    sf = tmp_path / "t.cr"
    try:
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(sf), "--kill"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 6, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert REASONS[case] in r.stderr, r.stderr
        for other, reason in REASONS.items():
            if other != case:
                assert reason not in r.stderr, r.stderr
        assert not sf.exists()
        assert not list(tmp_path.glob("t.cr*"))
        assert proc.poll() is None
        assert_keeps_ticking(out, proc)
    finally:
        for s in held:
            s.close()


BOUND = COMMON + r"""
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind(f"{D}/srv.sock")
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"queued", f"{D}/srv.sock")

def read():
    data, addr = srv.recvfrom(100)
    out(f"got {data!r} from {show(addr)} at {show(srv.getsockname())}")

ticks(1, 25, {20: read})
"""


def test_socket_file_held_by_a_live_socket_is_not_replaced(procs, tmp_path):
    """The killed original's socket file is replaced, but not a socket file a
    live process is bound to: crrestart then fails with one clear line, and
    succeeds once that socket is gone (its file, stale now, is replaced)."""
    require_root()
    prog = _write(tmp_path, "bound", BOUND)
    ref = _reference(prog, tmp_path / "ref")
    where = tmp_path / "run"
    where.mkdir()
    out = tmp_path / "run.out"
    proc = procs.spawn([sys.executable, prog, where], stdout=out)
    wait_for_line(out, r"^tick 5$", proc=proc, timeout=30)
    sf = tmp_path / "run.cr"
    checkpoint_tree(proc, sf)
    (where / "srv.sock").unlink()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    squatter.bind(str(where / "srv.sock"))
    try:
        r = restart(procs, sf)
        code, err = finish(r)
        assert code != 0
        assert "Traceback" not in err, err
        assert "srv.sock: cannot bind it again: Address already in use" in err, err
        assert len(err.strip().splitlines()) == 1, err
    finally:
        squatter.close()
    assert (where / "srv.sock").exists()     # stale now
    r = restart(procs, sf)
    code, err = finish(r)
    assert code == 0, err
    assert read_lines(out) == ref
    assert "got b'queued' from unnamed at DIR/srv.sock" in ref
