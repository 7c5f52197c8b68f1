"""The release freezer: what makes the release of a restored tree atomic
(docs/RESTORE.md, "When crrestart dies").

Releasing a tree means detaching every thread of every task from ptrace, one
after the other.  Without help, a crrestart killed in the middle of that loop
leaves some tasks running (detached) and the rest dying by PTRACE_O_EXITKILL:
part of the tree has run.  So every task of the tree is born in a cgroup of
crelf's own with a freezer (the cgroup v1 `freezer` controller, or a cgroup v2
directory with `cgroup.freeze`).  At the release:

1. the cgroup is frozen: no task can return to user space, traced or not;
2. every thread is detached (allowed while frozen; a frozen task that loses
   its tracer stays frozen);
3. the guard is told "released" (restorer/release/guard.py, line C);
4. the cgroup is thawed, in one write: the whole tree runs from here;
5. each process is moved back to crrestart's own cgroup of that hierarchy and
   the crelf cgroup is removed (line G to the guard).

If crrestart dies before 3, the guard SIGKILLs everything in the cgroup *while
it is frozen* and only then thaws it: the tasks die without running a single
instruction.  If it dies after 3, the guard does 4 and 5 itself.  Either way
all of the tree runs, or none of it.

crrestart itself is in the cgroup only while it forks the tree's root (one
migration in, one out, about 12 ms each on this kernel: a cgroup migration
waits for an RCU grace period), so no task has to be moved in one by one.
Without root, or where no freezer can be written, the release is the plain
detach loop (the window is about 0.1 ms; `restore_seconds` is the same).
"""

from __future__ import annotations

import os
import time

_V1, _V2 = "freezer", "cgroup2"


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every cgroup mount we see."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
                    out.append((fields[4].replace("\\040", " "), rest[0],
                                set(rest[2].split(","))))
    except OSError:
        pass
    return out


def _own_cgroups() -> dict[str, str]:
    """crrestart's cgroup path per hierarchy: "freezer" (v1) and "" (v2)."""
    out = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                for c in ctrls.split(","):
                    out[c] = path
    except (OSError, ValueError):
        pass
    return out


class ReleaseFreezer:
    """One crelf cgroup with a freezer for the time of a restore."""

    def __init__(self, path: str, home: str, kind: str):
        self.path = path          # the crelf cgroup
        self.home = home          # crrestart's own cgroup of that hierarchy
        self.kind = kind

    # --- control files -----------------------------------------------------------
    def _write(self, name: str, value: str, where: str | None = None) -> None:
        fd = os.open(os.path.join(where or self.path, name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read()

    def procs(self) -> list[int]:
        try:
            return [int(x) for x in self._read("cgroup.procs").split()]
        except (OSError, ValueError):
            return []

    def frozen(self) -> bool:
        if self.kind == _V1:
            return self._read("freezer.state").strip() == "FROZEN"
        return "frozen 1" in self._read("cgroup.events")

    # --- the steps ---------------------------------------------------------------
    def join(self) -> None:
        """Move crrestart in (its children are born here)."""
        self._write("cgroup.procs", str(os.getpid()))

    def leave(self) -> None:
        """Move crrestart back out (its own children stay)."""
        self._write("cgroup.procs", str(os.getpid()), self.home)

    def freeze(self, timeout: float = 10.0) -> None:
        """Freeze and wait until every task is frozen (OSError if it cannot)."""
        if self.kind == _V1:
            self._write("freezer.state", "FROZEN")
        else:
            self._write("cgroup.freeze", "1")
        end = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > end:
                raise OSError(f"the tasks in {self.path} did not freeze within {timeout:g} s")
            time.sleep(0.0002)

    def thaw(self) -> None:
        if self.kind == _V1:
            self._write("freezer.state", "THAWED")
        else:
            self._write("cgroup.freeze", "0")

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL everything in the cgroup while it is frozen, then thaw it:
        the tasks die without running (a frozen task dies when thawed)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pids = [p for p in self.procs() if p != os.getpid()]
            if not pids and self.remove():
                return
            for pid in pids:          # (never crrestart itself, if it could not leave)
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            try:
                self.thaw()
            except OSError:
                pass
            time.sleep(0.005)
        self.remove()

    def move_home(self, timeout: float = 10.0) -> None:
        """Every process of the crelf cgroup back to crrestart's cgroup, then
        remove it (forks racing with the move are moved on a later round)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            pids = self.procs()
            for pid in pids:
                try:
                    self._write("cgroup.procs", str(pid), self.home)
                except OSError:
                    pass          # exited meanwhile
            if not pids and self.remove():
                return
            if not pids:
                time.sleep(0.002)
        self.remove()

    def remove(self) -> bool:
        try:
            os.rmdir(self.path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False


def find() -> ReleaseFreezer | None:
    """Where a crelf cgroup with a freezer can go (under crrestart's own
    cgroup), or None where there is none (then the release is the plain
    detach loop).  Nothing is created yet: announce it to the guard, then
    make() it, so no death in between leaves an empty cgroup unannounced."""
    if os.environ.get("CRELF_NO_FREEZER") or os.geteuid() != 0:
        return None
    own = _own_cgroups()
    for mnt, fstype, opts in _mounts():
        if fstype == "cgroup" and "freezer" in opts and "freezer" in own:
            kind, home = _V1, os.path.join(mnt, own["freezer"].lstrip("/"))
        elif fstype == "cgroup2" and "" in own:
            kind, home = _V2, os.path.join(mnt, own[""].lstrip("/"))
        else:
            continue
        if os.access(home, os.W_OK):
            name = f"crelf-restore-{os.getpid()}-{os.urandom(4).hex()}"   # (unique across pid
            return ReleaseFreezer(os.path.join(home, name), home, kind)   # namespaces too)
    return None


def make(fz: ReleaseFreezer, log=lambda msg: None) -> bool:
    """Create the cgroup, removing the empty ones dead restores left beside
    it (a live restore's is empty only for the moment between its creation
    and crrestart joining it: those younger than a minute are left alone)."""
    try:
        now = time.time()
        for name in os.listdir(fz.home):
            old = os.path.join(fz.home, name)
            if name.startswith("crelf-restore-") and now - os.stat(old).st_mtime > 60:
                ReleaseFreezer(old, fz.home, fz.kind).remove()   # (only if empty)
        os.mkdir(fz.path, 0o700)
    except OSError as e:
        log(f"no release freezer in {fz.home}: {e.strerror}")
        return False
    if fz.kind == _V2 and not os.path.exists(os.path.join(fz.path, "cgroup.freeze")):
        fz.remove()
        return False
    return True
