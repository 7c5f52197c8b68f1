"""Policy files (statefile/check/policy.py), the support table as the one source of
verdicts (statefile/check/support.py, docs/SUPPORT.md, crrun's WATCHED reasons)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, require_root, wait_for_line

from statefile.check import monitor, policy, support
from statefile.format import records

BIN = Path(sys.executable).parent
CRRUN = [sys.executable, "-m", "statefile.check.crrun"]


# --- the policy file ------------------------------------------------------------

BAD_POLICIES = [
    (b"skip = [\"network\"]\n# caf\xe9\n", "not UTF-8 text"),
    (b"\xff\xfe\x00s", "not UTF-8 text"),
    (b"dump_tmpfs = \"no\"\n", "'dump_tmpfs' must be true or false"),
    (b"dump_tmpfs = 1\n", "'dump_tmpfs' must be true or false"),
    (b"skip = [\"everything\"]\n", "unknown policy class 'everything'"),
    (b"skip = \"network\"\n", "'skip' must be a list"),
    (b"on_unsupported = \"ignore\"\n", "on_unsupported must be"),
    (b"skipp = []\n", "unknown key 'skipp'"),
    (b"skip = [\n", "not valid TOML"),
]


@pytest.mark.parametrize("content,message", BAD_POLICIES)
def test_load_refuses_bad_policies(tmp_path, content, message):
    f = tmp_path / "p.toml"
    f.write_bytes(content)
    with pytest.raises(policy.PolicyError) as e:
        policy.load(str(f))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_load_good_policy(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('skip = ["network", "io_uring"]\ndump_tmpfs = false\n'
                 'on_unsupported = "snapshot"\n')
    p = policy.load(str(f))
    assert p.skip == {"network", "io_uring"} and p.dump_tmpfs is False and p.snapshot
    f.write_text("dump_tmpfs = true\n")
    assert policy.load(str(f)).dump_tmpfs is True


@pytest.mark.parametrize("content,message", [BAD_POLICIES[0], BAD_POLICIES[2]])
def test_bad_policy_is_one_line_exit_2_in_every_command(tmp_path, content, message):
    """crcheck, crcheckpoint and crrun: one line on stderr, exit 2, nothing run."""
    f = tmp_path / "p.toml"
    f.write_bytes(content)
    marker = tmp_path / "ran"
    for argv in ([BIN / "crcheck", "1", "--policy", f],
                 [BIN / "crcheckpoint", "1", "-o", tmp_path / "x.cr", "--policy", f],
                 [*CRRUN, "--policy", f, "--", "touch", marker]):
        res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, (argv, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists() and not (tmp_path / "x.cr").exists()


# --- the table is the one source ------------------------------------------------

def test_docs_support_md_is_generated_from_the_table():
    """docs/SUPPORT.md is `python -m statefile.check.support` (regenerate it after a
    change to the table)."""
    assert (REPO_ROOT / "docs" / "SUPPORT.md").read_text() == support.markdown()
    res = subprocess.run([sys.executable, "-m", "statefile.check.support"], capture_output=True,
                         text=True, cwd=REPO_ROOT, check=True)
    assert res.stdout == support.markdown()


def test_watched_syscalls_take_their_reason_from_the_table():
    """Every syscall crrun watches names a table row; what crrun says about it is
    that row's reason, and its policy class is the row's."""
    watches = {w for arch in monitor.WATCHED.values() for w in arch.values()}
    assert {w.name for w in watches} >= {"io_uring_setup", "perf_event_open", "bpf",
                                         "userfaultfd", "fanotify_init", "ptrace", "socket"}
    for w in watches:
        assert w.resource in support.BY_KEY, w
        row = support.BY_KEY[w.resource]
        assert row.status != support.SUPPORTED, w
        assert w.reason == row.reason
    assert monitor._IO_URING.row.policy == "io_uring"
    assert monitor._PERF.row.policy == "perf"


@pytest.mark.parametrize("resource,action,skip,status,skipped", [
    ("fd:io_uring", "flagged", set(), support.SKIPPABLE, False),
    ("fd:io_uring", "flagged", {"io_uring"}, support.SKIPPABLE, True),
    ("fd:perf_event", "flagged", {"io_uring"}, support.SKIPPABLE, False),
    ("fd:bpf", "flagged", {"io_uring", "perf"}, support.UNSUPPORTED, False),
    ("task:ptrace", "flagged", set(), support.UNSUPPORTED, False),
    ("fd:io_uring", "denied", set(), support.SUPPORTED, False),
    ("no:such-row", "flagged", set(), support.UNSUPPORTED, False),
])
def test_flag_verdict_is_its_table_row(resource, action, skip, status, skipped):
    fl = records.CrrunFlag(pid=7, tid=7, time=1700000000.25, syscall="x", call="x()", nr=0,
                           resource=resource, reason="x(): why", action=action)
    f = support.flag_finding(fl, 7, skip)
    row = support.flag_row(fl)
    assert row.key == (resource if action == "flagged" and resource in support.BY_KEY
                       else "task:flag-denied" if action == "denied" else "task:flagged")
    assert (f.key, f.status, f.skipped, f.reason, f.policy, f.row, f.time) == \
        ("task:flagged", status, skipped, row.reason, row.policy, row.key, 1700000000.25)
    assert f"at {support.flag_time(fl)}: x()" in f.line()
    assert bool(support.problems([f])) == (status != support.SUPPORTED and not skipped)


def test_crrun_policy_is_found_for_descendants(procs, tmp_path):
    """record_crrun marks the task crrun started; a descendant finds it."""
    require_root()
    pfile = tmp_path / "p.toml"
    pfile.write_text('skip = ["perf"]\n')
    out = tmp_path / "out"
    proc = procs.spawn(["sh", "-c", "sleep 100 & echo $!; wait"], stdout=out)
    child = int(wait_for_line(out, r"^\d+$", proc=proc))
    d = str(tmp_path / "flags")
    assert policy.crrun_policy(child, d) is None
    policy.record_crrun(proc.pid, str(pfile), d)
    assert policy.crrun_policy(child, d) == (str(pfile), proc.pid)
    assert policy.crrun_policy(proc.pid, d) == (str(pfile), proc.pid)
