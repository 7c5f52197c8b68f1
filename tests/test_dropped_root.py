"""A tree that dropped root, as services and zdtm's tests do: the dumpable
flag of each process (the kernel resets it on every uid change, and
crrestart sets the credentials back by changing uids), and the owner and
mode of the socket file a server bound, without which a process of the
dropped uid can no longer connect after a restart (the file would be
root's, made under crrestart's umask).  Checked from inside the program,
once uninterrupted and once checkpointed with --kill and restarted."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from helpers import build_c, require_root
from roundtrip import same_after_restart

PROG = r'''
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>

static struct sockaddr_un addr = {AF_UNIX};

static void show(const char *who) {
    struct stat st;
    if (stat(addr.sun_path, &st)) { perror("stat"); exit(1); }
    printf("%s: dumpable %d, socket file uid %u gid %u mode %o\n", who,
           prctl(PR_GET_DUMPABLE), st.st_uid, st.st_gid, st.st_mode & 07777);
    fflush(stdout);
}

static int client(void) {      /* as 65534: can it still connect and send? */
    int s = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (connect(s, (void *)&addr, sizeof addr)) { perror("connect"); return 1; }
    return send(s, "hi", 2, 0) != 2;
}

int main(int argc, char **argv) {
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s/srv.sock", argv[1]);
    umask(022);
    int p[2];
    if (pipe(p)) { perror("pipe"); return 1; }
    pid_t kid = fork();
    if (kid == 0) {
        close(p[1]);
        if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534)) {
            perror("child setres");     /* dumpable 0 now, as the kernel leaves it */
            exit(1);
        }
        char c;
        if (read(p[0], &c, 1) != 1) exit(1);    /* the parent's turn first */
        show("child");
        exit(client());
    }
    close(p[0]);
    if (setresgid(65534, 65534, 65534) || setresuid(1000, 1000, 1000)) { perror("setres"); return 1; }
    /* 1000 binds in the directory (mode 1777): the file is 1000's; its mode
     * lets others connect */
    int srv = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (bind(srv, (void *)&addr, sizeof addr)) { perror("bind"); return 1; }
    if (chmod(addr.sun_path, 0722)) { perror("chmod"); return 1; }
    prctl(PR_SET_DUMPABLE, 1);          /* (reset to 0 by the uid change) */
    const char *go = getenv("GO");      /* ticks 0-9, then on until the file GO exists */
    for (int i = 0; i < 10 || (go && access(go, F_OK)); i++) {
        if (i < 10) { printf("tick %d\n", i); fflush(stdout); }
        usleep(20000);
    }
    show("parent");
    if (write(p[1], "g", 1) != 1) return 1;
    int status;
    waitpid(kid, &status, 0);
    char buf[8] = "";
    printf("client %s, got \"%s\"\n", WIFEXITED(status) && !WEXITSTATUS(status) ?
           "connected" : "failed", recv(srv, buf, sizeof buf - 1, MSG_DONTWAIT) > 0 ? buf : "");
    unlink(addr.sun_path);
    return 0;
}
'''


def test_dumpable_flags_and_socket_file_owner_come_back(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "dropped", PROG)
    # directories the dropped uids can reach, for the socket and the GO file
    # (pytest's are root's, 0700)
    top = Path(tempfile.mkdtemp(prefix="crelf-dropped-"))
    try:
        top.chmod(0o755)
        for d in ("ref", "run"):
            (top / d).mkdir()
            (top / d).chmod(0o1777)
        ref = same_after_restart(procs, top, [prog, top / "run"], "dropped",
                                 ref_argv=[prog, top / "ref"])
    finally:
        shutil.rmtree(top)
    assert b"parent: dumpable 1, socket file uid 1000 gid 65534 mode 722\n" in ref, ref
    assert b"child: dumpable 0, socket file uid 1000 gid 65534 mode 722\n" in ref, ref
    assert b'client connected, got "hi"' in ref, ref
