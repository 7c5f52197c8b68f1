"""pidfds (statefile/dump/pidfd.py, restorer/restore/pidfd.py): a program
holding pidfds of its child, of one of its threads and of an exited child is
checkpointed with --kill mid-run and restarted; it then uses them (signals
its child through its pidfd and reaps it, compares inodes, reads the flags)
and its output must be the uninterrupted run's byte for byte.  A pidfd of a
process outside the tree is refused before anything is written."""
from __future__ import annotations

import os

from helpers import build_c, require_root, wait_for_line
from roundtrip import refused_up_front, same_after_restart

PIDFDS = r'''
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static int pidfd_open(pid_t pid, unsigned flags) { return syscall(SYS_pidfd_open, pid, flags); }
static int psignal_(int fd, int sig) { return syscall(SYS_pidfd_send_signal, fd, sig, NULL, 0); }
static ino_t ino(int fd) { struct stat s; fstat(fd, &s); return s.st_ino; }
static int readable(int fd) { struct pollfd p = {fd, POLLIN, 0}; return poll(&p, 1, 0); }
static volatile pid_t worker_tid;
static void *worker(void *arg) {
    worker_tid = gettid();
    for (;;) pause();
}

/* argv[1] (optional): the pid of a process outside the tree to hold a pidfd of */
int main(int argc, char **argv) {
    pid_t a = fork();
    if (a == 0) { for (;;) pause(); }
    pid_t b = fork();
    if (b == 0) _exit(7);
    int pa = pidfd_open(a, 0), pa2 = dup(pa);
    int pb = pidfd_open(b, 0), pb2 = pidfd_open(b, O_NONBLOCK);
    int st;
    waitpid(b, &st, 0);                       /* b is gone: pb, pb2 refer to an exited process */
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    while (!worker_tid) usleep(1000);
    int pt = pidfd_open(worker_tid, O_EXCL);  /* PIDFD_THREAD */
    if (argc > 1 && pidfd_open(atoi(argv[1]), 0) < 0) { perror("pidfd_open"); return 1; }
    if (pa < 0 || pb < 0 || pb2 < 0 || pt < 0) { perror("pidfd_open"); return 1; }
    printf("ready\n"); fflush(stdout);
    const char *go = getenv("GO");           /* ticks 0-9, then on until the file GO exists */
    for (int i = 0; i < 10 || (go && access(go, F_OK)); i++) {
        if (i < 10) { printf("tick %d\n", i); fflush(stdout); }
        usleep(20000);
    }
    printf("fds %d %d %d %d %d\n", pa, pa2, pb, pb2, pt);
    printf("exited: same inode %d, not the child's %d, signal 0: %s, readable %d\n",
           ino(pb) == ino(pb2), ino(pb) != ino(pa), psignal_(pb, 0) < 0 && errno == ESRCH
           ? "ESRCH" : "delivered?", readable(pb));
    printf("flags: pb2 nonblock %d, pb blocking %d, pa cloexec %d, dup cloexec %d, "
           "thread pidfd %d\n", !!(fcntl(pb2, F_GETFL) & O_NONBLOCK),
           !(fcntl(pb, F_GETFL) & O_NONBLOCK), fcntl(pa, F_GETFD), fcntl(pa2, F_GETFD),
           !!(fcntl(pt, F_GETFL) & O_EXCL));
    printf("thread alive %d, dup is the same file %d\n", psignal_(pt, 0) == 0,
           ino(pa) == ino(pa2));
    printf("child running: readable %d\n", readable(pa));
    if (psignal_(pa2, SIGKILL) < 0) { perror("pidfd_send_signal"); return 1; }
    if (waitpid(a, &st, 0) != a) { perror("waitpid"); return 1; }
    printf("child killed through its pidfd: signal %d, readable %d\n",
           WIFSIGNALED(st) ? WTERMSIG(st) : -1, readable(pa));
    return 0;
}
'''


def test_pidfds_come_back(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "pidfds", PIDFDS + "\n")
    ref = same_after_restart(procs, tmp_path, [prog], "pidfds")
    assert b"exited: same inode 1, not the child's 1, signal 0: ESRCH, readable 1" in ref, ref
    assert b"child killed through its pidfd: signal 9, readable 1" in ref, ref


def test_pidfd_of_a_process_outside_the_tree_is_refused(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "pidfds", PIDFDS)
    outsider = procs.spawn(["sleep", "60"])
    out = tmp_path / "ext.out"
    proc = procs.spawn([prog, str(outsider.pid)], stdout=out, env={**os.environ, "GO": str(tmp_path / "never")})
    wait_for_line(out, r"tick 2\b", proc=proc)
    refused_up_front(proc, tmp_path / "ext.cr", f"refers to pid {outsider.pid}",
                     "not part of the checkpoint")
    wait_for_line(out, r"tick 8\b", proc=proc)      # it runs on, unharmed
    assert proc.poll() is None
