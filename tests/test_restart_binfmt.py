"""`./app.cr` after `crrestart --register`; the rule is removed afterwards."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require_root, wait_for_line

CRRESTART = [sys.executable, "-m", "restorer.cli"]
REPO = Path(__file__).resolve().parent.parent
RULE = "/proc/sys/fs/binfmt_misc/crelf"


@pytest.fixture
def registered():
    require_root()
    was = os.path.exists(RULE)
    r = subprocess.run([*CRRESTART, "--register"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    try:
        yield
    finally:
        if not was:
            subprocess.run([*CRRESTART, "--unregister"], capture_output=True, cwd=REPO)
            assert not os.path.exists(RULE)


def test_register_status_unregister(registered):
    r = subprocess.run([*CRRESTART, "--status"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "registered (enabled)" in r.stdout
    with open(RULE) as f:
        text = f.read()
    assert "flags: \n" in text or "flags:\n" in text           # never the C flag
    assert "4352454c4601" in text                               # the CRELF marker
    interp = [line.split(" ", 1)[1] for line in text.splitlines()
              if line.startswith("interpreter")][0]
    assert os.path.isabs(interp) and os.access(interp, os.X_OK)


def test_execute_statefile(registered, sample_bin, procs, tmp_path):
    out = tmp_path / "tick.out"
    p = procs.spawn([sample_bin / "ticker", 20, 4, 50], stdout=out)
    wait_for_line(out, r"^tick 5 ", proc=p)
    app = tmp_path / "app.cr"
    subprocess.run([Path(sys.executable).parent / "crcheckpoint", str(p.pid), "-o", str(app),
                    "--kill"], check=True, capture_output=True)
    p.wait(timeout=10)
    os.chmod(app, 0o700)
    r = procs.spawn([str(app)], stderr=subprocess.PIPE, cwd=tmp_path)
    _, err = r.communicate(timeout=60)
    assert r.returncode == 0, err.decode()
    ref = subprocess.run([sample_bin / "ticker", "20", "4", "0"], capture_output=True,
                         check=True).stdout
    assert out.read_bytes() == ref


def test_plain_core_is_not_run(registered, tmp_path):
    """An ELF core without the marker still fails with Exec format error."""
    core = tmp_path / "plain.core"
    data = bytearray(open(sys.executable, "rb").read(64))
    data[16] = 4  # ET_CORE, no CRELF marker
    core.write_bytes(bytes(data))
    os.chmod(core, 0o700)
    with pytest.raises(OSError) as e:
        subprocess.run([str(core)])
    assert e.value.errno == 8  # ENOEXEC
