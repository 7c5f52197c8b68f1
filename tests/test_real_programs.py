"""Real programs nobody here wrote, checkpointed with --kill mid-run and
restarted: their output must be byte-identical to an uninterrupted run."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import require_root, require_tool
from test_checkpoint import checkpoint

BIN = Path(sys.executable).parent

SQL = """
CREATE TABLE t(a INTEGER, b TEXT);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 1500000)
  INSERT INTO t SELECT x, printf('%08x', x * 2654435761 % 4294967296) FROM c;
SELECT count(*), sum(a), max(b) FROM t;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 3000000)
  SELECT sum(x * x % 7) FROM c;
"""

NODE = """
let n = 0, s = 0;
const t = setInterval(() => {
  n++; s += n * n; console.log(`node tick ${n} ${s}`);
  if (n === 40) clearInterval(t);
}, 50);
"""

PROGRAMS = {
    # name: (tool, argv builder (tmp) -> argv, stdin file name or None)
    "xz": ("xz", lambda d: ["xz", "-2", "-c"], "in.txt"),
    "bzip2": ("bzip2", lambda d: ["bzip2", "-9", "-c"], "in.txt"),
    "zstd": ("zstd", lambda d: ["zstd", "-12", "-c"], "in.txt"),
    "perl": ("perl", lambda d: ["perl", "-ne", "$s += $_; if ($. % 100000 == 0) "
                                "{ print \"$s\\n\"; select(undef, undef, undef, 0.01) }"],
             "in.txt"),
    "sort": ("sort", lambda d: ["sort", "-r", "-S", "50M"], "in.txt"),
    "sqlite3": ("sqlite3", lambda d: ["sqlite3", str(d / "db.sqlite")], "q.sql"),
    "node": ("node", lambda d: ["node", str(d / "n.js")], None),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_real_program_restarts_identically(name, procs, tmp_path):
    require_root()
    tool, argv_of, stdin_name = PROGRAMS[name]
    require_tool(tool)
    (tmp_path / "in.txt").write_text("".join(f"{i}\n" for i in range(1, 3_000_001)))
    (tmp_path / "q.sql").write_text(SQL)
    (tmp_path / "n.js").write_text(NODE)

    def stdin():
        if stdin_name is None:
            return contextlib.nullcontext(subprocess.DEVNULL)
        return open(tmp_path / stdin_name, "rb")

    with stdin() as f:
        ref = subprocess.run(argv_of(tmp_path), stdin=f, capture_output=True, timeout=300).stdout
    (tmp_path / "db.sqlite").unlink(missing_ok=True)
    out = tmp_path / "run.out"
    with stdin() as f:
        proc = procs.spawn(argv_of(tmp_path), stdin=f, stdout=out, stderr=tmp_path / "err")
    time.sleep(0.4)
    assert proc.poll() is None, f"{name} finished before it could be checkpointed"
    checkpoint(proc.pid, tmp_path / f"{name}.cr", "--kill")
    proc.wait(timeout=10)
    res = subprocess.run([str(BIN / "crrestart"), str(tmp_path / f"{name}.cr")],
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref


def test_tools_present():
    """CI installs every program above (scripts/setup.sh); say so if one is missing."""
    missing = [tool for tool, _, _ in PROGRAMS.values() if shutil.which(tool) is None]
    assert not missing, f"missing real programs: {missing} (scripts/setup.sh installs them)"
