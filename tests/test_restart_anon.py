"""eventfd, epoll, timerfd, signalfd and inotify survive a checkpoint with
--kill and a restart: the event loop's output is byte-identical to an
uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_root, wait_for_line
from test_checkpoint import checkpoint

from statefile.format import reader

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_event_loop_restarts(mode, sample_bin, procs, tmp_path):
    require_root()
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref = subprocess.run([sys.executable, sample_bin / "eventloop.py", ref_dir, "30"],
                         capture_output=True, timeout=60).stdout
    out = tmp_path / "ev.out"
    proc = procs.spawn([sys.executable, sample_bin / "eventloop.py", run_dir, "30"], stdout=out,
                       stderr=tmp_path / "ev.err")
    wait_for_line(out, r"^tick 5 ", proc=proc)
    cr = tmp_path / "ev.cr"
    summary = checkpoint(proc.pid, cr, "--kill")
    assert summary["restartable"]
    proc.wait(timeout=10)
    kinds = sorted(f.kind for f in reader.load(str(cr)).files if f.kind.startswith("anon:"))
    assert kinds == ["anon:eventfd", "anon:eventpoll", "anon:inotify", "anon:signalfd",
                     "anon:timerfd"]
    res = subprocess.run([str(BIN / "crrestart"), mode, str(cr)], capture_output=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref
    assert b"inotify IN_CREATE made-at-10" in ref and b"signalfd SIGUSR1" in ref


def test_asyncio_program_restarts(sample_bin, procs, tmp_path):
    """asyncio: epoll plus the event loop's unix socketpair."""
    require_root()
    ref = subprocess.run([sys.executable, sample_bin / "aio.py", "40"], capture_output=True,
                         timeout=60).stdout
    out = tmp_path / "aio.out"
    proc = procs.spawn([sys.executable, sample_bin / "aio.py", "40"], stdout=out,
                       stderr=tmp_path / "aio.err")
    wait_for_line(out, r"^aio tick 8 ", proc=proc)
    checkpoint(proc.pid, tmp_path / "aio.cr", "--kill")
    proc.wait(timeout=10)
    res = subprocess.run([str(BIN / "crrestart"), str(tmp_path / "aio.cr")],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref


def test_unix_sockets_with_data_in_flight(sample_bin, procs, tmp_path):
    """Queued bytes (both directions), queued datagrams and a listening socket
    come back; a leave-running checkpoint first must not consume anything."""
    require_root()
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    (ref_dir / "go").touch()
    ref = subprocess.run([sys.executable, sample_bin / "sockets.py", ref_dir],
                         capture_output=True, timeout=60).stdout
    out = tmp_path / "s.out"
    proc = procs.spawn([sys.executable, sample_bin / "sockets.py", run_dir], stdout=out,
                       stderr=tmp_path / "s.err")
    wait_for_line(out, "ready", proc=proc)
    checkpoint(proc.pid, tmp_path / "peek.cr")  # leave running: MSG_PEEK only
    checkpoint(proc.pid, tmp_path / "s.cr", "--kill")
    proc.wait(timeout=10)
    sf = reader.load(str(tmp_path / "s.cr"))
    queues = sorted(q for f in sf.files if f.kind == "socket"
                    for q in getattr(f.socket, "queue", []))
    assert bytes.fromhex(queues[-1]) in (b"datagram 1", b"datagram 2", b"b->a",
                                         b"a->b one;a->b two;")
    (run_dir / "go").touch()
    res = subprocess.run([str(BIN / "crrestart"), str(tmp_path / "s.cr")],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref
    assert b"a->b one;a->b two;" in ref and b"datagram 1" in ref
