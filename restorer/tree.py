"""Process trees: the fork plan, the shared resources the initiator creates,
and the code every restored task runs (still crrestart's Python) before it
parks.  The protocol is in docs/TREE.md.

1. The initiator (crrestart) plans the tree: parents before children, a
   session leader before its members, a process group's leader before the
   tasks that join it (trees that cannot be ordered so are refused before
   anything is created).
2. It creates what tasks share: every pipe (size, bytes in flight,
   O_NONBLOCK per end), every FIFO (opened by path, bytes in flight), the
   named unix sockets and those connected to them (restore/unix.py open_named:
   bound before anyone connects, queued datagrams sent again), every
   other open file description used by more than one task (a shared offset:
   the stdout file of a whole pipeline).
3. It forks the root with its original pid; every task sets its session and
   process group, forks its children with their original pids (one after the
   other, each child's whole subtree ready before the next), recreates its
   zombies (a child that exits at once with the saved status), then sets up
   its own files from the inherited ones (dup within the task: the same open
   file description), closes every other inherited fd, reports up and parks.
   Before it forks, a task builds the memory its children share with it
   copy-on-write (restore_memory.premap_in_python); a child that shared its
   parent's fd table is cloned with CLONE_FILES and leaves the table to the
   group's topmost task (statefile/dump/fdt.py).
4. The initiator seizes every parked task and rebuilds it by injection
   (restore_task.TaskRestorer), then releases all of them at once.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from dataclasses import dataclass, field

from statefile.dump.pipes import stdio_passthrough
from statefile.format import records as R

from restorer.restore import scm as restore_scm
from restorer.errors import RestoreError, ValidationError
from restorer.kernel import (CLONE_FILES, PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, close_all,
                             fork_with_pid, pidfd_open, prctl)
from restorer.restore.files import (ChildError, ChildPlan, _open_file, child_setup,
                                    open_ghost_nodes, open_ghosts)
from restorer.restore.memory import premap_in_python, premaps
from restorer.restore.pipes import open_pipes
from restorer.restore.unix import open_named
from restorer.restore.tty import open_ptys

_FAIL_AT = os.environ.get("CRELF_RESTORE_FAIL_AT", "")


@dataclass
class Ghost:
    """A helper task that exists only while the tree is forked (CRIU calls
    them helpers): with the pid of a session or group leader that had exited,
    it recreates that session or group for the tasks still in it.  Not in the
    statefile: plan_tree makes it, in the place of a task."""
    pid: int
    ppid: int
    sid: int
    pgid: int
    ghost: str                    # "session" or "group"
    fdt: int | None = None        # (never shares an fd table)

    @property
    def comm(self) -> str:
        return f"crelf-{self.ghost}-helper"


@dataclass
class Node:
    """One task of the tree, as its parent forks it."""
    task: R.TaskNote | Ghost
    plan: ChildPlan
    session: str = ""             # "setsid", "setpgid" (own group), "join" (pgid), ""
    children: list["Node"] = field(default_factory=list)
    zombies: list[R.Zombie] = field(default_factory=list)
    early_zombies: list[R.Zombie] = field(default_factory=list)   # forked before the children
    adopted_by: int = 0           # parent that adopts it when its session helper exits
    share_files: bool = False     # cloned with CLONE_FILES: its parent's fd table

    @property
    def pid(self) -> int:
        return self.task.pid


def plan_tree(tasks: list[R.TaskNote], zombies: list[R.Zombie], plans: dict[int, ChildPlan],
              root_keeps_session: bool) -> tuple[Node, list[Node]]:
    """The fork tree (root node, and every node in fork order).  Raises
    ValidationError, naming the task, for trees this crrestart cannot rebuild."""
    by_pid = {t.pid: t for t in tasks}
    root = tasks[0]
    kids: dict[int, list] = {}
    used = set(by_pid) | {z.pid for z in zombies}
    ghosts: dict[int, Ghost] = {}

    def ghost(pid: int, ppid: int, sid: int, kind: str) -> Ghost:
        """The helper (Ghost) that recreates session or group `pid`."""
        g = ghosts.get(pid)
        if g is None:
            if pid in used:
                raise ValidationError(f"pid {pid} leads a session or group of the tree but "
                                      "is not one of its tasks; not restored by this version")
            g = ghosts[pid] = Ghost(pid, ppid, sid, pid, kind)
            kids.setdefault(ppid, []).append(g)
        elif g.ppid != ppid:
            raise ValidationError(f"the tasks of {kind} {pid} have different parents; "
                                  "not restored by this version")
        return g

    for t in tasks[1:]:
        parent = by_pid.get(t.ppid)
        if parent is None:
            raise ValidationError(f"pid {t.pid} has parent {t.ppid}, which is not in the "
                                  "tree (orphans reparented to a subreaper outside the tree are "
                                  "not restored)")
        holder = parent
        if t.sid not in (t.pid, parent.sid) and t.sid not in by_pid:
            # An orphan whose session leader exited (a daemon's double fork):
            # a helper with the session's id setsid()s, forks it and exits,
            # and the orphan is adopted by its parent, a child subreaper, again.
            holder = ghost(t.sid, t.ppid, t.sid, "session")
        if (t.pgid not in (t.pid, holder.pgid) and t.pgid not in used
                and t.sid == holder.sid):
            # Its process group's leader exited (the first command of a
            # pipeline): a helper recreates the group for the tasks to join.
            ghost(t.pgid, holder.pid, t.sid, "group")
        kids.setdefault(holder.pid, []).append(t)
    dead: dict[int, list[R.Zombie]] = {}
    for z in zombies:
        if z.ppid not in by_pid:
            raise ValidationError(f"zombie pid {z.pid} has parent {z.ppid}, which is not "
                                  "in the tree")
        dead.setdefault(z.ppid, []).append(z)
        parent = by_pid[z.ppid]
        if (z.pgid not in (z.pid, parent.pgid) and z.pgid not in used
                and z.sid == parent.sid):
            # A zombie whose process group's leader has exited and been reaped
            # (it kept the group alive): a helper recreates the group for it.
            ghost(z.pgid, z.ppid, z.sid, "group")

    def leads_group(t) -> bool:
        return t.pgid == t.pid or any(leads_group(c) for c in kids.get(t.pid, []))

    groups: dict[int, int] = {}   # pgid created by a task forked earlier -> its session

    def session_of(t, parent) -> str:
        pid, sid, pgid = t.pid, t.sid, t.pgid
        if parent is None:
            if root_keeps_session:
                return ""
            if sid == pid:
                groups[pgid] = sid
                return "setsid"
            if pgid == pid:
                groups[pgid] = sid
                return "setpgid"
            return ""
        if sid == pid:
            if pgid != pid:
                raise ValidationError(f"pid {pid} leads session {sid} but is in process group "
                                      f"{pgid}; not restored by this version")
            groups[pgid] = sid
            return "setsid"
        if sid != parent.sid:
            raise ValidationError(f"pid {pid} is in session {sid}, neither its own nor its "
                                  f"parent's ({parent.sid}): its session leader is gone; "
                                  "not restored by this version")
        if pgid == parent.pgid:
            return ""
        if pgid == pid:
            groups[pgid] = sid
            return "setpgid"
        if groups.get(pgid) == sid:
            return "join"
        raise ValidationError(f"pid {pid} is in process group {pgid}, whose leader is gone "
                              "(or is not restored before it); not restored by this version")

    order: list[Node] = []

    def zombie(z: R.Zombie, t) -> R.Zombie:
        """z, with how it joins its session or group (z._session)."""
        try:
            z._session = session_of(z, t)
        except ValidationError:
            z._session = ""     # best effort: a zombie keeps only its status
        return z

    def build(t, parent) -> Node:
        node = Node(t, plans.get(t.pid), session_of(t, parent))
        if isinstance(parent, Ghost) and parent.ghost == "session":
            node.adopted_by = parent.ppid
        if t.fdt and t.fdt != t.pid:
            # shares the fd table of its parent (statefile/dump/fdt.py)
            if parent is None or parent.fdt != t.fdt:
                raise ValidationError(f"pid {t.pid} shares the fd table of pid {t.fdt} "
                                      "but is not forked by a task that shares it; not "
                                      "restored by this version")
            node.share_files = True
            if node.plan is not None:
                node.plan.shares_files = True
        if not isinstance(t, Ghost):
            order.append(node)    # ghosts are gone before the tree is rebuilt
        # A zombie that leads its process group is forked first: live
        # siblings may still be in that group (a pipeline whose first command
        # exited) and join it.
        mine = dead.get(t.pid, [])
        node.early_zombies = [zombie(z, t) for z in mine if z.pgid == z.pid]
        for c in sorted(kids.get(t.pid, []), key=lambda c: (not leads_group(c), c.pid)):
            node.children.append(build(c, t))
        node.zombies = [zombie(z, t) for z in mine if z.pgid != z.pid]
        return node

    return build(root, None), order


# --------------------------------------------------------------- shared resources

def open_shared(files: list[R.File], tasks: list[R.TaskNote], plan: ChildPlan,
                warnings: list[str]) -> dict[int, int]:
    """Create, in the initiator, every open file description the tasks will
    inherit: pipes and FIFOs (with their bytes in flight), and every other
    description used by more than one task.  Returns {file id: fd}."""
    users: dict[int, set[int]] = {}
    for t in tasks:
        for d in t.fds:
            users.setdefault(d.file, set()).add(t.pid)
    scm = restore_scm.prepare(files, tasks, users)   # fds in flight in unix sockets
    out: dict[int, int] = {}
    try:
        out.update(open_ptys(files, tasks, warnings))   # pseudo-terminal pairs (restore_tty)
        out.update(open_ghosts(files, tasks))   # removed directories, dead /proc (restore_files)
        out.update(open_ghost_nodes(files, tasks))   # removed symbolic links, device nodes
        for fid, num in stdio_passthrough(tasks, files).items():
            # a pipe to a process outside the tree at stdin/stdout/stderr:
            # crrestart's own (dump_pipes.stdio_passthrough)
            try:
                out[fid] = os.dup(num)
            except OSError:
                raise RestoreError("files", f"fd {num} of the tree was a pipe to a process "
                                   f"outside it, and crrestart's own fd {num} is closed") from None
        # named unix sockets and those connected to them (restore/unix.py)
        out.update(open_named(files, tasks, warnings))
        out.update(open_pipes(plan, files, users, out, warnings))   # (restore/pipes.py)
        for f in files:
            if f.id in out or f.id not in users \
                    or (isinstance(f, R.RegularFile) and f.shmem is not None):
                continue    # (memfds and shared file objects: restorer/restore/memfd.py)
            if len(users[f.id]) < 2 and not _unix_pair_across(f, files, users) \
                    and f.id not in scm.make:
                continue
            try:
                fd = _open_file(plan, f)
            except ChildError as e:
                raise RestoreError("files", str(e).partition(": ")[2] or str(e)) from None
            except OSError as e:
                raise RestoreError("files", f"{f.path}: {e.strerror or e}") from None
            if fd is not None:
                out[f.id] = fd
        restore_scm.fill(scm, files, out)   # queues with fds in flight, now all exist
    except BaseException:
        close_all(out)
        raise
    return out


def _unix_pair_across(f: R.File, files: list[R.File], users: dict[int, set[int]]) -> bool:
    """A unix socket whose peer is held by another task: both ends are made
    here, as one socketpair (restore/unix.py), and inherited."""
    if not (isinstance(f, R.SocketFile) and isinstance(f.socket, R.UnixSocket)
            and f.socket.peer_ino):
        return False
    peer = next((g for g in files if isinstance(g, R.SocketFile)
                 and isinstance(g.socket, R.UnixSocket)
                 and g.socket.ino == f.socket.peer_ino), None)
    return peer is not None and users.get(peer.id) != users.get(f.id)


# --------------------------------------------------------------- in every task

def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
        return s[s.rindex(b")") + 2:][:1] in (b"Z", b"X")
    except OSError:
        return True   # gone (or going): worth another try


def fork_pid_waiting_zombie(pid: int, flags: int = 0) -> int:
    """fork_with_pid, waiting up to 2 s while the pid belongs to a dying
    process (the checkpointed original, killed and not yet reaped)."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            return fork_with_pid(pid, flags)
        except OSError as e:
            if e.errno != errno.EEXIST or time.monotonic() > deadline or not _is_zombie(pid):
                raise
            time.sleep(0.01)


def read_status(fd: int) -> str:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace").strip()


def _read_status_shared(r: int, w: int, pid: int) -> str:
    """read_status for a child that shares our fd table: EOF comes when it
    closes w; if it dies first, w stays open (it is ours too), so its pidfd
    ends the wait and w is closed here."""
    pfd = pidfd_open(pid)
    out = b""
    try:
        while True:
            ready = select.select([r, pfd], [], [])[0]
            if r in ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                out += chunk
                continue
            # dead: what it wrote is in the pipe
            os.set_blocking(r, False)
            try:
                out += os.read(r, 4096)
            except BlockingIOError:
                pass
            try:
                os.close(w)
            except OSError:
                pass
            break
    finally:
        os.close(pfd)
    return out.decode(errors="replace").strip()


class _Forwarded(Exception):
    """A child's ERR line, passed up unchanged."""


def _set_session(how: str, pgid: int) -> None:
    if how == "setsid":
        os.setsid()
    elif how == "setpgid":
        os.setpgid(0, 0)
    elif how == "join":
        os.setpgid(0, pgid)


def _fork_child(pid: int, flags: int = 0) -> int:
    try:
        return fork_pid_waiting_zombie(pid, flags)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise ChildError("pid", f"pid {pid} is in use by another process (--pidns "
                             "restores into a new pid namespace)") from None
        raise ChildError("pid", f"cannot create pid {pid}: {e.strerror}") from None


def _wait_group(pid: int, z: R.Zombie) -> None:
    """Make sure a zombie is in its process group (one it leads, created
    before siblings join it, or one it joins) before it is left: setpgid from
    both sides, as shells do."""
    how = z._session
    if how not in ("setpgid", "join"):
        return
    pgid = pid if how == "setpgid" else z.pgid
    try:
        os.setpgid(pid, pgid)
    except OSError:
        pass    # it did it itself (or already exited)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            if os.getpgid(pid) == pgid:
                return
        except OSError:
            break
        time.sleep(0.001)
    raise ChildError("zombies", f"zombie {z.pid} could not be put in its process group "
                     f"{z.pgid}")


def _zombie_main(z: R.Zombie) -> None:
    """A child that exits at once with the saved wait status, never reaped
    until the restored parent wait()s for it."""
    try:
        _set_session(z._session, z.pgid)
    except OSError:
        pass
    status = z.exit_code
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        import resource
        for step in (lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),  # no core file
                     lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig]),
                     lambda: signal.signal(sig, signal.SIG_DFL)):
            try:
                step()      # (SIGKILL and SIGSTOP cannot be caught or blocked: skipped)
            except (OSError, ValueError):
                pass
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128)


def self_pidfd() -> int:
    """A pidfd of this process, for the children it forks next to watch."""
    return pidfd_open(os.getpid())


def die_with_parent(parent_pidfd: int) -> None:
    """PR_SET_PDEATHSIG(SIGKILL), then make sure the parent did not die
    before it was set (the signal would never come): parent_pidfd, a pidfd of
    the parent opened before the fork, polls readable once it has exited
    (getppid() cannot tell in a new pid namespace, where it is 0)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pidfd >= 0:
        dead = bool(select.select([parent_pidfd], [], [], 0)[0])
        os.close(parent_pidfd)
        if dead:
            os._exit(1)


def task_main(node: Node, status_w: int, inherited: dict[int, int],
              parent_pidfd: int = -1) -> None:
    """Entry point of every forked task: session, children, zombies, own
    files, report "OK" (or "ERR step: message") on status_w, park.  Never
    returns.  parent_pidfd: see die_with_parent."""
    forked: list[int] = []
    try:
        step = "pdeathsig"
        # Die with the parent while being restored (set to the saved value by
        # injection before the tree runs: restorer/restore/task.py, step "cleanup").
        # Not yet for a task whose parent is a session helper: that one exits
        # on purpose; the task sets it once adopted (below, when parked).
        if node.share_files:
            # parent_pidfd is the parent's own fd (one table): it closes it
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if parent_pidfd >= 0 and select.select([parent_pidfd], [], [], 0)[0]:
                os._exit(1)
        elif not node.adopted_by:
            die_with_parent(parent_pidfd)
        elif parent_pidfd >= 0:
            os.close(parent_pidfd)
        me = -1
        step = "session"
        try:
            _set_session(node.session, node.task.pgid)
        except OSError as e:
            raise ChildError(step, f"{e.strerror} ({node.session} "
                             f"pgid {node.task.pgid})") from None
        if any(isinstance(c.task, Ghost) and c.task.ghost == "session" for c in node.children):
            prctl(PR_SET_CHILD_SUBREAPER, 1)   # adopt the orphans again (saved flag later)
        if premaps(node.task):
            step = "premap"
            # memory shared copy-on-write with the children: before they fork
            try:
                premap_in_python(node.plan.sf, node.task)
            except RestoreError as e:
                raise ChildError(step, str(e)) from None
        for z in node.early_zombies:
            pid = _fork_child(z.pid)
            if pid == 0:
                _zombie_main(z)
            forked.append(pid)
            _wait_group(pid, z)
        me = self_pidfd()
        for child in node.children:
            r, w = os.pipe2(os.O_CLOEXEC)
            pid = _fork_child(child.pid, CLONE_FILES if child.share_files else 0)
            if pid == 0:
                if not child.share_files:
                    os.close(r)
                task_main(child, w, inherited, me)
            forked.append(pid)
            if child.share_files:
                # One fd table: the child closes w (its end) when it has
                # reported; a death is seen on its pidfd.
                msg = _read_status_shared(r, w, pid)
            else:
                os.close(w)
                msg = read_status(r)
            os.close(r)
            if msg != "OK":
                if msg.startswith("ERR "):
                    raise _Forwarded(msg)
                raise ChildError("setup", f"task {child.pid} died before it was ready "
                                 f"({msg!r})")
        kids = forked[len(node.early_zombies):]
        for z in node.zombies:
            pid = _fork_child(z.pid)
            if pid == 0:
                _zombie_main(z)
            forked.append(pid)
            _wait_group(pid, z)
        for child, pid in zip(node.children, kids):
            if isinstance(child.task, Ghost):
                # Its work is done and it has exited; reaped only now that
                # every sibling (and zombie) that joins its group is in it.
                os.waitpid(pid, 0)
                forked.remove(pid)
        os.close(me)
        if isinstance(node.task, Ghost):
            # A session or group helper: the session or group exists now and
            # its members are parked; leave them (the session's orphans are
            # adopted by our parent, a child subreaper).
            os.write(status_w, b"OK\n")
            os._exit(0)
        if _FAIL_AT == "task setup" and not node.children:
            # test hook: a leaf task fails after its parents forked it
            raise ChildError("task setup", "failure injected by CRELF_RESTORE_FAIL_AT")
        child_setup(node.plan, status_w, inherited)
        fd = node.plan._status_fd
        os.write(fd, b"OK\n")
        os.close(fd)
    except BaseException as ex:  # noqa: BLE001 - must report anything
        for pid in forked:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if isinstance(ex, _Forwarded):
            msg = str(ex)[4:]
        elif isinstance(ex, ChildError):
            msg = str(ex)
        else:
            msg = f"setup: {type(ex).__name__}: {ex}"
        try:
            os.write(getattr(node.plan, "_status_fd", status_w), f"ERR {msg}\n".encode())
        except OSError:
            pass
        os._exit(1)
    # Parked: the restorer seizes us here and replaces everything.
    if node.adopted_by:
        while os.getppid() not in (node.adopted_by, 1, 0):
            time.sleep(0.001)      # the session helper is exiting
        if os.getppid() != node.adopted_by:
            os._exit(1)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != node.adopted_by:
            os._exit(1)
    while True:
        signal.pause()


def host_pids(init_pid: int) -> dict[int, int]:
    """{pid inside the new pid namespace: pid as crrestart sees it} for every
    descendant of the namespace's init."""
    out: dict[int, int] = {}
    todo = [init_pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for k in kids:
                try:
                    with open(f"/proc/{k}/status") as f:
                        ns = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
                except (OSError, StopIteration):
                    continue
                out[int(ns[-1])] = k
                todo.append(k)
    return out
