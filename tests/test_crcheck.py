"""crcheck and crcheckpoint refusals with real unsupported resources, and
policies that skip them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import read_lines, require_root, trace_with_another_tracer, wait_for_line
from test_checkpoint import assert_keeps_ticking, checkpoint

from statefile import reader
from statefile.ptrace import dup_fd_of

BIN = Path(sys.executable).parent


def crcheck(pid, *extra):
    res = subprocess.run([str(BIN / "crcheck"), str(pid), "--json", *extra],
                         capture_output=True, text=True, timeout=60)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout) if res.stdout else None, res.stderr


INET_PROGRAM = """
import socket, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.create_connection(srv.getsockname())
a, _ = srv.accept()
a.close(); srv.close()        # one TCP connection left (its peer closed: CLOSE_WAIT)
print("ready fd=%d" % c.fileno(), flush=True)
n = 0
while True:
    n += 1; time.sleep(0.1); print("tick %d" % n, flush=True)
"""


@pytest.fixture(params=["uring", "perf", "inet"])
def unsupported(request, sample_bin, procs, tmp_path):
    require_root()
    out = tmp_path / "u.out"
    if request.param == "inet":
        proc = procs.spawn([sys.executable, "-c", INET_PROGRAM], stdout=out)
    else:
        proc = procs.spawn([sample_bin / "unsupported", request.param], stdout=out)
    fd = int(wait_for_line(out, r"ready fd=", proc=proc).split("=")[1])
    assert fd >= 0, f"could not create the {request.param} resource: errno {-fd}"
    expect = {"uring": ("fd:io_uring", "io_uring", "io_uring instances cannot be checkpointed"),
              "perf": ("fd:perf_event", "perf", "perf events cannot be checkpointed"),
              "inet": ("fd:socket:inet", "network", "TCP connections and queued")}
    return proc, out, fd, expect[request.param]


def test_crcheck_names_it_and_crcheckpoint_refuses(unsupported, tmp_path):
    proc, out, fd, (key, policy_class, reason) = unsupported
    rc, report, _ = crcheck(proc.pid)
    assert rc == 6 and not report["checkpointable"]
    hits = [f for f in report["findings"] if f["key"] == key]
    assert len(hits) == 1 and hits[0]["where"] == f"pid {proc.pid} fd {fd}"
    assert hits[0]["status"] == "skippable" and hits[0]["policy"] == policy_class
    assert reason in hits[0]["reason"]
    assert report["problems"] == [hits[0]["line"]]

    cr = tmp_path / "u.cr"
    res = checkpoint(proc.pid, cr, check=False)
    assert res.returncode == 6
    assert f"CR: pid {proc.pid} fd {fd}:" in res.stderr and reason in res.stderr
    assert not cr.exists() and not list(tmp_path.glob(".u.cr*"))
    assert_keeps_ticking(out, proc)


def test_policy_skips_it_and_the_statefile_says_so(unsupported, tmp_path):
    proc, out, fd, (key, policy_class, _) = unsupported
    rc, report, _ = crcheck(proc.pid, "--skip", policy_class)
    assert rc == 0 and report["checkpointable"]
    policy = tmp_path / "policy.toml"
    policy.write_text(f'skip = ["{policy_class}"]\n')
    cr = tmp_path / "u.cr"
    summary = checkpoint(proc.pid, cr, "--policy", str(policy))
    assert summary["restartable"]
    assert [s["where"] for s in summary["skipped"]] == [f"pid {proc.pid} fd {fd}"]
    sf = reader.load(str(cr))
    assert sf.header["skipped"][0]["why"] == policy_class
    entry = sf.files[next(d["file"] for d in sf.root["fds"] if d["fd"] == fd)]
    assert entry["skipped"] == policy_class
    assert_keeps_ticking(out, proc)


def test_traced_process_is_named(sample_bin, procs, tmp_path):
    require_root()
    out = tmp_path / "mt.out"
    proc = procs.spawn([sample_bin / "mt_values"], stdout=out)
    wait_for_line(out, r"tick 2 ", proc=proc)
    tracer = trace_with_another_tracer(procs, proc.pid, tmp_path)
    rc, report, _ = crcheck(proc.pid)
    assert rc == 6
    assert report["problems"] == [f"pid {proc.pid}: traced by pid {tracer.pid} — unsupported "
                                  "(a traced task cannot be frozen by crelf; detach the "
                                  "other tracer first)"]


def test_supported_program_passes_and_bad_policy_is_one_line(sample_bin, procs, tmp_path):
    require_root()
    out = tmp_path / "mt.out"
    proc = procs.spawn([sample_bin / "mt_values"], stdout=out)
    wait_for_line(out, r"tick 2 ", proc=proc)
    rc, report, _ = crcheck(proc.pid)
    assert rc == 0 and report["checkpointable"] and report["problems"] == []
    assert report["tasks"][0]["threads"] == 4
    bad = tmp_path / "bad.toml"
    bad.write_text('skip = ["everything"]\n')
    res = subprocess.run([str(BIN / "crcheck"), str(proc.pid), "--policy", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and "unknown policy class 'everything'" in res.stderr


def test_scratch_memory_is_left_out_by_policy(procs, tmp_path):
    """Memory an application marks MADV_DONTDUMP is not stored under --skip scratch."""
    require_root()
    out = tmp_path / "s.out"
    prog = (
        "import mmap, time\n"
        "m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "m.write(b'x' * (64 << 20))\n"
        "m.madvise(mmap.MADV_DONTDUMP)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")
    proc = procs.spawn([sys.executable, "-c", prog], stdout=out)
    wait_for_line(out, "ready", proc=proc)
    full = checkpoint(proc.pid, tmp_path / "full.cr")
    lean = checkpoint(proc.pid, tmp_path / "lean.cr", "--skip", "scratch")
    assert full["bytes_stored"] - lean["bytes_stored"] >= 64 << 20
    sf = reader.load(str(tmp_path / "lean.cr"))
    scratch = [m for m in sf.root["mappings"] if m.get("skipped")]
    assert len(scratch) == 1 and scratch[0]["skipped"] == "scratch"
    assert sf.header["skipped"][0]["why"] == "scratch"


def test_crrun_flag_is_seen_by_crcheck_and_skippable(sample_bin, procs, tmp_path):
    """A program started under crrun that creates an io_uring: crcheck names the
    flag (crrun's own seccomp filter is not a problem), a policy skips it, and
    the statefile keeps the flag."""
    require_root()
    out = tmp_path / "u.out"
    crrun = procs.spawn([BIN / "crrun", "--", sample_bin / "unsupported", "uring"], stdout=out,
                        stderr=tmp_path / "crrun.err")
    wait_for_line(out, r"ready fd=3", proc=crrun)
    pid = int(subprocess.run(["pgrep", "-P", str(crrun.pid), "unsupported"],
                             capture_output=True, text=True).stdout.split()[0])
    rc, report, _ = crcheck(pid)
    assert rc == 6
    assert [f["key"] for f in report["findings"] if f["status"] != "supported"] == \
        ["task:flagged", "fd:io_uring"]
    rc, report, _ = crcheck(pid, "--skip", "io_uring")
    assert rc == 0
    summary = checkpoint(pid, tmp_path / "u.cr", "--skip", "io_uring")
    assert len(summary["skipped"]) == 2
    sf = reader.load(str(tmp_path / "u.cr"))
    assert sf.root["crrun"] is True
    assert [f["syscall"] for f in sf.root["crrun_flags"]] == ["io_uring_setup"]


# --- skipped resources come back as the policy says --------------------------

def _restart_detached(statefile):
    res = subprocess.run([str(BIN / "crrestart"), "--detach", str(statefile)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stderr


def test_restart_after_skipping(unsupported, tmp_path):
    """Checkpoint (--kill) with the policy that skips the resource, crinspect
    lists what was skipped, crrestart says what it did about it, and the rest
    of the program comes back and ticks on where it stopped."""
    proc, out, fd, (key, policy_class, _) = unsupported
    cr = tmp_path / "u.cr"
    summary = checkpoint(proc.pid, cr, "--kill", "--skip", policy_class)
    assert summary["killed"] and summary["restartable"]
    proc.wait(timeout=10)
    last = int(read_lines(out)[-1].split()[1]) if read_lines(out)[-1].startswith("tick") else 0
    shown = subprocess.run([str(BIN / "crinspect"), "--json", str(cr)], capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    skipped = json.loads(shown.stdout)["header"]["skipped"]
    assert [s["where"] for s in skipped] == [f"pid {proc.pid} fd {fd}"]
    said = _restart_detached(cr)
    assert f"fd {fd}:" in said and f"policy '{policy_class}'" in said
    wait_for_line(out, rf"^tick {last + 3}$", timeout=20)
    ticks = [int(line.split()[1]) for line in read_lines(out) if line.startswith("tick")]
    assert ticks == list(range(1, len(ticks) + 1))
    fds = os.listdir(f"/proc/{proc.pid}/fd")
    if policy_class == "network":
        # The TCP connection comes back as a fresh, unconnected socket: the
        # program sees a broken connection, as after a network failure.
        link = os.readlink(f"/proc/{proc.pid}/fd/{fd}")
        assert link.startswith("socket:")
        dup = dup_fd_of(proc.pid, fd)
        try:
            s = socket.socket(fileno=dup)
            with pytest.raises(OSError):
                s.getpeername()
            s.detach()
        finally:
            os.close(dup)
    else:
        assert str(fd) not in fds, "a skipped io_uring/perf fd must be restored closed"


def test_file_contents_and_tmpfs_policies(procs, tmp_path):
    """file-contents: a deleted file's content is left out (restored as zeros);
    dump_tmpfs: a file on tmpfs that is gone at restart is recreated from the
    statefile."""
    require_root()
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        prog = tmp_path / "files.py"
        prog.write_text(
            "import os, sys, time\n"
            f"keep = open({str(shm / 'data')!r}, 'w+'); keep.write('tmpfs says hello\\n'); keep.flush()\n"
            f"gone = open({str(tmp_path / 'gone')!r}, 'w+'); gone.write('secret' * 100); gone.flush()\n"
            f"os.unlink({str(tmp_path / 'gone')!r})\n"
            "print('ready', flush=True)\n"
            "n = 0\n"
            "while True:\n"
            "    n += 1; time.sleep(0.1)\n"
            "    keep.seek(0); gone.seek(0)\n"
            "    print('tick', n, keep.read().strip(), repr(gone.read(6)), flush=True)\n")
        out = tmp_path / "f.out"
        proc = procs.spawn([sys.executable, prog], stdout=out, stderr=tmp_path / "f.err")
        wait_for_line(out, r"^tick 2 ", proc=proc)
        cr = tmp_path / "f.cr"
        summary = checkpoint(proc.pid, cr, "--kill", "--dump-tmpfs", "--skip", "file-contents")
        proc.wait(timeout=10)
        assert [s["why"] for s in summary["skipped"]] == ["file-contents"], summary["skipped"]
        os.unlink(shm / "data")  # as on another host
        said = _restart_detached(cr)
        assert "recreated from the content saved" in said and "restored as zeros" in said
        line = wait_for_line(out, r"tick \d+ tmpfs says hello '\\x00", timeout=20)
        assert "'\\x00\\x00\\x00\\x00\\x00\\x00'" in line
        assert (shm / "data").read_text() == "tmpfs says hello\n"
    finally:
        shutil.rmtree(shm, ignore_errors=True)
