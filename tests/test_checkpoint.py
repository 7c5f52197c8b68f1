"""crcheckpoint on real processes: gdb/eu-stack/readelf read the statefile, the
targets run on unchanged, and bad input fails cleanly with nothing lost."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import (read_lines, require_root, require_tool, trace_with_another_tracer,
                     wait_for_line)

from restorer import validate
from restorer.errors import ValidationError
from statefile.format import reader
from statefile.format.elfcore import CRELF_IDENT_PAD

BIN = Path(sys.executable).parent
CRCHECKPOINT = str(BIN / "crcheckpoint")


def checkpoint(pid, out, *extra, check=True, user=None):
    argv = [CRCHECKPOINT, str(pid), "-o", str(out), "--json", *extra]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)
    return res


def assert_clean_failure(res, pattern):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert re.search(pattern, lines[0]), lines[0]


def assert_keeps_ticking(out, proc, pattern=r"tick (\d+)"):
    """The target's output goes on after the checkpoint, with consecutive ticks."""
    before = len(read_lines(out))
    deadline = time.monotonic() + 10
    while len(read_lines(out)) < before + 3:
        assert proc.poll() is None, f"target exited with {proc.returncode}"
        assert time.monotonic() < deadline, "target stopped producing output"
        time.sleep(0.05)
    ticks = [int(m[1]) for line in read_lines(out) if (m := re.search(pattern, line))]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), ticks


def gdb(prog, core, *cmds):
    require_tool("gdb")
    argv = ["gdb", "-nx", "-batch"]
    for c in cmds:
        argv += ["-ex", c]
    res = subprocess.run(argv + [str(prog), "-c", str(core)], capture_output=True,
                         text=True, timeout=120)
    return res.stdout + res.stderr


@pytest.fixture
def mt(sample_bin, procs, tmp_path):
    out = tmp_path / "mt.out"
    proc = procs.spawn([sample_bin / "mt_values"], stdout=out)
    wait_for_line(out, r"tick 3 ", proc=proc)
    return proc, out


def test_multithreaded_gdb_reads_threads_backtraces_and_values(mt, sample_bin, tmp_path):
    require_root()
    proc, out = mt
    cr = tmp_path / "mt.cr"
    summary = checkpoint(proc.pid, cr)
    assert summary["threads"] == 4 and summary["pids"] == [proc.pid]
    st = os.stat(cr)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert cr.read_bytes()[9:16] == CRELF_IDENT_PAD
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left"

    text = gdb(sample_bin / "mt_values", cr,
               "info threads", "thread apply all bt",
               "p/x crelf_magic", "p crelf_banner", "x/s crelf_heap",
               "p crelf_counter_global", "info sharedlibrary")
    assert len(re.findall(r"^\*?\s+\d+\s+Thread ", text, re.M)) == 4, text
    for fn in ("worker_alpha", "worker_beta", "worker_gamma", "crelf_wait_point", "main"):
        assert re.search(rf"in {fn} \(", text), f"{fn} missing from backtraces:\n{text}"
    assert "0x1234abcd5678ef00" in text
    assert '"crelf-banner-v1"' in text
    assert '"HEAPSTART' in text
    assert "libc.so.6" in text
    counter = int(re.search(r"^\$3 = (\d+)", text, re.M)[1])  # x/s makes no $ value
    assert counter >= 3
    # A local on main's stack.
    text = gdb(sample_bin / "mt_values", cr, "thread 1", "bt", "frame function main",
               "p/x stack_marker")
    assert "0x5ca1ab1e" in text, text
    assert_keeps_ticking(out, proc)


def test_gdb_reads_vector_registers_and_pkru_as_from_gcore(sample_bin, procs, tmp_path):
    """procstate holds known bytes in ymm14 and xmm15 while it waits: gdb shows
    them from the statefile exactly as from gcore's core of the same process,
    without a "too small" warning, and pkru as the kernel gave it (on CPUs
    whose XSAVE layout is not the one gdb 13 assumes, such as AMD without
    AVX-512, the kernel's area is moved to gdb's offsets: statefile/format/xsave.py;
    gcore there reads pkru at the wrong offset and shows 0)."""
    require_root()
    require_tool("gcore")
    assert " avx " in Path("/proc/cpuinfo").read_text(), "this test needs a CPU with AVX"
    d = tmp_path / "ps"
    d.mkdir()
    out = tmp_path / "ps.out"
    proc = procs.spawn([sample_bin / "procstate", d], stdout=out)
    wait_for_line(out, r"^ready$", proc=proc, timeout=30)
    # past "ready" it loads the registers, then loops on access/nanosleep
    end = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/syscall").read_text().split()[0] not in ("21", "35"):
        assert time.monotonic() < end, "procstate never reached its wait"
        time.sleep(0.01)
    res = subprocess.run(["gcore", "-o", str(tmp_path / "gc"), str(proc.pid)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cr = tmp_path / "ps.cr"
    checkpoint(proc.pid, cr)
    cmds = ("thread 1", "p/x $ymm14.v32_int8", "p/x $xmm15.v16_int8", "p/x $pkru")
    ours = gdb(sample_bin / "procstate", cr, *cmds)
    theirs = gdb(sample_bin / "procstate", tmp_path / f"gc.{proc.pid}", *cmds)
    assert "too small" not in ours, ours
    values = re.findall(r"^\$\d+ = (.*)$", ours, re.M)
    assert len(values) == 3 and values[:2] == re.findall(r"^\$\d+ = (.*)$", theirs, re.M)[:2], \
        ours + theirs
    held = b"ymm14-holds-32-bytes-of-data!!!xmm15:16 bytes.".ljust(48, b"\0")

    def as_gdb_prints(data: bytes) -> str:       # p/x of a vNN_int8 view
        return "{" + ", ".join(f"{b:#x}" if b else "0x0" for b in data) + "}"
    assert values[:2] == [as_gdb_prints(held[:32]), as_gdb_prints(held[32:])], values
    # pkru: where CPUID puts it in the area PTRACE_GETREGSET gave (CR_THREAD_REGS)
    sf = reader.load(str(cr))
    layout = sf.header.xsave_layout                  # root reads CPUID through /dev/cpu
    assert layout and layout["2"] == [576, 256], layout
    if "9" in layout:
        off, size = layout["9"]
        pkru = int.from_bytes(sf.regs[proc.pid].xstate[off:off + size], "little")
        assert values[2] == hex(pkru) and pkru, (values, pkru)
    else:                       # a CPU without PKRU (no flags pku, ospke): gdb has none
        assert "pku" not in Path("/proc/cpuinfo").read_text().split(), layout
        assert values[2] in ("<unavailable>", "0x0", "void"), values
    # crrestart's checks take this CPU's layout, and refuse another one: the
    # saved areas go back through PTRACE_SETREGSET as they are
    validate.validate(sf)
    comp = max(layout, key=int)
    off, size = layout[comp]
    sf.header.xsave_layout[comp] = [off + 256, size]
    with pytest.raises(ValidationError, match=rf"XSAVE component {comp} is at offset {off + 256} "):
        validate.validate(sf)
    (d / "go").touch()
    assert proc.wait(timeout=30) == 0


STANDARD_NOTE = re.compile(r"^\s+(CORE|LINUX)\s+0x[0-9a-f]+\s+(NT_\w+)", re.M)


def standard_notes(path) -> list[tuple[str, str]]:
    """(owner, type name) of every core note of `path`, in file order, from readelf."""
    res = subprocess.run(["readelf", "-n", "-W", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return STANDARD_NOTE.findall(res.stdout)


def test_eu_stack_and_readelf_read_the_statefile(mt, sample_bin, tmp_path):
    require_root()
    proc, _ = mt
    cr = tmp_path / "mt.cr"
    checkpoint(proc.pid, cr)
    require_tool("eu-stack")
    res = subprocess.run(["eu-stack", "--core", str(cr)], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.count("TID ") == 4, res.stdout + res.stderr
    assert "worker_beta" in res.stdout and "main" in res.stdout

    # The gcore baseline: per thread PRSTATUS, FPREGSET, X86_XSTATE (LINUX) and
    # SIGINFO; once PRPSINFO, AUXV, FILE.  The leader's notes in the kernel's
    # order, each other thread's SIGINFO after its registers, as gcore does.
    notes = standard_notes(cr)
    names = [n for _, n in notes]
    for name in ("NT_PRSTATUS", "NT_FPREGSET", "NT_X86_XSTATE", "NT_SIGINFO"):
        assert names.count(name) == 4, (name, names)
    for name in ("NT_PRPSINFO", "NT_AUXV", "NT_FILE"):
        assert names.count(name) == 1, (name, names)
    assert all(owner == ("LINUX" if n == "NT_X86_XSTATE" else "CORE") for owner, n in notes)
    leader = ["NT_PRSTATUS", "NT_PRPSINFO", "NT_SIGINFO", "NT_AUXV", "NT_FILE",
              "NT_FPREGSET", "NT_X86_XSTATE"]
    other = ["NT_PRSTATUS", "NT_FPREGSET", "NT_X86_XSTATE", "NT_SIGINFO"]
    assert names == leader + other * 3, names
    text = subprocess.run(["readelf", "-n", "-W", str(cr)], capture_output=True,
                          text=True).stdout
    assert "CRELF" in text and "0x43520001" in text
    # gdb attaches each NT_SIGINFO to the thread of the NT_PRSTATUS before it.
    text = gdb(sample_bin / "mt_values", cr, "thread apply all p $_siginfo.si_signo")
    assert len(re.findall(r"^\$\d+ = 19$", text, re.M)) == 4, text


FRAME = r"^#\d+\s+(?:0x[0-9a-f]+ in )?"  # a gdb frame line up to the function (inlined: no pc)


def _gdb_thread_blocks(text) -> dict[int, str]:
    """`thread apply all bt` output split per LWP."""
    parts = re.split(r"^(?=Thread \d+ \(.*LWP (\d+)\)\):$)", text, flags=re.M)
    return {int(lwp): body for lwp, body in zip(parts[1::2], parts[2::2])}


def test_python_program_keeps_running_and_is_readable(sample_bin, procs, tmp_path):
    require_root()
    out = tmp_path / "py.out"
    proc = procs.spawn([sys.executable, sample_bin / "pyworker.py"], stdout=out)
    wait_for_line(out, r"py tick 3 ", proc=proc)
    cr = tmp_path / "py.cr"
    summary = checkpoint(proc.pid, cr)
    assert summary["threads"] == 3
    sf = reader.load(str(cr))
    assert reader.verify(sf) == []
    python = os.path.realpath(sys.executable)
    assert sf.root.exe == python
    text = gdb(python, cr, "info threads", "thread apply all bt", "info sharedlibrary")
    assert len(re.findall(r"^\*?\s+\d+\s+Thread ", text, re.M)) == 3, text
    blocks = _gdb_thread_blocks(text)
    assert len(blocks) == 3 and proc.pid in blocks, text
    # Every thread runs Python code: the interpreter's eval loop is on each stack.
    for lwp, bt in blocks.items():
        assert re.search(rf"{FRAME}_PyEval_EvalFrameDefault \(", bt, re.M), f"LWP {lwp}:\n{bt}"
    # The main thread mostly sleeps (time.sleep) or waits for a worker
    # (queue.get): frame #0 is then the libc wait.  Caught between two waits
    # (printing a tick: its saved orig_rax is -1, no syscall), frame #0 is in
    # the interpreter or libc (maybe a static function gdb names ??).  Either
    # way the backtrace reaches main.
    main = blocks[proc.pid]
    in_syscall = sf.regs[proc.pid].user_regs().orig_rax < (1 << 63)
    wait = r"clock_nanosleep|futex|sem_.*wait|select|poll"
    top = re.search(r"^#0 .* in (\S+) \(", main, re.M)
    assert top and (re.search(wait, top[1]) or not in_syscall), main
    assert re.search(rf"{FRAME}(Py_BytesMain|Py_RunMain|main) \(", main, re.M), main
    # libc is loaded: an address range and the path, not just the name somewhere.
    assert re.search(r"^0x[0-9a-f]+\s+0x[0-9a-f]+\s+Yes\S*\s+\S*/libc\.so\.6$", text,
                     re.M), text

    require_tool("eu-stack")
    res = subprocess.run(["eu-stack", "--core", str(cr)], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.count("TID ") == 3, res.stdout + res.stderr
    main = res.stdout.split(f"TID {proc.pid}:\n", 1)[1].split("TID ", 1)[0]
    frames = re.findall(r"^#\d+[ \t]+0x[0-9a-f]+[ \t]+(\S+)", main, re.M)
    assert frames and (re.search(wait, frames[0]) or not in_syscall), main
    assert "_PyEval_EvalFrameDefault" in frames, main
    assert_keeps_ticking(out, proc, r"py tick (\d+)")


def test_parent_with_two_children(sample_bin, procs, tmp_path):
    require_root()
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree", "30"], stdout=out)
    wait_for_line(out, r"child 2 tick 3", proc=proc)
    cr = tmp_path / "tree.cr"
    summary = checkpoint(proc.pid, cr)
    assert summary["restartable"] and summary["not_restartable"] == []
    assert len(summary["pids"]) == 3 and summary["pids"][0] == proc.pid
    sf = reader.load(str(cr))
    assert [t.ppid for t in sf.tasks[1:]] == [proc.pid, proc.pid]
    assert reader.verify(sf) == []
    # Every task's memory is in the file: the children have their own segments.
    owners = {s.pid for s in sf.segments if s.filesz}
    assert owners == set(summary["pids"])
    # The tree runs on unharmed: the parent still reaps both children normally.
    assert proc.wait(timeout=20) == 0
    lines = read_lines(out)
    assert lines[-2:] == ["child 1 exited 11", "child 2 exited 12"], lines[-5:]
    for who in ("parent", "child 1", "child 2"):
        ticks = [int(line.rsplit(" ", 1)[1]) for line in lines
                 if line.startswith(f"{who} tick")]
        assert ticks == list(range(1, 31)), (who, ticks)


def test_kill_terminates_the_target_after_writing(mt, tmp_path):
    require_root()
    proc, _ = mt
    cr = tmp_path / "mt.cr"
    summary = checkpoint(proc.pid, cr, "--kill")
    assert summary["killed"] and summary["restartable"]
    assert proc.wait(timeout=10) == -9
    assert reader.verify(reader.load(str(cr))) == []


def test_kill_never_applies_to_a_snapshot_that_cannot_restart(sample_bin, procs, tmp_path):
    require_root()
    out = tmp_path / "tree.out"
    # A FIFO held by a process outside the tree: the checkpoint cannot be restarted.
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    keeper = os.open(fifo, os.O_RDWR)
    try:
        rfd = os.open(fifo, os.O_RDONLY)
        proc = procs.spawn([sample_bin / "tree"], stdout=out, stdin=rfd)
        os.close(rfd)
        wait_for_line(out, r"child 2 tick 2", proc=proc)
        cr = tmp_path / "tree.cr"
        res = checkpoint(proc.pid, cr, "--kill", "--snapshot", check=False)
        assert res.returncode == 6 and "cannot be checkpointed" in res.stderr
        assert "outside the tree" in res.stderr
        assert not cr.exists()
        assert_keeps_ticking(out, proc, r"parent tick (\d+)")
    finally:
        os.close(keeper)


def test_untouched_memory_is_a_hole(sample_bin, procs, tmp_path):
    """1 GiB touched + 10 GiB reserved: about 1 GiB on disk, not 11."""
    require_root()
    out = tmp_path / "big.out"
    proc = procs.spawn([sample_bin / "bigheap", "1024", "10240"], stdout=out)
    wait_for_line(out, "ready", timeout=60, proc=proc)
    cr = tmp_path / "big.cr"
    summary = checkpoint(proc.pid, cr)
    on_disk = os.stat(cr).st_blocks * 512
    assert 1024 * 2**20 <= on_disk < 1100 * 2**20, on_disk
    assert summary["bytes_stored"] < 1100 * 2**20
    text = gdb(sample_bin / "bigheap", cr, "p 1")  # gdb opens it without complaint
    assert "$1 = 1" in text
    os.unlink(cr)


# --- bad input: one line, non-zero exit, target untouched, nothing left -------

def test_missing_pid(tmp_path):
    pid = 4194303  # above any pid this machine hands out by default
    res = checkpoint(pid, tmp_path / "x.cr", check=False)
    assert_clean_failure(res, rf"no process with pid {pid}")
    assert list(tmp_path.iterdir()) == []


def test_kernel_thread(tmp_path):
    res = checkpoint(2, tmp_path / "x.cr", check=False)
    assert_clean_failure(res, r"kernel thread")
    assert list(tmp_path.iterdir()) == []


def test_already_traced(mt, procs, tmp_path):
    require_root()
    proc, out = mt
    tracer = trace_with_another_tracer(procs, proc.pid, tmp_path)
    cr = tmp_path / "x.cr"
    res = checkpoint(proc.pid, cr, check=False)
    assert_clean_failure(res, rf"already traced by pid {tracer.pid}")
    assert not cr.exists() and not list(tmp_path.glob(".*"))
    assert_keeps_ticking(out, proc)


def test_not_our_process(mt):
    """An unprivileged user cannot checkpoint root's process."""
    require_root()
    proc, out = mt
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o777)
        res = checkpoint(proc.pid, Path(d) / "x.cr", check=False, user=65534)
        assert_clean_failure(res, r"belongs to uid 0, not to you \(uid 65534\)")
        assert os.listdir(d) == []
    assert_keeps_ticking(out, proc)


def test_missing_output_directory(mt, tmp_path):
    proc, out = mt
    res = checkpoint(proc.pid, tmp_path / "nope" / "x.cr", check=False)
    assert_clean_failure(res, r"output directory .*nope does not exist")
    assert_keeps_ticking(out, proc)


@pytest.fixture
def small_tmpfs(tmp_path):
    require_root()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_directory(mt, small_tmpfs):
    proc, out = mt
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(small_tmpfs)],
                   check=True)
    res = checkpoint(proc.pid, small_tmpfs / "x.cr", check=False)
    assert_clean_failure(res, r"cannot create statefile .*Read-only file system")
    assert os.listdir(small_tmpfs) == []
    assert_keeps_ticking(out, proc)


def test_full_disk(mt, small_tmpfs):
    proc, out = mt
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small_tmpfs)],
                   check=True)
    res = checkpoint(proc.pid, small_tmpfs / "x.cr", check=False)
    assert_clean_failure(res, r"no space left on the device")
    assert os.listdir(small_tmpfs) == [], "half-written statefile left behind"
    assert_keeps_ticking(out, proc)
    # The task is not left stopped or traced.
    status = Path(f"/proc/{proc.pid}/status").read_text()
    assert "TracerPid:\t0" in status


def test_real_pipeline_output_unchanged_by_leave_running_checkpoints(procs, tmp_path):
    """sh + seq + awk + gzip, checkpointed three times mid-stream: the output is
    byte for byte the one of an uninterrupted run."""
    require_root()
    script = ("seq 1 10000000 | awk '{ s += $1; if ($1 % 1000 == 0) print $1, s }' "
              "| gzip -1 -c")
    ref = subprocess.run(["sh", "-c", script], capture_output=True, timeout=120).stdout
    out = tmp_path / "p.gz"
    proc = procs.spawn(["sh", "-c", script], stdout=out)
    done = 0
    while proc.poll() is None and done < 3:
        time.sleep(0.15)
        res = checkpoint(proc.pid, tmp_path / f"p{done}.cr", check=False)
        if proc.poll() is not None:
            break
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["restartable"]
        done += 1
    assert done >= 1, "the pipeline finished before a checkpoint could be taken"
    assert proc.wait(timeout=120) == 0
    assert out.read_bytes() == ref
    sf = reader.load(str(tmp_path / "p0.cr"))
    assert {t.comm for t in sf.tasks} >= {"sh", "seq", "awk", "gzip"}


GEN_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define PAGES 8192
volatile unsigned long gen;
unsigned long *buf;
int main(void) {
    buf = aligned_alloc(4096, PAGES * 4096UL);
    memset(buf, 0, PAGES * 4096UL);
    printf("buf %p gen %p\n", (void *)buf, (void *)&gen); fflush(stdout);
    for (;;) {
        gen++;
        for (unsigned long p = 0; p < PAGES; p++) buf[p * 512] = gen;
    }
}
"""


def _read_mem(sf, f, pid, addr, size):
    for seg in sf.segments:
        if seg.pid == pid and seg.vaddr <= addr < seg.vaddr + seg.memsz:
            return sf.read_segment(f, seg, addr - seg.vaddr, size)
    raise AssertionError(f"{addr:#x} not in the statefile")


@pytest.mark.parametrize("mode", ["cow", "frozen"])
def test_memory_is_a_consistent_snapshot_while_the_target_writes(mode, procs, tmp_path):
    """The target rewrites 32 MiB as fast as it can; the statefile must hold the
    memory of one instant: page values non-increasing, at most one step apart,
    and equal to the generation counter saved in the same file."""
    require_root()
    src = tmp_path / "gen.c"
    src.write_text(GEN_PROGRAM)
    subprocess.run(["gcc", "-O1", "-o", tmp_path / "gen", src], check=True)
    out = tmp_path / "gen.out"
    proc = procs.spawn([tmp_path / "gen"], stdout=out)
    line = wait_for_line(out, r"^buf ", proc=proc)
    buf, gen = (int(x, 16) for x in line.split()[1::2])
    time.sleep(0.3)
    cr = tmp_path / "gen.cr"
    summary = checkpoint(proc.pid, cr, *(["--no-cow"] if mode == "frozen" else []))
    assert summary["copy_on_write"] == (mode == "cow")
    assert proc.poll() is None
    assert children_of(proc.pid) == [], "the snapshot copy was not reaped"
    sf = reader.load(str(cr))
    with sf.open() as f:
        g = int.from_bytes(_read_mem(sf, f, proc.pid, gen, 8), "little")
        mem = _read_mem(sf, f, proc.pid, buf, 8192 * 4096)
    values = [int.from_bytes(mem[p * 4096:p * 4096 + 8], "little") for p in range(8192)]
    # The freeze may fall between `gen++` and the write of page 0: every page
    # then still holds g - 1.  A torn snapshot shows other values or a rise.
    assert g > 1 and values[0] in (g, g - 1)
    assert all(a >= b for a, b in zip(values, values[1:])), "torn snapshot"
    assert set(values) <= {g, g - 1}


def children_of(pid):
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        kids += Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
    return kids


@pytest.mark.parametrize("mode", ["cow", "frozen"])
def test_every_page_lands_at_its_address(mode, sample_bin, procs, tmp_path):
    """bigheap fills page i of its 512 MiB with byte (i % 255) + 1: every page
    of the statefile's copy must hold its own value (the copy is split into
    chunks read by several threads)."""
    require_root()
    out = tmp_path / "big.out"
    proc = procs.spawn([sample_bin / "bigheap", "512", "0"], stdout=out)
    wait_for_line(out, "ready", proc=proc)
    addr = int(next(line for line in read_lines(out) if line.startswith("touched")).split()[1], 16)
    cr = tmp_path / "big.cr"
    checkpoint(proc.pid, cr, *(["--no-cow"] if mode == "frozen" else []))
    sf = reader.load(str(cr))
    with sf.open() as f:
        mem = _read_mem(sf, f, proc.pid, addr, 512 << 20)
    bad = [i for i in range(0, 512 << 8) if mem[i * 4096] != (i % 255) + 1
           or mem[i * 4096 + 4095] != (i % 255) + 1]
    assert not bad, f"{len(bad)} pages hold another page's bytes (first: {bad[:5]})"


# --- the progress bar: stderr only, only on a terminal ------------------------

# click's progress bar: label, bar, percentage, ETA once known, then ours
PROGRESS_LINE = re.compile(r"crcheckpoint +\[[#-]+\] +\d+%(?: +[\d:-]+)? +\d+ MiB written, "
                           r"\d+ MiB/s")
CURSOR = re.compile(r"\x1b\[\?25[lh]")     # click hides the cursor while the bar runs


def _run_with_stderr_on_a_pty(argv) -> tuple[subprocess.CompletedProcess, str]:
    """Run argv with stdout on a pipe and stderr on a fresh pty; return the
    result and everything written to the pty (read by a thread meanwhile, so a
    full pty buffer can never block the command)."""
    import threading
    master, slave = os.openpty()
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the slave side is closed
                return
            if not data:
                return
            chunks.append(data)

    reader_thread = threading.Thread(target=drain, daemon=True)
    reader_thread.start()
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=slave, text=True, timeout=300)
    finally:
        os.close(slave)
    reader_thread.join(timeout=30)
    os.close(master)
    return res, b"".join(chunks).decode(errors="replace")


def _in_process(pid, out, progress_after):
    """crcheckpoint run in-process through statefile.cli.run, whose internal
    argument replaces the one-second rule (no option, no environment variable)."""
    code = ("import sys; from statefile import cli; "
            "after = float(sys.argv.pop(1)); cli.run(sys.argv[1:], progress_after=after)")
    return [sys.executable, "-c", code, str(progress_after), str(pid), "-o", str(out), "--json"]


def _assert_only_progress(text):
    """Nothing on the terminal but progress updates (\\r-separated) and a final newline."""
    for piece in re.split(r"[\r\n]+", CURSOR.sub("", text)):
        assert not piece.strip() or PROGRESS_LINE.fullmatch(piece.strip()), repr(text)


def test_progress_bar_on_a_terminal_only(sample_bin, procs, tmp_path):
    """~600 MiB of touched heap: the progress bar goes to stderr when it is a
    terminal, never to stdout (--json stays clean JSON), and nothing at all is
    printed when stderr is not a terminal."""
    require_root()
    out = tmp_path / "big.out"
    proc = procs.spawn([sample_bin / "bigheap", "600", "0"], stdout=out)
    wait_for_line(out, "ready", timeout=60, proc=proc)

    # The real command with stderr on a pty.  Whether the dump lasts over a
    # second depends on the machine, so only check that the terminal gets
    # nothing but progress and stdout nothing but the JSON summary.
    cr = tmp_path / "big1.cr"
    res, tty = _run_with_stderr_on_a_pty([CRCHECKPOINT, str(proc.pid), "-o", str(cr),
                                          "--json"])
    assert res.returncode == 0, tty
    assert json.loads(res.stdout)["bytes_stored"] >= 600 * 2**20
    _assert_only_progress(tty)
    os.unlink(cr)

    # In-process with the one-second rule lowered to 0: the bar must appear.
    cr = tmp_path / "big2.cr"
    res, tty = _run_with_stderr_on_a_pty(_in_process(proc.pid, cr, 0.0))
    assert res.returncode == 0, tty
    summary = json.loads(res.stdout)  # stdout is nothing but the JSON summary
    assert summary["bytes_stored"] >= 600 * 2**20
    assert PROGRESS_LINE.search(tty), repr(tty)
    _assert_only_progress(tty)
    assert tty.endswith("\x1b[?25h\r\n"), repr(tty)  # the bar ends its line, cursor back
    shown = [int(m[1]) for m in re.finditer(r"(\d+) MiB written", tty)]
    assert shown == sorted(shown) and shown[-1] <= summary["bytes_stored"] / 2**20 + 1
    os.unlink(cr)

    # stderr not a terminal (a pipe): no progress even with the rule at 0.
    cr = tmp_path / "big3.cr"
    res = subprocess.run(_in_process(proc.pid, cr, 0.0), stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert json.loads(res.stdout)["bytes_stored"] >= 600 * 2**20
    os.unlink(cr)

    # bigheap runs on and still finds its pattern intact (it exits 2 if not).
    alive = wait_for_line(out, r"^alive \d+", timeout=30, proc=proc)
    n = int(alive.split()[1])
    wait_for_line(out, rf"^alive {n + 2}$", timeout=30, proc=proc)
    assert proc.poll() is None
