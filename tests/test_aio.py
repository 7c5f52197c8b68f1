"""AIO contexts (statefile/dump/aio.py, restorer/restore/aio.py): a program
with two io_setup rings, one with completed events it has not reaped yet,
is checkpointed with --kill mid-run and restarted; it then reaps those
events (their data, obj and res as they were), submits more writes through
the same context ids and reads the file back: the output must be the
uninterrupted run's byte for byte."""
from __future__ import annotations

from helpers import build_c, require_root
from roundtrip import same_after_restart

AIO = r'''
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

struct ring { unsigned id, nr, head, tail, magic, compat, incompat, hlen; };
static long setup(unsigned n, aio_context_t *c) { return syscall(SYS_io_setup, n, c); }
static long submit(aio_context_t c, int fd, const char *buf, long off, long tag) {
    struct iocb cb, *p = &cb;
    memset(&cb, 0, sizeof cb);
    cb.aio_data = tag; cb.aio_fildes = fd; cb.aio_lio_opcode = IOCB_CMD_PWRITE;
    cb.aio_buf = (unsigned long)buf; cb.aio_nbytes = strlen(buf); cb.aio_offset = off;
    return syscall(SYS_io_submit, c, 1, &p);
}
static void reap(const char *what, aio_context_t c, int n) {
    struct io_event ev[64];
    long got = syscall(SYS_io_getevents, c, n, n, ev, NULL);
    printf("%s: %ld events:", what, got);
    for (long i = 0; i < got; i++) printf(" tag %lld res %lld", (long long)ev[i].data,
                                          (long long)ev[i].res);
    printf("\n");
}
int main(int argc, char **argv) {
    aio_context_t a = 0, b = 0;
    if (setup(64, &a) < 0 || setup(1, &b) < 0) { perror("io_setup"); return 1; }
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
    static const char *words[] = {"alpha ", "beta ", "gamma ", "delta ", "epsilon "};
    long off = 0;
    for (int i = 0; i < 5; i++) { submit(a, fd, words[i], off, 100 + i); off += strlen(words[i]); }
    reap("before", a, 2);                       /* three stay completed, not reaped */
    struct ring *r = (struct ring *)a;
    printf("ring a: nr %u head %u tail %u\n", r->nr, r->head, r->tail);
    printf("ready\n"); fflush(stdout);
    const char *go = getenv("GO");
    for (int i = 0; i < 10 || (go && access(go, F_OK)); i++) {
        if (i < 10) { printf("tick %d\n", i); fflush(stdout); }
        usleep(20000);
    }
    printf("ring a: nr %u head %u tail %u, ids same %d\n", r->nr, r->head, r->tail,
           (aio_context_t)r == a);
    reap("after", a, 3);
    submit(a, fd, "zeta", off, 200);
    submit(b, fd, "!", off + 4, 300);
    reap("new a", a, 1);
    reap("new b", b, 1);
    char buf[128] = "";
    pread(fd, buf, sizeof buf - 1, 0);
    printf("file: %s\n", buf);
    return 0;
}
'''


def test_aio_rings_come_back(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "aio", AIO)
    ref = same_after_restart(procs, tmp_path, [prog, tmp_path / "run.dat"], "aio")
    assert b"after: 3 events: tag 102 res 6 tag 103 res 6 tag 104 res 8" in ref, ref
    assert b"file: alpha beta gamma delta epsilon zeta!" in ref, ref
