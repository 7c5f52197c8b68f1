#!/usr/bin/env python3
"""Benchmark: how checkpoint and restart time grow with the size of a tree.

Two shapes, each at a base size and at 10x that size, in one run:

  tree     a process tree of N processes (a C parent forking N-1 children
           that sleep), default N = 10 and 100;
  wide     one process with T threads and F open fds (a C program), default
           T = 100, F = 1000 and T = 1000, F = 10000.

For each: wall time of `crcheckpoint PID -o FILE --kill --json` (and the
time the tree stayed frozen), then of `crrestart --detach FILE` until the
restored tree runs again (checked: every pid is back, with its threads and fds).
The growth factor from the small to the large size is printed next to the
10x size ratio: linear growth means a factor near 10 (start-up costs make it
smaller).  Needs root and gcc.

    python3 bench/scale.py                  # both shapes, 10x apart
    python3 bench/scale.py --repeat 3 --json
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent

TREE_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    for (int i = 1; i < n; i++)
        if (fork() == 0) { for (;;) pause(); }
    printf("ready\n"); fflush(stdout);
    for (;;) pause();
}
"""

WIDE_C = r"""
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static void *idle(void *a) { (void)a; for (;;) pause(); return NULL; }
int main(int argc, char **argv) {
    int threads = atoi(argv[1]), fds = atoi(argv[2]);
    for (int i = 0; i < fds; i++)
        if (open(i % 2 ? "/dev/null" : "/etc/hostname", O_RDONLY) < 0) { perror("open"); return 1; }
    for (int i = 0; i < threads; i++) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 64 * 1024);
        if (pthread_create(&t, &a, idle, NULL)) { perror("pthread_create"); return 1; }
    }
    printf("ready\n"); fflush(stdout);
    for (;;) pause();
}
"""


def build(tmp: Path, name: str, src: str) -> Path:
    c = tmp / f"{name}.c"
    c.write_text(src)
    exe = tmp / name
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(c)], check=True)
    return exe


def start(argv, tmp: Path) -> subprocess.Popen:
    out = open(tmp / "ready.out", "w+")

    def limits():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    p = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, preexec_fn=limits, close_fds=True,
                         start_new_session=True)
    end = time.monotonic() + 60
    while "ready" not in (tmp / "ready.out").read_text():
        if p.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"workload {argv} did not start")
        time.sleep(0.02)
    return p


def tree_pids(root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        for t in os.listdir(f"/proc/{p}/task"):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
    return out


def kill_tree(pids):
    for p in pids:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


def measure(argv, tmp: Path, expect_threads: int, expect_fds: int) -> dict:
    p = start(argv, tmp)
    pids = tree_pids(p.pid)
    cr = tmp / "scale.cr"
    t0 = time.monotonic()
    r = subprocess.run([str(BIN / "crcheckpoint"), str(p.pid), "-o", str(cr), "--kill",
                        "--json"], capture_output=True, text=True)
    ckpt = time.monotonic() - t0
    if r.returncode != 0:
        kill_tree(pids)
        p.wait()
        return {"error": "checkpoint: " + r.stderr.strip().splitlines()[0]}
    frozen = json.loads(r.stdout)["frozen_seconds"]
    p.wait()
    for q in pids:  # wait until every pid is free again
        while os.path.exists(f"/proc/{q}") and q != p.pid:
            try:
                if Path(f"/proc/{q}/stat").read_text().split(") ")[1][0] in "ZX":
                    break
            except FileNotFoundError:
                break
            time.sleep(0.01)
    t0 = time.monotonic()
    r = subprocess.run([str(BIN / "crrestart"), "--detach", str(cr)], capture_output=True,
                       text=True)
    restart = time.monotonic() - t0
    os.unlink(cr)
    if r.returncode != 0:
        return {"checkpoint_s": ckpt, "frozen_s": frozen,
                "error": "restart: " + r.stderr.strip().splitlines()[-1]}
    back = [q for q in pids if os.path.exists(f"/proc/{q}")]
    threads = len(os.listdir(f"/proc/{p.pid}/task"))
    fds = len(os.listdir(f"/proc/{p.pid}/fd"))
    kill_tree(back)
    ok = len(back) == len(pids) and threads >= expect_threads and fds >= expect_fds
    return {"checkpoint_s": ckpt, "frozen_s": frozen, "restart_s": restart,
            "restored_ok": ok, "pids": len(pids), "threads": threads, "fds": fds}


def median_of(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tree", default="10,100", help="process counts, small,large")
    ap.add_argument("--wide", default="100x1000,1000x10000", help="THREADSxFDS,THREADSxFDS")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("gcc"):
        raise SystemExit("bench/scale.py needs root and gcc")
    tmp = Path(tempfile.mkdtemp(prefix="crelf-scale."))
    results = {}
    try:
        tree = build(tmp, "tree", TREE_C)
        wide = build(tmp, "wide", WIDE_C)
        cases = [(f"tree of {n} processes", [tree, n], 1, 0) for n in a.tree.split(",")]
        for spec in a.wide.split(","):
            t, f = spec.split("x")
            cases.append((f"1 process, {t} threads, {f} fds", [wide, t, f], int(t), int(f)))
        for name, argv, et, ef in cases:
            runs = [measure(argv, tmp, et, ef) for _ in range(a.repeat)]
            results[name] = {"runs": runs, "checkpoint_s": median_of(runs, "checkpoint_s"),
                             "frozen_s": median_of(runs, "frozen_s"),
                             "restart_s": median_of(runs, "restart_s"),
                             "errors": sorted({r["error"] for r in runs if "error" in r})}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        print(json.dumps(results, indent=2))
        return
    print(f"{'case':38} {'checkpoint s':>12} {'frozen s':>9} {'restart s':>10}  restored")
    for name, r in results.items():
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        ok = all(x.get("restored_ok") for x in r["runs"])
        print(f"{name:38} {fmt(r['checkpoint_s']):>12} {fmt(r['frozen_s']):>9} "
              f"{fmt(r['restart_s']):>10}  {'all back' if ok else 'NO'}")
        for e in r["errors"]:
            print(f"    {e}")
    names = list(results)
    for small, large in ((names[0], names[1]), (names[2], names[3])):
        for key in ("checkpoint_s", "restart_s"):
            s, lg = results[small][key], results[large][key]
            if s and lg:
                print(f"growth {small!r} -> {large!r}, {key[:-2]}: x{lg / s:.1f} "
                      "for 10x the size (linear: <= 10)")


if __name__ == "__main__":
    sys.exit(main())
