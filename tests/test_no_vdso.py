"""A task that unmapped its vDSO: crelf runs every syscall it needs in a task
through the vDSO's `syscall; ret` (and returns through a frame there if it
dies, docs/CRASHSAFE.md), so such a task is refused before anything is run
in it or written (support key task:no-vdso), and it runs on unharmed."""
from __future__ import annotations

import subprocess

from helpers import build_c, require_root, wait_for_line
from test_tree import CRCHECKPOINT

NOVDSO = r'''
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <time.h>
#include <sys/mman.h>
#include <sys/syscall.h>

int main(void) {
    char line[256], name[64]; unsigned long a, b;
    FILE *f = fopen("/proc/self/maps", "r");
    while (fgets(line, sizeof line, f)) {      /* [vvar], [vvar_vclock], [vdso] */
        name[0] = 0;
        sscanf(line, "%lx-%lx %*s %*s %*s %*s %63s", &a, &b, name);
        if (!strncmp(name, "[vvar", 5) || !strcmp(name, "[vdso]"))
            syscall(SYS_munmap, a, b - a);
    }
    fclose(f);
    for (int i = 0; ; i++) {
        char msg[32];
        int n = snprintf(msg, sizeof msg, "tick %d\n", i);
        syscall(SYS_write, 1, msg, n);        /* (no libc call that needs the vDSO) */
        struct timespec ts = {0, 20000000};
        syscall(SYS_nanosleep, &ts, NULL);
    }
}
'''


def test_task_without_vdso_is_refused(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "novdso", NOVDSO)
    out = tmp_path / "n.out"
    proc = procs.spawn([prog], stdout=out)
    wait_for_line(out, r"tick 2\b", proc=proc)
    cr = tmp_path / "n.cr"
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 6, r.stderr
    assert f"pid {proc.pid}: no [vdso] mapping" in r.stderr and "Traceback" not in r.stderr
    assert not cr.exists()
    n = len(out.read_text().splitlines())
    wait_for_line(out, rf"tick {n + 2}\b", proc=proc)       # it runs on, unharmed
    assert proc.poll() is None
