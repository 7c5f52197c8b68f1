"""crrestart (and crinspect) against bad input and failures: corrupted
statefiles, conflicting arguments, FIFOs and directories, a lazy page server
that can no longer read the statefile.  Every failure is one line on stderr,
a non-zero exit, no traceback, and no process left behind."""
from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from helpers import children, pid_alive, read_lines, require_root, wait_for_line
from test_restart import CRCHECKPOINT, CRRESTART, REPO, reference

CRINSPECT = str(Path(sys.executable).parent / "crinspect")

CR_TASK, CR_THREAD_REGS, CR_FILES, CR_INTEGRITY = 0x43520002, 0x43520003, 0x43520004, 0x4352FFFF


# ------------------------------------------------------------------ helpers

def checkpoint_tree(proc, out: Path) -> list[int]:
    """crcheckpoint --kill the tree of proc; reap every old task (pytest is
    their subreaper: a zombie keeps its pid).  Returns the saved pids."""
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(out), "--json", "--kill"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"crcheckpoint failed ({r.returncode}): {r.stderr}"
    pids = json.loads(r.stdout)["pids"]
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    for pid in pids:
        while pid_alive(pid) or _reapable(pid):
            assert time.monotonic() < deadline, f"old task {pid} still there"
            time.sleep(0.01)
    return pids


def _reapable(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return False


def run(argv, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    return lines[0]


def _start_ticks(pid: int) -> int:
    """When pid started (clock ticks since boot; 0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            s = f.read()
    except OSError:
        return 0
    return int(s[s.rindex(b")") + 2:].split()[19])


def _now_ticks() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")) - 1


def nothing_left(pids=(), since: int = 0) -> None:
    """No saved pid runs (a task started since `since`, in clock ticks since
    boot: an older process that reused the pid is someone else's), and nothing
    crrestart made re-parented to pytest (procs makes pytest a child
    subreaper)."""
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in pids if pid_alive(p) and _start_ticks(p) >= since]
        left += [c for c in children(os.getpid()) if pid_alive(c)]
        if not left:
            return
        assert time.monotonic() < deadline, f"processes left behind: {left}"
        time.sleep(0.05)


def notes_of(path: Path):
    from statefile.format import reader
    return reader.load(str(path)).notes


def note_at(data: bytes, notes, owner: str, n_type: int, rank: int = 1) -> tuple[int, bytes]:
    """(file offset, desc) of the rank-th note of that kind."""
    desc = [n.desc for n in notes if (n.owner, n.n_type) == (owner, n_type)][rank - 1]
    off = data.find(desc)
    assert off > 0 and data.find(desc, off + 1) < 0
    return off, desc


def flip_key(desc: bytes, key: bytes, nth: int = 0) -> tuple[int, bytes]:
    """Offset and replacement of the last letter of the nth '"key"' in desc
    (same length: the note still parses as JSON)."""
    k = -1
    for _ in range(nth + 1):
        k = desc.find(b'"' + key + b'"', k + 1)
        assert k >= 0, key
    return k + len(key), b"x"


def corrupt(src: Path, dst: Path, edits: list[tuple[int, bytes]]) -> Path:
    data = bytearray(src.read_bytes())
    for off, new in edits:
        assert data[off:off + len(new)] != new
        data[off:off + len(new)] = new
    dst.write_bytes(data)
    os.chmod(dst, 0o600)
    return dst


def malformed_but_consistent(src: Path, dst: Path) -> Path:
    """CR_TASK #1 with a mapping's "kind" renamed AND the integrity note
    updated to match: checksums pass, the note lacks a field and has one the
    format does not define."""
    data = src.read_bytes()
    notes = notes_of(src)
    toff, tdesc = note_at(data, notes, "CRELF", CR_TASK)
    ioff, idesc = note_at(data, notes, "CRELF", CR_INTEGRITY)
    old = str(zlib.crc32(tdesc)).encode()
    k = tdesc.find(b'"kind"') + 3          # "ki??": a name the restorer does not know
    # the checksums are decimal in the JSON list: the new one must have as many
    # digits so the note keeps its size (one in five crc32 values has 9 digits,
    # so try names until one fits)
    for a, b in itertools.product(b"qwxyzjv", repeat=2):
        name = bytes([a, b])
        new = tdesc[:k] + name + tdesc[k + 2:]
        crc = str(zlib.crc32(new)).encode()
        if len(crc) == len(old):
            break
    old, crc = b"," + old + b"]", b"," + crc + b"]"
    assert len(crc) == len(old) and idesc.count(old) == 1
    return corrupt(src, dst, [(toff + k, name), (ioff, idesc.replace(old, crc))])


def binfmt_status() -> tuple[int, str]:
    r = run([*CRRESTART, "--status"])
    return r.returncode, r.stdout


# -------------------------------------------------------------------- tests

def test_corrupted_statefile_refused_in_one_line(sample_bin, procs, tmp_path):
    """Notes corrupted so that they still parse (a JSON key renamed, a path
    letter, a register byte, the checksum list), or no longer parse: crrestart
    refuses at load naming the note, exit 3, one line, and starts nothing; a
    note that is malformed but consistent with its checksum fails at plan in
    one line.  A flipped byte of segment data is found by crinspect verify
    (crrestart does not read every segment: docs/RESTORE.md).  The intact
    statefile then restarts and the tree finishes exactly like an
    uninterrupted run."""
    require_root()
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree", 30], stdout=out)
    wait_for_line(out, r"child 2 tick 5", proc=proc)
    good = tmp_path / "tree.cr"
    pids = checkpoint_tree(proc, good)
    assert len(pids) == 3
    data = good.read_bytes()
    notes = notes_of(good)

    t2, t2desc = note_at(data, notes, "CRELF", CR_TASK, 2)
    t1, t1desc = note_at(data, notes, "CRELF", CR_TASK, 1)
    fo, fdesc = note_at(data, notes, "CRELF", CR_FILES)
    ro, _ = note_at(data, notes, "CRELF", CR_THREAD_REGS)
    io, idesc = note_at(data, notes, "CRELF", CR_INTEGRITY)
    k, new = flip_key(t2desc, b"kind")
    crc = str(zlib.crc32(fdesc)).encode()
    i = idesc.find(b"," + crc + b"]") + len(crc)   # its last digit
    p = fdesc.find(b'"path":"/') + 9         # a letter of a path: its case
    cases = {
        # file name -> (edits, what the one line must name)
        "task2-key.cr": ([(t2 + k, new)], "note CR_TASK #2 checksum mismatch"),
        "files-path.cr": ([(fo + p, bytes([fdesc[p] ^ 0x20]))],
                          "note CR_FILES #1 checksum mismatch"),
        "regs-byte.cr": ([(ro + 40, bytes([data[ro + 40] ^ 0xFF]))],
                         "note CR_THREAD_REGS #1 checksum mismatch"),
        "task1-syntax.cr": ([(t1, b"[")], "note CR_TASK #1 checksum mismatch"),
        "integrity.cr": ([(io + i, bytes([(idesc[i] - 48 + 1) % 10 + 48]))],
                         "note CR_FILES #1 checksum mismatch"),
    }
    for name, (edits, what) in cases.items():
        bad = corrupt(good, tmp_path / name, edits)
        since = _now_ticks()
        r = run([*CRRESTART, bad])
        line = one_line(r.stderr)
        assert r.returncode == 3, (name, r.returncode, line)
        assert line.startswith("crrestart: failed at load: ") and what in line, (name, line)
        nothing_left(pids, since)
        v = run([CRINSPECT, "verify", bad])
        assert v.returncode in (1, 5) and "checksum mismatch" in v.stdout + v.stderr, (name, v)
        assert "Traceback" not in v.stderr

    # checksums match, but the note does not fit its record: refused at load,
    # by crinspect and crrestart alike, in one line naming note, task and field
    bad = malformed_but_consistent(good, tmp_path / "consistent.cr")
    task1 = f"CR_TASK #1 (pid {pids[0]})"
    v = run([CRINSPECT, "verify", bad])
    assert v.returncode == 5 and task1 in v.stderr and "$.mappings[" in v.stderr, v
    assert "Traceback" not in v.stderr
    since = _now_ticks()
    r = run([*CRRESTART, bad])
    line = one_line(r.stderr)
    assert r.returncode == 3 and line.startswith("crrestart: failed at load: ") \
        and task1 in line and "unknown field `ki" in line and "$.mappings[" in line, line
    nothing_left(pids, since)

    from statefile.format import reader
    seg = max(reader.load(str(good)).segments, key=lambda s: s.filesz)
    off = seg.offset + seg.runs[0][0]
    bad = corrupt(good, tmp_path / "segment.cr", [(off, bytes([data[off] ^ 0xFF]))])
    v = run([CRINSPECT, "verify", bad])
    assert v.returncode == 1 and f"segment {seg.phdr} " in v.stdout \
        and "checksum mismatch" in v.stdout, v

    # the intact statefile is fine: the tree finishes like an uninterrupted run
    r = procs.spawn([*CRRESTART, good], stderr=subprocess.PIPE, cwd=REPO)
    _, err = r.communicate(timeout=120)
    assert r.returncode == 0, err
    reference([sample_bin / "tree", 30], tmp_path)
    got, want = read_lines(out), read_lines(tmp_path / "ref.out")
    assert got[-2:] == ["child 1 exited 11", "child 2 exited 12"], got[-5:]
    assert sorted(got) == sorted(want)


def test_notes_inconsistent_with_each_other_fail_at_plan_in_one_line(sample_bin, procs,
                                                                     tmp_path):
    """Every note decodes (the loader checked each field's type) but they do
    not fit together: a task's fd names a CR_FILES entry that is not there, or
    a mapping a segment that is not there.  crrestart stops (at load, where
    the loader cross-checks it, else at plan) in one line, exit 3, nothing
    started; the intact statefile restarts."""
    require_root()
    import shutil

    from test_locks import _forge
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree", 30], stdout=out)
    wait_for_line(out, r"child 2 tick 3", proc=proc)
    good = tmp_path / "tree.cr"
    pids = checkpoint_tree(proc, good)

    def fd_to_nowhere(obj) -> bool:
        if not obj.get("fds"):
            return False
        obj["fds"][0]["file"] = 10**6
        return True

    def segment_of_nothing(obj) -> bool:
        m = next((m for m in obj.get("mappings", []) if m.get("segments")), None)
        if m is None:
            return False
        m["segments"][0] = 10**6
        return True

    for name, edit in (("fd.cr", fd_to_nowhere), ("segment.cr", segment_of_nothing)):
        bad = tmp_path / name
        shutil.copyfile(good, bad)
        _forge(bad, CR_TASK, edit)
        since = _now_ticks()
        r = run([*CRRESTART, bad])
        assert r.returncode == 3 and "Traceback" not in r.stderr, (name, r.returncode, r.stderr)
        line = one_line(r.stderr)
        # (the loader cross-checks some references itself: refused at load)
        assert line.startswith(("crrestart: failed at plan: malformed statefile",
                                "crrestart: failed at load: ")), (name, line)
        nothing_left(pids, since)

    r = procs.spawn([*CRRESTART, good], stderr=subprocess.PIPE, cwd=REPO)
    _, err = r.communicate(timeout=120)
    assert r.returncode == 0, err
    assert read_lines(out)[-2:] == ["child 1 exited 11", "child 2 exited 12"]


def test_conflicting_arguments_are_usage_errors(tmp_path):
    """--register with --unregister, --status or a STATEFILE, or with restart
    options: one-line usage error, exit 2, binfmt_misc untouched."""
    require_root()
    before = binfmt_status()
    try:
        for argv in (["--register", "--unregister"], ["--unregister", "--register"],
                     ["--register", "--status"], ["--register", str(tmp_path / "app.cr")],
                     ["--unregister", str(tmp_path / "app.cr")], ["--register", "--detach"],
                     ["--status", "--lazy"], ["a.cr", "b.cr"], ["--no-such-option"], []):
            r = run([*CRRESTART, *argv])
            line = one_line(r.stderr)
            assert r.returncode == 2 and line.startswith("crrestart: usage error: "), (argv, r)
            assert r.stdout == "", (argv, r.stdout)
            assert binfmt_status() == before, argv
    finally:
        if binfmt_status() != before and before[0] != 0:   # a regression registered it
            run([*CRRESTART, "--unregister"])


def test_fifo_directory_device_socket_refused_promptly(tmp_path):
    """A statefile path that is a FIFO (nobody writing), a directory, a
    character device or a socket: crinspect and crrestart refuse at once
    (never block on the FIFO) with one line."""
    fifo = tmp_path / "app.cr"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock.cr"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, what in ((fifo, "is a FIFO"), (tmp_path, "is a directory"),
                           (Path("/dev/zero"), "is a character device"),
                           (sock_path, "is a socket")):
            for argv, code in (([*CRRESTART, path], 3), ([CRINSPECT, path], 5),
                               ([CRINSPECT, "verify", path], 5)):
                r = run(argv, timeout=30)     # a hang is a TimeoutExpired failure
                line = one_line(r.stderr)
                assert r.returncode == code, (argv, r)
                assert what in line and str(path) in line, (argv, line)
            assert one_line(run([*CRRESTART, path]).stderr).startswith(
                "crrestart: failed at load: ")
    finally:
        sock.close()


def _restart_and_truncate(procs, cr: Path, size: int, *args):
    """Start crrestart --lazy (niced, so the poller wins the CPU) and truncate
    the statefile to `size` the moment its page server has mapped it: every
    page beyond that not served yet can no longer be read (UFFDIO_COPY:
    EFAULT)."""
    real = os.path.realpath(cr)
    rr = procs.spawn(["nice", "-n", "19", *CRRESTART, "--lazy", *args, cr],
                     stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 120
    while True:
        try:
            with open(f"/proc/{rr.pid}/maps") as f:
                if real in f.read():
                    break
        except OSError:
            pass
        assert rr.poll() is None, f"crrestart exited early: {rr.communicate()[1]!r}"
        assert time.monotonic() < deadline, "crrestart never mapped the statefile"
        time.sleep(0.001)
    os.truncate(cr, size)
    try:
        _, err = rr.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        rr.kill()
        raise AssertionError("crrestart hung after its page server failed") from None
    return rr.returncode, err.decode(errors="replace")


def _bigheap_statefile(sample_bin, procs, tmp_path) -> tuple[Path, Path, int]:
    out = tmp_path / "bigheap.out"
    p = procs.spawn([sample_bin / "bigheap", 512, 0], stdout=out,
                    stderr=tmp_path / "bigheap.err")
    wait_for_line(out, r"^ready$", proc=p, timeout=120)
    cr = tmp_path / "bigheap.cr"
    r = subprocess.run([CRCHECKPOINT, str(p.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p.wait(timeout=10)
    return cr, out, p.pid


def _stack_offset(cr: Path) -> int:
    """File offset of the stack's data: stored after every other segment the
    lazy server serves, and prefetched last (highest address), while the
    process touches it first when it runs again."""
    from statefile.format import reader
    sf = reader.load(str(cr))
    segs = [sf.segment(p) for m in sf.root.mappings if m.kind == "stack"
            for p in m.segments if sf.segment(p).filesz]
    assert len(segs) == 1 and segs[0].offset == max(s.offset for s in sf.segments
                                                        if s.filesz)
    return segs[0].offset


@pytest.mark.parametrize("where", ["restore", "running"])
def test_lazy_serving_failure_kills_and_reports(sample_bin, procs, tmp_path, where):
    """Foreground --lazy: the statefile is truncated while its 512 MiB are
    still being served, to nothing (the server fails at once, during the
    restore) or before the stack's data (the server fails when the process,
    running again, touches its stack; in the rare run where the background
    copy gets there first, during the restore).  crrestart does not hang and
    the process does not run on zero pages: it is killed, one line names the
    failed step, exit 3."""
    require_root()
    cr, out, pid = _bigheap_statefile(sample_bin, procs, tmp_path)
    size = 0 if where == "restore" else _stack_offset(cr)
    since = _now_ticks()
    code, err = _restart_and_truncate(procs, cr, size)
    line = one_line(err)
    assert code == 3, (code, line)
    assert line.startswith(f"crrestart: failed at lazy memory: pid {pid}: cannot bring in "
                           "the page at ") and "the process was killed" in line, line
    nothing_left([pid], since)
    # it never went on with zero pages (its check says "page N corrupted")
    assert (tmp_path / "bigheap.err").read_text() == ""


def test_lazy_detach_serving_failure_kills_and_reports(sample_bin, procs, tmp_path):
    """--lazy --detach: the serving daemon keeps crrestart's stderr; when it
    cannot serve (statefile truncated before the stack's data, which the
    process touches as soon as it runs) it says so there in one line and kills
    the process."""
    require_root()
    cr, out, pid = _bigheap_statefile(sample_bin, procs, tmp_path)
    since = _now_ticks()
    code, err = _restart_and_truncate(procs, cr, _stack_offset(cr), "--detach")
    line = one_line(err)   # stderr ends when the daemon ends
    assert code in (0, 3), (code, line)   # 3: it failed before crrestart detached
    assert line.startswith(f"crrestart: failed at lazy memory: pid {pid}: ") and \
        "the process was killed" in line, line
    nothing_left([pid], since)


def test_lazy_detach_serves_until_every_page_is_in(sample_bin, procs, tmp_path):
    """--lazy --detach: crrestart returns at once, its daemon serves the
    ticker (which checksums its whole 256 MiB heap every tick) until every
    page is in; the output is byte-identical to an uninterrupted run, and the
    daemon and the process are gone at the end."""
    require_root()
    out = tmp_path / "tick.out"
    cr = tmp_path / "ticker.cr"
    p = procs.spawn([sample_bin / "ticker", 25, 256, 50], stdout=out)
    wait_for_line(out, r"^tick 6 ", proc=p, timeout=60)
    r = subprocess.run([CRCHECKPOINT, str(p.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    p.wait(timeout=10)
    since = _now_ticks()
    rr = procs.spawn([*CRRESTART, "--lazy", "--detach", "--json", cr], stderr=subprocess.PIPE,
                     cwd=REPO)
    _, err = rr.communicate(timeout=120)   # EOF once the daemon is done too
    err = err.decode(errors="replace")
    assert rr.returncode == 0, err
    assert "Traceback" not in err and "failed" not in err, err
    assert json.loads(err.strip().splitlines()[-1])["mode"] == "lazy"
    wait_for_line(out, r"^done$", timeout=120)
    ref = tmp_path / "ref.out"
    with open(ref, "wb") as f:
        subprocess.run([sample_bin / "ticker", "25", "256", "0"], stdout=f, check=True,
                       timeout=120)
    assert out.read_bytes() == ref.read_bytes()
    nothing_left([p.pid], since)

