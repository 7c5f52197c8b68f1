"""Network sockets without connection state: a server's listening TCP socket
and its bound UDP socket are restarted listening and bound on the same
ports, so clients reach the restarted server as before.  A TCP connection
(tests/test_tcp.py) needs root: without, it is refused (unless the 'network'
policy skips it)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import read_lines, require_root, wait_for_line
from test_checkpoint import checkpoint
from test_tree import finish, restart

BIN = Path(sys.executable).parent

SERVER = r"""
import os, select, socket, sys
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("127.0.0.1", 0))
tcp.listen(16)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
udp.bind(("::1", 0))
print("ports", tcp.getsockname()[1], udp.getsockname()[1], flush=True)
n = 0
while n < 6:
    r, _, _ = select.select([tcp, udp], [], [], 0.1)
    if tcp in r:
        c, _ = tcp.accept()
        n += 1
        c.sendall(f"hello {n}\n".encode())
        print(f"served tcp {n}", flush=True)
        c.close()
    if udp in r:
        data, peer = udp.recvfrom(100)
        n += 1
        udp.sendto(b"pong " + data, peer)
        print(f"served udp {n} {data.decode()}", flush=True)
print("options", tcp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0,
      udp.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), flush=True)
"""


def _tcp(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        return c.recv(100)


def _udp(port: int, msg: bytes) -> bytes:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.sendto(msg, ("::1", port))
        return u.recv(100)


def test_server_listens_on_the_same_ports_after_restart(procs, tmp_path):
    require_root()
    prog = tmp_path / "server.py"
    prog.write_text(SERVER)
    out = tmp_path / "s.out"
    proc = procs.spawn([sys.executable, prog], stdout=out)
    tport, uport = map(int, wait_for_line(out, r"^ports ", proc=proc).split()[1:])
    assert _tcp(tport) == b"hello 1\n"
    assert _udp(uport, b"a") == b"pong a"
    r = subprocess.run([BIN / "crcheck", str(proc.pid), "--json"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    keys = {f["key"] for f in json.loads(r.stdout)["findings"]}
    assert {"fd:socket:inet-listen", "fd:socket:inet-udp"} <= keys
    checkpoint(proc.pid, tmp_path / "s.cr", "--kill")
    proc.wait(timeout=10)
    rr = restart(procs, tmp_path / "s.cr", "--detach")
    code, err = finish(rr)
    assert code == 0, err
    assert _tcp(tport) == b"hello 3\n"
    assert _udp(uport, b"b") == b"pong b"
    assert _tcp(tport) == b"hello 5\n"
    assert _udp(uport, b"c") == b"pong c"
    wait_for_line(out, r"^options ", timeout=30)
    assert read_lines(out)[1:] == ["served tcp 1", "served udp 2 a", "served tcp 3",
                                   "served udp 4 b", "served tcp 5", "served udp 6 c",
                                   "options True 1"]


def test_tcp_connection_refused_without_root(procs, tmp_path):
    """An established connection needs TCP repair mode and the firewall lock
    (root): an unprivileged user checkpointing its own program is refused
    with that reason (tests/test_tcp.py restores them as root), no file, the
    program runs on."""
    require_root()
    import os
    import tempfile
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(30)        # a lost connection fails the test instead of hanging it
    port = srv.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o777)
        try:
            proc = procs.spawn(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                sys.executable, "-c",
                                "import socket, time\n"
                                f"c = socket.create_connection(('127.0.0.1', {port}))\n"
                                "print('connected', flush=True)\ntime.sleep(60)"],
                               stdout=tmp_path / "c.out")
            conn, _ = srv.accept()
            wait_for_line(tmp_path / "c.out", "^connected$", proc=proc)
            res = checkpoint(proc.pid, f"{d}/c.cr", check=False, user=65534)
            assert res.returncode == 6, res.stderr
            assert "(established)" in res.stderr and "need root" in res.stderr, res.stderr
            assert "policy 'network'" in res.stderr
            assert os.listdir(d) == []
            time.sleep(0.2)
            assert proc.poll() is None
            conn.close()
        finally:
            srv.close()
