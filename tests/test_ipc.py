"""SysV IPC and shared memory restarted (restorer/restore/ipc.py): a parent
and a child alternating on SysV semaphores over a SysV shm segment and a
MAP_SHARED anonymous page, and a message queue with queued messages, each
checkpointed with --kill mid-run, restarted, and compared byte for byte with
an uninterrupted run."""
from __future__ import annotations

import ctypes
import subprocess
import time

from helpers import build_c, read_lines, require_root, wait_for_line
from test_tree import CRCHECKPOINT, CRRESTART, REPO, checkpoint_tree, finish, restart

from statefile.format import reader

PINGPONG = r'''
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/wait.h>

static int semid;
static void op(int num, int delta) {
    struct sembuf b = {num, delta, 0};
    while (semop(semid, &b, 1) < 0) ;
}
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    key_t key = strtol(argv[2], NULL, 0);
    int shmid = shmget(key, 8192, IPC_CREAT | 0640);
    semid = semget(key, 2, IPC_CREAT | 0600);
    if (shmid < 0 || semid < 0) { perror("ipc"); return 1; }
    long *shm = shmat(shmid, NULL, 0);
    long *anon = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    semctl(semid, 0, SETVAL, 1);      /* sem 0: the parent's turn */
    semctl(semid, 1, SETVAL, 0);      /* sem 1: the child's turn */
    shm[1000] = 7;                    /* far in the segment: a second page */
    printf("ready\n"); fflush(stdout);
    pid_t pid = fork();
    int me = pid == 0;
    for (int i = 0; i < n; i++) {
        op(me, -1);
        shm[0] += 1; anon[0] += 2; shm[1000] += 3;
        printf("%s turn %d shm %ld anon %ld far %ld\n", me ? "child" : "parent", i,
               shm[0], anon[0], shm[1000]);
        fflush(stdout);
        usleep(20000);
        op(1 - me, 1);
    }
    if (me) return 0;
    int st;
    waitpid(pid, &st, 0);
    printf("done shm %ld anon %ld child %d\n", shm[0], anon[0], WEXITSTATUS(st));
    shmdt(shm);
    shmctl(shmid, IPC_RMID, NULL);
    semctl(semid, 0, IPC_RMID);
    return 0;
}
'''

QUEUE = r'''
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ipc.h>
#include <sys/msg.h>

struct m { long type; char text[64]; };
int main(int argc, char **argv) {
    key_t key = strtol(argv[1], NULL, 0);
    int q = msgget(key, IPC_CREAT | 0620);
    if (q < 0) { perror("msgget"); return 1; }
    const char *words[] = {"alpha", "bravo", "charlie", "delta"};
    for (int i = 0; i < 4; i++) {
        struct m msg = {i % 2 + 1, ""};
        snprintf(msg.text, sizeof msg.text, "%s %d", words[i], i);
        msgsnd(q, &msg, strlen(msg.text) + 1, 0);
    }
    printf("ready\n"); fflush(stdout);
    for (int i = 0; i < 40; i++) { printf("tick %d\n", i); fflush(stdout); usleep(25000); }
    while (access(argv[2], F_OK) != 0) usleep(20000);      /* the go file */
    struct m msg;
    while (msgrcv(q, &msg, sizeof msg.text, 0, IPC_NOWAIT) >= 0)
        printf("got type %ld: %s\n", msg.type, msg.text);
    msgctl(q, IPC_RMID, NULL);
    printf("done\n");
    return 0;
}
'''


def _ipcrm(*args: str) -> None:
    subprocess.run(["ipcrm", *args], capture_output=True)


def _keys(kind: str) -> set[int]:
    with open(f"/proc/sysvipc/{kind}") as f:
        return {int(line.split()[0]) for line in f.read().splitlines()[1:] if line.strip()}


def _semctl_mode(semid: int, mode: int) -> None:
    """IPC_SET a semaphore set's mode (struct semid64_ds: ipc_perm.mode at 20)."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)
    assert libc.semctl(semid, 0, 2, buf) == 0            # IPC_STAT
    raw = bytearray(buf.raw)
    raw[20:24] = mode.to_bytes(4, "little")
    assert libc.semctl(semid, 0, 1, ctypes.create_string_buffer(bytes(raw), 256)) == 0


def test_parent_and_child_alternate_on_sysv_sem_shm_and_shared_anon(procs, tmp_path):
    """Semaphores pass the turn, the counters live in SysV shm and in a
    MAP_SHARED anonymous page: after --kill and restart each task's writes
    are seen by the other, and the output is the uninterrupted run's.  The
    killed tree's objects are still there: a restart replaces them when they
    are untouched, and refuses, naming it, when one was changed since."""
    require_root()
    key, n = 0x7e57c0de, 60
    prog = build_c(tmp_path, "pingpong", PINGPONG)
    try:
        ref = subprocess.run([prog, str(n), hex(key)], capture_output=True, timeout=60,
                             check=True).stdout
        out = tmp_path / "pp.out"
        proc = procs.spawn([prog, str(n), hex(key)], stdout=out)
        wait_for_line(out, r"child turn 10 ", proc=proc)
        checkpoint_tree(proc, tmp_path / "pp.cr")
        sf = reader.load(str(tmp_path / "pp.cr"))
        assert [s.key for s in sf.ipc.shm] == [key]
        assert [s.key for s in sf.ipc.sem] == [key]
        assert sorted(m.kind for t in sf.tasks for m in t.mappings
                      if m.kind in ("sysv-shm", "anon-shared")) == \
            ["anon-shared", "anon-shared", "sysv-shm", "sysv-shm"]
        shmid, semid = sf.ipc.shm[0].shmid, sf.ipc.sem[0].semid
        # the killed tree's semaphore set, changed since (mode 0600 -> 0640):
        # not the saved one any more, refused, nothing created
        _semctl_mode(semid, 0o640)
        r = subprocess.run([*CRRESTART, str(tmp_path / "pp.cr")], capture_output=True,
                           text=True, timeout=60, cwd=REPO)
        assert r.returncode != 0 and f"key {key:#x}" in r.stderr, r.stderr
        # the changed set removed; the untouched segment is replaced by the saved one
        _ipcrm("-S", hex(key))
        r = restart(procs, tmp_path / "pp.cr")
        code, err = finish(r)
        assert code == 0, err
        assert "left behind by the killed original is replaced" in err
        assert out.read_bytes() == ref
        assert key not in _keys("shm") and key not in _keys("sem")   # the program removed them
        assert shmid and semid
    finally:
        _ipcrm("-M", hex(key))
        _ipcrm("-S", hex(key))


def test_message_queue_with_queued_messages(procs, tmp_path):
    """Four messages of two types wait in a queue; restarted with its id,
    key and mode (checked while the program waits for its go file, before it
    reads them), the program reads them after restart in order."""
    require_root()
    key = 0x7e57c0df
    prog = build_c(tmp_path, "queue", QUEUE)
    try:
        (tmp_path / "ref.go").touch()
        ref = subprocess.run([prog, hex(key), tmp_path / "ref.go"], capture_output=True,
                             timeout=60, check=True).stdout
        out, go = tmp_path / "q.out", tmp_path / "q.go"
        proc = procs.spawn([prog, hex(key), go], stdout=out)
        wait_for_line(out, r"tick 10", proc=proc)
        checkpoint_tree(proc, tmp_path / "q.cr")
        q = reader.load(str(tmp_path / "q.cr")).ipc.msg
        assert [(m.key, m.qnum, m.perms & 0o777) for m in q] == [(key, 4, 0o620)]
        _ipcrm("-Q", hex(key))
        r = restart(procs, tmp_path / "q.cr")
        wait_for_line(out, r"^tick 39$", timeout=60, proc=r)   # restarted, waiting for go
        with open("/proc/sysvipc/msg") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
        row = next((x for x in rows if x and int(x[0]) == key), None)
        assert row is not None, rows
        # key, msqid, perms, cbytes, qnum: the saved queue, messages still queued
        assert (int(row[1]), row[2], int(row[4])) == (q[0].msqid, "620", 4), row
        go.touch()
        code, err = finish(r)
        assert code == 0, err
        assert out.read_bytes() == ref
        assert b"got type 1: alpha 0" in ref
    finally:
        _ipcrm("-Q", hex(key))


SEMUNDO = r'''
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ipc.h>
#include <sys/sem.h>

int main(int argc, char **argv) {
    key_t key = strtol(argv[1], NULL, 0);
    int undo = strcmp(argv[2], "undo") == 0;
    int semid = semget(key, 1, IPC_CREAT | 0600);
    if (semid < 0) { perror("semget"); return 1; }
    struct sembuf up = {0, 1, undo ? SEM_UNDO : 0};
    if (semop(semid, &up, 1) < 0) { perror("semop"); return 1; }
    printf("ready\n"); fflush(stdout);
    for (int i = 0; i < 60; i++) { printf("tick %d\n", i); fflush(stdout); usleep(25000); }
    printf("value %d\n", semctl(semid, 0, GETVAL));
    semctl(semid, 0, IPC_RMID);
    return 0;
}
'''


def test_sem_undo_is_refused_and_plain_semop_is_not(procs, tmp_path):
    """SEM_UNDO adjustments cannot be saved: a task that did a semop with
    SEM_UNDO is refused (exit 6, the pid and the reason named, no file, it
    runs on); the same program without SEM_UNDO checkpoints and restarts."""
    require_root()
    key = 0x7e57c0e0
    prog = build_c(tmp_path, "semundo", SEMUNDO)
    try:
        out, cr = tmp_path / "u.out", tmp_path / "u.cr"
        proc = procs.spawn([prog, hex(key), "undo"], stdout=out)
        wait_for_line(out, r"^ready$", proc=proc)
        r = subprocess.run([CRCHECKPOINT, str(proc.pid), "-o", str(cr), "--kill"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 6, r.stderr
        assert "Traceback" not in r.stderr
        assert f"pid {proc.pid} holds SEM_UNDO adjustments" in r.stderr, r.stderr
        assert "sem undo is not restored" in r.stderr and "nothing was written" in r.stderr
        assert not cr.exists()
        assert proc.wait(timeout=30) == 0               # ran on to its end
        assert read_lines(out)[-1] == "value 1"
        assert key not in _keys("sem")

        ref = subprocess.run([prog, hex(key), "plain"], capture_output=True, timeout=60,
                             check=True).stdout
        out = tmp_path / "p.out"
        proc = procs.spawn([prog, hex(key), "plain"], stdout=out)
        wait_for_line(out, r"^tick 5$", proc=proc)
        checkpoint_tree(proc, cr)
        _ipcrm("-S", hex(key))
        code, err = finish(restart(procs, cr))
        assert code == 0, err
        assert out.read_bytes() == ref and ref.endswith(b"value 1\n")
    finally:
        _ipcrm("-S", hex(key))


SHMDEST = r'''
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/ipc.h>
#include <sys/shm.h>
#include <sys/wait.h>

int main(int argc, char **argv) {
    int shmid = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
    if (shmid < 0) { perror("shmget"); return 1; }
    volatile long *shm = shmat(shmid, NULL, 0);
    pid_t pid = fork();
    if (pid == 0) {
        for (long i = 1; i <= 40; i++) {
            while (shm[0] != i) usleep(1000);
            printf("child saw %ld\n", i); fflush(stdout);
            shm[1] = i;
        }
        return 0;
    }
    shmctl(shmid, IPC_RMID, NULL);        /* removed while both are attached */
    printf("ready %d\n", shmid); fflush(stdout);
    for (long i = 1; i <= 40; i++) {
        if (i == 21) while (access(argv[1], F_OK) != 0) usleep(20000);   /* the go file */
        shm[0] = i;
        while (shm[1] != i) usleep(1000);
        printf("parent got %ld\n", i); fflush(stdout);
        usleep(20000);
    }
    int st;
    waitpid(pid, &st, 0);
    printf("done %d\n", WEXITSTATUS(st));
    return 0;
}
'''


def _shm_row(shmid: int) -> dict | None:
    with open("/proc/sysvipc/shm") as f:
        lines = f.read().splitlines()
    head = lines[0].split()
    for line in lines[1:]:
        row = dict(zip(head, line.split()))
        if row and int(row["shmid"]) == shmid:
            return row
    return None


def test_removed_shm_segment_still_shared_after_restart(procs, tmp_path):
    """A segment removed (IPC_RMID) while a parent and its child are both
    attached (SHM_DEST): restarted attached to both, still shared (they
    hand a counter back and forth through it), removed again (key 0,
    destroyed), and gone once both have exited."""
    require_root()
    prog = build_c(tmp_path, "shmdest", SHMDEST)
    shmid = None
    try:
        (tmp_path / "ref.go").touch()
        ref = subprocess.run([prog, tmp_path / "ref.go"], capture_output=True, timeout=60,
                             check=True).stdout
        out, go, cr = tmp_path / "d.out", tmp_path / "d.go", tmp_path / "d.cr"
        proc = procs.spawn([prog, go], stdout=out)
        shmid = int(wait_for_line(out, r"^ready ", proc=proc).split()[1])
        wait_for_line(out, r"^child saw 10$", proc=proc)
        checkpoint_tree(proc, cr)
        [s] = reader.load(str(cr)).ipc.shm
        assert s.shmid == shmid and s.key == 0 and s.perms & 0o1000   # SHM_DEST
        assert _shm_row(shmid) is None           # the killed tree's segment is gone
        r = restart(procs, cr)
        wait_for_line(out, r"^parent got 20$", timeout=60, proc=r)
        deadline = time.monotonic() + 30
        while True:      # attached by both restarted tasks, and removed again
            row = _shm_row(shmid)
            if row and int(row["nattch"]) == 2 and int(row["perms"], 8) & 0o1000:
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        assert int(row["key"]) == 0
        go.touch()
        code, err = finish(r)
        assert code == 0, err
        # the same output but for the segment id the reference run got
        assert out.read_text().splitlines()[1:] == ref.decode().splitlines()[1:]
        assert ref.endswith(b"parent got 40\ndone 0\n")
        assert _shm_row(shmid) is None
        ipcs = subprocess.run(["ipcs", "-m", "-i", str(shmid)], capture_output=True, text=True)
        assert "not found" in ipcs.stderr, ipcs
    finally:
        if shmid is not None and _shm_row(shmid) is not None:
            _ipcrm("-m", str(shmid))
