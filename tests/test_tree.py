"""Process trees and pipes restarted (docs/TREE.md): checkpoint real trees
with --kill mid-run, restart them, and compare the output with an
uninterrupted run byte for byte (per process where their lines interleave)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import children, descendants, pid_alive, read_lines, require_root, wait_for_line

from statefile.format import reader
from test_restart import finish as _finish

BIN = Path(sys.executable).parent
CRCHECKPOINT = str(BIN / "crcheckpoint")
CRRESTART = [sys.executable, "-m", "restorer.cli"]
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ helpers

def checkpoint_tree(proc, out: Path, kill: bool = True, keep=()) -> dict:
    """crcheckpoint the tree of proc; with --kill, reap every task of the old
    tree but `keep` (pytest is their subreaper: a zombie keeps its pid)."""
    argv = [CRCHECKPOINT, str(proc.pid), "-o", str(out), "--json"] + (["--kill"] if kill else [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crcheckpoint failed ({r.returncode}): {r.stderr}"
    summary = json.loads(r.stdout)
    if kill:
        proc.wait(timeout=10)
        reap([p for p in summary["pids"] if p not in keep])
    return summary


def reap(pids) -> None:
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                if not pid_alive(pid) and not os.path.exists(f"/proc/{pid}"):
                    break
            time.sleep(0.01)


def restart(procs, statefile: Path, *args, stdout=None, env=None):
    return procs.spawn([*CRRESTART, *args, str(statefile)], stdout=stdout,
                       stderr=subprocess.PIPE, cwd=REPO, env=env)


def finish(proc, timeout: float = 120) -> tuple[int, str]:
    return _finish(proc, timeout)


def per_process(lines: list[str]) -> dict[str, list[str]]:
    """Lines grouped by their writer ("parent", "child 1", ...), in order."""
    out: dict[str, list[str]] = {}
    for line in lines:
        who = line.split(" tick ")[0] if " tick " in line else "final"
        out.setdefault(who, []).append(line)
    return out


def stat_ids(pid: int) -> tuple[int, int, int, str]:
    """(ppid, pgid, sid, state) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        s = f.read()
    fields = s[s.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[2]), int(fields[3]), fields[0].decode()


# -------------------------------------------------------------------- tests

def test_tree_sample_parent_reaps_restored_children(sample_bin, procs, tmp_path):
    """Parent + 2 children, killed mid-run and restarted: every process's ticks
    go on without a gap, and the parent's waitpid() gets its restored
    children's exit statuses (11 and 12)."""
    require_root()
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree", 30], stdout=out)
    wait_for_line(out, r"child 2 tick 8", proc=proc)
    summary = checkpoint_tree(proc, tmp_path / "tree.cr")
    assert len(summary["pids"]) == 3
    code, err = finish(restart(procs, tmp_path / "tree.cr"))
    assert code == 0, err
    ref = tmp_path / "ref.out"
    with open(ref, "wb") as f:
        subprocess.run([sample_bin / "tree", "30"], stdout=f, check=True, timeout=60)
    got, want = read_lines(out), read_lines(ref)
    assert got[-2:] == ["child 1 exited 11", "child 2 exited 12"], got[-5:]
    assert per_process(got) == per_process(want)
    assert sorted(got) == sorted(want)


# ~0.45 s per million lines on this machine's CPUs (3 million ended before
# the checkpoint 0.3 s after the start, one run in three): long enough that
# the checkpoint always comes mid-stream
PIPELINE = "seq 1 12000000 | awk '{ s += $1; if ($1 % 1000 == 0) print $1, s }' | gzip -1 -c"


def test_shell_pipeline_killed_mid_stream(procs, tmp_path):
    """sh + seq + awk + gzip with --kill mid-stream: the restarted pipeline
    writes exactly the bytes of an uninterrupted run."""
    require_root()
    ref = subprocess.run(["sh", "-c", PIPELINE], capture_output=True, timeout=120).stdout
    out = tmp_path / "p.gz"
    proc = procs.spawn(["sh", "-c", PIPELINE], stdout=out)
    time.sleep(0.3)
    assert proc.poll() is None, "the pipeline finished before the checkpoint"
    summary = checkpoint_tree(proc, tmp_path / "p.cr")
    assert len(summary["pids"]) == 4
    sf = reader.load(str(tmp_path / "p.cr"))
    assert {t.comm for t in sf.tasks} == {"sh", "seq", "awk", "gzip"}
    code, err = finish(restart(procs, tmp_path / "p.cr"))
    assert code == 0, err
    assert out.read_bytes() == ref


SLOW_READER = ("seq 1 60000 | awk '{ print $1 * 2; if (NR % 1000 == 0) system(\"sleep 0.05\") }'")


def test_bytes_in_flight_in_a_pipe(procs, tmp_path):
    """A fast writer and a slow reader: the pipe is full when the tree is
    frozen; its bytes are saved without being consumed and are in the
    restored pipe."""
    require_root()
    ref = subprocess.run(["sh", "-c", SLOW_READER], capture_output=True, timeout=120).stdout
    out = tmp_path / "slow.out"
    proc = procs.spawn(["sh", "-c", SLOW_READER], stdout=out)
    time.sleep(0.8)
    assert proc.poll() is None
    checkpoint_tree(proc, tmp_path / "slow.cr")
    sf = reader.load(str(tmp_path / "slow.cr"))
    pipes = [f for f in sf.files if f.kind == "pipe"]
    in_flight = [f.pipe.unread for f in pipes if f.blob is not None]
    assert in_flight and in_flight[0] > 4096, [f.pipe for f in pipes]
    assert reader.verify(sf) == []
    code, err = finish(restart(procs, tmp_path / "slow.cr"))
    assert code == 0, err
    assert out.read_bytes() == ref


GROUPS = r"""
import os, sys, time
def ticker(name, n=60):
    for i in range(1, n + 1):
        time.sleep(0.05)
        os.write(1, f"{name} tick {i}\n".encode())   # one write per line
    os._exit(0)
def fork(fn):
    pid = os.fork()
    if pid == 0:
        fn()
    return pid
def a():                       # own process group, with a child in it
    os.setpgid(0, 0)
    fork(lambda: ticker("a1"))
    ticker("a")
a_pid = fork(a)
time.sleep(0.2)
def b():                       # own session
    os.setsid()
    ticker("b")
b_pid = fork(b)
def c():                       # joins a's group
    os.setpgid(0, a_pid)
    ticker("c")
c_pid = fork(c)
os.write(1, f"pids {a_pid} {b_pid} {c_pid}\n".encode())
for _ in range(3):
    pid, st = os.wait()
ticker("parent", 70)
"""


def test_sessions_and_process_groups(procs, tmp_path):
    """A session leader, a child in its own group (with a grandchild), a child
    in its own session and a child that joined its sibling's group: pgid and
    sid of every task are the saved ones after the restart."""
    require_root()
    prog = tmp_path / "groups.py"
    prog.write_text(GROUPS)
    out = tmp_path / "g.out"
    proc = procs.spawn([sys.executable, prog], stdout=out)
    wait_for_line(out, r"^pids ", proc=proc)
    wait_for_line(out, r"^c tick 3$", proc=proc)
    pids = [proc.pid, *descendants(proc.pid)]
    before = {p: stat_ids(p)[:3] for p in pids}
    assert len({s[2] for s in before.values()}) == 2       # two sessions
    assert len({s[1] for s in before.values()}) == 3       # three groups
    checkpoint_tree(proc, tmp_path / "g.cr")
    r = restart(procs, tmp_path / "g.cr", "--detach")
    code, err = finish(r)
    assert code == 0, err
    after = {p: stat_ids(p)[:3] for p in pids}
    assert {p: s[1:] for p, s in after.items()} == {p: s[1:] for p, s in before.items()}
    assert {p: s[0] for p, s in after.items() if p != proc.pid} == \
        {p: s[0] for p, s in before.items() if p != proc.pid}
    wait_for_line(out, r"^parent tick 70$", timeout=30)
    for name in ("a", "a1", "b", "c"):
        ticks = [line for line in read_lines(out) if line.startswith(f"{name} tick ")]
        assert ticks == [f"{name} tick {i}" for i in range(1, 61)], name


ZOMBIE = r"""
import os, time
kid = os.fork()
if kid == 0:
    os._exit(7)
print(f"kid {kid}", flush=True)
for i in range(1, 31):
    time.sleep(0.05)
    print(f"tick {i}", flush=True)
pid, st = os.waitpid(kid, 0)
print(f"reaped {pid == kid} status {os.waitstatus_to_exitcode(st)}", flush=True)
"""


def test_zombie_child_recreated(procs, tmp_path):
    """An exited child not reaped yet comes back as a zombie with its exit
    status: the restored parent's waitpid() gets 7."""
    require_root()
    prog = tmp_path / "zombie.py"
    prog.write_text(ZOMBIE)
    out = tmp_path / "z.out"
    proc = procs.spawn([sys.executable, prog], stdout=out)
    kid = int(wait_for_line(out, r"^kid ", proc=proc).split()[1])
    wait_for_line(out, r"^tick 5$", proc=proc)
    assert stat_ids(kid)[3] == "Z"
    checkpoint_tree(proc, tmp_path / "z.cr")
    sf = reader.load(str(tmp_path / "z.cr"))
    assert [z.pid for z in sf.header.zombies] == [kid]
    reap([kid])
    r = restart(procs, tmp_path / "z.cr", "--detach")
    code, err = finish(r)
    assert code == 0, err
    ppid, _, _, state = stat_ids(kid)
    assert (ppid, state) == (proc.pid, "Z")
    wait_for_line(out, r"^reaped ", timeout=30)
    lines = read_lines(out)
    assert lines[1:] == [f"tick {i}" for i in range(1, 31)] + ["reaped True status 7"]
    reap([proc.pid])


def test_leave_running_tree_restored_beside_it_in_a_pid_namespace(sample_bin, procs,
                                                                   tmp_path):
    """Without --kill the tree runs on; --pidns restores a copy with the same
    pids (inside its namespace), and both finish normally."""
    require_root()
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree", 20], stdout=open(out, "ab"))  # both copies append
    wait_for_line(out, r"child 2 tick 3", proc=proc)
    summary = checkpoint_tree(proc, tmp_path / "tree.cr", kill=False)
    pids = summary["pids"]       # (the children may finish while we restart)
    assert len(pids) == 3 and proc.pid in pids
    r = restart(procs, tmp_path / "tree.cr", "--pidns", "--force-files", "--json", "--detach")
    code, err = finish(r)
    assert code == 0, err
    info = json.loads(err.strip().splitlines()[-1])
    assert sorted(int(p) for p in info["tasks"]) == sorted(pids)
    for saved, host in info["tasks"].items():
        with open(f"/proc/{host}/status") as f:
            nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        assert int(nspid[-1]) == int(saved) and host != int(saved)
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 30
    while pid_alive(info["init_pid"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines = read_lines(out)
    # Both copies wrote into the same file: two of each final line.
    assert lines.count("child 1 exited 11") == 2 and lines.count("child 2 exited 12") == 2


@pytest.mark.parametrize("step", ["registers", "task setup"])
def test_tree_failure_leaves_nothing(sample_bin, procs, tmp_path, step):
    """A failure anywhere (injected while rebuilding the tasks, or in the
    children while the tree is being forked) kills the whole restored tree
    and names the step in one line."""
    require_root()
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree", 0], stdout=out)
    wait_for_line(out, r"child 2 tick 3", proc=proc)
    checkpoint_tree(proc, tmp_path / "tree.cr")
    env = dict(os.environ, CRELF_RESTORE_FAIL_AT=step)
    code, err = finish(restart(procs, tmp_path / "tree.cr", env=env))
    assert code == 3
    assert err.strip().splitlines() == [f"crrestart: failed at {step}: failure injected by "
                                        "CRELF_RESTORE_FAIL_AT"]
    time.sleep(0.3)
    assert [c for c in children(os.getpid()) if pid_alive(c)] == []


CHANNEL = r"""
import fcntl, os, select, sys, time
mode, fifo, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "fifo":
    os.mkfifo(fifo)
    # The reader opens before the writer does: a FIFO reader sees end-of-file
    # in poll() only from writers that opened after it.
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
else:
    r, w = os.pipe()
fcntl.fcntl(r, 1031, 1 << 17)               # F_SETPIPE_SZ: 128 KiB
kid = os.fork()
if kid == 0:                                # writer: as fast as the pipe takes it
    os.close(r)
    if mode == "fifo":
        w = os.open(fifo, os.O_WRONLY)
    for i in range(1, n + 1):
        os.write(w, f"{i}\n".encode())
    os._exit(0)
if mode != "fifo":
    os.close(w)
    fl = fcntl.fcntl(r, fcntl.F_GETFL)
    fcntl.fcntl(r, fcntl.F_SETFL, fl | os.O_NONBLOCK)
os.write(2, f"reader fd {r}\n".encode())
while True:                                 # reader: slow, non-blocking
    select.select([r], [], [])
    try:
        data = os.read(r, 2048)
    except BlockingIOError:
        continue
    if not data:
        break
    os.write(1, data)
    time.sleep(0.005)
os.waitpid(kid, 0)
"""


def _fd_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        return int(next(line.split()[1] for line in f if line.startswith("flags:")), 8)


def _pipe_size(pid: int, fd: int) -> int:
    import fcntl
    pidfd = os.pidfd_open(pid)
    try:
        from statefile.control import ptrace as pt
        dup = pt.syscall(pt.NR_pidfd_getfd, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    try:
        return fcntl.fcntl(dup, 1032)           # F_GETPIPE_SZ
    finally:
        os.close(dup)


@pytest.mark.parametrize("mode", ["pipe", "fifo"])
def test_pipe_or_fifo_size_nonblock_and_bytes_in_flight(procs, tmp_path, mode):
    """A writer child filling a 128 KiB pipe (or FIFO) and a slow non-blocking
    reader: after --kill and restart the pipe has its size, the reader end
    is still O_NONBLOCK, and the output is that of an uninterrupted run."""
    require_root()
    prog = tmp_path / "channel.py"
    prog.write_text(CHANNEL)
    n = 120000
    ref = subprocess.run([sys.executable, prog, mode, tmp_path / "ref.fifo", str(n)],
                         capture_output=True, timeout=120).stdout
    assert ref == b"".join(f"{i}\n".encode() for i in range(1, n + 1))
    out, err = tmp_path / "c.out", tmp_path / "c.err"
    proc = procs.spawn([sys.executable, prog, mode, tmp_path / "c.fifo", str(n)], stdout=out,
                       stderr=err)
    rfd = int(wait_for_line(err, r"^reader fd ", proc=proc).split()[2])
    time.sleep(0.5)
    assert proc.poll() is None
    checkpoint_tree(proc, tmp_path / "c.cr")
    sf = reader.load(str(tmp_path / "c.cr"))
    chan = [f for f in sf.files if f.kind == mode]
    assert chan and all(f.pipe.size == 1 << 17 for f in chan)
    held = next(f for f in chan if f.blob is not None)
    assert held.pipe.unread > 65536          # more than a default pipe holds
    r = restart(procs, tmp_path / "c.cr", "--detach")
    code, e = finish(r)
    assert code == 0, e
    assert _fd_flags(proc.pid, rfd) & os.O_NONBLOCK
    assert _pipe_size(proc.pid, rfd) == 1 << 17
    deadline = time.monotonic() + 60
    while pid_alive(proc.pid):
        assert time.monotonic() < deadline, "the restored reader did not finish"
        time.sleep(0.05)
    assert out.read_bytes() == ref


def test_restarted_tree_checkpointed_again(sample_bin, procs, tmp_path):
    """Checkpoint, restart (--detach), checkpoint the restarted tree again,
    restart: the parent still gets both children's statuses."""
    require_root()
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree", 30], stdout=out)
    wait_for_line(out, r"child 2 tick 5", proc=proc)
    first = checkpoint_tree(proc, tmp_path / "r1.cr")
    code, err = finish(restart(procs, tmp_path / "r1.cr", "--detach"))
    assert code == 0, err
    wait_for_line(out, r"child 2 tick 12", timeout=20)
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(tmp_path / "r2.cr"), "--kill"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    reap(first["pids"])
    code, err = finish(restart(procs, tmp_path / "r2.cr"))
    assert code == 0, err
    lines = read_lines(out)
    assert lines[-2:] == ["child 1 exited 11", "child 2 exited 12"]
    for who in ("parent", "child 1", "child 2"):
        assert [line for line in lines if line.startswith(f"{who} tick")] == \
            [f"{who} tick {i}" for i in range(1, 31)], who


def test_pipeline_unprivileged(procs):
    """User 65534 checkpoints its own pipeline and restarts it (crrestart
    then works inside its own user + pid namespace)."""
    require_root()
    import shutil
    import tempfile
    from test_restart_unpriv import NOBODY, _python_for_nobody, as_nobody
    py, env = _python_for_nobody()
    d = Path(tempfile.mkdtemp(prefix="crelf-tree-unpriv-"))
    try:
        os.chmod(d, 0o755)
        os.chown(d, NOBODY, NOBODY)
        out, errf = d / "p.gz", d / "p.err"
        for f in (out, errf):
            f.touch()
            os.chown(f, NOBODY, NOBODY)
        ref = subprocess.run(["sh", "-c", PIPELINE], capture_output=True, timeout=120).stdout
        proc = procs.spawn(as_nobody("sh", "-c", PIPELINE), stdout=out, stderr=errf, cwd=d)
        time.sleep(0.3)
        assert proc.poll() is None
        cr = d / "p.cr"
        pids = [proc.pid, *descendants(proc.pid)]
        r = subprocess.run(as_nobody(py, "-m", "statefile.cli", proc.pid, "-o", cr, "--kill"),
                           capture_output=True, text=True, env=env, cwd=d, timeout=120)
        assert r.returncode == 0, r.stderr
        proc.wait(timeout=10)
        reap(pids)
        rr = procs.spawn(as_nobody(py, "-m", "restorer.cli", cr), stderr=subprocess.PIPE,
                         env=env, cwd=d)
        code, err = finish(rr)
        assert code == 0, err
        assert out.read_bytes() == ref
    finally:
        shutil.rmtree(d, ignore_errors=True)
