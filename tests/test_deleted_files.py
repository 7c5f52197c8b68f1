"""Files that are gone, or that point back into the tree, checkpointed and
restarted (restorer/restore/files.py, restorer/restore/memfd.py, restorer/tree.py):

* deleted-but-open files: one inode again for every open file description
  and private mapping of it, in every task; its owner, mode, size, content
  and times; an O_TMPFILE file stays linkable; a file whose opened name was
  removed while another hard link keeps it is the same inode as that link;
* removed directories (an open fd, a removed working directory) and removed
  FIFOs (bytes in flight);
* the tree's own /proc files (/proc/CHILD/stat, /proc/self/status), a
  namespace file, and a working directory in a dead process's /proc
  directory;
* terminal devices: a console device node comes back with its device number,
  a pty slave with its owner and mode;
* a namespace fd of a namespace the process is not in, and (unprivileged) a
  file still linked elsewhere whose opened name was removed, are refused
  (exit 6, nothing written, the target runs on).

Each program prints what it sees at the end; the restarted run must print
exactly what an uninterrupted run prints.
"""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import build_c, read_lines, require_root, wait_for_line
from test_restart_unpriv import NOBODY, _python_for_nobody, as_nobody
from test_tree import CRCHECKPOINT, checkpoint_tree, finish, restart

import test_restart_unpriv

nobody_dir = test_restart_unpriv.nobody_dir     # (the fixture: a directory user 65534 owns)

FILES = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>

/* argv: directory, ticks.  A deleted file (owner, mode, times set, 10000
   bytes) open through two names (two descriptions of one inode) and mapped
   private; an O_TMPFILE file; a file whose opened name is removed while a
   second link keeps it; a child holding the deleted file too, writing to it
   at the end. */
static unsigned hash(int fd, long n) {
    char buf[16384]; unsigned h = 0;
    long got = pread(fd, buf, n, 0);
    for (long i = 0; i < got; i++) h = h * 31 + (unsigned char)buf[i];
    return h ^ (unsigned)got;
}
int main(int argc, char **argv) {
    char a[512], b[512], c[512], d[512], e[512];
    int ticks = atoi(argv[2]);
    snprintf(a, sizeof a, "%s/a", argv[1]); snprintf(b, sizeof b, "%s/b", argv[1]);
    snprintf(c, sizeof c, "%s/c", argv[1]); snprintf(d, sizeof d, "%s/d", argv[1]);
    snprintf(e, sizeof e, "%s/e", argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fa = open(a, O_RDWR | O_CREAT | O_TRUNC, 0640);
    char buf[10000];
    for (int i = 0; i < 10000; i++) buf[i] = 'a' + i % 23;
    if (fa < 0 || write(fa, buf, sizeof buf) != sizeof buf) { perror("a"); return 1; }
    link(a, b);
    int fb = open(b, O_RDONLY);
    if (fchown(fa, 4321, 8765) || fchmod(fa, 0604)) { perror("owner"); return 1; }
    char *map = mmap(NULL, 8192, PROT_READ, MAP_PRIVATE, fa, 0);   /* (sets atime) */
    struct timespec ts[2] = {{1000000000, 5000}, {1200000000, 7000}};
    futimens(fa, ts);
    unlink(a); unlink(b);
    lseek(fa, 1234, SEEK_SET);
    int ft = open(argv[1], O_TMPFILE | O_RDWR, 0600);
    if (ft < 0 || write(ft, "tmpfile", 7) != 7) { perror("tmpfile"); return 1; }
    int fc = open(c, O_RDWR | O_CREAT | O_TRUNC, 0644);
    write(fc, "kept", 4);
    link(c, d); unlink(c);
    int go[2];
    pipe(go);
    pid_t kid = fork();
    if (!kid) {     /* writes through its own fd once the parent has looked */
        char x;
        close(go[1]);
        if (read(go[0], &x, 1) == 1)
            pwrite(fa, "CHILD", 5, 9000);
        return 0;
    }
    close(go[0]);
    for (int t = 1; t <= ticks; t++) {
        printf("tick %d\n", t);
        usleep(50000);
    }
    struct stat sa, sb, sc, sd, stt;
    fstat(fa, &sa); fstat(fb, &sb); fstat(fc, &sc); stat(d, &sd); fstat(ft, &stt);
    printf("owner %d:%d mode %o nlink %ld size %ld mtime %ld.%09ld atime %ld.%09ld\n",
           sa.st_uid, sa.st_gid, sa.st_mode & 07777, (long)sa.st_nlink, (long)sa.st_size,
           sa.st_mtim.tv_sec, sa.st_mtim.tv_nsec, sa.st_atim.tv_sec, sa.st_atim.tv_nsec);
    write(go[1], "g", 1);
    int st;
    waitpid(kid, &st, 0);
    printf("offset %ld two names one inode %d\n", (long)lseek(fa, 0, SEEK_CUR),
           sa.st_ino == sb.st_ino && sa.st_dev == sb.st_dev);
    char got[6] = "";
    pread(fb, got, 5, 9000);
    printf("child %d wrote %s hash %08x\n", WEXITSTATUS(st), got, hash(fb, 10000));
    pwrite(fa, "Z", 1, 100);
    printf("mapping sees the file %c %c\n", map[100], map[101]);
    printf("tmpfile size %ld nlink %ld linkable %d\n", (long)stt.st_size, (long)stt.st_nlink,
           linkat(ft, "", AT_FDCWD, e, AT_EMPTY_PATH) == 0);
    unlink(e);
    pwrite(fc, "KEPT", 4, 0);
    int fd2 = open(d, O_RDONLY);
    char k[5] = "";
    read(fd2, k, 4);
    printf("linked elsewhere same inode %d nlink %ld through the link %s\n",
           sc.st_ino == sd.st_ino, (long)sc.st_nlink, k);
    unlink(d);
    return 0;
}
'''

DIRS = r'''
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

/* argv: directory, ticks.  The working directory is removed; a directory
   two levels down is open and removed with its parent; a FIFO holding bytes
   is removed. */
int main(int argc, char **argv) {
    char cwd[512], x[512], y[512], f[512], link[1024] = "";
    int ticks = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    snprintf(cwd, sizeof cwd, "%s/cwd", argv[1]);
    snprintf(x, sizeof x, "%s/x", argv[1]); snprintf(y, sizeof y, "%s/x/y", argv[1]);
    snprintf(f, sizeof f, "%s/fifo", argv[1]);
    if (mkdir(cwd, 0751) || chdir(cwd)) { perror("cwd"); return 1; }
    int fcwd = open(".", O_RDONLY | O_DIRECTORY);
    mkdir(x, 0700); mkdir(y, 0705);
    int fy = open(y, O_RDONLY | O_DIRECTORY);
    if (rmdir(y) || rmdir(x) || rmdir(cwd)) { perror("rmdir"); return 1; }
    if (mkfifo(f, 0640)) { perror("fifo"); return 1; }
    int fr = open(f, O_RDONLY | O_NONBLOCK), fw = open(f, O_WRONLY);
    write(fw, "in flight\n", 10);
    unlink(f);
    for (int t = 1; t <= ticks; t++) {
        printf("tick %d\n", t);
        usleep(50000);
    }
    struct stat sy, sdot, scwd;
    fstat(fy, &sy); stat(".", &sdot); fstat(fcwd, &scwd);
    readlink("/proc/self/cwd", link, sizeof link - 1);
    printf("cwd %s getcwd %s\n", link, getcwd(x, sizeof x) ? "ok" : strerror(errno));
    printf("cwd mode %o nlink %ld same as its fd %d\n", sdot.st_mode & 07777,
           (long)sdot.st_nlink, sdot.st_ino == scwd.st_ino && sdot.st_dev == scwd.st_dev);
    printf("dir fd isdir %d mode %o nlink %ld\n", S_ISDIR(sy.st_mode), sy.st_mode & 07777,
           (long)sy.st_nlink);
    char buf[32] = "";
    int n = read(fr, buf, sizeof buf - 1);
    write(fw, "more\n", 5);
    n += read(fr, buf + n, sizeof buf - 1 - n);
    printf("fifo %d %s", n, buf);
    return 0;
}
'''

PROC = r'''
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

/* argv: ticks.  /proc/CHILD/stat, /proc/self/status, /proc/self/ns/uts are
   open; the working directory is /proc/PID of a child that was killed. */
int main(int argc, char **argv) {
    int ticks = atoi(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t kid = fork();
    if (!kid) { for (;;) pause(); }
    char p[64], buf[4096], a[256] = "", b[256] = "";
    snprintf(p, sizeof p, "/proc/%d/stat", kid);
    int fs = open(p, O_RDONLY), fself = open("/proc/self/status", O_RDONLY);
    int fns = open("/proc/self/ns/uts", O_RDONLY);
    pid_t dead = fork();
    if (!dead) { for (;;) pause(); }
    snprintf(p, sizeof p, "/proc/%d", dead);
    if (fs < 0 || fself < 0 || fns < 0 || chdir(p)) { perror("open"); return 1; }
    kill(dead, SIGKILL);
    waitpid(dead, NULL, 0);
    for (int t = 1; t <= ticks; t++) {
        printf("tick %d\n", t);
        usleep(50000);
    }
    int n = pread(fs, buf, sizeof buf - 1, 0);
    buf[n > 0 ? n : 0] = 0;
    printf("child stat is the child's %d\n", atoi(buf) == kid);
    n = pread(fself, buf, sizeof buf - 1, 0);
    buf[n > 0 ? n : 0] = 0;
    char *pid = strstr(buf, "\nPid:");
    printf("own status is its own %d\n", pid && atoi(pid + 5) == getpid());
    snprintf(p, sizeof p, "/proc/self/fd/%d", fns);
    readlink(p, a, sizeof a - 1);
    readlink("/proc/self/ns/uts", b, sizeof b - 1);
    printf("namespace fd is its namespace %d\n", strcmp(a, b) == 0);
    printf("getcwd in the dead directory: %s\n", getcwd(buf, sizeof buf) ? "ok"
           : strerror(errno));
    kill(kid, SIGKILL);
    waitpid(kid, NULL, 0);
    return 0;
}
'''

TTY = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

/* argv: directory, ticks.  A console device node (5:1) made and open; a pty
   pair whose slave's owner and mode were changed. */
int main(int argc, char **argv) {
    char con[512];
    int ticks = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    snprintf(con, sizeof con, "%s/console", argv[1]);
    if (mknod(con, S_IFCHR | 0600, makedev(5, 1))) { perror("mknod"); return 1; }
    int fcon = open(con, O_RDONLY | O_NOCTTY);
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    grantpt(m); unlockpt(m);
    int s = open(ptsname(m), O_RDWR | O_NOCTTY);
    if (fcon < 0 || m < 0 || s < 0 || fchown(s, 1234, 5678) || fchmod(s, 0604)) {
        perror("tty"); return 1;
    }
    for (int t = 1; t <= ticks; t++) {
        printf("tick %d\n", t);
        usleep(50000);
    }
    struct stat sc, ss;
    fstat(fcon, &sc); fstat(s, &ss);
    printf("console %d:%d chr %d\n", major(sc.st_rdev), minor(sc.st_rdev), S_ISCHR(sc.st_mode));
    printf("pty slave %d:%d mode %o\n", ss.st_uid, ss.st_gid, ss.st_mode & 07777);
    write(m, "x\n", 2);
    char c[3] = "";
    read(s, c, 2);
    printf("pty works %c\n", c[0]);
    unlink(con);
    return 0;
}
'''


def _cycle(procs, tmp_path, name: str, src: str, args: list, ticks: int = 12) -> list[str]:
    """Run the program uninterrupted, then again checkpointed (--kill) at
    tick 3 and restarted; both outputs must be equal.  Returns them."""
    require_root()
    exe = build_c(tmp_path, name, src)
    work = tmp_path / "ref"
    work.mkdir()
    ref = subprocess.run([exe, *[a if a != "DIR" else work for a in args], str(ticks)],
                         capture_output=True, timeout=60, close_fds=True)
    assert ref.returncode == 0, ref.stderr
    work = tmp_path / "run"
    work.mkdir()
    out = tmp_path / f"{name}.out"
    proc = procs.spawn([exe, *[a if a != "DIR" else work for a in args], ticks], stdout=out,
                       close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    cr = tmp_path / f"{name}.cr"
    checkpoint_tree(proc, cr)
    code, err = finish(restart(procs, cr))
    assert code == 0, err
    got = read_lines(out)
    want = ref.stdout.decode().replace(str(tmp_path / "ref"), str(work)).splitlines()
    assert got == want, (got, want)
    return got


def test_deleted_files_come_back_whole(procs, tmp_path):
    """Owner, mode, size, content, times, offset; two names one inode; the
    private mapping sees writes through the fd; a child's write through its
    fd shows in the parent's; O_TMPFILE stays linkable; a file still linked
    elsewhere is that link's inode."""
    got = _cycle(procs, tmp_path, "files", FILES, ["DIR"])
    assert "owner 4321:8765 mode 604 nlink 0 size 10000 mtime 1200000000.000007000 " \
           "atime 1000000000.000005000" in got
    assert "offset 1234 two names one inode 1" in got
    assert any(line.startswith("child 0 wrote CHILD") for line in got), got
    assert "mapping sees the file Z" in " ".join(got)
    assert "tmpfile size 7 nlink 0 linkable 1" in got
    assert "linked elsewhere same inode 1 nlink 1 through the link KEPT" in got


def test_removed_directories_and_fifos(procs, tmp_path):
    """A removed working directory (the same path, ' (deleted)', its fd the
    same directory), a removed directory open two levels down, a removed
    FIFO with bytes in flight."""
    got = _cycle(procs, tmp_path, "dirs", DIRS, ["DIR"])
    assert f"cwd {tmp_path}/run/cwd (deleted) getcwd No such file or directory" in got
    assert "cwd mode 751 nlink 0 same as its fd 1" in got
    assert "dir fd isdir 1 mode 705 nlink 0" in got
    assert got[-2:] == ["fifo 15 in flight", "more"]


def test_proc_files_of_the_tree(procs, tmp_path):
    """/proc/CHILD/stat and /proc/self/status are the restored processes',
    the namespace fd is the process's namespace, and the working directory
    is a dead process's /proc directory again."""
    got = _cycle(procs, tmp_path, "proc", PROC, [])
    assert got[-4:] == ["child stat is the child's 1", "own status is its own 1",
                        "namespace fd is its namespace 1",
                        "getcwd in the dead directory: No such file or directory"]


def test_console_device_and_pty_owner(procs, tmp_path):
    """A console device node keeps its device number (not crrestart's
    terminal), a pty slave its owner and mode."""
    got = _cycle(procs, tmp_path, "tty", TTY, ["DIR"])
    assert "console 5:1 chr 1" in got
    assert "pty slave 1234:5678 mode 604" in got
    assert "pty works x" in got


NSFD = r'''
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
c = os.fork()
if c == 0:
    libc.unshare(0x04000000)        # CLONE_NEWUTS
    os.write(w, b"x")
    time.sleep(60)
    os._exit(0)
os.read(r, 1)
fd = os.open(f"/proc/{c}/ns/uts", os.O_RDONLY)
os.kill(c, 9)
os.waitpid(c, 0)
os.close(r)
os.close(w)
print("ready", flush=True)
for i in range(600):
    print("tick", i, flush=True)
    time.sleep(0.1)
'''


def test_namespace_fd_of_another_namespace_is_refused(procs, tmp_path):
    """An fd on a UTS namespace the process is not in: crcheckpoint refuses
    it up front (exit 6, the reason named), writes nothing, and the process
    runs on."""
    require_root()
    out = tmp_path / "ns.out"
    proc = procs.spawn([sys.executable, "-c", NSFD], stdout=out, close_fds=True)
    wait_for_line(out, r"^ready$", proc=proc)
    cr = tmp_path / "ns.cr"
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr
    assert "namespace file of a namespace the task is not in" in r.stderr or \
        "namespace files of other namespaces" in r.stderr, r.stderr
    assert not cr.exists()
    n = len(read_lines(out))
    wait_for_line(out, rf"^tick {n + 2}$", proc=proc)      # still running
    assert proc.poll() is None


LINKED = r'''
import os, sys, time
d = sys.argv[1]
fd = os.open(f"{d}/a", os.O_RDWR | os.O_CREAT, 0o600)
os.write(fd, b"kept")
os.link(f"{d}/a", f"{d}/b")
os.unlink(f"{d}/a")
print("ready", flush=True)
for i in range(600):
    print("tick", i, flush=True)
    time.sleep(0.1)
'''


def test_linked_elsewhere_refused_without_root(procs, nobody_dir):
    """A file whose opened name was removed while another link keeps it,
    checkpointed by its (unprivileged) owner: no file handle can be used to
    find it again, so crcheckpoint refuses it up front (exit 6, the reason
    named), writes nothing, and the process runs on."""
    require_root()
    py, env = _python_for_nobody()
    out = nobody_dir / "l.out"
    out.touch()
    os.chown(out, NOBODY, NOBODY)
    proc = procs.spawn(as_nobody(py, "-c", LINKED, nobody_dir), stdout=out, env=env,
                       cwd=nobody_dir, close_fds=True)
    wait_for_line(out, r"^ready$", proc=proc)
    cr = nobody_dir / "l.cr"
    r = subprocess.run(as_nobody(py, "-m", "statefile.cli", proc.pid, "-o", cr, "--kill"),
                       capture_output=True, text=True, env=env, cwd=nobody_dir, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr
    assert "checkpoint as root, or keep a name for it" in r.stderr, r.stderr
    assert not cr.exists()
    n = len(read_lines(out))
    wait_for_line(out, rf"^tick {n + 2}$", proc=proc)
    assert proc.poll() is None
