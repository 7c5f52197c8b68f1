"""Top level of a restart: validate, create the shared resources, fork the
tree with its pids (or in a new pid namespace), let every task set up its
files, rebuild every task by ptrace, release them all at once, and wait for
the root in the foreground (docs/TREE.md)."""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field

from msgspec.structs import replace

from statefile.control import ptrace as pt
from statefile.errors import FormatError
from statefile.format import records as R
from statefile.format.reader import load, verify_notes

from restorer.errors import RestoreError
from restorer.release import freezer, gate
from restorer.restore import pidfd as restore_pidfd, tcp as restore_tcp
from restorer.release.guard import Guard
from restorer.kernel import (CLONE_NEWPID, CLONE_NEWUSER, PR_SET_PDEATHSIG,
                             children_back_in_own_pidns, close_all, fork_with_pid, prctl, unshare)
from restorer.restore.files import ChildPlan, ExtraOpen, end_dead_procs, remap_proc_pids
from restorer.restore.ipc import SharedIPC, shared_anon_ids
from restorer.restore.locks import assign as assign_locks
from restorer.restore.memfd import SharedObjects
from restorer.restore.memory import plan_extras, plan_premaps
from restorer.restore.ns import Namespaces, to_inner
from restorer.restore.ns import own_pidns as own_pidns_of
from restorer.restore.task import TaskRestorer
from restorer.restore.tty import plan_ctty
from restorer.tree import (Node, die_with_parent, fork_pid_waiting_zombie, host_pids, open_shared,
                           plan_tree, read_status, self_pidfd, task_main)
from restorer.validate import validate

_DIE_AT = os.environ.get("CRELF_RESTORE_DIE_AT", "")


def _die_here(point: str, guard=None) -> None:
    """Test hook: crrestart SIGKILLs itself at this point of the release
    (tests/test_crashsafe.py proves the release is all or nothing);
    POINT+guard: its guard first, then itself (both dead together)."""
    if _DIE_AT == point + "+guard" and guard is not None:
        os.kill(guard.pid, signal.SIGKILL)
        import select
        select.select([guard.pidfd], [], [], 5)    # (readable once it is gone)
    if _DIE_AT in (point, point + "+guard"):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Options:
    detach: bool = False
    pidns: bool = False
    force_files: bool = False
    lazy: bool | None = None      # None: lazy for big images when root (see AUTO_LAZY_BYTES)
    verbose: bool = False


# Measured here (bench/restore.py): eager costs ~1 s per GiB (page faults of the
# copy), lazy returns in ~20-50 ms whatever the size, but the process then
# depends on crrestart's page server until every page is in.  Small images
# restore eagerly in milliseconds, so lazy only pays off for big ones.
AUTO_LAZY_BYTES = 256 << 20

# What planning raises on notes each valid on its own but inconsistent with
# each other (an index or a pid that is not there, restore/locks.py's check)
_INCONSISTENT = (ValueError, KeyError, IndexError)


def stored_anon_bytes(sf, task: R.TaskNote) -> int:
    total = 0
    for m in task.mappings:
        if m.kind in ("heap", "stack", "anon-private"):
            total += sum(sf.segment(p).filesz for p in m.segments)
    return total


@dataclass
class Result:
    pid: int = 0                  # tracer-view pid of the restored root
    vpid: int = 0                 # its pid in its own namespace
    init_pid: int = 0             # the pid namespace's init (with --pidns)
    restore_seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    bytes_copied: int = 0
    injections: int = 0
    lazy_server: object = None
    lazy: bool = False
    pids: dict = field(default_factory=dict)   # every task: saved pid -> tracer-view pid
    planned: bool = False         # past validation and planning (nothing created before)
    saved_pids: list = field(default_factory=list)   # every task's pid in the statefile


def _tty_fd() -> int | None:
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd):
                return fd
        except OSError:
            pass
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_user_pidns() -> None:
    """Unprivileged: a user namespace (our uid mapped to itself) + pid namespace;
    inside it we may choose pids (clone3 set_tid) and set exe_fd."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER | CLONE_NEWPID)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")


def _init_main(root: Node, status_w: int, inherited: dict[int, int], parent_pidfd: int,
               release: tuple[int, int]) -> None:
    """pid 1 of the new pid namespace: create the root task with its pid (it
    forks the rest of the tree), wait for the release, then reap until it
    exits and exit with its status.  Never returns.

    Until the release it dies with crrestart (PR_SET_PDEATHSIG, which kills
    the namespace); crrestart sends "R" on release[0] just before it lets
    the tree run, and the init answers "A" on release[1] once it no longer
    depends on crrestart, so a crrestart that dies after the release leaves
    a running tree."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(parent_pidfd)
        vpid = root.pid
        if vpid == 1:
            raise RestoreError("pid", "the process was pid 1 of its namespace")
        me = self_pidfd()
        child = fork_with_pid(vpid)
        if child == 0:
            task_main(root, status_w, inherited, me)
        os.close(status_w)
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in release:
                try:
                    os.close(int(name))
                except OSError:
                    pass
        if os.read(release[0], 1) != b"R":
            os._exit(1)       # crrestart failed (it kills us) or died (so do we)
        prctl(PR_SET_PDEATHSIG, 0)
        os.write(release[1], b"A")
        close_all(release)
        code = 1
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == child:
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code
        os._exit(code)
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(status_w, f"ERR pid namespace: {e}\n".encode())
        except OSError:
            pass
        os._exit(1)


def _blobs(sf) -> dict:
    """file id -> the CR_SEGMENTS entry of its blob (read verified:
    statefile/format/integrity.py SegmentReader)."""
    return {f.id: sf.segment(f.blob) for f in sf.files if f.blob is not None}


def _journal_task_paths(sf, g: Guard) -> None:
    """Tell the guard the paths the tasks create themselves while they are set
    up (a named unix socket a task binds, a file recreated from the
    statefile, the scratch name of a deleted file), before they exist: the
    guard removes them if crrestart dies before the release."""
    for t in sf.tasks:
        cwd = t.cwd or "/"
        for d in t.fds:
            f = sf.files[d.file]
            if isinstance(f, R.SocketFile) and isinstance(f.socket, R.UnixSocket):
                if f.socket.name and not f.socket.abstract:
                    g.path(os.path.join(cwd, f.socket.name))
            elif isinstance(f, R.RegularFile) and f.deleted:
                name = f.path.removesuffix(" (deleted)")
                for where in (os.path.dirname(name) or "/", "/tmp"):
                    g.path(os.path.join(where, f".{os.path.basename(name)}.crelf-{t.pid}"))
            elif isinstance(f, R.RegularFile) and f.blob is not None \
                    and not os.path.exists(f.path):
                g.path(f.path)


def restore(path: str, opts: Options, log=None) -> Result:
    """Restore the tree in the statefile at `path`; returns once every task
    runs again (docs/TREE.md)."""
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    res = Result()
    sf = load_verified(path)
    try:
        return _restore(path, sf, opts, log, t0, res)
    except _INCONSISTENT as e:
        if res.planned:
            raise
        # notes each valid on its own (the loader checked their fields) but
        # inconsistent with each other (a foreign or buggy writer): an fd on a
        # file entry, a mapping on a segment that is not there, a lock on an
        # fd the task lacks (restore/locks.py check): one line, never a traceback
        raise RestoreError("plan", f"malformed statefile {path} ({type(e).__name__}: {e})") \
            from None


def load_verified(path: str):
    """Load the statefile (its ELF layout checked: reader.layout_problems) and
    check every note checksum (cheap: notes only).  Segment data is verified
    chunk by chunk as it is used (statefile/format/integrity.py: every byte before it
    reaches a task, docs/RESTORE.md)."""
    try:
        sf = load(path)
    except FormatError as e:
        raise RestoreError("load", str(e)) from None
    bad = verify_notes(sf)
    if bad:
        more = f" and {len(bad) - 1} more problem(s)" if len(bad) > 1 else ""
        raise RestoreError("load", f"{bad[0]}{more}: {path} is corrupted (crinspect verify "
                           "lists every problem)")
    return sf


def _restore(path: str, sf, opts: Options, log, t0: float, res: Result) -> Result:
    res.saved_pids = [t.pid for t in sf.tasks]
    res.warnings = validate(sf, opts.force_files)
    unpriv = os.geteuid() != 0
    # A tree in a pid namespace of its own (its root that namespace's init)
    # comes back in a new one, root as pid 1 and every id as the tasks saw it.
    own_pidns = own_pidns_of(sf) is not None
    if own_pidns:
        if unpriv:
            raise RestoreError("pid namespace", "the tree ran in a pid namespace of its own; "
                               "recreating it with its pids needs root (CAP_SYS_ADMIN)")
        remap_proc_pids(sf, to_inner(sf))   # (and the pids in the tree's /proc paths)
    tasks = sf.tasks
    res.vpid = sf.root.pid
    lazy = opts.lazy
    if len(tasks) > 1 and lazy:
        res.warnings.append("lazy restore of process trees comes later: restored eagerly")
        lazy = False
    if lazy and sf.format < 2:
        raise RestoreError("verify", f"{path} is a format {sf.format} statefile: without its "
                           "chunk checksums lazy restore cannot verify pages as it serves "
                           "them; restart it with --eager (it is verified whole first) or "
                           "checkpoint it again")
    if lazy is None:
        lazy = (len(tasks) == 1 and not unpriv
                and stored_anon_bytes(sf, sf.root) >= AUTO_LAZY_BYTES)
        if lazy and sf.format < 2:
            res.warnings.append(f"format {sf.format} statefile (no chunk checksums): "
                                "restored eagerly, verified whole; checkpoint again for lazy "
                                "restore")
            lazy = False
    res.lazy = lazy
    pidns = opts.pidns or unpriv or own_pidns
    # plan what every task does itself
    blobs = _blobs(sf)
    has_tty = any(isinstance(sf.files[d.file], R.TtyFile) for t in tasks for d in t.fds)
    tty = _tty_fd()
    if has_tty and tty is None:
        res.warnings.append("the process used a terminal and crrestart has none: "
                            "its terminal fds now point to /dev/null")
    shell_job = has_tty and tty is not None
    plans: dict[int, ChildPlan] = {}
    extras_of: dict[int, list] = {}
    shared_ids = shared_anon_ids(tasks)
    plan_premaps(tasks)    # memory shared copy-on-write by parents and children
    fdt_groups: dict[int, list[R.TaskNote]] = {}     # fd tables shared (CLONE_FILES)
    for t in tasks:
        if t.fdt:
            fdt_groups.setdefault(t.fdt, []).append(t)
    for t in tasks:
        target_fds = [d.fd for d in t.fds]
        group = fdt_groups.get(t.fdt, [t])
        if len(group) > 1:
            # one table: the owner places the mapped files of all of them
            # (restorer/tree.py); the same fd numbers for every member
            target_fds = [d.fd for g in group for d in g.fds]
            t_all = replace(group[0], mappings=[m for g in group for m in g.mappings])
            extras_of[t.pid] = plan_extras(t_all, max(target_fds + [2]) + 1, shared_ids)
        else:
            extras_of[t.pid] = plan_extras(t, max(target_fds + [2]) + 1, shared_ids)
        plans[t.pid] = ChildPlan(
            task=t, files=sf.files, statefile=os.path.abspath(path), blobs=blobs, sf=sf,
            extras=extras_of[t.pid], tty_fd=tty if has_tty else None,
            shell_job=shell_job and t is sf.root, force_files=opts.force_files,
            in_pidns=pidns, tree_pids=frozenset(x.pid for x in tasks))
    plan_ctty(tasks, sf.files, plans)   # session leaders take their pty again
    assign_locks(sf)                    # which task takes each lock, lease, SIGIO owner
    root, order = plan_tree(tasks, sf.header.zombies, plans,
                            root_keeps_session=shell_job)
    res.planned = True
    # Before anything exists: the guard (restorer/release/guard.py) undoes the restore
    # if crrestart dies before the release, and keeps lazy memory safe after.
    g = Guard(path)
    # Every task is born in a cgroup with a freezer, so the release is atomic
    # (restorer/release/freezer.py); None without root or a writable freezer.
    fz = freezer.find()
    if fz is not None:
        g.freezer(fz)
        if not freezer.make(fz, log):
            fz = None
            g.thawed()
    # Without a freezer, the release gate (restorer/release/gate.py) makes it atomic:
    # every task inherits the read end of a pipe whose only write end is ours.
    gate_r = gate_w = -1
    if fz is None and gate.wanted():
        gate_r, gate_w = gate.make()
        for t in tasks:
            ex = extras_of[t.pid]
            ex.append(ExtraOpen("gate", "", os.O_RDONLY, gate.extra_fd(ex), shared=gate.GATE_ID))
    status_r, status_w = os.pipe()
    rel_r = rel_w = ack_r = ack_w = -1      # the release handshake with a --pidns init
    created: list[int] = []
    trs: list[TaskRestorer] = []
    shared: dict[int, int] = {}
    ipc = SharedIPC(sf)
    objs = SharedObjects(sf)
    ns = Namespaces(sf)
    live = None               # the tree's TCP connections (restorer/restore/tcp.py)
    try:
        # --- the tree's own UTS/IPC namespaces, shared resources, the tree with its pids --
        _journal_task_paths(sf, g)
        ns.enter()                # the SysV objects below are created inside it
        shared = open_shared(sf.files, tasks, plans[root.pid], res.warnings)
        if gate_r >= 0:
            shared[gate.GATE_ID] = gate_r
            gate_r = -1           # (closed with `shared`)
        ipc.create_sysv()
        shared.update(ipc.create_memfds(shared_ids))
        shared.update(ipc.object_fds(shared_ids, ipc.memfds))   # fds of those objects
        ipc.memfds = {}           # closed with `shared`
        shared.update(objs.create())   # memfds, shared deleted/tmpfs files (restore_memfd)
        shared.update(restore_pidfd.corpses(sf.files, tasks))   # pidfds of exited processes
        if fz is not None:
            try:
                fz.join()         # the root is born in it, and every task after it
            except OSError as e:
                log(f"no release freezer: {e.strerror}")
                fz.remove()
                fz = None
                g.thawed()
        if own_pidns:
            # the root itself is pid 1 of the new namespace (crrestart's child)
            try:
                own_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                unshare(CLONE_NEWPID)
                child = fork_with_pid(1)
            except OSError as e:
                raise RestoreError("pid namespace", f"cannot create the tree's pid namespace "
                                   f"({e.strerror})") from None
            if child == 0:
                os.close(status_r)
                task_main(root, status_w, shared, g.me)
            if lazy:
                children_back_in_own_pidns(own_ns)    # (the lazy server is a thread)
            else:
                os.close(own_ns)
            created.append(child)
            g.task(child)
        elif pidns:
            if unpriv:
                try:
                    _enter_user_pidns()
                except OSError as e:
                    raise RestoreError("user namespace", f"{e} (unprivileged restore needs "
                                       "user namespaces)") from None
            else:
                own_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                unshare(CLONE_NEWPID)
            rel_r, rel_w = os.pipe2(os.O_CLOEXEC)
            ack_r, ack_w = os.pipe2(os.O_CLOEXEC)
            init = os.fork()
            if init == 0:
                os.close(status_r)
                _init_main(root, status_w, shared, g.me, (rel_r, ack_w))
            if not unpriv and lazy:
                children_back_in_own_pidns(own_ns)    # (the lazy server is a thread)
            elif not unpriv:
                os.close(own_ns)
            created.append(init)
            g.task(init)
            close_all((rel_r, ack_w))
            res.init_pid = init
        else:
            try:
                child = fork_pid_waiting_zombie(root.pid)
            except OSError as e:
                if e.errno == 17:
                    raise RestoreError("pid", f"pid {root.pid} is in use by another process "
                                       "(--pidns restores into a new pid namespace)") from None
                raise RestoreError("pid", f"cannot create pid {root.pid}: "
                                   f"{e.strerror}") from None
            if child == 0:
                os.close(status_r)
                task_main(root, status_w, shared, g.me)
            created.append(child)
            g.task(child)
        if fz is not None:
            fz.leave()            # crrestart itself is never frozen
        close_all(shared)     # else a reader would never see EOF
        shared = {}
        os.close(status_w)
        status_w = -1
        msg = read_status(status_r)
        end_dead_procs()          # every task entered its dead /proc directories
        if msg != "OK":
            if msg.startswith("ERR "):
                step, _, what = msg[4:].partition(": ")
                raise RestoreError(step, what)
            raise RestoreError("setup", f"the new task died before it was ready ({msg!r})")
        # --- barrier 1: every task is parked -------------------------------------------------
        if own_pidns:
            rpids = {1: created[0], **host_pids(created[0])}
        else:
            rpids = host_pids(res.init_pid) if pidns else {n.pid: n.pid for n in order}
        missing = [n.pid for n in order if n.pid not in rpids]
        if missing:
            raise RestoreError("tree", f"cannot find the restored task(s) {missing}")
        created[0:0] = [rpids[n.pid] for n in order if rpids[n.pid] not in created]
        res.pid = rpids[root.pid]
        res.pids = {n.pid: rpids[n.pid] for n in order}
        for n in order:
            g.task(rpids[n.pid])
        res.timings["fork+files"] = time.perf_counter() - t0
        # --- every task rebuilt by injection ---------------------------------------------------
        last_of_fdt = {n.task.fdt: n.pid for n in order if n.task.fdt}
        for n in order:
            fds = {e.key: e.fd for e in extras_of[n.pid]}
            tr = TaskRestorer(sf, n.task, rpids[n.pid], fds, lazy=lazy, log=log)
            if last_of_fdt.get(n.task.fdt, n.pid) != n.pid:
                tr.keep_fds = True      # one fd table: the last of its tasks closes them
            tr.pids = res.pids        # (its fds on the tree's /proc files)
            trs.append(tr)
            tr.run()
            res.warnings += tr.warnings
        ipc.finish()              # every task attached its SysV segments
        objs.finish()             # every task mapped its memfds: the late seals
        # --- barrier 2: release them all at once -----------------------------------------------
        if rel_w >= 0:
            # the init stops depending on crrestart first (else it would die
            # with a crrestart killed just after the release, and the tree too)
            os.write(rel_w, b"R")
            if os.read(ack_r, 1) != b"A":
                raise RestoreError("pid namespace", "the namespace's init died")
        for tr in trs:
            if tr.lazy_server is not None:
                g.served(tr.rpid)   # from now on the guard keeps its lazy memory safe
        t_rel = time.perf_counter()
        for tr in trs:
            if tr.task.group_stopped:
                tr.release_stopped()    # stopped again before anything of the tree runs
        if fz is not None:
            try:
                fz.freeze()
            except OSError as e:
                raise RestoreError("release", f"cannot freeze the tree for its release: {e}") \
                    from None
        live = restore_tcp.Live(sf, res.pids)
        live.go_live()            # out of repair mode before anything of the tree runs
        gated = sum(len(tr.gate) for tr in trs)
        if gate_w >= 0:
            g.gate(gate_w, gated)     # (after "released", the guard opens it if we die)
        for tr in trs:
            tr.release()
            _die_here("detach", g)
        g.commit()
        _die_here("commit")
        if gate_w >= 0:
            gate.open_gate(gate_w, gated)   # the tree runs from this one write
            g.gate_open()
            os.close(gate_w)
            gate_w = -1
        if fz is not None:
            try:
                fz.thaw()         # all of the tree runs from this one write
            except OSError:
                pass              # (moving them home below thaws them one by one)
        res.timings["release"] = time.perf_counter() - t_rel   # (docs/RESTORE.md)
        res.warnings += live.lift()   # the connections' firewall lock (docs/NETWORK.md)
        if fz is not None:
            _die_here("home")
            fz.move_home()        # back into crrestart's cgroup, the crelf one removed
            fz = None
            g.thawed()
        if not lazy:
            g.forget()            # (it exits on reading the commit)
        for tr in trs:
            for k, v in tr.timings.items():
                res.timings[k] = res.timings.get(k, 0) + v
            res.bytes_copied += tr.mem.bytes_written
        res.lazy_server = trs[0].lazy_server
        from restorer.injector import RestoreInjector
        res.injections = RestoreInjector.count
    except BaseException:
        close_all(shared)
        if fz is not None:
            try:
                fz.leave()
            except OSError:
                pass
            fz.kill_all()     # (a frozen task dies only once thawed)
        end_dead_procs()
        if live is not None:
            live.abort()          # repair mode again: killing them sends nothing
        for tr in trs:
            tr.kill()
        for pid in created:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in created:
            pt.wait_exit(pid)  # traced, or our child
        close_all((gate_r, gate_w))   # (only now: end-of-file would let gated tasks run)
        ipc.remove()          # the SysV objects created for the tree
        objs.remove()         # and the memfds, the tmpfs files recreated
        g.abort()             # all undone here: the guard has nothing left to do
        failed = [tr.lazy_server for tr in trs
                  if tr.lazy_server is not None and tr.lazy_server.error is not None]
        if failed:            # the cause of what failed after it (the task was killed)
            raise failed[0].as_error() from None
        raise
    finally:
        ns.leave()                # the tasks stay in the new namespaces
        os.close(status_r)
        close_all(fd for fd in (status_w, rel_w, ack_r) if fd >= 0)
    res.restore_seconds = time.perf_counter() - t0
    return res


def wait_root(res: Result) -> int:
    """Foreground: wait for the restored root (or the namespace's init) and
    return its exit code (128+N when killed by signal N).  SIGINT, SIGTERM and
    SIGHUP sent to crrestart are passed on to the restored process (unless it
    shares our process group and so got them from the terminal already)."""
    pid = res.init_pid or res.pid

    def forward(sig, _frame):
        try:
            if os.getpgid(res.pid) != os.getpgrp() or sig != signal.SIGINT:
                os.kill(res.pid, sig)
        except OSError:
            pass
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, forward)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


__all__ = ["Options", "Result", "restore", "wait_root", "RestoreError", "sys"]
