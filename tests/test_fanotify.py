"""fanotify groups (statefile/dump/fanotify.py, restorer/restore/fanotify.py):
a program with inode marks (a file, a directory's children) and a mount mark
carrying only an ignored mask is checkpointed with --kill mid-run and
restarted; afterwards it lists its marks from fdinfo, touches the files and
reads the events: the output must be the uninterrupted run's byte for byte.
Events queued at the checkpoint are refused, or with policy notify-events
dropped (said at both ends), the group coming back with its marks."""
from __future__ import annotations

import os
import time

from helpers import build_c, require_root, wait_for_line
from roundtrip import refused_up_front, same_after_restart
from test_memfd import _checkpoint
from test_tree import finish, restart

FANOTIFY = r'''
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/fanotify.h>

static void marks(int fd) {              /* fdinfo's marks without inode numbers */
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(path, "r");
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "fanotify ", 9)) continue;
        char *m = strstr(line, "mflags:"), *h = strstr(line, " fhandle");
        if (h) strcpy(h, "\n");          /* (the handle names the inode: another per run) */
        printf("%s %s", strstr(line, "ino:") ? "inode" : strstr(line, "mnt_id:") ? "mount"
               : strstr(line, "event-flags") ? "group" : "fs", m ? m : line + 9);
    }
    fclose(f);
}
static void events(int fd) {
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) { printf("read: %s\n", strerror(errno)); return; }
    for (struct fanotify_event_metadata *e = (void *)buf; FAN_EVENT_OK(e, n);
         e = FAN_EVENT_NEXT(e, n)) {
        char p[64], target[512] = "";
        snprintf(p, sizeof p, "/proc/self/fd/%d", e->fd);
        readlink(p, target, sizeof target - 1);
        printf("event %#llx on %s\n", (unsigned long long)e->mask, strrchr(target, '/'));
        close(e->fd);
    }
}
/* argv: a directory; argv[2] "queue": leave events unread at the checkpoint;
   argv[3]: also an ignore mark (FAN_MARK_IGNORE) on the child */
int main(int argc, char **argv) {
    char file[4096], sub[4096];
    snprintf(file, sizeof file, "%s/watched", argv[1]);
    snprintf(sub, sizeof sub, "%s/child", argv[1]);
    close(open(file, O_CREAT | O_WRONLY, 0600));
    close(open(sub, O_CREAT | O_WRONLY, 0600));
    int fd = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK, O_RDONLY | O_LARGEFILE);
    if (fd < 0) { perror("fanotify_init"); return 1; }
    if (fanotify_mark(fd, FAN_MARK_ADD, FAN_OPEN | FAN_MODIFY | FAN_CLOSE_WRITE, AT_FDCWD,
                      file) ||
        fanotify_mark(fd, FAN_MARK_ADD, FAN_OPEN | FAN_EVENT_ON_CHILD, AT_FDCWD, argv[1]) ||
        fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_IGNORED_MASK |
                      FAN_MARK_IGNORED_SURV_MODIFY, FAN_ACCESS, AT_FDCWD, argv[1])) {
        perror("fanotify_mark"); return 1;
    }
    if (argc > 3 && fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_IGNORE_SURV, FAN_OPEN, AT_FDCWD,
                                  sub)) {    /* (kernel 6.0+) the child's opens are ignored */
        perror("fanotify_mark FAN_MARK_IGNORE"); return 1;
    }
    if (argc > 2 && !strcmp(argv[2], "queue")) close(open(file, O_RDONLY));
    printf("ready\n"); fflush(stdout);
    const char *go = getenv("GO");           /* ticks 0-9, then on until the file GO exists */
    for (int i = 0; i < 10 || (go && access(go, F_OK)); i++) {
        if (i < 10) { printf("tick %d\n", i); fflush(stdout); }
        usleep(20000);
    }
    marks(fd);
    events(fd);                           /* (with "queue", what the checkpoint kept) */
    int w = open(file, O_WRONLY);
    write(w, "x", 1);
    close(w);
    close(open(sub, O_RDONLY));
    events(fd);
    return 0;
}
'''


def test_fanotify_group_and_marks_come_back(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "fan", FANOTIFY)
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    ref = same_after_restart(procs, tmp_path, [prog, tmp_path / "run", "-", "ignore"], "fan",
                             ref_argv=[prog, tmp_path / "ref", "-", "ignore"])
    assert b"event 0x2a on /watched" in ref and b"on /child" not in ref, ref  # (ignored)
    assert b"inode mflags:440 mask:0 ignored_mask:20" in ref, ref
    assert b"inode mflags:0 mask:2a ignored_mask:0" in ref, ref
    assert b"mount mflags:40 mask:0 ignored_mask:1" in ref, ref
    assert b"read: Resource temporarily unavailable" in ref


def test_fanotify_unread_events_refused_or_dropped_by_policy(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "fan", FANOTIFY)
    d = tmp_path / "q"
    d.mkdir()
    out = tmp_path / "q.out"
    go = tmp_path / "go"
    proc = procs.spawn([prog, d, "queue"], stdout=out, env={**os.environ, "GO": str(go)})
    wait_for_line(out, r"tick 2\b", proc=proc)
    cr = tmp_path / "q.cr"
    refused_up_front(proc, cr, "has unread events")
    _checkpoint(proc, cr, "--skip", "notify-events")
    rp = restart(procs, cr)
    go.touch()
    code, err = finish(rp)
    assert code == 0, err
    assert "skipped by policy 'notify-events'" in err, err
    lines = out.read_text().splitlines()
    after = lines[lines.index("tick 9") + 1:]
    assert after.count("read: Resource temporarily unavailable") == 1, after  # queue was empty
    assert "event 0x2a on /watched" in after and "event 0x20 on /child" in after, after


OWN_EVENTS = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/fanotify.h>
/* Counts the events of a mount mark that carry its own pid: it opens no file
   itself (reading the group opens the events' fds without events), so after
   a restart there must be none.  argv[1]: the file GO to wait for. */
static long own_events(int fd, int show) {
    char buf[65536];
    long own = 0;
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        for (struct fanotify_event_metadata *e = (void *)buf; FAN_EVENT_OK(e, n);
             e = FAN_EVENT_NEXT(e, n)) {
            if (e->pid == getpid()) {
                char p[64], t[512] = "";
                snprintf(p, sizeof p, "/proc/self/fd/%d", e->fd);
                readlink(p, t, sizeof t - 1);
                if (show) printf("own event %#llx on %s\n", (unsigned long long)e->mask, t);
                own++;
            }
            close(e->fd);
        }
    return own;
}
int main(int argc, char **argv) {
    int fd = fanotify_init(FAN_CLASS_NOTIF | FAN_NONBLOCK | FAN_UNLIMITED_QUEUE, O_RDONLY);
    if (fd < 0 || fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_MOUNT, FAN_OPEN | FAN_CLOSE,
                                AT_FDCWD, "/proc/self/exe")) {
        perror("fanotify"); return 1;
    }
    close(open("/proc/self/exe", O_RDONLY));    /* the count works: this one is its own */
    printf("selftest %ld\n", own_events(fd, 0) > 0);
    printf("ready\n"); fflush(stdout);
    long own = 0;
    while (access(argv[1], F_OK)) {
        own += own_events(fd, 1);
        usleep(10000);
    }
    own += own_events(fd, 1);
    printf("own %ld\n", own);
    return 0;
}
'''


def test_fanotify_restart_queues_no_event_of_its_own(procs, tmp_path):
    """A mount mark on the mount of the program's executable: the restart opens
    the executable and libraries in the restored task, and the marks must come
    back only after that, or the program reads events with its own pid for
    opens it never made."""
    require_root()
    prog = build_c(tmp_path, "fanown", OWN_EVENTS)
    out, go, cr = tmp_path / "own.out", tmp_path / "go", tmp_path / "own.cr"
    proc = procs.spawn([prog, go], stdout=out)
    wait_for_line(out, r"^ready$", proc=proc)
    assert "selftest 1" in out.read_text()
    # a mark on a busy mount: events of other processes may be queued (dropped)
    _checkpoint(proc, cr, "--skip", "notify-events")
    rp = restart(procs, cr)
    time.sleep(0.3)       # (the restored program reads its queue meanwhile)
    go.touch()
    code, err = finish(rp)
    assert code == 0, err
    assert out.read_text().endswith("own 0\n"), out.read_text()
