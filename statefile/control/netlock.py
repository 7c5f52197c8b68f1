"""The network lock: between the freeze of a tree and the moment its restored
TCP sockets are live, no packet of its checkpointed connections may reach a
closed socket (the kernel would answer with a reset, and the peer would drop
the connection) nor leave one.  crelf drops exactly those packets with
nftables: a table of its own (`inet crelf`), one rule per connection matching
both directions of its 4-tuple, each rule commented with its owner:

    crelf c=<connection id> pid=<crcheckpoint pid>/<its start time>
        while the checkpoint runs: stale once that process is gone;
    crelf c=<connection id> sf=<dev>:<ino> exp=<unix time> [path=<statefile>]
        after a --kill checkpoint, until crrestart lifts it once the restored
        sockets are live: stale once expired or once the statefile is gone.

Every use first removes stale rules (sweep), so a crelf that died leaves
nothing behind for longer than its next run; the table goes when it is empty.
Used by statefile/dump/tcp.py (lock, hand over, unlock) and
restorer/restore/tcp.py (lift).  docs/NETWORK.md."""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

TABLE = "crelf"
CHAIN = "conns"
LOCKFILE = "/run/crelf-netlock.lock"
# After a --kill checkpoint the rules wait for crrestart this long at most: a
# peer gives up on an unanswered connection after tcp_retries2 (~15 minutes by
# default), so a lock older than this protects nothing.
HANDOVER_SECONDS = 3600
COMMENT_MAX = 127
# Packets crelf itself sends for a locked connection (restorer/restore/tcp.py:
# the peer's FIN, replayed) carry this mark (SO_MARK) and pass the lock.
MARK = 0x63726C66


class NetLockError(OSError):
    pass


@dataclass(frozen=True)
class Conn:
    """One TCP connection as the firewall sees it: v4 or v6 addresses (an
    IPv4-mapped IPv6 address is an IPv4 connection on the wire)."""
    local: str
    lport: int
    remote: str
    rport: int

    @staticmethod
    def of(local, remote) -> "Conn":
        def plain(a: str) -> str:
            ip = ipaddress.ip_address(a.split("%")[0])
            if ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            return str(ip)
        return Conn(plain(local[0]), int(local[1]), plain(remote[0]), int(remote[1]))

    @property
    def v6(self) -> bool:
        return ":" in self.local

    @property
    def ident(self) -> str:
        """The same for both ends of a connection."""
        ends = sorted([f"{self.local}/{self.lport}", f"{self.remote}/{self.rport}"])
        return hashlib.sha1(" ".join(ends).encode()).hexdigest()[:12]

    def rule(self) -> str:
        ip = "ip6" if self.v6 else "ip"
        a = f"{self.local} . {self.lport} . {self.remote} . {self.rport}"
        b = f"{self.remote} . {self.rport} . {self.local} . {self.lport}"
        return (f"{ip} saddr . tcp sport . {ip} daddr . tcp dport {{ {a}, {b} }} drop")

    def __str__(self) -> str:
        return f"{self.local} port {self.lport} <-> {self.remote} port {self.rport}"


def available() -> str | None:
    """Why the lock cannot be used here (None: it can)."""
    if shutil.which("nft") is None and not os.path.exists("/usr/sbin/nft"):
        return "the nft command (nftables) is not installed"
    if os.geteuid() != 0:
        return "the firewall lock and TCP repair mode need root (CAP_NET_ADMIN)"
    return None


def _nft(*args: str, stdin: str | None = None, tries: int = 1) -> str:
    exe = shutil.which("nft") or "/usr/sbin/nft"
    for i in range(tries):
        r = subprocess.run([exe, *args], input=stdin, capture_output=True, text=True,
                           timeout=30)
        if r.returncode == 0:
            return r.stdout
        time.sleep(0.05 * (i + 1))      # (a change of the ruleset by someone else)
    raise NetLockError(0, f"nft {' '.join(args)}: {r.stderr.strip() or 'failed'}")


class _Flock:
    """Serialises crelf's changes to its table (two runs at once must not
    remove the table under each other's new rules)."""

    def __enter__(self):
        self.fd = os.open(LOCKFILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _rules() -> list[dict]:
    """crelf's rules: [{"handle", "comment"}] ([] without the table)."""
    for i in range(3):
        try:
            out = _nft("-j", "-a", "list", "chain", "inet", TABLE, CHAIN)
            break
        except NetLockError as e:
            if "No such file or directory" in str(e):
                return []               # (no table: no rule)
            if i == 2:
                raise
            time.sleep(0.05)
    return [{"handle": o["rule"]["handle"], "comment": o["rule"].get("comment", "")}
            for o in json.loads(out).get("nftables", []) if "rule" in o]


def rules() -> list[dict]:
    """crelf's rules now (tests check none is left)."""
    return _rules()


def _ensure_table() -> None:
    try:
        _nft("list", "table", "inet", TABLE)
        return
    except NetLockError:
        pass
    hooks = "".join(
        f"add chain inet {TABLE} {h} {{ type filter hook {h} priority -300 ; policy accept ; }}\n"
        f"add rule inet {TABLE} {h} meta mark {MARK:#x} accept\n"
        f"add rule inet {TABLE} {h} jump {CHAIN}\n" for h in ("input", "output"))
    _nft("-f", "-", stdin=f"add table inet {TABLE}\nadd chain inet {TABLE} {CHAIN}\n{hooks}",
         tries=3)


def _drop_table_if_empty() -> None:
    if not _rules():
        try:
            _nft("delete", "table", "inet", TABLE)
        except NetLockError:
            pass


def _fields(comment: str) -> dict:
    return dict(w.split("=", 1) for w in comment.split()[1:] if "=" in w)


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _stale(comment: str) -> bool:
    if not comment.startswith("crelf "):
        return False
    f = _fields(comment)
    if "pid" in f:
        pid, _, start = f["pid"].partition("/")
        return _start_time(int(pid)) != start
    if "exp" in f and float(f["exp"]) < time.time():
        return True
    if "path" in f and "sf" in f:
        try:
            st = os.stat(f["path"])
        except OSError:
            return True
        return f"{st.st_dev}:{st.st_ino}" != f["sf"]
    return False


def _delete(handles: list[int]) -> None:
    if handles:
        _nft("-f", "-", stdin="".join(f"delete rule inet {TABLE} {CHAIN} handle {h}\n"
                                      for h in handles), tries=3)


def sweep() -> int:
    """Remove the rules of crelf runs that died (and expired hand-overs);
    how many.  Run by every use of the lock."""
    with _Flock():
        stale = [r["handle"] for r in _rules() if _stale(r["comment"])]
        _delete(stale)
        _drop_table_if_empty()
    return len(stale)


def owner_self() -> str:
    """This process as the owner of rules (their comment's pid=)."""
    return f"pid={os.getpid()}/{_start_time(os.getpid())}"


def remove_owner(owner: str) -> None:
    """Remove every rule of that owner (statefile/dump/tcp.py's guard, when
    its crcheckpoint died)."""
    with _Flock():
        _delete([r["handle"] for r in _rules() if f" {owner}" in r["comment"]
                 and r["comment"].endswith(owner)])
        _drop_table_if_empty()


def _owner_statefile(path: str) -> str:
    st = os.stat(path)
    owner = f"sf={st.st_dev}:{st.st_ino} exp={int(time.time() + HANDOVER_SECONDS)}"
    p = os.path.abspath(path)
    if all(c.isalnum() or c in "/._-+,:@" for c in p):
        owner += f" path={p}"
    return owner


def _add(conns, owner: str) -> None:
    batch = ""
    for c in conns:
        comment = f"crelf c={c.ident} {owner}"
        if len(comment) > COMMENT_MAX:          # (the path is a hint only)
            comment = comment[:COMMENT_MAX].rsplit(" ", 1)[0]
        batch += f"add rule inet {TABLE} {CHAIN} {c.rule()} comment \"{comment}\"\n"
    if batch:
        _nft("-f", "-", stdin=batch, tries=3)


class NetLock:
    """The connections this crelf process locked."""

    def __init__(self):
        self.conns: dict[str, Conn] = {}

    def lock(self, conn: Conn) -> None:
        """Drop the packets of conn from now on (once per connection: the
        other end of a pair inside the tree is the same rule)."""
        if conn.ident in self.conns:
            return
        if not self.conns:
            sweep()
        with _Flock():
            _ensure_table()
            _add([conn], owner_self())
        self.conns[conn.ident] = conn

    def _mine(self, owner: str) -> list[int]:
        return [r["handle"] for r in _rules()
                if _fields(r["comment"]).get("c") in self.conns
                and owner in r["comment"]]

    def unlock(self) -> None:
        """Remove this process's rules (the checkpoint ended or failed)."""
        if not self.conns:
            return
        with _Flock():
            _delete(self._mine(owner_self()))
            _drop_table_if_empty()
        self.conns.clear()

    def hand_over(self, statefile: str) -> None:
        """After a --kill checkpoint: the rules now belong to the statefile,
        for crrestart to lift (new rules first, then the old ones: the
        connections are never unlocked in between)."""
        if not self.conns:
            return
        with _Flock():
            old = self._mine(owner_self())
            _add(self.conns.values(), _owner_statefile(statefile))
            _delete(old)
        self.conns.clear()


def lift(conns) -> int:
    """crrestart: remove the rules of these connections (the restored sockets
    are live); how many rules it removed."""
    ids = {c.ident for c in conns}
    if not ids or available() is not None:
        return 0
    with _Flock():
        mine = [r["handle"] for r in _rules() if _fields(r["comment"]).get("c") in ids]
        stale = [r["handle"] for r in _rules() if _stale(r["comment"])]
        _delete(sorted(set(mine) | set(stale)))
        _drop_table_if_empty()
    return len(mine)
