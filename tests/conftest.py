"""Shared pytest fixtures for crelf.

Fixtures:
  sample_bin      (session) Path of a tmp dir with the built samples:
                  mt_values, ticker, tree, bigheap, pyworker.py
  procs           (function) ProcessManager: procs.spawn(argv, stdout=path)
                  -> Popen; kills every spawned process and all descendants
                  at teardown
  statefile_path  (function) tmp_path / "state.core": where a test writes its
                  statefile
Helpers live in tests/helpers.py (``from helpers import wait_for_line, ...``).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SAMPLES_DIR, ProcessManager  # noqa: E402


@pytest.fixture(scope="session")
def sample_bin(tmp_path_factory) -> Path:
    """Build samples/ once per session (samples/build.sh) into a tmp dir."""
    out = tmp_path_factory.mktemp("sample-bin")
    res = subprocess.run(["sh", str(SAMPLES_DIR / "build.sh"), str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"samples/build.sh failed ({res.returncode}):\n"
                    f"{res.stdout}\n{res.stderr}", pytrace=False)
    return out


@pytest.fixture
def procs():
    """Start processes with procs.spawn(argv, stdout=...); all of them and all
    their descendants are SIGKILLed and reaped at teardown."""
    mgr = ProcessManager()
    try:
        yield mgr
    finally:
        mgr.kill_all()


@pytest.fixture
def statefile_path(tmp_path) -> Path:
    """Convention: statefiles are written into the test's tmp_path."""
    return tmp_path / "state.core"
