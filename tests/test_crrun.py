"""crrun: the seccomp monitor flags (or, with --strict, denies) the syscalls
that create state crelf cannot checkpoint, on real processes."""

from __future__ import annotations

import datetime
import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import pid_alive, require_root, require_tool, wait_for_line

from statefile.check import flags, monitor, support

BIN = Path(sys.executable).parent

#: crrun until pyproject.toml gets `crrun = "statefile.check.crrun:main"`
CRRUN = [sys.executable, "-m", "statefile.check.crrun"]

WATCHED_C = r"""
/* Performs one watched (or allowed) syscall, prints
 * "pid=P tid=T t=UNIXTIME result=R" (R: fd / return value, or -errno), then
 * sleeps until killed.  Modes: uring (io_uring_setup via syscall()), thread
 * (the same from a second thread), ptrace (PTRACE_ATTACH a forked child;
 * PTRACE_PEEKDATA first, which is not watched), i386 (io_uring_setup through
 * int 0x80), sockcall / sockcall-inet (socketcall(SYS_SOCKET) of AF_PACKET /
 * AF_INET through int 0x80). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static void report(double t, long r) {
    printf("pid=%d tid=%d t=%.6f result=%ld\n", getpid(), (int)gettid(), t, r);
    fflush(stdout);
}
static long ret(long r) { return r < 0 ? -(long)errno : r; }
static long int80(long nr, long a, long b) {
    long r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b) : "memory");
    return r;
}
static void *uring(void *arg) {
    unsigned char params[120]; memset(params, 0, sizeof params);
    double t = now();
    report(t, ret(syscall(SYS_io_uring_setup, 8, params)));
    return arg;
}
int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "uring";
    if (!strcmp(mode, "uring")) {
        uring(NULL);
    } else if (!strcmp(mode, "thread")) {
        pthread_t th; pthread_create(&th, NULL, uring, NULL); pthread_join(th, NULL);
    } else if (!strcmp(mode, "ptrace")) {
        pid_t c = fork();
        if (c == 0) { for (;;) pause(); }
        ptrace(PTRACE_PEEKDATA, getpid(), (void *)main, 0);
        double t = now();
        long r = ret(ptrace(PTRACE_ATTACH, c, 0, 0));
        if (r == 0) waitpid(c, NULL, 0);
        report(t, r);
    } else {
        unsigned *low = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
        double t = now();
        if (!strcmp(mode, "i386")) {
            report(t, int80(425, 8, (long)low));
        } else {
            int inet = strcmp(mode, "sockcall") != 0;
            low[0] = inet ? 2 : 17; low[1] = inet ? 2 : 3; low[2] = 0;
            report(t, int80(102, 1, (long)low));
        }
    }
    for (;;) pause();
}
"""

ALLOWED_PY = """
import ctypes, os, socket, sys
a, b = socket.socketpair()
for fam in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK):
    socket.socket(fam, socket.SOCK_DGRAM).close()
socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
ctypes.CDLL(None).ptrace(1, os.getpid(), 0, 0)    # PTRACE_PEEKTEXT: not watched
with open(sys.argv[1], "w") as f:
    f.write("hi\\n")
sys.exit(5)
"""


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> Path:
    """The test program above, compiled."""
    gcc = require_tool("gcc")
    d = tmp_path_factory.mktemp("crrun-bin")
    (d / "watched.c").write_text(WATCHED_C)
    res = subprocess.run([gcc, "-O2", "-pthread", "-o", str(d / "watched"), str(d / "watched.c")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return d / "watched"


@pytest.fixture
def flag_pids():
    """Pids whose flag files the test created: removed at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        for path in glob.glob(os.path.join(flags.flag_dir(), f"{pid}-*.jsonl")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def parse(line: str) -> dict:
    return {k: (float(v) if k == "t" else int(v))
            for k, v in (kv.split("=") for kv in line.split())}


def run_watched(procs, watched, tmp_path, mode, *crrun_args):
    """Start `crrun [args] -- watched MODE`; return (crrun Popen, program's
    report line as a dict, stderr path, json log path)."""
    out, err, log = tmp_path / "out", tmp_path / "err", tmp_path / "log.jsonl"
    proc = procs.spawn([*CRRUN, *crrun_args, "--json-log", log, "--", watched, mode],
                       stdout=out, stderr=err)
    return proc, parse(wait_for_line(out, r"^pid=.* result=", proc=proc)), err, log


def wait_flags(pid: int, timeout: float = 1.0) -> list:
    deadline = time.monotonic() + timeout
    while not (got := flags.read(pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return got


def fd_targets(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return out


# ------------------------------------------------------------------ the filter

def test_filter_and_ioctl_numbers():
    """The ioctl numbers match the kernel's struct sizes, and the program
    checks the architecture first."""
    sizes = monitor.notif_sizes()
    assert sizes.seccomp_notif == 80 and sizes.seccomp_notif_resp == 24
    assert sizes.seccomp_data == 64
    assert monitor.SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert monitor.SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101
    prog = monitor.build_filter()
    assert prog[0] == (monitor.BPF_LD_W_ABS, 0, 0, monitor.OFF_ARCH)
    assert prog[1][3] == monitor.AUDIT_ARCH_X86_64
    assert len(monitor.filter_bytes()) == 8 * len(prog) < 8 * 4096


# ------------------------------------------------------------------- io_uring

def test_io_uring_flagged_at_once(procs, watched, tmp_path, flag_pids):
    require_root()
    proc, rep, err, log = run_watched(procs, watched, tmp_path, "uring")
    pid = rep["pid"]
    flag_pids.append(pid)
    assert rep["result"] >= 0, f"io_uring_setup failed under crrun: errno {-rep['result']}"
    assert "anon_inode:[io_uring]" in fd_targets(pid)      # the call really ran
    got = wait_flags(pid)
    assert len(got) == 1, got
    f = got[0]
    assert (f.syscall, f.nr, f.action, f.resource) == \
        ("io_uring_setup", 425, "flagged", "fd:io_uring")
    assert f.pid == f.tid == pid
    assert "io_uring" in f.reason
    assert 0 <= f.time - rep["t"] < 1.0                  # at the moment of the call
    line = wait_for_line(err, r"^crrun: pid \d+: io_uring_setup at ")
    assert f"pid {pid}:" in line and "not checkpointable" in line
    logged = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["pid"], x["syscall"], x["action"]) for x in logged] == \
        [(pid, "io_uring_setup", "flagged")]
    assert proc.poll() is None


def test_io_uring_strict_denied(procs, watched, tmp_path, flag_pids):
    require_root()
    _proc, rep, err, _log = run_watched(procs, watched, tmp_path, "uring", "--strict")
    pid = rep["pid"]
    flag_pids.append(pid)
    assert rep["result"] == -errno.ENOSYS
    assert "anon_inode:[io_uring]" not in fd_targets(pid)
    got = wait_flags(pid)
    assert [(f.syscall, f.action, f.errno) for f in got] == \
        [("io_uring_setup", "denied", "ENOSYS")]
    assert "denied with ENOSYS" in wait_for_line(err, r"^crrun: pid \d+: io_uring_setup")


def test_flag_of_a_thread_goes_to_its_process(procs, watched, tmp_path, flag_pids):
    require_root()
    _proc, rep, _err, _log = run_watched(procs, watched, tmp_path, "thread")
    flag_pids.append(rep["pid"])
    assert rep["tid"] != rep["pid"] and rep["result"] >= 0
    got = wait_flags(rep["pid"])
    assert [(f.pid, f.tid) for f in got] == [(rep["pid"], rep["tid"])]


def test_descendants_are_watched(procs, watched, tmp_path, flag_pids):
    """The filter is inherited: a grandchild started by a shell is flagged."""
    require_root()
    out = tmp_path / "out"
    procs.spawn([*CRRUN, "--", "sh", "-c", f"{watched} uring; true"], stdout=out,
                stderr=tmp_path / "err")
    rep = parse(wait_for_line(out, r"^pid="))
    flag_pids.append(rep["pid"])
    assert [f.syscall for f in wait_flags(rep["pid"])] == ["io_uring_setup"]


def test_orphans_stay_watched_after_command_exits(procs, watched, tmp_path, flag_pids):
    """crrun returns the command's status at once; a background monitor keeps
    watching what the command left running."""
    require_root()
    out = tmp_path / "out"
    proc = procs.spawn([*CRRUN, "--", "sh", "-c", f"(sleep 0.5; exec {watched} uring) & exit 4"],
                       stdout=out, stderr=tmp_path / "err")
    assert proc.wait(timeout=5) == 4
    rep = parse(wait_for_line(out, r"^pid=", timeout=5))
    flag_pids.append(rep["pid"])
    assert rep["result"] >= 0
    assert [f.action for f in wait_flags(rep["pid"])] == ["flagged"]


# ----------------------------------------------------- other watched syscalls

def test_ptrace_attach_flagged(procs, watched, tmp_path, flag_pids):
    require_root()
    _proc, rep, _err, _log = run_watched(procs, watched, tmp_path, "ptrace")
    flag_pids.append(rep["pid"])
    assert rep["result"] == 0
    got = wait_flags(rep["pid"])
    assert [(f.syscall, f.resource) for f in got] == [("ptrace", "task:ptrace")]
    assert "PTRACE_ATTACH" in got[0].reason                 # PEEKDATA was not flagged


@pytest.mark.parametrize("strict", [False, True])
def test_unsupported_socket_family(procs, tmp_path, flag_pids, strict):
    require_root()
    out = tmp_path / "out"
    code = ("import os, socket, time\n"
            "try:\n"
            "    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); r = s.fileno()\n"
            "except OSError as e:\n"
            "    r = -e.errno\n"
            "print(f'pid={os.getpid()} result={r}', flush=True)\n"
            "time.sleep(100)\n")
    procs.spawn([*CRRUN, *(["--strict"] if strict else []), "--", sys.executable, "-c", code],
                stdout=out, stderr=tmp_path / "err")
    rep = parse(wait_for_line(out, r"^pid="))
    flag_pids.append(rep["pid"])
    got = wait_flags(rep["pid"])
    assert [(f.syscall, f.resource) for f in got] == [("socket", "fd:socket:other")]
    assert "AF_PACKET" in got[0].reason
    if strict:
        assert rep["result"] == -errno.EAFNOSUPPORT and got[0].action == "denied"
    else:
        assert rep["result"] >= 0 and got[0].action == "flagged"


@pytest.mark.parametrize("mode,expect", [("i386", "io_uring_setup"), ("sockcall", "socketcall"),
                                         ("sockcall-inet", None)])
def test_i386_syscalls(procs, watched, tmp_path, flag_pids, mode, expect):
    """Syscalls made through int 0x80 (the i386 ABI) are watched too; an
    allowed socketcall family is not flagged."""
    require_root()
    _proc, rep, _err, log = run_watched(procs, watched, tmp_path, mode)
    flag_pids.append(rep["pid"])
    assert rep["result"] >= 0
    if expect:
        assert [f.syscall for f in wait_flags(rep["pid"])] == [expect]
    else:
        time.sleep(0.2)
        assert flags.read(rep["pid"]) == [] and log.read_text() == ""


# ------------------------------------------------------------- allowed things

def test_allowed_calls_never_reach_the_monitor(tmp_path):
    """unix/inet/inet6/netlink sockets and non-attaching ptrace requests are
    decided in the filter: the monitor receives no notification at all."""
    require_root()
    proc, listener = monitor.launch([sys.executable, "-c", ALLOWED_PY, str(tmp_path / "f")])
    mon = monitor.Monitor(listener, flag_dir=str(tmp_path / "flags"))
    thread = monitor.start_thread(mon)
    try:
        assert proc.wait(timeout=30) == 5
        thread.join(5)
        assert thread.hung_up                  # POLLHUP once the tree is gone
        assert mon.received == 0 and mon.events == []
        assert (tmp_path / "f").read_text() == "hi\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mon.stop()
        mon.close()


def test_allowed_program_exit_code_and_no_flags(tmp_path):
    require_root()
    log = tmp_path / "log.jsonl"
    res = subprocess.run([*CRRUN, "--json-log", str(log), "--", "sh", "-c",
                          f"echo hi > {tmp_path / 'file'}; exit 3"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 3, res.stderr
    assert (tmp_path / "file").read_text() == "hi\n"
    assert res.stderr == "" and log.read_text() == ""
    res = subprocess.run([*CRRUN, "--", sys.executable, "-c", ALLOWED_PY, str(tmp_path / "g")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 5 and res.stderr == ""


# ------------------------------------------------------------------ the CLI

def test_exit_status_of_signals_and_forwarding(procs, tmp_path):
    require_root()
    out = tmp_path / "out"
    proc = procs.spawn([*CRRUN, "--", "sh", "-c", "echo $$; exec sleep 100"], stdout=out,
                       stderr=tmp_path / "err")
    child = int(wait_for_line(out, r"^\d+$"))
    time.sleep(0.2)  # crrun's handlers are set before the program starts; be generous anyway
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert not pid_alive(child)


def test_command_not_found_and_policy(tmp_path):
    res = subprocess.run([*CRRUN, "--", str(tmp_path / "nope")], capture_output=True, text=True)
    assert res.returncode == 127 and "not found" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("skip = [\n")
    res = subprocess.run([*CRRUN, "--policy", str(bad), "--", "true"], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "not valid TOML" in res.stderr
    good = tmp_path / "good.toml"
    good.write_text('skip = ["network"]\n')
    res = subprocess.run([*CRRUN, "--policy", str(good), "--", "sh", "-c", "echo $CRELF_POLICY"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == str(good)


# ------------------------------------------------------------------ --policy

def _child_of(pid: int, name: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = subprocess.run(["pgrep", "-P", str(pid), name], capture_output=True, text=True)
        if res.stdout.split():
            return int(res.stdout.split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no child {name} of pid {pid}")


@pytest.mark.parametrize("skip,allowed", [("io_uring", True), ("perf", False)])
def test_strict_spares_what_the_policy_skips(procs, watched, tmp_path, flag_pids, skip, allowed):
    """crrun --strict --policy FILE: a creation of a class the policy skips runs
    (recorded, marked skippable by the policy, not announced); any other is
    refused as without a policy."""
    require_root()
    pfile = tmp_path / "p.toml"
    pfile.write_text(f'skip = ["{skip}"]\n')
    _proc, rep, err, log = run_watched(procs, watched, tmp_path, "uring", "--strict",
                                       "--policy", str(pfile))
    pid = rep["pid"]
    flag_pids.append(pid)
    got = wait_flags(pid)
    assert len(got) == 1 and got[0].policy_file == str(pfile)
    if allowed:
        assert rep["result"] >= 0 and "anon_inode:[io_uring]" in fd_targets(pid)
        assert got[0].action == "flagged" and got[0].policy == "io_uring"
        time.sleep(0.2)
        assert "io_uring_setup" not in err.read_text()      # not announced as a warning
        assert [x["policy"] for x in map(json.loads, log.read_text().splitlines())] == \
            ["io_uring"]
    else:
        assert rep["result"] == -errno.ENOSYS
        assert got[0].action == "denied" and got[0].policy is None
        assert "denied with ENOSYS" in wait_for_line(err, r"^crrun: pid \d+: io_uring_setup")


def test_crrun_policy_is_used_later_and_crinspect_shows_the_flag(procs, sample_bin, tmp_path,
                                                                 flag_pids):
    """A program started with crrun --policy: crcheck and crcheckpoint without
    --policy use crrun's policy; an explicit --policy wins; crinspect shows the
    flag with its time and reason, in text and JSON."""
    require_root()
    pfile = tmp_path / "p.toml"
    pfile.write_text('skip = ["io_uring"]\n')
    out = tmp_path / "u.out"
    crrun = procs.spawn([*CRRUN, "--policy", str(pfile), "--", sample_bin / "unsupported",
                         "uring"], stdout=out, stderr=tmp_path / "crrun.err")
    wait_for_line(out, r"ready fd=3", proc=crrun)
    pid = _child_of(crrun.pid, "unsupported")
    flag_pids.append(pid)
    flag = wait_flags(pid)[0]

    res = subprocess.run([str(BIN / "crcheck"), str(pid), "--json"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["policy"]["source"] == str(pfile)
    assert report["policy"]["from_crrun"] == pid and report["policy"]["skip"] == ["io_uring"]
    flagged = [f for f in report["findings"] if f["key"] == "task:flagged"]
    assert len(flagged) == 1 and flagged[0]["skipped"] and flagged[0]["row"] == "fd:io_uring"

    other = tmp_path / "other.toml"
    other.write_text('skip = ["perf"]\n')
    res = subprocess.run([str(BIN / "crcheck"), str(pid), "--json", "--policy", str(other)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 6 and json.loads(res.stdout)["policy"]["source"] == str(other)

    cr = tmp_path / "u.cr"
    res = subprocess.run([str(BIN / "crcheckpoint"), str(pid), "-o", str(cr), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert sorted(s["key"] for s in summary["skipped"]) == ["fd:io_uring", "task:flagged"]
    wait_for_line(out, r"^tick 3$", proc=crrun)           # it runs on

    iso = datetime.datetime.fromtimestamp(flag.time).isoformat(timespec="milliseconds")
    text = subprocess.run([str(BIN / "crinspect"), str(cr)], capture_output=True, text=True,
                          timeout=60)
    assert text.returncode == 0, text.stderr
    shown = [x.strip() for x in text.stdout.splitlines() if "flagged by crrun" in x]
    # the header's "skipped" list names it, the process tree shows the flag
    assert shown[0] == f"pid {pid}: flagged by crrun at {iso}: io_uring_setup (policy io_uring)"
    line = shown[1]
    assert line.strip() == (f"pid {pid}: flagged by crrun at {iso}: io_uring_setup — "
                            f"{support.BY_KEY['fd:io_uring'].reason} "
                            "[skippable by policy 'io_uring']")
    js = subprocess.run([str(BIN / "crinspect"), "--json", str(cr)], capture_output=True,
                        text=True, timeout=60)
    task = next(t for t in json.loads(js.stdout)["tasks"] if t["pid"] == pid)
    assert task["crrun"] is True
    assert [(f["syscall"], f["time"], f["iso_time"], f["denied"], f["reason"])
            for f in task["crrun_flags"]] == \
        [("io_uring_setup", flag.time, iso, False, flag.reason)]
