"""One task: identity, credentials, limits, fs context, mm fields, threads.

Signals live in statefile/dump/signals.py, memory in statefile/dump/memory.py, fds in
statefile/dump/files.py; this module gathers the rest and drives the injected syscalls.
Restored by restorer/restore/task.py.
"""

from __future__ import annotations

import os
import resource
import struct

from statefile.dump import attrs as dump_attrs, signals as dump_signals
from statefile.control import procfs, snapshot
from statefile.format import elfcore as ec
from statefile.control import ptrace as pt
from statefile.errors import TargetError
from statefile.control.freeze import FrozenTask
from statefile.control.inject import Injector
from statefile.control.wayback import NoWayBack, find_gadgets
from statefile.format.notes import ThreadRegs

RLIMITS = ("cpu", "fsize", "data", "stack", "core", "rss", "nproc", "nofile", "memlock",
           "as", "locks", "sigpending", "msgqueue", "nice", "rtprio", "rttime")
ERESTART = {512: "ERESTARTSYS", 513: "ERESTARTNOINTR", 514: "ERESTARTNOHAND",
            516: "ERESTART_RESTARTBLOCK"}


def _creds(status: dict) -> dict:
    ids = lambda k: [int(x) for x in status[k].split()]  # noqa: E731
    return {
        "uid": ids("Uid"), "gid": ids("Gid"), "groups": ids("Groups") if status.get("Groups") else [],
        "cap_inh": int(status["CapInh"], 16), "cap_prm": int(status["CapPrm"], 16),
        "cap_eff": int(status["CapEff"], 16), "cap_bnd": int(status["CapBnd"], 16),
        "cap_amb": int(status.get("CapAmb", "0"), 16),
        "no_new_privs": int(status.get("NoNewPrivs", "0")),
        "seccomp": int(status.get("Seccomp", "0")),
    }


def _rlimits(pid: int) -> dict:
    try:
        return {name: list(resource.prlimit(pid, i)) for i, name in enumerate(RLIMITS)}
    except PermissionError:
        # prlimit() of another user's task needs CAP_SYS_RESOURCE, which root
        # in a container may lack; /proc/PID/limits has the same numbers.
        return _proc_limits(pid)


def _proc_limits(pid: int) -> dict:
    rows = procfs.read(f"/proc/{pid}/limits").splitlines()[1:]
    if len(rows) < len(RLIMITS):
        raise TargetError(f"pid {pid}: cannot read its resource limits")

    def val(s: str) -> int:
        return resource.RLIM_INFINITY if s == "unlimited" else int(s)
    out = {}
    for name, row in zip(RLIMITS, rows):   # the kernel prints them in RLIMIT_* order
        soft, hard = row[26:47].split()[0], row[47:68].split()[0]
        out[name] = [val(soft), val(hard)]
    return out


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def dump_thread_regs(pid: int, tid: int) -> ThreadRegs:
    regs = pt.getregset(tid, ec.NT_PRSTATUS, 216)
    fp = pt.getregset(tid, ec.NT_PRFPREG, ec.FXSAVE_SIZE)
    try:
        xs = pt.getregset(tid, ec.NT_X86_XSTATE, 1 << 16)
    except OSError:
        xs = b""
    return ThreadRegs(pid, tid, regs, fp, xs)


def _in_syscall(regs: ec.user_regs_struct) -> dict | None:
    orig = regs.orig_rax
    if orig >= 2**63:
        return None
    rax = regs.rax - 2**64 if regs.rax >= 2**63 else regs.rax
    return {"nr": orig, "restart": ERESTART.get(-rax, "")}


def dump_task(ft: FrozenTask, file_table) -> tuple[dict, list[ThreadRegs]]:
    pid = ft.pid
    s = procfs.stat(pid)
    status = procfs.status(pid)
    task: dict = {
        "pid": pid, "tgid": int(status["Tgid"]), "ppid": s["ppid"], "pgid": s["pgid"],
        "sid": s["sid"], "comm": s["comm"], "state": ft.state_before,
        "group_stopped": any(t.group_stop for t in ft.threads.values()),
        "stop_signal": next((t.stop_signal for t in ft.threads.values() if t.group_stop), 0),
        "nice": s["nice"], "flags": s["flags"], "exit_signal": s["exit_signal"],
        "tty_nr": s["tty_nr"],
        "cmdline": [a.decode(errors="surrogateescape") for a in
                    procfs.read_bytes(f"/proc/{pid}/cmdline").split(b"\0")[:-1]],
        "environ_size": len(procfs.read_bytes(f"/proc/{pid}/environ")),
        "exe": _readlink(f"/proc/{pid}/exe"),
        "cwd": _readlink(f"/proc/{pid}/cwd"), "root": _readlink(f"/proc/{pid}/root"),
        "umask": int(status.get("Umask", "0022"), 8),
        "personality": int(procfs.read(f"/proc/{pid}/personality").strip() or "0", 16),
        "creds": _creds(status), "rlimits": _rlimits(pid),
        "crrun": procfs.crrun_monitored(pid),
        "auxv": procfs.read_bytes(f"/proc/{pid}/auxv").hex(),
        "mm": {k: s[k] for k in ("start_code", "end_code", "start_data", "end_data",
                                  "start_brk", "start_stack", "arg_start", "arg_end",
                                  "env_start", "env_end")},
        "namespaces": {ns: _readlink(f"/proc/{pid}/ns/{ns}")
                       for ns in ("pid", "ipc", "uts", "mnt", "net", "user", "cgroup", "time")},
        "posix_timers": sum(1 for line in procfs.read(f"/proc/{pid}/timers").splitlines()
                            if line.startswith("ID:")),
        "threads": [],
    }
    exe_stat = os.stat(f"/proc/{pid}/exe") if task["exe"] else None
    if exe_stat:
        task["exe_id"] = {"dev": exe_stat.st_dev, "ino": exe_stat.st_ino,
                          "size": exe_stat.st_size, "mtime_ns": exe_stat.st_mtime_ns}
    # Registers first: injection below changes them (and puts them back).
    regs = {tid: dump_thread_regs(pid, tid) for tid in ft.threads}
    maps0 = procfs.maps(pid)
    leader = pid if pid in ft.threads else min(ft.threads)
    memfd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
    try:
        gadgets = ft.gadgets = find_gadgets(pid, maps0)
        ft.syscall_addr = gadgets.syscall
        snapshot.take_back_leftovers(pid, memfd, gadgets, list(regs.values()))
        # Every injection carries its own way back (statefile/control/wayback.py):
        # its data lives on the thread's own stack, under the red zone, so
        # nothing is mapped into the task that could outlive crcheckpoint.
        with Injector(leader, gadgets, memfd) as inj:
            scratch = inj.scratch
            task["mm"]["brk"] = inj.check("brk", 0)
            task["prctl"] = _dump_prctl(inj, scratch)
            task["attrs"] = dump_attrs.process_attrs(pid, inj)
            task["sigactions"] = dump_signals.dump_sigactions(inj, scratch)
            task["itimers"] = dump_signals.dump_itimers(inj, scratch)
            task["signals"] = dump_signals.dump_process_signals(pid, leader)
            for tid in sorted(ft.threads, key=lambda t: (t != pid, t)):
                th = _dump_thread(pid, tid, regs[tid], inj if tid == leader else None,
                                  gadgets, memfd, ft.threads[tid].deferred)
                task["threads"].append(th)
            ft.threads[leader].deferred += inj.deferred
    except NoWayBack as e:
        raise TargetError(f"{e.strerror}: crelf cannot safely run a syscall in it "
                          "(docs/CRASHSAFE.md)") from None
    finally:
        os.close(memfd)
    # Signals that arrived during the injections are delivered on thaw.
    for th in task["threads"]:
        th["deferred_signals"] = list(ft.threads[th["tid"]].deferred)
    _thread_creds(pid, task)
    task["fds"] = file_table.dump_fds(pid)
    file_table.dump_cwd(task)      # a removed working directory (statefile/dump/files.py)
    if file_table.task_locks.get(pid):
        task["locks"] = file_table.task_locks[pid]   # POSIX locks (statefile/dump/locks.py)
    return task, list(regs.values())


def _thread_creds(pid: int, task: dict) -> None:
    """Credentials are per thread (a raw setresuid/capset syscall changes only
    the calling one; glibc's wrappers change them all): a thread whose
    credentials or securebits differ from the leader's keeps its own in
    `creds` (the task's `creds` are the leader's)."""
    sb = (task.get("attrs") or {}).get("securebits")
    for th in task["threads"]:
        c = _creds(procfs.status(pid, th["tid"]))
        tsb = th.pop("securebits", sb)
        if c != task["creds"] or tsb != sb:
            if tsb is not None:
                c["securebits"] = tsb
            th["creds"] = c


def _dump_prctl(inj: Injector, scratch: int) -> dict:
    """Process attributes only prctl reads: the child-subreaper flag (a
    restarted subreaper must adopt orphans again) and the leader's
    parent-death signal."""
    out = {}
    for key, op in (("child_subreaper", 37), ("pdeathsig", 2)):  # PR_GET_CHILD_SUBREAPER, PR_GET_PDEATHSIG
        inj.check("prctl", op, scratch, 0, 0, 0)
        out[key] = struct.unpack("<i", inj.read(scratch, 4))[0]
    return out


def _dump_thread(pid, tid, regs: ThreadRegs, inj, gadgets, memfd, deferred) -> dict:
    s = procfs.stat(pid, tid)
    r = regs.user_regs()
    th = {"tid": tid, "comm": s["comm"],
          "utime": s["utime"], "stime": s["stime"],
          "fs_base": r.fs_base, "gs_base": r.gs_base, "syscall": _in_syscall(r)}
    th.update(dump_signals.dump_thread_signals(pid, tid))
    th["attrs"] = dump_attrs.thread_attrs(pid, tid)
    if inj is not None:
        th["sigmask"] = inj.sigmask     # its injections block every signal meanwhile
    head, ln = pt.get_robust_list(tid)
    th["robust_list"] = {"head": head, "len": ln}
    th["rseq"] = pt.rseq_configuration(tid)

    def per_thread(i: Injector):
        i.check("prctl", 40, i.scratch, 0, 0, 0)  # PR_GET_TID_ADDRESS
        th["clear_child_tid"] = struct.unpack("<Q", i.read(i.scratch, 8))[0]
        th["sigaltstack"] = dump_signals.sigaltstack_of(i.altstack)
        sb = i.call("prctl", 27, 0, 0, 0, 0)    # PR_GET_SECUREBITS (per thread)
        if sb >= 0:
            th["securebits"] = sb               # moved into `creds` by _thread_creds
    if inj is not None:
        per_thread(inj)
    else:
        with Injector(tid, gadgets, memfd) as i:
            per_thread(i)
        deferred += i.deferred
    return th
