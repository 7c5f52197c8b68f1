"""crcheck: can this tree be checkpointed (and restarted), and if not, why?

The tree is surveyed from /proc without being stopped: fds (kcmp and
pidfd_getfd, to tell sockets apart), mappings, credentials, namespaces,
timers, tracers, and the flags crrun recorded.  The verdicts come from the
same table and the same assessment crcheckpoint applies to a frozen tree.
"""

from __future__ import annotations

import msgspec

from statefile.dump import fdt as dump_fdt, ns as dump_ns
from statefile.check import flags, support
from statefile.format import notes as nt, records as rec
from statefile.control import procfs
from statefile.dump.files import FileTable
from statefile.dump.memfd import collect as collect_shmem
from statefile.dump.memory import mapping_kind
from statefile.dump.task import _creds
from statefile.errors import TargetError
from statefile.control.freeze import check_target, tracer_of
from statefile.check.policy import Policy


class SurveyThread(msgspec.Struct, kw_only=True):
    """A thread of a surveyed task: what support.assess reads of a
    records.Thread (crcheck does not stop it to read more)."""
    tid: int
    cgroups: dict[str, str] = msgspec.field(default_factory=dict)   # (read by dump/cgroup.py)
    creds: rec.ThreadCreds | None = None
    attrs: rec.ThreadAttrs | None = None


class SurveyTask(msgspec.Struct, kw_only=True):
    """A task surveyed from /proc without stopping it: by crcheck, and by
    crcheckpoint for a task another tracer holds (statefile/checkpoint.py).
    Not a statefile record (nothing of it is written): the fields of
    records.TaskNote that support.assess reads, typed the same way, plus the
    tracer that holds it.  A plain msgspec Struct like the records, so that
    assess reads both by attribute; unknown keys of the survey's dict (none
    today) are ignored rather than refused, as it is not a format."""
    pid: int
    ppid: int
    comm: str
    pgid: int
    sid: int
    tty_nr: int
    creds: rec.Creds
    crrun: bool = False
    tracer: int = 0
    tracer_comm: str = ""
    namespaces: rec.NsLinks = msgspec.field(default_factory=rec.NsLinks)
    nspid: list[int] = msgspec.field(default_factory=list)
    ns_errors: dict[str, str] = msgspec.field(default_factory=dict)
    posix_timers: int = 0
    threads: list[SurveyThread] = msgspec.field(default_factory=list)
    fds: list[rec.FdRef] = msgspec.field(default_factory=list)
    mappings: list[rec.Mapping] = msgspec.field(default_factory=list)
    crrun_flags: list[rec.CrrunFlag] = msgspec.field(default_factory=list)
    fdt: int | None = None
    fdt_unsupported: str | None = None
    locks: list[rec.PosixLock] = msgspec.field(default_factory=list)
    cwd_ghost: rec.CwdGhost | None = None
    attrs: rec.ProcessAttrs | None = None
    rlimits: rec.Rlimits | None = None

    @classmethod
    def of(cls, survey: dict) -> "SurveyTask":
        """From the dict survey_task made (and the dump side completed:
        fd-table groups, namespaces, crrun's flags)."""
        return msgspec.convert(dict(survey, threads=[{"tid": t} for t in survey["threads"]]),
                               cls)


def survey_task(pid: int, files: FileTable) -> dict:
    s = procfs.stat(pid)
    status = procfs.status(pid)
    maps = procfs.smaps(pid)
    tracer = (0, "")
    for tid in procfs.threads(pid):     # any thread: strace -p attaches one
        tracer = tracer_of(pid, tid)
        if tracer[0]:
            break
    for m in maps:
        m["kind"] = mapping_kind(m)
        m["deleted"] = m["path"].endswith(" (deleted)")
    return {
        "pid": pid, "ppid": s["ppid"], "comm": s["comm"], "creds": _creds(status),
        "pgid": s["pgid"], "sid": s["sid"], "tty_nr": s["tty_nr"],
        "crrun": procfs.crrun_monitored(pid),
        "tracer": tracer[0], "tracer_comm": tracer[1],
        "namespaces": dump_ns.links(pid),
        "posix_timers": sum(1 for line in procfs.read(f"/proc/{pid}/timers").splitlines()
                            if line.startswith("ID:")),
        "threads": procfs.threads(pid), "fds": files.dump_fds(pid), "mappings": maps,
    }


def check(pid: int, policy: Policy | None = None) -> dict:
    policy = policy or Policy()
    try:
        check_target(pid)
    except TargetError as e:
        if "already traced" not in str(e):
            raise
    files = FileTable()
    files.pipes.live = True               # (the tree runs: its pipes' contents move)
    tasks, zombies = [], []
    for p in procfs.descendants(pid):
        try:
            st = procfs.stat(p)
            if st["state"] in ("Z", "X") and p != pid:
                zombies.append(st)
                continue
            tasks.append(survey_task(p, files))
        except (FileNotFoundError, ProcessLookupError):
            continue
    if not tasks:
        raise TargetError(f"pid {pid} exited")
    files.scm.resolve(files)              # fds in flight in unix sockets (dump_scm)
    dump_fdt.mark_groups(tasks)           # fd tables shared (CLONE_FILES)
    dump_ns.dump_namespaces(tasks)        # a namespace it cannot read is refused
    ipc = dump_ns.dump_ipc_objects(tasks)  # inside the tree's own IPC namespace, if any
    shmem = collect_shmem(tasks, files, policy.dump_tmpfs)
    support.decide(tasks, files.files)
    for t in tasks:
        t["crrun_flags"] = flags.read(t["pid"])
    # Typed as crcheckpoint's are (statefile/format/records.py), for the same assessment
    surveyed = [SurveyTask.of(t) for t in tasks]
    files_note = nt.record_of(nt.CR_FILES, {"files": files.files, "shmem": shmem})
    zombies = [rec.Zombie(pid=z["pid"], ppid=z["ppid"], pgid=z["pgid"], sid=z["sid"],
                          comm=z["comm"], exit_code=z["exit_code"]) for z in zombies]
    findings = support.assess(surveyed, files_note.files, zombies, {}, policy.skip,
                              nt.record_of(nt.CR_IPC, ipc) if ipc is not None else None,
                              files_note.shmem)
    findings += support.vdso_findings(t.pid for t in surveyed)
    bad = support.problems(findings)
    files.scm.close()
    return {"pid": pid, "checkpointable": not bad, "policy": policy.as_dict(),
            "tasks": [{"pid": t.pid, "ppid": t.ppid, "comm": t.comm,
                       "threads": len(t.threads), "fds": len(t.fds),
                       "mappings": len(t.mappings)} for t in surveyed],
            "findings": [msgspec.to_builtins(f) | {"line": f.line()} for f in findings],
            "problems": [f.line() for f in bad]}
