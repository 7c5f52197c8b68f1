"""A tree in a pid namespace of its own (`unshare --pid --fork`, its root the
namespace's init, pid 1): crcheckpoint saves the ids the tasks see inside
(CR_HEADER namespaces `pid`, statefile/dump/ns.py) and crrestart restores it
in a new pid namespace whose init is the root itself, every task with its
inner pid, parent, process group and session, its thread with its inner tid,
its zombie with its pid (restorer/restore/ns.py, docs/TREE.md "Namespaces").
Outputs are compared byte for byte with an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import children, descendants, pid_alive, require_root, require_tool, wait_for_line
from test_restart_unpriv import _python_for_nobody, as_nobody, nobody_dir  # noqa: F401 (fixture)
from test_tree import BIN, CRCHECKPOINT, finish, reap, restart

from statefile.format import reader

# Every process prints, each tick, the ids it sees (deterministic inside a
# fresh pid namespace: root 1, zombie 2, child 3, grandchild 4, its thread
# 5; the root's parent, group and session are outside: 0), each into a file
# of its own; the root reaps its zombie only at the end.
PROG = r'''
import os, sys, threading, time

out, n = sys.argv[1], int(sys.argv[2])


def ids():
    return (f"pid {os.getpid()} ppid {os.getppid()} pgid {os.getpgid(0)} "
            f"sid {os.getsid(0)}")


def ticks(name, f):
    for i in range(n):
        f.write(f"{name} tick {i} {ids()}\n")
        time.sleep(0.05)


def thread_ticks(f):
    for i in range(n):
        f.write(f"thread tick {i} tid {threading.get_native_id()} {ids()}\n")
        time.sleep(0.05)


root = open(os.path.join(out, "root.out"), "w", buffering=1)
z = os.fork()
if z == 0:
    os._exit(5)                     # a zombie until the root reaps it
a = os.fork()
if a == 0:                          # child: a session of its own
    os.setsid()
    b = os.fork()
    if b == 0:                      # grandchild: a group of its own, and a thread
        os.setpgid(0, 0)
        f = open(os.path.join(out, "grandchild.out"), "w", buffering=1)
        tf = open(os.path.join(out, "thread.out"), "w", buffering=1)
        t = threading.Thread(target=thread_ticks, args=(tf,))
        t.start()
        ticks("grandchild", f)
        t.join()
        f.write("grandchild done\n")
        os._exit(12)
    f = open(os.path.join(out, "child.out"), "w", buffering=1)
    ticks("child", f)
    _, st = os.waitpid(b, 0)
    f.write(f"child reaped {b} status {os.waitstatus_to_exitcode(st)}\n")
    os._exit(11)
ticks("root", root)
for p in (z, a):
    _, st = os.waitpid(p, 0)
    root.write(f"root reaped {p} status {os.waitstatus_to_exitcode(st)}\n")
root.write("root done\n")
'''

NAMES = ("root", "child", "grandchild", "thread")
TICKS = 60


def _argv(prog: Path, out: Path, python: str = sys.executable) -> list:
    # sys.executable is the interpreter itself (a pyenv shim would fork
    # commands first and move the pids)
    return ["unshare", "--pid", "--fork", "--", python, prog, out, TICKS]


def _outputs(d: Path) -> dict[str, bytes]:
    return {n: (d / f"{n}.out").read_bytes() for n in NAMES}


def _reference(tmp_path: Path, prog: Path) -> dict[str, bytes]:
    ref = tmp_path / "ref"
    ref.mkdir()
    subprocess.run([str(a) for a in _argv(prog, ref)], check=True, timeout=120,
                   start_new_session=True)
    out = _outputs(ref)
    assert out["root"].endswith(b"root reaped 2 status 5\nroot reaped 3 status 11\nroot done\n")
    assert b"grandchild tick 0 pid 4 ppid 3 pgid 4 sid 3\n" in out["grandchild"]
    assert b"thread tick 0 tid 5 pid 4 ppid 3 pgid 4 sid 3\n" in out["thread"]
    assert b"root tick 0 pid 1 ppid 0 pgid 0 sid 0\n" in out["root"]
    return out


def _start(procs, tmp_path: Path):
    prog = tmp_path / "prog.py"
    prog.write_text(PROG)
    ref = _reference(tmp_path, prog)
    run = tmp_path / "run"
    run.mkdir()
    # (unshare says on stderr that its child was killed: not into a file of the tree)
    proc = procs.spawn(_argv(prog, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_line(run / "thread.out", r"^thread tick 8 ", proc=proc)
    init = children(proc.pid)
    assert len(init) == 1, init
    return proc, init[0], run, ref


def _checkpoint_kill(proc, init: int, cr: Path) -> None:
    """crcheckpoint --kill the init; `unshare` (proc) exits with it."""
    r = subprocess.run([CRCHECKPOINT, str(init), "-o", str(cr), "--kill", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crcheckpoint failed ({r.returncode}): {r.stderr}"
    proc.wait(timeout=10)
    reap(json.loads(r.stdout)["pids"])


def _running(r, timeout: float = 30) -> dict[int, int]:
    """{inner pid: host pid} of the tasks crrestart `r` restored, once all
    three run the program again (crrestart has detached from them)."""
    deadline = time.monotonic() + timeout
    while True:
        assert r.poll() is None, r.stderr.read().decode(errors="replace")
        live = {}
        for p in descendants(r.pid):
            try:
                with open(f"/proc/{p}/status") as f:
                    st = dict(line.split(":", 1) for line in f)
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    prog = b"prog.py" in f.read()      # not crrestart's Python parked
            except OSError:
                continue
            if prog and st["State"].split()[0] in "SR" and st["TracerPid"].strip() == "0":
                live[int(st["NSpid"].split()[-1])] = p
        if len(live) == 3:
            return live
        assert time.monotonic() < deadline, f"restored tasks not running: {live}"
        time.sleep(0.02)


def _inner(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        return [int(x) for x in next(line.split()[1:] for line in f
                                     if line.startswith("NSpid:"))]


def _ns(pid, kind: str = "pid") -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def _check_saved(cr: Path, init: int) -> None:
    sf = reader.load(str(cr))
    pidns = sf.header.namespaces.pid
    assert pidns.init == init and pidns.level == 1
    ids = {int(k): v for k, v in pidns.ids.items()}
    assert sorted(ids[t.pid] for t in sf.tasks) == [1, 3, 4]
    assert sorted(ids[th.tid] for t in sf.tasks for th in t.threads) == [1, 3, 4, 5]
    assert [(ids[z.pid], ids[z.ppid], z.exit_code >> 8) for z in sf.header.zombies] \
        == [(2, 1, 5)]
    assert ids[sf.root.ppid] == ids[sf.root.pgid] == ids[sf.root.sid] == 0


def test_checkpointing_unshare_itself_names_the_init(procs, tmp_path):
    """The user passes the `unshare` process: its child is in another pid
    namespace, so crcheck and crcheckpoint refuse (exit 6, nothing written)
    and name the init's pid to checkpoint instead; the tree runs on."""
    require_root()
    require_tool("unshare")
    proc, init, run, _ = _start(procs, tmp_path)
    r = subprocess.run([str(BIN / "crcheck"), str(proc.pid), "--json"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 6 and "Traceback" not in r.stderr, r.stderr
    bad = [f for f in json.loads(r.stdout)["findings"] if f["key"] == "task:ns-pid-other"]
    assert bad and all(f["status"] == "unsupported" for f in bad), r.stdout
    assert any(f"checkpoint pid {init}, its init, instead" in f["detail"] for f in bad), bad
    cr = tmp_path / "u.cr"
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 6 and "Traceback" not in r.stderr, r.stderr
    assert f"checkpoint pid {init}, its init, instead" in r.stderr, r.stderr
    assert not cr.exists()
    seen = (run / "root.out").read_bytes().count(b"\n")
    wait_for_line(run / "root.out", rf"^root tick {seen + 3} ", proc=proc)
    assert proc.poll() is None
    # the init itself is checkpointable: one finding for the namespace, supported
    r = subprocess.run([str(BIN / "crcheck"), str(init), "--json"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    ns = [f for f in json.loads(r.stdout)["findings"] if f["key"].startswith("task:ns-pid")]
    assert [(f["key"], f["status"]) for f in ns] == [("task:ns-pid", "supported")], ns


@pytest.mark.parametrize("flag", [[], ["--pidns"]], ids=["automatic", "pidns-flag"])
def test_pidns_tree_killed_and_restarted(procs, tmp_path, flag):
    """Checkpoint the namespace's init with --kill, restart with crrestart
    (a new pid namespace whether --pidns is given or not): the root is pid 1
    there and crrestart's child, every task and the thread have their inner
    ids, the zombie is reaped with its status, and every output file is an
    uninterrupted run's, byte for byte."""
    require_root()
    require_tool("unshare")
    proc, init, run, ref = _start(procs, tmp_path)
    cr = tmp_path / "t.cr"
    _checkpoint_kill(proc, init, cr)
    _check_saved(cr, init)
    r = restart(procs, cr, *flag, "--json")
    host = _running(r)
    assert sorted(host) == [1, 3, 4], host
    assert children(r.pid) == [host[1]]   # the root is crrestart's own child
    assert _ns(host[1]) != _ns("self") and len(_inner(host[1])) == 2
    assert {_ns(p) for p in host.values()} == {_ns(host[1])}
    assert sorted(_inner(int(t))[-1] for t in os.listdir(f"/proc/{host[4]}/task")) == [4, 5]
    code, err = finish(r)
    assert code == 0, err
    info = json.loads(err.strip().splitlines()[-1])
    assert info["pid"] == 1 and info["init_pid"] == 0
    assert sorted(int(k) for k in info["tasks"]) == [1, 3, 4]
    assert _outputs(run) == ref


def test_leave_running_pidns_tree_restored_beside_it(procs, tmp_path):
    """Without --kill the tree runs on; crrestart --pidns restores a copy in
    a new pid namespace with the same inner pids beside it (no clash), and
    both copies write the uninterrupted run's output."""
    require_root()
    require_tool("unshare")
    proc, init, run, ref = _start(procs, tmp_path)
    cr = tmp_path / "t.cr"
    r = subprocess.run([CRCHECKPOINT, str(init), "-o", str(cr), "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _check_saved(cr, init)
    # the original keeps writing its files under another name; the copy
    # reopens the paths (the same bytes so far) at the saved offsets
    orig = tmp_path / "orig"
    orig.mkdir()
    for n in NAMES:
        os.rename(run / f"{n}.out", orig / f"{n}.out")
        shutil.copyfile(orig / f"{n}.out", run / f"{n}.out")
    rr = restart(procs, cr, "--pidns", "--force-files", "--json")
    new = _running(rr)
    old = {_inner(p)[-1]: p for p in [init, *descendants(init)] if pid_alive(p)}
    assert sorted(old) == sorted(new) == [1, 3, 4], (old, new)
    assert _ns(old[1]) != _ns(new[1])
    assert proc.wait(timeout=60) == 0
    code, err = finish(rr)
    assert code == 0, err
    assert _outputs(orig) == ref
    assert _outputs(run) == ref


def test_unprivileged_restart_of_a_pidns_tree_is_refused(sample_bin, procs, nobody_dir):
    """A program of user 65534 as the init of a pid namespace root made for
    it, checkpointed by root: 65534 may restart its own processes, but
    recreating the pid namespace needs root: one line, exit 3, nothing left
    running."""
    require_root()
    for tool in ("unshare", "setpriv"):
        require_tool(tool)
    py, env = _python_for_nobody()
    ticker = nobody_dir / "ticker"
    shutil.copy(sample_bin / "ticker", ticker)
    out = nobody_dir / "tick.out"
    out.touch()
    os.chown(out, 65534, 65534)
    proc = procs.spawn(["unshare", "--pid", "--fork", "--", *as_nobody(ticker, 100, 4, 50)],
                       stdout=open(out, "ab"), stderr=subprocess.DEVNULL, cwd=nobody_dir)
    wait_for_line(out, r"tick 3", proc=proc)
    init = children(proc.pid)[0]
    assert _inner(init)[-1] == 1      # setpriv execs: the init is the program
    cr = nobody_dir / "t.cr"
    _checkpoint_kill(proc, init, cr)
    os.chown(cr, 65534, 65534)
    r = subprocess.run(as_nobody(py, "-m", "restorer.cli", cr), capture_output=True,
                       text=True, env=env, cwd=nobody_dir, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "pid namespace of its own" in r.stderr and "needs root" in r.stderr, r.stderr
    time.sleep(0.2)

    def exe(pid: int) -> str:
        try:
            return os.readlink(f"/proc/{pid}/exe")
        except OSError:
            return ""       # gone meanwhile
    assert not [p for p in descendants(os.getpid()) if exe(p) == str(ticker)]
