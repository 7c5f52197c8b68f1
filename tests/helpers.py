"""Shared test helpers (imported by conftest.py and tests: ``from helpers import ...``).

Conventions:
  * sample programs are built once per session by the ``sample_bin`` fixture
    (see conftest.py); their argv conventions are documented in samples/*.c;
  * statefiles and sample output files go into the test's ``tmp_path``
    (``statefile_path`` fixture = tmp_path / "state.core");
  * every process a test starts goes through ``procs.spawn`` so it and all of
    its descendants are killed at teardown, even when the test fails.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "samples"


# --------------------------------------------------------------- requirements

def require_root() -> None:
    """Fail (not skip) the test unless running as root: the CI runs as root."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (euid 0); the CI provides it", pytrace=False)


def require_tool(name: str) -> str:
    """Fail (not skip) unless `name` is on PATH; return its full path."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool {name!r} not found on PATH; the CI provides it",
                    pytrace=False)
    return path


# ---------------------------------------------------------------- output files

def read_lines(path) -> list[str]:
    """Complete lines (without newline) of a file; a trailing partial line is
    left out.  A missing file reads as no lines."""
    try:
        data = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = data.split("\n")
    return lines[:-1]  # last element is "" or a partial line


def _tail(path, n: int = 20) -> str:
    lines = read_lines(path)
    return "\n".join(lines[-n:]) if lines else "<empty or missing>"


def wait_for_line(path, pattern, timeout: float = 10.0, proc=None) -> str:
    """Poll `path` until a complete line matches regex `pattern` (re.search);
    return that line.  On timeout raise AssertionError with the file's tail.
    With `proc` (a Popen), give up early if it exits without a match."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        for line in read_lines(path):
            if rx.search(line):
                return line
        if proc is not None and proc.poll() is not None:
            # one last look: the final lines may have landed just before exit
            for line in read_lines(path):
                if rx.search(line):
                    return line
            raise AssertionError(
                f"process {proc.pid} exited ({proc.returncode}) before a line "
                f"matching {pattern!r} appeared in {path}; tail:\n{_tail(path)}")
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"no line matching {pattern!r} in {path} after {timeout}s; "
                f"tail:\n{_tail(path)}")
        time.sleep(0.02)


# ------------------------------------------------------------- process trees

def _ppid_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc/*/stat (works without
    CONFIG_PROC_CHILDREN)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # field 2 (comm) may contain spaces/parens: split after the last ')'
        fields = stat[stat.rindex(b")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def _has_children_files() -> bool:
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def children(pid: int, _ppids: dict | None = None) -> list[int]:
    """Direct children of `pid` (of all its threads), from
    /proc/PID/task/*/children, or from /proc/*/stat when the kernel lacks
    CONFIG_PROC_CHILDREN."""
    if not _has_children_files():
        return sorted((_ppids if _ppids is not None else _ppid_map()).get(pid, []))
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.update(int(x) for x in f.read().split())
        except OSError:
            pass
    return sorted(found)


def descendants(pid: int) -> list[int]:
    """All descendants of `pid` (not including pid), walked recursively."""
    ppids = None if _has_children_files() else _ppid_map()
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children(todo.pop(), ppids):
            if c not in out and c != pid:
                out.append(c)
                todo.append(c)
    return out


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")


def wait_pid_exit(pid: int, timeout: float = 10.0):
    """Wait until `pid` (child or not) is gone.  Returns the raw wait status
    if it was our child and we reaped it, else None.  Raises AssertionError on
    timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                return status
        except ChildProcessError:
            if not pid_alive(pid):
                return None
        if time.monotonic() >= deadline:
            raise AssertionError(f"pid {pid} still running after {timeout}s")
        time.sleep(0.02)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _set_child_subreaper() -> None:
    """Make this (pytest) process a child subreaper, so descendants orphaned by
    a dying parent (or left behind by a restorer) re-parent to us and can
    still be found and killed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


class ProcessManager:
    """The ``procs`` fixture: starts processes and kills them (and every
    descendant) at teardown."""

    def __init__(self):
        _set_child_subreaper()
        self.started: list[subprocess.Popen] = []
        self._files = []
        self._baseline = set(children(os.getpid()))

    def spawn(self, argv, stdout=None, stderr=None, stdin=subprocess.DEVNULL,
              **kwargs) -> subprocess.Popen:
        """Start `argv` in its own session (start_new_session=True).

        `stdout`/`stderr` may be a path (str/Path: opened for writing,
        truncated), a file object / fd / subprocess constant, or None
        (inherit).  Extra kwargs go to subprocess.Popen."""
        stdout = self._open(stdout)
        stderr = self._open(stderr)
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen([str(a) for a in argv], stdin=stdin,
                                stdout=stdout, stderr=stderr, **kwargs)
        self.started.append(proc)
        return proc

    def _open(self, target):
        if isinstance(target, (str, os.PathLike)):
            f = open(target, "wb")
            self._files.append(f)
            return f
        return target

    def kill_all(self) -> None:
        me = os.getpid()
        roots = [p.pid for p in self.started]
        # orphans that re-parented to us (we are a subreaper) since setup
        roots += [c for c in children(me) if c not in self._baseline]
        # freeze the trees (SIGSTOP) until no new process shows up, so nothing
        # can fork behind our back, then SIGKILL every pid and every group
        victims: list[int] = []
        for _ in range(50):
            new = [p for r in roots for p in [r, *descendants(r)]
                   if p not in victims and p != me]
            if not new:
                break
            for p in new:
                _kill(p, signal.SIGSTOP)
            victims += new
        for p in victims:
            _kill(p, signal.SIGKILL)
        for proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session/group
            except (ProcessLookupError, PermissionError):
                pass
        # reap: our Popen objects, then any other victim that is our child
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        popen_pids = {p.pid for p in self.started}
        deadline = time.monotonic() + 5
        for p in victims:
            if p in popen_pids:
                continue
            while True:
                try:
                    if os.waitpid(p, os.WNOHANG)[0] == p:
                        break
                except ChildProcessError:
                    break  # not our child: its parent/init reaps it
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
        for f in self._files:
            f.close()
        self.started.clear()
        self._files.clear()


def trace_with_another_tracer(procs, pid: int, tmp_path):
    """Start a process that PTRACE_SEIZEs `pid` and holds it (like a debugger
    would); returns its Popen once the seize succeeded."""
    import sys
    out = Path(tmp_path) / f"tracer-{pid}.out"
    tracer = procs.spawn([sys.executable, "-c", (
        "import ctypes, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.ptrace(0x4206, {pid}, 0, 0) == 0\n"  # PTRACE_SEIZE
        "print('seized', flush=True)\n"
        "time.sleep(60)\n")], stdout=out)
    wait_for_line(out, "seized", proc=tracer)
    return tracer


def build_c(tmp_path, name: str, src: str):
    """Compile a C test program (source text) into tmp_path/name."""
    c = tmp_path / f"{name}.c"
    c.write_text(src)
    subprocess.run(["gcc", "-O1", "-o", tmp_path / name, c], check=True)
    return tmp_path / name
