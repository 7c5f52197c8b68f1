"""Task attributes across a checkpoint and restart (tests/taskattrs.c):
scheduling policy, priority and nice per thread, oom_score_adj, login uid,
THP-disable, membarrier registrations, mlock()ed memory, fsuid/fsgid and
ambient capabilities, securebits, a SIGTSTP-stopped child, zombies killed by signals and a
zombie whose process group's leader was reaped.  Also the up-front refusals
for what a restart here could not set back (exit 6, nothing written)."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import require_root, wait_for_line
from test_restart import CRCHECKPOINT, checkpoint, finish, reap, restart
from test_restore_state import wait_restored

SRC = Path(__file__).resolve().parent / "taskattrs.c"
PR_CAPBSET_DROP = 24
CAP_SYS_NICE, CAP_SYS_RESOURCE = 23, 24


@pytest.fixture(scope="module")
def taskattrs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("taskattrs") / "taskattrs"
    subprocess.run(["gcc", "-O1", "-Wall", "-pthread", "-o", out, SRC], check=True)
    return out


def _lines(path: Path, phase: str) -> set[str]:
    return {ln.partition(" ")[2] for ln in path.read_text().splitlines()
            if ln.startswith(phase + " ")}


@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_task_attributes_survive_restart(taskattrs, procs, tmp_path, mode):
    require_root()
    d, out, cr = tmp_path / "d", tmp_path / "out", tmp_path / "attrs.cr"
    d.mkdir()
    p = procs.spawn([taskattrs, d], stdout=out, stderr=subprocess.STDOUT, close_fds=True)
    wait_for_line(out, r"^ready$", proc=p, timeout=30)
    before = _lines(out, "before")
    main = f"{p.pid}:"
    # the program did set what it is about
    for want in ("thread0=policy 1073741826 prio 3 nice 0",   # SCHED_RR|SCHED_RESET_ON_FORK
                 "thread1=policy 0 prio 0 nice 7", "thread2=policy 5 prio 0 nice 0",
                 "oom_score_adj=321", "loginuid=1234", "thp_disable=1",
                 "membarrier=0x14", "locked_vmflags=lo", "locked_data=42",
                 "stopped=pid 1 code 5 status 20",              # CLD_STOPPED by SIGTSTP
                 "zombie=1 code 2 status 9 pgid own",           # CLD_KILLED by SIGKILL
                 "zombie=3 code 1 status 0 pgid leader"):
        assert main + want in before, (want, sorted(before))
    creds = {ln.partition(":")[2] for ln in before if not ln.startswith(main)}
    assert "Uid:=1\t2\t3\t9" in creds and "Gid:=5\t6\t7\t8" in creds
    assert "CapAmb:=0000000000002000" in creds and "securebits=0x11" in creds, creds

    checkpoint(p.pid, cr, proc=p)
    from statefile.format import reader
    sf = reader.load(str(cr))
    for pid in [t.pid for t in sf.tasks[1:]] + [z.pid for z in sf.header.zombies]:
        reap(pid)       # killed with the tree, re-parented to us (a subreaper)
    r = restart(procs, cr, mode)
    wait_restored(p.pid, taskattrs, r)
    (d / "go").touch()
    code, err = finish(r)
    assert code == 0, err + out.read_text()
    assert _lines(out, "after") == before
    text = out.read_text()
    for want in ("reaped stopped exited 7", "reaped 0 exited 3", "reaped 1 signaled 9", "reaped 2 signaled 11",
                 "reaped 3 exited 0", "done"):
        assert f"\n{want}\n" in text, text
    assert "creds child status" not in text and "error" not in text


def _drop_cap_and_raise_oom(cap: int, oom: int | None):
    """preexec_fn: crcheckpoint without `cap` (bounding set: root's exec drops
    it), and with its own oom_score_adj raised."""
    libc = ctypes.CDLL(None, use_errno=True)

    def pre():
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0):
            os._exit(97)
        if oom is not None:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(str(oom))
    return pre


def _sleeper(procs, tmp_path, setup: str) -> subprocess.Popen:
    out = tmp_path / "sleeper.out"
    p = procs.spawn(["sh", "-c", f"{setup}; echo ready; exec sleep 600"], stdout=out,
                    close_fds=True)
    wait_for_line(out, r"^ready$", proc=p, timeout=10)
    time.sleep(0.05)    # exec'd sleep
    return p


def _refused(pid: int, cr: Path, cap: int, oom: int | None = None) -> str:
    res = subprocess.run([CRCHECKPOINT, str(pid), "-o", str(cr)], capture_output=True,
                         text=True, timeout=60, preexec_fn=_drop_cap_and_raise_oom(cap, oom),
                         close_fds=True)
    assert res.returncode == 6, res.stderr
    assert not cr.exists()
    os.kill(pid, 0)                      # the target is unharmed: still there
    with open(f"/proc/{pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] in "SR"
    return res.stderr


def test_oom_score_adj_below_crelfs_refused(procs, tmp_path):
    """Without CAP_SYS_RESOURCE a restart cannot lower oom_score_adj below its
    own: a target below crelf's own value is refused up front."""
    require_root()
    p = _sleeper(procs, tmp_path, "echo 100 > /proc/self/oom_score_adj")
    err = _refused(p.pid, tmp_path / "oom.cr", CAP_SYS_RESOURCE, oom=500)
    assert "oom_score_adj 100" in err and "CAP_SYS_RESOURCE" in err, err
    with open(f"/proc/{p.pid}/oom_score_adj") as f:
        assert f.read().strip() == "100"


def test_realtime_policy_without_cap_sys_nice_refused(procs, tmp_path):
    """A SCHED_FIFO task whose RLIMIT_RTPRIO is 0, checkpointed by a crelf
    without CAP_SYS_NICE: refused, the policy named."""
    require_root()
    p = _sleeper(procs, tmp_path, "ulimit -r 0")
    os.sched_setscheduler(p.pid, os.SCHED_FIFO, os.sched_param(2))
    try:
        err = _refused(p.pid, tmp_path / "rt.cr", CAP_SYS_NICE)
        assert "real-time priority 2" in err and "CAP_SYS_NICE" in err, err
        assert os.sched_getscheduler(p.pid) == os.SCHED_FIFO
    finally:
        os.kill(p.pid, signal.SIGKILL)
