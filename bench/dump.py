#!/usr/bin/env python3
"""Benchmark: crcheckpoint against the kernel's core dump, gcore and dd.

For each size in --sizes (MiB) a small C workload mallocs that much memory,
fills every page with non-zero data, says "ready" and sleeps.  Then, in the
same run and interleaved (the order rotates from one repeat to the next, so
the noise of a shared machine falls on every method alike), it measures:

  crcheckpoint   wall time of `crcheckpoint PID -o FILE --json` (the command a
                 user runs, Python start-up included), how long the task stayed
                 frozen (from its JSON), and the peak RSS of the crcheckpoint
                 process (wait4's ru_maxrss).  The target must keep running.
  gcore          wall time of `gcore -o FILE PID` (gdb).
  kernel core    a fresh workload with RLIMIT_CORE unlimited and core_pattern
                 pointing into the bench directory gets SIGABRT; the time from
                 the signal until waitpid returns (the kernel writes the whole
                 core before the task can be reaped).
  dd             `dd if=/dev/zero of=FILE bs=1M count=SIZE`, the page-cache
                 write limit; and with conv=fdatasync, reported separately.

Every output file is deleted right after it is measured; only one workload is
alive at a time; core_pattern is always restored.  Needs root (core_pattern,
ptrace of the workloads), gcc and gdb.

    python3 bench/dump.py --sizes 256 --repeat 1      # quick check
    python3 bench/dump.py                              # 2 GiB and 8 GiB, 3 repeats
    python3 bench/dump.py --sizes 2048 --json > out.json
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent

# Targets of issue 2.
TARGET_SPEEDUP_VS_CORE = 2.0    # crcheckpoint at least 2x faster than the kernel core dump
TARGET_SPEEDUP_VS_GCORE = 2.0   # ... and than gcore
TARGET_VS_DD = 1.5              # crcheckpoint within 1.5x of dd (page-cache write)
TARGET_RSS_MIB = 200.0          # peak RSS of crcheckpoint, whatever the dump size

WORKLOAD_C = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    size_t n = (size_t)strtoull(argv[1], NULL, 10) << 20;
    uint64_t *p = malloc(n);
    if (!p) {
        perror("malloc");
        return 1;
    }
    /* Every page gets distinct, non-zero content (no zero page, no holes). */
    size_t words = n / sizeof(uint64_t);
    for (size_t i = 0; i < words; i++)
        p[i] = (i * 0x9E3779B97F4A7C15ULL) | 1;
    printf("ready %p\n", (void *)p);
    fflush(stdout);
    /* Drop the pipe: keep only /dev/null on 0-2, which crcheckpoint supports. */
    int fd = open("/dev/null", O_RDWR);
    dup2(fd, 0);
    dup2(fd, 1);
    dup2(fd, 2);
    if (fd > 2)
        close(fd);
    for (;;)
        pause();
}
"""

METHODS = ["crcheckpoint", "gcore", "kcore", "dd", "dd_sync"]
LABELS = {
    "crcheckpoint": "crcheckpoint",
    "gcore": "gcore",
    "kcore": "kernel core dump",
    "dd": "dd (page cache)",
    "dd_sync": "dd conv=fdatasync",
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------
# helpers


def run_timed(argv, cwd=None):
    """Run argv; return wall seconds, exit status, rusage, stdout, stderr.

    wait4's rusage covers the child and the descendants it reaped (RUSAGE_BOTH
    in the kernel), so ru_maxrss is the peak RSS of the largest of them.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, cwd=cwd)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (wall, proc.returncode, ru, out.read().decode(errors="replace"),
                err.read().decode(errors="replace"))


def file_sizes(path):
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def settle():
    """Let writeback of the previous measurement finish before the next one."""
    os.sync()
    time.sleep(0.5)


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def fs_type(path):
    best, typ = "", "?"
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, typ = mnt, parts[2]
    return typ


def task_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return data[data.rindex(")") + 2]


def find_crcheckpoint(arg):
    if arg:
        return arg
    venv = REPO / ".venv" / "bin" / "crcheckpoint"
    if venv.exists():
        return str(venv)
    found = shutil.which("crcheckpoint")
    if not found:
        raise BenchError("crcheckpoint not found (pass --crcheckpoint PATH)")
    return found


def crcheckpoint_version(exe):
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


# --------------------------------------------------------------------------
# the workload


class Workloads:
    """At most one workload alive at a time; all of them killed in close()."""

    def __init__(self, exe, size_mib):
        self.exe = exe
        self.size = size_mib
        self.current = None
        self.all = []

    @staticmethod
    def _preexec():
        resource.setrlimit(resource.RLIMIT_CORE,
                           (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        # Default SIGABRT disposition (Python may have inherited an ignore).
        signal.signal(signal.SIGABRT, signal.SIG_DFL)

    def get(self):
        if self.current is not None and self.current.poll() is None:
            return self.current
        return self.fresh()

    def fresh(self):
        self.kill_current()
        t0 = time.perf_counter()
        p = subprocess.Popen([self.exe, str(self.size)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             preexec_fn=self._preexec)
        self.all.append(p)
        line = p.stdout.readline().decode(errors="replace")
        p.stdout.close()
        if not line.startswith("ready"):
            p.kill()
            p.wait()
            raise BenchError(f"workload of {self.size} MiB did not start (exit {p.returncode}); "
                             "not enough memory?")
        # Let it reach pause() after swapping its fds to /dev/null.
        for _ in range(200):
            if task_state(p.pid) == "S":
                break
            time.sleep(0.01)
        log(f"  workload pid {p.pid}: {self.size} MiB touched in "
            f"{time.perf_counter() - t0:.1f}s")
        self.current = p
        return p

    def take(self):
        """Hand the current workload over (it will be consumed)."""
        p, self.current = self.current, None
        return p

    def kill_current(self):
        if self.current is not None:
            self._kill(self.current)
            self.current = None

    @staticmethod
    def _kill(p):
        if p.returncode is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=30)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass

    def close(self):
        for p in self.all:
            self._kill(p)
        self.current = None


def check_alive(p, what):
    st = task_state(p.pid)
    if p.poll() is not None or st is None:
        raise BenchError(f"workload {p.pid} died after {what} (exit {p.returncode})")
    if st not in ("S", "R"):
        # Give a detach a moment to complete before calling it a failure.
        time.sleep(0.2)
        st = task_state(p.pid)
        if st not in ("S", "R"):
            raise BenchError(f"workload {p.pid} left in state {st!r} after {what}")


# --------------------------------------------------------------------------
# the measurements; each returns a dict and deletes its output file


def m_crcheckpoint(ctx, wl, size):
    p = wl.get()
    out = os.path.join(ctx.dir, f"cr-{size}.cr")
    try:
        wall, rc, ru, so, se = run_timed([ctx.crcheckpoint, str(p.pid), "-o", out, "--json"])
        if rc != 0:
            raise BenchError(f"crcheckpoint exited {rc}: {se.strip()[-2000:]}")
        try:
            js = json.loads(so)
        except json.JSONDecodeError:
            raise BenchError(f"crcheckpoint --json printed no JSON: {so[:500]!r}")
        apparent, disk = file_sizes(out)
        check_alive(p, "crcheckpoint")
        return {
            "seconds": wall,
            "frozen_seconds": js.get("frozen_seconds"),
            "internal_seconds": js.get("total_seconds"),
            "peak_rss_mib": ru.ru_maxrss / 1024,
            "cpu_seconds": ru.ru_utime + ru.ru_stime,
            "apparent_bytes": apparent,
            "disk_bytes": disk,
            "restartable": js.get("restartable"),
        }
    finally:
        remove(out)


def m_gcore(ctx, wl, size):
    p = wl.get()
    prefix = os.path.join(ctx.dir, f"gcore-{size}")
    out = f"{prefix}.{p.pid}"
    try:
        wall, rc, ru, so, se = run_timed(["gcore", "-o", prefix, str(p.pid)])
        if rc != 0 or not os.path.exists(out):
            raise BenchError(f"gcore exited {rc}: {(so + se).strip()[-2000:]}")
        apparent, disk = file_sizes(out)
        check_alive(p, "gcore")
        return {
            "seconds": wall,
            "peak_rss_mib": ru.ru_maxrss / 1024,
            "cpu_seconds": ru.ru_utime + ru.ru_stime,
            "apparent_bytes": apparent,
            "disk_bytes": disk,
        }
    finally:
        remove(out)


def m_kcore(ctx, wl, size):
    p = wl.fresh()          # a fresh workload; the dump consumes it
    wl.take()
    out = os.path.join(ctx.dir, f"core.{p.pid}")
    try:
        settle()
        t0 = time.perf_counter()
        os.kill(p.pid, signal.SIGABRT)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if not os.WCOREDUMP(status):
            raise BenchError(f"workload {p.pid} died without a core dump (status {status:#x}); "
                             f"core_pattern={ctx.core_pattern!r}")
        if not os.path.exists(out):
            raise BenchError(f"kernel reported a core dump but {out} is missing")
        apparent, disk = file_sizes(out)
        if not size * MiB <= apparent <= size * MiB * 1.1 + 64 * MiB:
            raise BenchError(f"kernel core is {apparent / MiB:.0f} MiB, expected about {size} MiB")
        return {"seconds": wall, "apparent_bytes": apparent, "disk_bytes": disk}
    finally:
        remove(out)


def _dd(ctx, size, sync):
    out = os.path.join(ctx.dir, f"dd-{size}")
    argv = ["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={size}"]
    if sync:
        argv.append("conv=fdatasync")
    try:
        wall, rc, ru, so, se = run_timed(argv)
        if rc != 0:
            raise BenchError(f"dd exited {rc}: {se.strip()[-500:]}")
        apparent, disk = file_sizes(out)
        return {"seconds": wall, "apparent_bytes": apparent, "disk_bytes": disk}
    finally:
        remove(out)


def m_dd(ctx, wl, size):
    return _dd(ctx, size, False)


def m_dd_sync(ctx, wl, size):
    return _dd(ctx, size, True)


MEASURE = {"crcheckpoint": m_crcheckpoint, "gcore": m_gcore, "kcore": m_kcore,
           "dd": m_dd, "dd_sync": m_dd_sync}


# --------------------------------------------------------------------------
# summary


def median(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(size, results, methods):
    s = {"size_mib": size, "methods": {}}
    for m in methods:
        runs = results[m]
        if not runs:
            continue
        secs = [r["seconds"] for r in runs]
        e = {"median_seconds": statistics.median(secs), "min_seconds": min(secs),
             "max_seconds": max(secs), "runs": runs}
        for k in ("frozen_seconds", "internal_seconds", "peak_rss_mib", "cpu_seconds",
                  "apparent_bytes", "disk_bytes"):
            v = median(runs, k)
            if v is not None:
                e["median_" + k if k not in ("apparent_bytes", "disk_bytes") else k] = v
        s["methods"][m] = e
    ms = s["methods"]
    cr = ms.get("crcheckpoint", {}).get("median_seconds")
    ratios, targets = {}, {}

    def ratio(name, other, invert):
        o = ms.get(other, {}).get("median_seconds")
        if cr and o:
            ratios[name] = (o / cr) if invert else (cr / o)

    ratio("speedup_vs_kcore", "kcore", True)
    ratio("speedup_vs_gcore", "gcore", True)
    ratio("crcheckpoint_over_dd", "dd", False)
    ratio("crcheckpoint_over_dd_sync", "dd_sync", False)
    s["ratios"] = ratios
    if "speedup_vs_kcore" in ratios:
        targets["faster_than_kcore_2x"] = ratios["speedup_vs_kcore"] >= TARGET_SPEEDUP_VS_CORE
    if "speedup_vs_gcore" in ratios:
        targets["faster_than_gcore_2x"] = ratios["speedup_vs_gcore"] >= TARGET_SPEEDUP_VS_GCORE
    if "crcheckpoint_over_dd" in ratios:
        targets["within_1.5x_of_dd"] = ratios["crcheckpoint_over_dd"] <= TARGET_VS_DD
    rss = ms.get("crcheckpoint", {})
    if rss.get("median_peak_rss_mib") is not None:
        peak = max(r["peak_rss_mib"] for r in rss["runs"])
        targets["rss_under_200mib"] = peak < TARGET_RSS_MIB
    s["targets"] = targets
    return s


def fmt_s(v):
    return "-" if v is None else f"{v:.3f}"


def print_table(s, repeat):
    size = s["size_mib"]
    ms = s["methods"]
    print()
    print(f"== {size} MiB touched heap ({size / 1024:.3g} GiB), median of {repeat} "
          f"(min-max) ==")
    print(f"{'method':<20} {'seconds':>8} {'min-max':>15} {'GB/s':>6} {'peak RSS':>9} "
          f"{'CPU s':>6} {'file MiB du/apparent':>21}")
    for m in METHODS:
        e = ms.get(m)
        if not e:
            continue
        med = e["median_seconds"]
        gbps = size * MiB / med / 1e9 if med else 0
        rss = e.get("median_peak_rss_mib")
        cpu = e.get("median_cpu_seconds")
        du = e.get("disk_bytes")
        ap = e.get("apparent_bytes")
        files = f"{du / MiB:.0f}/{ap / MiB:.0f}" if du is not None else "-"
        print(f"{LABELS[m]:<20} {med:>8.3f} {e['min_seconds']:>7.3f}-{e['max_seconds']:<7.3f} "
              f"{gbps:>6.2f} {('-' if rss is None else f'{rss:.0f} MiB'):>9} "
              f"{('-' if cpu is None else f'{cpu:.2f}'):>6} {files:>21}")
    cr = ms.get("crcheckpoint")
    if cr:
        print(f"crcheckpoint: tasks frozen {fmt_s(cr.get('median_frozen_seconds'))} s "
              f"(internal total {fmt_s(cr.get('median_internal_seconds'))} s; the rest of "
              f"the wall time is start-up), peak RSS max "
              f"{max(r['peak_rss_mib'] for r in cr['runs']):.0f} MiB")
    r = s["ratios"]
    if r:
        print("ratios:")
        if "speedup_vs_kcore" in r:
            print(f"  kernel core / crcheckpoint  = {r['speedup_vs_kcore']:.2f}x")
        if "speedup_vs_gcore" in r:
            print(f"  gcore / crcheckpoint        = {r['speedup_vs_gcore']:.2f}x")
        if "crcheckpoint_over_dd" in r:
            print(f"  crcheckpoint / dd           = {r['crcheckpoint_over_dd']:.2f}x")
        if "crcheckpoint_over_dd_sync" in r:
            print(f"  crcheckpoint / dd fdatasync = {r['crcheckpoint_over_dd_sync']:.2f}x")
    t = s["targets"]
    if t:
        print("targets (issue 2):")
        names = {
            "faster_than_kcore_2x": (f">= {TARGET_SPEEDUP_VS_CORE:g}x faster than kernel core dump",
                                     r.get("speedup_vs_kcore"), "x"),
            "faster_than_gcore_2x": (f">= {TARGET_SPEEDUP_VS_GCORE:g}x faster than gcore",
                                     r.get("speedup_vs_gcore"), "x"),
            "within_1.5x_of_dd": (f"within {TARGET_VS_DD:g}x of dd",
                                  r.get("crcheckpoint_over_dd"), "x"),
            "rss_under_200mib": (f"peak RSS < {TARGET_RSS_MIB:g} MiB",
                                 max(x["peak_rss_mib"] for x in cr["runs"]) if cr else None,
                                 " MiB"),
        }
        for k, ok in t.items():
            label, val, unit = names[k]
            print(f"  {'PASS' if ok else 'MISS'}  {label:<40} ({val:.2f}{unit})")


# --------------------------------------------------------------------------


class Ctx:
    pass


def parse_sizes(text):
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"dump.py: --sizes must be comma-separated MiB counts, not {text!r}")
    if not sizes or any(s <= 0 for s in sizes):
        raise SystemExit("dump.py: --sizes must be positive")
    return sizes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,8192",
                    help="comma-separated workload sizes in MiB (default 2048,8192)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method (median; default 3)")
    ap.add_argument("--dir", help="where to write the dumps (default: a temp dir under /tmp)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--crcheckpoint", help="crcheckpoint executable (default: the repo's .venv)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = ap.parse_args(argv)

    sizes = parse_sizes(args.sizes)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"dump.py: unknown method(s) {bad}; choose from {METHODS}")
    if args.repeat < 1:
        raise SystemExit("dump.py: --repeat must be >= 1")
    if os.geteuid() != 0 and "kcore" in methods:
        raise SystemExit("dump.py: the kernel core dump needs root (core_pattern); "
                         "run as root or pass --methods without kcore")
    for tool in (["gcc"] + (["gcore"] if "gcore" in methods else [])
                 + (["dd"] if any(m.startswith("dd") for m in methods) else [])):
        if not shutil.which(tool):
            raise SystemExit(f"dump.py: {tool} not found")

    ctx = Ctx()
    ctx.crcheckpoint = find_crcheckpoint(args.crcheckpoint) if "crcheckpoint" in methods else None
    base = args.dir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)

    # Space: outputs are deleted right after each measurement, so the largest
    # single dump (plus headers and a margin) is what must fit.
    need = max(sizes) * MiB * 1.05 + 256 * MiB
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise SystemExit(f"dump.py: not enough disk space in {base}: {free / MiB:.0f} MiB free, "
                         f"a {max(sizes)} MiB measurement needs {need / MiB:.0f} MiB "
                         "(use --dir or smaller --sizes)")
    avail = meminfo().get("MemAvailable", 0)
    need_mem = max(sizes) * MiB + 512 * MiB
    if avail < need_mem:
        raise SystemExit(f"dump.py: not enough memory for a {max(sizes)} MiB workload: "
                         f"{avail / MiB:.0f} MiB available, need {need_mem / MiB:.0f} MiB")
    fstype = fs_type(base)
    if fstype in ("tmpfs", "ramfs"):
        log(f"warning: {base} is {fstype}: dumps go to RAM, not the page cache of a disk")

    ctx.dir = tempfile.mkdtemp(prefix="crb-", dir=base)
    ctx.core_pattern = os.path.join(ctx.dir, "core.%p")
    if len(ctx.core_pattern) > 127:
        raise SystemExit(f"dump.py: core_pattern {ctx.core_pattern!r} is too long; use a shorter --dir")

    # SIGTERM/SIGHUP unwind through the finally blocks like Ctrl-C does.
    def _term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)

    env = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "mem_total_mib": meminfo()["MemTotal"] // MiB,
        "loadavg_start": os.getloadavg(),
        "dir": ctx.dir,
        "fs_type": fstype,
        "crcheckpoint": ctx.crcheckpoint,
        "crcheckpoint_version": crcheckpoint_version(ctx.crcheckpoint) if ctx.crcheckpoint else None,
        "repeat": args.repeat,
    }
    log(f"bench dir {ctx.dir} ({fstype}), {env['cpus']} CPUs, load {env['loadavg_start']}, "
        f"{env['crcheckpoint_version']}")

    old_pattern = None
    summaries = []
    try:
        exe = os.path.join(ctx.dir, "workload")
        src = exe + ".c"
        with open(src, "w") as f:
            f.write(WORKLOAD_C)
        r = subprocess.run(["gcc", "-O2", "-o", exe, src], capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"gcc failed: {r.stderr}")

        if "kcore" in methods:
            with open("/proc/sys/kernel/core_pattern") as f:
                old_pattern = f.read().rstrip("\n")
            with open("/proc/sys/kernel/core_pattern", "w") as f:
                f.write(ctx.core_pattern)
            log(f"core_pattern {old_pattern!r} -> {ctx.core_pattern!r} (restored at the end)")

        for size in sizes:
            log(f"\n{size} MiB:")
            results = {m: [] for m in methods}
            wl = Workloads(exe, size)
            try:
                for rep in range(args.repeat):
                    order = methods[rep % len(methods):] + methods[:rep % len(methods)]
                    for m in order:
                        settle()
                        res = MEASURE[m](ctx, wl, size)
                        results[m].append(res)
                        extra = ""
                        if "frozen_seconds" in res:
                            extra = (f", frozen {res['frozen_seconds']:.3f}s, "
                                     f"RSS {res['peak_rss_mib']:.0f} MiB")
                        log(f"  [{rep + 1}/{args.repeat}] {LABELS[m]:<18} "
                            f"{res['seconds']:.3f}s{extra}")
            finally:
                wl.close()
            s = summarize(size, results, methods)
            summaries.append(s)
            if not args.json:
                print_table(s, args.repeat)
                sys.stdout.flush()
    except BenchError as e:
        log(f"dump.py: error: {e}")
        return 1
    except KeyboardInterrupt:
        log("dump.py: interrupted")
        return 130
    finally:
        if old_pattern is not None:
            with open("/proc/sys/kernel/core_pattern", "w") as f:
                f.write(old_pattern)
        shutil.rmtree(ctx.dir, ignore_errors=True)

    env["loadavg_end"] = os.getloadavg()
    if args.json:
        json.dump({"environment": env, "sizes": summaries,
                   "targets": {"speedup_vs_kcore": TARGET_SPEEDUP_VS_CORE,
                               "speedup_vs_gcore": TARGET_SPEEDUP_VS_GCORE,
                               "crcheckpoint_over_dd_max": TARGET_VS_DD,
                               "peak_rss_mib_max": TARGET_RSS_MIB}},
                  sys.stdout, indent=2)
        print()
    else:
        allt = [ok for s in summaries for ok in s["targets"].values()]
        if allt:
            print(f"\noverall: {sum(allt)}/{len(allt)} targets PASS "
                  f"(load average {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
