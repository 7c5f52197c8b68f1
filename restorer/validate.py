"""Checks made before anything is created: the statefile is restartable here,
its files are still there and unchanged, the executable and libraries are the
same, this kernel's vDSO matches the checkpointed one, and this CPU lays the
XSAVE area out as the checkpoint's did (statefile/format/xsave.py)."""

from __future__ import annotations

import os
import stat

from statefile.check import support
from statefile.format import records as R, xsave
from statefile.format.integrity import DamagedError, SegmentReader

from restorer.restore import ipc as restore_ipc, memfd as restore_memfd, ns as restore_ns
from .errors import RestoreError, ValidationError
from restorer.restore.files import ChildError, ghost_node, open_linked, tree_proc
from restorer.restore.memory import VDSO_NAMES, file_path, parse_maps



# Trees are checked below with their own message.
_TREE_KEYS = {"task:tree", "task:zombie",
              "task:cgroup"}   # (checked at checkpoint; a restart uses crrestart's cgroups)


def _ident_problem(path: str, want: R.ExeId | R.FileBase | None, what: str,
                   check_size_mtime: bool = True) -> str | None:
    """Why the file at path is not the one `want` identifies (None: it is;
    `want` None: only that it exists)."""
    try:
        s = os.stat(path)
    except FileNotFoundError:
        return f"{what} {path} no longer exists"
    except OSError as e:
        return f"{what} {path}: {e.strerror}"
    if want is None:
        return None
    if s.st_ino != want.ino:
        return f"{what} {path} was replaced (inode {want.ino} -> {s.st_ino})"
    if s.st_dev != want.dev:
        return f"{what} {path} is on another device now"
    if check_size_mtime:
        if s.st_size != want.size:
            return f"{what} {path} changed size ({want.size} -> {s.st_size} bytes)"
        if s.st_mtime_ns != want.mtime_ns:
            return f"{what} {path} was modified since the checkpoint"
    return None


def vdso_problem(task: R.TaskNote, sf) -> str | None:
    mine = {m["path"]: m["end"] - m["start"] for m in parse_maps(os.getpid())
            if m["path"] in VDSO_NAMES}
    saved = {m.path: m.end - m.start for m in task.mappings if m.path in VDSO_NAMES}
    if not saved:
        return None
    if mine != saved:
        fmt = lambda d: ", ".join(f"{k} {v // 4096}p" for k, v in sorted(d.items()))  # noqa
        return (f"this kernel's vDSO layout ({fmt(mine)}) differs from the checkpointed one "
                f"({fmt(saved)}); restoring on another kernel is not supported yet")
    # Same layout: the code must be the same too (glibc keeps pointers into it).
    vd = next(m for m in task.mappings if m.path == "[vdso]")
    seg = next((sf.segment(p) for p in vd.segments if sf.segment(p).filesz), None)
    if seg is None:
        return None
    own = next(m for m in parse_maps(os.getpid()) if m["path"] == "[vdso]")
    with open("/proc/self/mem", "rb", buffering=0) as f:
        f.seek(own["start"])
        image = f.read(own["end"] - own["start"])
    saved_image = bytearray(seg.memsz)
    try:
        with SegmentReader(sf) as rd:       # verified: a damaged one is no other kernel
            for off, view in rd.pieces(seg):
                saved_image[off:off + len(view)] = view
    except DamagedError as e:
        raise RestoreError("verify", f"{e}: not restarted") from None
    if image != saved_image:
        return ("this kernel's vDSO code differs from the checkpointed one (another kernel "
                "build); restoring across kernels is not supported yet")
    return None


def validate(sf, force_files: bool = False) -> list[str]:
    """Return warnings; raise ValidationError (one line) on the first refusal."""
    warnings: list[str] = []
    h = sf.header
    if h.machine != "x86_64":
        raise ValidationError(f"statefile is for {h.machine}, this is x86_64")
    p = xsave.restart_problem(h.xsave_layout)
    if p:
        raise ValidationError(f"this CPU cannot take the saved registers: {p}")
    if not h.restartable:
        why = "; ".join(h.not_restartable) or "see crinspect"
        raise ValidationError(f"the statefile is marked not restartable: {why}")
    # The same assessment crcheck and crcheckpoint make (statefile/check/support.py),
    # on what the statefile holds, with the policy it was written under.
    skip = set(h.policy.skip)
    bad = support.problems(support.assess(sf.tasks, sf.files, h.zombies, {}, skip,
                                          sf.ipc, sf.shmem, live=False))
    bad = [b for b in bad if b.key not in _TREE_KEYS]
    if bad:
        raise ValidationError(f"{bad[0].where}: {bad[0].detail}: {bad[0].reason}")
    seen: set[int] = set()
    for task in sf.tasks:
        _check_task(sf, task, force_files, warnings, seen, task is sf.root)
    restore_memfd.check(sf, force_files, warnings)   # memfds, shared deleted/tmpfs files
    if "ipc" not in restore_ns.private_kinds(sf):   # else they come back in a new namespace
        # SysV objects with the saved keys or ids exist already (refused), or
        # are the saved ones, left behind by the killed tree (replaced)
        warnings += restore_ipc.check(sf.ipc, killed=not h.leave_running)
    return warnings


def _check_task(sf, task: R.TaskNote, force_files: bool, warnings: list[str], seen: set[int],
                first: bool) -> None:
    """The checks of one task of the tree; files already checked (shared with
    a task checked before) are in `seen`."""
    uid = os.geteuid()
    # the task's credentials, and a thread's own where they differ
    for creds in [task.creds] + [th.creds for th in task.threads if th.creds is not None]:
        if uid == 0:
            break
        if set(creds.uid) != {uid}:
            raise ValidationError(f"the process ran as uid {creds.uid}; only root can "
                                  f"restore a process of another user (you are uid {uid})")
        if set(creds.gid) != {os.getegid()}:
            raise ValidationError(f"the process ran with gids {creds.gid}; only root "
                                  "can restore it")
    p = vdso_problem(task, sf) if first else None
    if p:
        raise ValidationError(p)
    # executable and mapped files
    if task.exe:
        p = _ident_problem(task.exe, task.exe_id, "the executable")
        if p:
            raise ValidationError(p + " (the program must be the same)")
    for m in task.mappings:
        if m.kind in ("file-private", "file-shared") and not m.deleted \
                and m.shmem is None:   # (restore_memfd.check)
            try:
                s = os.stat(file_path(m))
            except OSError:
                raise ValidationError(f"mapped file {file_path(m)} no longer exists") from None
            maj, mnr = (int(x, 16) for x in m.dev.split(":"))
            if s.st_ino != m.inode or (os.major(s.st_dev), os.minor(s.st_dev)) != (maj, mnr):
                raise ValidationError(f"mapped file {file_path(m)} was replaced since the "
                                      "checkpoint (a library or the program was updated)")
            # A private mapping rewritten in place (same inode): the pages not
            # saved would be read from new content.  (A shared mapping is the
            # file itself, which the program may change: like an open file.)
            if m.kind == "file-private" and (
                    m.file_size not in (None, s.st_size)
                    or m.file_mtime_ns not in (None, s.st_mtime_ns)):
                raise ValidationError(f"mapped file {file_path(m)} was modified since the "
                                      "checkpoint (a library or the program was rewritten "
                                      "in place)")
        if m.kind == "special":
            raise ValidationError(f"special mapping {m.path} cannot be restored")
    # open files
    used = {d.file: d.fd for d in task.fds}
    for f in sf.files:
        if f.id not in used or f.id in seen:
            continue
        seen.add(f.id)
        if isinstance(f, R.RegularFile) and f.shmem is not None:   # (memfds, deleted and
            if f.skipped:                   # shared file objects: restore_memfd.check)
                warnings.append(_skip_note(used[f.id], f))
            continue
        kind = f.kind
        skipped = f.skipped
        p = _special_file_problem(f, {t.pid for t in sf.tasks}, force_files, warnings)
        if p is not None:
            if p:
                raise ValidationError(p)
            continue
        if skipped:
            warnings.append(_skip_note(used[f.id], f))
            if kind != "regular":
                continue
        if kind == "regular" and f.deleted and f.path.startswith("/dev/zero"):
            continue      # a shared anonymous object a task maps (restore_ipc.object_fds)
        if kind == "regular" and f.deleted:
            if f.blob is None and f.size:
                raise ValidationError(f"deleted file {f.path} has no saved content")
            continue
        if kind == "regular" and f.blob is not None and not os.path.exists(f.path):
            warnings.append(f"fd {used[f.id]}: {f.path} (tmpfs) is missing here; "
                            "recreated from the content saved in the statefile")
            continue
        if kind == "regular":
            p = _ident_problem(f.path, f, "file")
            refusal = _changed(p, force_files, warnings) if p else ""
            if refusal:
                raise ValidationError(refusal)
        elif kind in ("directory", "chr"):
            if not os.path.exists(f.path):
                raise ValidationError(f"{f.path} no longer exists")
        elif kind == "fifo" and os.path.exists(f.path) and \
                not stat.S_ISFIFO(os.stat(f.path).st_mode):
            raise ValidationError(f"{f.path} is no longer a FIFO")
    if task.cwd and task.cwd_ghost is None and not os.path.isdir(task.cwd):
        raise ValidationError(f"working directory {task.cwd} no longer exists")
    if task.posix_timers:
        raise ValidationError(f"the process had {task.posix_timers} POSIX timer(s) "
                              "(timer_create); their state is not in the statefile yet")
    if task.creds.seccomp:
        if not task.crrun:
            raise ValidationError("the process had a seccomp filter; not restored by this "
                                  "crrestart")
        warnings.append("the process ran under crrun's monitor; it runs on unmonitored "
                        "(start it again under crrun to be told of new unsupported state)")
    for m in task.mappings:
        if m.skipped == "scratch":
            warnings.append(f"scratch memory {m.start:#x}-{m.end:#x} was left out by "
                            "policy: restored as zeros")


def _special_file_problem(f: R.FileBase, pids: set[int], force_files: bool,
                          warnings: list[str]) -> str | None:
    """Files a restart makes or finds other than by their path (restore_files):
    None if f is none of them, "" if it can be restored, else why not."""
    proc = f.proc if isinstance(f, (R.RegularFile, R.DirectoryFile)) else None
    if proc is not None and (proc.dead or tree_proc(f, pids)):
        return ""      # a dead process's /proc entry, or one of the tree's (opened late)
    if isinstance(f, R.DirectoryFile) and f.deleted:
        return ""      # a removed directory, made again (open_ghosts)
    if ghost_node(f):
        return ""      # a removed symbolic link or device node, made again (open_ghost_nodes)
    if isinstance(f, R.SymlinkFile):
        if not os.path.islink(f.path):
            return f"symbolic link {f.path} no longer exists"
        s = os.lstat(f.path)
        if (s.st_dev, s.st_ino) != (f.dev, f.ino):
            return _changed(f"symbolic link {f.path} is not the one that was open "
                            "(inode changed)", force_files, warnings)
        return ""
    if not isinstance(f, R.RegularFile):
        return None
    if f.nsfs is not None:
        if not f.nsfs.name:
            return f"{f.path} is a namespace the process was not in; not restored"
        return ""
    if f.linked is not None:
        try:
            fd = open_linked(f, os.O_PATH)
        except ChildError as e:
            return str(e).partition(": ")[2] or str(e)
        try:
            s = os.fstat(fd)
        finally:
            os.close(fd)
        if (s.st_size, s.st_mtime_ns) != (f.size, f.mtime_ns):
            return _changed(f"file {f.path} (still linked elsewhere) was modified since "
                            "the checkpoint", force_files, warnings)
        return ""
    return None


def _changed(problem: str, force_files: bool, warnings: list[str]) -> str:
    """A file that changed since the checkpoint: the refusal, or with
    --force-files a warning and no refusal ("")."""
    if not force_files:
        return problem + " (--force-files restores anyway)"
    warnings.append(problem)
    return ""


def _skip_note(fd: int, f: R.FileBase) -> str:
    """What crrestart does about a file the checkpoint policy skipped."""
    why = f.skipped
    if why == "network" and isinstance(f, R.SocketFile):
        info = f.socket
        if isinstance(info, (R.InetSocket, R.Inet6Socket)) and (
                info.listening or (info.type == "dgram" and info.peer is None and info.local)):
            return (f"fd {fd}: {info.family} socket on {info.local} was skipped "
                    "by policy 'network': bound again to its address")
        local = getattr(info, "local", None) or ""      # (netlink, packet: no addresses
        peer = getattr(info, "peer", None) or ""        # of one shape; unknown: none)
        return (f"fd {fd}: {info.family} {info.type} socket "
                f"{local} -> {peer} was skipped by policy "
                "'network': restored unconnected (the connection looks broken)")
    if why == "external-unix" and isinstance(f, R.SocketFile) \
            and isinstance(f.socket, R.UnixSocket):
        from restorer.restore.unix import reconnects, shown_peer
        info = f.socket
        if reconnects(info):
            return (f"fd {fd}: unix datagram socket connected to {shown_peer(f)} outside the "
                    "tree was skipped by policy 'external-unix': connected to that name again")
        return (f"fd {fd}: unix {info.type} socket connected to "
                f"{info.peer or 'a socket'} outside the tree was skipped by policy "
                "'external-unix': restored as a connection its peer has closed")
    if why == "file-contents":
        return (f"fd {fd}: content of deleted file {f.path} was skipped by policy "
                "'file-contents': restored as zeros")
    if why == "notify-events":
        return (f"fd {fd}: the {f.kind[5:]} events queued at the checkpoint were skipped by "
                f"policy '{why}': restored with its watches or marks and an empty queue")
    return f"fd {fd}: {f.kind} was skipped by policy '{why}': restored closed"
