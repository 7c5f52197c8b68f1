"""Every record of crelf's JSON notes (owner CRELF), defined once, as msgspec Structs.

The dump side's records are converted to these types as soon as they are
gathered (statefile/checkpoint.py), before they are assessed and written; the
writer encodes them, and the reader (statefile/format/reader.py) decodes and
validates every note once, at load: a wrong type, a missing field or an unknown
key is an error naming the note, the task and the field.  The restorer,
crinspect and the support table then read attributes, never `.get(key, default)`.
docs/FORMAT.md's tables of records are generated from these definitions
(`python -m statefile.format.records`) and a test fails when the two differ.

Why msgspec: it is made for exactly this (typed structs decoded from JSON with
validation in one pass, tagged unions, defaults, JSON Schema out of the same
definitions), it is fast (decoding typed is faster than json.loads into dicts),
and it is well kept.  Dataclasses with slots would need a hand-written validator.

Conventions:
* every record is keyword-only, leaves out fields at their default when it is
  encoded, and refuses unknown keys (the writer is exhaustive: nothing is ever
  dropped silently);
* a field without a default is one the writer always emits; a default is what a
  reader assumes when the writer leaves the field out;
* `X | None` only where the writer stores a JSON null; a field whose absence and
  null mean different things defaults to msgspec.UNSET;
* byte strings are lowercase hex `str`; addresses, masks and ids JSON integers;
* records with a discriminating key are tagged unions: CR_FILES entries on
  "kind", a file's "socket" on "family", CR_FILES "shmem" objects on "kind".

A tagged union is closed: an anonymous inode of a name not in OPAQUE_ANON, or a
socket family crelf does not name, does not decode; add it here.  One legacy key
is kept so that older statefiles decode: UnixSocket.sock_file (now file_owner).
"""

from __future__ import annotations

import types
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType, field


def Doc(text: str) -> msgspec.Meta:
    """The one-line description of a field (docs/FORMAT.md's table cell)."""
    return msgspec.Meta(description=text)


class Record(msgspec.Struct, kw_only=True, omit_defaults=True,
             forbid_unknown_fields=True, dict=True):
    """Base of every record: keyword-only, defaults left out when encoding,
    unknown keys refused.  (dict=True: the restorer may hang its own working
    attributes, named with a leading underscore, on a record in memory; they
    are never encoded.)"""


class Note(Record, kw_only=True):
    """Base of a whole JSON note: every one carries the layout version."""
    v: Annotated[int, Doc("layout version of this note (notes.NOTE_LAYOUT_VERSION, 1)")]


# Shapes used in many places -----------------------------------------------------------

# Fixed-length arrays (JSON arrays; lists, as before records, so they compare
# equal to the lists the code builds)
Ints2 = Annotated[list[int], msgspec.Meta(min_length=2, max_length=2)]
Ints3 = Annotated[list[int], msgspec.Meta(min_length=3, max_length=3)]
Ints4 = Annotated[list[int], msgspec.Meta(min_length=4, max_length=4)]
Hexes2 = Annotated[list[str], msgspec.Meta(min_length=2, max_length=2)]

Run = Annotated[Ints2, Doc("[offset, length] in bytes")]
Hex = Annotated[str, Doc("bytes as lowercase hex")]
NsLink = Annotated[str, Doc("a /proc/PID/ns/* link text, e.g. 'net:[4026531833]'")]


# ======================================================================= CR_HEADER

class TreeEntry(Record, kw_only=True):
    """One task of the checkpointed tree (CR_HEADER tree), parents first."""
    pid: Annotated[int, Doc("pid as crelf saw it")]
    ppid: Annotated[int, Doc("its parent's pid")]


class Zombie(Record, kw_only=True):
    """A child that had exited and was not reaped: recreated as a zombie."""
    pid: Annotated[int, Doc("its pid")]
    ppid: Annotated[int, Doc("its parent's pid (a task of the tree)")]
    pgid: Annotated[int, Doc("its process group")]
    sid: Annotated[int, Doc("its session")]
    comm: Annotated[str, Doc("its command name")]
    exit_code: Annotated[int, Doc("the raw wait status it exited with")] = 0


class PolicyRecord(Record, kw_only=True):
    """The checkpoint policy in force (statefile/check/policy.py Policy.as_dict)."""
    skip: Annotated[list[str], Doc("policy classes whose resources are left out, sorted")] = \
        field(default_factory=list)
    dump_tmpfs: Annotated[bool, Doc("regular files on tmpfs were stored in the statefile")] = \
        False
    on_unsupported: Annotated[Literal["refuse", "snapshot"],
                              Doc("refuse, or write a debug-only snapshot statefile")] = "refuse"
    source: Annotated[str, Doc("the policy file it came from ('' for none)")] = ""
    from_crrun: Annotated[int | None, Doc("pid of the crrun monitor whose policy was used")] = \
        None


class Skipped(Record, kw_only=True):
    """A resource the policy left out (CR_HEADER skipped)."""
    what: Annotated[str, Doc("what was left out (the finding's detail)")]
    where: Annotated[str, Doc("where: 'pid P' or 'pid P fd N'")]
    why: Annotated[str, Doc("the policy class that allowed it")]
    key: Annotated[str, Doc("its row of the support table (statefile/check/support.py)")]


class NsLinks(Record, kw_only=True):
    """The /proc/PID/ns/* link texts of one process ('' when unreadable)."""
    pid: Annotated[str, Doc("pid namespace")] = ""
    ipc: Annotated[str, Doc("IPC namespace")] = ""
    uts: Annotated[str, Doc("UTS namespace")] = ""
    mnt: Annotated[str, Doc("mount namespace")] = ""
    net: Annotated[str, Doc("network namespace")] = ""
    user: Annotated[str, Doc("user namespace")] = ""
    cgroup: Annotated[str, Doc("cgroup namespace")] = ""
    time: Annotated[str, Doc("time namespace")] = ""


class UtsNamespace(Record, kw_only=True):
    """The tree's own UTS namespace."""
    ns: Annotated[str, Doc("its link text")]
    hostname: Annotated[str, Doc("hostname in it")] = ""
    domainname: Annotated[str, Doc("NIS domain name in it")] = ""


class IpcNamespace(Record, kw_only=True):
    """The tree's own IPC namespace (CR_IPC holds its objects)."""
    ns: Annotated[str, Doc("its link text")]
    sysctl: Annotated[dict[str, str],
                      Doc("its limits, as /proc/sys/kernel prints them: msgmax, msgmnb, msgmni, "
                          "sem, shmall, shmmax, shmmni, shm_rmid_forced")] = \
        field(default_factory=dict)


class PidNamespace(Record, kw_only=True):
    """The root's pid namespace, when it is not crelf's."""
    ns: Annotated[str, Doc("its link text")]
    init: Annotated[int, Doc("the root's pid as crelf saw it")]
    level: Annotated[int, Doc("levels below crelf's namespace (restartable only when 1)")]
    ids: Annotated[dict[str, int],
                   Doc("{'outer id': inner id} for every pid, tid, pgid, sid of the tree "
                       "(inner 0: outside the namespace)")] = field(default_factory=dict)


class HeaderNamespaces(Record, kw_only=True):
    """Namespaces of crcheckpoint and of the tree (statefile/dump/ns.py)."""
    crelf: Annotated[NsLinks, Doc("crcheckpoint's own namespaces")]
    root: Annotated[NsLinks, Doc("the root task's namespaces")] = field(default_factory=NsLinks)
    uts: Annotated[UtsNamespace | None, Doc("present when the tree has its own UTS namespace")] = \
        None
    ipc: Annotated[IpcNamespace | None, Doc("present when the tree has its own IPC namespace")] = \
        None
    pid: Annotated[PidNamespace | None, Doc("present when the root is in another pid namespace")] \
        = None


class HeaderNote(Note, kw_only=True):
    """CR_HEADER: the statefile as a whole."""
    format: Annotated[int, Doc("statefile format (2; 1: without chunk checksums)")]
    crelf: Annotated[str, Doc("crelf version that wrote it")]
    created: Annotated[str, Doc("creation time, ISO 8601 UTC, seconds")]
    created_unix: Annotated[float, Doc("creation time, seconds since the epoch")]
    host: Annotated[str, Doc("host name of the checkpointing machine")]
    kernel: Annotated[str, Doc("its kernel release (uname -r)")]
    machine: Annotated[str, Doc("its machine (uname -m)")] = "x86_64"
    page_size: Annotated[int, Doc("page size (4096)")]
    root_pid: Annotated[int, Doc("pid of the tree's root task")]
    tree: Annotated[list[TreeEntry], Doc("every task, parents before children")] = \
        field(default_factory=list)
    zombies: Annotated[list[Zombie], Doc("unreaped children, recreated as zombies")] = \
        field(default_factory=list)
    checkpoint_uid: Annotated[int, Doc("effective uid of crcheckpoint")]
    policy: Annotated[PolicyRecord, Doc("the policy in force")] = field(
        default_factory=PolicyRecord)
    skipped: Annotated[list[Skipped], Doc("resources the policy left out")] = \
        field(default_factory=list)
    restartable: Annotated[bool, Doc("false for a --snapshot statefile of unsupported state")] = \
        True
    not_restartable: Annotated[list[str], Doc("why not, one line each")] = \
        field(default_factory=list)
    leave_running: Annotated[bool, Doc("the tree ran on after the checkpoint (false: --kill)")] = \
        True
    namespaces: Annotated[HeaderNamespaces | UnsetType,
                          Doc("namespaces of crcheckpoint and of the tree")] = UNSET
    xsave_layout: Annotated[dict[str, Ints2] | None,
                            Doc("{'XSAVE component number': [offset, size]} of this CPU "
                                "(CPUID 0xD); null when not root")] = None
    copy_on_write: Annotated[bool, Doc("memory was read from copy-on-write snapshots")] = False


# ========================================================================= CR_TASK

class ExeId(Record, kw_only=True):
    """Identity of the executable, to detect a changed one."""
    dev: Annotated[int, Doc("st_dev")]
    ino: Annotated[int, Doc("st_ino")]
    size: Annotated[int, Doc("st_size")]
    mtime_ns: Annotated[int, Doc("st_mtime_ns")]


class ProcRef(Record, kw_only=True):
    """A file or directory under /proc/PID (dump_files.proc_ref)."""
    mount: Annotated[str, Doc("the procfs mount point it is under")]
    pid: Annotated[int, Doc("the PID of /proc/PID")]
    rest: Annotated[str, Doc("the path below /proc/PID ('' for the directory itself)")]
    dead: Annotated[bool, Doc("that process had exited (the link ended in ' (deleted)')")]


class CwdGhost(Record, kw_only=True):
    """A removed working directory, made again on restart."""
    path: Annotated[str, Doc("the cwd link text, ending in ' (deleted)'")]
    dev: Annotated[int, Doc("st_dev")]
    ino: Annotated[int, Doc("st_ino")]
    mode: Annotated[int, Doc("st_mode")] = 0o700
    uid: Annotated[int, Doc("owner")]
    gid: Annotated[int, Doc("group")]
    atime_ns: Annotated[int | UnsetType, Doc("st_atime_ns (readers: mtime_ns when absent)")] = \
        UNSET
    mtime_ns: Annotated[int, Doc("st_mtime_ns")]
    proc: Annotated[ProcRef | None, Doc("when it is the /proc/PID directory of a process")] = \
        None


class Creds(Record, kw_only=True):
    """Credentials (from /proc/PID[/task/TID]/status)."""
    uid: Annotated[Ints4, Doc("[real, effective, saved, fs] uid")]
    gid: Annotated[Ints4, Doc("[real, effective, saved, fs] gid")]
    groups: Annotated[list[int], Doc("supplementary groups")] = field(default_factory=list)
    cap_inh: Annotated[int, Doc("inheritable capabilities (mask)")]
    cap_prm: Annotated[int, Doc("permitted capabilities")]
    cap_eff: Annotated[int, Doc("effective capabilities")]
    cap_bnd: Annotated[int, Doc("bounding set")]
    cap_amb: Annotated[int, Doc("ambient capabilities")] = 0
    no_new_privs: Annotated[int, Doc("PR_SET_NO_NEW_PRIVS (0/1)")] = 0
    seccomp: Annotated[int, Doc("seccomp mode (0 none, 1 strict, 2 filter)")] = 0


class ThreadCreds(Creds, kw_only=True):
    """A thread's own credentials, when they differ from the leader's."""
    securebits: Annotated[int | None, Doc("the thread's PR_GET_SECUREBITS")] = None


RLimit = Annotated[Ints2, Doc("[soft, hard]; -1 = RLIM_INFINITY (Python's value)")]


class Rlimits(Record, rename={"as_": "as"}, kw_only=True):
    """Resource limits (prlimit, or /proc/PID/limits)."""
    cpu: Annotated[RLimit, Doc("RLIMIT_CPU")]
    fsize: Annotated[RLimit, Doc("RLIMIT_FSIZE")]
    data: Annotated[RLimit, Doc("RLIMIT_DATA")]
    stack: Annotated[RLimit, Doc("RLIMIT_STACK")]
    core: Annotated[RLimit, Doc("RLIMIT_CORE")]
    rss: Annotated[RLimit, Doc("RLIMIT_RSS")]
    nproc: Annotated[RLimit, Doc("RLIMIT_NPROC")]
    nofile: Annotated[RLimit, Doc("RLIMIT_NOFILE")]
    memlock: Annotated[RLimit, Doc("RLIMIT_MEMLOCK")]
    as_: Annotated[RLimit, Doc("RLIMIT_AS")]
    locks: Annotated[RLimit, Doc("RLIMIT_LOCKS")]
    sigpending: Annotated[RLimit, Doc("RLIMIT_SIGPENDING")]
    msgqueue: Annotated[RLimit, Doc("RLIMIT_MSGQUEUE")]
    nice: Annotated[RLimit, Doc("RLIMIT_NICE")]
    rtprio: Annotated[RLimit, Doc("RLIMIT_RTPRIO")]
    rttime: Annotated[RLimit, Doc("RLIMIT_RTTIME")]


class Mm(Record, kw_only=True):
    """Memory-map boundaries (/proc/PID/stat; brk by an injected brk(0))."""
    start_code: Annotated[int, Doc("start of text")]
    end_code: Annotated[int, Doc("end of text")]
    start_data: Annotated[int, Doc("start of data")]
    end_data: Annotated[int, Doc("end of data")]
    start_brk: Annotated[int, Doc("start of the heap")]
    brk: Annotated[int, Doc("current program break")]
    start_stack: Annotated[int, Doc("start of the stack")]
    arg_start: Annotated[int, Doc("argv start")]
    arg_end: Annotated[int, Doc("argv end")]
    env_start: Annotated[int, Doc("environment start")]
    env_end: Annotated[int, Doc("environment end")]


class Prctl(Record, kw_only=True):
    """Process attributes read by injected prctl calls."""
    child_subreaper: Annotated[int, Doc("PR_GET_CHILD_SUBREAPER (0/1)")] = 0
    pdeathsig: Annotated[int, Doc("the leader's PR_GET_PDEATHSIG")] = 0


class ProcessAttrs(Record, kw_only=True):
    """Per-process attributes (statefile/dump/attrs.py)."""
    oom_score_adj: Annotated[int, Doc("/proc/PID/oom_score_adj")]
    thp_disable: Annotated[int, Doc("PR_GET_THP_DISABLE: 0, 1, 3 (except where advised)")] = 0
    securebits: Annotated[int | None, Doc("the leader's PR_GET_SECUREBITS")] = None
    dumpable: Annotated[int | None, Doc("PR_GET_DUMPABLE: 0, 1 or 2")] = None
    membarrier: Annotated[int, Doc("MEMBARRIER_CMD_REGISTER_* bits registered")] = 0


class CrrunFlag(Record, kw_only=True):
    """What crrun's monitor recorded for a task (statefile/monitor.py, flags.py)."""
    pid: Annotated[int, Doc("the task (thread group)")]
    time: Annotated[float, Doc("when, seconds since the epoch")]
    tid: Annotated[int, Doc("the thread that made the call")]
    syscall: Annotated[str, Doc("the watched system call")]
    call: Annotated[str, Doc("the call as shown (name and arguments)")]
    nr: Annotated[int, Doc("its syscall number")]
    resource: Annotated[str, Doc("the support-table row it creates")] = ""
    reason: Annotated[str, Doc("one line: why it cannot be checkpointed")] = ""
    action: Annotated[Literal["flagged", "denied"], Doc("flagged, or denied (errno returned)")]
    errno: Annotated[str | None, Doc("the errno name returned, when denied")] = None
    policy: Annotated[str | None, Doc("policy class under which it is skippable")] = None
    policy_file: Annotated[str | None, Doc("crrun's policy file")] = None


class SigAction(Record, kw_only=True):
    """A signal disposition that is not the default."""
    sig: Annotated[int, Doc("signal number")]
    handler: Annotated[int, Doc("sa_handler (1 = SIG_IGN)")]
    flags: Annotated[int, Doc("sa_flags")]
    restorer: Annotated[int, Doc("sa_restorer")]
    mask: Annotated[int, Doc("sa_mask")]


class Itimer(Record, kw_only=True):
    """An armed interval timer."""
    interval: Annotated[Ints2, Doc("it_interval [s, us]")]
    value: Annotated[Ints2, Doc("it_value [s, us]")]


class Itimers(Record, kw_only=True):
    """Armed setitimer timers (absent when disarmed)."""
    real: Annotated[Itimer | None, Doc("ITIMER_REAL")] = None
    virtual: Annotated[Itimer | None, Doc("ITIMER_VIRTUAL")] = None
    prof: Annotated[Itimer | None, Doc("ITIMER_PROF")] = None


class ProcessSignals(Record, kw_only=True):
    """Process-wide signal state."""
    shared_sigpend: Annotated[int, Doc("ShdPnd mask")] = 0
    shared_pending: Annotated[list[Hex], Doc("siginfo_t's of the process-wide queue, hex")] = \
        field(default_factory=list)
    sigign: Annotated[int, Doc("SigIgn mask")] = 0
    sigcgt: Annotated[int, Doc("SigCgt mask")] = 0


class AioRing(Record, kw_only=True):
    """An AIO context's ring (mapping kind 'aio')."""
    nr: Annotated[int, Doc("ring size in events")]
    head: Annotated[int, Doc("ring head")]
    tail: Annotated[int, Doc("ring tail")]
    events: Annotated[list[Hex], Doc("completed, unreaped io_events, head to tail, 32 bytes each")] \
        = field(default_factory=list)
    unsupported: Annotated[str, Doc("why the header was not understood (mem:aio-other)")] = ""


MappingKind = Literal["heap", "stack", "vdso", "vvar", "vsyscall", "anon-private", "anon-shared",
                      "shmem-private", "file-private", "file-shared", "sysv-shm", "memfd", "aio",
                      "special"]


class Mapping(Record, kw_only=True):
    """One line of /proc/PID/smaps, with what a restart needs."""
    start: Annotated[int, Doc("start address")]
    end: Annotated[int, Doc("end address")]
    perms: Annotated[str, Doc("rwxp / rwxs")]
    offset: Annotated[int, Doc("file offset")] = 0
    dev: Annotated[str, Doc("major:minor, hex")] = ""
    inode: Annotated[int, Doc("inode of the mapped file (0: none)")]
    path: Annotated[str, Doc("path as in /proc/PID/maps")] = ""
    kind: Annotated[MappingKind, Doc("dump_memory.mapping_kind")]
    deleted: Annotated[bool, Doc("path ends in ' (deleted)'")] = False
    vmflags: Annotated[list[str], Doc("smaps VmFlags (gd, dd, dc, wf, lo, ht, dp ...)")] = \
        field(default_factory=list)
    rss_kb: Annotated[int, Doc("smaps Rss")] = 0
    anonymous_kb: Annotated[int, Doc("smaps Anonymous")]
    swap_kb: Annotated[int, Doc("smaps Swap")]
    page_kb: Annotated[int, Doc("smaps KernelPageSize, hugetlb mappings only")] = 2048
    segments: Annotated[list[int], Doc("program header indices covering it, address order")] = \
        field(default_factory=list)
    file_size: Annotated[int | None, Doc("size of the mapped file (file mappings)")] = None
    file_mtime_ns: Annotated[int | None, Doc("mtime of the mapped file")] = None
    guards: Annotated[list[Run], Doc("guard pages (MADV_GUARD_INSTALL)")] = \
        field(default_factory=list)
    object_size: Annotated[int | None, Doc("size of the shared object (anon-shared, "
                                           "shmem-private)")] = None
    aio: Annotated[AioRing | UnsetType, Doc("the AIO ring (kind aio)")] = UNSET
    cow_runs: Annotated[list[Run], Doc("pages that differ from the file/object")] = \
        field(default_factory=list)
    cow_parent: Annotated[list[Run], Doc("pages shared copy-on-write with the parent")] = \
        field(default_factory=list)
    shmem: Annotated[int | None, Doc("index of its CR_FILES shmem object")] = None
    skipped: Annotated[str | None, Doc("policy class that left its content out ('scratch')")] = \
        None


class FdRef(Record, kw_only=True):
    """One descriptor of the task's fd table."""
    fd: Annotated[int, Doc("descriptor number")]
    file: Annotated[int, Doc("index of its open file description in CR_FILES files")]
    cloexec: Annotated[bool, Doc("FD_CLOEXEC")] = False


class PosixLock(Record, kw_only=True):
    """A POSIX record lock held by the process (fdinfo 'lock:' line)."""
    fd: Annotated[int, Doc("the descriptor it shows on")]
    file: Annotated[int, Doc("its CR_FILES entry")]
    type: Annotated[str, Doc("read or write")]
    start: Annotated[int, Doc("first byte, inclusive")] = 0
    end: Annotated[int | None, Doc("last byte, inclusive; null: to end of file")]
    pid: Annotated[int, Doc("the pid the kernel showed")]


class Syscall(Record, kw_only=True):
    """The system call a thread was stopped in."""
    nr: Annotated[int, Doc("orig_rax")]
    restart: Annotated[str, Doc("ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, "
                                "ERESTART_RESTARTBLOCK or ''")] = ""


class RobustList(Record, kw_only=True):
    """get_robust_list of the thread."""
    head: Annotated[int, Doc("list head address")]
    len: Annotated[int, Doc("its length")]


class Rseq(Record, kw_only=True):
    """PTRACE_GET_RSEQ_CONFIGURATION."""
    ptr: Annotated[int, Doc("rseq area address")]
    len: Annotated[int, Doc("its length")]
    sig: Annotated[int, Doc("signature")]
    flags: Annotated[int, Doc("flags")]


class SigAltStack(Record, kw_only=True):
    """sigaltstack of the thread."""
    sp: Annotated[int, Doc("ss_sp")]
    flags: Annotated[int, Doc("ss_flags")]
    size: Annotated[int, Doc("ss_size")]


class Sched(Record, kw_only=True):
    """sched_getattr of the thread."""
    policy: Annotated[int, Doc("0 OTHER, 1 FIFO, 2 RR, 3 BATCH, 5 IDLE, 6 DEADLINE")]
    flags: Annotated[int, Doc("SCHED_FLAG_* (1 = reset-on-fork)")]
    nice: Annotated[int, Doc("nice value")]
    priority: Annotated[int, Doc("real-time priority")]
    runtime: Annotated[int, Doc("ns")]
    deadline: Annotated[int, Doc("ns")]
    period: Annotated[int, Doc("ns")]
    util_min: Annotated[int, Doc("uclamp min")]
    util_max: Annotated[int, Doc("uclamp max")]


class ThreadAttrs(Record, kw_only=True):
    """Per-thread attributes (statefile/dump/attrs.py)."""
    sched: Annotated[Sched | None, Doc("scheduling policy and parameters")] = None
    loginuid: Annotated[int | None, Doc("/proc/PID/task/TID/loginuid (4294967295 unset)")] = None


class Thread(Record, kw_only=True):
    """One thread of a task (leader first)."""
    tid: Annotated[int, Doc("thread id")]
    comm: Annotated[str, Doc("thread name")] = ""
    utime: Annotated[float, Doc("user time, seconds")] = 0.0
    stime: Annotated[float, Doc("system time, seconds")] = 0.0
    fs_base: Annotated[int, Doc("FS base")]
    gs_base: Annotated[int, Doc("GS base")]
    syscall: Annotated[Syscall | None, Doc("null, or the syscall it was stopped in")] = None
    sigmask: Annotated[int, Doc("blocked signals")] = 0
    sigpend: Annotated[int, Doc("SigPnd mask (private queue)")] = 0
    pending: Annotated[list[Hex], Doc("siginfo_t's of its private queue, hex")] = \
        field(default_factory=list)
    attrs: Annotated[ThreadAttrs | None, Doc("per-thread attributes")] = None
    robust_list: Annotated[RobustList | None, Doc("robust futex list")] = None
    rseq: Annotated[Rseq | None, Doc("null, or its rseq registration")] = None
    clear_child_tid: Annotated[int, Doc("PR_GET_TID_ADDRESS")] = 0
    sigaltstack: Annotated[SigAltStack | None, Doc("null, or its alternate signal stack")] = None
    deferred_signals: Annotated[list[int], Doc("signals that arrived while held, delivered "
                                               "on resume")] = field(default_factory=list)
    cgroups: Annotated[dict[str, str], Doc("{hierarchy: path}; '' is cgroup v2")] = \
        field(default_factory=dict)
    creds: Annotated[ThreadCreds | None, Doc("only when they differ from the leader's")] = None


class TaskNote(Note, kw_only=True):
    """CR_TASK: one task (process) of the tree."""
    pid: Annotated[int, Doc("pid as crelf saw it")]
    tgid: Annotated[int, Doc("thread group id")]
    ppid: Annotated[int, Doc("parent pid")]
    pgid: Annotated[int, Doc("process group")]
    sid: Annotated[int, Doc("session")]
    comm: Annotated[str, Doc("command name")] = ""
    state: Annotated[str, Doc("state before the freeze (R S D T ...)")] = "S"
    group_stopped: Annotated[bool, Doc("it was group-stopped")] = False
    stop_signal: Annotated[int, Doc("the signal that stopped it (0: running)")] = 0
    nice: Annotated[int, Doc("nice value")] = 0
    flags: Annotated[int, Doc("task flags (/proc/PID/stat)")] = 0
    exit_signal: Annotated[int, Doc("signal sent to the parent on exit")]
    tty_nr: Annotated[int, Doc("controlling terminal device")]
    cmdline: Annotated[list[str], Doc("argv")] = field(default_factory=list)
    environ_size: Annotated[int, Doc("size of /proc/PID/environ")]
    exe: Annotated[str, Doc("/proc/PID/exe link text")] = ""
    exe_id: Annotated[ExeId | None, Doc("identity of the executable")] = None
    cwd: Annotated[str, Doc("working directory link text")] = ""
    cwd_ghost: Annotated[CwdGhost | None, Doc("the removed working directory")] = None
    root: Annotated[str, Doc("root directory link text")] = "/"
    umask: Annotated[int, Doc("umask")] = 0o022
    personality: Annotated[int, Doc("personality")] = 0
    creds: Annotated[Creds, Doc("the leader's credentials")]
    rlimits: Annotated[Rlimits | None, Doc("resource limits")] = None
    crrun: Annotated[bool, Doc("runs under crrun's monitor")] = False
    crrun_flags: Annotated[list[CrrunFlag], Doc("what crrun recorded for it")] = \
        field(default_factory=list)
    auxv: Annotated[Hex, Doc("/proc/PID/auxv, hex")] = ""
    mm: Annotated[Mm, Doc("memory-map boundaries")]
    namespaces: Annotated[NsLinks, Doc("its namespaces")] = field(default_factory=NsLinks)
    nspid: Annotated[list[int], Doc("its pid in each pid namespace, outermost first")] = \
        field(default_factory=list)
    ns_errors: Annotated[dict[str, str], Doc("root only: {uts|ipc: why} unreadable namespace")] = \
        field(default_factory=dict)
    posix_timers: Annotated[int, Doc("number of POSIX timers")] = 0
    prctl: Annotated[Prctl, Doc("prctl-only attributes")] = field(default_factory=Prctl)
    attrs: Annotated[ProcessAttrs | None, Doc("per-process attributes (absent: older files)")] = \
        None
    sigactions: Annotated[list[SigAction], Doc("non-default dispositions")] = \
        field(default_factory=list)
    itimers: Annotated[Itimers, Doc("armed interval timers")] = field(default_factory=Itimers)
    signals: Annotated[ProcessSignals, Doc("process-wide signal state")] = \
        field(default_factory=ProcessSignals)
    fdt: Annotated[int | None, Doc("pid of the topmost task sharing its fd table")] = None
    fdt_unsupported: Annotated[str | None, Doc("why that fd-table group cannot be restored")] = \
        None
    mappings: Annotated[list[Mapping], Doc("address order")] = field(default_factory=list)
    fds: Annotated[list[FdRef], Doc("its fd table")] = field(default_factory=list)
    locks: Annotated[list[PosixLock], Doc("POSIX record locks it holds")] = \
        field(default_factory=list)
    threads: Annotated[list[Thread], Doc("leader first")] = field(default_factory=list)


# ======================================================================== CR_FILES

class Fown(Record, kw_only=True):
    """F_GETOWN_EX / F_GETSIG of a file (statefile/dump/locks.py)."""
    pid: Annotated[int, Doc("owner id")] = 0
    pid_type: Annotated[str, Doc("tid, pid or pgrp (or the number)")]
    signum: Annotated[int, Doc("F_SETSIG signal (0: SIGIO)")] = 0
    uid: Annotated[int | None, Doc("owner's real uid")] = None
    euid: Annotated[int | None, Doc("owner's effective uid")] = None


class Lease(Record, kw_only=True):
    """A file lease held on the description."""
    state: Annotated[str, Doc("active, breaking, breaker ...")]
    type: Annotated[str, Doc("read, write or unlck")]
    pid: Annotated[int | None, Doc("the pid the kernel showed")] = None


class FileLock(Record, kw_only=True):
    """A flock or OFD lock held by the description."""
    kind: Annotated[Literal["flock", "ofd"], Doc("flock or ofd")]
    type: Annotated[str, Doc("read or write")]
    pid: Annotated[int, Doc("the pid the kernel showed (-1 for OFD)")]
    start: Annotated[int, Doc("first byte (OFD)")] = 0
    end: Annotated[int | None | UnsetType, Doc("last byte (OFD); null: to end of file")] = UNSET


class FileBase(Record, tag_field="kind", kw_only=True):
    """An open file description (CR_FILES files); 'kind' selects the record."""
    id: Annotated[int, Doc("its index in files")]
    path: Annotated[str, Doc("the /proc/PID/fd link text")] = ""
    flags: Annotated[int, Doc("open flags without O_CLOEXEC")] = 0
    pos: Annotated[int, Doc("file offset")] = 0
    mode: Annotated[int, Doc("st_mode")] = 0o600
    dev: Annotated[int, Doc("st_dev")] = 0
    ino: Annotated[int, Doc("st_ino")]
    rdev: Annotated[int, Doc("st_rdev")]
    size: Annotated[int, Doc("st_size")] = 0
    mtime_ns: Annotated[int, Doc("st_mtime_ns")]
    nlink: Annotated[int, Doc("st_nlink")]
    atime_ns: Annotated[int, Doc("st_atime_ns")]
    uid: Annotated[int, Doc("owner")]
    gid: Annotated[int, Doc("group")]
    deleted: Annotated[bool, Doc("removed (link ends in ' (deleted)', nlink 0)")] = False
    mnt_id: Annotated[int, Doc("mount id")]
    owner_pid: Annotated[int, Doc("a task holding it")]
    owner_fd: Annotated[int, Doc("its fd there")]
    fdinfo: Annotated[dict[str, str], Doc("other /proc/PID/fdinfo lines, as text")] = \
        field(default_factory=dict)
    fown: Annotated[Fown | None, Doc("F_SETOWN owner, when set")] = None
    lease: Annotated[Lease | None, Doc("its lease")] = None
    locks: Annotated[list[FileLock], Doc("flock/OFD locks")] = field(default_factory=list)
    locks_other: Annotated[list[str], Doc("lock lines not understood")] = \
        field(default_factory=list)
    skipped: Annotated[str | None, Doc("policy class that left it out")] = None
    in_flight: Annotated[bool, Doc("held only in a unix socket's queue (SCM_RIGHTS)")] = False
    blob: Annotated[int | None, Doc("program header of its stored content")] = None

    @property
    def kind(self) -> str:
        """The record's tag: which kind of file it is."""
        return type(self).__struct_config__.tag


class NsfsRef(Record, kw_only=True):
    """An fd on a namespace (nsfs)."""
    type: Annotated[str, Doc("namespace type (net, uts, ...)")]
    ino: Annotated[int, Doc("namespace inode")]
    name: Annotated[str | None, Doc("which /proc/PID/ns/* of the task it is (null: none)")]


class FileHandleRef(Record, kw_only=True):
    """name_to_handle_at of a renamed-away, still linked file ({} when none)."""
    type: Annotated[int | None, Doc("handle_type")] = None
    handle: Annotated[Hex | None, Doc("f_handle, hex")] = None
    mount_id: Annotated[int | None, Doc("mount id")] = None


class RegularFile(FileBase, tag="regular", kw_only=True):
    """A regular file (also memfds, deleted files, nsfs, /proc files)."""
    shmem: Annotated[int | None, Doc("its CR_FILES shmem object (memfd, deleted, tmpfs)")] = None
    proc: Annotated[ProcRef | None, Doc("a file under /proc/PID")] = None
    nsfs: Annotated[NsfsRef | None, Doc("an fd on a namespace")] = None
    linked: Annotated[FileHandleRef | None, Doc("name removed, other links keep it")] = None


class DirectoryFile(FileBase, tag="directory", kw_only=True):
    """A directory."""
    proc: Annotated[ProcRef | None, Doc("a /proc/PID directory")] = None


class CharDevice(FileBase, tag="chr", kw_only=True):
    """A character device (also a tty device that is not a pty: /dev/tty ...)."""
    tty_device: Annotated[bool, Doc("a terminal device that is not a pty end")] = False
    ctty: Annotated[bool, Doc("it is the task's controlling terminal")] = False


class BlockDevice(FileBase, tag="blk", kw_only=True):
    """A block device."""


class Termios(Record, kw_only=True):
    """tcgetattr of a pty."""
    iflag: Annotated[int, Doc("c_iflag")]
    oflag: Annotated[int, Doc("c_oflag")]
    cflag: Annotated[int, Doc("c_cflag")]
    lflag: Annotated[int, Doc("c_lflag")] = 0
    ispeed: Annotated[int, Doc("input speed")]
    ospeed: Annotated[int, Doc("output speed")]
    cc: Annotated[list[int], Doc("c_cc, 32 bytes")]


class PtyInfo(Record, kw_only=True):
    """A pty pair's state (a master's; the slave's entry holds the same record)."""
    index: Annotated[int, Doc("pty number (/dev/pts/N)")]
    termios: Annotated[Termios | None, Doc("terminal attributes")] = None
    winsize: Annotated[Ints4 | None, Doc("rows, cols, xpixel, ypixel")] = \
        None
    packet: Annotated[bool, Doc("TIOCGPKT")] = False
    locked: Annotated[bool, Doc("TIOCGPTLCK")] = False
    sid: Annotated[int | None | UnsetType, Doc("session it controls (null: none)")] = UNSET
    fg_pgrp: Annotated[int | None | UnsetType, Doc("foreground group (null: none)")] = UNSET
    unread: Annotated[int, Doc("bytes queued (FIONREAD)")] = 0
    slave_closed: Annotated[bool, Doc("POLLHUP: no slave open")] = False
    packet_status: Annotated[bool, Doc("a packet-mode status byte waits")] = False
    ldisc: Annotated[int, Doc("line discipline (TIOCGETD)")] = 0
    slave_unread: Annotated[int, Doc("slave input not read")] = 0
    slave_ldisc: Annotated[int, Doc("the slave's line discipline")] = 0
    alias: Annotated[str | None, Doc("a /dev/tty alias of the slave")] = None
    error: Annotated[str | None, Doc("why it could not be read")] = None


class PtyQueue(Record, kw_only=True):
    """Bytes queued in a pty, read and put back (dump_tty.save_queues)."""
    to_master: Annotated[Hex, Doc("output the master has not read")] = ""
    to_slave: Annotated[Hex, Doc("input the slave has not read")] = ""
    lines: Annotated[list[Hex], Doc("complete canonical lines")] = field(default_factory=list)
    partial: Annotated[Hex, Doc("an incomplete line")] = ""
    lnext: Annotated[bool, Doc("ends with a literal-next")] = False


class TtyFile(FileBase, tag="tty", kw_only=True):
    """A terminal whose pty record could not be made (kind tty)."""
    pty: Annotated[PtyInfo | None, Doc("what was read of it")] = None
    tty_check: Annotated[list[str], Doc("why it cannot be restored")] = field(default_factory=list)


class PtyMasterFile(FileBase, tag="pty-master", kw_only=True):
    """A pty master (/dev/ptmx)."""
    pty: Annotated[PtyInfo, Doc("the pair's state")]
    pty_queue: Annotated[PtyQueue | None, Doc("bytes queued in it")] = None
    tty_check: Annotated[list[str], Doc("why it cannot be restored")] = field(default_factory=list)


class PtySlaveFile(FileBase, tag="pty-slave", kw_only=True):
    """A pty slave (/dev/pts/N)."""
    mode: Annotated[int, Doc("st_mode of /dev/pts/N (restore_tty's default 0o620)")] = 0o620
    pty: Annotated[PtyInfo, Doc("its master's record")]
    pty_alias: Annotated[str | None, Doc("opened as /dev/tty")] = None
    tty_check: Annotated[list[str], Doc("why it cannot be restored")] = field(default_factory=list)


class PipeInfo(Record, kw_only=True):
    """A pipe or FIFO and the bytes in flight in it (statefile/dump/pipes.py)."""
    ino: Annotated[int, Doc("pipe inode")]
    size: Annotated[int, Doc("F_GETPIPE_SZ")] = 0
    unread: Annotated[int | Literal["unknown"], Doc("bytes in flight, or 'unknown'")] = 0
    bytes: Annotated[int, Doc("bytes in flight (FIONREAD)")] = 0
    checked: Annotated[bool, Doc("every end was looked for")] = False
    data_file: Annotated[int | None, Doc("the entry whose blob holds the bytes")] = None
    external: Annotated[str | None, Doc("also open outside the tree: where")] = None
    error: Annotated[str | None, Doc("why it could not be read")] = None


class PipeFile(FileBase, tag="pipe", kw_only=True):
    """An end of an anonymous pipe."""
    pipe: Annotated[PipeInfo, Doc("the pipe")]


class FifoFile(FileBase, tag="fifo", kw_only=True):
    """An end of a named pipe."""
    pipe: Annotated[PipeInfo, Doc("the pipe")]


class SymlinkFile(FileBase, tag="symlink", kw_only=True):
    """An O_PATH|O_NOFOLLOW fd on a symbolic link."""
    symlink: Annotated[str | None, Doc("its target (null: unreadable)")]
    proc_link: Annotated[bool, Doc("a link on procfs")] = False


class OtherFile(FileBase, tag="other", kw_only=True):
    """Anything else (sockets of no kind crelf knows are 'socket')."""


# --- sockets ---

class Sockopts(Record, kw_only=True):
    """Socket options (ints, raw structs in hex); absent when not given."""
    priority: Annotated[int | None, Doc("SO_PRIORITY")] = None
    rcvlowat: Annotated[int | None, Doc("SO_RCVLOWAT")] = None
    mark: Annotated[int | None, Doc("SO_MARK")] = None
    passcred: Annotated[int | None, Doc("SO_PASSCRED")] = None
    passsec: Annotated[int | None, Doc("SO_PASSSEC")] = None
    dontroute: Annotated[int | None, Doc("SO_DONTROUTE")] = None
    no_check: Annotated[int | None, Doc("SO_NO_CHECK")] = None
    oobinline: Annotated[int | None, Doc("SO_OOBINLINE")] = None
    broadcast: Annotated[int | None, Doc("SO_BROADCAST")] = None
    keepalive: Annotated[int | None, Doc("SO_KEEPALIVE")] = None
    rcvtimeo: Annotated[Hex | None, Doc("SO_RCVTIMEO struct timeval")] = None
    sndtimeo: Annotated[Hex | None, Doc("SO_SNDTIMEO struct timeval")] = None
    linger: Annotated[Hex | None, Doc("SO_LINGER struct linger")] = None
    buf_lock: Annotated[int, Doc("SO_BUF_LOCK")] = 0
    sndbuf: Annotated[int | None, Doc("SO_SNDBUF")] = None
    rcvbuf: Annotated[int | None, Doc("SO_RCVBUF")] = None
    bindtodevice: Annotated[Hex | None, Doc("SO_BINDTODEVICE interface name")] = None
    peek_off: Annotated[int, Doc("SO_PEEK_OFF (unix)")] = -1
    ip_tos: Annotated[int | None, Doc("IP_TOS")] = None
    ip_ttl: Annotated[int | None, Doc("IP_TTL")] = None
    freebind: Annotated[int, Doc("IP_FREEBIND")] = 0
    transparent: Annotated[int | None, Doc("IP_TRANSPARENT")] = None
    ipv6_tclass: Annotated[int | None, Doc("IPV6_TCLASS")] = None
    ipv6_unicast_hops: Annotated[int | None, Doc("IPV6_UNICAST_HOPS")] = None
    tcp_nodelay: Annotated[int | None, Doc("TCP_NODELAY")] = None
    tcp_keepidle: Annotated[int | None, Doc("TCP_KEEPIDLE")] = None
    tcp_keepintvl: Annotated[int | None, Doc("TCP_KEEPINTVL")] = None
    tcp_keepcnt: Annotated[int | None, Doc("TCP_KEEPCNT")] = None
    tcp_cork: Annotated[int | None, Doc("TCP_CORK")] = None
    tcp_syncnt: Annotated[int | None, Doc("TCP_SYNCNT")] = None
    tcp_linger2: Annotated[int | None, Doc("TCP_LINGER2")] = None
    tcp_defer_accept: Annotated[int | None, Doc("TCP_DEFER_ACCEPT")] = None
    tcp_window_clamp: Annotated[int | None, Doc("TCP_WINDOW_CLAMP")] = None
    tcp_user_timeout: Annotated[int | None, Doc("TCP_USER_TIMEOUT")] = None
    tcp_notsent_lowat: Annotated[int | None, Doc("TCP_NOTSENT_LOWAT")] = None


class SocketBase(Record, tag_field="family", kw_only=True):
    """A socket (dump_files.socket_info); 'family' selects the record."""
    type: Annotated[str, Doc("stream, dgram, seqpacket, raw (or the number)")] = ""
    protocol: Annotated[int, Doc("protocol number")] = 0

    @property
    def family(self) -> str:
        """The record's tag: which kind of socket it is."""
        return type(self).__struct_config__.tag


class UnixName(Record, kw_only=True):
    """A unix socket address."""
    name: Annotated[str, Doc("path, or hex of an abstract name (leading NUL)")]
    abstract: Annotated[bool, Doc("an abstract name")] = False
    file_gone: Annotated[bool, Doc("its socket file was removed or replaced")] = False


class Sender(Record, kw_only=True):
    """Who sent a queued datagram (recvfrom's address)."""
    name: Annotated[str, Doc("path, or hex of an abstract name")]
    abstract: Annotated[bool, Doc("an abstract name")] = False
    bound: Annotated[list[int], Doc("inodes of the sockets holding that name now")] = \
        field(default_factory=list)


class SockFileLegacy(Record, kw_only=True):
    """Owner and mode of a unix socket's file, as statefiles before 4210bbc
    stored them (now UnixSocket.file_owner); read by nothing."""
    uid: Annotated[int, Doc("owner")]
    gid: Annotated[int, Doc("group")]
    mode: Annotated[int, Doc("permission bits")]


class UnixSocket(SocketBase, tag="unix", kw_only=True):
    """An AF_UNIX socket, with sock_diag's view of it (dump_sockets.unix_details)."""
    local: Annotated[str, Doc("getsockname, as text")] = ""
    peer: Annotated[str | None, Doc("getpeername, as text (absent: not connected)")] = None
    diag: Annotated[bool, Doc("false: sock_diag did not know it (nothing below)")] = True
    ino: Annotated[int | None, Doc("socket inode")] = None
    peer_ino: Annotated[int | None, Doc("peer's inode (0: none)")] = None
    name: Annotated[str | None | UnsetType, Doc("bound name (hex when abstract; null: none)")] = \
        UNSET
    abstract: Annotated[bool, Doc("bound to an abstract name")] = False
    shutdown: Annotated[int, Doc("shutdown bits (1 RCV, 2 SEND)")] = 0
    listening: Annotated[bool, Doc("listening")] = False
    state: Annotated[int | None, Doc("TCP_* state number from sock_diag")] = None
    file_gone: Annotated[bool, Doc("its socket file was removed or replaced")] = False
    file_owner: Annotated[Ints3 | None, Doc("[uid, gid, mode] of its file")] = \
        None
    sock_file: Annotated[SockFileLegacy | None,
                         Doc("legacy (before 4210bbc): its file's owner; now file_owner")] = None
    sockopts: Annotated[Sockopts | None, Doc("socket options")] = None
    max_backlog: Annotated[int, Doc("listen backlog (listeners)")] = 128
    backlog: Annotated[list[int], Doc("inodes of connections waiting to be accepted")] = \
        field(default_factory=list)
    backlog_of: Annotated[int | None, Doc("the listener whose backlog it is in")] = None
    backlog_data: Annotated[bool, Doc("a connection in a backlog has data queued")] = False
    backlog_queued: Annotated[int | None, Doc("connections queued (listeners)")] = None
    peer_name: Annotated[UnixName | None, Doc("the peer's bound name")] = None
    queue: Annotated[list[Hex], Doc("queued messages, oldest first")] = \
        field(default_factory=list)
    fds_in_flight: Annotated[bool, Doc("queued messages carry fds")] = False
    scm: Annotated[list[list[int]], Doc("per queued message, the CR_FILES entries it carries")] = \
        field(default_factory=list)
    scm_truncated: Annotated[bool, Doc("MSG_CTRUNC: some fds could not be read")] = False
    senders: Annotated[list[Sender | None], Doc("per queued datagram, its sender (null: "
                                                 "unnamed)")] = field(default_factory=list)


class TcpWindow(Record, kw_only=True):
    """TCP_REPAIR_WINDOW of a connection (struct tcp_repair_window)."""
    snd_wl1: Annotated[int, Doc("sequence number of the segment that last updated snd_wnd")]
    snd_wnd: Annotated[int, Doc("the peer's window")]
    max_window: Annotated[int, Doc("the largest window the peer offered")]
    rcv_wnd: Annotated[int, Doc("our window")]
    rcv_wup: Annotated[int, Doc("rcv_nxt when our window was last announced")]


class TcpConnection(Record, kw_only=True):
    """A TCP socket neither listening nor new (statefile/dump/tcp.py, docs/NETWORK.md):
    its state, and for a connection read in TCP repair mode what a restart
    needs to recreate it."""
    state: Annotated[str, Doc("the kernel's TCP state in lower case: established, syn_sent, "
                              "fin_wait1, fin_wait2, close_wait, last_ack, closing, close...")]
    error: Annotated[str | None, Doc("why it could not be read (refused: "
                                     "fd:socket:tcp-norepair)")] = None
    inq: Annotated[int | None, Doc("bytes received not read (SIOCINQ)")] = None
    outq: Annotated[int | None, Doc("bytes sent not acknowledged (SIOCOUTQ; our FIN not "
                                    "counted)")] = None
    unsent: Annotated[int | None, Doc("bytes at the end of the send queue never sent "
                                      "(SIOCOUTQNSD)")] = None
    send_seq: Annotated[int | None, Doc("sequence number after the send queue's last byte "
                                        "(write_seq; our FIN not counted)")] = None
    recv_seq: Annotated[int | None, Doc("sequence number after the last byte received "
                                        "(rcv_nxt; the peer's FIN not counted)")] = None
    send_queue: Annotated[Hex | None, Doc("the send queue's bytes")] = None
    recv_queue: Annotated[Hex | None, Doc("the receive queue's bytes")] = None
    fin_sent: Annotated[bool, Doc("the program sent its FIN (shutdown for writing)")] = False
    fin_received: Annotated[bool, Doc("the peer sent its FIN")] = False
    mss: Annotated[int | None, Doc("the MSS clamp (TCP_MAXSEG in repair mode)")] = None
    sack: Annotated[bool, Doc("SACK agreed")] = False
    timestamps: Annotated[bool, Doc("timestamps agreed")] = False
    snd_wscale: Annotated[int | None, Doc("the peer's window scale (absent: no scaling)")] = \
        None
    rcv_wscale: Annotated[int | None, Doc("our window scale")] = None
    timestamp: Annotated[int | None, Doc("the connection's timestamp clock (TCP_TIMESTAMP)")] = \
        None
    window: Annotated[TcpWindow | None, Doc("TCP_REPAIR_WINDOW")] = None
    congestion: Annotated[str | None, Doc("TCP_CONGESTION")] = None
    sndbuf: Annotated[int | None, Doc("SO_SNDBUF then (autotuned or not)")] = None
    rcvbuf: Annotated[int | None, Doc("SO_RCVBUF then")] = None
    shut_rd: Annotated[bool, Doc("the program called shutdown(SHUT_RD)")] = False


class InetSocket(SocketBase, tag="inet", kw_only=True):
    """An AF_INET socket."""
    local: Annotated[tuple[str, int] | None, Doc("[address, port]")] = None
    peer: Annotated[tuple[str, int] | None, Doc("[address, port] (absent: not connected)")] = None
    reuseaddr: Annotated[int, Doc("SO_REUSEADDR")] = 0
    reuseport: Annotated[int | None, Doc("SO_REUSEPORT")] = None
    listening: Annotated[bool, Doc("TCP: SO_ACCEPTCONN")] = False
    fresh: Annotated[bool, Doc("TCP, never connected")] = False
    tcp: Annotated[TcpConnection | None, Doc("TCP: a connection (or what is left of one)")] = \
        None
    sockopts: Annotated[Sockopts | None, Doc("socket options")] = None
    queued: Annotated[int | None, Doc("rx_queue of /proc/PID/net/{tcp,udp}")] = None


class Inet6Socket(SocketBase, tag="inet6", kw_only=True):
    """An AF_INET6 socket."""
    local: Annotated[tuple[str, int, int, int] | None,
                     Doc("[address, port, flowinfo, scope_id]")] = None
    peer: Annotated[tuple[str, int, int, int] | None,
                    Doc("[address, port, flowinfo, scope_id]")] = None
    reuseaddr: Annotated[int, Doc("SO_REUSEADDR")] = 0
    reuseport: Annotated[int | None, Doc("SO_REUSEPORT")] = None
    v6only: Annotated[int | None, Doc("IPV6_V6ONLY")] = None
    listening: Annotated[bool, Doc("TCP: SO_ACCEPTCONN")] = False
    fresh: Annotated[bool, Doc("TCP, never connected")] = False
    tcp: Annotated[TcpConnection | None, Doc("TCP: a connection (or what is left of one)")] = \
        None
    sockopts: Annotated[Sockopts | None, Doc("socket options")] = None
    queued: Annotated[int | None, Doc("rx_queue of /proc/PID/net/{tcp6,udp6}")] = None


class NetlinkSocket(SocketBase, tag="netlink", kw_only=True):
    """An AF_NETLINK socket (refused, or left out by policy)."""
    local: Annotated[Ints2 | None, Doc("[port id, groups]")] = None
    peer: Annotated[Ints2 | None, Doc("[port id, groups]")] = None


class PacketSocket(SocketBase, tag="packet", kw_only=True):
    """An AF_PACKET socket (refused)."""
    local: Annotated[list[str | int] | None, Doc("getsockname tuple")] = None
    peer: Annotated[list[str | int] | None, Doc("getpeername tuple")] = None


class UnknownSocket(SocketBase, tag="unknown", kw_only=True):
    """A socket whose fd could not be duplicated (only 'family')."""


Socket = UnixSocket | InetSocket | Inet6Socket | NetlinkSocket | PacketSocket | UnknownSocket


class SocketFile(FileBase, tag="socket", kw_only=True):
    """A socket."""
    socket: Annotated[Socket, Doc("family, type, addresses and queues")]


# --- anonymous inodes ---

class EventfdState(Record, kw_only=True):
    """An eventfd."""
    count: Annotated[int, Doc("counter")]
    semaphore: Annotated[bool, Doc("EFD_SEMAPHORE")]


class EpollTarget(Record, kw_only=True):
    """One file an epoll instance watches."""
    tfd: Annotated[int, Doc("the fd number it was added as")]
    events: Annotated[int, Doc("event mask")]
    data: Annotated[int, Doc("epoll_data (u64)")]
    fd: Annotated[int | None | UnsetType, Doc("the owner's fd for it now (null: none)")] = UNSET
    file: Annotated[int | None, Doc("its CR_FILES entry (epoll in flight)")] = None


class EpollState(Record, kw_only=True):
    """An epoll instance."""
    targets: Annotated[list[EpollTarget], Doc("what it watches")] = field(default_factory=list)


class TimerfdState(Record, kw_only=True):
    """A timerfd (settled: ticks read after expiry)."""
    clockid: Annotated[int, Doc("clock id")]
    ticks: Annotated[int, Doc("expirations not read")]
    settime_flags: Annotated[int, Doc("TFD_TIMER_* flags")]
    value: Annotated[Ints2, Doc("it_value [s, ns]")]
    interval: Annotated[Ints2, Doc("it_interval [s, ns]")]


class SignalfdState(Record, kw_only=True):
    """A signalfd."""
    sigmask: Annotated[int, Doc("signals it reads")]


class InotifyWatch(Record, kw_only=True):
    """An inotify watch."""
    wd: Annotated[int, Doc("watch descriptor")]
    ino: Annotated[int, Doc("watched inode")]
    mask: Annotated[int, Doc("event mask")]
    ignored_mask: Annotated[int, Doc("ignored mask")]
    path: Annotated[str | None, Doc("watched path (null: deleted or unknown)")]
    deleted: Annotated[str | None, Doc("path of a watched file deleted since")] = None
    sdev: Annotated[int, Doc("its device (deleted watches; readers: -1 when absent)")] = -1
    file: Annotated[int | None, Doc("the CR_FILES entry holding the deleted file open")] = None


class InotifyState(Record, kw_only=True):
    """An inotify instance."""
    watches: Annotated[list[InotifyWatch], Doc("its watches")] = field(default_factory=list)
    unread: Annotated[int | None, Doc("bytes of events queued")] = None


class FanotifyMark(Record, kw_only=True):
    """A fanotify mark."""
    mflags: Annotated[int, Doc("mark flags")]
    mask: Annotated[int, Doc("event mask")]
    ignored_mask: Annotated[int, Doc("ignored mask")]
    type: Annotated[Literal["inode", "mount", "filesystem"], Doc("what is marked")]
    ino: Annotated[int | None, Doc("inode (inode marks)")] = None
    path: Annotated[str | None, Doc("path of the marked object (null: not found)")]


class FanotifyState(Record, kw_only=True):
    """A fanotify group (statefile/dump/fanotify.py)."""
    flags: Annotated[int, Doc("fanotify_init flags")] = 0
    event_flags: Annotated[int | None, Doc("fanotify_init event_f_flags")] = None
    marks: Annotated[list[FanotifyMark], Doc("its marks")] = field(default_factory=list)
    unread: Annotated[int | None, Doc("bytes of events queued")] = None


class BpfMap(Record, kw_only=True):
    """A BPF map (statefile/dump/bpf.py)."""
    frozen: Annotated[bool, Doc("BPF_MAP_FREEZE'd")]
    type: Annotated[int | None, Doc("map type")] = None
    key_size: Annotated[int | None, Doc("key size")] = None
    value_size: Annotated[int | None, Doc("value size")] = None
    max_entries: Annotated[int | None, Doc("max entries")] = None
    map_flags: Annotated[int | None, Doc("map flags")] = None
    map_extra: Annotated[int, Doc("map_extra")] = 0
    name: Annotated[str | None, Doc("map name")] = None
    entries: Annotated[list[Hexes2] | UnsetType, Doc("[key, value] pairs, hex")] = \
        UNSET
    unsupported: Annotated[str | None, Doc("why it cannot be restored")] = None


class PidfdInfo(Record, kw_only=True):
    """A pidfd (statefile/dump/pidfd.py)."""
    pid: Annotated[int, Doc("pid as crelf sees it, -1: exited")]
    thread: Annotated[bool, Doc("PIDFD_THREAD")]
    ino: Annotated[int, Doc("the process's pidfs inode")]


class EventfdFile(FileBase, tag="anon:eventfd", kw_only=True):
    """An eventfd."""
    anon: Annotated[EventfdState, Doc("its state")]


class EpollFile(FileBase, tag="anon:eventpoll", kw_only=True):
    """An epoll instance."""
    anon: Annotated[EpollState, Doc("its state")]


class TimerfdFile(FileBase, tag="anon:timerfd", kw_only=True):
    """A timerfd."""
    anon: Annotated[TimerfdState, Doc("its state")]


class SignalfdFile(FileBase, tag="anon:signalfd", kw_only=True):
    """A signalfd."""
    anon: Annotated[SignalfdState, Doc("its state")]


class InotifyFile(FileBase, tag="anon:inotify", kw_only=True):
    """An inotify instance."""
    anon: Annotated[InotifyState, Doc("its state")]


class FanotifyFile(FileBase, tag="anon:fanotify", kw_only=True):
    """A fanotify group."""
    anon: Annotated[FanotifyState, Doc("its state")]


class BpfMapFile(FileBase, tag="anon:bpf-map", kw_only=True):
    """A BPF map."""
    bpf: Annotated[BpfMap, Doc("the map")]


class PidfdFile(FileBase, tag="anon:pidfd", kw_only=True):
    """A pidfd."""
    pidfd: Annotated[PidfdInfo | None, Doc("the process it refers to")] = None


class AnonOpaque(FileBase, kw_only=True):
    """An anonymous inode crelf keeps nothing of but the common fields
    (refused, or left out by the policy)."""


# kind "anon:<name>" for the anonymous inodes of no record of their own: the
# support table's (io_uring, perf_event, userfaultfd, bpf*) and others the
# kernel makes.  A name not listed here does not decode: add it.
OPAQUE_ANON = ("io_uring", "perf_event", "userfaultfd", "bpf-prog", "bpf_link", "bpf-link",
               "bpf_iter", "bpf-token", "dmabuf", "sync_file", "fscontext", "kvm-vm",
               "kvm-vcpu", "vfio-device", "watch_queue", "seccomp notify", "landlock-ruleset",
               "inotify_fd", "mshv")
_opaque = []
for _name in OPAQUE_ANON:
    _cls = types.new_class("Anon_" + "".join(c if c.isalnum() else "_" for c in _name),
                           (AnonOpaque,), {"tag": f"anon:{_name}", "kw_only": True})
    _cls.__doc__ = f"anon_inode:[{_name}]: nothing kept but the common fields."
    _opaque.append(_cls)
AnonOpaqueFiles = tuple(_opaque)

File = (RegularFile | DirectoryFile | CharDevice | BlockDevice | TtyFile | PtyMasterFile
        | PtySlaveFile | PipeFile | FifoFile | SymlinkFile | OtherFile | SocketFile
        | EventfdFile | EpollFile | TimerfdFile | SignalfdFile | InotifyFile | FanotifyFile
        | BpfMapFile | PidfdFile)
for _cls in AnonOpaqueFiles:
    File = File | _cls


# --- shared file objects (statefile/dump/memfd.py) ---

class ShmemBase(Record, tag_field="kind", kw_only=True):
    """A memfd or shared file object whose content is stored once (CR_FILES
    shmem).  When its content cannot be read ('unsupported') only id, kind,
    dev, ino, its name or path, hugetlb and unsupported are written."""
    id: Annotated[int, Doc("its index in shmem")]
    dev: Annotated[str, Doc("major:minor, hex without padding (mappings pad: 'fe:00')")] = ""
    ino: Annotated[int, Doc("inode")]
    size: Annotated[int, Doc("st_size")] = 0
    mode: Annotated[int, Doc("permission bits (st_mode & 0o7777)")] = 0o600
    uid: Annotated[int | None, Doc("owner")] = None
    gid: Annotated[int | None, Doc("group")] = None
    hugetlb: Annotated[int | bool | None,
                       Doc("hugetlbfs page size in bytes; true: a hugetlb mapping whose "
                           "object could not be opened")] = None
    blob: Annotated[int | None, Doc("program header of its content")] = None
    unsupported: Annotated[str, Doc("why its content cannot be read ('' for none)")] = ""

    @property
    def kind(self) -> str:
        """The record's tag: which kind of shared object it is."""
        return type(self).__struct_config__.tag


class MemfdObject(ShmemBase, tag="memfd", kw_only=True):
    """A memfd."""
    mode: Annotated[int, Doc("permission bits (restorer/restore/memfd.py _memfd's default 0o777)")] = 0o777
    name: Annotated[str | None, Doc("memfd name (without /memfd: and (deleted))")] = None
    seals: Annotated[int, Doc("F_GET_SEALS")] = 0


class DeletedFileObject(ShmemBase, tag="deleted", kw_only=True):
    """A deleted file open or mapped MAP_SHARED."""
    path: Annotated[str, Doc("its old path")] = ""
    tmpfile: Annotated[bool, Doc("made by O_TMPFILE, never named")] = False
    atime_ns: Annotated[int | UnsetType, Doc("st_atime_ns (readers: mtime_ns when absent)")] = \
        UNSET
    mtime_ns: Annotated[int | None, Doc("st_mtime_ns")] = None


class TmpfsFileObject(ShmemBase, tag="tmpfs", kw_only=True):
    """A file on tmpfs mapped MAP_SHARED (policy dump_tmpfs)."""
    path: Annotated[str, Doc("its path")] = ""


Shmem = MemfdObject | DeletedFileObject | TmpfsFileObject


class FilesNote(Note, kw_only=True):
    """CR_FILES: the open file descriptions of the whole tree."""
    files: Annotated[list[File], Doc("open file descriptions, by id")]
    shmem: Annotated[list[Shmem], Doc("memfds and shared file objects")] = \
        field(default_factory=list)


# ===================================================================== CR_SEGMENTS

class Segment(Record, kw_only=True):
    """One program header's data (index phdr)."""
    phdr: Annotated[int, Doc("program header index")]
    pid: Annotated[int, Doc("task it belongs to")]
    vaddr: Annotated[int, Doc("address (0 for a blob)")]
    memsz: Annotated[int, Doc("size in memory")]
    offset: Annotated[int, Doc("file offset of its data")]
    filesz: Annotated[int, Doc("end of the last stored run")]
    mapping: Annotated[int, Doc("index of its mapping in the task (-1: none)")] = -1
    runs: Annotated[list[Run], Doc("stored runs [offset in segment, length]")] = \
        field(default_factory=list)
    crc32: Annotated[int | None, Doc("CRC-32 of the stored runs (filesz > 0)")] = None
    chunks: Annotated[list[int] | None, Doc("CRC-32 per chunk_size chunk (format 2)")] = None
    blob: Annotated[str | None, Doc("what a blob holds (PT_CRELF_BLOB)")] = None


class SegmentsNote(Note, kw_only=True):
    """CR_SEGMENTS: every data segment."""
    chunk_size: Annotated[int, Doc("checksum chunk size (0/absent: format 1)")] = 0
    segments: Annotated[list[Segment], Doc("by program header")] = field(default_factory=list)


# ========================================================================== CR_IPC

class ShmSegment(Record, kw_only=True):
    """A SysV shared memory segment (/proc/sysvipc/shm)."""
    key: Annotated[int, Doc("IPC key")]
    shmid: Annotated[int, Doc("id")]
    perms: Annotated[int, Doc("mode bits")]
    size: Annotated[int, Doc("bytes")]
    uid: Annotated[int, Doc("owner")]
    gid: Annotated[int, Doc("group")]
    cuid: Annotated[int, Doc("creator uid")]
    cgid: Annotated[int, Doc("creator gid")]
    cpid: Annotated[int, Doc("creator pid")]
    nattch: Annotated[int, Doc("attachments")]
    ctime: Annotated[int, Doc("change time")] = 0
    content: Annotated[Hex | None, Doc("content, trailing zeros cut (not attached)")] = None


class SemSet(Record, kw_only=True):
    """A SysV semaphore set."""
    key: Annotated[int, Doc("IPC key")]
    semid: Annotated[int, Doc("id")]
    perms: Annotated[int, Doc("mode bits")]
    nsems: Annotated[int, Doc("number of semaphores")]
    uid: Annotated[int, Doc("owner")]
    gid: Annotated[int, Doc("group")]
    cuid: Annotated[int, Doc("creator uid")]
    cgid: Annotated[int, Doc("creator gid")]
    ctime: Annotated[int, Doc("change time")] = 0
    values: Annotated[list[int], Doc("semaphore values (GETALL)")]
    pids: Annotated[list[int], Doc("last pid per semaphore (GETPID)")]


class MsgMessage(Record, kw_only=True):
    """A queued SysV message."""
    type: Annotated[int, Doc("mtype")]
    data: Annotated[Hex, Doc("mtext, hex")]


class MsgQueue(Record, kw_only=True):
    """A SysV message queue."""
    key: Annotated[int, Doc("IPC key")]
    msqid: Annotated[int, Doc("id")]
    perms: Annotated[int, Doc("mode bits")]
    cbytes: Annotated[int, Doc("bytes queued")]
    qnum: Annotated[int, Doc("messages queued")]
    uid: Annotated[int, Doc("owner")]
    gid: Annotated[int, Doc("group")]
    cuid: Annotated[int, Doc("creator uid")]
    cgid: Annotated[int, Doc("creator gid")]
    lspid: Annotated[int, Doc("last sender")]
    lrpid: Annotated[int, Doc("last receiver")]
    ctime: Annotated[int, Doc("change time")] = 0
    messages: Annotated[list[MsgMessage], Doc("the queue, MSG_COPY, in order")] = \
        field(default_factory=list)


class SemUndo(Record, kw_only=True):
    """A task with a SEM_UNDO list."""
    pid: Annotated[int, Doc("the task")]
    threads: Annotated[int, Doc("its thread count")]


class IpcNote(Note, kw_only=True):
    """CR_IPC: SysV IPC objects of the tree."""
    shm: Annotated[list[ShmSegment], Doc("shared memory segments")] = field(default_factory=list)
    sem: Annotated[list[SemSet], Doc("semaphore sets")] = field(default_factory=list)
    msg: Annotated[list[MsgQueue], Doc("message queues")] = field(default_factory=list)
    sem_undo: Annotated[list[SemUndo], Doc("tasks with SEM_UNDO lists")] = \
        field(default_factory=list)


# ==================================================================== CR_INTEGRITY

class IntegrityNote(Note, kw_only=True):
    """CR_INTEGRITY: the last note, CRC-32 of every note before it."""
    notes: Annotated[list[tuple[str, int, int]], Doc("[owner, n_type, crc32 of the descriptor]")]


# ========================================================================== lookup

# (which note holds which record: statefile/format/notes.py NOTE_KINDS)

_DECODERS: dict[type, msgspec.json.Decoder] = {}
_ENCODER = msgspec.json.Encoder()


def decode(note_type: type[Note], desc: bytes) -> Note:
    """The typed record of one CRELF JSON note (its NUL padding cut)."""
    dec = _DECODERS.get(note_type)
    if dec is None:
        dec = _DECODERS[note_type] = msgspec.json.Decoder(note_type)
    return dec.decode(bytes(desc).rstrip(b"\0"))


def convert(note_type: type[Note], obj, version: int) -> Note:
    """The record of a note from a dict of its fields (the dump side's), checked:
    msgspec.ValidationError names the field that is wrong or unknown."""
    if isinstance(obj, Record):
        return obj
    return msgspec.convert({"v": version, **obj}, note_type)


def encode(note_type: type[Note], obj, version: int) -> bytes:
    """The JSON payload of a note from its record, or from a dict of the same
    fields (converted, hence validated, first)."""
    return _ENCODER.encode(convert(note_type, obj, version))


def task_pid(desc: bytes) -> int | None:
    """The pid a task note names, read untyped (for an error about the note)."""
    try:
        pid = msgspec.json.decode(bytes(desc).rstrip(b"\0")).get("pid")
    except (msgspec.DecodeError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None
