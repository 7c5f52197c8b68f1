"""Namespaces (statefile/dump/ns.py, restorer/restore/ns.py): a tree with a
UTS and IPC namespace of its own (`unshare --uts --ipc`) is checkpointed with
--kill and restarted in new UTS and IPC namespaces with its hostname,
domainname and SysV objects; other namespaces are still refused, naming them,
and the tree runs on."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import descendants, read_lines, require_root, require_tool, wait_for_line
from test_checkpoint import assert_keeps_ticking
from test_restart_unpriv import _python_for_nobody, as_nobody, nobody_dir  # noqa: F401 (fixture)
from test_tree import BIN, checkpoint_tree, finish, restart

from statefile.format import reader

NSPROG = r'''
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/utsname.h>
#include <sys/wait.h>

/* A parent and a child take turns on a SysV semaphore set; the parent sends
   each turn's number through a SysV message queue (it waits 40 ms queued),
   the child receives it.  Both print the names they see every turn. */
struct m { long type; char text[64]; };
static int semid;
static void op(int num, int delta) {
    struct sembuf b = {num, delta, 0};
    while (semop(semid, &b, 1) < 0) ;
}
static void names(char *out, size_t n) {
    char host[128] = "", dom[128] = "";
    struct utsname u;
    gethostname(host, sizeof host);
    getdomainname(dom, sizeof dom);
    uname(&u);
    snprintf(out, n, "hostname %s uname -n %s domain %s", host, u.nodename, dom);
}
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    key_t key = strtol(argv[2], NULL, 0);
    semid = semget(key, 2, IPC_CREAT | 0600);
    int q = msgget(key, IPC_CREAT | 0640);
    if (semid < 0 || q < 0) { perror("ipc"); return 1; }
    semctl(semid, 0, SETVAL, 1);
    semctl(semid, 1, SETVAL, 0);
    printf("ready semid %d msqid %d\n", semid, q); fflush(stdout);
    pid_t pid = fork();
    char w[512];
    for (int i = 0; i < n; i++) {
        if (pid == 0) {
            struct m msg;
            op(1, -1);
            if (msgrcv(q, &msg, sizeof msg.text, 0, 0) < 0) { perror("msgrcv"); return 2; }
            names(w, sizeof w);
            printf("child got '%s' %s\n", msg.text, w); fflush(stdout);
            op(0, 1);
        } else {
            op(0, -1);
            struct m msg = {1, ""};
            snprintf(msg.text, sizeof msg.text, "turn %d", i);
            msgsnd(q, &msg, strlen(msg.text) + 1, 0);
            names(w, sizeof w);
            printf("parent sent %d %s\n", i, w); fflush(stdout);
            usleep(40000);
            op(1, 1);
        }
    }
    if (pid == 0) return 0;
    int st;
    waitpid(pid, &st, 0);
    printf("done child %d\n", WEXITSTATUS(st));
    return 0;
}
'''

KEY = 0x7e57a5c1
TURNS = 150


def _build(tmp_path: Path) -> Path:
    src = tmp_path / "nsprog.c"
    src.write_text(NSPROG)
    subprocess.run(["gcc", "-O1", "-o", tmp_path / "nsprog", src], check=True)
    return tmp_path / "nsprog"


def _argv(prog: Path) -> list[str]:
    # the real hostname/domainname/uname commands set and print the names,
    # then the program runs (exec) as the tree's root, in the same namespaces
    return ["unshare", "--uts", "--ipc", "--", "sh", "-c",
            "hostname crelf-test && domainname crelf.example && hostname && uname -n && "
            f"exec {prog} {TURNS} {KEY:#x}"]


def _host_keys(kind: str) -> set[int]:
    with open(f"/proc/sysvipc/{kind}") as f:
        return {int(line.split()[0]) for line in f.read().splitlines()[1:] if line.strip()}


def _keys_inside(pid: int, flag: str) -> set[int]:
    """Keys of `ipcs -q` (flag -q) or `ipcs -s` run inside pid's IPC namespace."""
    r = subprocess.run(["nsenter", "-t", str(pid), "-i", "ipcs", flag], capture_output=True,
                       text=True, timeout=10, check=True)
    return {int(m[1], 16) for m in re.finditer(r"^(0x[0-9a-f]+)\s", r.stdout, re.M)}


def _ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.mark.parametrize("pidns", [False, True], ids=["same-pids", "pidns"])
def test_uts_and_ipc_namespace_restored(procs, tmp_path, pidns):
    """hostname/domainname of the tree's UTS namespace and the semaphore set
    and message queue (with a queued message) of its IPC namespace come back
    in new namespaces: the output is an uninterrupted run's, byte for byte;
    the restarted tasks are not in the host's namespaces, the host's
    hostname is unchanged, and the SysV objects are visible inside only."""
    require_root()
    for tool in ("unshare", "nsenter", "ipcs", "hostname", "domainname"):
        require_tool(tool)
    prog = _build(tmp_path)
    host_name = socket.gethostname()
    assert host_name != "crelf-test"
    assert KEY not in _host_keys("msg") | _host_keys("sem")
    ref = subprocess.run(_argv(prog), capture_output=True, timeout=120, check=True).stdout
    assert b"parent sent 3 hostname crelf-test uname -n crelf-test domain crelf.example\n" in ref

    out = tmp_path / "ns.out"
    proc = procs.spawn(_argv(prog), stdout=out)
    wait_for_line(out, r"^child got 'turn 20'", proc=proc)
    assert _ns(proc.pid, "uts") != _ns("self", "uts")
    summary = checkpoint_tree(proc, tmp_path / "ns.cr")
    assert len(summary["pids"]) == 2
    sf = reader.load(str(tmp_path / "ns.cr"))
    ns = sf.header.namespaces
    assert (ns.uts.hostname, ns.uts.domainname) == ("crelf-test", "crelf.example")
    assert {t.namespaces.uts for t in sf.tasks} == {ns.uts.ns}
    assert {t.namespaces.ipc for t in sf.tasks} == {ns.ipc.ns}
    # the objects of the tree's namespace (ids from 0 there), not the host's
    assert [(s.key, s.semid) for s in sf.ipc.sem] == [(KEY, 0)]
    assert [(q.key, q.msqid, q.perms & 0o777) for q in sf.ipc.msg] == \
        [(KEY, 0, 0o640)]
    assert KEY not in _host_keys("msg") | _host_keys("sem")

    r = restart(procs, tmp_path / "ns.cr", *(["--pidns"] if pidns else []))
    seen = len(read_lines(out))
    wait_for_line(out, r"^child got 'turn 40'", timeout=30, proc=r)
    assert len(read_lines(out)) > seen
    tasks = [p for p in descendants(r.pid) if os.path.realpath(f"/proc/{p}/exe") == str(prog)]
    assert len(tasks) == 2, tasks
    if not pidns:
        assert sorted(tasks) == sorted(summary["pids"])
    for p in tasks:
        assert _ns(p, "uts") != _ns("self", "uts")
        assert _ns(p, "ipc") != _ns("self", "ipc")
        assert _ns(p, "uts") == _ns(tasks[0], "uts") and _ns(p, "ipc") == _ns(tasks[0], "ipc")
    r2 = subprocess.run(["nsenter", "-t", str(tasks[0]), "-u", "hostname"], capture_output=True,
                        text=True, timeout=10, check=True)
    assert r2.stdout.strip() == "crelf-test"
    assert socket.gethostname() == host_name
    assert KEY in _keys_inside(tasks[0], "-q") and KEY in _keys_inside(tasks[0], "-s")
    assert KEY not in _host_keys("msg") | _host_keys("sem")
    code, err = finish(r)
    assert code == 0, err
    assert out.read_bytes() == ref
    assert socket.gethostname() == host_name
    assert KEY not in _host_keys("msg") | _host_keys("sem")   # they died with the namespace


TICK = "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.05; done"


def _crcheck(pid: int) -> tuple[int, dict]:
    r = subprocess.run([str(BIN / "crcheck"), str(pid), "--json"], capture_output=True,
                       text=True, timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, json.loads(r.stdout)


@pytest.mark.parametrize("case", ["net", "pid", "mixed"])
def test_other_namespaces_refused_and_tree_runs_on(procs, tmp_path, case):
    """A private network namespace, tasks in two pid namespaces and a tree
    whose tasks are in different UTS namespaces: crcheck and crcheckpoint refuse each
    with its reason (exit 6, no statefile) and the tree keeps running."""
    require_root()
    require_tool("unshare")
    argv, key, words = {
        "net": (["unshare", "--net", "--", "sh", "-c", TICK], "task:namespace", "network"),
        # the `unshare` process itself: its child, the namespace's init, is in another
        # pid namespace (tests/test_pidns_tree.py checkpoints the init)
        "pid": (["unshare", "--pid", "--fork", "--", "sh", "-c", TICK], "task:ns-pid-other",
                "pid namespace"),
        "mixed": (["sh", "-c", f"unshare --uts -- sh -c '{TICK}' & wait"], "task:ns-mixed",
                  "share one UTS and one IPC namespace"),
    }[case]
    out = tmp_path / "tick.out"
    proc = procs.spawn(argv, stdout=out)
    wait_for_line(out, r"tick 3", proc=proc)
    code, report = _crcheck(proc.pid)
    assert code == 6 and not report["checkpointable"]
    bad = [f for f in report["findings"] if f["key"] == key]
    assert bad and all(f["status"] == "unsupported" for f in bad), report["problems"]
    assert any(words in f["reason"] or words in f["detail"] for f in bad), bad
    cr = tmp_path / "x.cr"
    r = subprocess.run([str(BIN / "crcheckpoint"), str(proc.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr and "namespace" in r.stderr, r.stderr
    assert not cr.exists()
    time.sleep(0.1)
    assert_keeps_ticking(out, proc)



def test_unprivileged_checkpoint_of_a_namespace_tree_is_refused(sample_bin, procs, nobody_dir):
    """A tree of user 65534 in a UTS+IPC namespace root made for it: 65534
    cannot enter that namespace to read its hostname and SysV objects, so
    its crcheckpoint refuses (exit 6, the reason named, nothing written) and
    the tree ticks on."""
    require_root()
    for tool in ("unshare", "setpriv"):
        require_tool(tool)
    py, env = _python_for_nobody()
    ticker = nobody_dir / "ticker"
    ticker.write_bytes((sample_bin / "ticker").read_bytes())
    ticker.chmod(0o755)
    out = nobody_dir / "tick.out"
    for f in (out, nobody_dir / "tick.err"):
        f.touch()
        os.chown(f, 65534, 65534)
    p = procs.spawn(["unshare", "--uts", "--ipc", "--", *as_nobody(ticker, 100, 4, 50)],
                    stdout=out, stderr=nobody_dir / "tick.err", cwd=nobody_dir)
    wait_for_line(out, r"tick 3", proc=p)
    cr = nobody_dir / "t.cr"
    r = subprocess.run(as_nobody(py, "-m", "statefile.cli", p.pid, "-o", cr, "--kill"),
                       capture_output=True, text=True, env=env, cwd=nobody_dir, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert "its state cannot be read" in r.stderr and "uts namespace" in r.stderr, r.stderr
    assert not cr.exists()
    assert_keeps_ticking(out, p)
