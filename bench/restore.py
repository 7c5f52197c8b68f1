#!/usr/bin/env python3
"""Benchmark: crrestart --detach (eager and lazy) against crcheckpoint, by size.

For each size in --sizes (MiB) a small C workload mallocs that much memory,
fills every page with non-zero data and then prints "alive N" every 20 ms.
Each repeat:

  checkpoint   wall time of `crcheckpoint PID -o FILE --kill --json`
  eager        wall time of `crrestart --detach --eager --json FILE` (returns
               once the process runs again), until the restored process prints
               its next "alive" line (= running again), and crrestart's peak RSS
  lazy         the same with --lazy (pages come on first touch; a background
               server copies the rest), plus how long the server took to bring
               every page in (from the restored process's RSS)

After each restore the restored process is checked (it re-reads every page
and reports "verify ok" on SIGUSR1), then killed, and the next restore uses the
same statefile.  Reports medians and the ratio restore/checkpoint, with the
target of issue 3: lazy restore under 0.25x the checkpoint time at 2 GiB and
nearly flat in memory size.  Needs root and gcc.

    python3 bench/restore.py --sizes 256 --repeat 1      # quick check
    python3 bench/restore.py                              # 1, 2 and 8 GiB, 3 repeats
    python3 bench/restore.py --json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

WORKLOAD = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static volatile sig_atomic_t verify;
static void on_usr1(int s) { (void)s; verify = 1; }
int main(int argc, char **argv) {
    size_t mib = strtoul(argv[1], 0, 10), n = mib << 20;
    unsigned char *p = malloc(n);
    if (!p) return 1;
    for (size_t i = 0; i < n; i += 4096) memset(p + i, (int)((i / 4096) % 251) + 1, 4096);
    signal(SIGUSR1, on_usr1);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    for (long k = 1;; k++) {
        if (verify) {
            verify = 0;
            size_t bad = 0;
            for (size_t i = 0; i < n; i += 4096)
                bad += p[i] != (unsigned char)(((i / 4096) % 251) + 1) ||
                       p[i + 4095] != (unsigned char)(((i / 4096) % 251) + 1);
            printf(bad ? "verify BAD %zu\n" : "verify ok\n", bad);
        }
        printf("alive %ld\n", k);
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
}
"""

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(path):
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_line(path, pred, timeout=120.0, start=0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ls = lines(path)
        for i in range(start, len(ls)):
            if pred(ls[i]):
                return i
        time.sleep(0.002)
    raise RuntimeError(f"timeout waiting in {path} {what}")


def run_timed(argv):
    """Run argv; (wall seconds, returncode, stdout, stderr, peak RSS KiB of the child)."""
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    return wall, p.returncode, out.decode(), err.decode(), p.pid


def maxrss_of(pid_status):
    return pid_status


def reap(pid, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return
        time.sleep(0.005)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,2048,8192")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--compare-with", metavar="DIR", default=None,
                    help="a checkout of an older crelf (e.g. `git archive main | tar -x -C "
                         "DIR`): each process is checkpointed by it too, and restored by it "
                         "and by this tree, side by side")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/restore.py needs root")
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # subreaper: restored processes come back to us
    work = tempfile.mkdtemp(prefix="crelf-bench-restore-", dir=args.dir)
    py = sys.executable
    ckpt = [os.path.join(os.path.dirname(py), "crcheckpoint")]
    if not os.path.exists(ckpt[0]):
        ckpt = [py, "-m", "statefile.cli"]
    rst = [py, "-m", "restorer.cli"]
    old = os.path.abspath(args.compare_with) if args.compare_with else None
    old_ckpt, old_rst = [py, "-m", "statefile.cli"], rst
    old_env = dict(os.environ, PYTHONPATH=old) if old else None
    src = os.path.join(work, "w.c")
    with open(src, "w") as f:
        f.write(WORKLOAD)
    exe = os.path.join(work, "w")
    subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
    results = {}
    restored: list[int] = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            need = size * 2**20 * 1.1
            if shutil.disk_usage(work).free < need:
                print(f"skip {size} MiB: not enough disk", file=sys.stderr)
                continue
            res = {"checkpoint": [], "eager": [], "eager_running": [], "lazy": [],
                   "lazy_running": [], "lazy_all_pages": [], "eager_inproc": [],
                   "lazy_inproc": [], "crrestart_rss_kib": []}
            for rep in range(args.repeat):
                out = os.path.join(work, f"out-{size}-{rep}")
                cr = os.path.join(work, f"w-{size}.cr")
                with open(out, "a") as fo:   # O_APPEND: every restored run writes at the end
                    w = subprocess.Popen([exe, str(size)], stdout=fo, stderr=subprocess.DEVNULL,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
                wait_line(out, lambda s: s == "ready", timeout=300)
                variants = [("eager", rst, REPO, cr), ("lazy", rst, REPO, cr)]
                if old:
                    # the same process checkpointed by the older crelf too
                    # (left running), restored by it, and by this one
                    cr_old = os.path.join(work, f"w-{size}-old.cr")
                    rc = subprocess.run(old_ckpt + [str(w.pid), "-o", cr_old], cwd=old,
                                        env=old_env, capture_output=True, text=True)
                    if rc.returncode != 0:
                        raise RuntimeError(f"older crcheckpoint failed: {rc.stderr}")
                    variants += [("eager_old", old_rst, old, cr_old),
                                 ("lazy_old", old_rst, old, cr_old),
                                 ("eager_on_old_file", rst, REPO, cr_old)]
                    # interleaved, the order rotating each repeat: a noisy
                    # machine hurts every variant alike
                    k = rep % len(variants)
                    variants = variants[k:] + variants[:k]
                wall, rc, o, e, _ = run_timed(ckpt + [str(w.pid), "-o", cr, "--kill"])
                if rc != 0:
                    raise RuntimeError(f"crcheckpoint failed: {e}")
                w.wait()
                res["checkpoint"].append(wall)
                for name, argv, cwd, statefile in variants:
                    mode = name.split("_")[0]
                    before = len(lines(out))
                    t0 = time.perf_counter()
                    p = subprocess.Popen(argv + ["--detach", f"--{mode}", "--json",
                                                 "--force-files", statefile],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         cwd=cwd, env=old_env if cwd == old else None)
                    # Until crrestart exits (--detach: the tree runs again).
                    # Not until EOF on its stderr: a lazy restore's serving
                    # daemon keeps that open (to report a failure) until every
                    # page is in.
                    err = b""
                    for line in p.stderr:
                        err += line
                        if line.startswith(b"{"):
                            break
                    p.wait()
                    wall = time.perf_counter() - t0
                    p.stderr.close()
                    p.stdout.close()
                    ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                    if p.returncode != 0:
                        raise RuntimeError(f"crrestart --{mode} ({name}) failed: {err.decode()}")
                    info = json.loads(err.decode().strip().splitlines()[-1])
                    wait_line(out, lambda s: s.startswith("alive"), start=before)
                    running = time.perf_counter() - t0
                    pid = info["pid"]
                    restored.append(pid)      # killed in `finally` if anything fails
                    if mode == "lazy":
                        target = size * 1024 * 0.98
                        while rss_kib(pid) < target and time.perf_counter() - t0 < 120:
                            time.sleep(0.005)
                        res.setdefault(f"{name}_all_pages", []).append(time.perf_counter() - t0)
                    n = len(lines(out))
                    os.kill(pid, signal.SIGUSR1)
                    i = wait_line(out, lambda s: s.startswith("verify"), start=n, what=name)
                    if lines(out)[i] != "verify ok":
                        raise RuntimeError(f"{name} restore of {size} MiB: {lines(out)[i]}")
                    os.kill(pid, signal.SIGKILL)
                    reap(pid)
                    restored.remove(pid)
                    res.setdefault(name, []).append(wall)
                    res.setdefault(f"{name}_running", []).append(running)
                    res.setdefault(f"{name}_inproc", []).append(info["seconds"])
                    res["crrestart_rss_kib"].append(ru)
                if old:
                    os.unlink(cr_old)
                os.unlink(cr)
            results[size] = res
    finally:
        for pid in restored:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(work, ignore_errors=True)
    med = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    if args.json:
        print(json.dumps({str(k): {m: med(v) for m, v in r.items()} for k, r in results.items()},
                         indent=1))
        return
    print(f"{'MiB':>6} {'checkpoint':>10} {'eager':>8} {'lazy':>8} {'lazy/ckpt':>9} "
          f"{'eager/ckpt':>10} {'lazy all pages':>14} {'in-process e/l':>16}")
    for size, r in results.items():
        c, e, lz = med(r["checkpoint"]), med(r["eager_running"]), med(r["lazy_running"])
        print(f"{size:>6} {c:>9.3f}s {e:>7.3f}s {lz:>7.3f}s {lz / c:>9.2f} {e / c:>10.2f} "
              f"{med(r['lazy_all_pages']):>13.3f}s "
              f"{med(r['eager_inproc']):>7.3f}/{med(r['lazy_inproc']):.3f}s")
    if old:
        print(f"\nside by side with {old} (wall until running again; in-process seconds):")
        print(f"{'MiB':>6} {'mode':>6} {'older':>14} {'this':>14} {'this/older':>10} "
              f"{'this, older file':>17}")
        for size, r in results.items():
            for mode in ("eager", "lazy"):
                o, t = med(r[f"{mode}_old_running"]), med(r[f"{mode}_running"])
                oi, ti = med(r[f"{mode}_old_inproc"]), med(r[f"{mode}_inproc"])
                f1 = (f"{med(r['eager_on_old_file_running']):>7.3f}s/"
                      f"{med(r['eager_on_old_file_inproc']):.3f}s" if mode == "eager" else "")
                print(f"{size:>6} {mode:>6} {o:>7.3f}s/{oi:.3f}s {t:>7.3f}s/{ti:.3f}s "
                      f"{t / o:>10.2f} {f1:>17}")
    if 2048 in results:
        r = results[2048]
        ratio = med(r["lazy_running"]) / med(r["checkpoint"])
        print(f"target lazy < 0.25x checkpoint at 2 GiB: {ratio:.2f}x "
              f"{'PASS' if ratio < 0.25 else 'MISS'}")


if __name__ == "__main__":
    main()
