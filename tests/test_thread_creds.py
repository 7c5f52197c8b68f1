"""Credentials are per thread (tests/threadcreds.c): a thread that changed its
own uids, gids, groups, capabilities or securebits with the raw syscalls gets
its own back on restart, not the leader's.  The program checks this itself
(each thread compares what it sees after the restart with what it saw before)
and the test compares the lines too."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import require_root, wait_for_line
from test_restart import checkpoint, finish, restart
from test_restore_state import wait_restored

SRC = Path(__file__).resolve().parent / "threadcreds.c"


@pytest.fixture(scope="module")
def threadcreds(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("threadcreds") / "threadcreds"
    subprocess.run(["gcc", "-O1", "-Wall", "-pthread", "-o", out, SRC], check=True)
    return out


def _lines(path: Path, phase: str) -> dict[str, str]:
    out = {}
    for ln in path.read_text().splitlines():
        if ln.startswith(phase + " "):
            key, _, val = ln.partition(" ")[2].partition("=")
            out[key] = val
    return out


@pytest.mark.parametrize("mode", ["--eager", "--lazy"])
def test_thread_credentials_survive_restart(threadcreds, procs, tmp_path, mode):
    require_root()
    d, out, cr = tmp_path / "d", tmp_path / "out", tmp_path / "tc.cr"
    d.mkdir()
    p = procs.spawn([threadcreds, d], stdout=out, stderr=subprocess.STDOUT, close_fds=True)
    wait_for_line(out, r"^ready$", proc=p, timeout=30)
    before = _lines(out, "before")
    # the program did set what it is about: three threads, three sets of credentials
    assert before["t0 Uid:"] == "0\t0\t0\t0"
    assert before["t1 Uid:"] == "1\t2\t3\t2" and before["t1 Gid:"] == "5\t6\t7\t6"
    assert before["t1 CapPrm:"] == "00000000000000e0" and before["t1 CapEff:"] == "0000000000000020"
    assert before["t1 CapInh:"] == "0000000000000040" and before["t1 securebits"] == "0x10"
    assert before["t2 Uid:"] == "30\t31\t32\t31" and before["t2 Gid:"] == "20\t21\t22\t21"
    assert before["t2 Groups:"].split() == ["44", "55"] and before["t2 CapPrm:"] == "0000000000000000"
    assert before["t2 securebits"] == "0x3"

    checkpoint(p.pid, cr, proc=p)
    from statefile.format import reader
    threads = reader.load(str(cr)).tasks[0].threads
    assert threads[0].creds is None              # the leader's are the task's
    assert [th.creds.uid for th in threads[1:]] == [[1, 2, 3, 2], [30, 31, 32, 31]]
    r = restart(procs, cr, mode)
    wait_restored(p.pid, threadcreds, r)
    (d / "go").touch()
    code, err = finish(r)
    text = out.read_text()
    assert code == 0, err + text
    for t in range(3):
        assert f"\nt{t} same\n" in text, text
    assert _lines(out, "after") == before
    assert text.endswith("done\n"), text
