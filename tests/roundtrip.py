"""The two shapes most resource tests share.

same_after_restart: a program of ours runs once uninterrupted, then again
with GO set to a file it waits for at its end; that second run is
checkpointed with --kill once it printed `ready`, restarted, let go, and its
whole output must be byte-identical to the first run's.

refused_up_front: crcheckpoint refuses the target (exit 6) naming why,
writes nothing, and the target runs on."""
from __future__ import annotations

import os
import subprocess

from helpers import wait_for_line
from test_memfd import _checkpoint
from test_tree import CRCHECKPOINT, finish, restart


def same_after_restart(procs, tmp_path, argv, name: str, ready: str = r"tick 5\b",
                       ref_argv=None, restart_args=()) -> bytes:
    """Returns the output (the reference run's), for further assertions.
    ref_argv: the reference run's own arguments, where they must differ
    (a directory of its own, say)."""
    argv = [str(a) for a in argv]
    ref = subprocess.run([str(a) for a in ref_argv or argv], capture_output=True, timeout=60,
                         check=True, close_fds=True).stdout
    out, go = tmp_path / f"{name}.out", tmp_path / f"{name}.go"
    proc = procs.spawn(argv, stdout=out, env={**os.environ, "GO": str(go)})
    wait_for_line(out, ready, proc=proc)
    _checkpoint(proc, tmp_path / f"{name}.cr")
    rp = restart(procs, tmp_path / f"{name}.cr", *restart_args)
    go.touch()
    code, err = finish(rp)
    assert code == 0, err
    got = out.read_bytes()
    assert got == ref, f"restarted run:\n{got[-1500:]!r}\nuninterrupted:\n{ref[-1500:]!r}"
    return ref


def refused_up_front(proc, cr, *needles: str, args=()) -> str:
    """Returns crcheckpoint's stderr (`args`: more crcheckpoint options)."""
    r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 6, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(cr), "a refused checkpoint left a file"
    assert proc.poll() is None, "the refused target did not run on"
    return r.stderr
