"""Restore one task (any number of threads) into a parked, restorer-forked
process: everything after the task set up its own files is done here, from the
tracer, by ptrace and injected syscalls."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time

from statefile.format import elfcore as ec, records as R
from statefile.control import procfs
from statefile.control import ptrace as pt
from statefile.control.inject import InjectError, find_syscall_insn

from restorer.release import gate
from restorer.restore import aio as restore_aio, locks as restore_locks, pidfd as restore_pidfd
from restorer.restore import attrs as ra
from restorer.restore import signals as rs
from restorer.errors import RestoreError
from restorer.injector import RestoreInjector
from restorer.kernel import (ERESTART_RESTARTBLOCK, ERESTARTNOHAND, ERESTARTNOINTR, ERESTARTSYS,
                             MAP_ANONYMOUS, MAP_PRIVATE, NR, PAGE, PR_CAPBSET_DROP,
                             PR_SET_KEEPCAPS, PR_SET_CHILD_SUBREAPER, PR_SET_MM, PR_SET_MM_MAP,
                             PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, PR_CAP_AMBIENT,
                             PR_CAP_AMBIENT_CLEAR_ALL, PR_CAP_AMBIENT_RAISE, PROT_READ, PROT_WRITE,
                             RSEQ_FLAG_UNREGISTER, THREAD_FLAGS, TIMER_ABSTIME, clone_args,
                             prctl_mm_map)
from restorer.restore.files import open_late
from restorer.restore.memory import Memory, parse_maps

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
EINTR = 4
SCRATCH_PAGES = 4
ALL_SIGNALS = 2**64 - 1
PR_GET_SECUREBITS, PR_SET_SECUREBITS, SECBIT_KEEP_CAPS = 27, 28, 1 << 4
_FAIL_AT = os.environ.get("CRELF_RESTORE_FAIL_AT", "")


def _orphaned_group(pid: int) -> bool:
    """Is pid's process group orphaned (no member has a parent in another
    group of the same session)?  The kernel discards a SIGTSTP, SIGTTIN or
    SIGTTOU sent to a task of one, so such a task is stopped with SIGSTOP."""
    try:
        pgid, sid = os.getpgid(pid), os.getsid(pid)
    except OSError:
        return False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                st = f.read()
            fields = st[st.rindex(b")") + 2:].split()
            ppid, grp = int(fields[1]), int(fields[2])
            if grp != pgid:
                continue
            if os.getsid(ppid) == sid and os.getpgid(ppid) != pgid:
                return False
        except (OSError, ValueError):
            continue
    return True


def seize_stopped(tid: int, options: int) -> None:
    pt.seize(tid, options)
    pt.interrupt(tid)
    # A signal-delivery stop on the way is suppressed.
    if not pt.wait_interrupt_stop(tid):
        raise RestoreError("seize", f"task {tid} exited while being seized")


NR_POLL = 7


def fixup_restart(r: ec.user_regs_struct, sysinfo: R.Syscall | None) -> None:
    """Turn "stopped inside a syscall" into registers that re-enter it (NOTES.md:
    syscall-restart fixup; the kernel's own restart logic is disabled with
    orig_rax = -1)."""
    orig = r.orig_rax
    if orig < 2**63 and sysinfo is not None:
        rax = r.rax - 2**64 if r.rax >= 2**63 else r.rax
        if -rax in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
            r.rax, r.rip = orig, r.rip - 2
        elif -rax == ERESTART_RESTARTBLOCK:
            # The restart block is gone with the old task.  Sleeps wrote the time
            # left into their rem argument: sleep that long again.
            if orig == NR["nanosleep"] and r.rsi:
                r.rax, r.rip, r.rdi = orig, r.rip - 2, r.rsi
            elif orig == NR["clock_nanosleep"] and (r.rsi & TIMER_ABSTIME):
                r.rax, r.rip = orig, r.rip - 2
            elif orig == NR["clock_nanosleep"] and r.r10:
                r.rax, r.rip, r.rdx = orig, r.rip - 2, r.r10
            elif orig == NR_POLL and r.rdx & 0x80000000:
                # poll() without a timeout: the kernel restarts it unseen (a
                # program that blocks every signal, script(1), takes EINTR
                # for a fatal error), so enter it again.
                r.rax, r.rip = orig, r.rip - 2
            else:
                r.rax = (-EINTR) & (2**64 - 1)
    r.orig_rax = 2**64 - 1


def _status_caps(rpid: int, tid: int) -> dict:
    out = {}
    with open(f"/proc/{rpid}/task/{tid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def _collect_dead_tracee(tid: int) -> None:
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        try:
            if os.waitpid(tid, os.WNOHANG | 0x40000000)[0] == tid:   # __WALL
                return
        except ChildProcessError:
            return
        time.sleep(0.001)


class TaskRestorer:
    def __init__(self, sf, task: R.TaskNote, rpid: int, fds: dict[str, int],
                 lazy: bool = False, log=None):
        self.sf = sf
        self.task = task
        self.rpid = rpid                  # pid as the tracer sees it
        self.vpid = task.pid           # pid inside the task's namespace
        self.fds = fds
        self.lazy = lazy
        self.log = log or (lambda *a: None)
        self.step = "seize"
        self.tids: dict[int, int] = {}    # saved tid -> tracer-view tid
        self.memfd = -1
        self.scratch = 0
        self.timings: dict[str, float] = {}
        self.lazy_server = None
        self.keep_fds = False    # an fd table shared with a task restored later
        self.released = False
        self.gate: dict[int, tuple] = {}  # saved tid -> (its gate fd, stack pointer, buffer)
        self.gadgets = None
        self.warnings: list[str] = []     # (the restore's, said by crrestart)

    @property
    def step(self) -> str:
        return self._step

    @step.setter
    def step(self, value: str) -> None:
        self._step = value
        if _FAIL_AT and value == _FAIL_AT:
            # test hook: fail here, to prove nothing half-restored is left behind
            raise RestoreError(value, "failure injected by CRELF_RESTORE_FAIL_AT")

    def _t(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0) + t - t0
        return t

    def run(self) -> None:
        try:
            self._run()
        except InjectError as e:
            raise RestoreError(self.step, str(e)) from None
        except OSError as e:
            raise RestoreError(self.step, str(e)) from None

    def _run(self) -> None:
        task, rpid = self.task, self.rpid
        t = time.perf_counter()
        self.step = "seize"
        seize_stopped(rpid, pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_EXITKILL)
        self.tids[task.threads[0].tid] = rpid
        pt.setsigmask(rpid, ALL_SIGNALS)
        self.memfd = os.open(f"/proc/{rpid}/mem", os.O_RDWR | os.O_CLOEXEC)
        inj = RestoreInjector(rpid, find_syscall_insn(rpid, parse_maps(rpid)), self.memfd)
        self.inj = inj
        self.step = "inherited state"
        cfg = pt.rseq_configuration(rpid)
        if cfg and cfg["ptr"]:
            inj.check("rseq", cfg["ptr"], cfg["len"], RSEQ_FLAG_UNREGISTER, cfg["sig"])
        inj.check("set_robust_list", 0, 24)
        inj.call("set_tid_address", 0)
        t = self._t("seize", t)
        self.step = "vdso"
        mem = Memory(self.sf, task, self.memfd, self.fds)
        self.mem = mem
        mem.clear_and_move_vdso(inj, rpid)
        self.step = "mmap"
        anon = mem.map_all(inj, lazy=self.lazy)
        self.scratch = inj.check("mmap", 0, SCRATCH_PAGES * PAGE, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, 2**64 - 1, 0)
        for m in task.mappings:
            if m.kind == "aio":
                self.step = "aio"
                restore_aio.restore_ring(inj, m, self.scratch, PAGE)
        t = self._t("mmap", t)
        self.step = "memory"
        if self.lazy:
            from restorer.lazy import start_lazy
            mem.copy_all(skip_anon=True)
            # locked memory is resident anyway: copied now, not served on fault
            for m in task.mappings:
                if ra.locked(m) and (m.start, m.end) in anon:
                    anon.remove((m.start, m.end))
                    mem.copy_range(m, m.start, m.end)
            self.lazy_server = start_lazy(self, inj, anon)
        else:
            mem.copy_all()
        mem.finish(inj)
        t = self._t("memory", t)
        self.step = "vdso"
        mem.drop_vdso(inj, rpid)    # (a task that had unmapped its own)
        self.step = "mm (PR_SET_MM_MAP)"
        self._set_mm(inj)
        self.step = "proc files"
        open_late(inj, task, self.sf.files, self.scratch, getattr(self, "pids", {}))
        self.step = "process attributes"
        ra.process_state(inj, task)
        self.step = "xstate permissions"
        self._amx(inj)
        self.step = "signals"
        rs.restore_sigactions(inj, rpid, task, self.scratch)
        rs.restore_itimers(inj, task, self.scratch)
        self.step = "threads"
        injs = {task.threads[0].tid: inj}
        for th in task.threads[1:]:
            injs[th.tid] = self._clone_thread(inj, th)
        self.step = "pidfds"
        restore_pidfd.inject(inj, task, self.sf.files)
        self.step = "thread state"
        for th in task.threads:
            self._thread_state(injs[th.tid], th)
            ra.thread_loginuid(injs[th.tid], rpid, self.tids[th.tid], th, self.scratch)
        self.step = "pending signals"
        sig = task.signals
        rs.queue_signals(inj, self.vpid, None, sig.shared_pending, self.scratch)
        for th in task.threads:
            rs.queue_signals(injs[th.tid], self.vpid, th.tid, th.pending,
                             self.scratch)
        self.step = "file owners"   # SIGIO owners (with their uid/euid), before the creds
        restore_locks.set_owners(inj, task, self.sf.files, rpid, self.scratch + 3 * PAGE)
        self.step = "credentials"
        for th in task.threads:
            self._creds(injs[th.tid], th)
        self.step = "cleanup"
        # PR_SET_PDEATHSIG was SIGKILL while the tree was forked: the saved one
        # now (after the credentials, whose change clears it).
        pr = task.prctl
        inj.check("prctl", PR_SET_PDEATHSIG, pr.pdeathsig, 0, 0, 0)
        inj.check("prctl", PR_SET_CHILD_SUBREAPER, 1 if pr.child_subreaper else 0,
                  0, 0, 0)
        self.step = "scheduling"
        for th in task.threads:
            ra.thread_sched(self.tids[th.tid], th)
        ra.oom_score_adj(rpid, task)
        if "gate" in self.fds and not task.group_stopped:
            self.step = "release gate"
            self._gate_fds(inj)
        self.step = "cleanup"
        for fd in sorted(set(self.fds.values())) if not self.keep_fds else ():
            inj.call("close", fd)
        # POSIX locks only now: the closes above would drop them
        restore_locks.take_posix(inj, task, self.sf.files, self.scratch + 3 * PAGE)
        ra.dumpable(inj, task)      # (last: see there)
        inj.check("munmap", self.scratch, SCRATCH_PAGES * PAGE)
        self.scratch = 0
        t = self._t("state", t)
        self.step = "registers"
        for th in task.threads:
            self._registers(th)
        os.close(self.memfd)
        self.memfd = -1
        mem.close()
        self._t("registers", t)

    def release(self) -> None:
        """Detach every thread: the task runs from here (once: a stopped
        task is released ahead of the others, see release_stopped)."""
        if self.released:
            return
        self.released = True
        self.step = "detach"
        if self.task.group_stopped:
            # The signal that stopped it (a parent's waitid sees it again),
            # sent while every thread is still held: it is pending when they
            # resume, so the task stops before it runs a single instruction
            # (sent after the detach, a task blocked in read() on a pipe that
            # had data would read it and run on first).
            sig = self.task.stop_signal or signal.SIGSTOP
            if sig != signal.SIGSTOP and _orphaned_group(self.rpid):
                sig = signal.SIGSTOP    # (the kernel drops SIGTSTP/TTIN/TTOU there)
            try:
                os.kill(self.rpid, sig)
            except ProcessLookupError:
                pass        # killed by a task released before it (below)
        for vtid, rtid in sorted(self.tids.items(), key=lambda kv: kv[1] == self.rpid):
            try:
                pt.detach(rtid, 0)
            except ProcessLookupError:
                # Killed (SIGKILL reaches a traced task) by a task of the tree
                # released before it: the program's doing, not a failed
                # restore.  Collect it as its tracer, so that its parent can
                # reap it.
                _collect_dead_tracee(rtid)

    def release_stopped(self, timeout: float = 10.0) -> None:
        """Release a task that was group-stopped and wait until its group
        stop is complete (every thread in state T): from then on its
        parent's waitid(WSTOPPED) reports it, as before the checkpoint.
        Released with the others, a parent could look before the child had
        taken its stop signal and find nothing.  It runs no instruction of
        its own on the way: the stop signal is pending when it is detached."""
        self.release()
        end = time.monotonic() + timeout
        while True:
            try:
                states = [procfs.stat(self.rpid, rtid)["state"] for rtid in self.tids.values()]
            except (OSError, ValueError):
                return          # (killed: the release of the others says so)
            if all(s in ("T", "t") for s in states):
                return
            if time.monotonic() > end:
                raise RestoreError(f"task {self.task.pid}",
                                   f"did not stop again within {timeout:g} s of its release")
            time.sleep(0.0002)

    # --- pieces ------------------------------------------------------------------------
    def _set_mm(self, inj) -> None:
        task = self.task
        mm = task.mm
        auxv = bytes.fromhex(task.auxv)
        m = prctl_mm_map(**{k: getattr(mm, k) for k in (
            "start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
            "start_stack", "arg_start", "arg_end", "env_start", "env_end")})
        m.auxv = self.scratch + 512
        m.auxv_size = len(auxv)
        m.exe_fd = self.fds.get("exe", 2**32 - 1)
        try:
            cur = os.stat(f"/proc/{self.rpid}/exe")
            want = os.stat(f"/proc/{self.rpid}/fd/{m.exe_fd}") if "exe" in self.fds else None
            if want and (cur.st_dev, cur.st_ino) == (want.st_dev, want.st_ino):
                # Same program as the restorer's (a Python script restored by a
                # Python crrestart): the kernel refuses to "change" it (EBUSY).
                m.exe_fd = 2**32 - 1
        except OSError:
            pass
        inj.write(self.scratch, bytes(m))
        inj.write(self.scratch + 512, auxv)
        inj.check("prctl", PR_SET_MM, PR_SET_MM_MAP, self.scratch, ctypes.sizeof(m), 0)

    def _amx(self, inj) -> None:
        """A thread with AMX tile data in its saved XSAVE area needs the
        permission (ARCH_REQ_XCOMP_PERM) before PTRACE_SETREGSET accepts it."""
        for th in self.task.threads:
            regs = self.sf.regs.get(th.tid)
            if regs and len(regs.xstate) >= 520:
                (xstate_bv,) = struct.unpack_from("<Q", regs.xstate, 512)
                if xstate_bv & (1 << XFEATURE_XTILEDATA):
                    inj.check("arch_prctl", ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
                    return

    def _clone_thread(self, inj, th: R.Thread) -> RestoreInjector:
        vtid = th.tid
        args = clone_args(flags=THREAD_FLAGS, exit_signal=0, set_tid=self.scratch + 256,
                          set_tid_size=1)
        inj.write(self.scratch + 256, struct.pack("<i", vtid))
        inj.write(self.scratch, bytes(args))
        inj.new_threads.clear()
        try:
            res = inj.check("clone3", self.scratch, ctypes.sizeof(args))
        except InjectError as e:
            if e.errno == 17:
                raise RestoreError("threads", f"tid {vtid} is in use (restore with --pidns "
                                   "to get a fresh pid namespace)") from None
            raise
        if res != vtid or not inj.new_threads:
            raise RestoreError("threads", f"clone3 gave tid {res}, wanted {vtid}")
        rtid = inj.new_threads[-1]
        self.tids[vtid] = rtid
        if not pt.wait_interrupt_stop(rtid):
            raise RestoreError("threads", f"new thread {vtid} died")
        pt.setsigmask(rtid, ALL_SIGNALS)
        return RestoreInjector(rtid, inj.addr, self.memfd)

    def _thread_state(self, inj, th: R.Thread) -> None:
        sc = self.scratch
        r = th.rseq
        if r and r.ptr:
            inj.check("rseq", r.ptr, r.len, 0, r.sig)
        rl = th.robust_list
        if rl is not None and rl.head:
            inj.check("set_robust_list", rl.head, rl.len)
        inj.call("set_tid_address", th.clear_child_tid)
        ss = th.sigaltstack
        if ss:
            inj.write(sc + 1024, struct.pack("<Qi4xQ", ss.sp, ss.flags & ~1, ss.size))
            inj.check("sigaltstack", sc + 1024, 0)
        comm = th.comm
        if comm:
            # /proc/PID/task/TID/comm is writable only from the thread group
            # itself: the thread names itself (PR_SET_NAME).
            inj.write(sc + 1536, comm.encode(errors="surrogateescape")[:15] + b"\0")
            inj.check("prctl", 15, sc + 1536, 0, 0, 0)

    def _creds(self, inj, th: R.Thread) -> None:
        """The thread's own credentials (`creds` of the thread, when they
        differ from the leader's), else the task's."""
        vtid = th.tid
        c = th.creds if th.creds is not None else self.task.creds
        cur = _status_caps(self.rpid, inj.tid)
        ids = lambda k: [int(x) for x in cur[k].split()]  # noqa: E731
        sc = self.scratch + 2048
        cap = lambda k: int(cur[k], 16)  # noqa: E731
        if sorted(ids("Groups") if cur.get("Groups") else []) != sorted(c.groups):
            inj.write(sc, struct.pack(f"<{len(c.groups)}I", *c.groups))
            inj.check("setgroups", len(c.groups), sc)
        for bit in range(64):
            if cap("CapBnd") >> bit & 1 and not c.cap_bnd >> bit & 1:
                inj.check("prctl", PR_CAPBSET_DROP, bit, 0, 0, 0)
        if ids("Gid")[:3] != c.gid[:3]:
            inj.check("setresgid", *c.gid[:3])
        if len(c.gid) > 3:
            # fsgid after setresgid (which sets it to the egid), while CAP_SETGID holds
            inj.call(ra.NR_SETFSGID, c.gid[3])
        uid_change = ids("Uid")[:3] != c.uid[:3]
        if uid_change:
            # keep-caps over the change even when the saved permitted set is
            # empty: securebits, ambient capabilities and fsuid are set after
            # it and need capabilities; the last capset drops them
            inj.check("prctl", PR_SET_KEEPCAPS, 1, 0, 0, 0)
            inj.check("setresuid", *c.uid[:3])
            inj.check("prctl", PR_SET_KEEPCAPS, 0, 0, 0, 0)
        lo = lambda v: v & 0xFFFFFFFF  # noqa: E731

        def capset(eff: int, prm: int, inh: int) -> None:
            data = struct.pack("<IIIIII", lo(eff), lo(prm), lo(inh), eff >> 32, prm >> 32,
                               inh >> 32)
            inj.write(sc, struct.pack("<Ii", 0x20080522, 0) + data)
            inj.check("capset", sc, sc + 8)
        cur = _status_caps(self.rpid, inj.tid)
        if len(c.uid) > 3 and ids("Uid")[3] != c.uid[3]:
            # setresuid set the fsuid to the euid; setfsuid needs CAP_SETUID
            # unless it is one of the ids: the kept permitted set, effective
            # for this call (the saved sets come next)
            if cap("CapEff") != cap("CapPrm"):
                capset(cap("CapPrm"), cap("CapPrm"), cap("CapInh"))
            inj.call(ra.NR_SETFSUID, c.uid[3])
            cur = _status_caps(self.rpid, inj.tid)
        amb = c.cap_amb
        sb = c.securebits if isinstance(c, R.ThreadCreds) and c.securebits is not None \
            else self.task.attrs.securebits if self.task.attrs is not None else None
        cur_sb = inj.check("prctl", PR_GET_SECUREBITS, 0, 0, 0, 0) if sb is not None else None
        if cap("CapAmb") != amb or cur_sb != sb:
            # Ambient capabilities and securebits while the permitted set is
            # still the restorer's: raising an ambient one needs it permitted
            # and inheritable, securebits need CAP_SETPCAP, and
            # SECBIT_NO_CAP_AMBIENT_RAISE forbids raising after it is set.
            if (cap("CapEff"), cap("CapInh")) != (cap("CapPrm"), c.cap_inh):
                capset(cap("CapPrm"), cap("CapPrm"), c.cap_inh)
            if cap("CapAmb") != amb:
                inj.check("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
                for bit in range(64):
                    if amb >> bit & 1:
                        inj.check("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, bit, 0, 0)
            if cur_sb != sb:
                if (cur_sb ^ sb) == SECBIT_KEEP_CAPS:
                    inj.check("prctl", PR_SET_KEEPCAPS, 1 if sb & SECBIT_KEEP_CAPS else 0,
                              0, 0, 0)
                else:
                    inj.check("prctl", PR_SET_SECUREBITS, sb, 0, 0, 0)
            cur = _status_caps(self.rpid, inj.tid)
        if (cap("CapEff"), cap("CapPrm"), cap("CapInh")) != (c.cap_eff, c.cap_prm,
                                                             c.cap_inh):
            capset(c.cap_eff, c.cap_prm, c.cap_inh)
        cur = _status_caps(self.rpid, inj.tid)
        if sb is not None and inj.check("prctl", PR_GET_SECUREBITS, 0, 0, 0, 0) != sb:
            raise RestoreError("credentials", f"thread {vtid}: securebits are not the saved "
                               f"{sb:#x}")
        got = {"uid": ids("Uid"), "gid": ids("Gid"), "cap_eff": cap("CapEff"),
               "cap_prm": cap("CapPrm"), "cap_inh": cap("CapInh"), "cap_amb": cap("CapAmb")}
        for k, v in got.items():
            if getattr(c, k) != v:
                show = (lambda x: " ".join(map(str, x))) if k in ("uid", "gid") else hex
                raise RestoreError("credentials", f"thread {vtid}: {k} is {show(v)}, "
                                   f"not the saved {show(getattr(c, k))}")
        if c.no_new_privs:
            inj.check("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)

    def _registers(self, th: R.Thread) -> None:
        rtid = self.tids[th.tid]
        saved = self.sf.regs.get(th.tid)
        if saved is None:
            raise RestoreError("registers", f"no registers saved for thread {th.tid}")
        r = self._final_regs(th)
        pt.setregs(rtid, r)
        if saved.xstate:
            pt.setregset(rtid, ec.NT_X86_XSTATE, saved.xstate)
        elif saved.fpregs:
            pt.setregset(rtid, ec.NT_PRFPREG, saved.fpregs)
        pt.setsigmask(rtid, th.sigmask)
        if th.tid in self.gate:
            gate.enter(rtid, r, self.gadgets, *self.gate[th.tid])

    def _final_regs(self, th: R.Thread):
        r = self.sf.regs[th.tid].user_regs()
        fixup_restart(r, th.syscall)
        return r

    def _gate_fds(self, inj) -> None:
        """Each thread that can pass the release gate (restorer/release/gate.py) gets
        its own fd of the gate's read end, above the program's, and the
        frames of its way through it."""
        self.gadgets = gate.gadgets(self.rpid)
        if self.gadgets is None:
            self.warnings.append(f"pid {self.vpid}: released without the gate (no "
                                 "rt_sigreturn instruction in its code)")
            return
        maps = parse_maps(self.rpid)
        low = max([d.fd for d in self.task.fds] + [2]) + 1
        # a page of lazy memory faulted in by the task itself, reading it
        touch = lambda page: inj.call(gate.NR_ACCESS, page, 0)  # noqa: E731
        for th in self.task.threads:
            saved, rtid = self.sf.regs.get(th.tid), self.tids[th.tid]
            xstate = b""
            if saved is not None and saved.xstate:
                # the kernel's own layout of it (what rt_sigreturn checks);
                # set again with the registers
                pt.setregset(rtid, ec.NT_X86_XSTATE, saved.xstate)
                xstate = pt.getregset(rtid, ec.NT_X86_XSTATE, 1 << 16)
            final = self._final_regs(th) if saved is not None else None
            why = gate.check(th, final, len(xstate), self.memfd, maps, touch) if final else \
                "no registers"
            if why:
                self.warnings.append(f"pid {self.vpid} thread {th.tid}: released without "
                                     f"the gate ({why})")
                continue
            gfd = inj.check("fcntl", self.fds["gate"], gate.F_DUPFD_CLOEXEC, low)
            sp, buf = gate.write_frames(th, self.vpid, final, xstate, gfd, self.gadgets,
                                        self.memfd, touch)
            self.gate[th.tid] = (gfd, sp, buf)

    def kill(self) -> None:
        """SIGKILL the task and reap every thread we trace (a traced thread must
        be reaped by its tracer before the leader can be waited for)."""
        try:
            os.kill(self.rpid, signal.SIGKILL)
        except OSError:
            pass
        for rtid in [t for t in self.tids.values() if t != self.rpid]:
            pt.wait_exit(rtid)
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1
        if getattr(self, "mem", None) is not None:
            self.mem.close()
        if self.lazy_server is not None:
            self.lazy_server.stop()
