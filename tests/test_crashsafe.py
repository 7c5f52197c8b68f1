"""A dying crrestart leaves all or nothing, and lazy memory is never silently
missing (issue 10, docs/RESTORE.md "When crrestart dies").

Each test checkpoints a real program once (its stdout a pipe to the test, so
a restored tree writes to crrestart's stdout), then many times over starts
crrestart, SIGKILLs it (or the lazy memory's server) after a random delay
drawn over the whole restore, and asserts on what the program does after:

  (a) it runs to the end and its output is the uninterrupted run's, byte for
      byte, or
  (b) nothing of it is left: no process of the trial, no SysV object it
      created, and it printed nothing wrong;

then that the same statefile restarts correctly.  Trial counts: CRELF_KILL_TRIALS
(default 12 per mode); the counts of each outcome are printed (pytest -s).
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import _set_child_subreaper, build_c, descendants, require_root, require_tool
from test_ipc import PINGPONG, _ipcrm, _keys
from test_restart import CRCHECKPOINT, CRRESTART, REPO

TRIALS = int(os.environ.get("CRELF_KILL_TRIALS", "12"))
SETTLE = 60.0        # seconds a trial may take to end (a hang fails the test)


# ------------------------------------------------------------------ helpers

def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _ours() -> list[int]:
    """Every process below pytest (a subreaper: what a trial leaves comes here)."""
    return [p for p in descendants(os.getpid()) if p != os.getpid()]


def _reap_all(statuses: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        statuses[pid] = status


def _settle(baseline: set[int], statuses: dict[int, int], timeout: float = SETTLE) -> None:
    """Wait until every process a trial started is gone (reaping the orphans
    that came to us); a hang is a failure, and then everything is killed."""
    deadline = time.monotonic() + timeout
    while True:
        _reap_all(statuses)
        left = [p for p in _ours() if p not in baseline]
        if not left:
            return
        if time.monotonic() > deadline:
            info = {p: _comm(p) for p in left}
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            raise AssertionError(f"processes still there after {timeout} s (a hang?): {info}")
        time.sleep(0.01)


def checkpoint_piped(argv, ready: str, cr: Path) -> bytes:
    """Run argv with stdout a pipe to us, checkpoint it (--kill) once a line
    matches `ready`; returns everything it printed before it died (the bytes
    in flight included: they stay in the old pipe)."""
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    got = b""
    try:
        while not re.search(ready.encode(), got):
            line = p.stdout.readline()
            assert line, f"{argv[0]} ended before {ready!r}: {got!r}"
            got += line
        r = subprocess.run([CRCHECKPOINT, str(p.pid), "-o", str(cr), "--kill"],
                           capture_output=True, text=True, timeout=120, close_fds=True)
        assert r.returncode == 0, f"crcheckpoint failed ({r.returncode}): {r.stderr}"
        got += p.stdout.read()
    finally:
        p.kill()
        p.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _ours():             # the killed tree's children, reparented to us
        _reap_all({})
        assert time.monotonic() < deadline, f"old tree still there: {_ours()}"
        time.sleep(0.01)
    return got


def start_restart(cr: Path, args, out: Path, err: Path) -> subprocess.Popen:
    with open(out, "wb") as fo, open(err, "wb") as fe:
        return subprocess.Popen([*CRRESTART, *args, str(cr)], stdout=fo, stderr=fe,
                                stdin=subprocess.DEVNULL, close_fds=True, cwd=REPO,
                                start_new_session=True)


def restart_ok(cr: Path, args, tail: bytes, tmp_path: Path, name: str) -> None:
    """The statefile restarts (in the foreground) and the output is right."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    p = start_restart(cr, [a for a in args if a != "--detach"], out, err)
    try:
        code = p.wait(timeout=120)
    finally:
        p.kill()
    assert code == 0, f"restart after a kill failed ({code}): {err.read_text()}"
    assert out.read_bytes() == tail, f"{name}: {out.read_bytes()[:400]!r}"


class Delays:
    """Kill delays: one uninterrupted crrestart is timed until the tree runs
    (span) and until its guard shows up (the restore proper begins: before,
    crrestart is starting Python and reading the statefile).  Half the
    delays are drawn over the whole span, half over the restore proper."""

    def __init__(self, cr: Path, args, tail: bytes, tmp_path: Path):
        out, err = tmp_path / "timing.out", tmp_path / "timing.err"
        t0 = time.monotonic()
        p = start_restart(cr, [*args, "--detach"], out, err)
        self.start = 0.0
        while p.poll() is None:
            if not self.start and any(_comm(c) == "crelf-guard" for c in _ours()):
                self.start = time.monotonic() - t0
            time.sleep(0.001)
        assert p.returncode == 0, err.read_text()
        self.span = (time.monotonic() - t0) * 1.3
        self.start = min(self.start, self.span)
        _settle(set(), {})
        assert out.read_bytes() == tail, err.read_text()

    def draw(self, i: int) -> float:
        return random.uniform(0 if i % 2 else self.start, self.span)


def report(name: str, counts: dict) -> None:
    sys.stderr.write(f"\n[kill trials] {name}: {counts}\n")


# ------------------------------------------------------------- programs

@pytest.fixture(scope="module")
def pingpong(tmp_path_factory):
    """A parent and a child that pass the turn through a SysV semaphore set and
    count in SysV shm and in MAP_SHARED anonymous memory: a tree whose
    restart creates SysV objects.  (statefile, expected output after the
    checkpoint, SysV key)"""
    require_root()
    _set_child_subreaper()      # what a killed crrestart leaves comes to us
    tmp = tmp_path_factory.mktemp("pingpong")
    key, n = 0x7e57c1a5, 24
    prog = build_c(tmp, "pingpong", PINGPONG)
    try:
        ref = subprocess.run([prog, str(n), hex(key)], capture_output=True, timeout=60,
                             check=True, close_fds=True).stdout
        cr = tmp / "pp.cr"
        before = checkpoint_piped([prog, n, hex(key)], r"child turn 4 ", cr)
    finally:
        _ipcrm("-M", hex(key))      # the killed original's: every restart makes its own
        _ipcrm("-S", hex(key))
    assert ref.startswith(before)
    yield cr, ref[len(before):], key
    _ipcrm("-M", hex(key))
    _ipcrm("-S", hex(key))


@pytest.fixture(scope="module")
def bigticker(tmp_path_factory, sample_bin):
    """ticker with a 600 MiB heap, checksummed whole every tick: a lazily
    restored page that came back wrong (a zero page) changes the output.
    (statefile, expected output after the checkpoint)"""
    require_root()
    _set_child_subreaper()
    tmp = tmp_path_factory.mktemp("bigticker")
    argv = [sample_bin / "ticker", 7, 600, 100]
    ref = subprocess.run([str(a) for a in argv[:3]] + ["0"], capture_output=True, timeout=120,
                         check=True, close_fds=True).stdout
    cr = tmp / "big.cr"
    before = checkpoint_piped(argv, r"tick 3 ", cr)
    assert ref.startswith(before)
    return cr, ref[len(before):]


SOCKPROG = r"""
import hashlib, os, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
h = hashlib.sha256()
for i in range(n):
    s.sendto(b"m%d" % i, path)            # to itself, through its socket file
    data = s.recv(64)
    h.update(data)
    os.write(1, b"tick %d %s %s\n" % (i, data, h.hexdigest()[:16].encode()))
    time.sleep(0.02)
os.unlink(path)
os.write(1, b"done\n")
"""


@pytest.fixture(scope="module")
def pysock(tmp_path_factory):
    """python3 bound to a named unix datagram socket (the restored task binds
    the socket file itself).  (statefile, expected output, socket path)"""
    require_root()
    _set_child_subreaper()
    py = require_tool("python3")
    tmp = tmp_path_factory.mktemp("pysock")
    prog = tmp / "sock.py"
    prog.write_text(SOCKPROG)
    path = str(tmp / "s.sock")
    ref = subprocess.run([py, prog, path, "40"], capture_output=True, timeout=60, check=True,
                         close_fds=True).stdout
    cr = tmp / "sock.cr"
    before = checkpoint_piped([py, prog, path, 40], r"tick 5 ", cr)
    os.unlink(path)           # the killed original's socket file: every restart binds its own
    assert ref.startswith(before)
    return cr, ref[len(before):], path


# ------------------------------------------------------------------- tests

def kill_trials(cr: Path, mode, tail: bytes, tmp_path: Path, name: str, nothing_left) -> None:
    """TRIALS times: start crrestart, SIGKILL it after a random delay, let
    everything settle; then the output is the whole tail (a) or empty with
    nothing_left(i) holding (b), and then the statefile restarts."""
    delays = Delays(cr, mode, tail, tmp_path)
    counts = {"ran": 0, "nothing": 0}
    for i in range(TRIALS):
        baseline = set(_ours())
        out, err = tmp_path / f"k{i}.out", tmp_path / f"k{i}.err"
        p = start_restart(cr, mode, out, err)
        delay = delays.draw(i)
        time.sleep(delay)
        p.kill()
        p.wait()
        _settle(baseline, {})
        got = out.read_bytes()
        if os.environ.get("CRELF_KILL_DEBUG"):
            sys.stderr.write(f"trial {i} span {delays.start:.3f}-{delays.span:.3f} delay "
                             f"{delay:.3f} -> {len(got)} bytes\n")
        if got == tail:
            counts["ran"] += 1
        else:
            counts["nothing"] += 1
            assert got == b"", (f"trial {i}: the tree ran in part (or wrong) before it was "
                                f"killed: {got[:300]!r}; crrestart said {err.read_text()!r}")
        nothing_left(i)
        if got != tail:
            restart_ok(cr, mode, tail, tmp_path, f"again{i}")
            nothing_left(i)
    report(f"{name} {' '.join(mode)}", counts)


@pytest.mark.parametrize("mode", [["--eager"], ["--eager", "--detach"], ["--eager", "--pidns"]],
                         ids=["eager", "detach", "pidns"])
def test_killed_crrestart_leaves_all_or_nothing(pingpong, procs, tmp_path, mode):
    """SIGKILL crrestart at random points of restoring a two-task tree with
    SysV objects: either the tree runs to the end with the uninterrupted
    output, or no process, no SysV object and no output is left; the
    statefile then restarts."""
    cr, tail, key = pingpong

    def nothing_left(i: int) -> None:     # (after a whole run the program removed them)
        assert key not in _keys("shm") and key not in _keys("sem"), \
            f"trial {i}: a SysV object of the killed restore is left"
    kill_trials(cr, mode, tail, tmp_path, "pingpong", nothing_left)


@pytest.mark.parametrize("mode", [["--eager"], ["--eager", "--pidns"]], ids=["eager", "pidns"])
def test_killed_crrestart_leaves_no_socket_file(pysock, procs, tmp_path, mode):
    """The same with python3 bound to a named unix socket: a killed restore
    leaves no socket file (and no process, no output)."""
    cr, tail, path = pysock

    def nothing_left(i: int) -> None:     # (after a whole run the program unlinked it)
        assert not os.path.lexists(path), f"trial {i}: the socket file is left"
    kill_trials(cr, mode, tail, tmp_path, "python3 unix socket", nothing_left)


@pytest.mark.parametrize("victim", ["server", "guard", "crrestart"])
def test_lazy_server_killed_never_runs_on_missing_pages(bigticker, procs, tmp_path, victim):
    """crrestart --lazy --detach of a 600 MiB program whose every line
    checksums its whole heap; SIGKILL the daemon that serves its memory (or
    the guard, or the foreground server) while pages are still missing: the
    program is killed (no wrong line, ever; no hang; nothing left), or it
    got every page and runs to the end."""
    cr, tail = bigticker
    counts = {"ran": 0, "killed": 0}
    mode = ["--lazy"] if victim == "crrestart" else ["--lazy", "--detach"]
    trials = max(3, TRIALS // 2)
    for i in range(trials):
        baseline = set(_ours())
        statuses: dict[int, int] = {}
        out, err = tmp_path / f"l{i}.out", tmp_path / f"l{i}.err"
        p = start_restart(cr, mode, out, err)
        if victim == "crrestart":
            # the foreground crrestart serves the pages itself: kill it once
            # the process runs (its first line needs every page of the heap)
            target = p.pid
            deadline = time.monotonic() + 60
            while not any(_comm(c) == "ticker" for c in _ours()) and p.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.002)
        else:
            name = "crelf-lazy" if victim == "server" else "crelf-guard"
            deadline = time.monotonic() + 60
            target = 0
            while not target:
                if victim == "server" or p.poll() is not None:
                    target = next((c for c in _ours() if _comm(c) == name), 0)
                else:
                    target = next((c for c in _ours() if _comm(c) == name
                                   and any(_comm(d) == "crelf-lazy" for d in _ours())), 0)
                if not target and p.poll() is not None and not any(
                        _comm(c) in ("crelf-lazy", "ticker") for c in _ours()):
                    break     # done (or failed) before we saw it
                assert time.monotonic() < deadline, "no lazy daemon showed up"
                time.sleep(0.001)
        time.sleep(random.uniform(0, 0.15))
        if target:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=SETTLE)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError("crrestart hung")
        _settle(baseline, statuses)
        got = out.read_bytes()
        assert tail.startswith(got), (f"trial {i}: a WRONG line after the {victim} was killed: "
                                      f"{got[:300]!r} (expected {tail[:200]!r})")
        if got == tail:
            counts["ran"] += 1
            continue
        counts["killed"] += 1
        ticker = [s for pid, s in statuses.items() if pid not in (p.pid, target)]
        said = err.read_text()
        if victim == "crrestart":
            assert p.returncode == -signal.SIGKILL
        else:
            assert any(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL
                       for s in ticker), f"trial {i}: the program did not end killed: {statuses}"
            assert "lazy memory" in said, said
        restart_ok(cr, ["--lazy"], tail, tmp_path, f"lagain{i}")
    report(f"lazy, {victim} killed", counts)
    # (the guard's and the foreground's deaths may come after the last page: either is fine)
    assert counts["killed"] or victim != "server", "never caught the server with pages missing"



SPINNERS = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
/* A parent and a child that each append consecutive numbers to a file of
   their own as fast as they can: any instruction either runs shows. */
int main(int argc, char **argv) {
    char path[4096];
    pid_t c = fork();
    snprintf(path, sizeof path, "%s.%s", argv[1], c == 0 ? "child" : "parent");
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd < 0) return 1;
    if (c != 0) { write(1, "ready\n", 6); close(1); }
    for (long i = 0;; i++) {
        char line[32];
        int n = snprintf(line, sizeof line, "%ld\n", i);
        if (write(fd, line, n) != n) return 1;
    }
}
"""


def _release_cgroups(pid: int) -> list[str]:
    """The release cgroups (restorer/release/freezer.py) crrestart `pid` left anywhere
    (other restores may have theirs meanwhile)."""
    from restorer.release.freezer import _mounts
    left = []
    for mnt, _, _ in _mounts():
        for dirpath, dirnames, _ in os.walk(mnt):
            left += [os.path.join(dirpath, d) for d in dirnames
                     if d.startswith(f"crelf-restore-{pid}-")]
    return left


def _consecutive(path: Path) -> int:
    """The number of lines of a spinner file, checking they count up by one."""
    nums = path.read_bytes().split(b"\n")
    full = [int(x) for x in nums[:-1]]
    assert full == list(range(len(full))), f"{path.name}: a gap or a repeat"
    return len(full)


@pytest.fixture(scope="module")
def spinners(tmp_path_factory):
    """(statefile, file prefix, line counts at the checkpoint) of two spinning
    tasks, checkpointed with --kill."""
    require_root()
    _set_child_subreaper()
    tmp = tmp_path_factory.mktemp("spinners")
    prog = build_c(tmp, "spinners", SPINNERS)
    prefix = tmp / "out"
    cr = tmp / "spin.cr"
    checkpoint_piped([prog, prefix], r"ready", cr)
    files = [Path(f"{prefix}.parent"), Path(f"{prefix}.child")]
    data = [f.read_bytes() for f in files]
    return cr, files, data


@pytest.mark.parametrize("release", ["freezer", "gate"])
def test_lazy_restore_undone_though_every_page_was_in(sample_bin, procs, tmp_path, release):
    """A lazy restore of a one-task program (four threads) whose little
    memory is all served before the release (the server tells the guard so):
    crrestart SIGKILLed after the detach must still leave nothing running.
    (The guard used to take "every page is in" for "nothing left to guard"
    and exit, leaving the task frozen for good, or with the gate, running.)"""
    require_root()
    _set_child_subreaper()
    out, cr = tmp_path / "mt.out", tmp_path / "mt.cr"
    proc = procs.spawn([sample_bin / "mt_values"], stdout=out, close_fds=True)
    deadline = time.monotonic() + 10
    while b"tick 3" not in out.read_bytes():
        assert time.monotonic() < deadline and proc.poll() is None, out.read_text()
        time.sleep(0.01)
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=120, close_fds=True)
    assert r.returncode == 0, r.stderr
    proc.wait(timeout=10)
    _settle(set(), {})
    before = out.read_bytes()
    env = {**os.environ, "CRELF_RESTORE_DIE_AT": "detach"}
    if release == "gate":
        env["CRELF_NO_FREEZER"] = "1"
    err = tmp_path / "restart.err"
    with open(err, "wb") as fe:
        p = subprocess.Popen([*CRRESTART, "--lazy", "--force-files", str(cr)],
                             stdout=subprocess.DEVNULL, stderr=fe, stdin=subprocess.DEVNULL,
                             close_fds=True, cwd=REPO, env=env, start_new_session=True)
    try:
        assert p.wait(timeout=120) == -signal.SIGKILL, err.read_text()
        _settle(set(), {}, timeout=10)      # (the guard too: it says why)
        time.sleep(0.3)
        assert out.read_bytes() == before, "the tree ran after crrestart died in its release"
        assert "before the tree was released" in err.read_text(), err.read_text()
        assert not _release_cgroups(p.pid), _release_cgroups(p.pid)
    finally:
        for path in _release_cgroups(p.pid):    # (a failure's leftovers: frozen tasks)
            with open(f"{path}/cgroup.procs") as f:
                for pid in f.read().split():
                    os.kill(int(pid), signal.SIGKILL)
            with open(f"{path}/freezer.state", "w") as f:
                f.write("THAWED")
            _settle(set(), {}, timeout=10)
            os.rmdir(path)


_EAGER = [["--eager"], ["--eager", "--pidns"]]


@pytest.mark.parametrize("mode,release,point", [
    *[(m, r, p) for m in _EAGER for r, p in (("freezer", "detach"), ("freezer", "commit"),
                                            ("freezer", "home"), ("gate", "detach"),
                                            ("gate", "commit"))],
    # lazy: its memory all in before the release (a small tree): the guard
    # must still undo a restore whose crrestart died before it
    (["--lazy"], "freezer", "detach"), (["--lazy"], "gate", "detach"),
    # crrestart and its guard both killed: only the gate still holds (the
    # tasks kill themselves at end-of-file; frozen ones would stay frozen)
    (["--eager"], "gate", "detach+guard"), (["--eager", "--pidns"], "gate", "detach+guard")],
    ids=lambda v: "-".join(x.strip("-") for x in v) if isinstance(v, list) else v)
def test_release_is_all_or_nothing(spinners, procs, tmp_path, mode, release, point):
    """crrestart SIGKILLed inside the release of two tasks that write as fast
    as they can: after the first task was detached ("detach"): neither may
    run one instruction (both files unchanged, nothing left); just after the
    guard was told "released", before the thaw or the gate's opening
    ("commit"), or before the tasks were moved back home ("home"): both tasks
    run on, counting on from where they were.  No release cgroup is left
    either way.  "freezer": as root, the release freezer (restorer/release/freezer.py);
    "gate": without one, as an unprivileged restore is, the release gate
    (restorer/release/gate.py).  CRELF_NO_GATE=1 in the environment with "gate" is
    the negative check: the plain detach loop, where "detach" fails."""
    env = {**os.environ, "CRELF_RESTORE_DIE_AT": point}
    if release == "freezer":
        from restorer.release.freezer import find, make
        fz = find()
        assert fz is not None and make(fz), \
            "no writable cgroup freezer here: the release cannot be atomic"
        fz.remove()
    else:
        env["CRELF_NO_FREEZER"] = "1"
    cr, files, data = spinners
    for f, d in zip(files, data):
        f.write_bytes(d)          # as the checkpoint left them
    baseline = set(_ours())
    err = tmp_path / f"{point}.err"
    with open(err, "wb") as fe:
        p = subprocess.Popen([*CRRESTART, *mode, "--force-files", str(cr)],
                             stdout=subprocess.DEVNULL,
                             stderr=fe, stdin=subprocess.DEVNULL, close_fds=True, cwd=REPO,
                             start_new_session=True, env=env)
    assert p.wait(timeout=120) == -signal.SIGKILL, err.read_text()
    if point.startswith("detach"):
        _settle(baseline, {})       # (the guard too: it says why)
        said = err.read_text()
        assert [f.read_bytes() for f in files] == data, \
            f"part of the tree ran after crrestart died in its release: {said}"
        if point == "detach":
            assert "before the tree was released" in said, said
    else:
        deadline = time.monotonic() + 30
        while any(f.stat().st_size < len(d) + 100_000 for f, d in zip(files, data)):
            assert time.monotonic() < deadline, \
                f"the released tree does not run on: {err.read_text()}"
            time.sleep(0.01)
        while any(_comm(c) == "crelf-guard" for c in set(_ours()) - baseline):
            assert time.monotonic() < deadline, "the guard does not finish the release"
            _reap_all({})         # (it moves the tree home, removes the cgroup, exits)
            time.sleep(0.01)
        for pid in set(_ours()) - baseline:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _settle(baseline, {})
        for f, d in zip(files, data):
            assert f.read_bytes().startswith(d)
            _consecutive(f)
    assert not _release_cgroups(p.pid), _release_cgroups(p.pid)
