"""`crinspect shared`: the objects the tasks of a checkpointed tree share, and
who holds them, read from the statefile alone and checked against what the
kernel showed of the running tree (leave-running checkpoints, so /proc still
tells the truth after the statefile is written).

Trees: the pipe/FIFO channel of test_tree.py (a writer child filling a pipe a
slow parent reads), the pre-fork pool of samples/prefork.py (a listening
socket shared by every task, a socketpair from the parent to each worker),
samples/sockets.py (socketpairs with queued data), and the SysV pingpong of
test_ipc.py (a shm segment attached in parent and child, a semaphore set, a
MAP_SHARED anonymous page)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import msgspec
import pytest
from helpers import build_c, descendants, require_root, wait_for_line
from test_crinspect import (assert_one_line_error, checkpoint, crinspect, crinspect_json,
                            snapshot_flag)
from test_ipc import PINGPONG, _ipcrm, _keys
from test_tree import CHANNEL

from crinspect import shared
from statefile.format import reader, records


def fd_targets(pid: int) -> dict[int, str]:
    """fd -> link text of a live task."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            pass
    return out


def holding(pids, target: str) -> set[tuple[int, int]]:
    """(pid, fd) of every fd of these tasks that points at `target`."""
    return {(p, fd) for p in pids for fd, t in fd_targets(p).items() if t == target}


def who(obj: dict, role: str | None = None) -> set[tuple[int, int]]:
    return {(h["pid"], h["fd"]) for h in obj["holders"] if role is None or h["role"] == role}


def shared_text(cr) -> str:
    res = crinspect("shared", cr)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    return res.stdout


# --------------------------------------------------------------- pipes, FIFOs

@pytest.mark.parametrize("mode", ["pipe", "fifo"])
def test_pipe_between_parent_and_child(procs, tmp_path, mode):
    """The parent reads, the child writes: one object, both ends named with
    their pid and fd, the capacity and the bytes in flight."""
    require_root()
    prog = tmp_path / "channel.py"
    prog.write_text(CHANNEL)
    fifo = tmp_path / "c.fifo"
    out, err = tmp_path / "c.out", tmp_path / "c.err"
    proc = procs.spawn([sys.executable, prog, mode, fifo, 10_000_000], stdout=out, stderr=err)
    rfd = int(wait_for_line(err, r"^reader fd ", proc=proc).split()[2])
    time.sleep(0.3)  # the writer fills the 128 KiB pipe
    (child,) = descendants(proc.pid)
    target = fd_targets(proc.pid)[rfd]
    (wfd,) = [fd for fd, t in fd_targets(child).items() if t == target]
    cr = tmp_path / "c.cr"
    checkpoint(proc.pid, cr)

    objs = crinspect_json("shared", cr)["objects"]
    chans = [o for o in objs if o["kind"] == mode]
    assert len(chans) == 1, chans
    ch = chans[0]
    assert ch["holders"] == [
        {"pid": proc.pid, "fd": rfd, "file": ch["holders"][0]["file"], "role": "read end",
         "start": None, "end": None, "perms": None},
        {"pid": child, "fd": wfd, "file": ch["holders"][1]["file"], "role": "write end",
         "start": None, "end": None, "perms": None}]
    assert ch["pids"] == sorted([proc.pid, child])
    assert ch["capacity"] == 1 << 17 and ch["readers"] and ch["writers"]
    assert 0 < ch["bytes"] <= 1 << 17 and ch["unread"] == ch["bytes"]
    assert ch["nonblock"] == [rfd] and ch["external"] is None
    if mode == "fifo":
        assert ch["path"] == str(fifo) and ch["ino"] == os.stat(fifo).st_ino
    else:
        assert ch["path"] is None and target == f"pipe:[{ch['ino']}]"
        assert ch["id"] == target
    # the output file is one open file description of both tasks
    outf = next(o for o in objs if o.get("path") == str(out))
    assert outf["kind"] == "regular" and who(outf, "write") == {(proc.pid, 1), (child, 1)}
    assert outf["offset"] > 0

    text = shared_text(cr)
    assert f"pid {proc.pid} fd {rfd} (read end)" in text, text
    assert f"pid {child} fd {wfd} (write end)" in text, text
    assert f"{ch['bytes']} bytes in flight" in text and "capacity 128 KiB" in text, text
    # the default summary has the same section
    summary = crinspect(cr).stdout
    assert "shared objects" in summary and f"pid {child} fd {wfd} (write end)" in summary
    assert crinspect_json(cr)["shared"] == objs


def test_pipe_to_a_reader_outside_the_tree(sample_bin, procs, tmp_path):
    """stdout is a pipe whose read end is ours: the object is listed with
    the tree's write ends only, and says so."""
    require_root()
    proc = procs.spawn([sample_bin / "tree"], stdout=subprocess.PIPE)
    line = b""
    while b"child 2 tick" not in line:  # both children run
        line = proc.stdout.readline()
        assert line, "the tree exited"
    kids = descendants(proc.pid)
    assert len(kids) == 2
    target = fd_targets(proc.pid)[1]
    cr = tmp_path / "t.cr"
    checkpoint(proc.pid, cr, *snapshot_flag())
    objs = crinspect_json("shared", cr)["objects"]
    (pipe,) = [o for o in objs if o["id"] == target]
    assert who(pipe, "write end") == {(p, 1) for p in [proc.pid, *kids]} == who(pipe)
    assert pipe["readers"] is False and pipe["writers"] is True
    assert pipe["unread"] == "unknown" and pipe["external"]
    text = shared_text(cr)
    assert "no read end in the tree" in text and "also held outside the tree" in text, text
    proc.stdout.close()


# -------------------------------------------------------------------- sockets

def test_socketpairs_and_a_listening_socket_of_a_worker_pool(sample_bin, procs, tmp_path):
    """Each worker's socketpair: the parent holds one end, the worker the
    other (and a later worker inherited an earlier worker's parent end); the
    listening socket is held by all three tasks."""
    require_root()
    proc = procs.spawn([sys.executable, sample_bin / "prefork.py", tmp_path, 2],
                       stdout=tmp_path / "pool.out", stderr=tmp_path / "pool.err")
    wait_for_line(tmp_path / "pool.out", "ready", proc=proc)
    workers = sorted(descendants(proc.pid))
    assert len(workers) == 2
    tasks = [proc.pid, *workers]
    cr = tmp_path / "pool.cr"
    checkpoint(proc.pid, cr)
    objs = crinspect_json("shared", cr)["objects"]

    pairs = [o for o in objs if o["kind"] == "unix-pair"]
    assert len(pairs) == 2, objs
    for o in pairs:
        a, b = o["ends"]
        assert (a["label"], b["label"]) == ("A", "B") and o["type"] == "stream"
        assert who(o, "end A") == holding(tasks, f"socket:[{a['ino']}]")
        assert who(o, "end B") == holding(tasks, f"socket:[{b['ino']}]")
        assert a["queued"] == b["queued"] == 0 and a["shutdown"] == b["shutdown"] == "none"
        assert a["name"] is None
    for w in workers:  # the parent talks to each worker through one pair
        assert any({proc.pid, w} <= {h["pid"] for h in o["holders"]} for o in pairs), w

    (listen,) = [o for o in objs if o["kind"] == "unix-listen"
                 and o["name"] == str(tmp_path / "pool.sock")]
    fd = next(fd for fd, t in fd_targets(proc.pid).items() if t == f"socket:[{listen['ino']}]")
    assert who(listen, "listening") == {(p, fd) for p in tasks} and listen["pids"] == tasks

    text = shared_text(cr)
    for o in pairs:
        for h in o["holders"]:
            assert f"pid {h['pid']} fd {h['fd']} ({h['role']})" in text, text
    assert f"listening unix stream socket {tmp_path / 'pool.sock'}" in text, text


def test_socketpairs_with_queued_data(sample_bin, procs, tmp_path):
    """Both ends of a pair in one task still make one object; the bytes and
    datagrams waiting at each end are counted."""
    require_root()
    out = tmp_path / "s.out"
    proc = procs.spawn([sys.executable, sample_bin / "sockets.py", tmp_path], stdout=out,
                       stderr=tmp_path / "s.err")
    wait_for_line(out, "ready", proc=proc)
    cr = tmp_path / "s.cr"
    checkpoint(proc.pid, cr)
    objs = crinspect_json("shared", cr)["objects"]
    pairs = {o["type"]: o for o in objs if o["kind"] == "unix-pair"}
    assert set(pairs) == {"stream", "dgram"}, objs
    stream = pairs["stream"]
    assert sorted(e["queued"] for e in stream["ends"]) == [len(b"b->a"),
                                                          len(b"a->b one;a->b two;")]
    dgram = pairs["dgram"]
    assert sorted((e["queued"], e["messages"]) for e in dgram["ends"]) == [
        (0, 0), (len(b"datagram 1") * 2, 2)]
    for o in (stream, dgram):
        assert o["pids"] == [proc.pid] and len(o["holders"]) == 2
        for e in o["ends"]:
            assert who(o, f"end {e['label']}") == holding([proc.pid], f"socket:[{e['ino']}]")
    text = shared_text(cr)
    assert "unix dgram socket pair" in text and "20 B in 2 message(s) queued" in text, text
    assert f"listening unix stream socket {tmp_path / 'listen.sock'}" in text


SHUTDOWN = r"""
import socket, sys, time
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
a.send(b"last")
a.shutdown(socket.SHUT_WR)
srv = socket.socket(socket.AF_UNIX)
srv.bind(b"\0" + sys.argv[1].encode())
srv.listen()
lone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
print("ready", a.fileno(), b.fileno(), lone.fileno(), srv.fileno(), flush=True)
time.sleep(600)
"""


def test_shutdown_abstract_name_and_a_lone_socket(procs, tmp_path):
    """A seqpacket pair with one direction shut down, a listening socket with
    an abstract name, an unconnected datagram socket: each shown as it is."""
    require_root()
    prog = tmp_path / "shut.py"
    prog.write_text(SHUTDOWN)
    name = f"crelf-shared-{os.getpid()}"
    out = tmp_path / "shut.out"
    proc = procs.spawn([sys.executable, prog, name], stdout=out)
    fa, fb, flone, fsrv = map(int, wait_for_line(out, "ready", proc=proc).split()[1:])
    cr = tmp_path / "shut.cr"
    checkpoint(proc.pid, cr, *snapshot_flag())
    objs = crinspect_json("shared", cr)["objects"]
    (pair,) = [o for o in objs if o["kind"] == "unix-pair"]
    assert pair["type"] == "seqpacket"
    ends = {e["label"]: e for e in pair["ends"]}
    by_fd = {h["fd"]: ends[h["role"][-1]] for h in pair["holders"]}
    assert by_fd[fa]["shutdown"] == "write" and by_fd[fa]["queued"] == 0
    assert by_fd[fb]["shutdown"] == "read"  # its peer will send no more
    assert (by_fd[fb]["queued"], by_fd[fb]["messages"]) == (4, 1)
    (listen,) = [o for o in objs if o["kind"] == "unix-listen"]
    assert listen["abstract"] and who(listen, "listening") == {(proc.pid, fsrv)}
    assert bytes.fromhex(listen["name"]) == b"\0" + name.encode()
    (lone,) = [o for o in objs if o["kind"] == "unix-socket"]
    assert lone["type"] == "dgram" and lone["peer"] == "not connected"
    assert who(lone, "socket") == {(proc.pid, flone)}
    text = shared_text(cr)
    assert f"listening unix stream socket @{name}" in text, text
    assert "shutdown write" in text and "shutdown read" in text, text
    assert f"pid {proc.pid} fd {flone} (socket)" in text, text


# ----------------------------------------------------- SysV IPC, shared memory

def _maps(pid: int, pattern: str) -> list[tuple[int, int, str]]:
    with open(f"/proc/{pid}/maps") as f:
        return [(int(a, 16), int(b, 16), perms) for line in f
                if re.search(pattern, line)
                for (a, b), perms in [(line.split()[0].split("-"), line.split()[1])]]


def test_sysv_shm_semaphores_and_shared_anonymous_memory(procs, tmp_path):
    """The shm segment is attached by parent and child at the address each
    maps it at, the MAP_SHARED page is one object mapped by both, the
    semaphore set names who operated on it last."""
    require_root()
    key = 0x7e575a4e
    prog = build_c(tmp_path, "pingpong", PINGPONG)
    try:
        out = tmp_path / "pp.out"
        proc = procs.spawn([prog, 100000, hex(key)], stdout=out)
        wait_for_line(out, r"child turn 3 ", proc=proc)
        (child,) = descendants(proc.pid)
        tasks = sorted([proc.pid, child])
        cr = tmp_path / "pp.cr"
        checkpoint(proc.pid, cr)
        shm_maps = {p: _maps(p, r"/SYSV%08x " % key) for p in tasks}
        anon_maps = {p: _maps(p, r" /dev/zero \(deleted\)") for p in tasks}
        assert all(len(m) == 1 for m in [*shm_maps.values(), *anon_maps.values()])
        shmid = reader.load(str(cr)).ipc.shm[0].shmid

        objs = crinspect_json("shared", cr)["objects"]
        (shm,) = [o for o in objs if o["kind"] == "sysv-shm"]
        assert shm["id"] == f"shm:{shmid}" and shm["key"] == key and shm["size"] == 8192
        assert shm["nattch"] == 2 and shm["outside"] == 0 and not shm["removed"]
        assert shm["pids"] == tasks
        assert {(h["pid"], h["fd"], h["role"], h["start"], h["end"], h["perms"])
                for h in shm["holders"]} == {
            (p, None, "attached", *shm_maps[p][0]) for p in tasks}

        (sem,) = [o for o in objs if o["kind"] == "sysv-sem"]
        assert sem["key"] == key and sem["nsems"] == 2
        assert set(sem["pids"]) <= set(tasks) and sem["pids"]
        assert all(re.fullmatch(r"last semop on sem [01]", h["role"]) for h in sem["holders"])

        (anon,) = [o for o in objs if o["kind"] == "anon-shared"]
        assert anon["size"] == 4096 and anon["pids"] == tasks
        assert {(h["pid"], h["role"], h["start"], h["end"], h["perms"])
                for h in anon["holders"]} == {(p, "maps", *anon_maps[p][0]) for p in tasks}

        text = shared_text(cr)
        assert f"SysV shm key {key:#x}, 8.0 KiB, 2 attached" in text, text
        assert f"SysV semaphore set key {key:#x}" in text, text
        for p in tasks:
            (a, b, perms), = shm_maps[p]
            assert f"pid {p} attaches {a:x}-{b:x} rw-s" in text, text
            (a, b, perms), = anon_maps[p]
            assert f"pid {p} maps {a:x}-{b:x} rw-s" in text, text
    finally:
        _ipcrm("-M", hex(key))
        _ipcrm("-S", hex(key))
    assert key not in _keys("sem")


# ------------------------------------------------------ synthetic records

# The fields a record requires that these tests do not look at.
_TASK0 = {"v": 1, "tgid": 0, "exit_signal": 17, "tty_nr": 0, "environ_size": 0,
          "creds": {"uid": [0] * 4, "gid": [0] * 4, "cap_inh": 0, "cap_prm": 0,
                    "cap_eff": 0, "cap_bnd": 0},
          "mm": dict.fromkeys(("start_code", "end_code", "start_data", "end_data", "start_brk",
                               "brk", "start_stack", "arg_start", "arg_end", "env_start",
                               "env_end"), 0)}
_MAP0 = {"anonymous_kb": 0, "swap_kb": 0}
_FILE0 = dict.fromkeys(("ino", "rdev", "mtime_ns", "nlink", "atime_ns", "uid", "gid", "mnt_id",
                        "owner_pid", "owner_fd"), 0)


def synthetic(tasks, files, shmem=()) -> reader.Statefile:
    """A Statefile of typed records (statefile/format/records.py), as the loader makes."""
    tasks = [msgspec.convert({**_TASK0, **t, "tgid": t["pid"],
                              "mappings": [{**_MAP0, **m} for m in t.get("mappings", [])]},
                             records.TaskNote) for t in tasks]
    files = [msgspec.convert({**_FILE0, **f}, records.File) for f in files]
    sf = reader.Statefile(path="synthetic", header=None, tasks=tasks, regs={},
                          files=files, segments=[])
    sf.shmem = [msgspec.convert(o, records.Shmem) for o in shmem]
    return sf


def objects_of(sf) -> list[dict]:
    return [msgspec.to_builtins(o) for o in shared.objects(sf)]


def test_other_file_kinds_are_shown_generically():
    """A file kind crinspect shared has no view of its own for (an eventfd here)
    still appears when several fds hold it, with its own record."""
    task = {"pid": 10, "ppid": 1, "pgid": 10, "sid": 10, "mappings": [], "threads": [],
            "fds": [{"fd": 0, "file": 0, "cloexec": False},
                    {"fd": 5, "file": 0, "cloexec": False}]}
    child = dict(task, pid=11, ppid=10, fds=[{"fd": 0, "file": 0, "cloexec": False}])
    files = [{"id": 0, "kind": "anon:eventfd", "path": "anon_inode:[eventfd]", "flags": 2,
              "pos": 0, "dev": 3, "ino": 42, "anon": {"count": 7, "semaphore": False}}]
    sf = synthetic([task, child], files)
    (obj,) = objects_of(sf)
    assert obj["kind"] == "anon:eventfd" and obj["id"] == "file:0"
    assert obj["details"] == {"anon": {"count": 7, "semaphore": False}}
    assert who(obj, "read-write") == {(10, 0), (10, 5), (11, 0)} and obj["pids"] == [10, 11]
    text = "\n".join(shared.render(shared.objects(sf)))
    assert "anon:eventfd anon_inode:[eventfd]" in text and "count=7" in text
    assert "pid 11 fd 0 (read-write)" in text


def test_pty_pair_records_make_one_object():
    """Pseudo-terminal pairs (kinds pty-master and pty-slave sharing the pair's
    `pty` record) are one object: the master and every slave fd."""
    rec = {"index": 3, "unread": 0, "sid": 21, "fg_pgrp": 21, "slave_closed": False}
    parent = {"pid": 20, "ppid": 1, "pgid": 20, "sid": 20, "mappings": [], "threads": [],
              "fds": [{"fd": 4, "file": 0, "cloexec": True}]}
    child = dict(parent, pid=21, ppid=20, sid=21, fds=[
        {"fd": 0, "file": 1, "cloexec": False}, {"fd": 1, "file": 1, "cloexec": False},
        {"fd": 7, "file": 2, "cloexec": False}])
    files = [{"id": 0, "kind": "pty-master", "path": "/dev/ptmx", "flags": 2, "pty": rec},
             {"id": 1, "kind": "pty-slave", "path": "/dev/pts/3", "flags": 2, "pty": rec},
             {"id": 2, "kind": "pty-slave", "path": "/dev/tty", "flags": 2, "pty": rec,
              "pty_alias": "/dev/tty"}]
    sf = synthetic([parent, child], files)
    (obj,) = objects_of(sf)
    assert obj["kind"] == "pty" and obj["id"] == "pty:[3]" and obj["master"]
    assert [(h["pid"], h["fd"], h["role"]) for h in obj["holders"]] == [
        (20, 4, "master"), (21, 0, "slave"), (21, 1, "slave"), (21, 7, "slave (/dev/tty)")]
    text = "\n".join(shared.render(shared.objects(sf)))
    assert "pseudo-terminal /dev/pts/3, controlling terminal of session 21" in text
    assert "pid 21 fd 7 (slave (/dev/tty))" in text


def test_memfd_records_group_fds_and_mappings():
    """A memfd (CR_FILES `shmem` record) is one object: the tasks mapping it
    MAP_SHARED and the fds open on it, whatever their descriptions."""
    mapping = {"start": 0x7f0000000000, "end": 0x7f0000002000, "perms": "rw-s",
               "dev": "00:01", "inode": 99, "path": "/memfd:buf (deleted)", "kind": "memfd",
               "shmem": 0}
    parent = {"pid": 30, "ppid": 1, "pgid": 30, "sid": 30, "threads": [],
              "mappings": [mapping], "fds": [{"fd": 3, "file": 0, "cloexec": False}]}
    child = dict(parent, pid=31, ppid=30, fds=[])
    files = [{"id": 0, "kind": "regular", "path": "/memfd:buf (deleted)", "flags": 2,
              "dev": 1, "ino": 99, "shmem": 0}]
    sf = synthetic([parent, child], files,
                   [{"id": 0, "kind": "memfd", "name": "buf", "dev": "0:1", "ino": 99,
                     "size": 8192, "seals": 1, "blob": 7}])
    (obj,) = objects_of(sf)
    assert obj["kind"] == "memfd" and obj["shmem"]["name"] == "buf" and "blob" not in obj["shmem"]
    assert [(h["pid"], h["fd"], h["role"]) for h in obj["holders"]] == [
        (30, None, "maps"), (31, None, "maps"), (30, 3, "read-write")]
    text = "\n".join(shared.render(shared.objects(sf)))
    assert 'memfd "buf", 8.0 KiB mapped' in text
    assert "pid 31 maps 7f0000000000-7f0000002000 rw-s" in text


@pytest.mark.parametrize("as_json", [[], ["--json"]])
def test_bad_input_is_one_line(tmp_path, as_json):
    text = tmp_path / "text.cr"
    text.write_text("not a statefile\n" * 10)
    for path in (text, tmp_path / "missing.cr", tmp_path):
        res = crinspect("shared", path, *as_json)
        assert res.returncode == 5
        assert_one_line_error(res)
