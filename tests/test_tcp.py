"""Established TCP connections checkpointed and restarted with the kernel's TCP
repair mode (statefile/dump/tcp.py, restorer/restore/tcp.py) behind a
firewall lock (statefile/control/netlock.py), docs/NETWORK.md: the peer,
inside the tree or outside it, sees a pause and nothing else: no reset, no
byte lost, none twice.  Every test checks that no firewall rule is left."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import read_lines, require_root, wait_for_line
from test_checkpoint import checkpoint
from test_tree import finish, restart

from statefile.control import netlock


@pytest.fixture(autouse=True)
def no_rule_left():
    require_root()
    if shutil.which("nft") is None and not os.path.exists("/usr/sbin/nft"):
        pytest.skip("nftables (nft) is not installed: scripts/setup.sh installs it")
    yield
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert "crelf c=" not in ruleset, ruleset
    assert netlock.rules() == []


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


def _echo(procs, tmp_path, v6=False):
    prog = tmp_path / "echo.py"
    prog.write_text(ECHO_SERVER)
    out = tmp_path / "echo.out"
    addr = "::1" if v6 else "127.0.0.1"
    proc = procs.spawn([sys.executable, prog, "6" if v6 else "4", addr], stdout=out)
    port = int(wait_for_line(out, r"^port ", proc=proc).split()[1])
    client = Client(socket.AF_INET6 if v6 else socket.AF_INET, addr, port)
    wait_for_line(out, "^accepted$", proc=proc)
    client.progress(2000)
    return proc, out, client


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_outside_client_sees_no_reset_after_kill_and_restart(procs, tmp_path, v6):
    """A server in the tree, its client outside: checkpoint --kill in the middle
    of the stream, restart; the client sees a pause, then every byte echoed
    back in order (the socket options with it)."""
    proc, out, client = _echo(procs, tmp_path, v6)
    sf = tmp_path / "echo.cr"
    checkpoint(proc.pid, sf, "--kill")
    proc.wait(timeout=10)
    assert any("crelf c=" in r["comment"] for r in netlock.rules())   # held until restart
    time.sleep(0.5)          # the client keeps sending into the lock
    rr = restart(procs, sf, "--detach")
    code, err = finish(rr)
    assert code == 0, err
    assert netlock.rules() == []          # lifted once the socket is live
    client.progress(5000)
    client.finish()
    wait_for_line(out, r"^done ", timeout=30)
    done = read_lines(out)[-1].split()
    assert int(done[1]) == client.sent
    assert done[2:] == ["1", "77"]
