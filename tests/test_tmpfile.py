"""The statefile while crcheckpoint writes it (statefile/format/writer.py TempFile).

No temporary file outlives crcheckpoint: the statefile is written unnamed
(O_TMPFILE) and linked under its final name once complete; over an existing
statefile it is linked under a random hidden name and renamed over it.  Where
the file system has no O_TMPFILE (forced here through the writer's internal
switch: every file system of this machine has it) the hidden name is random,
created exclusively, flock-ed while written, and the next run removes the
leftovers of dead runs only.  Killed at random moments, a full disk (tmpfs,
and ext2 where there is no fallocate so the snapshot's own pwrite64 meets
ENOSPC), a read-only file system, a quota (simulated: this kernel has no
tmpfs or ext4 quota, see the test): exit 4 where it fails, one line, nothing
left in the directory, and the target runs on with its output unharmed.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (ProcessManager, children, read_lines, require_root, require_tool,
                     wait_for_line)
from test_checkpoint import small_tmpfs  # noqa: F401  (tmp_path/mnt, unmounted at teardown)
from test_restart_unpriv import NOBODY, _python_for_nobody, as_nobody, nobody_dir  # noqa: F401

from statefile.format import reader
from statefile.format.writer import TEMP_NAME

BIN = Path(sys.executable).parent
CRCHECKPOINT = str(BIN / "crcheckpoint")
# crcheckpoint in-process (statefile.cli.run) with the writer's internal
# switch set: no O_TMPFILE
NAMED = "from statefile.format import writer\nwriter.USE_O_TMPFILE = False\n"
# every fallocate fails as it would over a quota (EDQUOT)
QUOTA = ("import ctypes, errno\n"
         "from statefile.format import writer\n"
         "class Quota:\n"
         "    def fallocate(self, *args):\n"
         "        ctypes.set_errno(errno.EDQUOT)\n"
         "        return -1\n"
         "writer._libc = Quota()\n")


def crcheckpoint_argv(pid: int, out: Path, *extra, named: bool = False,
                      setup: str = "") -> list[str]:
    """The crcheckpoint command line; `named` or `setup` (code to run first)
    run it in-process, through statefile.cli.run."""
    setup += NAMED if named else ""
    head = [CRCHECKPOINT] if not setup else [
        sys.executable, "-c", f"import sys\n{setup}from statefile import cli\n"
                              "cli.run(sys.argv[1:])"]
    return [*head, str(pid), "-o", str(out), *map(str, extra)]


def run_checkpoint(pid: int, out: Path, *extra, named: bool = False, setup: str = ""):
    return subprocess.run(crcheckpoint_argv(pid, out, *extra, named=named, setup=setup),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    return lines[0]


def ticker_reference(sample_bin, mib: int, ticks: int) -> list[str]:
    r = subprocess.run([sample_bin / "ticker", str(ticks), str(mib), "0"], capture_output=True,
                       text=True, check=True, timeout=300)
    return r.stdout.splitlines()


def start_ticker(procs, sample_bin, out: Path, mib: int, ms: int = 100, ticks: int = 0,
                 argv_head=()):
    p = procs.spawn([*argv_head, sample_bin / "ticker", ticks, mib, ms], stdout=out)
    wait_for_line(out, r"^tick 1 ", proc=p, timeout=60)
    return p


def target_ok(proc, out: Path, ref: list[str], more: int = 2, timeout: float = 20) -> str:
    """'' when the ticker runs on (not stopped, not traced), prints `more`
    further ticks, and every line so far is the reference's; else what is
    wrong."""
    if proc.poll() is not None:
        return f"target exited ({proc.returncode})"
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except OSError:
        return "target gone"
    state = re.search(r"^State:\s+(\S)", status, re.M)[1]
    tracer = re.search(r"^TracerPid:\s+(\d+)", status, re.M)[1]
    n = len(read_lines(out))
    deadline = time.monotonic() + timeout
    while len(read_lines(out)) < n + more:
        if proc.poll() is not None:
            return f"target exited ({proc.returncode})"
        if time.monotonic() > deadline:
            return f"target stopped printing (state {state}, tracer {tracer})"
        time.sleep(0.02)
    lines = read_lines(out)
    if len(lines) > len(ref):
        return f"reference too short ({len(ref)} lines for {len(lines)})"
    bad = next((i for i, (a, b) in enumerate(zip(lines, ref)) if a != b), None)
    if bad is not None:
        return f"target output differs at line {bad + 1}: {lines[bad]!r} != {ref[bad]!r}"
    return ""


def zombie_children(pid: int) -> list[int]:
    """Children of pid that are zombies (a dead crcheckpoint's snapshot, forked
    by the target and killed with crcheckpoint, waits there to be reaped)."""
    out = []
    for c in children(pid):
        try:
            s = Path(f"/proc/{c}/stat").read_text()
        except OSError:
            continue
        if s[s.rindex(")") + 2] == "Z":
            out.append(c)
    return out


def entries(d: Path) -> list[str]:
    """`ls -a` without . and .."""
    return sorted(os.listdir(d))


def verified(path: Path) -> list[str]:
    """crinspect verify's checks, in-process: [] when the file is a complete,
    intact statefile."""
    try:
        return reader.verify(reader.load(str(path)))
    except reader.FormatError as e:
        return [str(e)]


def nobody_outputs(d: Path) -> Path:
    """t.out and t.err in d, 65534's (crcheckpoint as 65534 must be able to
    look at the target's fds); returns t.out."""
    for name in ("t.out", "t.err"):
        (d / name).touch()
        os.chown(d / name, NOBODY, NOBODY)
    return d / "t.out"


def mount_small(kind: str, mnt: Path, tmp_path: Path, size_kib: int) -> None:
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mnt)],
                       check=True)
    else:       # ext2: no fallocate, so the data writes themselves meet the full disk
        img = tmp_path / "ext2.img"
        subprocess.run(["truncate", "-s", f"{size_kib}k", str(img)], check=True)
        subprocess.run(["mkfs.ext2", "-q", "-F", "-m", "0", str(img)], check=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
        os.rmdir(mnt / "lost+found")


# ---------------------------------------------------------------- the happy paths

def test_unnamed_while_written_and_the_snapshot_writes_through_proc(sample_bin, procs,
                                                                    tmp_path):
    """While a leave-running checkpoint of 256 MiB is written, nothing but the
    final name ever appears in the directory (polled throughout), and the
    copy-on-write snapshot writes all of its memory itself, through
    /proc/CRCHECKPOINT/fd/N.  A second checkpoint over the first replaces it
    (a new inode, never a moment without a complete statefile under the
    name); --fsync flushes the file before it is linked and the directory
    after (strace), in both cases."""
    require_root()
    require_tool("strace")
    p = start_ticker(procs, sample_bin, tmp_path / "t.out", 256)
    d = tmp_path / "ck"
    d.mkdir()
    cr = d / "k.cr"
    seen = set()
    c = subprocess.Popen(crcheckpoint_argv(p.pid, cr, "--json"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    while c.poll() is None:
        seen.update(entries(d))
    out, err = c.communicate()
    assert c.returncode == 0, err
    seen.update(entries(d))
    assert seen == {"k.cr"}, seen
    summary = json.loads(out)
    assert summary["copy_on_write"]
    assert summary["bytes_written_by_snapshots"] == summary["bytes_stored"] >= 256 << 20
    st = os.stat(cr)
    assert st.st_mode & 0o777 == 0o600 and verified(cr) == []

    def traced(*extra) -> list[str]:
        log = tmp_path / "strace.log"
        r = subprocess.run(["strace", "-f", "-o", str(log), "-e",
                            "trace=fsync,linkat,link,renameat,renameat2,rename",
                            *crcheckpoint_argv(p.pid, cr, "--fsync")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return [re.sub(r"^\d+\s+", "", line) for line in log.read_text().splitlines()
                if re.match(r"^\d+\s+(fsync|link|rename)", line)]

    calls = traced()        # over the existing statefile
    assert os.stat(cr).st_ino != st.st_ino and verified(cr) == []
    assert entries(d) == ["k.cr"]
    assert re.fullmatch(r"fsync\((\d+)\)\s+= 0", calls[0]), calls
    fd = calls[0][6:calls[0].index(")")]
    assert re.match(rf'linkat\(AT_FDCWD, "/proc/self/fd/{fd}", \d+, "k.cr", '
                    r"AT_SYMLINK_FOLLOW\) = -1 EEXIST", calls[1]), calls
    tmp = re.match(rf'linkat\(AT_FDCWD, "/proc/self/fd/{fd}", \d+, "(\.k\.cr\.crelf-[0-9a-f]'
                   r'{16}\.tmp)", AT_SYMLINK_FOLLOW\) = 0', calls[2])
    assert tmp, calls
    assert re.match(rf'renameat2?\(\d+, "{re.escape(tmp[1])}", \d+, "k.cr".*= 0', calls[3]), calls
    assert re.fullmatch(r"fsync\(\d+\)\s+= 0", calls[4]) and calls[4] != calls[0], calls
    os.unlink(cr)
    calls = traced()        # no statefile there yet: linked under its name at once
    assert [c.split("(")[0] for c in calls] == ["fsync", "linkat", "fsync"], calls
    assert re.match(rf'linkat\(AT_FDCWD, "/proc/self/fd/\d+", \d+, "k.cr", '
                    r"AT_SYMLINK_FOLLOW\) = 0", calls[1]), calls
    assert entries(d) == ["k.cr"] and verified(cr) == []


def test_named_fallback_is_random_exclusive_and_written_by_the_snapshot(sample_bin, procs,
                                                                        tmp_path):
    """Without O_TMPFILE (the writer's internal switch): while it is written
    the file has a hidden name of the pattern .NAME.crelf-<16 hex>.tmp, mode
    0600, another one at each run (nobody can create it first: the old
    .NAME.tmp-PID could be planted to block every checkpoint), the snapshot
    still writes its memory itself, and after the rename only the statefile
    is left."""
    require_root()
    p = start_ticker(procs, sample_bin, tmp_path / "t.out", 64)
    d = tmp_path / "ck"
    d.mkdir()
    cr = d / "k.cr"
    names = []
    for _ in range(2):
        c = subprocess.Popen(crcheckpoint_argv(p.pid, cr, "--json", named=True),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL)
        seen = {}
        while c.poll() is None:
            for e in entries(d):
                if e != "k.cr" and e not in seen:
                    try:
                        seen[e] = os.lstat(d / e).st_mode
                    except FileNotFoundError:
                        pass
        out, err = c.communicate()
        assert c.returncode == 0, err
        assert json.loads(out)["bytes_written_by_snapshots"] >= 64 << 20
        assert entries(d) == ["k.cr"] and verified(cr) == []
        assert len(seen) == 1, seen
        (name, mode), = seen.items()
        assert TEMP_NAME.fullmatch(name) and name.startswith(".k.cr.crelf-"), name
        assert mode & 0o777 == 0o600, oct(mode)
        names.append(name)
    assert names[0] != names[1]


def test_unprivileged_checkpoint_the_snapshot_opens_proc_fd(sample_bin, procs, tmp_path,
                                                            nobody_dir):
    """crcheckpoint as the target's own user (65534, no capabilities): the
    snapshot, of the same user, may open /proc/CRCHECKPOINT/fd/N (ptrace read
    access to a process of its own uid) and writes all of the memory itself;
    the statefile is 65534's, mode 0600, complete; nothing else is left."""
    require_root()
    require_tool("setpriv")
    py, env = _python_for_nobody()
    d = nobody_dir
    ticker = d / "ticker"
    shutil.copy(sample_bin / "ticker", ticker)
    out = nobody_outputs(d)
    p = procs.spawn(as_nobody(ticker, 0, 64, 100), stdout=out, stderr=d / "t.err", cwd=d)
    wait_for_line(out, r"^tick 1 ", proc=p)
    cr = d / "n.cr"
    r = subprocess.run(as_nobody(py, "-m", "statefile.cli", p.pid, "-o", cr, "--json"),
                       capture_output=True, text=True, env=env, cwd=d, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["copy_on_write"]
    assert summary["bytes_written_by_snapshots"] == summary["bytes_stored"] >= 64 << 20
    st = os.stat(cr)
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o600)
    assert entries(d) == ["n.cr", "t.err", "t.out", "ticker"] and verified(cr) == []


def test_next_run_removes_leftovers_of_dead_runs_only(sample_bin, procs, tmp_path):
    """Hidden files a dead run left (lock free) are removed by the next run,
    whatever statefile name they were for; one a live writer holds (flock),
    one of another user, a name that only looks alike, and an old-style
    .NAME.tmp-PID whose pid runs stay; an old-style one whose pid is gone goes."""
    require_root()
    p = start_ticker(procs, sample_bin, tmp_path / "t.out", 4)
    d = tmp_path / "ck"
    d.mkdir()
    dead = [".k.cr.crelf-0123456789abcdef.tmp", ".other.cr.crelf-fedcba9876543210.tmp"]
    live = ".k.cr.crelf-00000000aaaaaaaa.tmp"
    theirs = ".k.cr.crelf-00000000bbbbbbbb.tmp"
    lookalike = [".k.cr.crelf-XYZ.tmp", "k.cr.crelf-0123456789abcdef.tmp", ".k.cr.tmp-abc"]
    gone = subprocess.Popen(["true"])
    gone.wait()
    old_dead = f".k.cr.tmp-{gone.pid}"
    old_alive = f".k.cr.tmp-{p.pid}"
    for name in [*dead, live, theirs, *lookalike, old_dead, old_alive]:
        (d / name).write_bytes(b"x" * 4096)
    os.chown(d / theirs, NOBODY, NOBODY)
    holder = procs.spawn([sys.executable, "-c",
                          "import fcntl, sys, time\n"
                          "f = open(sys.argv[1], 'rb')\n"
                          "fcntl.flock(f, fcntl.LOCK_EX)\n"
                          "print('locked', flush=True)\n"
                          "time.sleep(600)\n", d / live], stdout=tmp_path / "holder.out")
    wait_for_line(tmp_path / "holder.out", "^locked$", proc=holder)
    r = run_checkpoint(p.pid, d / "k.cr")
    assert r.returncode == 0, r.stderr
    assert entries(d) == sorted(["k.cr", live, theirs, *lookalike, old_alive])
    # the named fallback removes them the same way, and its own name is unlocked
    # only once it is renamed
    for name in dead:
        (d / name).write_bytes(b"x")
    holder.kill()
    holder.wait()
    r = run_checkpoint(p.pid, d / "k.cr", named=True)
    assert r.returncode == 0, r.stderr
    assert entries(d) == sorted(["k.cr", theirs, *lookalike, old_alive])
    with open(d / theirs, "rb") as f:      # the one left is unlocked: a dead run's of 65534
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ------------------------------------------------------------- the failing paths

@pytest.mark.parametrize("fs,named", [("tmpfs", False), ("tmpfs", True), ("ext2", False)])
def test_disk_full(sample_bin, procs, tmp_path, small_tmpfs, fs, named):
    """A 64 MiB target, a file system of 2 MiB holding an older statefile:
    exit 4, one line, the older statefile intact and nothing else in the
    directory, and the target runs on with the output of an uninterrupted run.
    On tmpfs fallocate meets the full disk before any data is written; ext2 has
    no fallocate, so the snapshot's own injected pwrite64 meets ENOSPC, then
    the copy of the rest."""
    require_root()
    mount_small(fs, small_tmpfs, tmp_path, 2048)
    small = start_ticker(procs, sample_bin, tmp_path / "s.out", 1, ticks=1000)
    old = small_tmpfs / "k.cr"
    r = run_checkpoint(small.pid, old)
    assert r.returncode == 0, r.stderr
    before = old.read_bytes()
    out = tmp_path / "t.out"
    p = start_ticker(procs, sample_bin, out, 64, ms=50, ticks=40)
    r = run_checkpoint(p.pid, old, named=named)
    line = one_line(r.stderr)
    assert r.returncode == 4, line
    assert line == f"crcheckpoint: error: no space left on the device for {old}", line
    assert entries(small_tmpfs) == ["k.cr"] and old.read_bytes() == before
    assert p.wait(timeout=120) == 0
    assert read_lines(out) == ticker_reference(sample_bin, 64, 40)


@pytest.mark.parametrize("how", ["remount", "bind"])
def test_read_only_file_system(sample_bin, procs, tmp_path, small_tmpfs, how):
    """A tmpfs remounted read-only, or a read-only bind mount of a writable
    directory: exit 4, one line, nothing created, the target never touched."""
    require_root()
    if how == "remount":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small_tmpfs)],
                       check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
        under = small_tmpfs
    else:
        under = tmp_path / "rw"
        under.mkdir()
        subprocess.run(["mount", "--bind", str(under), str(small_tmpfs)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(small_tmpfs)], check=True)
    out = tmp_path / "t.out"
    p = start_ticker(procs, sample_bin, out, 16, ms=50, ticks=20)
    for named in (False, True):
        r = run_checkpoint(p.pid, small_tmpfs / "k.cr", named=named)
        line = one_line(r.stderr)
        assert r.returncode == 4, line
        assert line == f"crcheckpoint: error: cannot create statefile in {small_tmpfs}: " \
                       "Read-only file system", line
        assert entries(small_tmpfs) == [] and entries(under) == []
    assert p.wait(timeout=120) == 0
    assert read_lines(out) == ticker_reference(sample_bin, 16, 20)


def test_directory_not_writable_for_the_user(sample_bin, procs, tmp_path, nobody_dir):
    """crcheckpoint as 65534 into a directory it may not write: exit 4."""
    require_root()
    py, env = _python_for_nobody()
    d = nobody_dir / "ro"
    d.mkdir(mode=0o755)
    shutil.copy(sample_bin / "ticker", nobody_dir / "ticker")
    out = nobody_outputs(nobody_dir)
    p = procs.spawn(as_nobody(nobody_dir / "ticker", 0, 4, 50), stdout=out,
                    stderr=nobody_dir / "t.err", cwd="/")
    wait_for_line(out, r"^tick 1 ", proc=p)
    r = subprocess.run(as_nobody(py, "-m", "statefile.cli", p.pid, "-o", d / "k.cr"),
                       capture_output=True, text=True, env=env, cwd="/", timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 4 and line == f"crcheckpoint: error: cannot create statefile in " \
                                         f"{d}: Permission denied", line
    assert entries(d) == []


def test_quota_exceeded_simulated(sample_bin, procs, tmp_path):
    """A disk quota.  Not measurable on this kernel: CONFIG_TMPFS_QUOTA is off
    (tmpfs: "Unknown parameter 'quota'"), and ext4 mounted with usrquota says
    "The kernel was not built with CONFIG_QUOTA and CONFIG_QFMT_V2"; root
    would bypass a quota anyway (CAP_SYS_RESOURCE).  So fallocate fails with
    EDQUOT here, in-process, in both temp-file modes: exit 4, one line,
    nothing left, an older statefile intact, the target runs on."""
    require_root()
    out = tmp_path / "t.out"
    p = start_ticker(procs, sample_bin, out, 16, ms=50, ticks=30)
    d = tmp_path / "ck"
    d.mkdir()
    old = d / "k.cr"
    old.write_bytes(b"older statefile")
    for named in (False, True):
        r = run_checkpoint(p.pid, old, named=named, setup=QUOTA)
        line = one_line(r.stderr)
        assert r.returncode == 4 and line == \
            f"crcheckpoint: error: disk quota exceeded writing {old}", line
        assert entries(d) == ["k.cr"] and old.read_bytes() == b"older statefile"
    assert p.wait(timeout=120) == 0
    assert read_lines(out) == ticker_reference(sample_bin, 16, 30)


# --------------------------------------------------------- killed at random moments

KILL_MIB = 256
# unnamed file (O_TMPFILE), then the named fallback, half of each over an older
# statefile; CRELF_KILL_TRIALS=N,M for a longer measurement
KILL_TRIALS, KILL_TRIALS_NAMED = map(int, os.environ.get("CRELF_KILL_TRIALS", "16,8").split(","))


@pytest.fixture(scope="module")
def kill_trials(sample_bin, tmp_path_factory):
    """SIGKILL a leave-running, copy-on-write crcheckpoint of a 256 MiB ticker
    at a moment drawn uniformly from 0 to the duration of an uninterrupted
    run (measured first, as this machine runs now), each on a fresh target.
    Records, per trial, what the directory held, whether the statefile under
    the final name is complete, and how the target fared."""
    require_root()
    tmp = tmp_path_factory.mktemp("kill")
    seed = int(os.environ.get("CRELF_KILL_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    d = tmp / "ck"
    d.mkdir()
    cr = d / "k.cr"
    keep = tmp / "keep"
    keep.mkdir()
    ref = ticker_reference(sample_bin, KILL_MIB, 40)
    procs = ProcessManager()
    trials = []
    try:
        p = start_ticker(procs, sample_bin, tmp / "m.out", KILL_MIB)
        durations = []
        for _ in range(4):          # a first run to warm up, then three
            t0 = time.monotonic()
            r = run_checkpoint(p.pid, cr)
            durations.append(time.monotonic() - t0)
            assert r.returncode == 0, r.stderr
        os.link(cr, keep / "old.cr")        # an older statefile, for the trials over one
        os.unlink(cr)
        old_ino = os.stat(keep / "old.cr").st_ino
        procs.kill_all()
        span = sorted(durations[1:])[1]
        plan = [(named, i % 2 == 1) for named, n in ((False, KILL_TRIALS),
                                                     (True, KILL_TRIALS_NAMED))
                for i in range(n)]
        for named, over_old in plan:
            if over_old:
                os.link(keep / "old.cr", cr)
            out = tmp / f"t{len(trials)}.out"
            p = start_ticker(procs, sample_bin, out, KILL_MIB)
            delay = rng.uniform(0, span)
            t0 = time.monotonic()
            c = procs.spawn(crcheckpoint_argv(p.pid, cr, named=named), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
            while c.poll() is None and time.monotonic() - t0 < delay:
                time.sleep(0.001)
            if c.poll() is None:
                c.kill()
            rc = c.wait()
            listing = entries(d)
            final = None
            if "k.cr" in listing:
                st = os.stat(cr)
                final = ("old" if st.st_ino == old_ino else
                         "new" if not verified(cr) and
                         reader.load(str(cr)).header.root_pid == p.pid else "BROKEN")
            trials.append({"named": named, "over_old": over_old, "delay": round(delay, 3),
                           "finished": rc == 0, "rc": rc, "listing": listing, "final": final,
                           "leftovers": [e for e in listing if e != "k.cr"],
                           "target": target_ok(p, out, ref),
                           "zombies": len(zombie_children(p.pid))})
            procs.kill_all()
            if final is not None:
                os.unlink(cr)
        # one complete run in the named mode: every leftover of the dead ones goes
        p = start_ticker(procs, sample_bin, tmp / "last.out", 4)
        r = run_checkpoint(p.pid, cr, named=True)
        assert r.returncode == 0, r.stderr
        after = entries(d)
    finally:
        procs.kill_all()
    report = {"seed": seed, "span": round(span, 3), "trials": trials, "after": after}
    outcomes: dict[str, int] = {}
    for t in trials:
        key = (f"{'named' if t['named'] else 'unnamed'}{' over old' if t['over_old'] else ''}: "
               f"{'finished' if t['finished'] else 'killed'}, final {t['final']}, "
               f"{len(t['leftovers'])} hidden file(s)")
        outcomes[key] = outcomes.get(key, 0) + 1
    print(json.dumps({"seed": seed, "span": report["span"], "outcomes": outcomes,
                      "target_problems": [f"delay {t['delay']} s: {t['target']}"
                                          for t in trials if t["target"]],
                      "targets_left_with_a_zombie_child": sum(bool(t["zombies"])
                                                              for t in trials)},
                     indent=1))
    return report


def test_killed_checkpoint_leaves_no_temporary_file(kill_trials):
    """After every kill: with O_TMPFILE nothing but the final name in the
    directory; in the named fallback at most hidden files of the random
    pattern (the dead run's), all removed by the next run.  The final name
    holds the older statefile untouched (same inode) or a complete new one
    of the target (crinspect verify's checks pass), never anything else, and
    no new file appears under it unless it is complete."""
    r = kill_trials
    where = f"(seed {r['seed']}: CRELF_KILL_SEED={r['seed']} repeats the delays)"
    for t in r["trials"]:
        if t["named"]:
            assert all(TEMP_NAME.fullmatch(e) for e in t["leftovers"]), (t, where)
        else:
            assert t["leftovers"] == [], (t, where)
        assert t["final"] in ({None, "new"} if not t["over_old"] else {"old", "new"}), \
            (t, where)
        if t["finished"]:
            assert t["final"] == "new", (t, where)
    assert r["after"] == ["k.cr"], (r["after"], where)
    # the delays, up to the median duration, did kill runs on the way
    assert sum(t["rc"] == -9 for t in r["trials"]) >= len(r["trials"]) // 4, where
    assert all(t["rc"] in (0, -9) for t in r["trials"]), where


def test_killed_checkpoint_leaves_the_target_running(kill_trials):
    """TARGET HEALTH after a killed crcheckpoint, not the temp-file logic:
    after every kill the ticker runs on (not stopped, not traced), prints the
    ticks of an uninterrupted run, and holds no zombie child (the dead run's
    snapshot).  Harm to the target when crcheckpoint dies is issue 10's other
    part (freeze, injection, snapshots); this only measures it."""
    r = kill_trials
    bad = [t for t in r["trials"] if t["target"] or t["zombies"]]
    assert not bad, f"TARGET HARMED in {len(bad)} of {len(r['trials'])} trials " \
                    f"(seed {r['seed']}): " + "; ".join(
                        f"delay {t['delay']} s: {t['target'] or 'runs on'}"
                        + (f", {t['zombies']} zombie child(ren) left" if t["zombies"] else "")
                        for t in bad)
