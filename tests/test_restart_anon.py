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

from statefile import reader

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
    kinds = sorted(f["kind"] for f in reader.load(str(cr)).files if f["kind"].startswith("anon:"))
    assert kinds == ["anon:eventfd", "anon:eventpoll", "anon:inotify", "anon:signalfd",
                     "anon:timerfd"]
    res = subprocess.run([str(BIN / "crrestart"), mode, str(cr)], capture_output=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref
    assert b"inotify IN_CREATE made-at-10" in ref and b"signalfd SIGUSR1" in ref
