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

import os
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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "checkpoint_only(reason): this test checkpoints without restarting what it "
        "wrote (the restart self-check below lets it, for the reason given)")


@pytest.fixture(autouse=True)
def restart_self_check(request, tmp_path_factory):
    """Issue 16: a statefile crcheckpoint writes always restarts.  Every
    restartable statefile a test writes (crcheckpoint notes it in the ledger,
    statefile/ledger.py) must also be restored successfully by that test
    (crrestart notes that); a test that only checkpoints fails here, unless
    it is marked checkpoint_only with its reason."""
    ledger = tmp_path_factory.mktemp("ledger") / "ledger"
    old = os.environ.get("CRELF_TEST_LEDGER")
    os.environ["CRELF_TEST_LEDGER"] = str(ledger)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CRELF_TEST_LEDGER", None)
        else:
            os.environ["CRELF_TEST_LEDGER"] = old
    if request.node.get_closest_marker("checkpoint_only"):
        return
    written, restarted = [], set()
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            kind, _, path = line.partition(" ")
            (written.append if kind == "W" else restarted.add)(path)
    never = sorted({p for p in written if p not in restarted})
    if never and not getattr(request.node, "_crelf_failed", False):
        pytest.fail("restart self-check: this test checkpointed without restarting "
                    f"{', '.join(never)} (every statefile crcheckpoint writes must restart; "
                    "mark the test checkpoint_only(reason) if it cannot)", pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call" and rep.failed:
        item._crelf_failed = True     # (the self-check adds nothing to a failed test)
    return rep


@pytest.fixture
def statefile_path(tmp_path) -> Path:
    """Convention: statefiles are written into the test's tmp_path."""
    return tmp_path / "state.core"
