"""File locks, leases and SIGIO owners restarted (statefile/dump/locks.py,
restorer/restore/locks.py): real programs checkpointed with --kill mid-run,
restarted, and their own view of the locks compared with an uninterrupted
run; refusals and conflicts fail up front in one line."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from helpers import build_c, children, pid_alive, require_root, wait_for_line
from test_tree import CRCHECKPOINT, finish, restart

from statefile.format import reader
from test_memfd import _checkpoint

LOCKS = r'''
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/wait.h>

/* A parent and its child hold every kind of lock on three files of argv[1]:
   the parent POSIX locks on a (write 0-9, read 20-29; a is also mapped
   shared, so a restorer that opens and closes it again for the mmap would
   drop them), an flock(LOCK_EX) on b whose description the child inherits;
   the child a POSIX read lock on a (40-49, through its own description) and
   an OFD write lock on c (100-199).  After the ticks each looks at the
   other's locks the way another process would (F_GETLK, F_OFD_GETLK,
   flock on a new description) and at its own fdinfo.  No pid is printed:
   the output is the same in every run.  argv: directory, ticks. */
static pid_t parent, child;
static char pa[512], pb[512], pc[512];

static int setlk(int fd, int cmd, short type, off_t start, off_t len) {
    struct flock l = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &l);
}
static const char *who(pid_t p) {
    return p == parent ? "parent" : p == child ? "child" : p == -1 ? "ofd" : "other";
}
static const char *conflict(const char *path, int cmd, off_t start) {
    static char buf[128];
    struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = 1};
    int fd = open(path, O_RDWR);
    if (fcntl(fd, cmd, &l) < 0)
        snprintf(buf, sizeof buf, "error %s", strerror(errno));
    else if (l.l_type == F_UNLCK)
        snprintf(buf, sizeof buf, "free");
    else
        snprintf(buf, sizeof buf, "%s lock of %s at %ld+%ld", l.l_type == F_WRLCK ? "write" :
                 "read", who(l.l_pid), (long)l.l_start, (long)l.l_len);
    if (cmd == F_OFD_GETLK)
        close(fd);      /* (a close of a POSIX probe would drop our own POSIX locks) */
    return buf;
}
static const char *try_flock(const char *path) {
    int fd = open(path, O_RDONLY);
    int r = flock(fd, LOCK_EX | LOCK_NB);
    close(fd);
    return r == 0 ? "taken" : strerror(errno);
}
static void fdinfo(const char *me, int fd) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(path, "r");
    while (f && fgets(line, sizeof line, f)) {
        char kind[16], attr[16], type[16], start[24], end[24];
        int pid;
        if (strncmp(line, "lock:", 5) ||
            sscanf(line, "lock: %*d: %15s %15s %15s %d %*s %23s %23s", kind, attr, type, &pid,
                   start, end) != 6)
            continue;
        printf("%s fd %d: %s %s %s %s-%s taken by %s\n", me, fd, kind, attr, type, start,
               end, who(pid));
    }
    if (f)
        fclose(f);
}
int main(int argc, char **argv) {
    int n = atoi(argv[2]), go[2], done[2];
    snprintf(pa, sizeof pa, "%s/a", argv[1]);
    snprintf(pb, sizeof pb, "%s/b", argv[1]);
    snprintf(pc, sizeof pc, "%s/c", argv[1]);
    parent = getpid();
    int fa = open(pa, O_RDWR | O_CREAT | O_TRUNC, 0644);
    int fb = open(pb, O_RDWR | O_CREAT | O_TRUNC, 0644);
    close(open(pc, O_RDWR | O_CREAT | O_TRUNC, 0644));
    ftruncate(fa, 4096);
    char *map = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fa, 0);
    if (map == MAP_FAILED || setlk(fa, F_SETLK, F_WRLCK, 0, 10) || setlk(fa, F_SETLK, F_RDLCK, 20, 10)
        || flock(fb, LOCK_EX)) {
        perror("lock");
        return 1;
    }
    pipe(go);
    pipe(done);
    child = fork();
    if (child == 0) {
        child = getpid();
        int fc = open(pc, O_RDWR);
        int fa2 = open(pa, O_RDWR);
        if (setlk(fc, F_OFD_SETLK, F_WRLCK, 100, 100) || setlk(fa2, F_SETLK, F_RDLCK, 40, 10)) {
            perror("child lock");
            return 1;
        }
        write(done[1], "r", 1);
        for (int i = 0; i < n; i++) {
            printf("child tick %d\n", i);
            fflush(stdout);
            usleep(20000);
        }
        char c;
        read(go[0], &c, 1);          /* the parent has looked */
        printf("child: a at 5: %s\n", conflict(pa, F_GETLK, 5));
        printf("child: a at 25: %s\n", conflict(pa, F_GETLK, 25));
        printf("child: a at 15: %s\n", conflict(pa, F_GETLK, 15));
        printf("child: flock b: %s\n", try_flock(pb));
        fdinfo("child", fb);
        fdinfo("child", fc);
        fdinfo("child", fa2);
        fflush(stdout);
        return 0;
    }
    char c;
    read(done[0], &c, 1);
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < n; i++) {
        map[i] = 'a' + i % 26;
        printf("parent tick %d\n", i);
        fflush(stdout);
        usleep(20000);
    }
    printf("parent: a at 45: %s\n", conflict(pa, F_GETLK, 45));
    printf("parent: a at 5: %s\n", conflict(pa, F_GETLK, 5));
    printf("parent: c at 150: %s\n", conflict(pc, F_OFD_GETLK, 150));
    printf("parent: c at 99: %s\n", conflict(pc, F_OFD_GETLK, 99));
    printf("parent: flock b: %s\n", try_flock(pb));
    fdinfo("parent", fa);
    fdinfo("parent", fb);
    fflush(stdout);
    write(go[1], "g", 1);
    int st;
    waitpid(child, &st, 0);
    printf("child exited %d, map %.10s\n", WEXITSTATUS(st), map);
    return 0;
}
'''

LEASES = r'''
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A read lease on d (O_RDONLY); a write lease on e (O_WRONLY, signal
   SIGUSR2) broken by a reader, so being broken to a read lease; a pipe with
   O_ASYNC whose read end's owner (this process, set while the euid was 1)
   gets SIGUSR1.  After the ticks: the lease types, whether e is still being
   broken, the owner, its uid/euid and signal, how many signals came (a
   restart must not send one), then a write into the pipe must bring SIGUSR1
   with si_fd = the read end.  argv: directory, ticks. */
#ifndef F_GETOWNER_UIDS
#define F_GETOWNER_UIDS 17
#endif
static volatile int sigs, wrong_fd, expect_fd = -1, last_sig;
static void on_sig(int sig, siginfo_t *si, void *ctx) {
    sigs++;
    last_sig = sig;
    if (si->si_fd != expect_fd)
        wrong_fd++;
}
static int breaking(int fd) {
    char path[64], line[256];
    int yes = 0;
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(path, "r");
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "lock:", 5) && strstr(line, "LEASE  BREAKING"))
            yes = 1;
    fclose(f);
    return yes;
}
int main(int argc, char **argv) {
    int n = atoi(argv[2]), p[2];
    char pd[512], pe[512];
    struct sigaction sa = {.sa_sigaction = on_sig, .sa_flags = SA_SIGINFO | SA_RESTART};
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    snprintf(pd, sizeof pd, "%s/d", argv[1]);
    snprintf(pe, sizeof pe, "%s/e", argv[1]);
    int d = open(pd, O_RDONLY | O_CREAT, 0644);
    int e = open(pe, O_WRONLY | O_CREAT, 0644);
    if (fcntl(d, F_SETLEASE, F_RDLCK) || fcntl(e, F_SETLEASE, F_WRLCK) ||
        fcntl(e, F_SETSIG, SIGUSR2)) {
        perror("lease");
        return 1;
    }
    expect_fd = e;
    if (open(pe, O_RDONLY | O_NONBLOCK) >= 0 || errno != EWOULDBLOCK) {
        printf("lease not broken\n");
        return 1;
    }
    while (sigs < 1)
        usleep(1000);
    pipe(p);
    if (setresuid(-1, 1, -1) || fcntl(p[0], F_SETOWN, getpid()) || fcntl(p[0], F_SETSIG, SIGUSR1)
        || fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_ASYNC) || setresuid(-1, 0, -1)) {
        perror("owner");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < n; i++) {
        printf("tick %d\n", i);
        fflush(stdout);
        usleep(20000);
    }
    unsigned ids[2] = {9, 9};
    fcntl(p[0], F_GETOWNER_UIDS, ids);
    printf("lease d %d e %d, e breaking %d\n", fcntl(d, F_GETLEASE), fcntl(e, F_GETLEASE),
           breaking(e));
    printf("pipe owner is me %d, uids %u %u, signal %d, async %d\n",
           fcntl(p[0], F_GETOWN) == getpid(), ids[0], ids[1], fcntl(p[0], F_GETSIG),
           !!(fcntl(p[0], F_GETFL) & O_ASYNC));
    printf("signals so far %d, wrong fd %d\n", sigs, wrong_fd);
    expect_fd = p[0];
    write(p[1], "x", 1);
    for (int i = 0; i < 2000 && sigs < 2; i++)
        usleep(1000);
    printf("signals %d (last %s), wrong fd %d\n", sigs, last_sig == SIGUSR1 ? "SIGUSR1" : "?",
           wrong_fd);
    return 0;
}
'''

OWNER_OUTSIDE = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
/* SIGIO of a pipe goes to our parent (outside the checkpointed tree). */
int main(void) {
    int p[2];
    pipe(p);
    fcntl(p[0], F_SETOWN, getppid());
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 600; i++)
        usleep(50000);
    return 0;
}
'''

DELETED_LEASE = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
/* A write lease on a file deleted after it was opened. argv: path. */
int main(int argc, char **argv) {
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    write(fd, "content", 7);
    if (fcntl(fd, F_SETLEASE, F_WRLCK) || unlink(argv[1])) {
        perror("lease");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 600; i++)
        usleep(50000);
    return 0;
}
'''

HOLDER = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/file.h>
/* argv: file, "flock" or "posix": hold that write lock on the whole file. */
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
    struct flock l = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (strcmp(argv[2], "flock") ? fcntl(fd, F_SETLK, &l) : flock(fd, LOCK_EX)) {
        perror("lock");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 600; i++)
        usleep(50000);
    return 0;
}
'''


def _reference(prog, tmp_path, name, ticks):
    d = tmp_path / f"ref-{name}"
    d.mkdir()
    return subprocess.run([prog, d, str(ticks)], capture_output=True, timeout=60,
                          check=True).stdout


def _by_writer(text: bytes) -> dict[str, list[str]]:
    """Lines per process (the ticks of parent and child interleave freely)."""
    out: dict[str, list[str]] = {}
    for line in text.decode().splitlines():
        out.setdefault(line.split()[0] if " tick " in line else "checks", []).append(line)
    return out


def test_posix_ofd_and_flock_locks_of_a_tree(procs, tmp_path):
    """Every lock of a parent and its child comes back held by the same
    process or description: the other process meets it with F_GETLK,
    F_OFD_GETLK and flock, and fdinfo shows the same lines, taken by the same
    task; the parent's POSIX locks survive the restorer's own open and close
    of their file (it is mapped)."""
    require_root()
    prog = build_c(tmp_path, "locks", LOCKS)
    ref = _reference(prog, tmp_path, "locks", 40)
    for line in (b"child: a at 5: write lock of parent at 0+10",
                 b"child: a at 25: read lock of parent at 20+10",
                 b"child: a at 15: free", b"child: flock b: Resource temporarily unavailable",
                 b"parent: a at 45: read lock of child at 40+10",
                 b"parent: c at 150: write lock of ofd at 100+100", b"parent: c at 99: free",
                 b"parent fd 4: FLOCK ADVISORY WRITE 0-EOF taken by parent",
                 b"child fd 4: FLOCK ADVISORY WRITE 0-EOF taken by parent"):
        assert line in ref, ref.decode()
    d = tmp_path / "run"
    d.mkdir()
    out = tmp_path / "locks.out"
    proc = procs.spawn([prog, d, "40"], stdout=out)
    wait_for_line(out, r"parent tick 10", proc=proc)
    _checkpoint(proc, tmp_path / "locks.cr")
    sf = reader.load(str(tmp_path / "locks.cr"))
    by_pid = {t.pid: t for t in sf.tasks}
    assert [(lk.type, lk.start, lk.end) for lk in by_pid[proc.pid].locks] == \
        [("write", 0, 9), ("read", 20, 29)]
    kid = next(p for p in by_pid if p != proc.pid)
    assert [(lk.type, lk.start, lk.end) for lk in by_pid[kid].locks] == \
        [("read", 40, 49)]
    held = sorted((f.path.rsplit("/", 1)[1], lk.kind, lk.type)
                  for f in sf.files for lk in f.locks)
    assert held == [("b", "flock", "write"), ("c", "ofd", "write")]
    code, err = finish(restart(procs, tmp_path / "locks.cr"))
    assert code == 0, err
    assert _by_writer(out.read_bytes()) == _by_writer(ref)


def test_leases_and_sigio_owner(procs, tmp_path):
    """A read lease, a write lease being broken (to a read lease: still
    breaking after the restart, and no break signal sent by it), and a pipe's
    SIGIO owner with the euid it was set with, its signal and O_ASYNC: the
    signal comes with si_fd = the read end again."""
    require_root()
    prog = build_c(tmp_path, "leases", LEASES)
    ref = _reference(prog, tmp_path, "leases", 100)
    for line in (b"lease d 0 e 0, e breaking 1",
                 b"pipe owner is me 1, uids 0 1, signal 10, async 1",
                 b"signals so far 1, wrong fd 0", b"signals 2 (last SIGUSR1), wrong fd 0"):
        assert line in ref, ref.decode()
    d = tmp_path / "run"
    d.mkdir()
    out = tmp_path / "leases.out"
    proc = procs.spawn([prog, d, "100"], stdout=out)
    wait_for_line(out, r"tick 10", proc=proc)
    _checkpoint(proc, tmp_path / "leases.cr")
    sf = reader.load(str(tmp_path / "leases.cr"))
    leases = {f.path.rsplit("/", 1)[1]: f.lease for f in sf.files if f.lease is not None}
    assert {k: (v.state, v.type) for k, v in leases.items()} == \
        {"d": ("active", "read"), "e": ("breaking", "read")}
    fown = next(f.fown for f in sf.files if f.kind == "pipe" and f.fown is not None)
    assert (fown.pid, fown.pid_type, fown.uid, fown.euid, fown.signum) == \
        (proc.pid, "pid", 0, 1, 10)
    code, err = finish(restart(procs, tmp_path / "leases.cr"))
    assert code == 0, err
    assert out.read_bytes() == ref


@pytest.mark.parametrize("case", ["owner-outside", "deleted-under-lease"])
def test_refused_up_front(procs, tmp_path, case):
    """A file whose SIGIO goes to a process outside the tree, or a deleted
    file under a write lease (reading its content would break the lease and
    wait for the frozen holder): exit 6 with the support row's reason,
    nothing written, the target runs on untouched (its lease not broken)."""
    require_root()
    if case == "owner-outside":
        prog = build_c(tmp_path, "outside", OWNER_OUTSIDE)
        argv = [prog]
        why = [f"SIGIO goes to pid {os.getpid()}, outside the tree",
               "cannot make a process outside the tree the owner"]
    else:
        prog = build_c(tmp_path, "deleted", DELETED_LEASE)
        argv = [prog, tmp_path / "leased"]
        why = ["leased (deleted): deleted, under a write lease",
               "an open breaks the lease"]
    out = tmp_path / "target.out"
    proc = procs.spawn(argv, stdout=out)
    wait_for_line(out, r"ready", proc=proc)
    sf = tmp_path / "target.cr"
    t0 = time.monotonic()
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(sf)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 6, r.stderr
    assert time.monotonic() - t0 < 20           # (no wait for a lease break)
    for text in why:
        assert text in r.stderr, r.stderr
    assert not sf.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".cr") or ".tmp" in p]
    assert proc.poll() is None and pid_alive(proc.pid)
    if case == "deleted-under-lease":
        with open(f"/proc/{proc.pid}/fdinfo/3") as f:
            assert any("LEASE  ACTIVE    WRITE" in line for line in f)


@pytest.mark.parametrize("kind", ["flock", "posix"])
def test_lock_held_outside_fails_the_restart_cleanly(procs, tmp_path, kind):
    """The checkpointed tree still running (no --kill) holds its write lock:
    a restart beside it (--pidns) cannot take the lock again, says so in one
    line, and leaves no process behind; the original keeps its lock."""
    require_root()
    prog = build_c(tmp_path, "holder", HOLDER)
    out = tmp_path / "holder.out"
    target = tmp_path / "locked"
    proc = procs.spawn([prog, target, kind], stdout=out)
    wait_for_line(out, r"ready", proc=proc)
    _checkpoint(proc, tmp_path / "holder.cr", kill=False)
    before = {c for c in children(os.getpid()) if pid_alive(c)}
    code, err = finish(restart(procs, tmp_path / "holder.cr", "--pidns"))
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot be taken again" in lines[0], err
    assert str(target) in lines[0]
    time.sleep(0.3)
    assert {c for c in children(os.getpid()) if pid_alive(c)} <= before
    assert proc.poll() is None
    with open(f"/proc/{proc.pid}/fdinfo/3") as f:
        assert any(line.startswith("lock:") for line in f)


def _forge(path, ntype: int, edit) -> None:
    """Edit the first JSON note of type ntype that `edit` (obj -> bool) changes,
    and fix its checksum in CR_INTEGRITY: every checksum still passes."""
    import json
    import zlib

    import fuzzing as fz
    data = bytearray(open(path, "rb").read())
    lay = fz.layout(str(path))
    records = fz._records(data, lay)
    for i, (_, _, d0, d1, owner, t) in enumerate(lay.notes):
        if owner != "CRELF" or t != ntype:
            continue
        obj = json.loads(bytes(data[d0:d1]).rstrip(b"\0"))
        if edit(obj):
            break
    else:
        raise AssertionError("nothing to forge")
    desc = fz.forged_json(obj)
    records[i] = fz._pack("CRELF", ntype, desc)
    ii = next(k for k, n in enumerate(lay.notes) if n[5] == fz.CR_INTEGRITY)
    integ = json.loads(bytes(data[lay.notes[ii][2]:lay.notes[ii][3]]).rstrip(b"\0"))
    others = [k for k in range(len(lay.notes)) if k != ii]
    integ["notes"][others.index(i)][2] = zlib.crc32(desc)
    records[ii] = fz._pack("CRELF", fz.CR_INTEGRITY, fz.forged_json(integ))
    open(path, "wb").write(fz._set_notes(data, lay, records))


def _set_in_files(key: str, value):
    def edit(obj) -> bool:
        for f in obj["files"]:
            if key in f:
                f[key] = value
                return True
        return False
    return edit


def _set_in_task(value):
    def edit(obj) -> bool:
        if obj.get("locks"):
            obj["locks"][0]["type"] = value
            return True
        return False
    return edit


@pytest.mark.parametrize("what", ["lease", "fown", "posix"])
def test_forged_lock_records_refused_in_one_line(procs, tmp_path, what):
    """Lock, lease and owner records a restorer cannot use (a damaged or
    foreign writer whose checksums still pass) stop the restart before
    anything is created: one line, no traceback, no process left."""
    require_root()
    from statefile.format.notes import CR_FILES, CR_TASK
    name, src = ("leases", LEASES) if what != "posix" else ("locks", LOCKS)
    prog = build_c(tmp_path, name, src)
    d = tmp_path / "run"
    d.mkdir()
    out = tmp_path / "out"
    proc = procs.spawn([prog, d, "400"], stdout=out)
    wait_for_line(out, r"tick 3", proc=proc)
    cr = tmp_path / "forged.cr"
    _checkpoint(proc, cr)
    if what == "lease":
        _forge(cr, CR_FILES, _set_in_files("lease", {"state": "breaking", "type": "write"}))
    elif what == "fown":
        _forge(cr, CR_FILES, _set_in_files("fown", {"pid": proc.pid, "pid_type": "pid",
                                                      "signum": 99}))
    else:
        _forge(cr, CR_TASK, _set_in_task("exclusive"))
    before = {c for c in children(os.getpid()) if pid_alive(c)}
    code, err = finish(restart(procs, cr))
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("crrestart: failed at plan: malformed statefile"), err
    time.sleep(0.2)
    assert {c for c in children(os.getpid()) if pid_alive(c)} <= before
