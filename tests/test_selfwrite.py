"""Leave-running checkpoints write private memory from the copy-on-write
snapshots, and each snapshot writes its own memory into the statefile
(statefile/snapshot.SelfWriter, one injected pwrite64 per 32 MiB): what it
wrote must restart exactly like memory read the usual way, and whatever it
cannot write (pages it cannot read, a task under a seccomp filter) is copied
the usual way."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import require_root, wait_for_line, pid_alive
from test_restart import finish, reference, restart

BIN = Path(sys.executable).parent


def leave_running(pid: int, out: Path, join: Path | None = None) -> dict:
    """A leave-running checkpoint (join: a cgroup.procs file crcheckpoint
    enters first: a tree in another cgroup than crcheckpoint's is refused)."""
    argv = [str(BIN / "crcheckpoint"), str(pid), "-o", str(out), "--json"]
    if join is not None:
        argv = ["sh", "-c", f'echo $$ > "{join}" && exec "$@"', "sh", *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["copy_on_write"] and not summary["killed"]
    v = subprocess.run([str(BIN / "crinspect"), "verify", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    return summary


def kill_and_reap(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_snapshot_writes_itself_and_the_restart_is_exact(sample_bin, procs, tmp_path):
    """A 64 MiB ticker: the snapshot writes all of its heap itself; the
    original is killed after the checkpoint, the statefile restarts and the
    output (the restart rewrites from the saved offset) is byte-identical."""
    require_root()
    out = tmp_path / "tick.out"
    p = procs.spawn([sample_bin / "ticker", 30, 64, 50], stdout=out)
    wait_for_line(out, r"^tick 5 ", proc=p)
    summary = leave_running(p.pid, tmp_path / "t.cr")
    assert summary["bytes_written_by_snapshots"] >= 64 << 20, summary
    assert summary["bytes_written_by_snapshots"] <= summary["bytes_stored"]
    kill_and_reap(p)
    code, err = finish(restart(procs, tmp_path / "t.cr", "--force-files"))
    assert code == 0, err
    assert out.read_bytes() == reference([sample_bin / "ticker", 30, 64, 0], tmp_path)


PROTNONE = r"""
import ctypes, mmap, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
n = 64 * 4096
m = mmap.mmap(-1, n, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, n, 4096):
    m[i:i + 8] = (i // 4096 + 1).to_bytes(8, "little")
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
assert libc.mprotect(addr, n, 0) == 0          # present pages nobody can read
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
assert libc.mprotect(addr, n, mmap.PROT_READ | mmap.PROT_WRITE) == 0
print("pages", [int.from_bytes(m[i:i + 8], "little") for i in range(0, n, 4096)] ==
      list(range(1, 65)), flush=True)
"""


def test_pages_the_snapshot_cannot_read_are_copied_for_it(procs, tmp_path):
    """PROT_NONE pages with content: the injected pwrite64 fails on them
    (EFAULT) and crcheckpoint copies them itself; the restart has them."""
    require_root()
    prog, out, go = tmp_path / "protnone.py", tmp_path / "p.out", tmp_path / "go"
    prog.write_text(PROTNONE)
    p = procs.spawn([sys.executable, prog, go], stdout=out)
    wait_for_line(out, r"^ready$", proc=p)
    summary = leave_running(p.pid, tmp_path / "p.cr")
    assert 0 < summary["bytes_written_by_snapshots"] < summary["bytes_stored"], summary
    kill_and_reap(p)
    code, err = finish(restart(procs, tmp_path / "p.cr", "--detach", "--force-files"))
    assert code == 0, err
    go.write_text("")
    wait_for_line(out, r"^pages ")
    assert out.read_text().splitlines()[-1] == "pages True"


def test_task_under_a_seccomp_filter_is_read_the_usual_way(sample_bin, procs, tmp_path):
    """A task with a seccomp filter (here crrun's monitor) may be refused the
    injected calls: its snapshot does not write itself, nothing is lost."""
    require_root()
    out = tmp_path / "tick.out"
    p = procs.spawn([sys.executable, "-m", "statefile.check.crrun", "--",
                     sample_bin / "ticker", 30, 16, 50], stdout=out,
                    cwd=Path(__file__).resolve().parent.parent)
    wait_for_line(out, r"^tick 5 ", proc=p)
    ticker = int(Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()[0])
    with open(f"/proc/{ticker}/status") as f:
        assert any(line.split() == ["Seccomp:", "2"] for line in f)
    summary = leave_running(ticker, tmp_path / "s.cr")
    assert summary["bytes_written_by_snapshots"] == 0 and summary["bytes_stored"] >= 16 << 20
    os.kill(ticker, signal.SIGKILL)
    p.wait(timeout=10)
    assert not pid_alive(ticker) or open(f"/proc/{ticker}/stat").read().split()[2] == "Z"


def _memory_cgroup(tmp_name: str, limit: int) -> tuple[Path, Path]:
    """A memory cgroup with a limit (v1 where the memory controller is
    mounted on its own, else v2); returns (its dir, its procs file)."""
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        d = v1 / tmp_name
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(limit))
        return d, d / "cgroup.procs"
    v2 = Path("/sys/fs/cgroup")
    assert "memory" in (v2 / "cgroup.controllers").read_text().split(), \
        "no memory cgroup controller on this machine"
    d = v2 / tmp_name
    d.mkdir()
    (d / "memory.max").write_text(str(limit))
    return d, d / "cgroup.procs"


def test_task_in_a_memory_limited_cgroup_is_read_the_usual_way(sample_bin, procs, tmp_path):
    """The page cache a snapshot writes would be charged to the task's
    cgroup: under a memory limit crcheckpoint writes it instead."""
    require_root()
    d, procs_file = _memory_cgroup(f"crelf-test-{os.getpid()}", 512 << 20)
    try:
        out = tmp_path / "tick.out"
        p = procs.spawn([sample_bin / "ticker", 30, 16, 50], stdout=out)
        procs_file.write_text(str(p.pid))
        wait_for_line(out, r"^tick 5 ", proc=p)
        summary = leave_running(p.pid, tmp_path / "c.cr", join=procs_file)
        assert summary["bytes_written_by_snapshots"] == 0
        assert summary["bytes_stored"] >= 16 << 20
        kill_and_reap(p)
        code, err = finish(restart(procs, tmp_path / "c.cr", "--force-files"))
        assert code == 0, err
        assert out.read_bytes() == reference([sample_bin / "ticker", 30, 16, 0], tmp_path)
    finally:
        deadline = time.monotonic() + 10
        while True:
            try:
                d.rmdir()
                break
            except OSError:
                assert time.monotonic() < deadline, f"cgroup {d} still busy"
                time.sleep(0.05)
