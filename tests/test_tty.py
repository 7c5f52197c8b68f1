"""A shell on a terminal: bash runs in a pty driven by this test, is
checkpointed with --kill, restarted by crrestart on a new pty (like CRIU's
shell-job) and keeps answering commands with its variables intact."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from helpers import require_root, require_tool

BIN = Path(sys.executable).parent


def read_until(fd: int, text: bytes, timeout: float = 20) -> bytes:
    buf, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            buf += data
            if text in buf:
                return buf
    raise AssertionError(f"no {text!r} from the terminal; got {buf[-400:]!r}")


def spawn_on_pty(argv) -> tuple[int, int]:
    pid, master = pty.fork()
    if pid == 0:
        os.closerange(3, 4096)
        os.execvp(argv[0], argv)
    return pid, master


def test_bash_on_a_pty_keeps_answering_after_restart(tmp_path):
    require_root()
    require_tool("bash")
    pids = []
    try:
        shell, m1 = spawn_on_pty(["bash", "--norc", "--noprofile", "-i"])
        pids.append(shell)
        read_until(m1, b"# ")
        os.write(m1, b"X=41; cd /tmp; f() { echo fun-$1; }; echo ready-$((X+1))\n")
        read_until(m1, b"ready-42")
        cr = tmp_path / "bash.cr"
        res = subprocess.run([str(BIN / "crcheckpoint"), str(shell), "-o", str(cr), "--kill"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        os.waitpid(shell, 0)
        pids.remove(shell)
        restarter, m2 = spawn_on_pty([str(BIN / "crrestart"), str(cr)])
        pids.append(restarter)
        os.write(m2, b"echo again-$X-$(pwd); f 7\n")
        out = read_until(m2, b"fun-7")
        assert b"again-41-/tmp" in out
        # The shell is the terminal's foreground job, under its own name.
        stat = Path(f"/proc/{shell}/stat").read_text()
        assert stat.split(" (")[1].startswith("bash)")
        fields = stat.rsplit(") ", 1)[1].split()
        assert int(fields[2]) == shell and int(fields[5]) == shell  # pgid, tpgid
        os.write(m2, b"exit 7\n")
        _, status = os.waitpid(restarter, 0)
        pids.remove(restarter)
        assert os.waitstatus_to_exitcode(status) == 7
    finally:
        for p in pids + [shell]:
            try:
                os.kill(p, 9)
                os.waitpid(p, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
