"""A unix datagram socket connected to a named socket of a process outside
the tree (here: the test itself, bound at ext.sock), as a program's socket
to syslog's /dev/log is.

A restart cannot bring back the process outside, so crcheckpoint refuses
such a socket unless the user says the peer will be there at restart:
policy 'external-unix' (--skip external-unix, or CRIU's --ext-unix-sk).  The
statefile records the peer's name; crrestart connects a new socket (bound
to the program's own name again) to it.  The restarted program's datagram
reaches the outside socket from its own name and the answer comes back; its
output is byte-identical to an uninterrupted run's.  Without the flag,
crcheckpoint exits 6 with the reason and the program runs on unharmed; when
nothing is bound at the name any more, crrestart fails with one line and
leaves nothing running.  A stream connection to a listener outside cannot be
joined again: with the flag it comes back as a connection its peer closed
(the bytes not read yet, then end-of-file; writes EPIPE)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers import pid_alive, read_lines, require_root, wait_for_line
from test_checkpoint import BIN, CRCHECKPOINT
from test_tree import finish, restart

CRCHECK = str(BIN / "crcheck")

PROGRAM = r"""
import errno, os, socket, sys, time
D, kind = sys.argv[1], sys.argv[2]
os.chdir(D)

def out(*a):
    os.write(1, (" ".join(map(str, a)) + "\n").encode())

def show(addr):
    return addr.replace(D, "DIR") if addr else "unnamed"

if kind == "dgram":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(f"{D}/me.sock")
    s.connect(f"{D}/ext.sock")
    s.send(b"before")
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(f"{D}/ext.sock")
    s.sendall(b"before")
out("ready")
for i in range(1, 26):
    time.sleep(0.1)
    out(f"tick {i}")
    if i == 20 and kind == "dgram":
        out(f"peer {show(s.getpeername())} sock {show(s.getsockname())}")
        s.send(b"after")
        out(f"got {s.recv(100)!r}")
    if i == 20 and kind == "stream":
        first = s.recv(100)
        out(f"got {first!r} then {s.recv(100)!r}")
        try:
            s.send(b"after")
            out("send: sent")
        except OSError as e:
            out("send:", errno.errorcode[e.errno])
"""


class Outside:
    """The socket outside the tree, bound at DIR/ext.sock."""

    def __init__(self, where: Path, kind: str = "dgram"):
        self.path = str(where / "ext.sock")
        self.kind = kind
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if kind == "dgram"
                                  else socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.conn = None
        if kind == "stream":
            self.sock.listen(1)
        self.sock.settimeout(60)

    def recv(self) -> tuple[bytes, str]:
        if self.kind == "dgram":
            data, addr = self.sock.recvfrom(100)
            return data, addr
        if self.conn is None:
            self.conn, _ = self.sock.accept()
            self.conn.settimeout(60)
        return self.conn.recv(100), ""

    def answer(self, to: str) -> None:
        if self.kind == "dgram":
            self.sock.sendto(b"answer", to)
        else:
            self.conn.sendall(b"answer")

    def close(self) -> None:
        for s in (self.conn, self.sock):
            if s is not None:
                s.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _prog(tmp_path: Path) -> Path:
    prog = tmp_path / "ext.py"
    prog.write_text(PROGRAM)
    return prog


def _serve_rest(ext: Outside, where: Path) -> None:
    """What the outside process does after the checkpoint: get "after" from
    the program's own name, and answer it."""
    data, addr = ext.recv()
    assert data == b"after", data
    if ext.kind == "dgram":
        assert addr == str(where / "me.sock"), addr
    ext.answer(addr)


def _reference(procs, prog: Path, where: Path, kind: str = "dgram") -> list[str]:
    where.mkdir()
    ext = Outside(where, kind)
    out = where.parent / f"{where.name}.out"
    try:
        proc = procs.spawn([sys.executable, prog, where, kind], stdout=out)
        assert ext.recv()[0] == b"before"
        _serve_rest(ext, where)
        assert proc.wait(timeout=60) == 0
    finally:
        ext.close()
    return read_lines(out)


def _start(procs, prog: Path, where: Path, kind: str = "dgram"):
    where.mkdir()
    ext = Outside(where, kind)
    out = where.parent / f"{where.name}.out"
    proc = procs.spawn([sys.executable, prog, where, kind], stdout=out)
    assert ext.recv()[0] == b"before"
    wait_for_line(out, r"^tick 5$", proc=proc, timeout=30)
    return proc, ext, out


def test_external_datagram_peer_connected_again(procs, tmp_path):
    require_root()
    prog = _prog(tmp_path)
    ref = _reference(procs, prog, tmp_path / "ref")
    assert "peer DIR/ext.sock sock DIR/me.sock" in ref and "got b'answer'" in ref
    where = tmp_path / "run"
    proc, ext, out = _start(procs, prog, where)
    try:
        sf = tmp_path / "run.cr"
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(sf), "--kill", "--json",
                            "--ext-unix-sk"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert [s["why"] for s in summary["skipped"]] == ["external-unix"], summary["skipped"]
        proc.wait(timeout=10)
        from statefile.format.reader import load
        f = next(f for f in load(str(sf)).files
                 if f.kind == "socket" and f.socket.family == "unix" and f.socket.peer_name)
        assert (f.socket.peer_name.name, f.socket.peer_name.abstract) == (ext.path, False)
        assert f.skipped == "external-unix"
        r = restart(procs, sf)
        _serve_rest(ext, where)
        code, err = finish(r)
        assert code == 0, err
        assert "policy 'external-unix': connected to that name again" in err, err
    finally:
        ext.close()
    assert read_lines(out) == ref


def test_external_peer_refused_without_the_flag(procs, tmp_path):
    """No flag: crcheck and crcheckpoint refuse, naming the policy; the flag
    makes crcheck's verdict good; the program is unharmed."""
    require_root()
    prog = _prog(tmp_path)
    ref = _reference(procs, prog, tmp_path / "ref")
    where = tmp_path / "run"
    proc, ext, out = _start(procs, prog, where)
    try:
        sf = tmp_path / "run.cr"
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(sf), "--kill"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 6, r.stderr
        assert "policy 'external-unix' (crcheckpoint --ext-unix-sk)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not sf.exists() and not list(tmp_path.glob("run.cr*"))
        c = subprocess.run([CRCHECK, str(proc.pid)], capture_output=True, text=True,
                           timeout=120)
        assert c.returncode == 6, c.stdout + c.stderr
        c = subprocess.run([CRCHECK, "--ext-unix-sk", str(proc.pid)], capture_output=True,
                           text=True, timeout=120)
        assert c.returncode == 0, c.stdout + c.stderr
        assert proc.poll() is None
        _serve_rest(ext, where)
        assert proc.wait(timeout=60) == 0
    finally:
        ext.close()
    assert read_lines(out) == ref


def test_restart_fails_cleanly_when_the_peer_is_gone(procs, tmp_path):
    """Nothing bound at the peer's name at restart: crrestart exits non-zero
    with one line naming it and leaves nothing running; once the peer is
    back, the same statefile restarts."""
    require_root()
    prog = _prog(tmp_path)
    ref = _reference(procs, prog, tmp_path / "ref")
    where = tmp_path / "run"
    proc, ext, out = _start(procs, prog, where)
    sf = tmp_path / "run.cr"
    try:
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(sf), "--kill",
                            "--ext-unix-sk"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        proc.wait(timeout=10)
    finally:
        ext.close()                             # the process outside goes away
    code, err = finish(restart(procs, sf))
    assert code != 0
    assert "Traceback" not in err, err
    assert f"unix socket connected to {where}/ext.sock outside the tree: cannot connect " \
           "to it again: No such file or directory" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not pid_alive(proc.pid)
    ext = Outside(where)                        # back again
    try:
        r = restart(procs, sf)
        _serve_rest(ext, where)
        code, err = finish(r)
        assert code == 0, err
    finally:
        ext.close()
    assert read_lines(out) == ref


def test_stream_connection_outside_comes_back_closed_by_its_peer(procs, tmp_path):
    """A stream connection to a listener outside the tree cannot be joined
    again: refused without the policy; with it, the restarted program reads
    the bytes it had not read yet, then end-of-file, and its writes fail with
    EPIPE, as if the process outside had gone."""
    require_root()
    prog = _prog(tmp_path)
    where = tmp_path / "run"
    proc, ext, out = _start(procs, prog, where, "stream")
    try:
        ext.conn.sendall(b"not read yet")
        sf = tmp_path / "run.cr"
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(sf), "--kill"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 6, r.stderr
        assert "a new stream connection would not be the old one" in r.stderr, r.stderr
        assert "policy 'external-unix'" in r.stderr, r.stderr
        assert not sf.exists() and proc.poll() is None
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(sf), "--kill",
                            "--ext-unix-sk"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        proc.wait(timeout=10)
    finally:
        ext.close()
    code, err = finish(restart(procs, sf))
    assert code == 0, err
    assert "restored as a connection its peer has closed" in err, err
    lines = read_lines(out)
    assert "got b'not read yet' then b''" in lines and "send: EPIPE" in lines, lines
    assert lines[-1] == "tick 25"
