"""Restart state that needs a real process to show it: threads that synchronise
(samples/mt_sync.c), per-process and per-thread kernel state
(samples/procstate.c), crrestart's exit status, --force-files, --status
without the binfmt rule, and the default restore mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import build_c, require_root, require_tool, wait_for_line
from test_restart import REPO, checkpoint, finish, reference, restart


def wait_restored(pid: int, exe, crrestart, timeout: float = 30) -> None:
    """Wait until `pid` runs `exe` again and nobody traces it (the restore is
    over), while crrestart is still in the foreground."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.readlink(f"/proc/{pid}/exe") == str(exe):
                with open(f"/proc/{pid}/status") as f:
                    tracer = [ln.split()[1] for ln in f if ln.startswith("TracerPid:")][0]
                if tracer == "0":
                    return
        except (OSError, IndexError):
            pass
        if crrestart.poll() is not None:
            code, err = finish(crrestart)
            raise AssertionError(f"crrestart exited ({code}) before pid {pid} ran again: {err}")
        assert time.monotonic() < deadline, f"pid {pid} not restored after {timeout}s"
        time.sleep(0.02)


def json_line(err: str) -> dict:
    lines = [ln for ln in err.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, f"no JSON line from crrestart --json: {err!r}"
    return json.loads(lines[0])


# ------------------------------------------------------------------ mt_sync

@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_mt_sync_mutex_condvar_join(sample_bin, procs, tmp_path, mode):
    """Producer, two consumers and main wait on condition variables and
    mutexes when frozen; after the restart they go on handing values round,
    main creates and joins a helper thread every tick and joins them all at
    the end: the output is the uninterrupted run's, byte for byte."""
    require_root()
    out, err, cr = tmp_path / "sync.out", tmp_path / "sync.err", tmp_path / "sync.cr"
    p = procs.spawn([sample_bin / "mt_sync", 60, 50], stdout=out, stderr=err)
    wait_for_line(out, r"^tick 10 ", proc=p, timeout=30)
    checkpoint(p.pid, cr, proc=p)
    code, rerr = finish(restart(procs, cr, mode))
    assert code == 0, rerr + err.read_text()
    ref = reference([sample_bin / "mt_sync", 60, 0], tmp_path)
    assert out.read_bytes() == ref
    assert ref.decode().splitlines()[-1].startswith("joined consumed=2220 ")


# ---------------------------------------------------------------- procstate

def _run_procstate(sample_bin, procs, tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    p = procs.spawn([sample_bin / "procstate", d], stdout=out, stderr=err)
    wait_for_line(out, r"^ready$", proc=p, timeout=30)
    return d, out, err, p


@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_procstate_survives_restart(sample_bin, procs, tmp_path, mode):
    """Checkpointed while it waits for DIR/go: umask, cwd, RLIMIT_NOFILE,
    itimer, sigaltstacks, per-thread masks, pending signals (process-wide and
    per thread, with their siginfo), fds (directory, devices, O_APPEND,
    FD_CLOEXEC, offsets), MADV_DONTFORK/DONTDUMP/WIPEONFORK and vector
    registers are what they were, and behave as they did."""
    require_root()
    exe = sample_bin / "procstate"
    ref_dir, ref_out, _, ref_p = _run_procstate(sample_bin, procs, tmp_path, "ref")
    (ref_dir / "go").touch()
    assert ref_p.wait(timeout=30) == 0
    ref = ref_out.read_text()

    d, out, err, p = _run_procstate(sample_bin, procs, tmp_path, "run")
    checkpoint(p.pid, tmp_path / "ps.cr", proc=p)
    r = restart(procs, tmp_path / "ps.cr", mode)
    wait_restored(p.pid, exe, r)
    (d / "go").touch()
    code, rerr = finish(r)
    assert code == 0, rerr + err.read_text()
    got = out.read_text()

    # every piece of state read back after the restart is what it was before
    before = [ln[len("before "):] for ln in got.splitlines() if ln.startswith("before ")]
    after = [ln[len("after "):] for ln in got.splitlines() if ln.startswith("after ")]
    assert before and after == before
    # what the restored state does, spelled out (the reference shows the same)
    lines = got.splitlines()
    for want in [
        "main tid_same=1 blocked=10,28,37 pending=10,37 altstack_sp_ok=1 size=65536 flags=0",
        "t2 tid_same=1 blocked=10,12,17,36,37 pending=10,12,36,37 altstack_sp_ok=1 "
        "size=32768 flags=0",
        "itimer interval=1000.000000 left_ok=1", "umask=027", "cwd_is_dir=1",
        "nofile soft=123 hard_same=1",
        "fd 3 cloexec=0 acc=0 append=0 directory=1 dir",
        "fd 4 cloexec=0 acc=0 append=0 directory=0 chr=1:5",
        "fd 5 cloexec=0 acc=0 append=0 directory=0 chr=1:9",
        "fd 6 cloexec=0 acc=0 append=0 directory=0 chr=1:8",
        "fd 7 cloexec=0 acc=1 append=1 directory=0 reg size=11 pos=6",
        "fd 8 cloexec=0 acc=1 append=0 directory=0 reg size=11 pos=11",
        "fd 9 cloexec=1 acc=0 append=0 directory=0 reg size=8 pos=3",
    ]:
        assert "after " + want in lines, want
    for prefix in ["after map dontfork vmflags=dc ", "after map dontdump vmflags=dd ",
                   "after map wipeonfork vmflags=wf "]:
        assert any(ln.startswith(prefix) for ln in lines), prefix
    for want in [
        "dirfd fchdir_ok=1 entries=2 a b a=A",
        "dev zero_read=1 urandom_read=1 random_read=1",
        "append wrote=7 pos=18 content=first|more|second|",
        "cloexec file rest=exec",
        "nofile dup2_above_limit=-1 errno=Bad file descriptor",
        "fork child dontfork_absent=1 wipeonfork_zero=1 dontdump_copied=1",
        "signal 10 thread=main code=0 value=0 from_self=1 onstack=1 in_altstack=1",
        "signal 37 thread=main code=-1 value=777 from_self=1 onstack=1 in_altstack=1",
        "signal 12 thread=t2 code=-6 value=0 from_self=1 onstack=1 in_altstack=1",
        "signal 36 thread=t2 code=-1 value=4242 from_self=1 onstack=1 in_altstack=1",
        "t2 after unblock: tid_same=1 blocked=10,17,37 pending=- altstack_sp_ok=1 "
        "size=32768 flags=0",
        "done",
    ]:
        assert want in lines, want
    # the vector registers held across the wait (-1: this CPU has no AVX)
    assert ("vector registers kept=1" in lines) == ("vector registers kept=1" in ref)
    assert "vector registers kept=0" not in lines
    assert (d / "app.log").read_text() == "first\nmore\nsecond\n"
    # and the whole output is the uninterrupted run's
    assert got == ref


# -------------------------------------------------------- crrestart's status

EXITER = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long ticks = atol(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (long n = 1; n <= ticks; n++) {
        printf("tick %ld\n", n);
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    printf("end %s\n", argv[2]);
    if (strcmp(argv[2], "term") == 0)
        kill(getpid(), SIGTERM);
    return 7;
}
"""


@pytest.mark.parametrize("how,ref_code,want", [("exit", 7, 7), ("term", -15, 128 + 15)])
def test_foreground_exit_status(procs, tmp_path, how, ref_code, want):
    """In the foreground crrestart exits with the restored root's status:
    its exit code, or 128+N when signal N killed it (restorer/cli.py, RESTORE.md)."""
    require_root()
    exe = build_c(tmp_path, "exiter", EXITER)
    out, cr = tmp_path / "ex.out", tmp_path / "ex.cr"
    p = procs.spawn([exe, 60, how], stdout=out)
    wait_for_line(out, r"^tick 5$", proc=p)
    checkpoint(p.pid, cr, proc=p)
    code, err = finish(restart(procs, cr))
    assert code == want, err
    ref = subprocess.run([exe, "60", how], capture_output=True, timeout=60)
    assert ref.returncode == ref_code
    assert out.read_bytes() == ref.stdout


HOLDER = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    long ticks = atol(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int fd = open(argv[2], O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    for (long n = 1; n <= ticks; n++) {
        char buf[32];
        ssize_t r = pread(fd, buf, sizeof buf - 1, 0);
        printf("tick %ld data=%.*s\n", n, r > 0 ? (int)r : 0, buf);
        struct timespec ts = {0, 50 * 1000000L};
        nanosleep(&ts, NULL);
    }
    printf("done\n");
    return 0;
}
"""


def test_force_files(procs, tmp_path):
    """A file the process holds changed after the checkpoint: refused in one
    line naming it; with --force-files restored with a warning naming it, and
    the process reads the file's new content and runs to its end."""
    require_root()
    exe = build_c(tmp_path, "holder", HOLDER)
    data, out, cr = tmp_path / "data.txt", tmp_path / "hold.out", tmp_path / "hold.cr"
    data.write_text("old")
    p = procs.spawn([exe, 60, data], stdout=out)
    wait_for_line(out, r"^tick 5 ", proc=p)
    checkpoint(p.pid, cr, proc=p)
    data.write_text("new-content")

    code, err = finish(restart(procs, cr))
    assert code == 3
    assert len(err.strip().splitlines()) == 1, err
    assert str(data) in err and "--force-files" in err

    code, err = finish(restart(procs, cr, "--force-files"))
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("crrestart: warning:")]
    assert any(str(data) in ln for ln in warnings), err
    lines = out.read_text().splitlines()
    assert lines[-1] == "done"
    ticks = [ln for ln in lines if ln.startswith("tick ")]
    assert [ln.split()[1] for ln in ticks] == [str(n) for n in range(1, 61)]
    assert ticks[0] == "tick 1 data=old" and ticks[-1] == "tick 60 data=new-content"


@pytest.mark.parametrize("flags,setup,text", [
    # binfmt_misc unmounted, in a mount namespace of the test's own
    (["--mount", "--propagation", "private"],
     "while umount /proc/sys/fs/binfmt_misc 2>/dev/null; do :; done; "
     "! test -e /proc/sys/fs/binfmt_misc/register",
     "not registered (binfmt_misc is not mounted)"),
    # mounted with no rule: a new user namespace gets a binfmt_misc instance of
    # its own (kernel >= 6.7)
    (["--user", "--map-root-user", "--mount"],
     "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && "
     "test -e /proc/sys/fs/binfmt_misc/register && ! test -e /proc/sys/fs/binfmt_misc/crelf",
     "not registered"),
], ids=["unmounted", "no-rule"])
def test_status_without_rule(flags, setup, text):
    """crrestart --status says the rule is not installed and exits 1 (0 only
    when it is installed and enabled: restorer/cli.py).  Run in namespaces of
    the test's own, so a rule another test installs meanwhile does not count."""
    require_root()
    unshare = require_tool("unshare")
    script = f"{{ {setup}; }} && exec {sys.executable} -m restorer.cli --status"
    r = subprocess.run([unshare, *flags, "sh", "-c", script], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.splitlines() == [text], r.stdout + r.stderr
    assert r.stderr == ""


# ------------------------------------------------------------- default mode

def test_default_mode_small_is_eager(sample_bin, procs, tmp_path):
    """Neither --eager nor --lazy: a process below AUTO_LAZY_BYTES of
    anonymous memory is restored eagerly (docs/RESTORE.md)."""
    require_root()
    out, cr = tmp_path / "tick.out", tmp_path / "small.cr"
    p = procs.spawn([sample_bin / "ticker", 60, 4, 50], stdout=out)
    wait_for_line(out, r"^tick 5 ", proc=p)
    checkpoint(p.pid, cr, proc=p)
    code, err = finish(restart(procs, cr, "--json"))
    assert code == 0, err
    assert json_line(err)["mode"] == "eager"
    assert out.read_bytes() == reference([sample_bin / "ticker", 60, 4, 0], tmp_path)


def test_default_mode_big_is_lazy(sample_bin, procs, tmp_path):
    """Above AUTO_LAZY_BYTES (root, one task) the default is lazy."""
    require_root()
    from restorer.restart import AUTO_LAZY_BYTES
    mib = (AUTO_LAZY_BYTES >> 20) + 8
    out, cr = tmp_path / "tick.out", tmp_path / "big.cr"
    p = procs.spawn([sample_bin / "ticker", 15, mib, 200], stdout=out)
    wait_for_line(out, r"^tick 4 ", proc=p, timeout=60)
    checkpoint(p.pid, cr, proc=p)
    code, err = finish(restart(procs, cr, "--json"), timeout=120)
    assert code == 0, err
    assert json_line(err)["mode"] == "lazy"
    assert out.read_bytes() == reference([sample_bin / "ticker", 15, mib, 0], tmp_path)
