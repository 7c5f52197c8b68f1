"""Trees whose sessions or process groups outlived their leaders: a child
subreaper that adopted a daemon (double fork: the middle process led a new
session and exited), a process group whose leader exited and was reaped (the
first command of a pipeline), and one whose leader is an unreaped zombie.
Each is checkpointed with --kill mid-run and restarted; the output (every
task checks its parent, session and group each tick, and the root reaps them
all) is compared with an uninterrupted run, writer by writer."""
from __future__ import annotations

import sys

from helpers import descendants, read_lines, require_root, wait_for_line
from test_tree import checkpoint_tree, finish, per_process, reap, restart, stat_ids

ORPHANS = r"""
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)                     # PR_SET_CHILD_SUBREAPER
root = os.getpid()

def ticker(name, n, leader):
    sid, pgid = os.getsid(0), os.getpgid(0)
    for i in range(1, n + 1):
        time.sleep(0.05)
        os.write(1, f"{name} tick {i} parent-is-root={os.getppid() == root} "
                    f"sid-kept={os.getsid(0) == sid} pgid-kept={os.getpgid(0) == pgid} "
                    f"led-by-gone={pgid == leader}\n".encode())
    os._exit(0)

def fork(fn):
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(1)
    return pid

# 1. a daemon: the middle process leads a new session, forks, exits
def middle():
    os.setsid()
    fork(lambda: (time.sleep(0.2), ticker("daemon", 60, os.getsid(0))))
    os._exit(0)
b = fork(middle)
os.waitpid(b, 0)

def group(name, leader_lives, status):
    # a process group: its leader exits after leader_lives seconds, and a
    # member (ticking as `name`) that joined it
    lead = fork(lambda: (os.setpgid(0, 0), time.sleep(leader_lives), os._exit(status)))
    os.setpgid(lead, lead)
    m = fork(lambda: (os.setpgid(0, lead), ticker(name, 60, lead)))
    try:
        os.setpgid(m, lead)             # from both sides, as shells do
    except OSError:
        pass
    return lead, m

# 2. a group whose leader exits and is reaped (a pipeline's first command)
lead, m = group("member", 0.3, 3)
os.write(1, f"leader exited {os.waitstatus_to_exitcode(os.waitpid(lead, 0)[1])}\n".encode())

# 3. a group whose leader is a zombie nobody reaped yet
zl, m2 = group("zmember", 0.1, 5)
time.sleep(0.4)
os.write(1, b"ready\n")
for i in range(1, 71):
    time.sleep(0.05)
    os.write(1, f"root tick {i}\n".encode())
os.write(1, f"zombie leader {os.waitstatus_to_exitcode(os.waitpid(zl, 0)[1])}\n".encode())
names = {m: "member", m2: "zmember"}
got = []
while True:
    try:
        pid, st = os.wait()
    except ChildProcessError:
        break
    got.append(f"{names.get(pid, 'daemon')}={os.waitstatus_to_exitcode(st)}")
os.write(1, ("reaped " + " ".join(sorted(got)) + "\n").encode())
"""


def _run(procs, tmp_path, name, interrupt: bool) -> list[str]:
    prog = tmp_path / "orphans.py"
    prog.write_text(ORPHANS)
    out = tmp_path / f"{name}.out"
    proc = procs.spawn([sys.executable, prog], stdout=out)
    wait_for_line(out, r"^ready$", proc=proc)
    if interrupt:
        wait_for_line(out, r"^root tick 5$", proc=proc)
        pids = [proc.pid, *descendants(proc.pid)]
        before = {p: stat_ids(p) for p in pids}
        # the daemon's session and the two groups have no live leader
        sids = {s[2] for s in before.values()} - set(pids)
        pgids = {s[1] for p, s in before.items() if s[3] != "Z"} - {
            p for p, s in before.items() if s[3] != "Z"}
        assert len(sids) == 1 and len(pgids) == 3, before
        checkpoint_tree(proc, tmp_path / f"{name}.cr")
        reap([p for p, s in before.items() if s[3] == "Z"])   # pytest is a subreaper
        r = restart(procs, tmp_path / f"{name}.cr", "--detach")
        code, err = finish(r)
        assert code == 0, err
        after = {p: stat_ids(p) for p in pids}
        assert after == {p: (s[0], s[1], s[2], after[p][3]) for p, s in before.items()}
        assert [p for p, s in after.items() if s[3] == "Z"] == \
            [p for p, s in before.items() if s[3] == "Z"]
    wait_for_line(out, r"^reaped ", timeout=60)
    reap([proc.pid])
    return read_lines(out)


def test_adopted_daemon_and_groups_without_leaders(procs, tmp_path):
    """After the restart the daemon is the subreaper's child again in its
    leaderless session, the group members are in their leaderless groups,
    the zombie group leader is a zombie, and everyone runs on as in an
    uninterrupted run."""
    require_root()
    expected = _run(procs, tmp_path, "plain", interrupt=False)
    got = _run(procs, tmp_path, "restarted", interrupt=True)
    assert per_process(got) == per_process(expected)
    assert "reaped daemon=0 member=0 zmember=0" in got
    assert "zombie leader 5" in got and "leader exited 3" in got
    assert all("parent-is-root=True sid-kept=True pgid-kept=True led-by-gone=True" in line
               for line in got if " tick " in line and not line.startswith("root"))
