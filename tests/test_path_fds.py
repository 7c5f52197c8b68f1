"""O_PATH fds on symbolic links and removed device nodes, checkpointed with
--kill and restarted (statefile/dump/files.py kind `symlink`,
restorer/restore/files.py open_ghost_nodes):

* a symbolic link opened with O_PATH|O_NOFOLLOW (its target readable with
  readlinkat(fd, "")), a dangling one, one opened without O_NOFOLLOW through
  /proc, and a removed one open through two descriptions (one dup'ed, one
  inherited by a child): made again with its target, owner and times,
  nlink 0, one inode for both descriptions;
* a removed device node of /dev/null held by the parent and its child, and
  a node of /dev/zero at a path of its own: mode, device number, owner, the
  device works, nothing left behind in the directory;
* a removed node of a device crelf cannot reopen (/dev/kmsg), and an O_PATH
  fd on a link in /proc, are refused up front (exit 6, nothing written, the
  program runs on).

The restarted run must print exactly what an uninterrupted run prints.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from helpers import build_c, read_lines, require_root, wait_for_line
from roundtrip import refused_up_front
from test_tree import checkpoint_tree, finish, restart

PROG = r'''
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>

/* argv: directory, ticks, [kmsg | proc]. */
static char d[512];
static const char *at(const char *name) {
    static char p[4][600];
    static int i;
    i = (i + 1) % 4;
    snprintf(p[i], sizeof p[i], "%s/%s", d, name);
    return p[i];
}
static void link_info(const char *what, int fd) {
    struct stat s;
    char buf[256] = "", self[64], name[600] = "";
    fstat(fd, &s);
    int n = readlinkat(fd, "", buf, sizeof buf - 1);
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    readlink(self, name, sizeof name - 1);
    errno = 0;
    off_t o = lseek(fd, 0, SEEK_CUR);
    printf("%s: link %d nlink %ld owner %d:%d mtime %ld target %s (%d) flags %o lseek %ld %s"
           " name %s\n", what, S_ISLNK(s.st_mode), (long)s.st_nlink, s.st_uid, s.st_gid,
           s.st_mtim.tv_sec == 1300000000 ? 1300000000L : 0L, buf, n, fcntl(fd, F_GETFL),
           (long)o, strerror(errno),
           strncmp(name, d, strlen(d)) ? name : name + strlen(d));
}
int main(int argc, char **argv) {
    snprintf(d, sizeof d, "%s", argv[1]);
    int ticks = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    close(creat(at("file"), 0644));
    if (symlink("file", at("l")) || symlink("nowhere/at/all", at("dangling"))
        || symlink("some/target", at("gone"))) { perror("symlink"); return 1; }
    int fl = open(at("l"), O_PATH | O_NOFOLLOW);
    int fdang = open(at("dangling"), O_PATH | O_NOFOLLOW);
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fl);
    int fproc = open(self, O_PATH);                  /* the link, without O_NOFOLLOW */
    int fg1 = open(at("gone"), O_PATH | O_NOFOLLOW), fg2 = open(at("gone"), O_PATH | O_NOFOLLOW);
    struct timespec ts[2] = {{1000000000, 0}, {1300000000, 0}};
    if (fchownat(AT_FDCWD, at("gone"), 4321, 8765, AT_SYMLINK_NOFOLLOW)
        || utimensat(AT_FDCWD, at("gone"), ts, AT_SYMLINK_NOFOLLOW)) { perror("own"); return 1; }
    unlink(at("gone"));
    int fg3 = dup(fg1);
    if (mknod(at("null"), S_IFCHR | 0640, makedev(1, 3))
        || mknod(at("zero"), S_IFCHR | 0604, makedev(1, 5))) { perror("mknod"); return 1; }
    chown(at("null"), 1234, 5678);
    int fn = open(at("null"), O_WRONLY), fnr = open(at("null"), O_RDONLY);
    int fz = open(at("zero"), O_RDONLY);
    unlink(at("null"));
    int fk = -1;
    if (argc > 3 && !strcmp(argv[3], "kmsg")) {
        mknod(at("kmsg"), S_IFCHR | 0600, makedev(1, 11));
        fk = open(at("kmsg"), O_RDONLY | O_NONBLOCK);
        unlink(at("kmsg"));
    } else if (argc > 3)
        fk = open("/proc/self/exe", O_PATH | O_NOFOLLOW);
    if (fl < 0 || fdang < 0 || fproc < 0 || fg1 < 0 || fg2 < 0 || fn < 0 || fnr < 0 || fz < 0
        || (argc > 3 && fk < 0)) { perror("open"); return 1; }
    int go[2];
    pipe(go);
    pid_t kid = fork();
    if (!kid) {          /* holds the removed node and link too, looks at them at the end */
        char x;
        close(go[1]);
        if (read(go[0], &x, 1) == 1) {
            struct stat a, b;
            fstat(fn, &a); fstat(fg2, &b);
            printf("child: null %d:%d nlink %ld write %ld gone nlink %ld\n", major(a.st_rdev),
                   minor(a.st_rdev), (long)a.st_nlink, (long)write(fn, "x", 1),
                   (long)b.st_nlink);
        }
        return 0;
    }
    close(go[0]);
    for (int t = 1; t <= ticks; t++) {
        printf("tick %d\n", t);
        usleep(50000);
    }
    link_info("l", fl);
    link_info("dangling", fdang);
    link_info("through proc", fproc);
    link_info("gone", fg1);
    link_info("gone again", fg2);
    struct stat a, b, c;
    fstat(fg1, &a); fstat(fg2, &b); fstat(fg3, &c);
    printf("gone: one inode %d dup same %d\n", a.st_ino == b.st_ino && a.st_dev == b.st_dev,
           a.st_ino == c.st_ino);
    fstat(fn, &a); fstat(fnr, &b); fstat(fz, &c);
    char z[4] = "abc";
    long w = write(fn, "abc", 3), r = read(fnr, z, 3);
    printf("null: mode %o dev %d:%d nlink %ld owner %d:%d one inode %d write %ld read %ld"
           " flags %o %o\n", a.st_mode, major(a.st_rdev), minor(a.st_rdev), (long)a.st_nlink,
           a.st_uid, a.st_gid, a.st_ino == b.st_ino, w, r, fcntl(fn, F_GETFL),
           fcntl(fnr, F_GETFL));
    r = read(fz, z, 3);
    printf("zero: mode %o dev %d:%d read %ld %d%d%d\n", c.st_mode, major(c.st_rdev),
           minor(c.st_rdev), r, z[0], z[1], z[2]);
    write(go[1], "g", 1);
    int st;
    waitpid(kid, &st, 0);
    printf("child exited %d\n", WEXITSTATUS(st));
    struct stat g;
    printf("at gone: %s\n", lstat(at("gone"), &g) ? strerror(errno)
           : S_ISLNK(g.st_mode) ? "a symbolic link" : "another file");
    DIR *dir = opendir(d);
    struct dirent *e;
    int left = 0;
    while ((e = readdir(dir)))
        if (e->d_name[0] != '.' || strstr(e->d_name, "crelf"))
            left++;
    closedir(dir);
    printf("entries left %d\n", left);      /* file, l, dangling, zero */
    return 0;
}
'''


def _run(procs, tmp_path, args, ticks=12, before_restart=None) -> tuple[list[str], list[str]]:
    """An uninterrupted run, and one checkpointed (--kill) at tick 3 and
    restarted; their outputs (the directory names replaced)."""
    require_root()
    exe = build_c(tmp_path, "pathfds", PROG)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref = subprocess.run([exe, ref_dir, str(ticks), *args], capture_output=True, text=True,
                         timeout=60, close_fds=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run.out"
    proc = procs.spawn([exe, run_dir, ticks, *args], stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    checkpoint_tree(proc, tmp_path / "p.cr")
    if before_restart:
        before_restart(run_dir)
    code, err = finish(restart(procs, tmp_path / "p.cr"))
    assert code == 0, err
    return ref.stdout.splitlines(), read_lines(out)


def test_symlinks_and_removed_device_nodes(procs, tmp_path):
    want, got = _run(procs, tmp_path, [])
    assert got == want
    assert "l: link 1 nlink 1 owner 0:0" in got[12] and "target file (4) flags 10400000 " \
        "lseek -1 Bad file descriptor name /l" in got[12], got[12]
    assert "target nowhere/at/all (14)" in got[13]
    assert "through proc: link 1" in got[14] and "flags 10000000" in got[14], got[14]
    assert got[15].startswith("gone: link 1 nlink 0 owner 4321:8765 mtime 1300000000 target "
                              "some/target (11)") and got[15].endswith("name /gone (deleted)")
    assert "gone: one inode 1 dup same 1" in got
    null = next(x for x in got if x.startswith("null:"))
    assert null == "null: mode 20640 dev 1:3 nlink 0 owner 1234:5678 one inode 1 write 3 read 0" \
        " flags 100001 100000", null
    assert "zero: mode 20604 dev 1:5 read 3 000" in got
    assert "child: null 1:3 nlink 0 write 1 gone nlink 0" in got
    assert got[-3:] == ["child exited 0", "at gone: No such file or directory",
                        "entries left 4"]


def test_removed_link_made_elsewhere_when_its_name_is_taken(procs, tmp_path):
    """The removed link's old name is taken when the restart comes: it is
    made at a scratch name instead (and removed), the file at the name is
    left alone, and the fd reads the same target."""
    def take(run_dir):
        (run_dir / "gone").write_text("someone else's\n")
    want, got = _run(procs, tmp_path, [], before_restart=take)
    for gone in (x for x in got if x.startswith(("gone: link", "gone again"))):
        assert "target some/target (11)" in gone and "nlink 0" in gone
        assert "name /.gone.crelf-" in gone and gone.endswith(" (deleted)"), gone
    assert "gone: one inode 1 dup same 1" in got
    assert (tmp_path / "run" / "gone").read_text() == "someone else's\n"
    skip = ("gone: link", "gone again", "at gone", "entries")
    assert [x for x in got if not x.startswith(skip)] == \
        [x for x in want if not x.startswith(skip)]
    assert got[-2:] == ["at gone: another file", "entries left 5"]   # (the taker's)


@pytest.mark.parametrize("what", ["kmsg", "proc"])
def test_removed_node_of_another_device_or_proc_link_is_refused(procs, tmp_path, what):
    """A removed node of a device crelf cannot reopen (/dev/kmsg), or an
    O_PATH fd on a link in /proc (/proc/self/exe): refused up front (exit 6,
    the reason named), nothing written, the program runs on."""
    require_root()
    exe = build_c(tmp_path, "pathfds", PROG)
    d = tmp_path / "run"
    d.mkdir()
    out = tmp_path / "k.out"
    proc = procs.spawn([exe, d, 40, what], stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    why = ["kmsg (deleted) (chr)", "device files other than"] if what == "kmsg" else \
        [f"/proc/{proc.pid}/exe (symlink)", "links in /proc"]
    refused_up_front(proc, tmp_path / "k.cr", *why, args=("--kill",))
    n = len(read_lines(out))
    wait_for_line(out, rf"^tick {n + 2}$", proc=proc)
    assert proc.poll() is None
    os.kill(proc.pid, 9)
