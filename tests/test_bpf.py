"""BPF maps (statefile/dump/bpf.py, restorer/restore/bpf.py): a program with
a hash map, a frozen array map and an LRU hash map is checkpointed with
--kill mid-run and restarted; afterwards it reads every entry, its maps'
definitions and names, updates the hash map and finds the frozen map still
refusing writes: the output must be the uninterrupted run's byte for byte.
A per-CPU map is refused before anything is written."""
from __future__ import annotations

import os

from helpers import build_c, require_root, wait_for_line
from roundtrip import refused_up_front, same_after_restart

MAPS = r'''
#include <errno.h>
#include <linux/bpf.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

static long bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof *a); }
static int create(int type, const char *name, int max, int flags) {
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.map_type = type; a.key_size = 4; a.value_size = 8; a.max_entries = max;
    a.map_flags = flags; strncpy(a.map_name, name, sizeof a.map_name - 1);
    return bpf(BPF_MAP_CREATE, &a);
}
static int put(int fd, unsigned k, unsigned long v) {
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.map_fd = fd; a.key = (unsigned long)&k; a.value = (unsigned long)&v;
    return bpf(BPF_MAP_UPDATE_ELEM, &a);
}
static long get(int fd, unsigned k) {
    unsigned long v = 0; union bpf_attr a; memset(&a, 0, sizeof a);
    a.map_fd = fd; a.key = (unsigned long)&k; a.value = (unsigned long)&v;
    return bpf(BPF_MAP_LOOKUP_ELEM, &a) < 0 ? -errno : (long)v;
}
static void show(const char *what, int fd) {
    struct bpf_map_info i; memset(&i, 0, sizeof i);
    union bpf_attr a; memset(&a, 0, sizeof a);
    a.info.bpf_fd = fd; a.info.info_len = sizeof i; a.info.info = (unsigned long)&i;
    if (bpf(BPF_OBJ_GET_INFO_BY_FD, &a) < 0) { perror("info"); exit(1); }
    printf("%s: type %u key %u value %u max %u flags %#x name %s\n", what, i.type, i.key_size,
           i.value_size, i.max_entries, i.map_flags, i.name);
}
/* argv[1] == "percpu": also hold a per-CPU array map (refused) */
int main(int argc, char **argv) {
    int h = create(BPF_MAP_TYPE_HASH, "crelf_hash", 64, BPF_F_NO_PREALLOC);
    int r = create(BPF_MAP_TYPE_ARRAY, "crelf_array", 8, 0);
    int l = create(BPF_MAP_TYPE_LRU_HASH, "crelf_lru", 16, 0);
    if (h < 0 || r < 0 || l < 0) { perror("BPF_MAP_CREATE"); return 1; }
    if (argc > 1 && create(BPF_MAP_TYPE_PERCPU_ARRAY, "crelf_percpu", 4, 0) < 0) {
        perror("percpu"); return 1;
    }
    for (unsigned k = 0; k < 20; k++) put(h, k * 7, 1000 + k);
    for (unsigned k = 0; k < 8; k++) put(r, k, k * k);
    for (unsigned k = 0; k < 5; k++) put(l, k, 0xabcdef00 + k);
    union bpf_attr a; memset(&a, 0, sizeof a); a.map_fd = r;
    if (bpf(BPF_MAP_FREEZE, &a) < 0) { perror("freeze"); return 1; }
    int h2 = dup(h);
    printf("ready\n"); fflush(stdout);
    const char *go = getenv("GO");           /* ticks 0-9, then on until the file GO exists */
    for (int i = 0; i < 10 || (go && access(go, F_OK)); i++) {
        if (i < 10) { printf("tick %d\n", i); fflush(stdout); }
        usleep(20000);
    }
    show("hash", h); show("array", r); show("lru", l);
    long sum = 0; for (unsigned k = 0; k < 20; k++) sum += get(h, k * 7);
    printf("hash sum %ld, missing key: %ld\n", sum, get(h, 3));
    for (unsigned k = 0; k < 8; k++) printf("%ld ", get(r, k));
    printf("\narray write when frozen: %s\n", put(r, 1, 5) < 0 ? strerror(errno) : "allowed");
    printf("lru %ld %ld\n", get(l, 0), get(l, 4));
    put(h2, 3, 33);
    printf("dup shares the map: %ld\n", get(h, 3));
    return 0;
}
'''


def test_bpf_maps_come_back(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "maps", MAPS)
    ref = same_after_restart(procs, tmp_path, [prog], "maps")
    assert b"hash sum 20190, missing key: -2" in ref and b"dup shares the map: 33" in ref, ref
    assert b"array write when frozen: Operation not permitted" in ref, ref


def test_per_cpu_bpf_map_is_refused(procs, tmp_path):
    require_root()
    prog = build_c(tmp_path, "maps", MAPS)
    out = tmp_path / "percpu.out"
    proc = procs.spawn([prog, "percpu"], stdout=out, env={**os.environ, "GO": str(tmp_path / "never")})
    wait_for_line(out, r"tick 2\b", proc=proc)
    err = refused_up_front(proc, tmp_path / "percpu.cr",
                           "a per-CPU array map (only hash, array and LRU hash maps are saved)")
    assert err.count("unsupported") == 1, err     # the other three maps are fine
    wait_for_line(out, r"tick 8\b", proc=proc)
    assert proc.poll() is None
