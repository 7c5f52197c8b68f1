"""Bytes queued in a pseudo-terminal pair of the tree (statefile/dump/tty.py
save_queues / put_back, restorer/restore/tty.py): what the master has not
read (the slave's output, echoes) and what the slave has not read (whole
lines, one ended by EOL, one by EOF, an empty EOF line, a literal newline
inside a line, the line being typed with an erase in it, a literal-next
waiting for its character).

The program queues them, ticks, then reads everything and prints what it
read, byte for byte, with the queue sizes and the termios; the restarted run
(--kill, restart) and a leave-running checkpoint (the program runs on; the
statefile is also restarted beside it in a pid namespace) must print exactly
what an uninterrupted run prints.  Canonical mode with echo, and raw mode.
A master in packet mode holding bytes, an unprivileged crcheckpoint (TIOCSTI
needs CAP_SYS_ADMIN), and a slave whose buffer is full with more waiting
behind it, are refused up front (exit 6, the reason named), and the program
then reads what it would have read.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import build_c, pid_alive, read_lines, require_root, wait_for_line
from test_restart_unpriv import NOBODY, _python_for_nobody, as_nobody
from test_tree import BIN, CRCHECKPOINT, checkpoint_tree, finish, restart

import test_restart_unpriv

nobody_dir = test_restart_unpriv.nobody_dir     # (the fixture: a directory user 65534 owns)

PROG = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>
#include <sys/ioctl.h>

/* argv: mode (canon, raw, packet), ticks. */
static char rep[1 << 16];
static int rl;
static void add(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    rl += vsnprintf(rep + rl, sizeof rep - rl, fmt, ap);
    va_end(ap);
}
static void show(const char *what, const unsigned char *b, int n) {
    add("%s %d: ", what, n);
    for (int i = 0; i < n; i++)
        if (b[i] >= 32 && b[i] < 127 && b[i] != '\\') add("%c", b[i]);
        else add("\\x%02x", b[i]);
    add("\n");
}
int main(int argc, char **argv) {
    const char *mode = argv[1];
    int ticks = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int m = posix_openpt(O_RDWR | O_NOCTTY);
    if (m < 0 || grantpt(m) || unlockpt(m)) { perror("ptmx"); return 1; }
    int s = open(ptsname(m), O_RDWR | O_NOCTTY);
    struct termios t;
    if (s < 0 || tcgetattr(s, &t)) { perror("slave"); return 1; }
    t.c_cc[VEOL] = ';';
    if (!strcmp(mode, "raw")) {
        t.c_lflag &= ~(ICANON | ECHO);
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
    }
    tcsetattr(s, TCSANOW, &t);
    if (!strcmp(mode, "packet")) {
        int one = 1;
        ioctl(m, TIOCPKT, &one);
    }
    /* the slave's output first: the echoes come after it on the master, however
       late the kernel's workers run */
    write(s, "output\n", 7);
    const char *in[] = {"first line\n", "ends at eol;", "ended by eof\x04", "\x04",
                        "a literal \x16\n inside\n", "typing ahx\x7f" "ead", "\x16", NULL};
    for (int i = 0; in[i]; i++)
        write(m, in[i], strlen(in[i]));
    for (int i = 1; i <= ticks; i++) {
        printf("tick %d\n", i);
        usleep(50000);
    }
    int qm = -1, qs = -1;
    ioctl(m, FIONREAD, &qm);
    ioctl(s, FIONREAD, &qs);
    add("queued: master %d slave %d\n", qm, qs);
    write(m, "\x7fX\n", 3);     /* after the waiting literal-next: a literal DEL */
    fcntl(s, F_SETFL, O_NONBLOCK);
    fcntl(m, F_SETFL, O_NONBLOCK);
    /* Read until the last bytes written arrive (the kernel's workers deliver
       them when they run): one report line per read in canonical mode, all
       the bytes in one line otherwise; then the master's until its last
       expected bytes (the echo of that line, or the slave's output). */
    unsigned char buf[8192], all[16384];
    int got = 0, canon = !strcmp(mode, "canon") || !strcmp(mode, "packet");
    for (int i = 0; i < 50; i++) {
        struct pollfd p = {s, POLLIN, 0};
        if (poll(&p, 1, 10000) <= 0)
            break;
        int n = read(s, buf, sizeof buf);
        if (n < 0)
            continue;
        if (canon)
            show("slave read", buf, n);
        memcpy(all + got, buf, n);
        got += n;
        if (got >= 2 && !memcmp(all + got - 2, "X\n", 2))
            break;
    }
    if (!canon)
        show("slave read", all, got);
    const char *last = canon ? "X\r\n" : "output\r\n";
    got = 0;
    for (int i = 0; i < 50; i++) {
        struct pollfd p = {m, POLLIN, 0};
        if (poll(&p, 1, 10000) <= 0)
            break;
        int n = read(m, all + got, sizeof all - got);
        if (n > 0 && !strcmp(mode, "packet")) {     /* each read's TIOCPKT_DATA byte */
            memmove(all + got, all + got + 1, --n);
        }
        if (n > 0)
            got += n;
        if (got >= (int)strlen(last) && !memcmp(all + got - strlen(last), last, strlen(last)))
            break;
    }
    show("master read", all, got);
    tcgetattr(s, &t);
    add("termios iflag %o oflag %o lflag %o eol %d eof %d erase %d lnext %d\n", t.c_iflag,
        t.c_oflag, t.c_lflag, t.c_cc[VEOL], t.c_cc[VEOF], t.c_cc[VERASE], t.c_cc[VLNEXT]);
    write(1, rep, rl);      /* one write: two copies appending to one file stay apart */
    return 0;
}
'''

TICKS = 12
CRINSPECT = str(BIN / "crinspect")


def _report(lines: list[str]) -> list[str]:
    return [x for x in lines if not x.startswith("tick ")]


@pytest.fixture
def prog(tmp_path):
    require_root()
    return build_c(tmp_path, "ptyq", PROG)


def _reference(prog, mode: str) -> list[str]:
    ref = subprocess.run([prog, mode, str(TICKS)], capture_output=True, text=True,
                         timeout=60, close_fds=True)
    assert ref.returncode == 0, ref.stderr
    return _report(ref.stdout.splitlines())


def _check_report(got: list[str], mode: str) -> None:
    """What the report must show whatever the run (the reference included)."""
    text = "\n".join(got)
    if mode == "canon":
        assert got[1:7] == [
            "slave read 11: first line\\x0a", "slave read 12: ends at eol;",
            "slave read 12: ended by eof", "slave read 0: ",
            "slave read 19: a literal \\x0a inside\\x0a",
            "slave read 15: typing ahead\\x7fX\\x0a"], got
        assert "output\\x0d\\x0a" in text and "\\x08 \\x08" in text   # slave output, erase echo
    else:
        assert got[1].startswith("slave read 75: first line\\x0aends at eol;ended by eof\\x04"), got


@pytest.mark.parametrize("mode", ["canon", "raw"])
def test_queued_bytes_come_back_after_kill(procs, tmp_path, prog, mode):
    """Checkpointed with --kill at tick 3 and restarted: the program reads
    the same lines, the same line being typed (its erase and literal-next
    still in effect), the same output on the master, the same termios."""
    want = _reference(prog, mode)
    _check_report(want, mode)
    out = tmp_path / "k.out"
    proc = procs.spawn([prog, mode, TICKS], stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    checkpoint_tree(proc, tmp_path / "k.cr")
    shown = subprocess.run([CRINSPECT, "shared", "--json", tmp_path / "k.cr"],
                           capture_output=True, text=True, timeout=60)
    pty = next(o for o in json.loads(shown.stdout)["objects"] if o["kind"] == "pty")
    if mode == "canon":         # five whole lines, one being typed, echoes and output
        assert pty["saved"]["lines"] == 5 and pty["saved"]["partial"], pty
        assert pty["saved"]["to_master"] > 60, pty
    code, err = finish(restart(procs, tmp_path / "k.cr"))
    assert code == 0, err
    lines = read_lines(out)
    assert lines[:TICKS] == [f"tick {i}" for i in range(1, TICKS + 1)], lines
    assert _report(lines) == want


@pytest.mark.parametrize("mode", ["canon", "raw"])
def test_leave_running_keeps_the_queues(procs, tmp_path, prog, mode):
    """Without --kill: the checkpoint reads the queues and puts them back,
    and the program, running on, reads exactly what an uninterrupted run
    reads; the statefile, restarted beside it in a pid namespace, reads the
    same too."""
    want = _reference(prog, mode)
    out = tmp_path / "l.out"
    proc = procs.spawn([prog, mode, TICKS], stdout=open(out, "ab"), close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    checkpoint_tree(proc, tmp_path / "l.cr", kill=False)
    assert proc.wait(timeout=30) == 0
    assert _report(read_lines(out)) == want
    r = restart(procs, tmp_path / "l.cr", "--pidns", "--force-files", "--json", "--detach")
    code, err = finish(r)
    assert code == 0, err
    info = json.loads(err.strip().splitlines()[-1])
    deadline = time.monotonic() + 30
    while pid_alive(info["init_pid"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _report(read_lines(out)) == want + want


def test_packet_mode_with_queued_bytes_is_refused(procs, tmp_path, prog):
    """A master in packet mode holding bytes: refused up front (exit 6, the
    reason named, no statefile), nothing read: the program then reads what
    an uninterrupted run reads."""
    want = _reference(prog, "packet")
    out = tmp_path / "p.out"
    proc = procs.spawn([prog, "packet", TICKS], stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    cr = tmp_path / "p.cr"
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr
    assert "fd:pty-unread" in r.stderr or "the master is in packet mode" in r.stderr, r.stderr
    assert "the master is in packet mode" in r.stderr, r.stderr
    assert not cr.exists()
    assert proc.wait(timeout=30) == 0
    assert _report(read_lines(out)) == want


def test_unprivileged_checkpoint_refuses_queued_bytes(procs, nobody_dir):
    """crcheckpoint without CAP_SYS_ADMIN cannot put bytes back (TIOCSTI):
    a pair holding some is refused up front (exit 6, the reason named, no
    statefile), nothing read: the program then reads what an uninterrupted
    run reads."""
    require_root()
    exe = build_c(nobody_dir, "ptyq", PROG)
    want = _reference(exe, "canon")
    py, env = _python_for_nobody()
    out = nobody_dir / "u.out"
    out.touch()
    os.chown(out, NOBODY, NOBODY)
    proc = procs.spawn(as_nobody(exe, "canon", TICKS), stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    cr = nobody_dir / "u.cr"
    r = subprocess.run(as_nobody(py, "-m", "statefile.cli", proc.pid, "-o", cr, "--kill"),
                       capture_output=True, text=True, env=env, cwd=nobody_dir, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr
    assert "putting them back needs TIOCSTI, which needs CAP_SYS_ADMIN" in r.stderr, r.stderr
    assert not cr.exists()
    assert proc.wait(timeout=30) == 0
    assert _report(read_lines(out)) == want


FULL = r'''
import os, sys, termios, time
m, s = os.openpty()
a = termios.tcgetattr(s)
a[3] &= ~termios.ECHO
termios.tcsetattr(s, termios.TCSANOW, a)
os.set_blocking(m, False)
n = 0
try:                                  # lines until the pair takes no more (4095 + the rest
    for i in range(400):              # waiting behind the full buffer)
        n += os.write(m, b"%039d\n" % i)
except BlockingIOError:
    pass
print("wrote", n, flush=True)
for i in range(300):
    print("tick", i, flush=True)
    time.sleep(0.05)
    if os.path.exists(sys.argv[1]):
        break
os.set_blocking(s, False)
got, idle = b"", 0
while len(got) < n and idle < 250:       # (one line per read: canonical mode)
    try:
        got += os.read(s, 65536)
        idle = 0
    except BlockingIOError:
        idle += 1
        time.sleep(0.02)
print("read", len(got), got == b"".join(b"%039d\n" % i for i in range(n // 40)), flush=True)
'''


def test_full_buffer_is_refused_before_reading(procs, tmp_path):
    """More than the slave's line discipline holds (the rest waits in the
    kernel's flip buffer): refused up front (exit 6, the reason named),
    nothing read: the program then reads every line it was sent."""
    require_root()
    go = tmp_path / "go"
    out = tmp_path / "f.out"
    proc = procs.spawn([sys.executable, "-c", FULL, go], stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    wrote = int(read_lines(out)[0].split()[1])
    assert wrote > 4096, wrote
    cr = tmp_path / "f.cr"
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr and not cr.exists()
    assert "line discipline buffer is (nearly) full" in r.stderr, r.stderr
    go.touch()
    assert proc.wait(timeout=30) == 0
    assert read_lines(out)[-1] == f"read {wrote} True"
