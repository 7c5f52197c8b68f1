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
from helpers import descendants, require_root, require_tool
from test_checkpoint import checkpoint
from test_tree import reap

BIN = Path(sys.executable).parent

SQL = """
CREATE TABLE t(a INTEGER, b TEXT);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < {rows})
  INSERT INTO t SELECT x, printf('%08x', x * 2654435761 % 4294967296) FROM c;
SELECT count(*), sum(a), max(b) FROM t;
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < {terms})
  SELECT sum(x * x % 7) FROM c;
"""

# An uninterrupted run must last this long here, or it could end between the
# check that it runs and the moment crcheckpoint seizes it (a fast machine
# did that with a fixed 0.4 s wait): the work is made larger until it does,
# and the program is caught at a quarter of its own run time.
MIN_RUN = 2.0


def _larger(scale: int, took: float) -> int:
    return max(scale + 1, int(scale * MIN_RUN * 1.25 / max(took, 0.01)) + 1)

NODE = """
let n = 0, s = 0;
const t = setInterval(() => {
  n++; s += n * n; console.log(`node tick ${n} ${s}`);
  if (n === 40) clearInterval(t);
}, 50);
"""

JAVA = """
public class Tick {
    public static void main(String[] a) throws Exception {
        long s = 0;
        java.util.HashMap<Integer, Long> m = new java.util.HashMap<>();
        for (int i = 1; i <= 40; i++) {
            for (int j = 0; j < 200000; j++) { s += (long) j * i % 7; m.put(j % 1000, s); }
            System.out.println("java tick " + i + " " + s + " " + m.size());
            Thread.sleep(50);
        }
    }
}
"""

PROGRAMS = {
    # name: (tool, argv builder (tmp) -> argv, stdin file name or None)
    "xz": ("xz", lambda d: ["xz", "-2", "-c"], "in.txt"),
    # multi-threaded: worker threads with their condition variables
    "xz-threads": ("xz", lambda d: ["xz", "-T2", "-3", "-c"], "in.txt"),
    "zstd-threads": ("zstd", lambda d: ["zstd", "-T2", "-15", "-c"], "in.txt"),
    # sort reads its input whole before it writes a line: three copies of it,
    # as files it opened itself, keep it busy long enough to be caught mid-run
    "sort-parallel": ("sort", lambda d: ["sort", "--parallel=2", "-r", "-S", "100M",
                                         *[str(d / "in.txt")] * 3], None),
    "bzip2": ("bzip2", lambda d: ["bzip2", "-9", "-c"], "in.txt"),
    "zstd": ("zstd", lambda d: ["zstd", "-12", "-c"], "in.txt"),
    "perl": ("perl", lambda d: ["perl", "-ne", "$s += $_; if ($. % 100000 == 0) "
                                "{ print \"$s\\n\"; select(undef, undef, undef, 0.01) }"],
             "in.txt"),
    "sort": ("sort", lambda d: ["sort", "-r", "-S", "50M", *[str(d / "in.txt")] * 3], None),
    "sqlite3": ("sqlite3", lambda d: ["sqlite3", str(d / "db.sqlite")], "q.sql"),
    "node": ("node", lambda d: ["node", str(d / "n.js")], None),
    # a JVM: ~20 threads, JIT-compiled code, a peerless unix socket
    "java": ("java", lambda d: ["java", str(d / "Tick.java")], None),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_real_program_restarts_identically(name, procs, tmp_path):
    require_root()
    tool, argv_of, stdin_name = PROGRAMS[name]
    require_tool(tool)
    (tmp_path / "n.js").write_text(NODE)          # (these two sleep 40 x 50 ms: long enough)
    (tmp_path / "Tick.java").write_text(JAVA)

    def stdin():
        if stdin_name is None:
            return contextlib.nullcontext(subprocess.DEVNULL)
        return open(tmp_path / stdin_name, "rb")

    scale = 1
    for _ in range(4):
        (tmp_path / "in.txt").write_text("".join(f"{i}\n" for i in range(1, 3_000_000 * scale + 1)))
        (tmp_path / "q.sql").write_text(SQL.format(rows=1_500_000 * scale, terms=3_000_000 * scale))
        t0 = time.monotonic()
        with stdin() as f:
            ref = subprocess.run(argv_of(tmp_path), stdin=f, capture_output=True,
                                 timeout=300).stdout
        took = time.monotonic() - t0
        (tmp_path / "db.sqlite").unlink(missing_ok=True)
        if took >= MIN_RUN or name in ("node", "java"):
            break
        scale = _larger(scale, took)
    assert took >= MIN_RUN, f"{name}: an uninterrupted run takes only {took:.2f} s"
    out = tmp_path / "run.out"
    with stdin() as f:
        proc = procs.spawn(argv_of(tmp_path), stdin=f, stdout=out, stderr=tmp_path / "err")
    time.sleep(took / 4)
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


def _c_source(n: int) -> str:
    """A C file gcc -O2 needs a few seconds for (n functions with loops)."""
    out = [f"int f{i}(int x) {{ int s = 0; for (int j = 0; j < x; j++) "
           f"s += (j * {i % 97 + 1}) ^ (s >> {i % 7 + 1}); return s + {i}; }}\n"
           for i in range(n)]
    out.append("int main(void) { int t = 0; "
               + "".join(f"t += f{i}(3); " for i in range(n)) + "return t & 1; }\n")
    return "".join(out)


@pytest.mark.parametrize("pipe", [True, False], ids=["gcc-pipe", "gcc-tempfile"])
def test_compiler_tree_restarts_identically(pipe, procs, tmp_path):
    """gcc is a tree: the driver with cc1 and as, joined by a pipe (-pipe) or
    by a temporary assembler file; killed mid-compile and restarted, the
    object file is byte-identical to an uninterrupted compile's."""
    require_root()
    require_tool("gcc")
    argv = ["gcc", "-O2", *(["-pipe"] if pipe else []), "-c", "big.c"]
    n = 600
    for _ in range(4):
        (tmp_path / "big.c").write_text(_c_source(n))
        t0 = time.monotonic()
        subprocess.run([*argv, "-o", "ref.o"], cwd=tmp_path, check=True, timeout=300)
        took = time.monotonic() - t0
        if took >= MIN_RUN:
            break
        n = _larger(n, took)
    assert took >= MIN_RUN, f"an uninterrupted compile takes only {took:.2f} s"
    proc = procs.spawn([*argv, "-o", "run.o"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                       stdout=tmp_path / "out", stderr=tmp_path / "err")
    deadline = time.monotonic() + 30

    def comm(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""
    while "cc1" not in map(comm, descendants(proc.pid)):
        assert proc.poll() is None and time.monotonic() < deadline, "gcc ended too early"
        time.sleep(0.05)
    time.sleep(took / 4)                  # well inside the compile
    summary = checkpoint(proc.pid, tmp_path / "gcc.cr", "--kill")
    assert len(summary["pids"]) == (3 if pipe else 2)
    proc.wait(timeout=10)
    reap(summary["pids"][1:])             # pytest is a subreaper
    res = subprocess.run([str(BIN / "crrestart"), str(tmp_path / "gcc.cr")],
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "run.o").read_bytes() == (tmp_path / "ref.o").read_bytes()


POOL = """
import hashlib, multiprocessing as mp
def work(i):
    h = b"%d" % i
    for _ in range(100000):
        h = hashlib.sha256(h).digest()
    return i, h.hex()[:16]
if __name__ == "__main__":
    with mp.Pool(3) as p:
        for i, h in p.imap(work, range(60)):
            print(i, h, flush=True)
"""


def test_python_multiprocessing_pool_restarts_identically(procs, tmp_path):
    """A multiprocessing Pool: the parent, its 3 workers and its helper
    threads, with the pipes and locks between them, killed mid-run."""
    require_root()
    prog = tmp_path / "pool.py"
    prog.write_text(POOL)
    ref = subprocess.run([sys.executable, prog], capture_output=True, timeout=300).stdout
    out = tmp_path / "run.out"
    proc = procs.spawn([sys.executable, prog], stdout=out, stderr=tmp_path / "err")
    deadline = time.monotonic() + 30
    while out.read_bytes().count(b"\n") < 5:
        assert proc.poll() is None and time.monotonic() < deadline, "the pool ended too early"
        time.sleep(0.05)
    summary = checkpoint(proc.pid, tmp_path / "pool.cr", "--kill")
    assert len(summary["pids"]) == 4 and summary["threads"] > 4
    proc.wait(timeout=10)
    reap(summary["pids"][1:])
    res = subprocess.run([str(BIN / "crrestart"), str(tmp_path / "pool.cr")],
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == ref
