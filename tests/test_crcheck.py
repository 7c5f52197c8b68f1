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
from test_restart_unpriv import NOBODY, as_nobody, nobody_dir  # noqa: F401 (a fixture)

from statefile.check import flags, support
from statefile.control import procfs
from statefile.format import reader
from statefile.control.ptrace import dup_fd_of

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
c.close()       # its connection stays queued, never accepted (the backlog is not restored)
print("ready fd=%d port=%d" % (srv.fileno(), srv.getsockname()[1]), flush=True)
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
    fd = int(wait_for_line(out, r"ready fd=", proc=proc).split()[1].split("=")[1])
    assert fd >= 0, f"could not create the {request.param} resource: errno {-fd}"
    expect = {"uring": ("fd:io_uring", "io_uring", "io_uring instances cannot be checkpointed"),
              "perf": ("fd:perf_event", "perf", "perf events cannot be checkpointed"),
              "inet": ("fd:socket:inet", "network", "queued connections")}
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
    assert sf.header.skipped[0].why == policy_class
    entry = sf.files[next(d.file for d in sf.root.fds if d.fd == fd)]
    assert entry.skipped == policy_class
    assert_keeps_ticking(out, proc)


def test_traced_process_is_named(sample_bin, procs, tmp_path):
    require_root()
    out = tmp_path / "mt.out"
    proc = procs.spawn([sample_bin / "mt_values"], stdout=out)
    wait_for_line(out, r"tick 2 ", proc=proc)
    tracer = trace_with_another_tracer(procs, proc.pid, tmp_path)
    rc, report, _ = crcheck(proc.pid)
    assert rc == 6
    assert [p for p in report["problems"] if "traced" in p] == \
        [f"pid {proc.pid}: traced by pid {tracer.pid} ({procfs.stat(tracer.pid)['comm']}) "
         "— unsupported (a traced task cannot be frozen by crelf; detach the other tracer "
         "first)"]


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
    scratch = [m for m in sf.root.mappings if m.skipped]
    assert len(scratch) == 1 and scratch[0].skipped == "scratch"
    assert sf.header.skipped[0].why == "scratch"


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
    # the flag's verdict is the io_uring row's, with the time crrun saw it
    flag = flags.read(pid)[0]
    hit = report["findings"][[f["key"] for f in report["findings"]].index("task:flagged")]
    assert (hit["row"], hit["status"], hit["policy"], hit["time"]) == \
        ("fd:io_uring", "skippable", "io_uring", flag.time)
    assert f"flagged by crrun at {support.flag_time(flag)}: io_uring_setup" in hit["line"]
    text = subprocess.run([str(BIN / "crcheck"), str(pid)], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 6 and f"  {hit['line']}" in text.stdout.splitlines()
    rc, report, _ = crcheck(pid, "--skip", "io_uring")
    assert rc == 0
    summary = checkpoint(pid, tmp_path / "u.cr", "--skip", "io_uring")
    assert len(summary["skipped"]) == 2
    sf = reader.load(str(tmp_path / "u.cr"))
    assert sf.root.crrun is True
    assert [f.syscall for f in sf.root.crrun_flags] == ["io_uring_setup"]


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
        # The listening socket comes back listening on its port, its queue empty.
        port = int(read_lines(out)[0].split("port=")[1])
        dup = dup_fd_of(proc.pid, fd)
        try:
            s = socket.socket(fileno=dup)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert s.getsockname() == ("127.0.0.1", port)
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.accept()
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


# --- a child traced by another tracer ------------------------------------------

TRACED_TREE = """
import ctypes, os, time
params = ctypes.create_string_buffer(120)
fd = ctypes.CDLL(None, use_errno=True).syscall(425, 8, params)   # io_uring_setup
child = os.fork()
who = "child" if child == 0 else "parent"
if not child:
    os.close(fd)                  # only the parent holds the io_uring
else:
    os.write(1, b"ready fd=%d child=%d\\n" % (fd, child))
n = 0
while True:     # one write per line: both processes share the file
    n += 1; time.sleep(0.1); os.write(1, b"%s tick %d\\n" % (who.encode(), n))
"""


def test_traced_child_is_a_finding_and_the_tree_runs_on(procs, tmp_path):
    """A child traced by another tracer: crcheck and crcheckpoint name it (with
    the tracer's pid and name) among every other reason; crcheckpoint exits 6,
    writes nothing, even with --snapshot; the tree runs on, still traced.  The
    root itself traced stays a target error (exit 3)."""
    require_root()
    out = tmp_path / "t.out"
    proc = procs.spawn([sys.executable, "-c", TRACED_TREE], stdout=out)
    ready = wait_for_line(out, r"^ready fd=", proc=proc)
    fd, child = (int(kv.split("=")[1]) for kv in ready.split()[1:])
    assert fd >= 0
    wait_for_line(out, r"^child tick 2$", proc=proc)
    tracer = trace_with_another_tracer(procs, child, tmp_path)
    traced = (f"pid {child}: traced by pid {tracer.pid} ({procfs.stat(tracer.pid)['comm']}) "
              "— unsupported (a traced task cannot be frozen by crelf; detach the other "
              "tracer first)")
    rc, report, _ = crcheck(proc.pid)
    assert rc == 6
    assert traced in report["problems"] and len(report["problems"]) == 2, report["problems"]
    assert any(p.startswith(f"pid {proc.pid} fd {fd}: ") and "io_uring" in p
               for p in report["problems"])

    cr = tmp_path / "t.cr"
    for extra in ((), ("--snapshot",)):
        res = checkpoint(proc.pid, cr, *extra, check=False)
        assert res.returncode == 6, res.stderr
        assert "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()
        assert lines[0] == (f"crcheckpoint: error: pid {proc.pid} cannot be checkpointed "
                            "(2 problem(s); nothing was written, the tree runs on):")
        assert f"  CR: {traced}" in lines[1:] and len(lines) == 3
        assert any(x.startswith(f"  CR: pid {proc.pid} fd {fd}: ") for x in lines[1:])
        assert not cr.exists() and not list(tmp_path.glob(".t.cr*"))
    res = checkpoint(proc.pid, cr, "--skip", "io_uring", check=False)
    assert res.returncode == 6 and res.stderr.strip().splitlines()[1:] == [f"  CR: {traced}"]
    assert not cr.exists()
    assert_keeps_ticking(out, proc, r"^parent tick (\d+)$")
    assert_keeps_ticking(out, proc, r"^child tick (\d+)$")
    assert procfs.status(child)["TracerPid"] == str(tracer.pid)
    res = checkpoint(child, cr, check=False)                 # the root itself traced
    assert res.returncode == 3 and f"already traced by pid {tracer.pid}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not cr.exists()


# --- policy 'network': what the application sees after the restart ---------------

TCP_CLIENT = """
import errno, socket, sys, time
port = int(sys.argv[1])
c = socket.create_connection(("127.0.0.1", port))
print("ready fd=%d" % c.fileno(), flush=True)
n = 0
while True:
    n += 1
    time.sleep(0.1)
    try:
        c.sendall(b"tick %d\\n" % n)
        print("tick %d sent" % n, flush=True)
    except OSError as e:
        print("tick %d send %s" % (n, errno.errorcode[e.errno]), flush=True)
        try:
            c.recv(1)
            print("recv ok", flush=True)
        except OSError as e:
            print("recv %s" % errno.errorcode[e.errno], flush=True)
        c.connect(("127.0.0.1", port))
        c.sendall(b"again %d\\n" % n)
        print("reconnected", flush=True)
"""


def test_skipped_tcp_connection_is_broken_and_can_reconnect(procs, tmp_path, nobody_dir):
    """What docs/SUPPORT.md says about policy 'network' (fd:socket:tcp-norepair):
    a client run and checkpointed by user 65534, who may not use TCP repair
    mode, with `--skip network`: the restarted client's connected socket is a
    new unconnected one on the same fd: its next send fails with EPIPE, recv
    with ENOTCONN, and connect() on it reaches the server again."""
    require_root()
    reason = support.BY_KEY["fd:socket:tcp-norepair"].reason
    assert "TCP_REPAIR" in reason and "new unconnected socket" in reason
    reason = support.BY_KEY["fd:socket:inet"].reason
    assert "ENOTCONN" in reason and "EPIPE" in reason and "reconnects" in reason
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(30)
    try:
        out = tmp_path / "c.out"
        proc = procs.spawn(as_nobody(sys.executable, "-c", TCP_CLIENT, srv.getsockname()[1]),
                           stdout=out, stderr=tmp_path / "c.err")
        first, _ = srv.accept()
        fd = int(wait_for_line(out, r"^ready fd=", proc=proc).split("=")[1])
        wait_for_line(out, r"^tick 3 sent$", proc=proc)
        cr = nobody_dir / "c.cr"
        summary = checkpoint(proc.pid, cr, "--kill", "--skip", "network", user=NOBODY)
        assert [s["where"] for s in summary["skipped"]] == [f"pid {proc.pid} fd {fd}"]
        proc.wait(timeout=10)
        first.close()
        before = read_lines(out)
        said = _restart_detached(cr)
        assert f"fd {fd}:" in said and "restored unconnected" in said
        second, _ = srv.accept()
        second.settimeout(30)
        got = b""
        while b"\n" not in got:
            chunk = second.recv(100)
            assert chunk, "the reconnected client closed"
            got += chunk
        wait_for_line(out, r"^reconnected$", timeout=20)
        after = read_lines(out)[len(before):]
        broken = [i for i, line in enumerate(after) if " send " in line]
        assert len(broken) == 1, after
        i = broken[0]
        n = int(after[i].split()[1])
        assert after[i:i + 3] == [f"tick {n} send EPIPE", "recv ENOTCONN", "reconnected"]
        assert got.startswith(f"again {n}\n".encode())
        ticks = [int(x.split()[1]) for x in before + after if x.startswith("tick ")]
        assert ticks == list(range(1, len(ticks) + 1))
        second.close()
    finally:
        srv.close()


# --- crcheck does not disturb the target ----------------------------------------

def test_crcheck_leaves_the_target_running(sample_bin, procs, tmp_path):
    """crcheck on a ticking program: its output goes on, byte-identical to an
    uninterrupted run; crcheck -v's text names each resource with its verdict."""
    require_root()
    ref, out = tmp_path / "ref.out", tmp_path / "t.out"
    args = ["150", "4", "50"]                                  # 150 ticks, 4 MiB, 50 ms
    reference = procs.spawn([sample_bin / "ticker", *args], stdout=ref)
    proc = procs.spawn([sample_bin / "ticker", *args], stdout=out)
    wait_for_line(out, r"^tick 3 ", proc=proc)
    _, report, _ = crcheck(proc.pid)
    for _ in range(2):
        res = subprocess.run([str(BIN / "crcheck"), "-v", str(proc.pid)], capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"pid {proc.pid} (ticker): 1 thread(s), ")
    assert f"  pid {proc.pid}: ticker (1 threads) — supported" in lines
    assert f"  pid {proc.pid} fd 0: /dev/null (chr) — supported" in lines
    assert f"  pid {proc.pid} fd 1: {out} (regular) — supported" in lines
    assert lines[-1] == f"crcheck: pid {proc.pid} can be checkpointed"
    assert "done" not in read_lines(out), "the ticker ended before crcheck was done"
    assert {f["key"] for f in report["findings"]} >= {"task:process", "fd:dev", "fd:regular"}
    assert all(f["status"] == "supported" for f in report["findings"])
    assert proc.wait(timeout=60) == 0 and reference.wait(timeout=60) == 0
    assert out.read_bytes() == ref.read_bytes()
    assert read_lines(out)[-1] == "done"


# --- a snapshot-only statefile ---------------------------------------------------

def test_snapshot_statefile_is_not_restartable(sample_bin, procs, tmp_path):
    """--snapshot of a tree holding an io_uring, without --kill: the statefile is
    written, crinspect says it is not restartable and why, crrestart refuses it
    with one line naming why and starts nothing; the tree runs on."""
    require_root()
    out = tmp_path / "u.out"
    exe = sample_bin / "unsupported"
    proc = procs.spawn([exe, "uring"], stdout=out)
    fd = int(wait_for_line(out, r"ready fd=", proc=proc).split("=")[1])
    assert fd >= 0
    cr = tmp_path / "u.cr"
    res = checkpoint(proc.pid, cr, "--snapshot", check=False)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["restartable"] is False
    why = summary["not_restartable"]
    assert len(why) == 1 and why[0].startswith(f"pid {proc.pid} fd {fd}: ") and "io_uring" in why[0]
    assert_keeps_ticking(out, proc)

    text = subprocess.run([str(BIN / "crinspect"), str(cr)], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 0, text.stderr
    assert "restartable: NO (snapshot only)" in text.stdout
    assert f"not restartable: {why[0]}" in text.stdout
    js = json.loads(subprocess.run([str(BIN / "crinspect"), "--json", str(cr)],
                                   capture_output=True, text=True, timeout=60).stdout)
    assert js["header"]["restartable"] is False and js["header"]["not_restartable"] == why

    def running():
        return sorted(int(p) for p in os.listdir("/proc") if p.isdigit()
                      and _exe(int(p)) == str(exe))
    assert running() == [proc.pid]
    for argv in ([str(BIN / "crrestart"), str(cr)],
                 [str(BIN / "crrestart"), "--detach", "--pidns", str(cr)]):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "not restartable" in res.stderr and why[0] in res.stderr
        assert running() == [proc.pid]
    assert_keeps_ticking(out, proc)


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
