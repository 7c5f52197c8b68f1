"""The unprivileged path: checkpoint and restart of the ticker as user 65534.

crrestart, not being root, restores into a new user namespace (our uid mapped to
itself) plus a new pid namespace, where it may choose the pid."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import require_root, require_tool, wait_for_line

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def _python_for_nobody() -> tuple[str, dict]:
    """A Python user 65534 can run with crelf importable (the venv may live
    under /root, which nobody cannot enter)."""
    site = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    env = dict(os.environ, PYTHONPATH=":".join([str(REPO)] + site))
    for py in (sys.executable, shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}"),
               "/usr/bin/python3"):
        if not py:
            continue
        r = subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                            "--clear-groups", py, "-c",
                            "import sys, click, elftools, statefile.format.reader, restorer.cli; "
                            "print(sys.version_info[:2])"],
                           capture_output=True, text=True, env=env, cwd="/")
        if r.returncode == 0 and r.stdout.strip() == str(tuple(sys.version_info[:2])):
            return py, env
    pytest.fail("no Python that user 65534 can run with crelf importable", pytrace=False)


def as_nobody(*argv) -> list[str]:
    return ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
            *map(str, argv)]


@pytest.fixture
def nobody_dir():
    d = tempfile.mkdtemp(prefix="crelf-unpriv-")
    os.chmod(d, 0o755)
    os.chown(d, NOBODY, NOBODY)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_ticker_unprivileged(sample_bin, procs, nobody_dir):
    require_root()
    require_tool("setpriv")
    py, env = _python_for_nobody()
    ticker = nobody_dir / "ticker"
    shutil.copy(sample_bin / "ticker", ticker)
    os.chmod(ticker, 0o755)
    out = nobody_dir / "tick.out"
    for f in (out, nobody_dir / "tick.err"):
        f.touch()
        os.chown(f, NOBODY, NOBODY)
    p = procs.spawn(as_nobody(ticker, 25, 4, 50), stdout=out, stderr=nobody_dir / "tick.err",
                    cwd=nobody_dir)
    wait_for_line(out, r"^tick 6 ", proc=p)
    cr = nobody_dir / "t.cr"
    r = subprocess.run(as_nobody(py, "-m", "statefile.cli", p.pid, "-o", cr, "--kill"),
                       capture_output=True, text=True, env=env, cwd=nobody_dir, timeout=60)
    assert r.returncode == 0, r.stderr
    p.wait(timeout=10)
    assert os.stat(cr).st_uid == NOBODY
    rr = procs.spawn(as_nobody(py, "-m", "restorer.cli", "--verbose", cr),
                     stderr=subprocess.PIPE, env=env, cwd=nobody_dir)
    _, err = rr.communicate(timeout=60)
    assert rr.returncode == 0, err.decode()
    ref = subprocess.run([ticker, "25", "4", "0"], capture_output=True, check=True).stdout
    assert out.read_bytes() == ref


def test_other_users_statefile_refused(sample_bin, procs, tmp_path, nobody_dir):
    """A statefile of a root process cannot be restored by user 65534."""
    require_root()
    py, env = _python_for_nobody()
    out = nobody_dir / "tick.out"
    p = procs.spawn([sample_bin / "ticker", 0, 1, 50], stdout=out)
    wait_for_line(out, r"^tick 2 ", proc=p)
    cr = nobody_dir / "root.cr"
    subprocess.run([Path(sys.executable).parent / "crcheckpoint", str(p.pid), "-o", str(cr),
                    "--kill"], check=True, capture_output=True)
    p.wait(timeout=10)
    os.chown(cr, NOBODY, NOBODY)
    r = subprocess.run(as_nobody(py, "-m", "restorer.cli", cr), capture_output=True, text=True,
                       env=env, cwd=nobody_dir, timeout=60)
    assert r.returncode == 3
    assert "only root can restore" in r.stderr


def test_root_checkpoints_and_restarts_another_users_process(sample_bin, procs, nobody_dir):
    """Root checkpoints a process of user 65534 (its resource limits are read
    from /proc/PID/limits where prlimit() needs CAP_SYS_RESOURCE, which root
    in a container may lack) and restarts it: it runs on as 65534, output
    byte-identical to an uninterrupted run."""
    require_root()
    require_tool("setpriv")
    ticker = nobody_dir / "ticker"
    shutil.copy(sample_bin / "ticker", ticker)
    os.chmod(ticker, 0o755)
    out = nobody_dir / "tick.out"
    p = procs.spawn(as_nobody(ticker, 25, 4, 50), stdout=out, cwd=nobody_dir)
    wait_for_line(out, r"^tick 6 ", proc=p)
    cr = nobody_dir / "t.cr"
    bin_dir = Path(sys.executable).parent
    r = subprocess.run([bin_dir / "crcheckpoint", str(p.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    p.wait(timeout=10)
    rr = procs.spawn([bin_dir / "crrestart", "--detach", cr], stderr=subprocess.PIPE)
    _, err = rr.communicate(timeout=60)
    assert rr.returncode == 0, err.decode()
    with open(f"/proc/{p.pid}/status") as f:
        uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
    assert uids == [str(NOBODY)] * 4
    wait_for_line(out, r"^done$", timeout=30)
    ref = subprocess.run([ticker, "25", "4", "0"], capture_output=True, check=True).stdout
    assert out.read_bytes() == ref
