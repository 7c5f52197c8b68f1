"""crrestart on real processes: checkpoint with --kill mid-run, restart, and the
output must be byte-identical to an uninterrupted run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import require_root, wait_for_line

BIN = Path(sys.executable).parent
CRCHECKPOINT = str(BIN / "crcheckpoint")
CRRESTART = [sys.executable, "-m", "restorer.cli"]
REPO = Path(__file__).resolve().parent.parent


def checkpoint(pid: int, out: Path, kill: bool = True, proc=None) -> None:
    argv = [CRCHECKPOINT, str(pid), "-o", str(out)] + (["--kill"] if kill else [])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"crcheckpoint failed ({r.returncode}): {r.stderr}"
    if kill and proc is not None:
        proc.wait(timeout=10)  # reap it: a zombie still holds the pid


def restart(procs, statefile: Path, *args, stdout=None, stderr=None, cwd=None):
    return procs.spawn([*CRRESTART, *args, str(statefile)], stdout=stdout,
                       stderr=stderr or subprocess.PIPE, cwd=cwd or REPO)


def finish(proc, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"crrestart did not finish in {timeout}s: {err!r}")
    return proc.returncode, (err or b"").decode(errors="replace")


def reference(argv, tmp_path: Path, name: str = "ref.out") -> bytes:
    ref = tmp_path / name
    with open(ref, "wb") as f:
        subprocess.run([str(a) for a in argv], stdout=f, stderr=subprocess.STDOUT, check=True,
                       timeout=120)
    return ref.read_bytes()


@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_ticker_output_identical(sample_bin, procs, tmp_path, mode):
    require_root()
    if mode == "--lazy":
        pytest.importorskip("restorer.lazy")
    out = tmp_path / "tick.out"
    cr = tmp_path / "ticker.cr"
    p = procs.spawn([sample_bin / "ticker", 25, 4, 50], stdout=out)
    wait_for_line(out, r"^tick 6 ", proc=p)
    checkpoint(p.pid, cr, proc=p)
    r = restart(procs, cr, mode)
    code, err = finish(r)
    assert code == 0, err
    assert out.read_bytes() == reference([sample_bin / "ticker", 25, 4, 0], tmp_path)
