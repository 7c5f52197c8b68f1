"""timerfd, eventfd, inotify, signalfd and epoll state restarted exactly
(statefile/dump/anon.py, restorer/restore/anon.py): small Python programs
checkpointed with --kill while they hold the state, restarted, and checked
on what they read afterwards (samples/eventloop.py covers the event loop as
a whole; these pin down the details it cannot see).

Each program prints "ready" once its state is set up, then waits for a "go"
file (so the test knows it runs after the restart) before it reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from helpers import read_lines, require_root, wait_for_line
from test_checkpoint import checkpoint
from test_tree import finish, restart

from statefile.format import reader

PRELUDE = r'''
import ctypes, os, select, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
class itimerspec(ctypes.Structure):
    _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long),
                ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]
class epoll_event(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]
GO = sys.argv[1]
def wait_go():
    while not os.path.exists(GO):
        time.sleep(0.02)
    print("go seen", flush=True)
def remaining_ns(fd):
    cur = itimerspec()
    assert libc.timerfd_gettime(fd, ctypes.byref(cur)) == 0
    return cur.v_sec * 10**9 + cur.v_nsec, cur.i_sec * 10**9 + cur.i_nsec
'''


def _program(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text(PRELUDE + textwrap.dedent(body))
    return path


def _run_ref(prog, tmp_path) -> bytes:
    """An uninterrupted run (its go file there from the start)."""
    go = tmp_path / "ref.go"
    go.touch()
    return subprocess.run([sys.executable, prog, go], capture_output=True, timeout=60,
                          check=True).stdout


def _checkpoint_and_restart(procs, prog, tmp_path, name: str, ready: str = "ready"):
    """Start prog, checkpoint it with --kill once it printed `ready`, restart
    it in the background; returns (restarted crrestart, output file, go
    file, statefile)."""
    out, go, cr = tmp_path / f"{name}.out", tmp_path / f"{name}.go", tmp_path / f"{name}.cr"
    proc = procs.spawn([sys.executable, prog, go], stdout=out, stderr=tmp_path / f"{name}.err")
    wait_for_line(out, f"^{ready}$", proc=proc)
    summary = checkpoint(proc.pid, cr, "--kill")
    assert summary["restartable"]
    proc.wait(timeout=10)
    return restart(procs, cr), out, go, reader.load(str(cr))


def _anon(sf, kind: str) -> list[dict]:
    return [f.anon for f in sf.files if f.kind == kind]


# ----------------------------------------------------------------- timerfd

TIMER_REMAINING = r'''
tfd = libc.timerfd_create(1, 0)                       # CLOCK_MONOTONIC
libc.timerfd_settime(tfd, 0, ctypes.byref(itimerspec(10, 0, 10, 0)), None)
print("ready", flush=True)
wait_go()
value, interval = remaining_ns(tfd)
print(f"remaining {value} interval {interval}", flush=True)
'''


def test_timerfd_keeps_its_remaining_time(procs, tmp_path):
    """A periodic timer (10 s: it never fires during the test) armed with
    10 s: after the restart it has at most the saved remaining time left,
    and not much less (the time spent checkpointed does not count)."""
    require_root()
    prog = _program(tmp_path, "tremain", TIMER_REMAINING)
    r, out, go, sf = _checkpoint_and_restart(procs, prog, tmp_path, "tremain")
    [t] = _anon(sf, "anon:timerfd")
    saved = t.value[0] * 10**9 + t.value[1]
    assert t.interval == [10, 0] and t.ticks == 0
    assert 0 < saved <= 10 * 10**9
    go.touch()
    code, err = finish(r)
    assert code == 0, err
    line = read_lines(out)[-1].split()
    value, interval = int(line[1]), int(line[3])
    assert interval == 10 * 10**9
    # generous slack for a loaded machine: the restart itself and the poll loop
    assert saved - 8 * 10**9 < value <= saved, (value, saved)


TIMER_UNREAD = r'''
tfd = libc.timerfd_create(1, os.O_NONBLOCK)
libc.timerfd_settime(tfd, 0, ctypes.byref(itimerspec(0, 50_000_000, 0, 50_000_000)), None)
time.sleep(0.3)                                       # expirations pile up, unread
print("ready", flush=True)
wait_go()
print("read", struct.unpack("Q", os.read(tfd, 8))[0], flush=True)
'''


def test_timerfd_unread_expirations_read_back(procs, tmp_path):
    """A 50 ms periodic timer not read for 300 ms holds six or more
    expirations; a leave-running checkpoint does not consume them, and the
    first read after a --kill checkpoint and restart returns at least the
    saved count (not a single expiration)."""
    require_root()
    prog = _program(tmp_path, "tunread", TIMER_UNREAD)
    out, go = tmp_path / "peek.out", tmp_path / "peek.go"
    proc = procs.spawn([sys.executable, prog, go], stdout=out, stderr=tmp_path / "peek.err")
    wait_for_line(out, "^ready$", proc=proc)
    checkpoint(proc.pid, tmp_path / "peek.cr")        # leave running
    [peek] = _anon(reader.load(str(tmp_path / "peek.cr")), "anon:timerfd")
    assert peek.ticks >= 6, peek
    go.touch()
    wait_for_line(out, "^read ", proc=proc)
    assert int(read_lines(out)[-1].split()[1]) >= peek.ticks
    proc.wait(timeout=10)

    r, out, go, sf = _checkpoint_and_restart(procs, prog, tmp_path, "tunread")
    [t] = _anon(sf, "anon:timerfd")
    assert t.ticks >= 6 and t.interval == [0, 50_000_000], t
    go.touch()
    code, err = finish(r)
    assert code == 0, err
    assert read_lines(out)[-2:-1] == ["go seen"]
    got = int(read_lines(out)[-1].split()[1])
    assert got >= t.ticks, (got, t)


# ----------------------------------------------------------------- eventfd

EVENTFD = r'''
sem = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
os.eventfd_write(sem, 5)
big = os.eventfd(0, os.EFD_NONBLOCK)
os.eventfd_write(big, 1 << 40)                        # more than eventfd()'s initval can hold
print("ready", flush=True)
wait_go()
while True:
    try:
        print("sem", os.eventfd_read(sem), flush=True)
    except BlockingIOError:
        print("sem EAGAIN", flush=True)
        break
print("big", os.eventfd_read(big), flush=True)
'''


def test_eventfd_counter_and_semaphore_mode(procs, tmp_path):
    """A semaphore-mode eventfd written 5 and not read reads 1 five times,
    then EAGAIN; a 2**40 counter reads back whole."""
    require_root()
    prog = _program(tmp_path, "efd", EVENTFD)
    ref = _run_ref(prog, tmp_path)
    assert ref.count(b"sem 1\n") == 5 and b"sem EAGAIN\nbig 1099511627776\n" in ref
    r, out, go, sf = _checkpoint_and_restart(procs, prog, tmp_path, "efd")
    assert sorted((a.count, a.semaphore) for a in _anon(sf, "anon:eventfd")) == \
        [(5, True), (1 << 40, False)]
    go.touch()
    code, err = finish(r)
    assert code == 0, err
    assert out.read_bytes() == ref


# ----------------------------------------------------------------- inotify

INOTIFY = r'''
watched = sys.argv[2]
ifd = libc.inotify_init1(0)
assert libc.inotify_add_watch(ifd, watched.encode(), 0x100) == 1   # IN_CREATE
print("ready", flush=True)
wait_go()
data = os.read(ifd, 4096)
wd, mask, _cookie, ln = struct.unpack("iIII", data[:16])
print("inotify wd", wd, "IN_CREATE" if mask & 0x100 else hex(mask),
      data[16:16 + ln].rstrip(b"\0").decode(), flush=True)
'''


def _start_inotify(procs, tmp_path, name: str):
    """The INOTIFY program watching a fresh directory, at its "ready" line:
    (Popen, watched dir, output, go file, statefile path)."""
    watched = tmp_path / "watched"
    watched.mkdir()
    prog = _program(tmp_path, name, INOTIFY)
    out, go, cr = (tmp_path / f"{name}.{ext}" for ext in ("out", "go", "cr"))
    proc = procs.spawn([sys.executable, prog, go, watched], stdout=out,
                       stderr=tmp_path / f"{name}.err")
    wait_for_line(out, "^ready$", proc=proc)
    return proc, watched, out, go, cr


def test_inotify_watch_reports_a_file_created_after_restart(procs, tmp_path):
    require_root()
    proc, watched, out, go, cr = _start_inotify(procs, tmp_path, "ino")
    checkpoint(proc.pid, cr, "--kill")
    proc.wait(timeout=10)
    [a] = _anon(reader.load(str(cr)), "anon:inotify")
    assert [(w.wd, w.path) for w in a.watches] == [(1, str(watched))]
    assert a.unread is None
    r = restart(procs, cr)
    go.touch()
    wait_for_line(out, "^go seen$", timeout=30, proc=r)
    (watched / "made-after-restart").touch()
    code, err = finish(r)
    assert code == 0, err
    assert read_lines(out)[-1] == "inotify wd 1 IN_CREATE made-after-restart"


def test_inotify_with_unread_events_is_refused(procs, tmp_path):
    """Queued events cannot be saved without consuming them: refused (exit
    6, the fd named, nothing written), and the program still reads the event
    afterwards (the check consumed nothing)."""
    require_root()
    proc, watched, out, go, cr = _start_inotify(procs, tmp_path, "inoq")
    (watched / "queued").touch()
    res = checkpoint(proc.pid, cr, "--kill", check=False)
    assert res.returncode == 6, res.stderr
    assert "Traceback" not in res.stderr
    fd = next(int(n) for n in os.listdir(f"/proc/{proc.pid}/fd")
              if os.readlink(f"/proc/{proc.pid}/fd/{n}") == "anon_inode:inotify")
    assert f"inotify fd {fd} has unread events" in res.stderr, res.stderr
    assert "nothing was written" in res.stderr
    assert not cr.exists() and proc.poll() is None
    go.touch()
    assert proc.wait(timeout=30) == 0
    assert read_lines(out)[-1] == "inotify wd 1 IN_CREATE queued"


INOTIFY_DELETED = r'''
d = sys.argv[2]
path = os.path.join(d, "victim")
real = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
os.write(real, b"kept")
ifd = libc.inotify_init1(os.O_NONBLOCK)
assert libc.inotify_add_watch(ifd, d.encode(), 0x100 | 0x200) == 1   # IN_CREATE | IN_DELETE
assert libc.inotify_add_watch(ifd, path.encode(), 0x8) == 2          # IN_CLOSE_WRITE
os.unlink(path)
os.read(ifd, 4096)                                                    # the IN_DELETE
print("ready", flush=True)
wait_go()
os.close(real)                      # the deleted file's watch sees it closed
open(os.path.join(d, "again"), "w").close()
time.sleep(0.1)
data = os.read(ifd, 4096)
while data:
    wd, mask, _cookie, ln = struct.unpack("iIII", data[:16])
    print("event wd", wd, hex(mask), data[16:16 + ln].rstrip(b"\0").decode(), flush=True)
    data = data[16 + ln:]
'''


def test_inotify_watch_on_a_deleted_open_file(procs, tmp_path):
    """A watch on a file deleted since but still open comes back on the
    recreated inode (through the restored fd): closing the fd after the
    restart is reported on that watch, and the directory's watch sees the
    next file created; no event from the restore itself."""
    require_root()
    watched = tmp_path / "watched"
    watched.mkdir()
    prog = _program(tmp_path, "inodel", INOTIFY_DELETED)
    out, go, cr = (tmp_path / f"inodel.{ext}" for ext in ("out", "go", "cr"))
    proc = procs.spawn([sys.executable, prog, go, watched], stdout=out)
    wait_for_line(out, "^ready$", proc=proc)
    checkpoint(proc.pid, cr, "--kill")
    proc.wait(timeout=10)
    [a] = _anon(reader.load(str(cr)), "anon:inotify")
    ws = sorted(a.watches, key=lambda w: w.wd)
    assert [w.path for w in ws] == [str(watched), None]
    assert ws[1].deleted == str(watched / "victim") and ws[1].file is not None
    r = restart(procs, cr)
    go.touch()
    code, err = finish(r)
    assert code == 0, err
    lines = read_lines(out)
    ref_dir, ref_go = tmp_path / "ref", tmp_path / "ref.go"
    ref_dir.mkdir()
    ref_go.touch()
    ref = subprocess.run([sys.executable, prog, ref_go, ref_dir], capture_output=True, text=True,
                         timeout=60, check=True).stdout.splitlines()
    assert ref[ref.index("go seen") + 1:][0].startswith("event wd 2 0x8")    # IN_CLOSE_WRITE
    assert lines[lines.index("go seen") + 1:] == ref[ref.index("go seen") + 1:], (lines, ref)


def test_inotify_unread_events_dropped_by_policy(procs, tmp_path):
    """With policy notify-events the queued event is left out (said by
    crrestart), the watch comes back, and the first event read after the
    restart is the next one."""
    require_root()
    proc, watched, out, go, cr = _start_inotify(procs, tmp_path, "inop")
    (watched / "queued").touch()
    checkpoint(proc.pid, cr, "--kill", "--skip", "notify-events")
    proc.wait(timeout=10)
    r = restart(procs, cr)
    go.touch()
    wait_for_line(out, "^go seen$", timeout=30, proc=r)
    (watched / "after").touch()
    code, err = finish(r)
    assert code == 0, err
    assert "skipped by policy 'notify-events'" in err, err
    assert read_lines(out)[-1] == "inotify wd 1 IN_CREATE after"


# ---------------------------------------------------------------- signalfd

SIGNALFD = r'''
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
mask = ctypes.c_uint64(1 << (signal.SIGUSR2 - 1))
sfd = libc.signalfd(-1, ctypes.byref(mask), 0)
print("ready", flush=True)
wait_go()
info = os.read(sfd, 128)
signo, _errno, _code, pid = struct.unpack("IiiI", info[:16])
print("signalfd", signal.Signals(signo).name, flush=True)
'''


def test_signalfd_delivers_a_signal_sent_after_restart(procs, tmp_path):
    require_root()
    prog = _program(tmp_path, "sfd", SIGNALFD)
    r, out, go, sf = _checkpoint_and_restart(procs, prog, tmp_path, "sfd")
    [a] = _anon(sf, "anon:signalfd")
    assert a.sigmask == 1 << (signal.SIGUSR2 - 1)
    pid = sf.tasks[0].pid
    go.touch()
    wait_for_line(out, "^go seen$", timeout=30, proc=r)
    os.kill(pid, signal.SIGUSR2)                      # the restarted task, same pid
    code, err = finish(r)
    assert code == 0, err
    assert read_lines(out)[-1] == "signalfd SIGUSR2"


# ------------------------------------------------------------------- epoll

EPOLL = r'''
rd, wr = os.pipe()
efd = os.eventfd(0, os.EFD_NONBLOCK)
ep = libc.epoll_create1(0)
for fd, data in ((rd, 0x1122334455667788), (efd, 0xdeadbeef00000001)):
    ev = epoll_event(select.EPOLLIN, data)
    assert libc.epoll_ctl(ep, 1, fd, ctypes.byref(ev)) == 0
os.write(wr, b"x")                                    # pending at the checkpoint
print("ready", flush=True)
wait_go()
def wait():
    evs = (epoll_event * 4)()
    n = libc.epoll_wait(ep, evs, 4, 10000)
    return sorted(f"{evs[i].data:#x}/{evs[i].events:#x}" for i in range(n))
print("epoll", *wait(), flush=True)
os.eventfd_write(efd, 3)
print("epoll", *wait(), flush=True)
os.read(rd, 1)
print("epoll", *wait(), flush=True)
'''


def test_epoll_reports_events_with_their_data(procs, tmp_path):
    """epoll on a pipe and an eventfd, each registered with a 64-bit data
    value that is not its fd number: after the restart the pending and new
    events come with the right data."""
    require_root()
    prog = _program(tmp_path, "ep", EPOLL)
    ref = _run_ref(prog, tmp_path)
    assert b"epoll 0x1122334455667788/0x1\n" in ref
    assert b"epoll 0x1122334455667788/0x1 0xdeadbeef00000001/0x1\n" in ref
    assert ref.endswith(b"epoll 0xdeadbeef00000001/0x1\n")
    r, out, go, sf = _checkpoint_and_restart(procs, prog, tmp_path, "ep")
    [a] = _anon(sf, "anon:eventpoll")
    assert sorted(t.data for t in a.targets) == [0x1122334455667788, 0xdeadbeef00000001]
    go.touch()
    code, err = finish(r)
    assert code == 0, err
    assert out.read_bytes() == ref


# ----------------------------------------------------- asyncio socketpair

def test_asyncio_tasks_talking_over_a_socketpair(sample_bin, procs, tmp_path):
    """The must-hold "a Python asyncio program with a unix socket pair": two
    asyncio tasks exchange application data over socket.socketpair()
    (sock_sendall/sock_recv on one end, streams on the other), checkpointed
    mid-exchange; byte-identical to an uninterrupted run."""
    require_root()
    argv = [sys.executable, sample_bin / "aio.py", "pair", "40"]
    ref = subprocess.run(argv, capture_output=True, timeout=60, check=True).stdout
    assert ref.endswith(b"aio pair 40: pong 1600 sum=22140\naio pair done\n")
    out, cr = tmp_path / "pair.out", tmp_path / "pair.cr"
    proc = procs.spawn(argv, stdout=out, stderr=tmp_path / "pair.err")
    wait_for_line(out, r"^aio pair 10: ", proc=proc)
    checkpoint(proc.pid, cr, "--kill")
    proc.wait(timeout=10)
    r = restart(procs, cr)
    code, err = finish(r)
    assert code == 0, err
    assert out.read_bytes() == ref
