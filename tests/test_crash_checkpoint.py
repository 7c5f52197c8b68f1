"""A crcheckpoint killed (SIGKILL) at a random moment never harms its target.

Each test keeps one real program running and kills many leave-running
checkpoints of it, at delays spread over a whole checkpoint's duration
(measured first, in the same run): while it freezes the tree, injects
syscalls, makes the copy-on-write snapshot, writes memory, releases.  After
every kill the target must be running (not stopped, not traced), with no
child, thread, mapping or fd that it did not have, its memory as before, and
at the end its whole output must equal an uninterrupted run's byte for byte
(the programs check their own state too: mt_sync computes across threads,
procstate compares every piece of its state after the wait with before).
Design: docs/CRASHSAFE.md.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import read_lines, require_root, wait_for_line

from statefile.control import procfs

CRCHECKPOINT = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "crcheckpoint")


def vdso(pid: int) -> tuple[int, bytes]:
    for m in procfs.maps(pid):
        if m["path"] == "[vdso]":
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
                f.seek(m["start"])
                return m["start"], f.read(m["end"] - m["start"])
    raise AssertionError("no [vdso]")


def snapshot_of(pid: int) -> dict:
    """Everything crcheckpoint could leave behind in pid, as comparable values."""
    tasks, kids = [], []
    for t in sorted(os.listdir(f"/proc/{pid}/task")):
        try:            # a helper thread may end between the two reads
            kids += Path(f"/proc/{pid}/task/{t}/children").read_text().split()
            tasks.append(t)
        except FileNotFoundError:
            pass
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    status = procfs.status(pid)
    return {"threads": len(tasks), "children": kids, "fds": fds,
            "maps": [(m["start"], m["end"], m["perms"], m["path"]) for m in procfs.maps(pid)],
            "state": status["State"].split()[0], "tracer": status["TracerPid"],
            "sigblk": status["SigBlk"], "vdso": vdso(pid)}


def settled(pid: int, want: dict, timeout: float = 5.0) -> dict:
    """The target's state once crelf's helper thread (if the kill came while a
    snapshot existed) has reaped the snapshot and ended: it does so at once,
    but asynchronously to the kill."""
    end = time.monotonic() + timeout
    while True:
        got = snapshot_of(pid)
        if got["threads"] == want["threads"] and not got["children"] or time.monotonic() > end:
            return got
        time.sleep(0.01)


def assert_unharmed(pid: int, before: dict, after: dict, trial: str) -> None:
    assert after["state"] in ("S", "R", "D"), f"{trial}: target left in state {after['state']}"
    assert after["tracer"] == "0", f"{trial}: target left traced by {after['tracer']}"
    assert after["children"] == before["children"], f"{trial}: child left: {after['children']}"
    assert after["threads"] == before["threads"], f"{trial}: thread left"
    assert after["fds"] == before["fds"], f"{trial}: fds differ"
    assert after["maps"] == before["maps"], f"{trial}: mappings differ"
    # The only bytes a dead crcheckpoint may leave are a snapshot helper's
    # frames in the vDSO's unused tail (past the image, never read; see
    # docs/CRASHSAFE.md); the next checkpoint writes the tail back.
    (a0, img0), (a1, img1) = before["vdso"], after["vdso"]
    used = len(img0.rstrip(b"\0"))
    assert a0 == a1 and img1[:used] == img0[:used], f"{trial}: vDSO image changed"


def checkpoint_seconds(pid: int, path: Path) -> float:
    t0 = time.monotonic()
    r = subprocess.run([CRCHECKPOINT, str(pid), "-o", str(path)], capture_output=True,
                       text=True, timeout=300, close_fds=True)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t0


def kill_checkpoints(pid: int, tmp_path: Path, trials: int, seed: int) -> list[int]:
    """`trials` crcheckpoints of pid, each SIGKILLed after a random delay
    (0 .. 0.9 x a measured checkpoint); returns their exit statuses."""
    rng = random.Random(seed)
    out = tmp_path / "k.cr"
    full = checkpoint_seconds(pid, out)
    before = snapshot_of(pid)
    statuses = []
    for i in range(trials):
        # (a target that ended would show as one without mappings: say so)
        assert procfs.stat(pid)["state"] not in ("Z", "X"), \
            f"the target ended before trial {i}: make it run longer"
        delay = rng.uniform(0, 0.9 * full)
        p = subprocess.Popen([CRCHECKPOINT, str(pid), "-o", str(out)], close_fds=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        statuses.append(p.wait(timeout=60))
        trial = f"seed {seed} trial {i} (kill after {delay:.3f} s of {full:.3f} s)"
        assert_unharmed(pid, before, settled(pid, before), trial)
    # a last complete checkpoint: works, and leaves the vDSO exactly as it was
    checkpoint_seconds(pid, out)
    after = settled(pid, before)
    assert_unharmed(pid, before, after, f"seed {seed} final checkpoint")
    assert after["vdso"] == before["vdso"], "the vDSO tail was not written back"
    return statuses


def reference(procs, argv, tmp_path: Path):
    """An uninterrupted run of argv alongside the target (it takes as long as
    the target: run both at once); returns (process, its output file)."""
    out = tmp_path / "reference.out"
    return procs.spawn(argv, stdout=out, close_fds=True), out


def same_as_reference(proc, out: Path, ref) -> None:
    assert proc.wait(timeout=180) == 0 and ref[0].wait(timeout=180) == 0
    assert out.read_bytes() == ref[1].read_bytes()


@pytest.mark.parametrize("seed", [1])
def test_killed_checkpoints_of_a_big_heap(sample_bin, procs, tmp_path, seed):
    """ticker with a 256 MiB heap (copy-on-write snapshots that write
    themselves, the longest phase of a checkpoint)."""
    require_root()
    argv = [sample_bin / "ticker", 1600, 256, 25]     # 40 s: longer than the trials
    ref = reference(procs, argv, tmp_path)
    out = tmp_path / "ticker.out"
    proc = procs.spawn(argv, stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 2 ", proc=proc, timeout=60)
    statuses = kill_checkpoints(proc.pid, tmp_path, 20, seed)
    # most were killed mid-way (a later checkpoint can be faster than the first)
    assert statuses.count(-signal.SIGKILL) >= len(statuses) // 2, statuses
    same_as_reference(proc, out, ref)


def test_killed_checkpoints_of_threads(sample_bin, procs, tmp_path):
    """mt_sync: four threads that synchronise through mutexes and condition
    variables, killed checkpoints among them while they wait and run."""
    require_root()
    argv = [sample_bin / "mt_sync", 1500, 20]         # 30 s: longer than the trials
    ref = reference(procs, argv, tmp_path)
    out = tmp_path / "mt.out"
    proc = procs.spawn(argv, stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 2 ", proc=proc, timeout=60)
    kill_checkpoints(proc.pid, tmp_path, 15, 2)
    same_as_reference(proc, out, ref)


def test_killed_checkpoints_keep_every_state(sample_bin, procs, tmp_path):
    """procstate: signal masks, pending signals, alternate signal stacks,
    handlers, itimers and vector registers, each compared after with before
    by the program itself, through killed checkpoints."""
    require_root()
    d = tmp_path / "ps"
    d.mkdir()
    out = tmp_path / "ps.out"
    proc = procs.spawn([sample_bin / "procstate", d], stdout=out, close_fds=True)
    wait_for_line(out, r"^ready$", proc=proc, timeout=30)
    kill_checkpoints(proc.pid, tmp_path, 12, 3)
    (d / "go").touch()
    assert proc.wait(timeout=60) == 0
    lines = read_lines(out)
    before = [ln[len("before "):] for ln in lines if ln.startswith("before ")]
    after = [ln[len("after "):] for ln in lines if ln.startswith("after ")]
    assert before and after == before


SECCOMP_PROGRAMS = {
    # strict mode: only read, write, _exit and sigreturn; echoes its stdin
    "strict": r"""
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    char buf[64];
    write(1, "ready\n", 6);
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT);
    for (;;) {
        long n = syscall(SYS_read, 0, buf, sizeof buf);
        if (n <= 0) syscall(SYS_exit, 0);
        syscall(SYS_write, 1, buf, n);
    }
}
""",
    # a filter in a second thread only (prctl fails there with errno 1234),
    # the main thread echoes its stdin
    "thread-filter": r"""
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
static void *filtered(void *arg) {
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_prctl, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 1234),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof f / sizeof f[0], f};
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
    for (;;) pause();
}
int main(void) {
    pthread_t t;
    char buf[64];
    pthread_create(&t, NULL, filtered, NULL);
    usleep(100000);
    write(1, "ready\n", 6);
    for (;;) {
        long n = read(0, buf, sizeof buf);
        if (n <= 0) return 0;
        write(1, buf, n);
    }
}
""",
}


@pytest.mark.parametrize("kind", sorted(SECCOMP_PROGRAMS))
def test_seccomp_is_refused_before_anything_runs_in_the_task(procs, tmp_path, kind):
    """A thread that one injected syscall would kill (strict mode) or that a
    filter answers for: crcheckpoint refuses it (exit 6, the support row
    named) before it runs anything there; the program goes on unharmed."""
    require_root()
    from helpers import build_c
    prog = build_c(tmp_path, kind.replace("-", "_"), SECCOMP_PROGRAMS[kind])
    if kind == "thread-filter":
        subprocess.run(["gcc", "-O1", "-pthread", "-o", prog, f"{prog}.c"], check=True)
    out = tmp_path / "out"
    r, w = os.pipe()
    proc = procs.spawn([prog], stdin=r, stdout=out, close_fds=True)
    os.close(r)
    try:
        wait_for_line(out, r"^ready$", proc=proc, timeout=10)
        res = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(tmp_path / "s.cr")],
                             capture_output=True, text=True, timeout=60, close_fds=True)
        assert res.returncode == 6, res.stderr
        key = "seccomp strict mode" if kind == "strict" else "seccomp filter mode"
        assert key in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "s.cr").exists()
        assert proc.poll() is None, "the checkpoint killed its target"
        os.write(w, b"still here\n")
        wait_for_line(out, r"^still here$", proc=proc, timeout=10)
    finally:
        os.close(w)
    assert proc.wait(timeout=10) == 0
