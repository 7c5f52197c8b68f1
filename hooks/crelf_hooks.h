/*
 * crelf_hooks.h: let a C program take part in its own checkpoint and restart.
 *
 *     #include "crelf_hooks.h"      (header only; link with -pthread)
 *     crelf_hooks_install(before_checkpoint, after_restart, after_resume, arg);
 *
 * Each callback may be NULL.  before_checkpoint(arg) runs just before
 * crcheckpoint freezes the process, and crcheckpoint waits for it (its
 * --hook-timeout); after_resume(arg) runs when a leave-running checkpoint is
 * over (also when crcheckpoint was killed before it could say so: the hook
 * thread watches it); after_restart(arg) runs in the restarted process.  Same protocol as
 * hooks/crelf_hooks.py: a thread accepts on the abstract unix socket
 * "\0crelf-hooks-<pid>", reads one line ("checkpoint", "resume", "restart"),
 * runs the callback and answers "ok".  Returns 0, or -1 with errno set.
 */
#ifndef CRELF_HOOKS_H
#define CRELF_HOOKS_H

#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

typedef void (*crelf_hook_fn)(void *arg);

static struct {
    crelf_hook_fn checkpoint, restart, resume;
    void *arg;
    int fd;
} crelf_hooks_state = {0, 0, 0, 0, -1};

/* A process's start time (/proc/PID/stat field 22), 0 when it is gone. */
static unsigned long long crelf_hooks_started(const char *pid)
{
    char path[64], buf[1024];
    unsigned long long t = 0;
    size_t n;
    char *p;
    int i;
    FILE *f;
    snprintf(path, sizeof path, "/proc/%s/stat", pid);
    if (!(f = fopen(path, "re")))
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    if (!(p = strrchr(buf, ')')))
        return 0;
    for (i = 0; i < 20 && p; i++)       /* field 3 starts after ") " */
        p = strchr(p + 1, ' ');
    if (p)
        sscanf(p + 1, "%llu", &t);
    return t;
}

static void *crelf_hooks_thread(void *unused)
{
    /* After "checkpoint": the crcheckpoint that sent it (SO_PEERCRED); if it
     * dies before saying "resume", after_resume runs all the same, unless
     * this process is a restarted copy (a new start time): crrestart then
     * says "restart". */
    char peer[24] = "";
    unsigned long long peer_start = 0, own_start = 0;
    (void)unused;
    for (;;) {
        char line[64] = {0};
        size_t n = 0;
        int c;
        if (peer[0]) {
            struct pollfd p = {crelf_hooks_state.fd, POLLIN, 0};
            if (poll(&p, 1, 500) == 0) {
                if (crelf_hooks_started(peer) != peer_start) {
                    peer[0] = 0;
                    if (crelf_hooks_started("self") == own_start && crelf_hooks_state.resume)
                        crelf_hooks_state.resume(crelf_hooks_state.arg);
                }
                continue;
            }
        }
        c = accept(crelf_hooks_state.fd, NULL, NULL);
        if (c < 0)
            continue;
        while (n < sizeof line - 1 && read(c, line + n, 1) == 1 && line[n] != '\n')
            n++;
        line[n] = 0;
        if (!strcmp(line, "checkpoint")) {
            struct { int pid, uid, gid; } cred;      /* struct ucred */
            socklen_t len = sizeof cred;
            if (getsockopt(c, SOL_SOCKET, 17 /* SO_PEERCRED */, &cred, &len) == 0) {
                snprintf(peer, sizeof peer, "%d", cred.pid);
                peer_start = crelf_hooks_started(peer);
                own_start = crelf_hooks_started("self");
            }
        } else if (!strcmp(line, "resume") || !strcmp(line, "restart")) {
            peer[0] = 0;
        }
        crelf_hook_fn fn = !strcmp(line, "checkpoint") ? crelf_hooks_state.checkpoint
                         : !strcmp(line, "restart") ? crelf_hooks_state.restart
                         : !strcmp(line, "resume") ? crelf_hooks_state.resume : NULL;
        if (fn)
            fn(crelf_hooks_state.arg);
        /* MSG_NOSIGNAL: a crcheckpoint killed meanwhile must not SIGPIPE us */
        if (send(c, "ok\n", 3, MSG_NOSIGNAL) < 0) { /* the other side is gone */ }
        close(c);
    }
    return NULL;
}

static inline int crelf_hooks_install(crelf_hook_fn before_checkpoint, crelf_hook_fn after_restart,
                                      crelf_hook_fn after_resume, void *arg)
{
    struct sockaddr_un sa;
    pthread_t t;
    socklen_t len;
    crelf_hooks_state.checkpoint = before_checkpoint;
    crelf_hooks_state.restart = after_restart;
    crelf_hooks_state.resume = after_resume;
    crelf_hooks_state.arg = arg;
    if (crelf_hooks_state.fd >= 0)
        return 0;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    len = offsetof(struct sockaddr_un, sun_path) + 1 +
          snprintf(sa.sun_path + 1, sizeof sa.sun_path - 1, "crelf-hooks-%d", (int)getpid());
    crelf_hooks_state.fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (crelf_hooks_state.fd < 0)
        return -1;
    if (bind(crelf_hooks_state.fd, (struct sockaddr *)&sa, len) < 0 ||
        listen(crelf_hooks_state.fd, 4) < 0 ||
        pthread_create(&t, NULL, crelf_hooks_thread, NULL) != 0) {
        close(crelf_hooks_state.fd);
        crelf_hooks_state.fd = -1;
        return -1;
    }
    pthread_detach(t);
    return 0;
}

#endif
