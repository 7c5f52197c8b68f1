"""Pseudo-terminal pairs with both ends in the tree (statefile/dump/tty.py,
restorer/restore/tty.py): a harness holding the master drives an interactive
bash on the slave; the whole tree is checkpointed mid-session and restarted,
and what bash prints afterwards is compared byte for byte with an
uninterrupted session.  Also script(1) from util-linux as the master holder,
a leave-running checkpoint that changes nothing the session shows, and a
line typed ahead while a job runs (queued in the pty) that bash still gets."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import pid_alive, require_root, require_tool

BIN = Path(sys.executable).parent
CRCHECKPOINT = str(BIN / "crcheckpoint")
CRRESTART = str(BIN / "crrestart")
PROMPT = b"P> "

# Holds the master; bash runs on the slave in its own session (pty.fork: setsid
# + TIOCSCTTY).  A window size and a termios flag (IXANY) are set on the pair.
# Lines written to the FIFO go to the master, the master's output to the log;
# when bash exits the harness logs its exit status (it is bash's parent).
HARNESS = r"""
import fcntl, os, pty, select, struct, sys, termios
fifo, log = sys.argv[1], sys.argv[2]
pid, m = pty.fork()
if pid == 0:
    os.environ.update(PS1="P> ", TERM="dumb")
    os.execvp("bash", ["bash", "--norc", "--noprofile", "-i"])
fcntl.ioctl(m, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
a = termios.tcgetattr(m)
a[0] |= termios.IXANY
termios.tcsetattr(m, termios.TCSANOW, a)
cmd = os.open(fifo, os.O_RDWR)
out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
while True:
    r, _, _ = select.select([cmd, m], [], [])
    if m in r:
        try:
            data = os.read(m, 4096)
        except OSError:        # EIO: bash is gone
            break
        os.write(out, data)
    if cmd in r:
        os.write(m, os.read(cmd, 4096))
_, status = os.waitpid(pid, 0)
os.write(out, b"[bash exited %d]\n" % os.waitstatus_to_exitcode(status))
"""

BEFORE = [b"X=41; f() { echo fun-$1; }; cd /tmp", b"echo ready-$((X+1))"]
AFTER = [b"echo again-$X-$(pwd); f 7", b"stty size",
         b"stty -a | tr ' ' '\\n' | grep -x -- '-\\?ixany'"]


class Session:
    """One harness + bash, driven through its FIFO."""

    def __init__(self, procs, tmp: Path, name: str):
        self.fifo, self.log = tmp / f"{name}.cmd", tmp / f"{name}.log"
        os.mkfifo(self.fifo)
        self.log.write_bytes(b"")
        script = tmp / "harness.py"
        if not script.exists():
            script.write_text(HARNESS)
        self.proc = procs.spawn([sys.executable, script, self.fifo, self.log],
                                stdout=tmp / f"{name}.out", stderr=tmp / f"{name}.err")
        self.pid = self.proc.pid
        self.wait_prompts(1)

    def prompts(self) -> int:
        return self.log.read_bytes().count(PROMPT)

    def wait_for(self, cond, what: str, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.02)
        raise AssertionError(f"{what}; log: {self.log.read_bytes()[-600:]!r}")

    def wait_prompts(self, n: int) -> None:
        self.wait_for(lambda: self.prompts() >= n and self.log.read_bytes().endswith(PROMPT),
                      f"no prompt #{n}")

    def send(self, data: bytes) -> None:
        with open(self.fifo, "wb") as f:
            f.write(data)

    def run(self, line: bytes) -> None:
        """Type one command line and wait for bash's next prompt."""
        n = self.prompts()
        self.send(line + b"\n")
        self.wait_prompts(n + 1)

    def bash(self) -> int:
        kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        assert len(kids) == 1, kids
        comm = Path(f"/proc/{kids[0]}/comm").read_text().strip()
        assert comm == "bash", f"the master holder's child is {comm}, not bash"
        return int(kids[0])


def stat_fields(pid: int) -> list[str]:
    s = Path(f"/proc/{pid}/stat").read_text()
    return s.rsplit(") ", 1)[1].split()   # [0] state, [1] ppid, [2] pgrp, [3] sid, [4] tty_nr, [5] tpgid


def tty_index(tty_nr: int) -> int:
    return (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)


def master_index(pid: int) -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/ptmx":
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            return int(info.split("tty-index:")[1].split()[0])
    raise AssertionError(f"pid {pid} holds no pty master")


def checkpoint(pid: int, out: Path, kill: bool) -> dict:
    r = subprocess.run([CRCHECKPOINT, str(pid), "-o", str(out), "--json"]
                       + (["--kill"] if kill else []),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crcheckpoint failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout)


def reap(pids) -> None:
    end = time.monotonic() + 10
    for p in pids:
        while time.monotonic() < end:
            try:
                if os.waitpid(p, os.WNOHANG)[0] == p:
                    break
            except ChildProcessError:
                if not os.path.exists(f"/proc/{p}"):
                    break
            time.sleep(0.01)


def restart_detached(statefile: Path, *extra) -> str:
    r = subprocess.run([CRRESTART, "--detach", *extra, str(statefile)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crrestart failed ({r.returncode}): {r.stderr}"
    return r.stderr


def job_control(s: Session) -> None:
    """bash leads its session on the pair, is its foreground group at the
    prompt, gives the foreground to a job, and ^C on the master stops it."""
    bash = s.bash()
    f = stat_fields(bash)
    assert int(f[3]) == bash and int(f[2]) == bash          # session and group leader
    assert tty_index(int(f[4])) == master_index(s.pid)      # its ctty is the harness's pair
    # foreground group at the prompt: bash takes the terminal back
    # (tcsetpgrp) before readline prints the prompt
    tpgid = int(stat_fields(bash)[5])
    assert tpgid == bash, f"bash ({bash}) is not the foreground group at its prompt: {tpgid}"
    n = s.prompts()
    s.send(b"sleep 100\n")

    def sleeping():
        kids = Path(f"/proc/{bash}/task/{bash}/children").read_text().split()
        if not kids:
            return False
        job = int(kids[0])      # exec'd (bash's own SIGINT handler gone) and in front
        return (Path(f"/proc/{job}/comm").read_text().strip() == "sleep"
                and int(stat_fields(job)[5]) == job)
    s.wait_for(sleeping, "sleep never became the foreground job")
    s.send(b"\x03")                                          # ^C through the master
    s.wait_prompts(n + 1)
    s.run(b"echo after-int-$?")
    assert b"after-int-130" in s.log.read_bytes()
    assert int(stat_fields(bash)[5]) == bash


def finish(s: Session, code: int) -> bytes:
    s.send(b"exit %d\n" % code)
    s.wait_for(lambda: b"[bash exited" in s.log.read_bytes(), "the harness never saw bash exit")
    return s.log.read_bytes()


def test_bash_on_a_pty_of_the_tree_restarts(procs, tmp_path):
    require_root()
    require_tool("bash")
    ref = Session(procs, tmp_path, "ref")
    for line in BEFORE + AFTER:
        ref.run(line)
    job_control(ref)
    expected = finish(ref, 3)

    s = Session(procs, tmp_path, "cr")
    for line in BEFORE:
        s.run(line)
    old_bash, old_index = s.bash(), master_index(s.pid)
    summary = checkpoint(s.pid, tmp_path / "pty.cr", kill=True)
    s.proc.wait(timeout=10)
    reap(summary["pids"])
    assert set(summary["pids"]) == {s.pid, old_bash}
    # Take a pty number (the old one, when it is the lowest free), so the
    # restored pair most likely gets another one.
    hold = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY)
    try:
        stderr = restart_detached(tmp_path / "pty.cr")
    finally:
        os.close(hold)
    assert s.bash() == old_bash
    for line in AFTER:
        s.run(line)
    got = s.log.read_bytes()
    assert b"again-41-/tmp\r\nfun-7\r\n" in got and b"33 101\r\n" in got
    assert b"\r\nixany\r\n" in got
    job_control(s)
    # ttyname() of the tasks names the new pair (crrestart says so when it changed)
    n = master_index(s.pid)
    s.run(b"tty")
    assert f"/dev/pts/{n}\r\n".encode() in s.log.read_bytes()
    if n != old_index:
        assert f"/dev/pts/{old_index} of the tree is /dev/pts/{n} now" in stderr, stderr
    else:
        assert "pseudo-terminal" not in stderr, stderr
    got = finish(s, 3)
    tty_line = f"P> tty\r\n/dev/pts/{n}\r\n".encode()
    assert got.replace(tty_line, b"") == expected, "the restarted session differs"


def test_leave_running_checkpoint_changes_nothing(procs, tmp_path):
    require_root()
    require_tool("bash")
    ref = Session(procs, tmp_path, "ref")
    s = Session(procs, tmp_path, "cr")
    for line in BEFORE:
        ref.run(line)
        s.run(line)
    size = s.log.stat().st_size
    summary = checkpoint(s.pid, tmp_path / "live.cr", kill=False)
    assert not summary["killed"]
    time.sleep(0.3)
    assert s.log.stat().st_size == size                     # nothing echoed, nothing lost
    for line in AFTER:
        ref.run(line)
        s.run(line)
    job_control(ref)
    job_control(s)
    assert finish(s, 5) == finish(ref, 5)
    # The statefile of the live tree restarts too, once its pids are free.
    s.proc.wait(timeout=10)
    assert not pid_alive(s.pid)
    before = s.log.read_bytes()
    restart_detached(tmp_path / "live.cr", "--force-files")   # the log grew since
    s.wait_for(lambda: stat_fields(s.bash())[0] in "SR", "bash did not come back")
    s.run(b"echo back-$X")
    assert s.log.read_bytes()[len(before):].startswith(b"echo back-$X\r\nback-41\r\nP> ")


def test_script_from_util_linux_restarts(procs, tmp_path):
    """script(1) holds the master (and a slave fd), polls with signals blocked
    behind a signalfd; bash runs on the slave."""
    require_root()
    require_tool("bash")
    require_tool("script")
    fifo, log = tmp_path / "cmd", tmp_path / "typescript.out"
    os.mkfifo(fifo)
    io = os.open(fifo, os.O_RDWR)
    try:
        # script runs the command with $SHELL -c (/bin/sh when unset): name bash,
        # which execs the command, so bash is script's child whatever the caller's
        # environment (dash would stay in between)
        proc = procs.spawn(["script", "-qfc", "exec bash --norc --noprofile -i", "/dev/null"],
                           stdin=io, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, PS1="P> ", TERM="dumb",
                                    SHELL=shutil.which("bash")))
    finally:
        os.close(io)
    s = Session.__new__(Session)
    s.fifo, s.log, s.proc, s.pid = fifo, log, proc, proc.pid
    s.wait_for(lambda: s.log.read_bytes().endswith((b"# ", b"$ ", PROMPT)), "no first prompt")
    s.run(b"PS1='P''> '; X=41")
    s.run(b"stty cols 77 rows 21")
    summary = checkpoint(s.pid, tmp_path / "script.cr", kill=True)
    proc.wait(timeout=10)
    reap(summary["pids"])
    restart_detached(tmp_path / "script.cr")
    s.run(b"echo again-$X; stty size")
    assert b"again-41\r\n21 77\r\n" in log.read_bytes()
    job_control(s)
    s.send(b"exit 6\n")
    s.wait_for(lambda: not pid_alive(s.pid) or stat_fields(s.pid)[0] == "Z",
               "script did not exit after bash")


@pytest.mark.parametrize("kill", [True, False], ids=["kill", "leave-running"])
def test_typed_ahead_line_comes_back(procs, tmp_path, kill):
    """A line typed ahead while a job runs waits in the pty (with its echo
    on the master side): checkpointed with --kill and restarted, or
    checkpointed leaving the tree running, bash gets it once the job ends,
    exactly once."""
    require_root()
    require_tool("bash")
    s = Session(procs, tmp_path, "ahead")
    s.run(b"X=41")
    bash = s.bash()
    n = s.prompts()
    s.send(b"sleep 100\n")
    s.wait_for(lambda: Path(f"/proc/{bash}/task/{bash}/children").read_text().strip(),
               "no job")
    s.send(b"echo typed-$X\n")
    s.wait_for(lambda: b"echo typed-$X" in s.log.read_bytes(), "no echo of the typed line")
    summary = checkpoint(s.pid, tmp_path / "x.cr", kill=kill)
    if kill:
        s.proc.wait(timeout=10)
        reap(summary["pids"])
        restart_detached(tmp_path / "x.cr")
        assert s.bash() == bash
    job = int(Path(f"/proc/{bash}/task/{bash}/children").read_text().split()[0])
    os.kill(job, 15)          # not ^C: an interrupt flushes the typed-ahead input
    s.wait_prompts(n + 1)
    s.wait_for(lambda: b"\r\ntyped-41\r\n" in s.log.read_bytes(), "the typed line was lost")
    s.run(b"echo done")
    log = s.log.read_bytes()
    assert log.endswith(b"P> sleep 100\r\necho typed-$X\r\nTerminated\r\nP> echo typed-$X\r\n"
                        b"typed-41\r\nP> echo done\r\ndone\r\nP> "), log[-400:]


def test_master_whose_slave_is_outside_is_refused(procs, tmp_path):
    require_root()
    master, slave = os.openpty()       # we (outside the tree) keep the slave
    try:
        proc = procs.spawn(["sleep", "100"], stdin=master)
        os.close(master)
        master = -1
        time.sleep(0.2)
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(tmp_path / "x.cr")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 6, r.stderr
        assert f"is open in pid {os.getpid()} outside the tree" in r.stderr, r.stderr
        assert "reconnect a pseudo-terminal" in r.stderr
        assert pid_alive(proc.pid) and not (tmp_path / "x.cr").exists()
    finally:
        os.close(slave)
        if master >= 0:
            os.close(master)
