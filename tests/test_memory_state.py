"""Memory state that must come back as it was (statefile/dump/memory.py,
restorer/restore/memory.py), each checked by a small C program that is
checkpointed with --kill, restarted, and then checks itself:

* pages a parent, its child and a grandchild still share copy-on-write since
  fork() are shared again (same physical page in /proc/PID/pagemap), and a
  standalone core of the child (crinspect core) holds them;
* guard pages (MADV_GUARD_INSTALL) still fault, MAP_DROPPABLE memory comes
  back empty, and each mapping's VmFlags (madvise advice, mlock) are the same;
* a MAP_PRIVATE mapping of a shared anonymous object still sees the object's
  pages it had not copied;
* a memfd can still be execveat()ed (no writable reopen left behind);
* fd tables shared with CLONE_FILES are one table again; sharers whose
  parent exited are refused up front (exit 6, nothing written).

Every program waits for a "go" file, created after the checkpoint, so only
the restarted copy runs the checks."""
from __future__ import annotations

import json
import struct
import subprocess
import time

from helpers import build_c, require_root, wait_for_line
from test_tree import CRCHECKPOINT, CRRESTART, REPO, finish, reap, restart

CRINSPECT = [CRRESTART[0], "-m", "crinspect"]

COW = r'''#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* Pages shared copy-on-write by a parent, its child and a grandchild.
   anon: N pages (PROT_NONE pages around it keep it one mapping); the child
   rewrites pages 0-3 and drops 4-5 before it forks the grandchild; the parent
   rewrites 8-11 after the fork.  file: a private file mapping whose pages
   0-7 were written before the fork.  Sharing is read from /proc/PID/pagemap
   (root: PFNs).  argv: go-file, data file.  Prints "ready ANON", waits for
   the go file, checks, prints "PASS" or FAIL lines. */
#define N 32
#define P 4096
static unsigned char *anon, *file;

static uint64_t pme(pid_t pid, void *addr) {
    char path[64]; uint64_t e = 0;
    snprintf(path, sizeof path, "/proc/%d/pagemap", pid);
    int fd = open(path, O_RDONLY);
    pread(fd, &e, 8, (uintptr_t)addr / P * 8);
    close(fd);
    return e;
}
static int shared(pid_t a, pid_t b, void *addr) {
    uint64_t x = pme(a, addr), y = pme(b, addr);
    return (x >> 63) && (y >> 63) && (x & ((1ULL << 55) - 1)) && x == y;
}
static int bad;
static void expect(int cond, const char *what, int i) {
    if (!cond) { printf("FAIL %s page %d\n", what, i); fflush(stdout); bad = 1; }
}
static int check_bytes(unsigned char *p, unsigned char v) {
    for (int k = 0; k < P; k++) if (p[k] != v) return 0;
    return 1;
}
static void wait_go(const char *go) {
    struct stat st;
    while (stat(go, &st) != 0) usleep(10000);
}
static int sharing(pid_t me, pid_t child, pid_t gchild) {
    int r = 1;
    for (int i = 0; i < N; i++) {
        int all3 = i == 6 || i == 7 || i >= 12;   /* nobody wrote them since the fork */
        r &= shared(me, child, anon + i * P) == all3;
        r &= shared(child, gchild, anon + i * P) == (i < 4 || i >= 6);
        r &= shared(me, gchild, anon + i * P) == all3;
    }
    for (int i = 0; i < 8; i++)
        r &= shared(me, child, file + i * P);
    return r;
}
int main(int argc, char **argv) {
    unsigned char *area = mmap(NULL, (N + 2) * P, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    anon = mmap(area + P, N * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                -1, 0);
    for (int i = 0; i < N; i++) memset(anon + i * P, i + 1, P);
    int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    for (int i = 0; i < N; i++) { unsigned char b[P]; memset(b, 'f', P); write(fd, b, P); }
    file = mmap(NULL, N * P, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    for (int i = 0; i < 8; i++) memset(file + i * P, 'F' + i, P);
    int up[2], down[2];
    pipe(up); pipe(down);
    pid_t child = fork(), gchild = 0;
    if (child == 0) {
        for (int i = 0; i < 4; i++) memset(anon + i * P, 0xc0 + i, P);
        madvise(anon + 4 * P, 2 * P, MADV_DONTNEED);
        gchild = fork();
        if (gchild == 0) { pause(); _exit(0); }
        write(up[1], &gchild, sizeof gchild);
        char c;
        read(down[0], &c, 1);
        for (int i = 0; i < N; i++) {
            unsigned char v = i < 4 ? 0xc0 + i : i < 6 ? 0 : i + 1;
            expect(check_bytes(anon + i * P, v), "child anon", i);
        }
        for (int i = 0; i < N; i++)
            expect(check_bytes(file + i * P, i < 8 ? 'F' + i : 'f'), "child file", i);
        kill(gchild, SIGKILL);
        waitpid(gchild, NULL, 0);
        _exit(bad);
    }
    read(up[0], &gchild, sizeof gchild);
    for (int i = 8; i < 12; i++) memset(anon + i * P, 0xa0 + i, P);
    if (!sharing(getpid(), child, gchild)) {
        printf("PRECHECK FAIL\n"); fflush(stdout);
        kill(child, SIGKILL); kill(gchild, SIGKILL);
        return 1;
    }
    printf("ready %p %d\n", anon, child); fflush(stdout);
    wait_go(argv[1]);
    for (int i = 0; i < N; i++) {
        int all3 = i == 6 || i == 7 || i >= 12;
        expect(shared(getpid(), child, anon + i * P) == all3, "parent-child anon sharing", i);
        expect(shared(child, gchild, anon + i * P) == (i < 4 || i >= 6),
               "child-grandchild anon sharing", i);
        expect(shared(getpid(), gchild, anon + i * P) == all3, "parent-grandchild sharing", i);
        expect(check_bytes(anon + i * P, i >= 8 && i < 12 ? 0xa0 + i : i + 1), "parent anon", i);
    }
    for (int i = 0; i < 8; i++)
        expect(shared(getpid(), child, file + i * P), "file cow sharing", i);
    for (int i = 0; i < N; i++)
        expect(check_bytes(file + i * P, i < 8 ? 'F' + i : 'f'), "parent file", i);
    /* still copy-on-write: a write now is the writer's own */
    anon[20 * P] = 0x55;
    expect(!shared(getpid(), child, anon + 20 * P), "write breaks sharing", 20);
    anon[20 * P] = 21;
    write(down[1], "g", 1);
    int st;
    waitpid(child, &st, 0);
    expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "child exit", 0);
    if (!bad) printf("PASS\n");
    fflush(stdout);
    return bad;
}
'''


def _cycle(procs, tmp_path, binary, *args, expect_tasks=None):
    """Start binary (argv: go file, *args), checkpoint it with --kill once it
    says ready, create the go file, restart it and return (exit code,
    output lines, ready line)."""
    out, go, cr = tmp_path / "out.txt", tmp_path / "go", tmp_path / "state.cr"
    proc = procs.spawn([binary, go, *args], stdout=out)
    ready = wait_for_line(out, r"^(ready|PRECHECK)", proc=proc)
    assert ready.startswith("ready"), ready
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr), "--kill", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pids = json.loads(r.stdout)["pids"]
    if expect_tasks is not None:
        assert len(pids) == expect_tasks
    proc.wait(timeout=10)
    reap(pids)
    go.write_text("go\n")
    code, err = finish(restart(procs, cr))
    return code, out.read_text().splitlines(), ready, err


def _core_bytes(core, addr: int, n: int) -> bytes:
    """n bytes at addr in an ELF core (its PT_LOADs; holes read as zeros)."""
    data = core.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    for i in range(phnum):
        ptype, _, off, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", data,
                                                                          phoff + 56 * i)
        if ptype == 1 and vaddr <= addr < vaddr + memsz:
            rel = addr - vaddr
            return data[off + rel:off + min(rel + n, filesz)].ljust(n, b"\0")
    raise AssertionError(f"{addr:#x} is in no PT_LOAD")


def test_cow_pages_shared_again(procs, tmp_path):
    """Parent, child and grandchild: the pages nobody wrote since the forks
    are one physical page again after the restart (and still copy-on-write),
    the ones each wrote are its own, the dropped ones are zeros; private file
    pages copied before the fork stay shared too.  The child's shared pages
    are stored once (in the parent), and crinspect core of the child has them."""
    require_root()
    binary = build_c(tmp_path, "cow", COW)
    code, lines, ready, err = _cycle(procs, tmp_path, binary, tmp_path / "data",
                                     expect_tasks=3)
    assert code == 0 and "PASS" in lines, (lines, err)
    from statefile.format import reader
    sf = reader.load(str(tmp_path / "state.cr"))
    child = int(ready.split()[2])
    anon = int(ready.split()[1], 16)
    m = next(m for m in sf.task(child).mappings if m.start == anon)
    assert m.cow_parent, m
    stored = sum(n for p in m.segments for _, n in sf.segment(p).runs)
    # only the 4 pages it rewrote and the 4 the parent rewrote after the fork
    assert stored == 8 * 4096, stored
    core = tmp_path / "child.core"
    r = subprocess.run([*CRINSPECT, "core", str(tmp_path / "state.cr"), "--pid", str(child),
                        "-o", str(core)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _core_bytes(core, anon + 20 * 4096, 4096) == bytes([21]) * 4096   # the parent's
    assert _core_bytes(core, anon + 1 * 4096, 4096) == bytes([0xc1]) * 4096  # its own
    assert _core_bytes(core, anon + 4 * 4096, 4096) == bytes(4096)           # dropped




VMFLAGS = r'''#define _GNU_SOURCE
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* Guard pages (MADV_GUARD_INSTALL) in an anonymous and a private file
   mapping, a MAP_DROPPABLE mapping, and mappings with madvise advice and
   mlock.  Records each mapping's VmFlags (smaps), waits for the go file,
   then checks guards still fault, the other pages kept their bytes, the
   droppable one reads zeros, and every VmFlags line is the same.
   argv: go-file, data file. */
#define P 4096
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif
#ifndef MAP_DROPPABLE
#define MAP_DROPPABLE 0x08
#endif
enum { NM = 8 };
static char *maps[NM];
static char flags[NM][256];
static sigjmp_buf jb;
static void segv(int s) { siglongjmp(jb, 1); }
static int writable(char *p) {
    if (sigsetjmp(jb, 1)) return 0;
    *(volatile char *)p = *(volatile char *)p;
    return 1;
}
static void vmflags(char *addr, char *out) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512]; int in = 0;
    out[0] = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long a, b;
        if (sscanf(line, "%lx-%lx ", &a, &b) == 2 && strchr(line, '-') < strchr(line, ' '))
            in = (unsigned long)addr == a;
        else if (in && !strncmp(line, "VmFlags:", 8)) { strcpy(out, line + 8); break; }
    }
    fclose(f);
}
int bad;
#define EXPECT(c, ...) do { if (!(c)) { printf("FAIL " __VA_ARGS__); printf("\n"); bad = 1; } } while (0)
int main(int argc, char **argv) {
    signal(SIGSEGV, segv);
    int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    ftruncate(fd, 8 * P);
    /* 0: anon, guards on pages 2 and 5;  1: private file, guards on 1 and 6 */
    maps[0] = mmap(NULL, 8 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    maps[1] = mmap(NULL, 8 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    for (int i = 0; i < 8; i++) { memset(maps[0] + i * P, 'a' + i, P); memset(maps[1] + i * P, 'A' + i, P); }
    madvise(maps[0] + 2 * P, P, MADV_GUARD_INSTALL);
    madvise(maps[0] + 5 * P, P, MADV_GUARD_INSTALL);
    madvise(maps[1] + 1 * P, P, MADV_GUARD_INSTALL);
    madvise(maps[1] + 6 * P, P, MADV_GUARD_INSTALL);
    maps[2] = mmap(NULL, 2 * P, PROT_READ | PROT_WRITE, MAP_DROPPABLE | MAP_ANONYMOUS, -1, 0);
    if (maps[2] == MAP_FAILED) maps[2] = NULL; else memset(maps[2], 'd', 2 * P);
    int adv[] = {MADV_SEQUENTIAL, MADV_RANDOM, MADV_DONTFORK, MADV_HUGEPAGE, MADV_WIPEONFORK};
    for (int i = 0; i < 5; i++) {
        maps[3 + i] = mmap(NULL, 2 * P, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | (i == 0 ? MAP_LOCKED : 0), -1, 0);
        memset(maps[3 + i], '0' + i, 2 * P);
        madvise(maps[3 + i], 2 * P, adv[i]);
    }
    for (int i = 0; i < NM; i++) if (maps[i]) vmflags(maps[i], flags[i]);
    printf("ready\n"); fflush(stdout);
    struct stat st;
    while (stat(argv[1], &st) != 0) usleep(10000);
    for (int i = 0; i < 8; i++) {
        int g0 = i == 2 || i == 5, g1 = i == 1 || i == 6;
        EXPECT(writable(maps[0] + i * P) == !g0, "anon page %d guard %d", i, g0);
        EXPECT(writable(maps[1] + i * P) == !g1, "file page %d guard %d", i, g1);
        if (!g0) EXPECT(maps[0][i * P + 7] == 'a' + i, "anon page %d content", i);
        if (!g1) EXPECT(maps[1][i * P + 7] == 'A' + i, "file page %d content", i);
    }
    if (maps[2]) EXPECT(maps[2][0] == 0 && maps[2][P] == 0, "droppable memory kept its bytes");
    for (int i = 3; i < NM; i++) EXPECT(maps[i][5] == '0' + i - 3, "advised mapping %d content", i);
    for (int i = 0; i < NM; i++) {
        char now[256];
        if (!maps[i]) continue;
        vmflags(maps[i], now);
        EXPECT(!strcmp(now, flags[i]), "mapping %d VmFlags were %.*s now %.*s", i,
               (int)strlen(flags[i]) - 1, flags[i], (int)strlen(now) - 1, now);
    }
    if (!bad) printf("PASS\n");
    fflush(stdout);
    return bad;
}
'''


SHMEM_PRIVATE = r'''#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* A MAP_SHARED anonymous object (5 pages) mapped again through its
   /proc/self/map_files entry: MAP_PRIVATE from page 1 (6 pages: the last one
   is past the object's end) and MAP_SHARED from page 2.  After the go file:
   the private mapping's own page is kept, the pages it never wrote still
   follow the object, the two shared mappings and the fd are one object.
   argv: go-file. */
#define P 4096
int bad;
#define EXPECT(c, ...) do { if (!(c)) { printf("FAIL " __VA_ARGS__); printf("\n"); bad = 1; } } while (0)
int main(int argc, char **argv) {
    char *obj = mmap(NULL, 5 * P, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < 5; i++) obj[i * P] = 10 + i;
    char path[128];
    snprintf(path, sizeof path, "/proc/self/map_files/%lx-%lx", (long)obj, (long)obj + 5 * P);
    int fd = open(path, O_RDWR);
    char *priv = mmap(NULL, 6 * P, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, P);
    char *again = mmap(NULL, 3 * P, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 2 * P);
    if (priv == MAP_FAILED || again == MAP_FAILED) { printf("PRECHECK mmap\n"); return 1; }
    priv[P] = 99;                       /* object page 2, copied */
    printf("ready\n"); fflush(stdout);
    struct stat st;
    while (stat(argv[1], &st) != 0) usleep(10000);
    EXPECT(priv[P] == 99, "private copy lost");
    EXPECT(priv[0] == 11, "private view of page 1: %d", priv[0]);
    EXPECT(again[0] == 12 && obj[2 * P] == 12, "object page 2");
    again[P] = 77;                      /* object page 3 */
    EXPECT(obj[3 * P] == 77, "second shared mapping is not the object");
    EXPECT(priv[2 * P] == 77, "private mapping does not follow the object");
    obj[4 * P] = 55;
    EXPECT(priv[3 * P] == 55, "private mapping page 4");
    char v = 33, r = 0;                 /* the fd is the object too */
    pwrite(fd, &v, 1, 0);
    EXPECT(obj[0] == 33, "a write through the fd is not in the object");
    pread(fd, &r, 1, 3 * P);
    EXPECT(r == 77, "the fd does not read the object");
    if (!bad) printf("PASS\n");
    fflush(stdout);
    return bad;
}
'''


MEMFD_EXEC = r'''#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* A memfd holding a script, executed through its fd (execveat
   AT_EMPTY_PATH) before and after the restart; also mapped MAP_SHARED and
   opened O_RDONLY a second time.  argv: go-file. */
static int run(int fd) {
    pid_t pid = fork();
    if (pid == 0) {
        char *a[] = {"true", NULL}, *e[] = {NULL};
        syscall(SYS_execveat, fd, "", a, e, AT_EMPTY_PATH);
        perror("execveat");
        _exit(100);
    }
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 200;
}
int main(int argc, char **argv) {
    int fd = memfd_create("script", 0);
    write(fd, "#!/bin/true\n", 12);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int ro = open(path, O_RDONLY);
    char *m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, ro, 0);
    if (run(fd) != 0 || m == MAP_FAILED) { printf("PRECHECK exec\n"); return 1; }
    printf("ready\n"); fflush(stdout);
    struct stat st;
    while (stat(argv[1], &st) != 0) usleep(10000);
    int r = run(fd);
    if (r == 0 && m[0] == '#') printf("PASS\n"); else printf("FAIL exec %d\n", r);
    fflush(stdout);
    return r != 0;
}
'''


FDT = r'''#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* One fd table for a parent, its child and that child's child (clone with
   CLONE_FILES); a second child has a copy.  After the go file the parent
   opens a file at fd 200: the sharers see it, the copy does not.
   argv: go-file, file. */
static pid_t clone_files(void) {
    return syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0);
}
static int pfd[2], qfd[2];
static int wait_and_check(int want) {
    char c;
    if (read(pfd[0], &c, 1) != 1) return 2;
    struct stat st;
    int has = fstat(200, &st) == 0;
    write(qfd[1], "x", 1);
    return has != want;
}
int main(int argc, char **argv) {
    pipe(pfd); pipe(qfd);
    pid_t a = clone_files(), b, c;
    if (a == 0) {
        pid_t g = clone_files();
        if (g == 0) _exit(wait_and_check(1));
        int r = wait_and_check(1), st;
        waitpid(g, &st, 0);
        _exit(r | (WIFEXITED(st) ? WEXITSTATUS(st) : 4));
    }
    b = fork();
    if (b == 0) _exit(wait_and_check(0));
    (void)c;
    printf("ready\n"); fflush(stdout);
    struct stat st;
    while (stat(argv[1], &st) != 0) usleep(10000);
    int fd = open(argv[2], O_RDONLY);
    dup2(fd, 200);
    close(fd);
    write(pfd[1], "ggg", 3);
    char x[3];
    for (int i = 0; i < 3; i++) read(qfd[0], x, 1);
    int sa, sb;
    waitpid(a, &sa, 0);
    waitpid(b, &sb, 0);
    if (WIFEXITED(sa) && !WEXITSTATUS(sa) && WIFEXITED(sb) && !WEXITSTATUS(sb))
        printf("PASS\n");
    else
        printf("FAIL sharer %d copy %d\n", sa, sb);
    fflush(stdout);
    return 0;
}
'''


FDT_ORPHANS = r'''#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* Two processes sharing one fd table whose parent (the table's first
   owner) exited: they were adopted by the root, a child subreaper, which
   does not share it. */
int main(void) {
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    pid_t b = fork();
    if (b == 0) {
        for (int i = 0; i < 2; i++)
            if (syscall(SYS_clone, CLONE_FILES | SIGCHLD, 0, 0, 0, 0) == 0)
                for (;;) pause();
        _exit(0);
    }
    waitpid(b, NULL, 0);
    printf("ready\n"); fflush(stdout);
    for (;;) pause();
}
'''


def test_guard_pages_droppable_and_vmflags(procs, tmp_path):
    """Guard pages fault again (they were unreadable: checkpoint exit 4
    before), MAP_DROPPABLE memory comes back empty, and the VmFlags of
    mappings with madvise advice, MAP_LOCKED, guards are unchanged."""
    require_root()
    binary = build_c(tmp_path, "vmf", VMFLAGS)
    code, lines, _, err = _cycle(procs, tmp_path, binary, tmp_path / "data")
    assert code == 0 and "PASS" in lines, (lines, err)
    from statefile.format import reader
    sf = reader.load(str(tmp_path / "state.cr"))
    guarded = [m for m in sf.root.mappings if m.guards]
    assert len(guarded) == 2, guarded


def test_private_mapping_of_shared_anonymous_memory(procs, tmp_path):
    """MAP_PRIVATE of a MAP_SHARED anonymous object (through map_files), one
    page past the object's end: its own page is kept and the others follow
    the object, which is one object again for every shared mapping and for
    the fd it was mapped through."""
    require_root()
    binary = build_c(tmp_path, "shpriv", SHMEM_PRIVATE)
    code, lines, _, err = _cycle(procs, tmp_path, binary)
    assert code == 0 and "PASS" in lines, (lines, err)


def test_memfd_still_executable(procs, tmp_path):
    """execveat() of a memfd after the restart (an O_RDWR reopen of it would
    make that ETXTBSY)."""
    require_root()
    binary = build_c(tmp_path, "mfdexec", MEMFD_EXEC)
    code, lines, _, err = _cycle(procs, tmp_path, binary)
    assert code == 0 and "PASS" in lines, (lines, err)


def test_fd_table_shared_with_clone_files(procs, tmp_path):
    """A parent, a CLONE_FILES child and its CLONE_FILES child share one fd
    table again (an fd the parent opens after the restart is theirs too); a
    plain fork()ed child keeps its own copy."""
    require_root()
    binary = build_c(tmp_path, "fdt", FDT)
    data = tmp_path / "data"
    data.write_text("x")
    code, lines, _, err = _cycle(procs, tmp_path, binary, data, expect_tasks=4)
    assert code == 0 and "PASS" in lines, (lines, err)
    from statefile.format import reader
    sf = reader.load(str(tmp_path / "state.cr"))
    root = sf.root.pid
    assert sorted(t.fdt == root for t in sf.tasks) == [False, True, True, True]


def test_fd_table_shared_by_orphans_is_refused(procs, tmp_path):
    """Two sharers of one fd table whose parent exited (adopted by a
    subreaper that does not share it): refused up front, exit 6, nothing
    written, the tree runs on."""
    require_root()
    binary = build_c(tmp_path, "fdtorphan", FDT_ORPHANS)
    out = tmp_path / "out.txt"
    proc = procs.spawn([binary], stdout=out)
    wait_for_line(out, "^ready", proc=proc)
    cr = tmp_path / "state.cr"
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "shares its fd table (CLONE_FILES)" in r.stderr, r.stderr
    assert not cr.exists()
    time.sleep(0.1)
    assert proc.poll() is None
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        assert len(f.read().split()) == 2
