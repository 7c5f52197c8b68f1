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
        "markers", "checkpoint_only(reason): the restart self-check below leaves the "
        "statefiles this test writes alone, for the reason given")


@pytest.fixture(autouse=True)
def restart_self_check(request, tmp_path_factory):
    """Issue 16: a statefile crcheckpoint writes always restarts.  Every
    restartable statefile a test writes (crcheckpoint notes it in a ledger,
    statefile/ledger.py) that the test did not restore itself (crrestart
    notes that) is restored here once the test is over: `crrestart --pidns
    --detach --force-files` in an IPC namespace of its own (its SysV objects
    go with it), and the restored tree killed.  A statefile that does not
    restart fails the test, unless it is marked checkpoint_only(reason)."""
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
    if request.node.get_closest_marker("checkpoint_only") or \
            getattr(request.node, "_crelf_failed", False) or not ledger.exists():
        return
    written, restarted = {}, set()
    for line in ledger.read_text().splitlines():
        kind, ident, path = line.split(" ", 2)
        if kind == "W":
            written[path] = ident
        else:
            restarted.add(path)
    failed = []
    for path, ident in written.items():
        if path in restarted:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue          # removed by the test
        if f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" != ident:
            continue          # damaged or forged by the test after crcheckpoint wrote it
        err = _self_check_restart(path)
        if err:
            failed.append(f"{path}: {err}")
    if failed:
        pytest.fail("restart self-check: a statefile this test wrote does not restart: "
                    + "; ".join(failed), pytrace=False)


def _self_check_restart(path: str) -> str:
    """Restart one statefile out of the way and kill it; "" or the error."""
    import json
    from helpers import _set_child_subreaper
    _set_child_subreaper()       # the detached tree's init comes to us, to be reaped
    import signal
    repo = Path(__file__).resolve().parent.parent
    import tempfile
    # (files, not pipes: the restored tree inherits them and may hold them open)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        r = subprocess.run(["unshare", "--ipc", sys.executable, "-m", "restorer.cli",
                            "--pidns", "--detach", "--force-files", "--json", path],
                           stdout=out, stderr=err, timeout=180, close_fds=True,
                           stdin=subprocess.DEVNULL, cwd=repo,
                           env={**os.environ, "CRELF_TEST_LEDGER": ""})
        err.seek(0)
        text = err.read().decode(errors="replace")
    if r.returncode != 0:
        return text.strip().splitlines()[-1] if text.strip() else f"exit {r.returncode}"
    try:                                   # (--json reports on stderr)
        init = json.loads(next(line for line in reversed(text.splitlines())
                               if line.startswith("{")))["init_pid"]
    except (ValueError, KeyError, TypeError, StopIteration):
        return f"crrestart said no pid: {text[-300:]!r}"
    os.kill(init, signal.SIGKILL)          # the namespace's init: the whole tree goes
    try:
        os.waitpid(init, 0)                # (ours: we are a subreaper)
    except ChildProcessError:
        pass
    return ""


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
