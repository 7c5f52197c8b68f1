"""Per-process state a restored task sets up itself before it is parked:
open files at their fd numbers, mapped files (for the injected mmaps), cwd,
root, umask, session, personality and rlimits.

This runs in the freshly forked task (a copy of crrestart), before ptrace
replaces its memory.  It must not raise: every failure is reported through
the status pipe as "ERR <step>: <message>" and the task exits.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import resource
import stat as st
from dataclasses import dataclass, field

from msgspec import UNSET

from statefile.format.integrity import DamagedError, SegmentReader
from statefile.format.records import (CharDevice, CwdGhost, DirectoryFile, File,
                                      ProcRef, RegularFile, SocketFile, SymlinkFile, TaskNote,
                                      UnixSocket)

from restorer.restore import (anon as restore_anon, bpf as restore_bpf,
                              fanotify as restore_fanotify, locks as restore_locks,
                              inet as restore_inet, pidfd as restore_pidfd, unix as restore_unix, tty as restore_tty)
from restorer.errors import RestoreError
from restorer.release.guard import journal_path
from restorer.kernel import close_all, personality

RLIMITS = ("cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock",
           "as", "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime")
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE (O_TMPFILE = __O_TMPFILE | O_DIRECTORY)
OPEN_FLAG_MASK = ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC | O_TMPFILE_BIT)
REG_FLAG_MASK = OPEN_FLAG_MASK & ~os.O_DIRECTORY
RLIM_INF = 2**64 - 1


@dataclass
class ExtraOpen:
    """A file the injected code needs an fd for (mapped file, executable)."""
    key: str
    path: str
    flags: int
    fd: int
    dev: int | None = None       # expected identity (None: do not check)
    ino: int | None = None
    shared: int | None = None    # inherited from the initiator ({file id: fd} key), not opened


@dataclass
class ChildPlan:
    """What the forked task does before it parks (all plain data: built before fork)."""
    task: TaskNote
    files: list[File]
    statefile: str
    blobs: dict = field(default_factory=dict)   # file id -> its blob's CR_SEGMENTS entry
    sf: object = None                           # the Statefile (blobs are read verified)
    extras: list[ExtraOpen] = field(default_factory=list)
    tty_fd: int | None = None                   # crrestart's terminal, for tty fds
    shell_job: bool = False                     # stay in crrestart's session/group
    force_files: bool = False
    in_pidns: bool = False
    ctty: int | None = None                     # inherited slave to take as controlling tty
    tree_pids: frozenset = frozenset()          # saved pids of the tree (its /proc files)
    fg_pgrp: int | None = None                  # ... and its saved foreground process group
    shares_files: bool = False                  # cloned with CLONE_FILES: its parent's table


class ChildError(Exception):
    def __init__(self, step: str, msg: str):
        super().__init__(f"{step}: {msg}")


def _rl(v: int) -> int:
    return resource.RLIM_INFINITY if v in (-1, RLIM_INF) else v


def _same(fd: int, dev: int | None, ino: int | None) -> bool:
    if ino is None:
        return True
    s = os.fstat(fd)
    return s.st_ino == ino and (dev is None or s.st_dev == dev)


def _place(fd: int, target: int, cloexec: bool) -> None:
    """Put open fd at number target (closing fd if moved)."""
    if fd != target:
        os.dup2(fd, target, inheritable=not cloexec)
        os.close(fd)
    else:
        os.set_inheritable(fd, not cloexec)


def _recreate_from_blob(plan: ChildPlan, f: RegularFile) -> None:
    """Policy dump_tmpfs: a file on tmpfs missing here is recreated at its path."""
    path = f.path
    journal_path(path)      # (crrestart's own opens: the tasks' are announced before the fork)
    wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode & 0o7777)
    try:
        _write_blob(plan, f, wfd, path)
        os.ftruncate(wfd, f.size)
    finally:
        os.close(wfd)


def _write_blob(plan: ChildPlan, f: RegularFile, wfd: int, path: str) -> None:
    """The saved content, each chunk verified before a byte of it is written."""
    seg = plan.blobs.get(f.id)
    if seg is None:
        return
    sfd = os.open(plan.statefile, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with SegmentReader(plan.sf, sfd) as rd:
            rd.write_into(wfd, seg)
    except DamagedError as e:
        raise ChildError("verify", f"{e}: not restarted") from None
    finally:
        os.close(sfd)


def _recreate_deleted(plan: ChildPlan, f: RegularFile) -> int:
    """A deleted-but-open file: write its saved content into a new file in the
    same directory (or /tmp), open it with the saved flags, unlink it."""
    path = f.path
    if path.endswith(" (deleted)"):
        path = path[: -len(" (deleted)")]
    d = os.path.dirname(path) or "/"
    base = os.path.basename(path)
    tmp = None
    for where in (d, "/tmp"):
        cand = os.path.join(where, f".{base}.crelf-{os.getpid()}")
        journal_path(cand)
        try:
            wfd = os.open(cand, os.O_RDWR | os.O_CREAT | os.O_EXCL, f.mode & 0o7777)
            tmp = cand
            break
        except OSError:
            continue
    if tmp is None:
        raise ChildError("files", f"cannot recreate deleted file {path}: no writable directory")
    try:
        if f.blob is not None:
            _write_blob(plan, f, wfd, path)
        os.ftruncate(wfd, f.size)
        fd = os.open(tmp, f.flags & REG_FLAG_MASK)
    finally:
        os.close(wfd)
        os.unlink(tmp)
    return fd


# ------------------------------------------------- ghosts: removed directories, dead /proc

GHOST_KEY_BASE = -(1 << 26)     # {file id: fd} keys of the working directories made here


def cwd_key(i: int) -> int:
    """The inherited-fd key of task i's working directory made by open_ghosts."""
    return GHOST_KEY_BASE - i


def _proc(x: File | CwdGhost) -> ProcRef | None:
    """Where under /proc/PID a file, directory or working directory is (None:
    elsewhere; only those three kinds of record can be)."""
    if isinstance(x, (RegularFile, DirectoryFile, CwdGhost)):
        return x.proc
    return None


def tree_proc(f: File, pids: set[int]) -> bool:
    """A file or directory under /proc/PID of a process of the tree: opened
    again by the restored task once every task exists (open_late)."""
    proc = _proc(f)
    return proc is not None and not proc.dead and proc.pid in pids


def remap_proc_pids(sf, ids: dict[int, int]) -> None:
    """A tree restored in a pid namespace of its own (restore_ns.to_inner):
    the pids of its /proc paths become the tasks' inner ones too."""
    for f in sf.files:
        proc = _proc(f)
        if proc is not None and proc.pid in ids:
            proc.pid = ids[proc.pid]


def _dead_proc(x: File | CwdGhost) -> ProcRef | None:
    proc = _proc(x)
    return proc if proc is not None and proc.dead else None


def _ghost_dir(path: str, g: DirectoryFile | CwdGhost) -> int:
    """A removed directory made again, for its open fds and working
    directories: at its old path when that is free (its parents made for the
    time it takes when they are gone too), else at a scratch name beside it or
    in /tmp; with the saved mode, owner and times; opened; removed again at
    once.  Returns an O_RDONLY fd of it (nlink 0, as it was)."""
    path = path.removesuffix(" (deleted)") or "/"
    made: list[str] = []
    try:
        parent = os.path.dirname(path)
        missing = []
        while parent not in ("/", "") and not os.path.lexists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        cands = []
        if os.path.isdir(parent or "/"):
            for d in reversed(missing):
                journal_path(d)
                try:
                    os.mkdir(d, 0o700)
                except OSError:
                    break
                made.append(d)
            if len(made) == len(missing):
                if not os.path.lexists(path):
                    cands.append(path)
                cands.append(os.path.join(os.path.dirname(path),
                                          f".{os.path.basename(path)}.crelf-{os.getpid()}"))
        cands.append(os.path.join("/tmp", f".{os.path.basename(path)}.crelf-{os.getpid()}"))
        for cand in cands:
            journal_path(cand)
            try:
                os.mkdir(cand, 0o700)
            except OSError:
                continue
            made.append(cand)
            fd = os.open(cand, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if os.geteuid() == 0:
                    os.fchown(fd, g.uid, g.gid)
                os.fchmod(fd, g.mode & 0o7777)
                atime = g.mtime_ns if g.atime_ns is UNSET else g.atime_ns
                os.utime(fd, ns=(atime, g.mtime_ns))
            except OSError:
                os.close(fd)
                raise
            return fd
        raise RestoreError("files", f"cannot make removed directory {path} again: no "
                           "writable directory")
    finally:
        for d in reversed(made):
            try:
                os.rmdir(d)
            except OSError:
                pass


_HELPERS: list[int] = []     # processes standing in for dead ones (end_dead_procs)


def _dead_proc_fds(pid: int, rests: list[str]) -> dict[str, int]:
    """{rest: fd} of /proc/PID/rest for a process that had exited: a helper
    process is forked (with that pid when it is free) and the paths opened
    under its /proc directory.  end_dead_procs() kills and reaps it once every
    task has its fds and working directory (a working directory must be
    entered while the process is alive: fchdir to a dead one's is ESRCH); the
    fds then lead to a /proc directory of a dead process, as they did."""
    from restorer.kernel import PR_SET_PDEATHSIG, fork_with_pid, prctl
    me = os.getpid()
    try:
        child = fork_with_pid(pid)
    except OSError:
        child = os.fork()
    if child == 0:
        try:
            os.closerange(0, 1 << 20)   # (crrestart's status pipe must see its EOF)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == me:
                while True:
                    signal.pause()
        finally:
            os._exit(0)
    _HELPERS.append(child)
    out: dict[str, int] = {}
    try:
        for rest in rests:
            p = f"/proc/{child}" + (f"/{rest}" if rest else "")
            try:
                out[rest] = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise RestoreError("files", f"/proc/{pid}/{rest}: cannot make it again "
                                   f"({e.strerror})") from None
    except BaseException:
        for fd in out.values():
            os.close(fd)
        end_dead_procs()
        raise
    return out


def end_dead_procs() -> None:
    """Kill and reap the helpers of _dead_proc_fds (every task is set up, or
    the restore failed)."""
    while _HELPERS:
        child = _HELPERS.pop()
        try:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        except OSError:
            pass


def open_ghosts(files: list[File], tasks: list[TaskNote]) -> dict[int, int]:
    """In the initiator, before the tree forks: every removed directory and
    dead process's /proc entry an fd or a working directory of the tree was
    on, made again (_ghost_dir, _dead_proc_fds), one per saved inode.  Returns
    {file id or cwd_key(i): fd} for the tasks to inherit; a task whose working
    directory is one gets `_cwd_key` (it fchdir()s to it)."""
    used = {d.file for t in tasks for d in t.fds}
    refs: list[tuple[int, File | CwdGhost]] = [(f.id, f) for f in files if f.id in used and (
        _dead_proc(f) or (isinstance(f, DirectoryFile) and f.deleted))]
    refs += [(cwd_key(i), t.cwd_ghost) for i, t in enumerate(tasks) if t.cwd_ghost is not None]
    out: dict[int, int] = {}
    bases: dict[tuple, int] = {}
    try:
        dead: dict[int, set[str]] = {}
        for _, x in refs:
            proc = _dead_proc(x)
            if proc:
                dead.setdefault(proc.pid, set()).add(proc.rest)
        procs: dict[tuple, int] = {}
        for pid, rests in sorted(dead.items()):
            for rest, fd in _dead_proc_fds(pid, sorted(rests)).items():
                procs[(pid, rest)] = fd
        for key, x in refs:
            proc = _dead_proc(x)
            if proc:
                base = procs[(proc.pid, proc.rest)]
            else:
                ident = (x.dev, x.ino)
                if ident not in bases:
                    bases[ident] = _ghost_dir(x.path, x)
                base = bases[ident]
            if key <= GHOST_KEY_BASE:
                out[key] = os.dup(base)
            else:
                flags = (x.flags & OPEN_FLAG_MASK) | os.O_CLOEXEC
                out[key] = os.open(f"/proc/self/fd/{base}", flags)
                if x.pos:
                    try:
                        os.lseek(out[key], x.pos, os.SEEK_SET)
                    except OSError:
                        pass
        for i, t in enumerate(tasks):
            if cwd_key(i) in out:
                t._cwd_key = cwd_key(i)
        for fd in procs.values():
            os.close(fd)
    except BaseException:
        close_all(out)
        raise
    finally:
        close_all(bases)
    return out


def _open_symlink(path: str, flags: int) -> int:
    """An O_PATH fd on the symbolic link at path itself, with the saved flags
    (an O_PATH fd on a link opened without O_NOFOLLOW came through /proc)."""
    if flags & os.O_NOFOLLOW:
        return os.open(path, flags)
    tmp = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.open(f"/proc/self/fd/{tmp}", flags)
    finally:
        os.close(tmp)


def ghost_node(f: File) -> bool:
    """A removed symbolic link (O_PATH fd) or device node still open: made
    again by the initiator (open_ghost_nodes)."""
    return f.deleted and isinstance(f, (SymlinkFile, CharDevice))


def _make_node(path: str, x: SymlinkFile | CharDevice) -> None:
    """The symbolic link or device node of entry x at path (which is free)."""
    journal_path(path)
    if isinstance(x, SymlinkFile):
        if x.symlink is None:
            raise OSError(errno.ENOENT, "its target was not readable at checkpoint")
        os.symlink(x.symlink, path)
    else:
        os.mknod(path, st.S_IFCHR | 0o600, x.rdev)
        os.chmod(path, x.mode & 0o7777)
    try:
        if os.geteuid() == 0:
            os.chown(path, x.uid, x.gid, follow_symlinks=False)
        os.utime(path, ns=(x.atime_ns, x.mtime_ns), follow_symlinks=False)
    except OSError:
        os.unlink(path)
        raise


def open_ghost_nodes(files: list[File], tasks: list[TaskNote]) -> dict[int, int]:
    """In the initiator, before the tree forks: every removed symbolic link
    and device node an fd of the tree held (ghost_node), made again once per
    saved inode (at its old path when that is free, else at a scratch name
    beside it or in /tmp), opened there for each of its open file
    descriptions with the saved flags, and removed: nlink 0, as it was.
    Returns {file id: fd} for the tasks to inherit."""
    used = {d.file for t in tasks for d in t.fds}
    groups: dict[tuple, list[SymlinkFile | CharDevice]] = {}
    for f in files:
        if f.id in used and ghost_node(f):
            groups.setdefault((f.kind, f.dev, f.ino), []).append(f)
    out: dict[int, int] = {}
    try:
        for group in groups.values():
            x = group[0]
            path = x.path.removesuffix(" (deleted)")
            scratch = f".{os.path.basename(path)}.crelf-{os.getpid()}"
            cands = [path, os.path.join(os.path.dirname(path), scratch),
                     os.path.join("/tmp", scratch)]
            why = "no writable directory"
            for cand in cands:
                if os.path.lexists(cand) or not os.path.isdir(os.path.dirname(cand) or "/"):
                    continue
                try:
                    _make_node(cand, x)
                except OSError as e:
                    why = e.strerror or str(e)
                    if isinstance(x, CharDevice) and e.errno == errno.EPERM:
                        why += " (mknod of a device needs CAP_MKNOD: restart as root)"
                    continue
                try:
                    for f in group:
                        flags = (f.flags & OPEN_FLAG_MASK) | os.O_CLOEXEC
                        if isinstance(f, SymlinkFile):
                            out[f.id] = _open_symlink(cand, flags)
                        else:
                            out[f.id] = os.open(cand, flags | os.O_NOCTTY)
                            if f.pos:
                                try:
                                    os.lseek(out[f.id], f.pos, os.SEEK_SET)
                                except OSError:
                                    pass
                except OSError as e:     # (a device on a nodev mount: the next place)
                    why = e.strerror or str(e)
                    for f in group:
                        if f.id in out:
                            os.close(out.pop(f.id))
                    continue
                finally:
                    os.unlink(cand)
                break
            else:
                raise RestoreError("files", f"cannot make removed {x.kind} {path} again: "
                                   f"{why}")
    except BaseException:
        close_all(out)
        raise
    return out


def _mount_fd(f: RegularFile) -> int:
    """An fd on the file system of entry f (its saved st_dev; not O_PATH:
    open_by_handle_at refuses those): the
    nearest directory of its old path still there, else a mount point."""
    want = f.dev
    d = os.path.dirname(f.path.removesuffix(" (deleted)")) or "/"
    cands = []
    while True:
        cands.append(d)
        if d in ("/", ""):
            break
        d = os.path.dirname(d)
    try:
        with open("/proc/self/mountinfo") as mi:
            cands += [line.split()[4] for line in mi if len(line.split()) > 4]
    except OSError:
        pass
    for c in cands:
        try:
            fd = os.open(c or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        if os.fstat(fd).st_dev == want:
            return fd
        os.close(fd)
    raise ChildError("files", f"{f.path}: its file system is not mounted here")


def open_linked(f: RegularFile, flags: int) -> int:
    """A file whose opened name was removed while another hard link keeps it
    (statefile/dump/files.py `linked`): opened again by its file handle, the
    same inode (open_by_handle_at needs CAP_DAC_READ_SEARCH: root)."""
    from statefile.dump.files import _FileHandle, _libc
    h = f.linked
    if not h.handle:
        raise ChildError("files", f"{f.path}: no file handle was saved")
    raw = bytes.fromhex(h.handle)
    fh = _FileHandle(handle_bytes=len(raw), handle_type=h.type)
    ctypes.memmove(fh.f_handle, raw, len(raw))
    mfd = _mount_fd(f)
    try:
        fd = _libc.open_by_handle_at(mfd, ctypes.byref(fh), flags | os.O_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            why = ("it no longer exists (its last link was removed)" if e == errno.ESTALE
                   else "reopening it by file handle needs root" if e == errno.EPERM
                   else os.strerror(e))
            raise ChildError("files", f"{f.path} (still linked elsewhere): {why}")
    finally:
        os.close(mfd)
    return fd


AT_FDCWD, NR_LSEEK, NR_OPENAT, NR_DUP3, F_SETFD = -100, 8, 257, 292, 2


def open_late(inj, task: TaskNote, files: list[File], scratch: int,
              pids: dict[int, int]) -> None:
    """In the restored task, by injection once every task of the tree exists:
    its fds on /proc/PID/... of processes of the tree, opened for the pid the
    process has now (`pids`: saved pid -> pid in crrestart's /proc), placed at
    their numbers with their flags and offsets.  Descriptions shared by two
    tasks come back as one each (the offset of a /proc file is rarely shared)."""
    tree = set(pids)
    done: dict[int, int] = {}
    for d in sorted(task.fds, key=lambda d: d.fd):
        f = files[d.file]
        if not tree_proc(f, tree):
            continue
        cloexec = os.O_CLOEXEC if d.cloexec else 0
        if d.file in done:
            inj.check(NR_DUP3, done[d.file], d.fd, cloexec)
            continue
        proc = f.proc
        path = f"{proc.mount.rstrip('/')}/{pids[proc.pid]}" + (
            f"/{proc.rest}" if proc.rest else "")
        inj.write(scratch, os.fsencode(path) + b"\0")
        flags = (f.flags & OPEN_FLAG_MASK) | os.O_CLOEXEC
        try:
            fd = inj.check(NR_OPENAT, AT_FDCWD, scratch, flags, 0)
        except OSError as e:
            raise RestoreError("proc files", f"{f.path} as {path}: {e}") from None
        if fd != d.fd:
            inj.check(NR_DUP3, fd, d.fd, cloexec)
            inj.check("close", fd)
        elif not cloexec:
            inj.check("fcntl", fd, F_SETFD, 0)
        if f.pos:
            inj.call(NR_LSEEK, d.fd, f.pos, os.SEEK_SET)
        done[d.file] = d.fd


def _open_file(plan: ChildPlan, f: File) -> int | None:
    """The restored fd for open file description f, or None to leave it closed."""
    kind = f.kind
    flags = f.flags & OPEN_FLAG_MASK
    path = f.path
    skipped = f.skipped
    if tree_proc(f, plan.tree_pids):
        return None     # opened by the restored task once every task exists (open_late)
    if isinstance(f, RegularFile) and f.nsfs is not None:
        # the namespace the restored task is in (its own again, or the one a
        # restart made for the tree): refused at checkpoint if it was another
        return os.open(f"/proc/self/ns/{f.nsfs.name}", flags)
    if isinstance(f, RegularFile) and f.linked is not None:
        fd = open_linked(f, flags & REG_FLAG_MASK)
        if f.pos:
            os.lseek(fd, f.pos, os.SEEK_SET)
        return fd
    if skipped == "network" and kind == "socket":
        return restore_inet.skipped_socket(f)
    if skipped == "external-unix" and kind == "socket":
        try:
            return restore_unix.open_external(f, plan.task.cwd)
        except OSError as e:
            raise ChildError("sockets", e.strerror or str(e)) from None
    if skipped and kind != "regular" and skipped != "notify-events":
        return None  # io_uring, perf event...: the policy restores them closed
    if kind in restore_anon.KINDS:
        return restore_anon.open_anon(f)
    if kind == restore_fanotify.KIND:
        try:
            return restore_fanotify.open_fanotify(f)
        except OSError as e:
            raise ChildError("files", str(e)) from None
    if kind == restore_bpf.KIND:
        try:
            return restore_bpf.open_map(f)
        except OSError as e:
            raise ChildError("files", str(e)) from None
    if kind == restore_pidfd.KIND:
        if restore_pidfd.is_dead(f):
            raise ChildError("pidfds", "the pidfd of an exited process was not inherited")
        return None   # opened by injection once every task exists (restore_pidfd.inject)
    if isinstance(f, SocketFile) and isinstance(f.socket, UnixSocket):
        return restore_unix.open_unix(f, plan.files, plan.task.cwd)
    if isinstance(f, SocketFile) and f.socket.family in ("inet", "inet6"):
        try:
            return restore_inet.open_inet(f)
        except OSError as e:
            local = f.socket.local or ["?", "?"]
            what = e.strerror or str(e)
            if not what.startswith("TCP connection"):     # (restore/tcp.py names it)
                what = f"cannot listen on or bind {local[0]} port {local[1]} again: {what}"
            raise ChildError("sockets", what) from None
    if kind in restore_tty.KINDS:   # made by the initiator (restore_tty.open_ptys)
        raise ChildError("files", f"pseudo-terminal {path} was not created for this task")
    if kind == "tty":
        if plan.tty_fd is None:
            return os.open("/dev/null", os.O_RDWR)
        return os.dup(plan.tty_fd)
    if isinstance(f, RegularFile) and f.shmem is not None:
        raise ChildError("files", f"{path} was not inherited (restorer/restore/memfd.py makes it)")
    if isinstance(f, RegularFile):
        if f.deleted:
            fd = _recreate_deleted(plan, f)
        else:
            recreated = f.blob is not None and not os.path.exists(path)
            if recreated:
                _recreate_from_blob(plan, f)
            fd = os.open(path, flags & REG_FLAG_MASK)
            if not (plan.force_files or recreated) and not _same(fd, f.dev, f.ino):
                raise ChildError("files", f"{path} is not the file that was open "
                                 "(inode changed; --force-files accepts it)")
        if f.pos:
            os.lseek(fd, f.pos, os.SEEK_SET)
        return fd
    if isinstance(f, DirectoryFile):
        fd = os.open(path, flags | os.O_DIRECTORY)
        if f.pos:
            try:
                os.lseek(fd, f.pos, os.SEEK_SET)
            except OSError:
                pass
        return fd
    if ghost_node(f):
        raise ChildError("files", f"removed {kind} {path} was not made again for this task")
    if isinstance(f, SymlinkFile):
        fd = _open_symlink(path, flags)
        s = os.fstat(fd)
        if not st.S_ISLNK(s.st_mode) or not (plan.force_files or _same(fd, f.dev, f.ino)):
            os.close(fd)
            raise ChildError("files", f"{path} is not the symbolic link that was open "
                             "(inode changed; --force-files accepts another link)")
        return fd
    if isinstance(f, CharDevice):
        # (a terminal device is our controlling terminal only if it was)
        fd = os.open(path, flags | (0 if f.ctty else os.O_NOCTTY))
        s = os.fstat(fd)
        if not st.S_ISCHR(s.st_mode) or s.st_rdev != f.rdev:
            raise ChildError("files", f"{path} is not the same character device")
        return fd
    raise ChildError("files", f"fd kind {kind} ({path}) is not restored by this crelf")


def child_setup(plan: ChildPlan, status_fd: int, inherited: dict[int, int] | None = None) -> None:
    """Everything the task does itself; the caller reports and parks.

    `inherited` ({file id: fd}) are the open file descriptions the initiator
    created for the whole tree (pipes, FIFOs, files several tasks share): the
    task places the ones it uses at their numbers and closes all the others."""
    task = plan.task
    if plan.shares_files:
        # The fd table is its parent's (one files_struct): the group's owner
        # sets it up for all of them, once they are parked (restorer/tree.py).
        plan._status_fd = status_fd
        _own_state(plan, None)
        return
    inherited = inherited or {}
    targets = {d.fd for d in task.fds} | {e.fd for e in plan.extras}
    high = max(list(targets) + [status_fd, plan.tty_fd or 0, 2]) + 1
    need = ({d.file for d in task.fds} | {e.shared for e in plan.extras
                                          if e.shared is not None}
            | {plan.ctty, getattr(task, "_cwd_key", None)}) & set(inherited)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if high + len(need) + 16 > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (min(hard, high + len(need) + 64), hard))
        except (OSError, ValueError):
            pass
    # Move our own fds (and the inherited ones we use) out of the way of the
    # target numbers.
    keep = {}
    for name, fd in (("status", status_fd), ("tty", plan.tty_fd)):
        if fd is None:
            continue
        keep[name] = _dup_above(fd, high)
    plan.tty_fd = keep.get("tty")
    plan._status_fd = keep["status"]
    mine = {fid: _dup_above(inherited[fid], high) for fid in sorted(need)}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep.values() and fd not in mine.values():
            try:
                os.close(fd)
            except OSError:
                pass
    step = "files"
    try:
        opened: dict[int, int] = {}   # file id -> fd number where it was placed
        for d in sorted(task.fds, key=lambda d: d.fd):
            fid = d.file
            if fid in opened:
                os.dup2(opened[fid], d.fd, inheritable=not d.cloexec)
                continue
            if fid in mine:     # created by the initiator: the same open file description
                os.dup2(mine[fid], d.fd, inheritable=not d.cloexec)
                opened[fid] = d.fd
                continue
            fd = _open_file(plan, plan.files[fid])
            if fd is None:
                continue
            _place(fd, d.fd, d.cloexec)
            opened[fid] = d.fd
        for e in plan.extras:
            if e.shared is not None:   # a memfd of shared memory (restorer/restore/ipc.py)
                if e.shared not in mine:
                    raise ChildError("mapped files", f"{e.key} was not inherited")
                os.dup2(mine[e.shared], e.fd, inheritable=False)
        ctty = _dup_above(mine[plan.ctty], high) if plan.ctty in mine else None
        ghost_cwd = mine.get(getattr(task, "_cwd_key", None))
        ghost_cwd = _dup_above(ghost_cwd, high) if ghost_cwd is not None else None
        for fd in mine.values():
            os.close(fd)
        step = "epoll"
        restore_anon.finish_epoll(task.fds, plan.files)
        step = "mapped files"
        for e in plan.extras:
            if e.shared is not None:
                continue
            try:
                fd = os.open(e.path, e.flags)
            except OSError as ex:
                raise ChildError(step, f"cannot open {e.path}: {ex.strerror}") from None
            if not plan.force_files and not _same(fd, e.dev, e.ino):
                raise ChildError(step, f"{e.path} changed since the checkpoint "
                                 "(different inode; --force-files accepts it)")
            _place(fd, e.fd, True)
        if "tty" in keep:
            os.close(keep.pop("tty"))
        step = "file locks"   # OFD/flock locks, leases (POSIX ones: restorer/restore/task.py)
        try:
            restore_locks.take_in_task(task, plan.files)
        except restore_locks.LockError as ex:
            raise ChildError(step, str(ex)) from None
        step = "inotify"
        restore_anon.finish_inotify(task.fds, plan.files)
        step = "fanotify"
        try:
            restore_fanotify.finish_fanotify(task.fds, plan.files)
        except OSError as ex:
            raise ChildError(step, str(ex)) from None
    except ChildError:
        raise
    except OSError as ex:
        raise ChildError(step, f"{ex.strerror or ex}" + (f" ({ex.filename})" if ex.filename else ""))
    _own_state(plan, ctty, ghost_cwd)


def _own_state(plan: ChildPlan, ctty: int | None, ghost_cwd: int | None = None) -> None:
    """The per-process part of child_setup: cwd, root, umask, session,
    controlling terminal, personality, rlimits."""
    task = plan.task
    step = "cwd"
    try:
        if ghost_cwd is not None:     # a removed directory made again (open_ghosts)
            os.fchdir(ghost_cwd)
            os.close(ghost_cwd)
        else:
            os.chdir(task.cwd or "/")
        if task.root not in ("/", ""):
            step = "root"
            os.chroot(task.root)
        step = "umask"
        os.umask(task.umask)
        step = "session"
        pid = os.getpid()
        if not plan.shell_job:
            if task.sid == task.pid and os.getsid(0) != pid:
                os.setsid()
            elif task.pgid == task.pid and os.getpgid(0) != pid:
                os.setpgid(0, 0)
        elif task.pgid == task.pid or task.sid == task.pid:
            # A shell job on crrestart's terminal: its own process group (a
            # shell keeps job control by it), in the terminal's foreground.
            os.setpgid(0, 0)
            _take_foreground(task, plan.files)
        if ctty is not None:
            step = "controlling terminal"
            if not plan.shell_job:
                restore_tty.take_ctty(ctty, plan.fg_pgrp)
            os.close(ctty)
        step = "personality"
        if task.personality:
            personality(task.personality)
        step = "rlimits"
        for i, name in enumerate(RLIMITS):
            if task.rlimits is not None:
                soft, hard = getattr(task.rlimits, "as_" if name == "as" else name)
                want = (_rl(soft), _rl(hard))
                if resource.getrlimit(i) != want:
                    try:
                        resource.setrlimit(i, want)
                    except (OSError, ValueError) as ex:
                        raise ChildError(step, f"RLIMIT_{name.upper()} {want}: {ex}") from None
    except ChildError:
        raise
    except OSError as ex:
        raise ChildError(step, f"{ex.strerror or ex}" + (f" ({ex.filename})" if ex.filename else ""))


def _take_foreground(task: TaskNote, files: list[File]) -> None:
    """Make our process group the foreground one of the terminal we were given."""
    tty = next((d.fd for d in task.fds if files[d.file].kind == "tty"), None)
    if tty is None:
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTTOU])
    try:
        os.tcsetpgrp(tty, os.getpgrp())
    except OSError:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _dup_above(fd: int, low: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)


def run_child(plan: ChildPlan, status_fd: int) -> None:
    """Entry point of the forked task: set up, report, park.  Never returns."""
    try:
        child_setup(plan, status_fd)
        fd = plan._status_fd
        os.write(fd, b"OK\n")
        os.close(fd)
    except BaseException as ex:  # noqa: BLE001 - must report anything
        msg = str(ex) if isinstance(ex, ChildError) else f"setup: {type(ex).__name__}: {ex}"
        try:
            os.write(getattr(plan, "_status_fd", status_fd), f"ERR {msg}\n".encode())
        except OSError:
            pass
        os._exit(1)
    # Parked: the restorer seizes us here and replaces everything.
    while True:
        signal.pause()
