"""Overhead of crrun's seccomp monitor on syscall-heavy real programs.

    python bench/monitor.py [--runs 5] [--workload NAME]... [--json]

Each workload runs plain and under the monitor, alternately, `--runs` times;
the medians are compared, of two measures: the CPU time (user + system) of
the program and everything it started, which is what the monitor can add and
is robust against other load on the machine, and the wall-clock time, which
is what a user sees but is noisy on a shared machine.  Two ways of running "under the monitor":

  monitor  the program started by statefile.check.monitor.launch() with a Monitor
           thread serving its listener, timed from spawn to exit, exactly
           like plain runs are timed (subprocess.Popen + wait).  This is the
           cost the monitored program pays.
  crrun    the whole `python -m statefile.check.crrun -- CMD` command, so it
           also includes crrun's own start-up (Python + click, ~0.1 s), a
           constant that only matters for short programs.
  floor    the program under a one-instruction seccomp filter that allows
           every syscall (no listener, no monitor): what the kernel charges
           any task that has a seccomp filter at all (each syscall then takes
           the slow entry path).  No seccomp-based monitor can cost less;
           "monitor - floor" is what crrun's own filter and monitor add.

Workloads (sizes chosen for ~1-3 s each on the reference machine; the page
cache is warmed by a first untimed run):
  tar      tar of /usr/lib/python3* and /usr/share piped through cat
           (read/write heavy)
  find     find /usr -type f, 8 times, | wc -l (getdents/newfstatat heavy)
  lsR      ls -lR /usr (statx/getdents/readlink heavy, lots of output)
  pyopen   python3 opening, reading and closing 100000 small files
  dd1      dd bs=1 of 2 MB: ~4 million tiny read+write syscalls (worst case)
  gcc      gcc -O2 of crelf's C samples, 4 times (a real program: a compiler
           driver, cc1 and as, with their file syscalls)

Target (issue 5): under 5 % overhead.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from statefile.check import monitor  # noqa: E402

PYOPEN = """
import os
paths = []
for root, dirs, files in os.walk("/usr/lib/python3"):
    paths += [os.path.join(root, f) for f in files]
    if len(paths) > 4000:
        break
for _ in range(25):
    for p in paths[:4000]:
        try:
            with open(p, "rb") as f:
                f.read(256)
        except OSError:
            pass
"""

WORKLOADS = {
    "tar": ["sh", "-c", "tar cf - /usr/lib/python3* /usr/share 2>/dev/null | cat > /dev/null"],
    "find": ["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do find /usr -type f; done | wc -l"],
    "lsR": ["sh", "-c", "ls -lR /usr > /dev/null 2>&1"],
    "pyopen": ["python3", "-c", PYOPEN],
    "dd1": ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=2000000", "status=none"],
    "gcc": ["sh", "-c", "d=$(mktemp -d) && for i in 1 2 3 4; do for f in samples/*.c; do "
            "gcc -O2 -pthread -o $d/x $f || exit 1; done; done; rm -rf $d"],
}


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class _Clock:
    """Wall time and CPU time of reaped children (plus this process's own
    CPU, where the monitor thread runs) between start and stop."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = _cpu(resource.RUSAGE_CHILDREN) + _cpu(resource.RUSAGE_SELF)

    def stop(self) -> tuple[float, float]:
        return (time.perf_counter() - self.wall,
                _cpu(resource.RUSAGE_CHILDREN) + _cpu(resource.RUSAGE_SELF) - self.cpu)


def run_plain(argv) -> tuple[float, float]:
    clock = _Clock()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return clock.stop()


def run_monitor(argv) -> tuple[float, float]:
    clock = _Clock()
    proc, listener = monitor.launch(argv, stdout=subprocess.DEVNULL)
    mon = monitor.Monitor(listener)
    thread = monitor.start_thread(mon)
    rc = proc.wait()
    thread.join(5)
    result = clock.stop()
    mon.close()
    if rc != 0:
        raise subprocess.CalledProcessError(rc, argv)
    if mon.received:
        raise RuntimeError(f"{argv}: the monitor got {mon.received} notifications")
    return result


def run_crrun(argv) -> tuple[float, float]:
    return run_plain([sys.executable, "-m", "statefile.check.crrun", "--", *argv])


def _allow_all_filter() -> None:
    """preexec_fn: a seccomp filter that allows everything (the floor)."""
    monitor._check(monitor._libc.prctl(monitor.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")
    insn = (monitor.SockFilter * 1)(monitor.SockFilter(0x06, 0, 0, monitor.SECCOMP_RET_ALLOW))
    prog = monitor.SockFprog(1, insn)
    monitor._check(monitor._libc.syscall(ctypes.c_long(monitor.NR_SECCOMP),
                                         ctypes.c_uint(monitor.SECCOMP_SET_MODE_FILTER),
                                         ctypes.c_uint(0), ctypes.byref(prog)), "seccomp")


def run_floor(argv) -> tuple[float, float]:
    clock = _Clock()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, preexec_fn=_allow_all_filter)
    return clock.stop()


RUNNERS = {"plain": run_plain, "floor": run_floor, "monitor": run_monitor, "crrun": run_crrun}


def bench(name: str, runs: int) -> dict:
    argv = WORKLOADS[name]
    run_plain(argv)  # warm the page cache
    wall: dict[str, list[float]] = {k: [] for k in RUNNERS}
    cpu: dict[str, list[float]] = {k: [] for k in RUNNERS}
    for _ in range(runs):  # interleaved, so drift hits every runner alike
        for kind, fn in RUNNERS.items():
            w, c = fn(argv)
            wall[kind].append(w)
            cpu[kind].append(c)
    out = {"workload": name, "argv": argv, "runs": runs, "wall_s": wall, "cpu_s": cpu}
    for measure, data in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in data.items()}
        out[f"{measure}_median_s"] = med
        out[f"{measure}_overhead_pct"] = {k: 100 * (med[k] / med["plain"] - 1)
                                          for k in ("floor", "monitor", "crrun")}
        out[f"{measure}_above_floor_pct"] = 100 * (med["monitor"] / med["floor"] - 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)  # so -m statefile.check.crrun resolves
    results = []
    for name in args.workload or list(WORKLOADS):
        r = bench(name, args.runs)
        results.append(r)
        if not args.json:
            for measure in ("cpu", "wall"):
                m, o = r[f"{measure}_median_s"], r[f"{measure}_overhead_pct"]
                print(f"{name:7s} {measure:4s} plain {m['plain']:6.3f}s  "
                      f"floor {m['floor']:6.3f}s ({o['floor']:+5.1f}%)  "
                      f"monitor {m['monitor']:6.3f}s ({o['monitor']:+5.1f}%)  "
                      f"crrun {m['crrun']:6.3f}s ({o['crrun']:+5.1f}%)  "
                      f"monitor vs floor {r[f'{measure}_above_floor_pct']:+5.1f}%", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
