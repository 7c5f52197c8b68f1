"""crrestart on real processes: checkpoint with --kill mid-run, restart, and the
output must be byte-identical to an uninterrupted run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import pid_alive, require_root, wait_for_line

BIN = Path(sys.executable).parent
CRCHECKPOINT = str(BIN / "crcheckpoint")
CRRESTART = [sys.executable, "-m", "restorer.cli"]
REPO = Path(__file__).resolve().parent.parent


def checkpoint(pid: int, out: Path, kill: bool = True, proc=None) -> None:
    argv = [CRCHECKPOINT, str(pid), "-o", str(out)] + (["--kill"] if kill else [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"crcheckpoint failed ({r.returncode}): {r.stderr}"
    if kill and proc is not None:
        proc.wait(timeout=10)  # reap it: a zombie still holds the pid


def restart(procs, statefile: Path, *args, stdout=None, stderr=None, cwd=None):
    return procs.spawn([*CRRESTART, *args, str(statefile)], stdout=stdout,
                       stderr=stderr or subprocess.PIPE, cwd=cwd or REPO)


def finish(proc, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"crrestart did not finish in {timeout}s: {err!r}")
    return proc.returncode, (err or b"").decode(errors="replace")


def reference(argv, tmp_path: Path, name: str = "ref.out") -> bytes:
    ref = tmp_path / name
    with open(ref, "wb") as f:
        subprocess.run([str(a) for a in argv], stdout=f, stderr=subprocess.STDOUT, check=True,
                       timeout=120)
    return ref.read_bytes()


@pytest.mark.parametrize("mode,mib", [("--eager", 4), ("--lazy", 4), ("--lazy", 256),
                                      # every page in before the release (the guard
                                      # once took that for "nothing left to guard")
                                      ("--lazy --detach", 1)])
def test_ticker_output_identical(sample_bin, procs, tmp_path, mode, mib):
    """The ticker checksums its whole heap every tick: any page restored wrong
    (or served wrong by the lazy server) changes the output."""
    require_root()
    out = tmp_path / "tick.out"
    cr = tmp_path / "ticker.cr"
    p = procs.spawn([sample_bin / "ticker", 25, mib, 50], stdout=out)
    wait_for_line(out, r"^tick 6 ", proc=p, timeout=30)
    checkpoint(p.pid, cr, proc=p)
    r = restart(procs, cr, *mode.split())
    code, err = finish(r)
    assert code == 0, err
    if "--detach" in mode:
        wait_for_line(out, r"^done$", timeout=30)
        reap(p.pid)
    assert out.read_bytes() == reference([sample_bin / "ticker", 25, mib, 0], tmp_path)


# ------------------------------------------------------------------ helpers

def build_c(tmp_path: Path, name: str, source: str) -> Path:
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    exe = tmp_path / name
    subprocess.run(["gcc", "-O1", "-pthread", "-Wall", "-o", str(exe), str(src)], check=True)
    return exe


def reap(pid: int) -> None:
    """Reap a checkpointed-and-killed process that re-parented to us (procs is a
    subreaper); a zombie keeps its pid."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            return
        time.sleep(0.01)


CLOCK_MALLOC = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long ticks = atol(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct timespec prev; clock_gettime(CLOCK_MONOTONIC, &prev);
    void *keep[64] = {0};
    long ncpu = sysconf(_SC_NPROCESSORS_CONF);
    for (long n = 1; n <= ticks; n++) {
        struct timespec now, rt; clock_gettime(CLOCK_MONOTONIC, &now);
        clock_gettime(CLOCK_REALTIME, &rt);
        int mono_ok = (now.tv_sec > prev.tv_sec) ||
                      (now.tv_sec == prev.tv_sec && now.tv_nsec >= prev.tv_nsec);
        int rt_ok = rt.tv_sec > 1600000000;
        prev = now;
        /* small (brk heap) and large (mmap) allocations, some kept, some freed */
        size_t sz = (n % 3 == 0) ? (size_t)(256 << 10) + n * 4096 : 32 + n * 40;
        unsigned char *p = malloc(sz);
        for (size_t i = 0; i < sz; i++) p[i] = (unsigned char)(i * n + 7);
        uint64_t sum = 0;
        for (size_t i = 0; i < sz; i += 61) sum += p[i];
        int slot = n % 64;
        free(keep[slot]); keep[slot] = p;
        int cpu = sched_getcpu();
        printf("tick %ld mono_ok=%d rt_ok=%d cpu_ok=%d sum=%llu\n", n, mono_ok, rt_ok,
               cpu >= 0 && cpu < ncpu, (unsigned long long)sum);
        struct timespec ts = {0, 40 * 1000000L};
        nanosleep(&ts, NULL);
    }
    printf("done\n");
    return 0;
}
"""

UNLINKED = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long ticks = atol(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || unlink(argv[2]) != 0) { perror("tmp"); return 1; }
    char buf[128];
    for (long n = 1; n <= ticks; n++) {
        int len = snprintf(buf, sizeof buf, "line %ld of the unlinked file\n", n);
        if (write(fd, buf, len) != len) { perror("write"); return 1; }
        printf("tick %ld\n", n);
        struct timespec ts = {0, 30 * 1000000L};
        nanosleep(&ts, NULL);
    }
    off_t size = lseek(fd, 0, SEEK_CUR);
    char *all = malloc(size + 1);
    if (pread(fd, all, size, 0) != size) { perror("pread"); return 1; }
    unsigned long h = 5381;
    for (off_t i = 0; i < size; i++) h = h * 33 + (unsigned char)all[i];
    printf("size=%ld hash=%lx\n", (long)size, h);
    return 0;
}
"""


# ------------------------------------------------------------------- tests

@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_mt_values_threads_join(sample_bin, procs, tmp_path, mode):
    """Main + 3 pthreads with mutex/condvar and nanosleep; pthread_join after restart."""
    require_root()
    out, cr = tmp_path / "mt.out", tmp_path / "mt.cr"
    p = procs.spawn([sample_bin / "mt_values", 30], stdout=out, stderr=tmp_path / "mt.err")
    wait_for_line(out, r"^tick 8 ", proc=p)
    checkpoint(p.pid, cr, proc=p)
    code, err = finish(restart(procs, cr, mode))
    assert code == 0, err + (tmp_path / "mt.err").read_text()
    assert out.read_bytes() == reference([sample_bin / "mt_values", 30], tmp_path)
    assert out.read_text().endswith("joined\n")


@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_python_threads(sample_bin, procs, tmp_path, mode):
    require_root()
    out, cr = tmp_path / "py.out", tmp_path / "py.cr"
    argv = [sys.executable, sample_bin / "pyworker.py", 25]
    p = procs.spawn(argv, stdout=out, stderr=tmp_path / "py.err")
    wait_for_line(out, r"^py tick 6 ", proc=p)
    checkpoint(p.pid, cr, proc=p)
    code, err = finish(restart(procs, cr, mode))
    assert code == 0, err + (tmp_path / "py.err").read_text()
    assert out.read_bytes() == reference(argv, tmp_path)


def test_clock_gettime_and_malloc_after_restart(procs, tmp_path):
    require_root()
    exe = build_c(tmp_path, "clockmalloc", CLOCK_MALLOC)
    out, cr = tmp_path / "cm.out", tmp_path / "cm.cr"
    p = procs.spawn([exe, 30], stdout=out, stderr=tmp_path / "cm.err")
    wait_for_line(out, r"^tick 7 ", proc=p)
    checkpoint(p.pid, cr, proc=p)
    code, err = finish(restart(procs, cr))
    assert code == 0, err
    assert out.read_bytes() == reference([exe, 30], tmp_path)
    assert "ok=0" not in out.read_text()


def test_unlinked_temp_file(procs, tmp_path):
    require_root()
    exe = build_c(tmp_path, "unlinked", UNLINKED)
    out, cr = tmp_path / "ul.out", tmp_path / "ul.cr"
    p = procs.spawn([exe, 40, tmp_path / "scratch.tmp"], stdout=out, stderr=tmp_path / "ul.err")
    wait_for_line(out, r"^tick 10$", proc=p)
    checkpoint(p.pid, cr, proc=p)
    assert not (tmp_path / "scratch.tmp").exists()
    code, err = finish(restart(procs, cr))
    assert code == 0, err
    assert out.read_bytes() == reference([exe, 40, tmp_path / "ref.tmp"], tmp_path)
    # nothing left behind by the re-creation of the deleted file
    assert not [f for f in os.listdir(tmp_path) if "crelf" in f]


def test_gzip_mid_stream(procs, tmp_path):
    require_root()
    import random
    r = random.Random(7)
    words = ["".join(r.choice("abcdefghijklmnop") for _ in range(r.randint(2, 9)))
             for _ in range(4000)]
    src = tmp_path / "in.txt"
    with open(src, "w") as f:
        for _ in range(40000):
            f.write(" ".join(r.choices(words, k=10)) + "\n")
    data = src.read_bytes()
    src.write_bytes(data * 12)       # ~27 MB: gzip -9 takes a few seconds
    gz = tmp_path / "out.gz"
    with open(src, "rb") as fin:
        p = procs.spawn(["gzip", "-9", "-n"], stdin=fin, stdout=gz, stderr=tmp_path / "gz.err")
    deadline = time.monotonic() + 20
    while gz.stat().st_size < 64 << 10:
        assert p.poll() is None and time.monotonic() < deadline, "gzip finished too early"
        time.sleep(0.02)
    checkpoint(p.pid, tmp_path / "gzip.cr", proc=p)
    mid = gz.stat().st_size
    code, err = finish(restart(procs, tmp_path / "gzip.cr"), timeout=120)
    assert code == 0, err
    assert gz.stat().st_size > mid
    with open(src, "rb") as fin:
        ref = subprocess.run(["gzip", "-9", "-n"], stdin=fin, capture_output=True,
                             check=True).stdout
    assert gz.read_bytes() == ref


def test_three_rounds(sample_bin, procs, tmp_path):
    """Checkpoint, restart (--detach), checkpoint the restarted one ... 3 times."""
    require_root()
    out = tmp_path / "tick.out"
    p = procs.spawn([sample_bin / "ticker", 40, 4, 50], stdout=out)
    pid = p.pid
    for rnd in range(1, 4):
        wait_for_line(out, rf"^tick {rnd * 8} ", timeout=20)
        cr = tmp_path / f"round{rnd}.cr"
        checkpoint(pid, cr, proc=p if rnd == 1 else None)
        reap(pid)
        code, err = finish(restart(procs, cr, "--detach"))
        assert code == 0, f"round {rnd}: {err}"
    wait_for_line(out, r"^done$", timeout=30)
    reap(pid)
    assert out.read_bytes() == reference([sample_bin / "ticker", 40, 4, 0], tmp_path)


def ticker_statefile(sample_bin, procs, tmp_path, name: str, kill: bool = True):
    """A 1 MiB ticker (50 ms ticks) checkpointed at tick 3: (its Popen, its
    output file, the statefile)."""
    out = tmp_path / "tick.out"
    p = procs.spawn([sample_bin / "ticker", 0, 1, 50], stdout=out)
    wait_for_line(out, r"^tick 3 ", proc=p)
    cr = tmp_path / name
    checkpoint(p.pid, cr, kill=kill, proc=p)
    return p, out, cr


def test_pid_busy_error_and_pidns(sample_bin, procs, tmp_path):
    """Without --kill the original keeps its pid: a clear refusal naming the pid;
    --pidns restores the copy beside it in a new pid namespace."""
    require_root()
    p, out, cr = ticker_statefile(sample_bin, procs, tmp_path, "live.cr", kill=False)
    code, err = finish(restart(procs, cr, "--force-files"))
    assert code == 3
    assert f"pid {p.pid} is in use" in err and "--pidns" in err
    r = restart(procs, cr, "--force-files", "--pidns", "--detach", "--json")
    code, err = finish(r)
    assert code == 0, err
    import json
    info = json.loads(err.strip().splitlines()[-1])
    assert info["pid"] == p.pid and info["tracer_pid"] != p.pid
    with open(f"/proc/{info['tracer_pid']}/status") as f:
        nspid = [line.split()[1:] for line in f if line.startswith("NSpid:")][0]
    assert int(nspid[-1]) == p.pid          # same pid inside its namespace
    assert os.readlink(f"/proc/{info['tracer_pid']}/exe") == str(sample_bin / "ticker")


def test_changed_file_refused(sample_bin, procs, tmp_path):
    require_root()
    p, out, cr = ticker_statefile(sample_bin, procs, tmp_path, "t.cr")
    with open(out, "a") as f:
        f.write("changed\n")
    code, err = finish(restart(procs, cr))
    assert code == 3
    assert "validation" in err and str(out) in err and "--force-files" in err
    assert len(err.strip().splitlines()) == 1


MAPPED = r"""
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 8192, mmap.MAP_PRIVATE, mmap.PROT_READ)
os.close(fd)
for i in range(200):
    print(i, m[4096:4100].decode(), flush=True)
    time.sleep(0.05)
"""


@pytest.mark.checkpoint_only("the test rewrites the mapped file to show that the "
                              "restart refuses")
def test_private_mapping_rewritten_in_place_is_refused(procs, tmp_path):
    """A file mapped privately (like a library) whose content changed in place
    (same inode) would feed the restarted process new pages: refused."""
    require_root()
    data = tmp_path / "data.bin"
    data.write_bytes(b"a" * 4096 + b"BBBB" + b"c" * 4092)
    prog = tmp_path / "mapped.py"
    prog.write_text(MAPPED)
    out = tmp_path / "mapped.out"
    p = procs.spawn([sys.executable, prog, data], stdout=out)
    wait_for_line(out, r"^3 BBBB$", proc=p)
    cr = tmp_path / "m.cr"
    checkpoint(p.pid, cr, proc=p)
    ino = data.stat().st_ino
    with open(data, "r+b") as f:      # rewrite in place: same inode, same size
        f.seek(4096)
        f.write(b"XXXX")
    assert data.stat().st_ino == ino
    code, err = finish(restart(procs, cr, "--force-files"))
    assert code == 3, err
    assert f"mapped file {data} was modified since the checkpoint" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not pid_alive(p.pid), "a refused restart left the process behind"


@pytest.mark.parametrize("step,extra", [("mmap", []), ("registers", []),
                                        ("threads", ["--pidns"]), ("memory", ["--lazy"])])
def test_failure_leaves_nothing(sample_bin, procs, tmp_path, step, extra):
    """A failure at any step kills everything crrestart created, and says which
    step failed in one line."""
    require_root()
    out = tmp_path / "mt.out"
    p = procs.spawn([sample_bin / "mt_values", 0], stdout=out)
    wait_for_line(out, r"^tick 3 ", proc=p)
    cr = tmp_path / "mt.cr"
    checkpoint(p.pid, cr, proc=p)
    env = dict(os.environ, CRELF_RESTORE_FAIL_AT=step)
    r = procs.spawn([*CRRESTART, *extra, str(cr)], stderr=subprocess.PIPE, env=env, cwd=REPO)
    code, err = finish(r)
    assert code == 3
    assert err.strip().splitlines() == [f"crrestart: failed at {step}: failure injected by "
                                        "CRELF_RESTORE_FAIL_AT"]
    time.sleep(0.2)
    from helpers import children, pid_alive
    # Anything crrestart left behind would have re-parented to us (procs makes
    # pytest a child subreaper).
    assert [c for c in children(os.getpid()) if pid_alive(c)] == []


def _drain(master: int, sink: bytearray, until: bytes, timeout: float = 30) -> None:
    import select
    deadline = time.monotonic() + timeout
    while until not in sink:
        left = deadline - time.monotonic()
        assert left > 0, f"no {until!r} on the terminal; got {bytes(sink[-300:])!r}"
        r, _, _ = select.select([master], [], [], min(left, 0.2))
        if r:
            try:
                sink += os.read(master, 65536)
            except OSError:
                break


def test_terminal_becomes_crrestarts_terminal(sample_bin, procs, tmp_path):
    """A process writing to a terminal writes, once restarted, to the terminal
    crrestart runs in (like CRIU's shell-job)."""
    require_root()
    m1, s1 = os.openpty()
    p = procs.spawn([sample_bin / "ticker", 20, 1, 50], stdin=s1, stdout=s1, stderr=s1)
    os.close(s1)
    first = bytearray()
    _drain(m1, first, b"tick 5 ")
    checkpoint(p.pid, tmp_path / "tty.cr", proc=p)
    import select
    while select.select([m1], [], [], 0.3)[0]:     # what it wrote before the freeze
        try:
            first += os.read(m1, 65536)
        except OSError:
            break
    os.close(m1)
    m2, s2 = os.openpty()
    r = procs.spawn([*CRRESTART, str(tmp_path / "tty.cr")], stdin=s2, stdout=s2, stderr=s2,
                    cwd=REPO)
    os.close(s2)
    second = bytearray()
    _drain(m2, second, b"done")
    assert r.wait(timeout=30) == 0, bytes(second)
    os.close(m2)
    got = (bytes(first) + bytes(second)).replace(b"\r\n", b"\n")
    got = got[:got.index(b"done\n") + 5]
    ref = reference([sample_bin / "ticker", 20, 1, 0], tmp_path)
    assert got == ref


def test_vdso_of_another_kernel_is_refused(sample_bin, procs, tmp_path, monkeypatch):
    """The vDSO goes back at its old address, so it must be this kernel's: a
    statefile whose saved vDSO has another layout or other code is refused
    (restorer/validate.vdso_problem, called by crrestart's validation)."""
    require_root()
    from restorer import validate
    from restorer.validate import vdso_problem
    from statefile.format.integrity import SegmentReader
    from statefile.format.reader import load

    p, out, cr = ticker_statefile(sample_bin, procs, tmp_path, "t.cr")
    sf = load(str(cr))
    task = sf.tasks[0]
    assert vdso_problem(task, sf) is None          # the same kernel: accepted

    class OtherBuild(SegmentReader):
        """The statefile's verified bytes, with one byte of its saved vDSO code
        changed (as another kernel build would have saved it)."""
        def pieces(self, seg, lo=0, hi=None):
            for off, view in super().pieces(seg, lo, hi):
                data = bytearray(view)
                if off <= 0x200 < off + len(data):
                    data[0x200 - off] ^= 0xFF
                yield off, memoryview(data)

    monkeypatch.setattr(validate, "SegmentReader", OtherBuild)
    assert "vDSO code differs" in vdso_problem(task, sf)
    monkeypatch.undo()
    from msgspec.structs import replace
    other = replace(task, mappings=[replace(m, end=m.end + 4096) if m.path == "[vvar]" else m
                                    for m in task.mappings])
    msg = vdso_problem(other, sf)
    assert "vDSO layout" in msg and "[vvar] 5p" in msg and "[vvar] 4p" in msg, msg


ORPHANING = r"""
import os, sys, time
go = sys.argv[1]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.02)
child = os.fork()
if child == 0:
    if os.fork() == 0:            # the grandchild: an orphan once its parent exits
        time.sleep(0.3)
        print("orphan", os.getpid(), "exits", flush=True)
        os._exit(0)
    os._exit(0)
os.waitpid(child, 0)
time.sleep(3)
print("done", flush=True)
"""


def test_pidns_init_reaps_orphans(procs, tmp_path):
    """With --pidns, crrestart's init of the new namespace adopts the tasks
    orphaned after the restart and reaps them: no zombie is left."""
    require_root()
    import json
    prog, out, go = tmp_path / "orphaning.py", tmp_path / "o.out", tmp_path / "go"
    prog.write_text(ORPHANING)
    p = procs.spawn([sys.executable, prog, go], stdout=out)
    wait_for_line(out, r"^ready$", proc=p)
    cr = tmp_path / "o.cr"
    checkpoint(p.pid, cr, proc=p)
    code, err = finish(restart(procs, cr, "--pidns", "--detach", "--json", "--force-files"))
    assert code == 0, err
    root = json.loads(err.strip().splitlines()[-1])["tracer_pid"]
    with open(f"/proc/{root}/status") as f:
        init = int(next(line.split()[1] for line in f if line.startswith("PPid:")))
    go.write_text("")
    wait_for_line(out, r"^orphan \d+ exits$")
    deadline = time.monotonic() + 10
    while True:
        kids = Path(f"/proc/{init}/task/{init}/children").read_text().split()
        if [int(k) for k in kids] == [root]:
            break               # the orphan came to init and was reaped
        assert time.monotonic() < deadline, f"init {init} still has children {kids}"
        time.sleep(0.05)
    wait_for_line(out, r"^done$")
