"""A task in a cgroup other than crcheckpoint's own would come back in
crrestart's cgroup, without its limits: until cgroup membership is restored
(the containers issue) such a tree is refused before anything is written
(statefile/dump/cgroup.py, support key task:cgroup)."""
from __future__ import annotations

import os
import signal
import subprocess

from helpers import descendants, require_root, wait_for_line
from test_memfd import _checkpoint
from test_tree import CRCHECKPOINT, finish, restart


def test_task_in_another_cgroup_is_refused(procs, tmp_path):
    require_root()
    root = "/sys/fs/cgroup/freezer"
    assert os.path.isdir(root), "no cgroup v1 freezer hierarchy here"
    cg = os.path.join(root, f"crelf-test-{os.getpid()}")
    os.mkdir(cg)
    try:
        out = tmp_path / "t.out"
        proc = procs.spawn(["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); "
                            "sleep 0.05; done"], stdout=out)
        wait_for_line(out, r"tick 1\b", proc=proc)
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(proc.pid))
        cr = tmp_path / "t.cr"
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 6, r.stderr
        assert f"freezer:/crelf-test-{os.getpid()} (crelf: /)" in r.stderr, r.stderr
        assert "without its cgroup's limits" in r.stderr, r.stderr
        assert not cr.exists()
        n = len(out.read_text().splitlines())
        wait_for_line(out, rf"tick {n + 2}\b", proc=proc)       # it runs on, unharmed
        with open(os.path.join(root, "cgroup.procs"), "w") as f:
            f.write(str(proc.pid))
        _checkpoint(proc, cr)       # back in crelf's cgroup: checkpointed (--kill)
        rp = restart(procs, cr, "--detach")
        code, err = finish(rp)
        assert code == 0, err
        n = len(out.read_text().splitlines())
        wait_for_line(out, rf"tick {n + 1}\b")
        for pid in [proc.pid, *descendants(proc.pid)]:     # the restored tree (detached)
            os.kill(pid, signal.SIGKILL)
    finally:
        for pid in open(os.path.join(cg, "cgroup.procs")).read().split():
            with open(os.path.join(root, "cgroup.procs"), "w") as f:
                f.write(pid)
        os.rmdir(cg)
