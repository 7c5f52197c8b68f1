"""Memory shared through files restarted (restorer/restore/memfd.py): memfds
(fds and MAP_SHARED/MAP_PRIVATE mappings, sealed or not), POSIX shm in
/dev/shm (kept on the same host, recreated from the statefile with the
dump_tmpfs policy) and a shm_unlink'ed POSIX shm, each checkpointed with
--kill mid-run, restarted, and compared byte for byte with an uninterrupted
run."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from helpers import build_c, require_root, wait_for_line
from test_tree import CRCHECKPOINT, CRRESTART, REPO, finish, reap, restart

from statefile.format import reader

PINGPONG = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

/* A parent and a child take turns (the turn lives in a memfd) adding to
   counters in the memfd, in a POSIX shm (/dev/shm/NAME) and in a
   shm_unlink'ed POSIX shm; each appends one byte through the memfd fd they
   share (one offset).  If a restart gave each task a copy instead of one
   object, the turn would never pass and the counters would differ.
   argv: turns, shm name. */
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    char gone[256];
    snprintf(gone, sizeof gone, "%s-gone", argv[2]);
    int mfd = memfd_create("crelf counter", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (mfd < 0 || ftruncate(mfd, 4 << 20) < 0) { perror("memfd"); return 1; }
    long *mem = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 1 << 20);
    pwrite(mfd, "far away", 8, 3 << 20);          /* data outside any shared mapping */
    char *priv = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, 3 << 20);
    priv[4096] = 'P';                              /* a private copy-on-write page */
    int sfd = shm_open(argv[2], O_RDWR | O_CREAT | O_EXCL, 0640);
    int gfd = shm_open(gone, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (sfd < 0 || gfd < 0) { perror("shm_open"); return 1; }
    ftruncate(sfd, 8192);
    ftruncate(gfd, 4096);
    long *shm = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    long *del = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, 0);
    close(sfd);
    close(gfd);
    shm_unlink(gone);
    write(mfd, "go:", 3);
    printf("ready\n"); fflush(stdout);
    pid_t pid = fork();
    int me = pid == 0;
    for (int i = 0; i < n; i++) {
        while (__atomic_load_n(&mem[0], __ATOMIC_ACQUIRE) != me)
            usleep(500);
        mem[1] += 1; shm[0] += 2; shm[1000] += 3; del[0] += 5;
        write(mfd, me ? "c" : "p", 1);
        printf("%s turn %d mem %ld shm %ld far %ld gone %ld\n", me ? "child" : "parent", i,
               mem[1], shm[0], shm[1000], del[0]);
        fflush(stdout);
        usleep(20000);
        __atomic_store_n(&mem[0], 1 - me, __ATOMIC_RELEASE);
    }
    if (me) return 0;
    int st;
    waitpid(pid, &st, 0);
    char buf[512] = "", link[256] = "", path[64], far[9] = "";
    long off = lseek(mfd, 0, SEEK_CUR);
    pread(mfd, buf, off < 500 ? off : 500, 0);
    snprintf(path, sizeof path, "/proc/self/fd/%d", mfd);
    readlink(path, link, sizeof link - 1);
    pread(mfd, far, 8, 3 << 20);
    struct stat sb;
    fstat(mfd, &sb);
    printf("done mem %ld shm %ld gone %ld child %d\n", mem[1], shm[0], del[0], WEXITSTATUS(st));
    printf("fd %s size %ld offset %ld seals %d cloexec %d\n", link, (long)sb.st_size, off,
           fcntl(mfd, F_GET_SEALS), fcntl(mfd, F_GETFD) & FD_CLOEXEC);
    printf("bytes %s far %s private %c/%c\n", buf, far, priv[4096], priv[0]);
    shm_unlink(argv[2]);
    return 0;
}
'''

SEALED = r'''
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

/* "sealed": content, then SHRINK|GROW|WRITE, then mapped read-only shared;
   "future": mapped read-write shared, then FUTURE_WRITE|SEAL (the mapping
   stays writable, new ones are refused); "plain": no sealing allowed,
   sparse, an fd only, at an offset. */
static const char *err(int r) { return r < 0 ? strerror(errno) : "ok"; }
static int mapped(int fd, int prot, int flags) {
    void *p = mmap(NULL, 4096, prot, flags, fd, 0);
    return p == MAP_FAILED ? -1 : 0;
}
static void seals(const char *name, int fd) {
    char path[64], link[256] = "";
    struct stat sb;
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    readlink(path, link, sizeof link - 1);
    fstat(fd, &sb);
    printf("%s: %s seals %#x size %ld mode %o\n", name, link, fcntl(fd, F_GET_SEALS),
           (long)sb.st_size, sb.st_mode & 07777);
}
int main(void) {
    int a = memfd_create("sealed", MFD_ALLOW_SEALING);
    write(a, "sealed content\n", 15);
    ftruncate(a, 65536);
    pwrite(a, "tail", 4, 65532);
    fcntl(a, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE);
    const char *ro = mmap(NULL, 65536, PROT_READ, MAP_SHARED, a, 0);
    int b = memfd_create("future", MFD_ALLOW_SEALING | MFD_CLOEXEC);
    ftruncate(b, 4096);
    char *rw = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, b, 0);
    fcntl(b, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL);
    int c = memfd_create("plain", 0);
    pwrite(c, "far", 3, 3 << 20);
    lseek(c, 1234, SEEK_SET);
    if (ro == MAP_FAILED || rw == MAP_FAILED) { perror("mmap"); return 1; }
    printf("ready\n"); fflush(stdout);
    for (int i = 0; i < 60; i++) {
        rw[i] = 'a' + i % 26;
        printf("tick %d %s %.4s\n", i, rw, ro + 65532);
        fflush(stdout);
        usleep(25000);
    }
    seals("a", a); seals("b", b); seals("c", c);
    char buf[20] = "", far[4] = "";
    pread(a, buf, 15, 0);
    pread(c, far, 3, 3 << 20);
    printf("a reads %.14s, mapping %.14s; c reads %s at offset %ld\n", buf, ro, far,
           (long)lseek(c, 0, SEEK_CUR));
    printf("a: write %s, ftruncate %s, shared rw mmap %s, mprotect rw %s, private rw mmap %s\n",
           err(pwrite(a, "x", 1, 0)), err(ftruncate(a, 100)),
           err(mapped(a, PROT_READ | PROT_WRITE, MAP_SHARED)),
           err(mprotect((void *)ro, 4096, PROT_READ | PROT_WRITE)),
           err(mapped(a, PROT_READ | PROT_WRITE, MAP_PRIVATE)));
    printf("b: write %s, shared rw mmap %s, add seal %s, cloexec %d\n", err(pwrite(b, "x", 1, 0)),
           err(mapped(b, PROT_READ | PROT_WRITE, MAP_SHARED)),
           err(fcntl(b, F_ADD_SEALS, F_SEAL_GROW)), fcntl(b, F_GETFD));
    printf("c: add seal %s, cloexec %d\n", err(fcntl(c, F_ADD_SEALS, F_SEAL_GROW)),
           fcntl(c, F_GETFD));
    return 0;
}
'''

TMPFS = r'''
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>

/* Two POSIX shm objects in /dev/shm: argv[1] only mapped (its fd closed),
   argv[2] mapped and kept open.  Ticks write into both; at the end the first
   is opened again by name and read: the file and the mapping are one. */
int main(int argc, char **argv) {
    int a = shm_open(argv[1], O_RDWR | O_CREAT | O_EXCL, 0640);
    int b = shm_open(argv[2], O_RDWR | O_CREAT | O_EXCL, 0600);
    if (a < 0 || b < 0) { perror("shm_open"); return 1; }
    ftruncate(a, 1 << 20);
    ftruncate(b, 8192);
    char *ma = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, a, 0);
    char *mb = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, b, 0);
    close(a);
    strcpy(ma + 900000, "deep in a");
    write(b, "b:", 2);
    printf("ready\n"); fflush(stdout);
    for (int i = 0; i < 60; i++) {
        ma[i] = 'A' + i % 26;
        mb[4096 + i] = 'a' + i % 26;
        write(b, ".", 1);
        printf("tick %d %s %s\n", i, ma, mb + 4096);
        fflush(stdout);
        usleep(25000);
    }
    int again = shm_open(argv[1], O_RDONLY, 0);
    char buf[128] = "", deep[16] = "", head[128] = "";
    struct stat sa, sb;
    fstat(again, &sa);
    fstat(b, &sb);
    pread(again, buf, 100, 0);
    pread(again, deep, 9, 900000);
    pread(b, head, 100, 0);
    printf("%s read again: %s, %s; size %ld mode %o\n", argv[1], buf, deep, (long)sa.st_size,
           sa.st_mode & 0777);
    printf("%s: offset %ld size %ld mode %o head %s\n", argv[2], (long)lseek(b, 0, SEEK_CUR),
           (long)sb.st_size, sb.st_mode & 0777, head);
    shm_unlink(argv[1]);
    shm_unlink(argv[2]);
    return 0;
}
'''


def _checkpoint(proc, out, *args, kill: bool = True) -> dict:
    argv = [CRCHECKPOINT, str(proc.pid), "-o", str(out), "--json", *args]
    if kill:
        argv.append("--kill")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crcheckpoint failed ({r.returncode}): {r.stderr}"
    summary = json.loads(r.stdout)
    if kill:
        proc.wait(timeout=10)
        reap(summary["pids"])
    return summary


def _names() -> tuple[str, ...]:
    tag = uuid.uuid4().hex[:8]
    return tuple(f"/crelf-test-{tag}-{x}" for x in ("a", "b"))


def _rm_shm(*names: str) -> None:
    for n in names:
        for p in (f"/dev/shm{n}", f"/dev/shm{n}-gone"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def test_parent_and_child_share_memfd_and_posix_shm(procs, tmp_path):
    """A memfd (shared and private mappings, an fd both tasks share), a POSIX
    shm in /dev/shm and a shm_unlink'ed one: each saved once, restored as one
    shared object, so the turn passes between the restarted tasks and the
    output is the uninterrupted run's."""
    require_root()
    name, _ = _names()
    prog = build_c(tmp_path, "pingpong", PINGPONG)
    try:
        ref = subprocess.run([prog, "60", name], capture_output=True, timeout=60,
                             check=True).stdout
        out = tmp_path / "pp.out"
        proc = procs.spawn([prog, "60", name], stdout=out)
        wait_for_line(out, r"child turn 10 ", proc=proc)
        _checkpoint(proc, tmp_path / "pp.cr")
        sf = reader.load(str(tmp_path / "pp.cr"))
        # one record per object, whatever the number of tasks, fds and mappings
        # (every deleted-but-open file is an object too: pytest's capture file)
        assert sorted((o.kind, o.name if o.kind == "memfd" else o.path) for o in sf.shmem
                      if o.kind == "memfd" or o.path.startswith("/dev/shm")) == \
            [("deleted", f"/dev/shm{name}-gone"), ("memfd", "crelf counter")]
        memfd = next(o for o in sf.shmem if o.kind == "memfd")
        assert memfd.size == 4 << 20 and memfd.seals == 0
        blob = sf.segment(memfd.blob)
        assert sum(n for _, n in blob.runs) < 1 << 20     # sparse: data ranges only
        users = [m for t in sf.tasks for m in t.mappings if m.shmem == memfd.id]
        assert len(users) == 4                                # 2 tasks x (shared, private)
        assert os.path.exists(f"/dev/shm{name}")              # same host: still there
        code, err = finish(restart(procs, tmp_path / "pp.cr"))
        assert code == 0, err
        assert out.read_bytes() == ref
        assert b"fd /memfd:crelf counter (deleted) size 4194304 offset 123 seals 0 cloexec 1" \
            in ref
        assert not os.path.exists(f"/dev/shm{name}")          # the program removed it
    finally:
        _rm_shm(name)


def test_sealed_memfds_keep_their_seals(procs, tmp_path):
    """Seals come back after the content, and F_SEAL_FUTURE_WRITE after the
    writable mapping made before it: the restarted program reads its seals
    with F_GET_SEALS and sees the same refusals."""
    require_root()
    prog = build_c(tmp_path, "sealed", SEALED)
    ref = subprocess.run([prog], capture_output=True, timeout=60, check=True).stdout
    assert b"a: /memfd:sealed (deleted) seals 0xe size 65536" in ref
    assert b"b: /memfd:future (deleted) seals 0x11 size 4096" in ref
    assert b"c: /memfd:plain (deleted) seals 0x1 size 3145731" in ref
    out = tmp_path / "sealed.out"
    proc = procs.spawn([prog], stdout=out)
    wait_for_line(out, r"tick 10 ", proc=proc)
    _checkpoint(proc, tmp_path / "sealed.cr")
    sf = reader.load(str(tmp_path / "sealed.cr"))
    assert {o.name: o.seals for o in sf.shmem if o.kind == "memfd"} == {
        "sealed": 0xe, "future": 0x11, "plain": 0x1}
    code, err = finish(restart(procs, tmp_path / "sealed.cr"))
    assert code == 0, err
    assert out.read_bytes() == ref


@pytest.mark.checkpoint_only("one statefile is kept without the /dev/shm content on "
                              "purpose: its restart must refuse once the file is gone")
def test_dev_shm_recreated_from_the_statefile(procs, tmp_path):
    """With --dump-tmpfs, POSIX shm files (one only mapped, one mapped and
    open) deleted from /dev/shm after the checkpoint, as on another host, are
    recreated from the statefile at their paths and mapped shared again.
    Without the policy the same restart is refused, naming the file."""
    require_root()
    a, b = _names()
    prog = build_c(tmp_path, "tmpfs", TMPFS)
    try:
        ref = subprocess.run([prog, a, b], capture_output=True, timeout=60, check=True).stdout
        out = tmp_path / "tmpfs.out"
        proc = procs.spawn([prog, a, b], stdout=out)
        wait_for_line(out, r"tick 5 ", proc=proc)
        _checkpoint(proc, tmp_path / "plain.cr", kill=False)
        wait_for_line(out, r"tick 15 ", proc=proc)
        _checkpoint(proc, tmp_path / "tmpfs.cr", "--dump-tmpfs")
        sf = reader.load(str(tmp_path / "tmpfs.cr"))
        assert sorted((o.kind, o.path) for o in sf.shmem if o.kind == "tmpfs") == \
            [("tmpfs", f"/dev/shm{a}"), ("tmpfs", f"/dev/shm{b}")]
        _rm_shm(a, b)                                    # "another host"
        r = subprocess.run([*CRRESTART, str(tmp_path / "plain.cr")], capture_output=True,
                           text=True, timeout=60, cwd=REPO)
        assert r.returncode != 0 and f"/dev/shm{a}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        rp = restart(procs, tmp_path / "tmpfs.cr")
        code, err = finish(rp)
        assert code == 0, err
        assert "recreated from the content saved in the statefile" in err
        assert out.read_bytes() == ref
        assert not os.path.exists(f"/dev/shm{a}")        # the program removed them again
    finally:
        _rm_shm(a, b)
