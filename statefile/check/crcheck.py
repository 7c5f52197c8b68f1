"""crcheck: can this tree be checkpointed (and restarted), and if not, why?

The tree is surveyed from /proc without being stopped: fds (kcmp and
pidfd_getfd, to tell sockets apart), mappings, credentials, namespaces,
timers, tracers, and the flags crrun recorded.  The verdicts come from the
same table and the same assessment crcheckpoint applies to a frozen tree.
"""

from __future__ import annotations

from statefile.dump import fdt as dump_fdt, ns as dump_ns
from statefile.check import flags, support
from statefile.control import procfs
from statefile.dump.files import FileTable
from statefile.dump.memfd import collect as collect_shmem
from statefile.dump.memory import mapping_kind
from statefile.dump.task import _creds
from statefile.errors import TargetError
from statefile.control.freeze import check_target, tracer_of
from statefile.check.policy import Policy


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
    findings = support.assess(tasks, files.files, zombies,
                              {t["pid"]: flags.read(t["pid"]) for t in tasks}, policy.skip, ipc,
                              collect_shmem(tasks, files, policy.dump_tmpfs))
    findings += support.vdso_findings(t["pid"] for t in tasks)
    bad = support.problems(findings)
    files.scm.close()
    return {"pid": pid, "checkpointable": not bad, "policy": policy.as_dict(),
            "tasks": [{"pid": t["pid"], "ppid": t["ppid"], "comm": t["comm"],
                       "threads": len(t["threads"]), "fds": len(t["fds"]),
                       "mappings": len(t["mappings"])} for t in tasks],
            "findings": [f.as_dict() | {"line": f.line()} for f in findings],
            "problems": [f.line() for f in bad]}
