"""hugetlb memory (statefile/dump/memfd.py, restorer/restore/memfd.py,
restorer/restore/memory.py): MAP_SHARED|MAP_HUGETLB memory a parent shares
with its child, MAP_PRIVATE|MAP_HUGETLB memory and a MFD_HUGETLB memfd, each
with data in it, checkpointed with --kill mid-run and restarted: the data is
back on huge pages (smaps KernelPageSize), the shared memory is still one
object between the tasks, and the output is the uninterrupted run's."""
from __future__ import annotations

import pytest

from helpers import build_c, require_root
from roundtrip import same_after_restart

HUGE = r'''
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define HP (2UL << 20)
static long page_kb(void *addr) {            /* KernelPageSize of the mapping at addr */
    char line[256]; unsigned long a, b; long kb = -1; int in = 0;
    FILE *f = fopen("/proc/self/smaps", "r");
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx", &a, &b) == 2 && strchr(line, ' ') < strchr(line, '\n'))
            in = (unsigned long)addr >= a && (unsigned long)addr < b;
        else if (in && sscanf(line, "KernelPageSize: %ld", &kb) == 1) break;
    }
    fclose(f);
    return kb;
}
int main(void) {
    char *sh = mmap(NULL, HP, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_HUGETLB,
                    -1, 0);
    char *pv = mmap(NULL, 2 * HP, PROT_READ | PROT_WRITE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    int mfd = memfd_create("crelf huge", MFD_HUGETLB);
    if (sh == MAP_FAILED || pv == MAP_FAILED || mfd < 0 || ftruncate(mfd, HP) < 0) {
        perror("hugetlb"); return 1;
    }
    char *mf = mmap(NULL, HP, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    strcpy(sh, "shared start"); strcpy(pv + HP + 12345, "private deep"); strcpy(mf + 777, "memfd");
    printf("ready\n"); fflush(stdout);
    pid_t c = fork();
    if (c == 0) {
        for (int i = 0; i < 30; i++) { sh[100 + i] = 'a' + i % 26; usleep(20000); }
        const char *go = getenv("GO");
        while (go && access(go, F_OK)) usleep(20000);
        strcpy(sh + 200, "from the child after");
        pv[0] = 'C';
        return 0;
    }
    for (int i = 0; i < 10; i++) { printf("tick %d\n", i); fflush(stdout); usleep(20000); }
    int st;
    waitpid(c, &st, 0);
    printf("%s | %.30s | %s | %s | %s | %c\n", sh, sh + 100, sh + 200, pv + HP + 12345,
           mf + 777, pv[0] ? pv[0] : '0');
    printf("page sizes %ld %ld %ld, child %d\n", page_kb(sh), page_kb(pv), page_kb(mf),
           WEXITSTATUS(st));
    return 0;
}
'''


@pytest.fixture
def huge_pages():
    """At least 8 free 2 MiB huge pages (the pool is raised for the test and
    put back after)."""
    require_root()
    path = "/proc/sys/vm/nr_hugepages"
    before = int(open(path).read())
    free = int(next(line.split()[1] for line in open("/proc/meminfo")
                    if line.startswith("HugePages_Free")))
    if free < 8:
        with open(path, "w") as f:
            f.write(str(before + 8 - free))
    yield
    with open(path, "w") as f:
        f.write(str(before))


def test_hugetlb_memory_comes_back(procs, tmp_path, huge_pages):
    prog = build_c(tmp_path, "huge", HUGE)
    ref = same_after_restart(procs, tmp_path, [prog], "huge", r"tick 9\b")
    assert b"shared start | abcdefghijklmnopqrstuvwxyzabcd | from the child after | " \
        b"private deep | memfd | 0" in ref, ref
    assert b"page sizes 2048 2048 2048, child 0" in ref, ref
