"""Checkpoint a process tree: freeze, gather every task's state, check it
against the support table and the policy, write, thaw."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone

import msgspec

from statefile import FORMAT_VERSION, __version__, hooks
from statefile.dump import fdt as dump_fdt, ns as dump_ns, tcp as dump_tcp, tty as dump_tty
from statefile.check import flags, support
from statefile.control import procfs, snapshot
from statefile.format import notes as nt, records, xsave
from statefile.dump.files import FileTable
from statefile.dump.memfd import collect as collect_shmem
from statefile.dump.memory import PAGE, dump_mappings, mark_cow
from statefile.dump.task import dump_task
from .errors import CrelfError, TargetError
from statefile.control.freeze import Freezer, check_target
from statefile.check.crcheck import SurveyTask
from statefile.check.policy import Policy
from statefile.format.writer import StatefileWriter


class NotCheckpointable(CrelfError):
    """The tree holds resources crelf cannot restore and no policy covers them."""

    exit_code = 6

    def __init__(self, pid: int, bad: list[support.Finding]):
        self.findings = bad
        lines = [f"pid {pid} cannot be checkpointed ({len(bad)} problem(s); "
                 "nothing was written, the tree runs on):"]
        lines += [f"  CR: {f.line()}" for f in bad]
        super().__init__("\n".join(lines))


def _apply_policy(policy: Policy, findings, tasks, plans_by_task,
                  files: FileTable) -> list[records.Skipped]:
    """Carry out what the policy skips; return the CR_HEADER "skipped" list."""
    skipped = []
    for f in findings:
        if not f.skipped:
            continue
        skipped.append(records.Skipped(what=f.detail, where=f.where, why=f.policy, key=f.key))
        if f.key.startswith("fd:"):
            task = next(t for t in tasks if t.pid == f.pid)
            fd = int(f.where.rsplit(" ", 1)[1])
            entry = files.files[next(d.file for d in task.fds if d.fd == fd)]
            entry.skipped = f.policy
            if f.key == "fd:deleted":   # (its content is its object's: statefile/dump/memfd.py)
                holder = entry if entry.shmem is None else files.shmem[entry.shmem]
                if holder.blob is not None:
                    blob = files.blobs[holder.blob]
                    blob.store, blob.runs = False, []
    if "scratch" in policy.skip:
        for task, plans in zip(tasks, plans_by_task):
            for m in task.mappings:
                if support.is_scratch(m):
                    m.skipped = "scratch"
                    for j in m.segments:
                        plans[j].store = False
                        plans[j].runs = []
    return skipped


def _records(n_type: int, obj):
    """The typed record of what the dump side built (statefile/format/records.py),
    checked before anything is written."""
    try:
        return nt.record_of(n_type, obj)
    except msgspec.ValidationError as e:
        raise CrelfError(f"internal error: a record does not fit the statefile format: "
                         f"{e}") from None


def _traced_tasks(freezer: Freezer, files: FileTable) -> list[dict]:
    """The tasks another tracer holds (statefile/control/freeze.py left them running),
    surveyed from /proc like crcheck does, so that the refusal names them and
    every other reason too (crcheck.SurveyTask.of types them)."""
    from statefile.check.crcheck import survey_task
    out = []
    for pid, (tracer, comm) in freezer.traced.items():
        try:
            t = survey_task(pid, files)
        except (FileNotFoundError, ProcessLookupError):
            continue
        t["tracer"], t["tracer_comm"] = tracer, comm
        t["crrun_flags"] = flags.read(pid)
        out.append(t)
    return out


def _make_snapshots(freezer: Freezer, tasks: list[records.TaskNote]) -> dict[int, int]:
    """A copy-on-write snapshot per task; {} (copy while frozen) if one fails."""
    snaps: dict[int, int] = {}
    try:
        for t in tasks:
            ft = freezer.tasks[t.pid]
            leader = t.pid if t.pid in ft.threads else min(ft.threads)
            if t.group_stopped:
                raise OSError(0, f"pid {t.pid} is stopped: its helper thread would stop too")
            snaps[t.pid] = snapshot.fork_snapshot(leader, ft.gadgets, t.pid)
    except OSError:
        _release_snapshots(snaps)
        return {}
    return snaps


def _release_snapshots(snaps: dict[int, int]) -> None:
    for child in snaps.values():
        snapshot.release_snapshot(child)
    snaps.clear()


def _hooks_before(pid: int, timeout: float) -> list[int]:
    """Tell every task that opted in (hooks/crelf_hooks.*) that a checkpoint is
    coming, and wait for each to be ready; return the pids told."""
    told: list[int] = []
    try:
        for p in procfs.descendants(pid):
            if not hooks.has_hooks(p):
                continue
            try:
                reply = hooks.notify(p, "checkpoint", timeout)
            except hooks.HookError as e:
                # It got the event and may still be preparing: tell it to
                # resume (the line waits in its socket until its hook returns;
                # no need to wait for the answer).
                _hooks_after([p], min(timeout, 0.5))
                raise hooks.HookError(f"{e}; nothing was written") from None
            if reply is None:
                continue
            told.append(p)
            if reply != "ok":
                raise hooks.HookError(f"pid {p}: its checkpoint hook failed ({reply}); "
                                      "nothing was written")
    except BaseException:
        _hooks_after(told, timeout)
        raise
    return told


def _hooks_after(told: list[int], timeout: float) -> None:
    for p in told:
        try:
            hooks.notify(p, "resume", timeout)
        except (hooks.HookError, OSError):
            pass


def checkpoint(pid: int, output: str, *, kill: bool = False, fsync: bool = False,
               policy: Policy | None = None, progress=None, cow: bool = True,
               hook_timeout: float = 10.0) -> dict:
    """Write the statefile of the tree rooted at pid; return a summary.

    With `cow` (the default when the tree runs on), the tree is released as
    soon as copy-on-write snapshots of its tasks exist, and its memory is
    written from them while it runs (statefile/control/snapshot.py).
    """
    policy = policy or Policy()
    check_target(pid)
    writer = StatefileWriter(output, fsync=fsync)
    freezer = Freezer(pid)
    snaps: dict[int, int] = {}
    addrs: dict[int, int] = {}
    told: list[int] = []
    t_start = time.monotonic()
    t_thawed = None

    def thaw():
        nonlocal t_thawed
        dump_tcp.release()      # TCP connections out of repair mode, unlocked
        freezer.thaw()
        t_thawed = time.monotonic()

    files = FileTable()
    dump_tcp.begin()            # connections met are locked and read in repair mode
    try:
        told = _hooks_before(pid, hook_timeout)
        freezer.freeze()
        t_frozen = time.monotonic()
        # Before any syscall is run in a task: threads that one would kill
        unsafe = support.seccomp_findings(freezer.all_tids()) + \
            support.vdso_findings(freezer.tasks)
        if unsafe:
            raise NotCheckpointable(pid, unsafe)
        tasks, regs, plans_by_task = [], [], []
        order = [p for p in procfs.descendants(pid) if p in freezer.tasks]
        for p in order:
            try:
                task, task_regs = dump_task(freezer.tasks[p], files)
                maps, plans = dump_mappings(p)
            except (FileNotFoundError, ProcessLookupError):
                raise TargetError(f"pid {p} vanished during the checkpoint") from None
            except PermissionError as e:
                raise TargetError(f"pid {p}: reading its state: {e.strerror}"
                                  + (f" ({e.filename})" if e.filename else "")
                                  + (" (run crcheckpoint as root or as the task's user)"
                                     if os.geteuid() else "")) from None
            task["mappings"] = maps
            tasks.append(task)
            regs += task_regs
            plans_by_task.append(plans)
        files.scm.resolve(files)                      # fds in flight in unix sockets
        dump_fdt.mark_groups(tasks)                   # fd tables shared (CLONE_FILES)
        mark_cow(tasks, plans_by_task)                # pages shared with the parent since fork
        zombies = [records.Zombie(pid=z["pid"], ppid=z["ppid"], pgid=z["pgid"], sid=z["sid"],
                                  comm=z["comm"], exit_code=z["exit_code"])
                   for z in freezer.zombies.values()]

        for t in tasks:
            t["crrun_flags"] = flags.read(t["pid"])  # what crrun saw being created
        namespaces = dump_ns.dump_namespaces(tasks)   # before assess: it may refuse them
        ipc = dump_ns.dump_ipc_objects(tasks)         # inside the tree's IPC namespace
        shmem = collect_shmem(tasks, files, policy.dump_tmpfs)   # memfds, shared files
        traced = _traced_tasks(freezer, files)
        support.decide(tasks + traced, files.files)   # terminals, pipes: before the records
        # From here on, records (statefile/format/records.py): what is assessed
        # and written is what the restart reads.
        tasks = [_records(nt.CR_TASK, t) for t in tasks]
        traced = [SurveyTask.of(t) for t in traced]
        files_note = _records(nt.CR_FILES, {"files": files.files, "shmem": shmem})
        files.files, files.shmem = files_note.files, files_note.shmem
        ipc = _records(nt.CR_IPC, ipc) if ipc is not None else None
        findings = support.assess(tasks + traced, files.files, zombies, {}, policy.skip,
                                  ipc, files.shmem)
        skipped = _apply_policy(policy, findings, tasks, plans_by_task, files)
        bad = support.problems(findings)
        # A snapshot-only statefile is for debugging: never kill the tree for one.
        # A task traced by another tracer was not frozen: nothing to snapshot.
        if bad and (kill or not policy.snapshot or freezer.traced):
            raise NotCheckpointable(pid, bad)
        if not bad:
            # bytes queued in the tree's pseudo-terminals: read, and put back at once
            late = [support.finding("fd:pty-unread", f.owner_pid,
                                    f"pid {f.owner_pid} fd {f.owner_fd}", detail)
                    for f, detail in dump_tty.save_queues(tasks, files.files)]
            if late:
                raise NotCheckpointable(pid, late)
        if policy.dump_tmpfs:
            files.dump_tmpfs_contents()

        # Segment order: the root task (PT_LOAD), the other tasks, then blobs.
        segments = []
        for task, plans in zip(tasks, plans_by_task):
            base = 1 + len(segments)  # phdr 0 is PT_NOTE
            for m in task.mappings:
                m.segments = [base + j for j in m.segments]
            segments += plans
        for o in [*files.files, *files.shmem]:
            if o.blob is not None:
                o.blob = 1 + len(segments) + o.blob
        segments += files.blobs
        uname = os.uname()
        header = _records(nt.CR_HEADER, {
            "format": FORMAT_VERSION, "crelf": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_unix": time.time(), "host": socket.gethostname(),
            "kernel": uname.release, "machine": uname.machine, "page_size": PAGE,
            "root_pid": pid,
            "tree": [records.TreeEntry(pid=t.pid, ppid=t.ppid) for t in tasks],
            "zombies": zombies,
            "checkpoint_uid": os.geteuid(),
            "policy": policy.record(),
            "skipped": skipped,
            "restartable": not bad,
            "not_restartable": [f.line() for f in bad],
            "leave_running": not kill,
            "namespaces": namespaces,
            "xsave_layout": xsave.header_layout(r.xstate for r in regs),
        })
        if cow and not kill:
            addrs = {p: ft.syscall_addr for p, ft in freezer.tasks.items()}
            snaps = _make_snapshots(freezer, tasks)
        header.copy_on_write = bool(snaps)
        stats = writer.write(header=header, tasks=tasks, regs=regs, files=files_note,
                             segments=segments, progress=progress,
                             snapshots=snaps, thaw=thaw if snaps else None, ipc=ipc,
                             syscall_addrs=addrs if snaps else None)
    except BaseException:
        # Nothing is lost: no half-written file, the tree runs on.
        files.scm.close()
        writer.abort()
        dump_tcp.release()
        freezer.thaw()
        _release_snapshots(snaps)
        _hooks_after(told, hook_timeout)
        raise
    files.scm.close()      # crcheckpoint's fds of the files in flight (dump_scm)
    t_written = time.monotonic()
    if t_thawed is None:
        dump_tcp.release(keep=kill)   # (--kill: in repair mode, they die silently)
        freezer.thaw(kill=kill)
        t_thawed = time.monotonic()
    dump_tcp.hand_over(output)  # --kill: the lock waits for crrestart (docs/NETWORK.md)
    _release_snapshots(snaps)
    t_end = time.monotonic()
    if not kill:
        _hooks_after(told, hook_timeout)
    return {
        "statefile": os.path.abspath(output), "root_pid": pid,
        "pids": [t.pid for t in tasks],
        "threads": sum(len(t.threads) for t in tasks),
        "killed": kill,
        "hooks_told": told,
        "restartable": not bad,
        "not_restartable": [f.line() for f in bad],
        "skipped": [msgspec.to_builtins(s) for s in skipped],
        "bytes_stored": stats["bytes_stored"], "file_size": stats["file_size"],
        "bytes_written_by_snapshots": stats["bytes_written_by_snapshots"],
        "segments": stats["segments"],
        "copy_on_write": header.copy_on_write,
        "frozen_seconds": round(t_thawed - t_frozen, 6),
        "freeze_seconds": round(t_frozen - t_start, 6),
        "write_seconds": round(t_written - t_frozen, 6),
        "total_seconds": round(t_end - t_start, 6),
    }
