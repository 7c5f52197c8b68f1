"""Application hooks: a network client closes its connection before the
checkpoint and reconnects after it resumes, or after it is restarted."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import require_root, wait_for_line
from test_checkpoint import checkpoint

BIN = Path(sys.executable).parent


class LineServer:
    """A TCP server on 127.0.0.1 recording the lines of each connection."""

    def __init__(self):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.conns: list[list[str]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:     # shut down by close()
                return
            lines: list[str] = []
            self.conns.append(lines)
            threading.Thread(target=self._read, args=(c, lines), daemon=True).start()

    @staticmethod
    def _read(c, lines):
        with c, c.makefile() as f:
            for line in f:
                lines.append(line.strip())

    def wait_for(self, text, timeout=20):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in c for c in self.conns):
                return
            time.sleep(0.05)
        raise AssertionError(f"server never got {text!r}: {self.conns}")

    def close(self):
        # shutdown wakes the accept thread (EINVAL) and it returns; only then
        # close: a thread between reading the fd number and calling accept()
        # would otherwise accept on whatever socket reuses that number next
        # (a later test's listener: it stole test_inet's connection once)
        self.srv.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the line server's accept thread did not stop"
        self.srv.close()


@pytest.fixture
def server():
    s = LineServer()
    yield s
    s.close()


def _ticks(conns):
    return [int(line.split()[1]) for c in conns for line in c if line.startswith("tick")]


def test_leave_running_checkpoint_runs_the_hooks(sample_bin, procs, tmp_path, server):
    require_root()
    out = tmp_path / "r.out"
    proc = procs.spawn([sys.executable, sample_bin / "reconnect.py", server.port, 30],
                       stdout=out, stderr=tmp_path / "r.err")
    wait_for_line(out, r"^tick 5$", proc=proc)
    summary = checkpoint(proc.pid, tmp_path / "r.cr")
    assert summary["hooks_told"] == [proc.pid] and summary["restartable"]
    assert proc.wait(timeout=30) == 0
    server.wait_for("bye")
    assert len(server.conns) == 2
    assert server.conns[0][0] == "hello first" and server.conns[0][-1] == "bye"
    assert server.conns[1][0] == "hello again after resume"
    assert _ticks(server.conns) == list(range(1, 31))


def test_restart_runs_the_restart_hook(sample_bin, procs, tmp_path, server):
    require_root()
    out = tmp_path / "r.out"
    proc = procs.spawn([sys.executable, sample_bin / "reconnect.py", server.port, 30],
                       stdout=out, stderr=tmp_path / "r.err")
    wait_for_line(out, r"^tick 5$", proc=proc)
    cr = tmp_path / "r.cr"
    summary = checkpoint(proc.pid, cr, "--kill")
    assert summary["hooks_told"] == [proc.pid]
    proc.wait(timeout=10)
    res = subprocess.run([str(BIN / "crrestart"), str(cr)], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    server.wait_for("hello again after restart")
    server.wait_for("tick 30")
    assert server.conns[0][-1] == "bye"
    assert server.conns[1][0] == "hello again after restart"
    assert _ticks(server.conns) == list(range(1, 31))
    assert out.read_text().splitlines()[-1] == "done"


def test_c_header_hooks(procs, tmp_path):
    """hooks/crelf_hooks.h: a C program is told before the checkpoint and after
    the restart."""
    require_root()
    src = tmp_path / "hooked.c"
    src.write_text(r'''
#include "crelf_hooks.h"
#include <stdio.h>
#include <time.h>
static void before(void *a) { (void)a; printf("before checkpoint\n"); fflush(stdout); }
static void after(void *a) { (void)a; printf("after restart\n"); fflush(stdout); }
int main(void) {
    if (crelf_hooks_install(before, after, NULL, NULL)) return 1;
    struct timespec ts = {0, 100000000};
    for (int n = 1; n <= 30; n++) { nanosleep(&ts, NULL); printf("tick %d\n", n); fflush(stdout); }
    return 0;
}
''')
    hooks_dir = Path(__file__).resolve().parent.parent / "hooks"
    subprocess.run(["gcc", "-O1", "-pthread", "-I", str(hooks_dir), "-o", tmp_path / "hooked",
                    src], check=True)
    out = tmp_path / "h.out"
    proc = procs.spawn([tmp_path / "hooked"], stdout=out, stderr=tmp_path / "h.err")
    wait_for_line(out, r"^tick 3$", proc=proc)
    cr = tmp_path / "h.cr"
    checkpoint(proc.pid, cr, "--kill")
    proc.wait(timeout=10)
    res = subprocess.run([str(BIN / "crrestart"), str(cr)], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = out.read_text().splitlines()
    assert "before checkpoint" in lines and "after restart" in lines
    assert lines.index("before checkpoint") < lines.index("after restart")
    assert [int(x.split()[1]) for x in lines if x.startswith("tick")] == list(range(1, 31))


FAILING_HOOK = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import crelf_hooks

def before():
    print("before checkpoint", flush=True)
    if sys.argv[2] == "hang":
        time.sleep(4)                    # longer than crcheckpoint's --hook-timeout
        print("hook done", flush=True)
    else:
        raise RuntimeError("cannot flush")

crelf_hooks.install(before_checkpoint=before,
                    after_resume=lambda: print("resumed", flush=True))
for n in range(1, 61):
    print(f"tick {n}", flush=True)
    time.sleep(0.1)
print("done", flush=True)
'''


@pytest.mark.parametrize("how", ["hang", "error"])
def test_failing_hook_refuses_the_checkpoint(how, sample_bin, procs, tmp_path):
    """A checkpoint hook that hangs past --hook-timeout, or answers an error:
    crcheckpoint refuses with one line ("nothing was written"), no file, the
    program is told to resume (its after_resume runs) and runs on to its end
    with every tick."""
    require_root()
    prog = tmp_path / "failing.py"
    prog.write_text(FAILING_HOOK)
    out, cr = tmp_path / "f.out", tmp_path / "f.cr"
    proc = procs.spawn([sys.executable, prog, sample_bin, how], stdout=out,
                       stderr=tmp_path / "f.err")
    wait_for_line(out, r"^tick 3$", proc=proc)
    res = subprocess.run([str(BIN / "crcheckpoint"), str(proc.pid), "-o", str(cr), "--kill",
                          "--hook-timeout", "1"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 6, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "nothing was written" in lines[0], lines[0]
    assert ("did not answer within 1 s" if how == "hang" else "cannot flush") in lines[0]
    assert not cr.exists()
    assert proc.wait(timeout=30) == 0
    text = out.read_text().splitlines()
    assert text[-1] == "done" and "resumed" in text
    assert text.index("before checkpoint") < text.index("resumed")
    if how == "hang":       # told to resume once its hook returned
        assert text.index("hook done") < text.index("resumed")
    assert [int(x.split()[1]) for x in text if x.startswith("tick")] == list(range(1, 61))


KILLED_PY = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
import crelf_hooks
crelf_hooks.install(before_checkpoint=lambda: (print("before checkpoint", flush=True),
                                               time.sleep(0.5)),
                    after_resume=lambda: print("resumed", flush=True))
for n in range(1, 51):
    print(f"tick {n}", flush=True)
    time.sleep(0.1)
'''
KILLED_C = r'''
#include "crelf_hooks.h"
#include <stdio.h>
#include <time.h>
static void before(void *a) { (void)a; printf("before checkpoint\n"); fflush(stdout); usleep(500000); }
static void resumed(void *a) { (void)a; printf("resumed\n"); fflush(stdout); }
int main(void) {
    if (crelf_hooks_install(before, NULL, resumed, NULL)) return 1;
    struct timespec ts = {0, 100000000};
    for (int n = 1; n <= 50; n++) { nanosleep(&ts, NULL); printf("tick %d\n", n); fflush(stdout); }
    return 0;
}
'''


@pytest.mark.parametrize("lang", ["python", "c"])
def test_killed_crcheckpoint_still_resumes_the_application(lang, sample_bin, procs, tmp_path):
    """crcheckpoint SIGKILLed after the application's before_checkpoint hook
    ran (while it waits for the hook): nobody says "resume", yet the hook
    thread sees crcheckpoint gone and runs after_resume, once; the program
    runs on to its end with every tick."""
    require_root()
    if lang == "python":
        prog = tmp_path / "killed.py"
        prog.write_text(KILLED_PY)
        argv = [sys.executable, prog, sample_bin]
    else:
        src = tmp_path / "killed.c"
        src.write_text(KILLED_C)
        hooks_dir = Path(__file__).resolve().parent.parent / "hooks"
        subprocess.run(["gcc", "-O1", "-pthread", "-I", str(hooks_dir), "-o",
                        tmp_path / "killed", src], check=True)
        argv = [tmp_path / "killed"]
    out = tmp_path / "k.out"
    proc = procs.spawn(argv, stdout=out, stderr=tmp_path / "k.err", close_fds=True)
    wait_for_line(out, r"^tick 3$", proc=proc)
    ck = subprocess.Popen([str(BIN / "crcheckpoint"), str(proc.pid), "-o", str(tmp_path / "k.cr")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    wait_for_line(out, r"^before checkpoint$", proc=proc)
    ck.kill()
    ck.wait(timeout=10)
    wait_for_line(out, r"^resumed$", proc=proc, timeout=10)
    assert proc.wait(timeout=30) == 0
    text = out.read_text().splitlines()
    assert text.count("resumed") == 1 and text.index("before checkpoint") < text.index("resumed")
    assert [int(x.split()[1]) for x in text if x.startswith("tick")] == list(range(1, 51))
    assert not (tmp_path / "k.cr").exists()
