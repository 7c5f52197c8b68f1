"""A task that unmapped its vDSO ([vvar], [vvar_vclock] and [vdso]): crelf
runs the syscalls it needs in the task through a `syscall; ret` of the
task's own code (libc's) instead of the vDSO's, with the same way back if
crcheckpoint dies (docs/CRASHSAFE.md).  Checkpointed leave-running (it runs
on, still without a vDSO), then with --kill, and restarted eagerly and
lazily: it comes back without a vDSO and counts on, its output the
uninterrupted run's."""
from __future__ import annotations

import pytest

from helpers import build_c, require_root, wait_for_line
from roundtrip import same_after_restart
from test_memfd import _checkpoint

NOVDSO = r'''
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/syscall.h>

static int blobs(int unmap) {          /* [vvar], [vvar_vclock], [vdso] */
    char line[256], name[64]; unsigned long a, b; int n = 0;
    FILE *f = fopen("/proc/self/maps", "r");
    while (fgets(line, sizeof line, f)) {
        name[0] = 0;
        sscanf(line, "%lx-%lx %*s %*s %*s %*s %63s", &a, &b, name);
        if (!strncmp(name, "[vvar", 5) || !strcmp(name, "[vdso]")) {
            n++;
            if (unmap)
                syscall(SYS_munmap, a, b - a);
        }
    }
    fclose(f);
    return n;
}

static void say(const char *msg) {     /* (no libc call that needs the vDSO) */
    syscall(SYS_write, 1, msg, strlen(msg));
}

int main(void) {
    blobs(1);
    const char *go = getenv("GO");      /* ticks 0-9, then on until the file GO exists */
    char msg[64];
    for (int i = 0; i < 10 || (go && access(go, F_OK)); i++) {
        if (i < 10) {
            snprintf(msg, sizeof msg, "tick %d\n", i);
            say(msg);
        }
        struct timespec ts = {0, 20000000};
        syscall(SYS_nanosleep, &ts, NULL);
    }
    long long sum = 0;
    for (int i = 0; i < 1000; i++)
        sum += (long long)i * i;
    snprintf(msg, sizeof msg, "vdso blobs %d, sum %lld\n", blobs(0), sum);
    say(msg);
    return 0;
}
'''


@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_task_without_vdso_comes_back_without_one(procs, tmp_path, mode):
    require_root()
    prog = build_c(tmp_path, "novdso", NOVDSO)
    # leave-running first: the task runs on unharmed, still without a vDSO
    out = tmp_path / "lr.out"
    proc = procs.spawn([prog], stdout=out, env={"GO": str(tmp_path / "lr.go")})
    wait_for_line(out, r"tick 3\b", proc=proc)
    _checkpoint(proc, tmp_path / "lr.cr", kill=False)
    (tmp_path / "lr.go").touch()
    assert proc.wait(timeout=30) == 0
    assert out.read_text().endswith("vdso blobs 0, sum 332833500\n"), out.read_text()
    ref = same_after_restart(procs, tmp_path, [prog], "novdso", restart_args=(mode,))
    assert ref.endswith(b"vdso blobs 0, sum 332833500\n"), ref
