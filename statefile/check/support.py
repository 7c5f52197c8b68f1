"""What crelf can checkpoint and restart: the one table.

Every kind of resource a task can hold has one row here: whether this version
of crelf saves *and restores* it (``supported``), cannot restore it but a
policy may leave it out (``skippable``, with the policy class that does), or
cannot handle it at all (``unsupported``), and why.  crcheck, crcheckpoint
and docs/SUPPORT.md (generated from this table: ``python -m
statefile.check.support``) all read it, so supporting a new resource is one change
here plus its dump/restore modules.
"""

from __future__ import annotations

import os
from typing import Literal

import msgspec
from msgspec import UNSET

from statefile.format import records as rec

SUPPORTED, SKIPPABLE, UNSUPPORTED = "supported", "skippable", "unsupported"
Status = Literal["supported", "skippable", "unsupported"]


# msgspec Structs, as the statefile's records (statefile/format/records.py):
# one typed library for both, msgspec.to_builtins for crcheck --json, and a
# row frozen (hashable, never changed once the table is built).
class Resource(msgspec.Struct, frozen=True):
    """One row of the support table."""
    key: str
    what: str
    status: Status
    reason: str = ""
    policy: str | None = None  # the policy class that may skip it


_NOT_YET = "not restored by this version of crelf yet"

TABLE: tuple[Resource, ...] = (
    # --- tasks ---------------------------------------------------------------
    Resource("task:process", "a single process, any number of threads", SUPPORTED),
    Resource("task:tree", "more than one process (a process tree: original pids, "
             "parent/child links, sessions and process groups)", SUPPORTED),
    Resource("task:fdt-shared", "processes sharing one fd table (clone with CLONE_FILES, "
             "each cloned by a parent that shares it: cloned so again)", SUPPORTED),
    Resource("task:fdt-shared-other", "processes sharing one fd table whose sharers are "
             "not parent and child (a sharer's parent exited)", UNSUPPORTED,
             "an fd table shared by tasks that are not parent and child is not restored "
             "by this version"),
    Resource("task:fdt-shared-state", "processes sharing one fd table where a sharer other "
             "than the first holds file locks or leases, or works in a deleted directory",
             UNSUPPORTED, "the sharers after the first get their fd table from it; taking "
             "their locks and leases and entering their deleted working directory is not done "
             "by this version"),
    Resource("task:no-vdso", "a task that unmapped its vDSO and whose code has no "
             "`syscall; ret` or no rt_sigreturn instruction (one that unmapped its vDSO "
             "and has them, a libc's, is restored without a vDSO)", UNSUPPORTED,
             "crelf runs the syscalls that read a task's state in the task itself, through "
             "a `syscall; ret` of its vDSO or its code and a way back there if crcheckpoint "
             "dies (docs/CRASHSAFE.md); without one it cannot do so safely, so nothing "
             "is run in it"),
    Resource("task:zombie", "an exited child not reaped yet (recreated with its exit status)",
             SUPPORTED),
    Resource("task:seccomp", "a seccomp filter (other than crrun's monitor, which a "
             "restart leaves out), in any thread", UNSUPPORTED,
             f"seccomp filters are {_NOT_YET}; a filter could also refuse or kill the "
             "syscalls a checkpoint runs in the task, so it is refused before any"),
    Resource("task:seccomp-strict", "seccomp strict mode (SECCOMP_SET_MODE_STRICT), in any "
             "thread", UNSUPPORTED, "a thread in strict mode may only read, write, exit and "
             "sigreturn: any other syscall crelf ran in it to read its state (signal "
             "handlers, brk, ...) would kill it, and a restart could not set it up; "
             "refused before anything is done in the task"),
    Resource("task:ns-uts", "a UTS namespace of the tree's own, shared by all its tasks "
             "(hostname, domainname)", SUPPORTED),
    Resource("task:ns-ipc", "an IPC namespace of the tree's own, shared by all its tasks "
             "(every SysV object in it, its limits)", SUPPORTED),
    Resource("task:ns-mixed", "tasks of one tree in different UTS or IPC namespaces",
             UNSUPPORTED, "only a tree whose tasks all share one UTS and one IPC namespace "
             f"(crelf's or one of the tree's own) is restored; nested namespaces are {_NOT_YET}"),
    Resource("task:ns-pid", "a pid namespace of the tree's own whose init is the tree's "
             "root, every task in it (`unshare --pid --fork`, checkpointing its child; restarted "
             "in a new pid namespace with the pids, process groups and sessions the tasks saw)",
             SUPPORTED),
    Resource("task:ns-pid-other", "tasks of one tree in different pid namespaces (e.g. "
             "checkpointing `unshare` itself instead of its child, the namespace's init), a "
             "nested pid namespace, or a pid namespace whose init is not the tree's root",
             UNSUPPORTED, "only a tree whose tasks are all in crelf's pid namespace, or all "
             "in one pid namespace whose init is the tree's root, is restored; other "
             f"layouts are {_NOT_YET}"),
    Resource("task:namespace", "a mount, network, user, cgroup or time namespace other than "
             "crelf's own", UNSUPPORTED,
             "a restart would put the tasks in crelf's own mount, network, user, cgroup and "
             f"time namespaces: tasks in other ones are {_NOT_YET}"),
    Resource("task:cgroup", "a task or thread in a cgroup other than crcheckpoint's own (in "
             "any hierarchy)", UNSUPPORTED, "a restart puts every task in crrestart's own "
             "cgroups, so it would come back without its cgroup's limits and accounting; "
             f"restoring cgroup membership is {_NOT_YET} (checkpoint from inside the same "
             "cgroup: a tree in crcheckpoint's own cgroups comes back in crrestart's)"),
    Resource("task:posix-timer", "POSIX timers (timer_create)", UNSUPPORTED,
             f"POSIX timers are {_NOT_YET}"),
    Resource("task:attrs", "task attributes: scheduling policy, real-time priority and "
             "nice (per thread), oom_score_adj, audit login uid, THP-disable (prctl), "
             "membarrier registrations, mlock()ed memory, fsuid/fsgid, ambient capabilities, "
             "securebits, credentials of a thread that differ from its leader's, "
             "the signal that stopped a stopped task", SUPPORTED),
    Resource("task:oom-score-low", "an oom_score_adj below crelf's own when crelf lacks "
             "CAP_SYS_RESOURCE", UNSUPPORTED, "lowering oom_score_adj needs CAP_SYS_RESOURCE: "
             "a restart here could not set it back"),
    Resource("task:sched-privileged", "a scheduling policy or nice value the task's own "
             "RLIMIT_RTPRIO / RLIMIT_NICE do not allow, when crelf lacks CAP_SYS_NICE",
             UNSUPPORTED, "setting it again needs CAP_SYS_NICE: a restart here could not "
             "set it back"),
    Resource("task:traced", "a task traced by another tracer (debugger, strace); a traced "
             "descendant is listed with every other reason, a traced root is refused at "
             "once (crcheckpoint exit 3)", UNSUPPORTED,
             "a traced task cannot be frozen by crelf; detach the other tracer first"),
    Resource("task:flagged", "state crrun saw being created that no other row names",
             UNSUPPORTED, "crrun flagged it when it was created"),
    Resource("task:flag-denied", "a syscall crrun --strict made fail (the state was never "
             "created)", SUPPORTED),
    Resource("task:ptrace", "a ptrace relationship crrun saw being made (PTRACE_ATTACH, "
             "PTRACE_SEIZE, PTRACE_TRACEME)", UNSUPPORTED,
             "ptrace relationships cannot be checkpointed (a restart would bring the tasks "
             "back untraced)"),
    # --- file descriptors ----------------------------------------------------
    Resource("fd:regular", "regular file (path, flags, offset)", SUPPORTED),
    Resource("fd:deleted", "deleted-but-open regular file (content, size, owner, mode and "
             "times saved; one inode again for every fd and private mapping of it, in every "
             "task)", SUPPORTED,
             "policy 'file-contents' leaves the content out (restored as zeros)",
             "file-contents"),
    Resource("fd:deleted-linked", "regular file whose opened name was removed while another "
             "hard link keeps it (reopened by its file handle: the same inode; restarting needs "
             "root)", SUPPORTED),
    Resource("fd:deleted-lost", "regular file whose opened name was removed while another "
             "hard link keeps it, where no file handle can be had (a file system without "
             "them, or crcheckpoint not root)", UNSUPPORTED,
             "a restart could neither find the file again nor make a copy that stays the "
             "same file as its other links; checkpoint as root, or keep a name for it"),
    Resource("fd:deleted-dir", "removed directory still open, or a removed working "
             "directory (made again at its old path when that is free, with its mode, owner "
             "and times, then removed: nlink 0 as it was)", SUPPORTED),
    Resource("fd:fifo-deleted", "FIFO removed while open (made again at a scratch name, "
             "opened for every description with its bytes in flight, the name removed)",
             SUPPORTED),
    Resource("fd:proc-tree", "/proc/PID file or directory of a process of the tree (opened "
             "again for the restored process, by its new pid, once every task exists)",
             SUPPORTED),
    Resource("fd:proc-dead", "/proc/PID directory (or working directory) of a process that "
             "had exited (made again from a short-lived helper process)", SUPPORTED),
    Resource("fd:nsfs", "namespace file of a namespace the task is in (/proc/PID/ns/*; "
             "reopened in the restored task's namespace of that kind)", SUPPORTED),
    Resource("fd:nsfs-other", "namespace file of a namespace the task is not in", UNSUPPORTED,
             f"namespace files of other namespaces are {_NOT_YET}"),
    Resource("fd:tty-device", "terminal device node other than a pseudo-terminal (console, "
             "virtual console, serial line; reopened at its path, the same device number, "
             "taken again as controlling terminal if it was one)", SUPPORTED),
    Resource("fd:memfd", "memfd (name, size, content, seals, offset and flags; one object "
             "again for every fd and mapping of it, in every task)", SUPPORTED),
    Resource("fd:directory", "directory", SUPPORTED),
    Resource("fd:dev", "/dev/null, /dev/zero, /dev/full, /dev/random, /dev/urandom, or a "
             "device node of one of them elsewhere (reopened at its path, the same device "
             "number)", SUPPORTED),
    Resource("fd:dev-deleted", "removed device node of /dev/null, /dev/zero, /dev/full, "
             "/dev/random or /dev/urandom still open (made again with mknod: the same mode, "
             "device number, owner and times, opened for every description, removed: nlink 0 "
             "as it was; restarting needs CAP_MKNOD)", SUPPORTED),
    Resource("fd:symlink", "O_PATH fd on a symbolic link (open with O_PATH|O_NOFOLLOW: "
             "reopened at its path the same way, the same link)", SUPPORTED),
    Resource("fd:symlink-proc", "O_PATH fd on a symbolic link in /proc (a process's exe, "
             "cwd, root, fd/N, ns/*)", UNSUPPORTED,
             f"links in /proc are {_NOT_YET}: reopened by path they would lead to another "
             "process's"),
    Resource("fd:symlink-deleted", "O_PATH fd on a symbolic link removed since (made again "
             "with the same target, owner and times, opened for every description, removed: "
             "nlink 0 as it was)", SUPPORTED),
    Resource("fd:tty", "terminal outside the tree, e.g. a shell job's (restored on "
             "crrestart's terminal)", SUPPORTED),
    Resource("fd:tty-other", "a second terminal outside the tree", UNSUPPORTED,
             "only one terminal outside the tree can be restored (crrestart's own terminal "
             "stands in for it)"),
    Resource("fd:pty", "pseudo-terminal pair with both ends in the tree, or a master whose "
             "slave nobody holds (termios, window size, packet mode, lock, controlling "
             "terminal and foreground process group, the bytes queued in both directions: "
             "lines typed ahead, the line being typed, output the master has not read; the "
             "new pair has another /dev/pts number)", SUPPORTED),
    Resource("fd:pty-external", "pseudo-terminal master in the tree whose slave is open "
             "outside the tree (or a pty that could not be inspected)", UNSUPPORTED,
             "a restart cannot reconnect a pseudo-terminal to a process outside the tree"),
    Resource("fd:pty-unread", "pseudo-terminal holding bytes not read yet (typed ahead, or "
             "output its master did not read) that crelf cannot save: a master in packet "
             "mode, a locked pair, a line discipline other than N_TTY, EXTPROC, a slave's "
             "buffer full (4095 bytes: bytes may wait behind it), crcheckpoint without "
             "CAP_SYS_ADMIN or in the "
             "background of that terminal", UNSUPPORTED,
             "saving the bytes means reading them (which consumes them) and putting them "
             "back with TIOCSTI; in these cases they could not be given back as they were; "
             "checkpoint again when the terminal is idle"),
    Resource("fd:pty-session", "pseudo-terminal of the tree that is the controlling terminal "
             "of a session whose leader is not in the tree", UNSUPPORTED,
             f"such a controlling terminal is {_NOT_YET}"),
    Resource("fd:chr", "other character or block device (a removed terminal device node "
             "included)", UNSUPPORTED,
             "device files other than null/zero/full/random/urandom/tty cannot be restored"),
    Resource("fd:pipe", "pipe (size, O_NONBLOCK, bytes in flight)", SUPPORTED),
    Resource("fd:fifo", "FIFO (by path; size, O_NONBLOCK, bytes in flight)", SUPPORTED),
    Resource("fd:stdio-external", "stdin, stdout or stderr on a pipe to a process outside "
             "the tree (the harness or shell that started it): restored on crrestart's own "
             "stdin, stdout or stderr, as a terminal is; bytes in flight stay in the old pipe",
             SUPPORTED),
    Resource("fd:pipe-external", "pipe or FIFO also open in a process outside the tree",
             UNSUPPORTED, "a restart cannot reconnect a pipe to a process outside the tree "
             "(and cannot read the bytes in flight without consuming them when that process "
             "holds the read end)"),
    Resource("fd:socket:unix-pair", "connected unix socket pair with both ends in the tree "
             "(queued data and shutdown state)", SUPPORTED),
    Resource("fd:socket:unix-connected", "unix socket connected by name to another socket of "
             "the tree: a datagram client of a bound socket (connected again to its path "
             "once that is bound), or a stream or seqpacket connection accepted from a listening "
             "socket (queued data and shutdown state; getsockname/getpeername give the same "
             "paths again)", SUPPORTED,
             "an abstract name of an accepted stream or seqpacket connection, or a path when "
             "crrestart may not chroot (unprivileged), comes back unnamed (crrestart warns)"),
    Resource("fd:socket:unix-listen", "listening unix socket (path or abstract name; a stale "
             "socket file nobody is bound to is replaced; a socket whose file was deleted or "
             "replaced gets its name back without a file, the path left as it is)", SUPPORTED),
    Resource("fd:socket:unix-dgram", "unconnected unix socket (datagram, or a stream or "
             "seqpacket socket not connected yet; bound again to its name, also when its file "
             "was deleted or replaced); a datagram socket connected to itself or whose peer "
             "closed; queued datagrams are sent to it again from their sender's address",
             SUPPORTED),
    Resource("fd:socket:unix-peerless", "connected unix stream or seqpacket socket whose peer "
             "has closed (its unread data kept; reads then see end-of-file, writes EPIPE)",
             SUPPORTED),
    Resource("fd:socket:unix-fds", "unix socket with file descriptors in flight (SCM_RIGHTS "
             "messages sent, not received yet) in a socket pair, or whose peer has closed: "
             "the queue sent again with the same message boundaries and the same files "
             "(pipes, regular files, directories, devices, eventfd/timerfd/signalfd/epoll, unix "
             "and listening or unconnected inet sockets, also files whose only reference is the "
             "message, and sockets in flight in each other's queues)", SUPPORTED),
    Resource("fd:socket:unix-fds-other", "file descriptors in flight in a unix socket that a "
             "restart cannot send again: a file of another kind (pidfd, tty, pty, memfd or "
             "deleted file, inotify, fanotify, io_uring, namespace, /proc file...), one with "
             "locks, a lease or a SIGIO owner, a datagram sent to a named socket by another "
             "than its peer, a message carrying more fds than crelf could receive, an epoll "
             "watching a file outside the tree, a receiver with SO_PASSCRED (the messages' "
             "SCM_CREDENTIALS)", UNSUPPORTED,
             "crrestart sends the queued messages again from the socket's peer, with files it "
             "makes itself before the tree is forked; this file or message cannot be made or "
             "sent so by this version of crelf (checkpoint again once the receiver has read "
             "it)"),
    Resource("fd:socket:unix-external", "unix socket connected to a process outside the tree "
             "(a stream or seqpacket connection, also one still waiting to be accepted there, "
             "or a datagram socket whose peer has no name or whose peer's file is no longer "
             "at its path)", SKIPPABLE,
             "a unix socket connected to a process outside the tree cannot be reconnected by "
             "a restart (a new stream connection would not be the old one to that process, "
             "which would take it for a new client; an unnamed datagram peer cannot be found "
             "again); policy 'external-unix' (crcheckpoint --ext-unix-sk) restores it as a "
             "connection its peer has closed, as if that process had gone: the bytes it had "
             "not read yet, then end-of-file; writes fail (EPIPE, a datagram ECONNREFUSED), "
             "and a program that reconnects then does so itself", "external-unix"),
    Resource("fd:socket:unix-external-dgram", "unix datagram socket connected to a named "
             "socket of a process outside the tree (syslog's /dev/log...)", SKIPPABLE,
             "a restart cannot bring back a process outside the tree; policy 'external-unix' "
             "(crcheckpoint --ext-unix-sk) connects the socket again to the same name at "
             "restart, where that process must still be bound (else the restart fails)",
             "external-unix"),
    Resource("fd:socket:unix-backlog", "listening unix stream or seqpacket socket with "
             "connections from sockets of the tree waiting to be accepted, and those "
             "connecting sockets (listening again with its listen() limit, then each client "
             "connects again in queue order: accept() gives them in the same order)",
             SUPPORTED),
    Resource("fd:socket:unix-backlog-data", "unix socket whose connection is waiting to be "
             "accepted and holds bytes or file descriptors it sent", UNSUPPORTED,
             "what a connection not accepted yet was sent sits on the listener's side, where "
             "only accept() reaches it, and accepting it would take it from the program; "
             "checkpoint again once it is accepted"),
    Resource("fd:socket:unix-backlog-external", "listening unix socket with a connection "
             "waiting to be accepted from a socket outside the tree, or from one closed "
             "since", UNSUPPORTED, "a restart cannot connect a process outside the tree "
             "again, and whether a closed client sent data cannot be read without accepting "
             "its connection; checkpoint again once the connections waiting to be accepted "
             "are accepted"),
    Resource("fd:socket:unix-sender", "unix datagram socket holding a datagram whose sender's "
             "name is now bound by a socket outside the tree", UNSUPPORTED,
             "the datagram could not be sent again from its sender's address (recvfrom would "
             "lose it); checkpoint again once it is read"),
    Resource("fd:socket:unix", "other unix socket (one sock_diag does not report)", UNSUPPORTED,
             "this unix socket could not be inspected"),
    Resource("fd:socket:inet-listen", "listening TCP socket with no connection waiting to "
             "be accepted (listening again on its address, with SO_REUSEADDR, SO_REUSEPORT "
             "and IPV6_V6ONLY as they were)", SUPPORTED),
    Resource("fd:socket:inet-udp", "unconnected UDP socket with no datagram queued (bound "
             "again to its address)", SUPPORTED),
    Resource("fd:socket:inet-fresh", "TCP socket never connected nor listening (bound "
             "again if it was bound; its options as they were)", SUPPORTED),
    Resource("fd:socket:tcp", "established TCP connection, IPv4 or IPv6, to a peer inside "
             "or outside the tree, also one shut down in one direction or both (FIN_WAIT1, "
             "FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING: the program's FIN sent again, the "
             "peer's replayed) (sequence numbers, both queues, window, MSS, "
             "window scale, SACK, timestamps and socket options restored with the kernel's "
             "TCP repair mode; its packets held back by a firewall rule until the restored socket is "
             "live: docs/NETWORK.md)", SUPPORTED),
    Resource("fd:socket:tcp-norepair", "established TCP connection where TCP repair mode or "
             "the firewall lock cannot be used", SKIPPABLE,
             "reading and restoring a connection needs TCP_REPAIR (root: CAP_NET_ADMIN) and "
             "nftables (the nft command) to hold its packets back; policy 'network' restores "
             "it as a new unconnected socket", "network"),
    Resource("fd:socket:tcp-connecting", "TCP socket in the middle of its handshake "
             "(SYN_SENT: connect() in progress; SYN_RECV)", SKIPPABLE,
             "repair mode cannot resume a handshake (connect() in repair mode makes the "
             "connection established at once); policy 'network' restores it as a new "
             "unconnected socket (the program's connect() then fails)", "network"),
    Resource("fd:socket:tcp-closed", "TCP socket whose connection ended (closed by both "
             "ends or reset) while the program still holds it", SKIPPABLE,
             f"an ended connection's socket (what its read and write then return) is {_NOT_YET}; "
             "policy 'network' restores it as a new unconnected socket", "network"),
    Resource("fd:socket:inet", "listening or UDP socket with connections or datagrams "
             "queued", SKIPPABLE,
             f"queued connections or datagrams are {_NOT_YET}; policy "
             "'network' restores a connection as a new unconnected socket of the same family "
             "and type on the same fd (as after a network failure: recv/read fail with "
             "ENOTCONN, send/write with EPIPE, SIGPIPE too unless ignored; connect() on it "
             "reconnects), a listening or UDP socket bound again with its queue empty",
             "network"),
    Resource("fd:socket:netlink", "netlink socket", SKIPPABLE,
             f"netlink sockets are {_NOT_YET}; policy 'network' restores a new unbound "
             "netlink socket of the same protocol on the same fd (its bindings, "
             "subscriptions and queued messages are lost)", "network"),
    Resource("fd:socket:other", "socket of another family", UNSUPPORTED,
             "this socket family cannot be checkpointed"),
    Resource("fd:lock", "file lock: POSIX record lock (fcntl F_SETLK, taken again by its "
             "process), OFD lock (F_OFD_SETLK) or flock(2) lock (taken again on its open file "
             "description)", SUPPORTED),
    Resource("fd:lock-other", "a lock of another kind (an NFS delegation or layout, a lock "
             "on a file without an inode)", UNSUPPORTED,
             "only POSIX, OFD and flock locks and leases can be taken again by a restart"),
    Resource("fd:lease", "file lease (F_SETLEASE read or write lease; one being broken comes "
             "back being broken, to the same type, its break time starting again)", SUPPORTED),
    Resource("fd:lease-deleted", "deleted-but-open file under a write lease (or one being "
             "broken)", UNSUPPORTED, "its content cannot be read without opening it, and an "
             "open breaks the lease (and waits for the frozen holder to give it up)"),
    Resource("fd:fown", "SIGIO owner of a file (F_SETOWN/F_SETOWN_EX: a process, thread or "
             "process group of the tree, with the uid and euid it was set with), its signal "
             "(F_SETSIG) and O_ASYNC", SUPPORTED),
    Resource("fd:fown-external", "SIGIO owner (F_SETOWN) that is a process, thread or process "
             "group outside the tree", UNSUPPORTED,
             "a restart cannot make a process outside the tree the owner of a restored file "
             "(it may be gone or be another process by then)"),
    Resource("fd:fown-thread", "SIGIO owner (F_SETOWN_EX F_OWNER_TID) that is a thread of "
             "another process of the tree, one that does not hold the file itself",
             UNSUPPORTED, f"such an owner is {_NOT_YET}"),
    Resource("fd:eventfd", "eventfd (counter, semaphore mode)", SUPPORTED),
    Resource("fd:epoll", "epoll instance (watched files with events and data, each under "
             "the fd number it was added with, also when that fd was closed or now holds "
             "another file)", SUPPORTED),
    Resource("fd:epoll-elsewhere", "epoll instance watching a file that no fd of its task "
             "holds any more (open only in another process)", UNSUPPORTED,
             "an epoll instance watches a file its task no longer has open: a restart could "
             "not add it again"),
    Resource("fd:timerfd", "timerfd (clock, remaining time, interval, expirations not read "
             "yet; the time spent checkpointed does not count)", SUPPORTED),
    Resource("fd:signalfd", "signalfd (mask)", SUPPORTED),
    Resource("fd:inotify", "inotify instance (watches by path, same watch numbers)", SUPPORTED),
    Resource("fd:inotify-unread", "inotify instance with events queued and not read yet",
             SKIPPABLE, "queued inotify events cannot be read without consuming them (nor put "
             "back: the kernel has no call for it); checkpoint again once the program has read "
             "them, or policy 'notify-events' restores the instance with its watches and an "
             "empty queue (those events are lost)", "notify-events"),
    Resource("fd:anon-shared", "eventfd/epoll/timerfd/signalfd/inotify shared by several "
             "processes", UNSUPPORTED, f"sharing these between processes is {_NOT_YET}"),
    Resource("fd:inotify-lost", "inotify watch whose file cannot be found", UNSUPPORTED,
             "an inotify watch names a file crelf could not find (no permission to resolve "
             "its handle, or deleted and not open in the task any more: a deleted file the "
             "task still holds open is watched again on its recreated inode)"),
    Resource("fd:io_uring", "io_uring instance", SKIPPABLE,
             "io_uring instances cannot be checkpointed (in-flight requests live in the "
             "kernel); policy 'io_uring' restores the fd closed", "io_uring"),
    Resource("fd:perf_event", "perf event", SKIPPABLE,
             "perf events cannot be checkpointed; policy 'perf' restores the fd closed", "perf"),
    Resource("fd:bpf-map", "a BPF hash, array or LRU hash map (its definition, name, entries "
             "and frozen state; created again at restart, which needs root or CAP_BPF)",
             SUPPORTED),
    Resource("fd:bpf", "any other BPF object: a program, link or BTF object, a per-CPU map, a "
             "map of maps, an offloaded map or one with BTF types", UNSUPPORTED,
             "its state is more than entries crelf can read back (a program would have to be "
             "loaded and attached again): not restored by this version of crelf"),
    Resource("fd:fanotify", "a fanotify group of the notification class, its inode, mount and "
             "file system marks (added again on their paths; needs root)", SUPPORTED),
    Resource("fd:fanotify-unread", "a fanotify group with events queued and not read yet",
             SKIPPABLE, "queued fanotify events cannot be read without consuming them (nor put "
             "back); a mark on a busy mount fills the queue all the time, crcheckpoint's own "
             "file accesses included. Policy 'notify-events' restores the group with its marks "
             "and an empty queue (those events are lost)", "notify-events"),
    Resource("fd:fanotify-other", "a fanotify group with a mark whose object cannot be "
             "found, or of a permission class", UNSUPPORTED,
             "a mark needs the object it is on (deleted, or not visible), and a permission "
             "event a task is answering cannot be given back"),
    Resource("fd:userfaultfd", "userfaultfd", UNSUPPORTED,
             "a userfaultfd owned by the application cannot be checkpointed"),
    Resource("fd:pidfd", "a pidfd of a process or thread of the tree, or of a process that "
             "has exited (opened again on the restarted one; an exited one refers to an "
             "exited process again)", SUPPORTED),
    Resource("fd:pidfd-external", "a pidfd of a live process outside the tree", UNSUPPORTED,
             "that process is not part of the checkpoint, so the restarted tree could not "
             "refer to it; checkpoint the process with the tree (a common ancestor)"),
    Resource("fd:other", "other anonymous-inode file", UNSUPPORTED,
             "this kind of file cannot be checkpointed"),
    # --- SysV IPC ----------------------------------------------------------------
    Resource("ipc:shm", "SysV shared memory segment (id, key, owner, mode, content; "
             "restored with its id)", SUPPORTED),
    Resource("ipc:sem", "SysV semaphore set (id, key, owner, mode, values)", SUPPORTED),
    Resource("ipc:sem-undo", "a task of a tree using SysV semaphores that holds SEM_UNDO "
             "adjustments (it did a semop with SEM_UNDO; a multi-threaded task always has "
             "an undo list, which cannot be told empty from outside)", UNSUPPORTED,
             "sem undo is not restored"),
    Resource("ipc:msg", "SysV message queue (id, key, owner, mode, queued messages)",
             SUPPORTED),
    # --- memory ----------------------------------------------------------------
    Resource("mem:private", "private memory (anonymous, heap, stack, file-backed)", SUPPORTED),
    Resource("mem:file-shared", "shared file mapping (content stays in the file)", SUPPORTED),
    Resource("mem:vdso", "vDSO", SUPPORTED),
    Resource("mem:scratch", "scratch memory: marked MADV_DONTDUMP, or named 'crelf-scratch'",
             SUPPORTED,
             "policy 'scratch' leaves its content out (restored as zeros)", "scratch"),
    Resource("mem:shared-anon", "MAP_SHARED anonymous memory (one shared region again for "
             "every task that shares it) or an attached SysV shm segment", SUPPORTED),
    Resource("mem:shared-memfd", "mapping of a memfd (MAP_SHARED: one shared object again "
             "for every task; MAP_PRIVATE: its copied-on-write pages too) or MAP_SHARED "
             "mapping of a deleted file (a shm_unlink'ed POSIX shm)", SUPPORTED),
    Resource("mem:shared-other", "memfd or shared deleted/tmpfs file crelf cannot save "
             "(mapped only, without root)", UNSUPPORTED,
             "its content cannot be saved or recreated by this version of crelf"),
    Resource("mem:aio", "an AIO context (io_setup) and its ring: size, head, tail and the "
             "completed events not reaped yet (requests still in flight at the checkpoint "
             "cannot be seen and are not restored)", SUPPORTED),
    Resource("mem:aio-other", "an AIO ring crelf cannot read", UNSUPPORTED,
             "its header is not the kernel's aio_ring layout crelf knows"),
    Resource("mem:device", "device (I/O or PFN) mapping", UNSUPPORTED,
             "device mappings cannot be checkpointed"),
)
# (a Struct's constructor does not check types: the table is checked once here,
# so a row with a status that is not one of the three fails at import)
msgspec.convert(msgspec.to_builtins(TABLE), tuple[Resource, ...])
BY_KEY = {r.key: r for r in TABLE}
POLICY_CLASSES = sorted({r.policy for r in TABLE if r.policy})
SCRATCH_NAME = "[anon:crelf-scratch]"
DEV_FILES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}
DEV_RDEVS = {os.makedev(1, n) for n in (3, 5, 7, 8, 9)}   # ... their device numbers

_ANON = {"eventfd": "fd:eventfd", "eventpoll": "fd:epoll", "timerfd": "fd:timerfd",
         "signalfd": "fd:signalfd", "inotify": "fd:inotify", "io_uring": "fd:io_uring",
         "perf_event": "fd:perf_event", "userfaultfd": "fd:userfaultfd",
         "pidfd": "fd:pidfd", "fanotify": "fd:fanotify"}


_ANON_KEYS = {"fd:eventfd", "fd:epoll", "fd:timerfd", "fd:signalfd", "fd:inotify"}


def _unix(f: rec.File) -> rec.UnixSocket | None:
    """The unix socket of file f, if it is one."""
    if isinstance(f, rec.SocketFile) and isinstance(f.socket, rec.UnixSocket):
        return f.socket
    return None


def _unix_key(f: rec.SocketFile, files: list[rec.File], holders: dict, fid: int) -> str:
    info = f.socket

    def held() -> list[rec.UnixSocket]:
        return [u for i, g in enumerate(files) if holders.get(i) and (u := _unix(g))]
    if not info.diag or info.ino is None:
        return "fd:socket:unix"
    if info.listening or info.backlog_of:
        return _backlog_key(info, held)
    if info.fds_in_flight:
        return "fd:socket:unix-fds" if not scm_problem(f, files, holders) else \
            "fd:socket:unix-fds-other"
    if info.senders and _unreproducible_sender(info, held()):
        return "fd:socket:unix-sender"
    if not info.peer_ino:
        if info.type != "dgram" and info.state == 1:   # TCP_ESTABLISHED
            return "fd:socket:unix-peerless"
        return "fd:socket:unix-dgram"
    peer = next((i for i, g in enumerate(files)
                 if (u := _unix(g)) and u.ino == info.peer_ino), None)
    if peer is None or not holders.get(peer):
        return _external_key(info)
    if info.name or files[peer].socket.name:
        return "fd:socket:unix-connected"
    return "fd:socket:unix-pair"


def _external_key(info: rec.UnixSocket) -> str:
    """A unix socket connected to a socket no task of the tree holds: a
    datagram one to a name that still leads to its peer can be connected to
    that name again; any other can only come back as a connection its peer
    closed (both under policy 'external-unix')."""
    name = info.peer_name
    if info.type == "dgram" and name is not None and not name.file_gone:
        return "fd:socket:unix-external-dgram"
    return "fd:socket:unix-external"


def _backlog_key(info: rec.UnixSocket, held) -> str:
    """A listening socket, or a socket whose connection waits in a
    listener's queue (dump/unix.py backlog_details)."""
    if info.listening and not info.backlog_queued and not info.backlog:
        return "fd:socket:unix-listen"
    tree = {u.ino for u in held()}
    if info.listening:
        waiting = info.backlog
        if len(waiting) != info.backlog_queued or not set(waiting) <= tree:
            return "fd:socket:unix-backlog-external"
        return "fd:socket:unix-backlog"
    if info.backlog_of not in tree:
        return "fd:socket:unix-external"    # (waiting on a listener outside the tree)
    if info.backlog_data:
        return "fd:socket:unix-backlog-data"
    return "fd:socket:unix-backlog"


def _unreproducible_sender(info: rec.UnixSocket, held: list[rec.UnixSocket]) -> bool:
    """A queued datagram whose sender's name is bound by a socket outside the
    tree: a restart could not send it again from that name."""
    tree = {u.ino for u in held}
    return any(s is not None and set(s.bound) - tree for s in info.senders)


# Files a restart can make in crrestart (before the tree is forked) and send
# again in flight (restorer/restore/scm.py), by support key.
_SCM_KINDS = {"fd:regular", "fd:directory", "fd:dev", "fd:chr", "fd:pipe", "fd:fifo",
              "fd:eventfd", "fd:epoll", "fd:timerfd", "fd:signalfd",
              "fd:socket:inet-listen", "fd:socket:inet-udp", "fd:socket:inet-fresh",
              "fd:socket:unix"}


def scm_problem(f: rec.SocketFile, files: list[rec.File], holders: dict) -> str:
    """Why the messages in flight in unix socket f (its `scm`, statefile/dump/scm.py)
    cannot be sent again ("" when they can)."""
    info = f.socket
    if not info.scm:
        return "the files in flight could not be told apart"
    if info.scm_truncated:
        return "a message carries more file descriptors than crelf could receive"
    if info.sockopts is not None and info.sockopts.passcred:
        return "its reader gets each message's sender credentials (SO_PASSCRED, " \
            "SCM_CREDENTIALS): crrestart cannot send them again as the original sender's"
    peer = info.peer_ino
    if peer:
        p = next((g for g in files if (u := _unix(g)) and u.ino == peer), None)
        if p is None or not holders.get(p.id) or p.socket.peer_ino != info.ino:
            return "its messages were not sent by a peer connected to it in the tree"
    elif info.state != 1 or (info.type == "dgram" and info.name):
        return "datagrams sent to its name by other sockets (crrestart sends them again " \
            "from its peer only)"
    for ids in info.scm:
        for fid in ids:
            why = _scm_file_problem(files[fid], files, holders)
            if why:
                return why
    return ""


def _scm_file_problem(g: rec.File, files: list[rec.File], holders: dict) -> str:
    """Why file g cannot be sent again in flight ("" when it can)."""
    key = fd_key(g)
    what = f"{g.path} in flight"
    if key not in _SCM_KINDS or _proc(g) is not None:
        return f"{what}: a {g.kind} file ({key}) is not sent again by this version"
    if g.locks or g.lease or g.fown or g.locks_other:
        return f"{what}: it has locks, a lease or a SIGIO owner"
    if key == "fd:socket:unix":
        si = g.socket
        if not si.diag or si.ino is None:
            return f"{what}: a unix socket that could not be inspected"
        if si.backlog_queued:
            return f"{what}: a listening socket with connections waiting"
        peer = si.peer_ino
        peers = [h for h in files if peer and (u := _unix(h)) and u.ino == peer]
        if peer and not any(holders.get(h.id) for h in peers):
            return f"{what}: a unix socket connected outside the tree"
        named = si.name or any(h.socket.name for h in peers)
        if g.in_flight and named and not si.listening:
            return f"{what}: a named socket or one connected to a name, held only in flight"
    if key == "fd:epoll" and g.in_flight:
        targets = g.anon.targets
        if any(t.file is None for t in targets):
            return f"{what}: an epoll watching a file outside the tree"
        for t in targets:       # (made by crrestart too: restorer/restore/scm.py)
            if t.file != g.id and not files[t.file].in_flight:
                why = _scm_file_problem(files[t.file], files, holders)
                if why:
                    return f"{what}: it watches {why}"
    return ""


def scm_carriers(tasks, files: list[rec.File]) -> dict[int, tuple[int, int, int]]:
    """{file id: (pid, fd, socket file id)} for every file held only in
    flight (no task holds it): the task and fd of a socket of the tree whose
    queue holds it (maybe through sockets in flight in each other's queues),
    and the socket whose queue holds it."""
    held: dict[int, tuple[int, int]] = {}
    for t in tasks:
        for d in t.fds:
            held.setdefault(d.file, (t.pid, d.fd))
    out: dict[int, tuple[int, int, int]] = {}
    todo = [(fid, at) for fid, at in held.items() if (u := _unix(files[fid])) and u.scm]
    while todo:
        via, at = todo.pop()
        for ids in files[via].socket.scm:
            for fid in ids:
                if fid in held or fid in out:
                    continue
                out[fid] = (*at, via)
                if (u := _unix(files[fid])) and u.scm:
                    todo.append((fid, at))
    return out


def _proc(f: rec.File) -> rec.ProcRef | None:
    """The /proc/PID reference of a regular file or directory, if it has one."""
    return f.proc if isinstance(f, (rec.RegularFile, rec.DirectoryFile)) else None


def fd_key(f: rec.File) -> str:
    kind = f.kind
    proc = _proc(f)
    if proc is not None and proc.dead:
        return "fd:proc-dead"
        # (a /proc file of a process outside the tree: by its path, as any file)
    if isinstance(f, rec.RegularFile):
        if f.nsfs is not None:
            return "fd:nsfs" if f.nsfs.name else "fd:nsfs-other"
        if f.linked is not None:
            return "fd:deleted-linked" if f.linked.handle else "fd:deleted-lost"
        if f.deleted and f.path.startswith("/memfd:"):
            return "fd:memfd"
        return "fd:deleted" if f.deleted else "fd:regular"
    if isinstance(f, rec.DirectoryFile):
        return "fd:deleted-dir" if f.deleted else "fd:directory"
    if isinstance(f, rec.FifoFile) and f.deleted:
        return "fd:fifo-deleted"
    if kind == "tty":
        return "fd:tty"
    if kind in ("pty-master", "pty-slave"):
        return "fd:pty"
    if isinstance(f, rec.SymlinkFile):
        if f.proc_link:
            return "fd:symlink-proc"
        if f.deleted:    # (made again from its target: unknown, it cannot be)
            return "fd:symlink-deleted" if f.symlink is not None else "fd:other"
        return "fd:symlink"
    if isinstance(f, (rec.CharDevice, rec.BlockDevice)):
        memdev = kind == "chr" and f.rdev in DEV_RDEVS
        if f.deleted:
            return "fd:dev-deleted" if memdev else "fd:chr"
        if isinstance(f, rec.CharDevice) and f.tty_device:
            return "fd:tty-device"
        return "fd:dev" if f.path in DEV_FILES or memdev else "fd:chr"
    if kind in ("pipe", "fifo"):
        return f"fd:{kind}"
    if isinstance(f, rec.SocketFile):
        info = f.socket
        if isinstance(info, (rec.InetSocket, rec.Inet6Socket)):
            if info.type == "stream" and info.fresh and info.peer is None:
                return "fd:socket:inet-fresh"
            if info.queued == 0:
                if info.type == "stream" and info.listening:
                    return "fd:socket:inet-listen"
                if info.type == "dgram" and info.peer is None:
                    return "fd:socket:inet-udp"
            if info.tcp is not None:
                return _tcp_key(info.tcp)
        return {"unix": "fd:socket:unix", "inet": "fd:socket:inet", "inet6": "fd:socket:inet",
                "netlink": "fd:socket:netlink"}.get(info.family, "fd:socket:other")
    if kind.startswith("anon:"):
        name = kind[5:]
        if isinstance(f, rec.BpfMapFile) and f.bpf.entries is not UNSET:
            return "fd:bpf-map"
        if name.startswith("bpf"):
            return "fd:bpf"
        return _ANON.get(name, "fd:other")
    return "fd:other"


def _tcp_key(tcp: rec.TcpConnection) -> str:
    """The row of a TCP connection (its `tcp` record, statefile/dump/tcp.py)."""
    if tcp.state in ("established", "fin_wait1", "fin_wait2", "close_wait", "last_ack",
                     "closing"):
        return "fd:socket:tcp-norepair" if tcp.error else "fd:socket:tcp"
    if tcp.state in ("syn_sent", "syn_recv", "new_syn_recv"):
        return "fd:socket:tcp-connecting"
    return "fd:socket:tcp-closed"


def is_scratch(m: rec.Mapping) -> bool:
    """Memory the application marked as not worth saving: MADV_DONTDUMP (the
    kernel's own "leave out of core dumps" mark) or an anonymous mapping named
    'crelf-scratch' with PR_SET_VMA_ANON_NAME (kernels with ANON_VMA_NAME)."""
    return m.path == SCRATCH_NAME or (
        "dd" in m.vmflags and m.kind in ("anon-private", "heap"))


def mapping_key(m: rec.Mapping) -> str:
    if m.kind in ("vdso", "vvar", "vsyscall"):
        return "mem:vdso"
    if m.kind == "aio":
        return "mem:aio-other" if m.aio is not UNSET and m.aio.unsupported else "mem:aio"
    if "io" in m.vmflags or "pf" in m.vmflags:
        return "mem:device"
    if is_scratch(m):
        return "mem:scratch"
    kind = m.kind
    if kind in ("anon-shared", "sysv-shm"):
        return "mem:shared-anon"
    if kind == "memfd" or (kind == "file-shared" and m.deleted):
        return "mem:shared-memfd"
    if kind == "file-shared":
        return "mem:file-shared"
    return "mem:private"


class Finding(msgspec.Struct, frozen=True):
    """One resource of a tree, with its row's verdict (crcheck --json "findings")."""
    key: str
    where: str
    detail: str
    status: Status
    reason: str
    policy: str | None
    pid: int
    skipped: bool = False
    time: float | None = None    # crrun flags: when the state was created (unix time)
    row: str | None = None       # crrun flags: the table row that decided the verdict

    def line(self) -> str:
        verdict = "skipped by policy" if self.skipped else self.status
        text = f"{self.where}: {self.detail} — {verdict}"
        if self.status != SUPPORTED and not self.skipped:
            text += f" ({self.reason})"
        return text


def flag_row(fl: rec.CrrunFlag) -> Resource:
    """The table row that decides a crrun flag: the resource the flagged
    syscall creates (statefile/check/monitor.py WATCHED), "task:flag-denied" when
    crrun --strict made it fail, "task:flagged" for a resource not in the table."""
    if fl.action == "denied":
        return BY_KEY["task:flag-denied"]
    return BY_KEY.get(fl.resource, BY_KEY["task:flagged"])


def flag_time(fl: rec.CrrunFlag) -> str:
    from datetime import datetime
    try:
        return datetime.fromtimestamp(fl.time).isoformat(timespec="milliseconds")
    except (ValueError, OverflowError, OSError):
        return "an unknown time"


def flag_finding(fl: rec.CrrunFlag, pid: int, skip: set[str]) -> Finding:
    """A crrun flag as a finding, with the verdict of its table row."""
    r = flag_row(fl)
    what = "denied by crrun --strict" if fl.action == "denied" else "flagged by crrun"
    detail = f"{what} at {flag_time(fl)}: {fl.call or fl.syscall or '?'}"
    if fl.tid != pid:
        detail += f" (thread {fl.tid})"
    return Finding("task:flagged", f"pid {pid}", detail, r.status, r.reason, r.policy, pid,
                   skipped=bool(r.policy and r.policy in skip), time=fl.time, row=r.key)


def finding(key: str, pid: int, where: str, detail: str) -> Finding:
    """One finding of row `key` (no policy can skip what this is used for)."""
    r = BY_KEY[key]
    return Finding(key, where, detail, r.status, r.reason, r.policy, pid)


def vdso_findings(pids) -> list[Finding]:
    """Tasks crelf must not run a syscall in: they unmapped their vDSO and
    their code has no `syscall; ret` either (every call crelf runs in a task
    goes through one and returns through a frame of its own: docs/CRASHSAFE.md),
    or no rt_sigreturn."""
    from statefile.control import procfs, wayback
    out = []
    for pid in pids:
        try:
            maps = procfs.maps(pid)
            if any(m["path"] == "[vdso]" for m in maps):
                continue
            wayback.find_gadgets(pid, maps)
        except wayback.NoWayBack as e:
            out.append(finding("task:no-vdso", pid, f"pid {pid}",
                               f"no [vdso] mapping, and {str(e).partition(': ')[2]}"))
        except OSError:
            continue
    return out


def seccomp_findings(tids: list[tuple[int, int]]) -> list[Finding]:
    """Threads crelf must not run a syscall in (tids: (pid, tid) pairs):
    seccomp strict mode, or a filter other than crrun's monitor."""
    from statefile.control import procfs
    out = []
    for pid, tid in tids:
        try:
            mode = procfs.status(pid, tid).get("Seccomp", "0")
        except OSError:
            continue
        where = f"pid {pid}" + (f" thread {tid}" if tid != pid else "")
        if mode == "1":
            out.append(finding("task:seccomp-strict", pid, where, "seccomp strict mode"))
        elif mode == "2" and not procfs.crrun_monitored(pid):
            out.append(finding("task:seccomp", pid, where, "seccomp filter mode"))
    return out


def decide(tasks: list[dict], files: list[dict]) -> None:
    """The dump side's decisions that assess() reads from the records, taken
    on its dicts before they become records, from what the processes hold
    now: terminals paired (their kinds become pty-master/-slave, `tty_check`)
    and pipes' ends looked for outside the tree (`pipe.checked`/`external`).
    A restart reads them as they were decided (restorer/validate.py)."""
    from statefile.dump import pipes as dump_pipes, tty as dump_tty
    dump_tty.pair_up(tasks, files)
    dump_pipes.external(tasks, files)


def assess(tasks, files: list[rec.File], zombies: list[rec.Zombie],
           flags_by_pid: dict[int, list[rec.CrrunFlag]], skip: set[str],
           ipc: rec.IpcNote | None = None, shmem: list[rec.Shmem] | None = None,
           live: bool = True) -> list[Finding]:
    """One finding per resource of the tree, with its verdict under `skip`.

    Everything is read from records (statefile/format/records.py), at
    checkpoint as at restart (restorer/validate.py): `tasks` are
    records.TaskNote, or crcheck's SurveyTask for a task surveyed live
    (statefile/check/crcheck.py); `shmem` the memfd and shared file objects
    (statefile/dump/memfd.py); `flags_by_pid` crrun's flags of tasks whose
    record holds none."""
    from statefile.check.crcheck import SurveyTask
    out: list[Finding] = []

    def add(key, pid, where, detail):
        r = BY_KEY[key]
        out.append(Finding(key, where, detail, r.status, r.reason, r.policy, pid,
                           skipped=bool(r.policy and r.policy in skip)))

    holders: dict[int, set[int]] = {}
    for t in tasks:
        for fd in t.fds:
            holders.setdefault(fd.file, set()).add(t.pid)
    carriers = scm_carriers(tasks, files)   # files held only in flight (statefile/dump/scm.py)
    for fid, (pid, _fd, _via) in carriers.items():
        holders.setdefault(fid, {pid})
    from statefile.dump import pipes as dump_pipes, tty as dump_tty
    from statefile.dump.fanotify import problem as fanotify_problem
    from statefile.dump.pidfd import in_tree
    external_pipes = dump_pipes.problems(tasks, files)
    passthrough = dump_pipes.stdio_passthrough(tasks, files)
    tty_problems = dump_tty.problems(tasks, files)
    from statefile.dump.ns import KINDS as NS_KINDS
    own_ns = {ns: _readlink(f"/proc/self/ns/{ns}") for ns in NS_KINDS}
    out += _ns_findings(tasks, own_ns)
    from statefile.dump.cgroup import differences
    for pid, tid, what in differences(tasks, live):
        add("task:cgroup", pid, f"pid {pid}" + (f" thread {tid}" if tid != pid else ""), what)
    tree_pids = {t.pid for t in tasks}
    for t in tasks:
        pid = t.pid
        add("task:process", pid, f"pid {pid}", f"{t.comm} ({len(t.threads)} threads)")
        if t is not tasks[0]:
            add("task:tree", pid, f"pid {pid}", f"child of pid {t.ppid}")
        if isinstance(t, SurveyTask) and t.tracer:
            add("task:traced", pid, f"pid {pid}", f"traced by pid {t.tracer}"
                + (f" ({t.tracer_comm})" if t.tracer_comm else ""))
        # seccomp is per thread: a thread's own `creds` when they differ
        modes = {t.creds.seccomp} | {th.creds.seccomp for th in t.threads if th.creds}
        if 2 in modes and not t.crrun:
            add("task:seccomp", pid, f"pid {pid}", "seccomp filter mode")
        elif 1 in modes:
            add("task:seccomp-strict", pid, f"pid {pid}", "seccomp strict mode")
        if t.fdt_unsupported:
            add("task:fdt-shared-other", pid, f"pid {pid}", t.fdt_unsupported)
        elif t.fdt and t.fdt != pid:
            add("task:fdt-shared", pid, f"pid {pid}", f"shares the fd table of pid {t.fdt}")
            if t.locks or t.cwd_ghost is not None or any(
                    files[d.file].locks or files[d.file].lease for d in t.fds):
                add("task:fdt-shared-state", pid, f"pid {pid}", "locks, a lease or a deleted "
                    f"working directory in the fd table it shares with pid {t.fdt}")
        if t.posix_timers:
            add("task:posix-timer", pid, f"pid {pid}", f"{t.posix_timers} POSIX timer(s)")
        if t.attrs is not None:
            from statefile.dump.attrs import attr_problems
            for key, detail in attr_problems(t):
                add(key, pid, f"pid {pid}", detail)
        for fl in t.crrun_flags or flags_by_pid.get(pid, []):
            out.append(flag_finding(fl, pid, skip))
        for fd in t.fds:
            f = files[fd.file]
            where, detail = f"pid {pid} fd {fd.fd}", f"{f.path} ({f.kind})"
            key = fd_key(f)
            proc = _proc(f)
            if proc is not None and not proc.dead and proc.pid in tree_pids:
                key = "fd:proc-tree"
            if key == "fd:socket:unix":
                key = _unix_key(f, files, holders, fd.file)
                if key == "fd:socket:unix-fds-other":
                    detail = f"{detail}: {scm_problem(f, files, holders)}"
            if key == "fd:fanotify" and fanotify_problem(f.anon):
                key = "fd:fanotify-other"
                detail = f"{detail}: {fanotify_problem(f.anon)}"
            elif key == "fd:fanotify" and f.anon.unread:
                add("fd:fanotify-unread", pid, where, f"fanotify fd {fd.fd} has unread "
                    f"events ({f.anon.unread} bytes queued)")
            if key.startswith("fd:socket:tcp"):
                si = f.socket
                ends = [":".join(map(str, (a or ["?"])[:2])) for a in (si.local, si.peer)]
                detail = f"{detail}: TCP {ends[0]} -> {ends[1]} ({si.tcp.state})" \
                    + (f": {si.tcp.error}" if si.tcp.error else "")
            if key == "fd:bpf" and isinstance(f, rec.BpfMapFile) and f.bpf.unsupported:
                detail = f"{detail}: {f.bpf.unsupported}"
            if key == "fd:pidfd" and not in_tree(f.pidfd, tasks, zombies):
                key = "fd:pidfd-external"
                detail = f"{detail}: refers to pid {f.pidfd.pid if f.pidfd else '?'}"
            add(key, pid, where, detail)
            if fd.file in passthrough:
                add("fd:stdio-external", pid, where, external_pipes[fd.file])
            elif fd.file in external_pipes:
                add("fd:pipe-external", pid, where, external_pipes[fd.file])
            if fd.file in tty_problems:
                add(*tty_problems[fd.file][:1], pid, where, tty_problems[fd.file][1])
            if key in _ANON_KEYS and len(holders.get(fd.file, ())) > 1:
                add("fd:anon-shared", pid, where, detail)
            if _shmem_problem(f, shmem):
                add("mem:shared-other", pid, where, f"{detail}: {_shmem_problem(f, shmem)}")
            if key == "fd:epoll" and any(tg.fd is None for tg in f.anon.targets):
                add("fd:epoll-elsewhere", pid, where, f"epoll fd {fd.fd} watches a file "
                    "no fd of the task holds")
            if key == "fd:inotify":
                _inotify_deleted_watches(f, t, files)
                if any(not w.path and w.file is None for w in f.anon.watches):
                    add("fd:inotify-lost", pid, where, detail)
                if f.anon.unread:
                    add("fd:inotify-unread", pid, where, f"inotify fd {fd.fd} has unread "
                        f"events ({f.anon.unread} bytes queued)")
        for m in t.mappings:
            key = mapping_key(m)
            where = f"pid {pid} {m.start:#x}-{m.end:#x}"
            detail = f"{m.path or 'anonymous'} ({m.kind})"
            if _shmem_problem(m, shmem):
                add("mem:shared-other", pid, where, f"{detail}: {_shmem_problem(m, shmem)}")
            if key in ("mem:private", "mem:file-shared", "mem:vdso"):
                continue  # not worth a line each; counted in the summary
            add(key, pid, where, detail)
    for fid, (pid, fd, via) in carriers.items():
        g = files[fid]
        where = f"pid {pid} fd {fd} (in flight)"
        detail = f"{g.path} ({g.kind}) in flight in {files[via].path}"
        key = fd_key(g)
        if key == "fd:socket:unix":
            key = _unix_key(g, files, holders, fid)
            if key == "fd:socket:unix-fds-other":
                detail = f"{detail}: {scm_problem(g, files, holders)}"
        why = _scm_file_problem(g, files, holders)
        add("fd:socket:unix-fds-other" if why else key, pid, where,
            f"{detail}: {why}" if why else detail)
    from statefile.dump.locks import findings as lock_findings
    for key, p, where, detail in lock_findings(tasks, files, zombies):
        add(key, p, where, detail)     # file locks, leases, SIGIO owners
    for z in zombies:
        add("task:zombie", z.pid, f"pid {z.pid}", f"{z.comm} (exited, not reaped)")
    if ipc is not None:
        root = tasks[0].pid if tasks else 0
        for kind, ids in (("shm", [(o.shmid, o.key) for o in ipc.shm]),
                          ("sem", [(o.semid, o.key) for o in ipc.sem]),
                          ("msg", [(o.msqid, o.key) for o in ipc.msg])):
            for ident, key in ids:
                add(f"ipc:{kind}", root, f"SysV {kind} id {ident}", f"key {key:#x}")
        for u in ipc.sem_undo:
            p = u.pid
            add("ipc:sem-undo", p, f"pid {p}", f"pid {p} holds SEM_UNDO adjustments"
                if u.threads <= 1 else f"pid {p} may hold SEM_UNDO adjustments (its "
                f"{u.threads} threads share an undo list, which cannot be told empty)")
    return out


def _ns_findings(tasks, own: dict[str, str]) -> list[Finding]:
    """Namespaces: a UTS/IPC namespace of the tree's own is restored when the
    whole tree shares it (restorer/restore/ns.py); every other namespace kind
    must be crelf's own."""
    out: list[Finding] = []
    if not tasks:
        return out

    def add(key, pid, detail, reason=None):
        r = BY_KEY[key]
        out.append(Finding(key, f"pid {pid}", detail, r.status, reason or r.reason, None, pid))
    root = tasks[0]
    rpid, rns = root.pid, root.namespaces
    for kind in ("uts", "ipc"):
        rlink = getattr(rns, kind)
        odd = [t for t in tasks if getattr(t.namespaces, kind) != rlink]
        for t in odd:
            add("task:ns-mixed", t.pid, f"{kind} namespace "
                f"{getattr(t.namespaces, kind) or '?'}, the root's is {rlink or '?'}")
        if rlink and own.get(kind) and rlink != own[kind] and not odd:
            err = root.ns_errors.get(kind)
            if err:
                out.append(Finding("task:namespace", f"pid {rpid}", f"own {kind} namespace "
                                   f"{rlink}", UNSUPPORTED, f"its state cannot be read: {err} "
                                   "(run crcheckpoint as root)", None, rpid))
            else:
                add(f"task:ns-{kind}", rpid, f"own {kind} namespace {rlink} "
                    f"(shared by the {len(tasks)} task(s) of the tree)")
    _pidns_findings(tasks, own, add)
    for t in tasks:
        for kind, link in msgspec.structs.asdict(t.namespaces).items():
            if kind in ("uts", "ipc", "pid") or kind not in own:
                continue
            if link and own[kind] and link != own[kind]:
                add("task:namespace", t.pid, f"own {kind} namespace {link}")
    return out


def _pidns_findings(tasks, own: dict[str, str], add) -> None:
    """A pid namespace other than crelf's is restored when it is the tree's
    own: its init is the root and every task is in it, one level below
    crelf's (CR_HEADER namespaces `pid`, restorer/restore/ns.py)."""
    root = tasks[0]
    rpid, rlink, mine = root.pid, root.namespaces.pid, own.get("pid")
    if not mine:
        return
    from statefile.dump.ns import nspid
    depth = len(nspid(os.getpid()))
    others = [t for t in tasks if t.namespaces.pid not in ("", mine)]
    if rlink in ("", mine):
        for t in others:        # e.g. `unshare --pid --fork` checkpointed instead of its child
            ns = t.nspid or [t.pid]
            hint = (f"; checkpoint pid {t.pid}, its init, instead" if ns[-1] == 1 else "")
            add("task:ns-pid-other", t.pid, f"pid {ns[-1]} of pid namespace "
                f"{t.namespaces.pid}, the root pid {rpid} is in crelf's{hint}")
        return
    odd = [t for t in tasks if t.namespaces.pid != rlink]
    rns = root.nspid or [rpid]
    if rns[-1] != 1 or len(rns) != depth + 1:
        why = (f"the root is pid {rns[-1]} there, not its init" if rns[-1] != 1
               else f"nested {len(rns) - depth} levels below crelf's")
        add("task:ns-pid-other", rpid, f"pid namespace {rlink}: {why}")
    for t in odd:
        add("task:ns-pid-other", t.pid, f"pid namespace {t.namespaces.pid or '?'}, "
            f"the root's is {rlink}")
    if rns[-1] == 1 and len(rns) == depth + 1 and not odd:
        add("task:ns-pid", rpid, f"own pid namespace {rlink}, the root is its init (pid 1), "
            f"shared by the {len(tasks)} task(s) of the tree")


def _inotify_deleted_watches(f: rec.InotifyFile, task, files: list[rec.File]) -> None:
    """A watch on a file deleted since can be restored on the same inode
    through an fd of the task still open on it: `file` names that entry
    (restorer/restore_anon.finish_inotify watches /proc/self/fd/N)."""
    for w in f.anon.watches:
        if w.path or not w.deleted or w.file is not None:
            continue
        for d in task.fds:
            g = files[d.file]
            if isinstance(g, rec.RegularFile) and g.deleted and g.ino == w.ino \
                    and (os.major(g.dev), os.minor(g.dev)) == (w.sdev >> 20, w.sdev & 0xFFFFF):
                w.file = d.file
                break


def _shmem_problem(entry: rec.File | rec.Mapping, shmem: list[rec.Shmem] | None) -> str:
    """Why the memfd/shared file object of a file entry or mapping cannot be saved."""
    i = entry.shmem if isinstance(entry, (rec.RegularFile, rec.Mapping)) else None
    if i is None or not shmem or not 0 <= i < len(shmem):
        return ""
    return shmem[i].unsupported


def problems(findings: list[Finding]) -> list[Finding]:
    """Findings that stop a checkpoint: not supported and not skipped."""
    return [f for f in findings if f.status != SUPPORTED and not f.skipped]


def _readlink(p: str) -> str:
    try:
        return os.readlink(p)
    except OSError:
        return ""


def markdown() -> str:
    lines = ["# What crelf can checkpoint", "",
             "Generated from `statefile/check/support.py`"
             " (`python -m statefile.check.support`).", "",
             "| resource | key | verdict | policy class | why |", "|---|---|---|---|---|"]
    for r in TABLE:
        lines.append(f"| {r.what} | `{r.key}` | {r.status} | {r.policy or ''} | {r.reason} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
