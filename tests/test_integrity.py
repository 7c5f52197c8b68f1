"""Never run a damaged image (issue 10, docs/RESTORE.md "What is verified
when"): a byte changed in a memory run, in a blob (a deleted file's content,
the bytes in flight of a pipe, a memfd's content), in a note, in the ELF
header or in a program header.  crrestart, eager and lazy, refuses in one line
naming what is damaged, exit 3, no traceback, nothing of the tree left
running; crinspect verify names the same thing with the same check; the
undamaged statefile restarts and prints what an uninterrupted run prints.  A
format 1 statefile (no chunk checksums) restarts eagerly, verified whole, and
is refused lazily."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from helpers import build_c, read_lines, require_root, wait_for_line
from test_restart import CRCHECKPOINT, CRRESTART, REPO, checkpoint, reference
from test_restart_errors import (CRINSPECT, _bigheap_statefile, _now_ticks, _stack_offset,
                                 corrupt, nothing_left, one_line, run)

from statefile.format import elfcore as ec
from statefile.format import notes as nt
from statefile.format import reader
from statefile.format.checksum import crc32

MODES = ("--eager", "--lazy")


# ------------------------------------------------------------------ helpers

def ticker_statefile(sample_bin, procs, tmp_path, mib: int = 16):
    """The ticker (which checksums its whole heap every tick) checkpointed
    with --kill at tick 6; (statefile, its output file, pid, argv)."""
    out = tmp_path / "tick.out"
    argv = [sample_bin / "ticker", 25, mib, 50]
    p = procs.spawn(argv, stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 6 ", proc=p, timeout=60)
    cr = tmp_path / "ticker.cr"
    checkpoint(p.pid, cr, proc=p)
    return cr, out, p.pid, argv


def flip(src: Path, dst: Path, off: int) -> Path:
    data = src.read_bytes()
    return corrupt(src, dst, [(off, bytes([data[off] ^ 0x5A]))])


def heap_segment(cr: Path) -> dict:
    sf = reader.load(str(cr))
    return max(sf.segments, key=lambda s: s.filesz)


def refused(bad: Path, pids, mode: str, *, step: str, what: str) -> str:
    """crrestart MODE bad: exit 3, one line 'failed at STEP: ...' containing
    `what`, nothing of the tree left running."""
    since = _now_ticks()
    r = run([*CRRESTART, mode, "--force-files", bad], timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 3, (mode, r.returncode, line)
    assert line.startswith(f"crrestart: failed at {step}: "), (mode, line)
    assert what in line, (mode, what, line)
    nothing_left(pids, since)
    return line


def restarts_like_reference(procs, cr: Path, out: Path, argv, tmp_path, mode: str) -> None:
    rr = procs.spawn([*CRRESTART, mode, "--force-files", cr], stderr=subprocess.PIPE, cwd=REPO)
    _, err = rr.communicate(timeout=120)
    assert rr.returncode == 0, err
    assert b"Traceback" not in err
    want = reference([*argv[:3], 0], tmp_path)
    assert out.read_bytes() == want


# ------------------------------------------------------------------ memory

def test_damaged_memory_run_is_never_restored(sample_bin, procs, tmp_path):
    """One byte flipped in the ticker's heap, in the middle of its 16 MiB:
    eager refuses before the task runs, naming the pid and the address range
    of the damaged 1 MiB chunk (the one crinspect verify names too); lazy
    refuses too (in the restore, or on the fault or prefetch that meets the
    chunk) and ends the process.  The undamaged file then restarts, eager and
    lazy, with the output of an uninterrupted run."""
    require_root()
    cr, out, pid, argv = ticker_statefile(sample_bin, procs, tmp_path)
    seg = heap_segment(cr)
    rel = seg.runs[0][0] + 8 * 2**20 + 12345
    bad = flip(cr, tmp_path / "heap.cr", seg.offset + rel)
    sf = reader.load(str(cr))
    size = sf.chunk_size
    lo = seg.vaddr + rel // size * size
    rng = f"memory of pid {pid} at {lo:#x}-{lo + size:#x} is damaged (checksum mismatch)"
    v = run([CRINSPECT, "verify", bad])
    assert v.returncode == 1 and f"memory of pid {pid} at {lo:#x}-{lo + size:#x}" in v.stdout, v
    line = refused(bad, [pid], "--eager", step="verify", what=rng)
    assert line.endswith(": not restarted"), line
    since = _now_ticks()
    r = run([*CRRESTART, "--lazy", "--force-files", bad], timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 3 and rng in line, line
    assert line.startswith(("crrestart: failed at lazy memory: ", "crrestart: failed at verify: ")), \
        line
    nothing_left([pid], since)
    before = out.read_bytes()
    for mode in MODES:
        out.write_bytes(before)
        restarts_like_reference(procs, cr, out, argv, tmp_path, mode)


def test_lazy_damage_is_found_at_fault_time(sample_bin, procs, tmp_path):
    """bigheap (512 MiB) with one byte of its stack changed: the stack is
    prefetched last and touched first once the process runs again, so the
    restore completes (`-v` says so) and the damage is met on the fault.
    The server verifies the whole chunk before it installs a page of it,
    kills the process, and says which pid and range in one line, exit 3; the
    process never ran on the damaged page (bigheap checks its pages).  With
    --detach the serving daemon reports it the same way."""
    require_root()
    cr, out, pid = _bigheap_statefile(sample_bin, procs, tmp_path)
    sf = reader.load(str(cr))
    stack = next(sf.segment(p) for m in sf.root.mappings if m.kind == "stack"
                 for p in m.segments if sf.segment(p).filesz)
    assert stack.offset == _stack_offset(cr)
    o, n = stack.runs[-1]
    bad = flip(cr, tmp_path / "stack.cr", stack.offset + o + n - 64)
    k = (o + n - 64) // sf.chunk_size
    lo = stack.vaddr + k * sf.chunk_size
    hi = stack.vaddr + min((k + 1) * sf.chunk_size, stack.filesz)
    rng = f"memory of pid {pid} at {lo:#x}-{hi:#x} is damaged (checksum mismatch)"
    since = _now_ticks()
    r = run([*CRRESTART, "--lazy", "-v", bad], timeout=120)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3, r.stderr
    assert len(lines) == 2 and re.match(rf"crrestart: pid {pid} restored in ", lines[0]), lines
    assert lines[1].startswith(f"crrestart: failed at lazy memory: pid {pid}: ") and rng in \
        lines[1] and "the process was killed" in lines[1], lines
    nothing_left([pid], since)
    assert (tmp_path / "bigheap.err").read_text() == ""
    # and without -v: the one line; with --detach the serving daemon says it
    # on crrestart's stderr (crrestart itself may have returned 0 already)
    for extra, codes in (([], (3,)), (["--detach"], (0, 3))):
        since = _now_ticks()
        r = run([*CRRESTART, "--lazy", *extra, bad], timeout=120)
        line = one_line(r.stderr)
        assert r.returncode in codes and rng in line and "lazy memory" in line, (extra, line)
        nothing_left([pid], since)
        assert (tmp_path / "bigheap.err").read_text() == ""


# ------------------------------------------------------------------ blobs

BLOBS = r'''
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* A deleted-but-open file (8 KiB), a pipe holding bytes nobody read yet and
   a memfd, each with known content; after TICKS ticks it reads them back and
   prints them.  argv: ticks, directory for the file. */
int main(int argc, char **argv) {
    int ticks = atoi(argv[1]);
    char path[512], buf[8192], got[8192];
    snprintf(path, sizeof path, "%s/gone.txt", argv[2]);
    int dfd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    for (int i = 0; i < 8192; i++) buf[i] = 'a' + i % 26;
    if (dfd < 0 || write(dfd, buf, sizeof buf) != sizeof buf) { perror("file"); return 1; }
    unlink(path);
    int p[2];
    if (pipe(p) < 0 || write(p[1], "bytes in flight\n", 16) != 16) { perror("pipe"); return 1; }
    int mfd = memfd_create("crelf blob", 0);
    if (mfd < 0 || write(mfd, "memfd content\n", 14) != 14) { perror("memfd"); return 1; }
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int t = 1; t <= ticks; t++) {
        printf("tick %d\n", t);
        usleep(50000);
    }
    unsigned h = 0;
    if (pread(dfd, got, sizeof got, 0) != sizeof got) { perror("pread"); return 1; }
    for (int i = 0; i < 8192; i++) h = h * 31 + (unsigned char)got[i];
    printf("file %08x\n", h);
    int n = read(p[0], got, sizeof got);
    printf("pipe %.*s", n, got);
    n = pread(mfd, got, sizeof got, 0);
    printf("memfd %.*s", n, got);
    printf("done\n");
    return 0;
}
'''


def test_damaged_blobs_are_never_used(procs, tmp_path):
    """One byte changed in each blob: the deleted file's content (used by
    the task's own file setup), the pipe's bytes in flight and the memfd's
    content (used by crrestart before the tree exists): eager and lazy refuse
    in one line naming the blob, nothing left; the intact file restarts and
    prints what an uninterrupted run prints."""
    require_root()
    exe = build_c(tmp_path, "blobs", BLOBS)
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "blobs.out"
    p = procs.spawn([exe, 30, work], stdout=out, close_fds=True)
    wait_for_line(out, r"^tick 5$", proc=p)
    cr = tmp_path / "blobs.cr"
    r = subprocess.run([CRCHECKPOINT, str(p.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    p.wait(timeout=10)
    sf = reader.load(str(cr))
    blobs = {}
    for f in sf.files:
        if f.blob is not None and f.kind == "pipe":
            blobs["pipe"] = sf.segment(f.blob)
    for o in sf.shmem:      # (a deleted file's content is its object's: statefile/dump/memfd.py)
        if o.blob is not None and (o.kind == "memfd" or getattr(o, "path", "").endswith("gone.txt")):
            blobs["memfd" if o.kind == "memfd" else "deleted"] = sf.segment(o.blob)
    assert set(blobs) == {"deleted", "pipe", "memfd"}, blobs
    names = {"deleted": "the content of deleted file ", "pipe": "the bytes in flight of pipe ",
             "memfd": "the content of memfd crelf blob"}
    for key, seg in blobs.items():
        o, n = seg.runs[0]
        bad = flip(cr, tmp_path / f"{key}.cr", seg.offset + o + n // 2)
        v = run([CRINSPECT, "verify", bad])
        assert v.returncode == 1 and names[key] in v.stdout, (key, v.stdout)
        for mode in MODES:
            line = refused(bad, [p.pid], mode, step="verify", what=names[key])
            assert "is damaged (checksum mismatch): not restarted" in line, line
        assert not list(work.iterdir()), list(work.iterdir())   # no recreated file left
    rr = procs.spawn([*CRRESTART, "--force-files", cr], stderr=subprocess.PIPE, cwd=REPO)
    _, err = rr.communicate(timeout=120)
    assert rr.returncode == 0, err
    ref = tmp_path / "ref.out"
    with open(ref, "wb") as f:
        subprocess.run([exe, "30", str(work)], stdout=f, check=True, timeout=60,
                       close_fds=True)
    assert read_lines(out) == read_lines(ref)
    assert read_lines(out)[-3:] == ["pipe bytes in flight", "memfd memfd content", "done"]


# ------------------------------------------------------------- notes and ELF

def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def test_damaged_headers_and_notes_are_refused(sample_bin, procs, tmp_path):
    """ELF header fields, program headers (data past the end, overlapping
    another's, unaligned), note sizes and a note's bytes: crrestart (eager and
    lazy) refuses at load in one line naming the problem, and crinspect verify
    names the same problem (both call reader.layout_problems)."""
    require_root()
    cr, out, pid, argv = ticker_statefile(sample_bin, procs, tmp_path, mib=4)
    data = cr.read_bytes()
    size = len(data)
    ph = lambda i, field: 64 + 56 * i + {"offset": 8, "vaddr": 16, "filesz": 32}[field]  # noqa
    stored = [i for i in range(1, 1 + len(reader.load(str(cr)).segments))
              if struct.unpack_from("<Q", data, ph(i, "filesz"))[0]]
    a, b = stored[0], stored[1]
    off_a = struct.unpack_from("<Q", data, ph(a, "offset"))[0]
    note_off = struct.unpack_from("<Q", data, ph(0, "offset"))[0]
    note_sz = struct.unpack_from("<Q", data, ph(0, "filesz"))[0]
    sf = reader.load(str(cr))
    task_desc = next(n.desc for n in sf.notes if n.n_type == nt.CR_TASK)
    k = data.find(task_desc) + 40
    cases = {
        "class": ((4, b"\x01"), "EI_CLASS is 1, not 2"),
        "data": ((5, b"\x02"), "EI_DATA is 2, not 1"),
        "version": ((6, b"\x00"), "EI_VERSION is 0, not 1"),
        "type": ((16, _u16(2)), "e_type is 2, not 4"),
        "machine": ((18, _u16(3)), "e_machine is 3, not 62"),
        "phoff": ((32, _u64(size + 4096)), "e_phoff is"),
        "phentsize": ((54, _u16(32)), "e_phentsize is 32, not 56"),
        "phnum": ((56, _u16(0xFFFE)), "program header"),
        "xnum": ((56, _u16(0xFFFF)), "extended numbering without a valid section header 0"),
        "past-end": ((ph(b, "offset"), _u64((size // 4096 + 1) * 4096)),
                     "ends past the end of the file"),
        "overlap": ((ph(b, "offset"), _u64(off_a)), "overlaps"),
        "unaligned": ((ph(b, "offset"), _u64(off_a + 8)), "not page aligned"),
        "vaddr": ((ph(b, "vaddr") + 1, bytes([data[ph(b, "vaddr") + 1] | 1])),
                  "not page aligned"),
        "note-size": ((ph(0, "filesz"), _u64(note_sz - 4)), "PT_NOTE"),
        "descsz": ((note_off + 4, struct.pack("<I", note_sz)), "PT_NOTE: note at +0x0"),
        "note-byte": ((k, bytes([data[k] ^ 1])), "note CR_TASK #1 checksum mismatch"),
    }
    for name, ((off, new), what) in cases.items():
        bad = corrupt(cr, tmp_path / f"{name}.cr", [(off, new)])
        step = "load"
        for mode in MODES:
            refused(bad, [pid], mode, step=step, what=what)
        v = run([CRINSPECT, "verify", bad])
        assert "Traceback" not in v.stderr
        assert what in v.stdout + v.stderr, (name, v)
        assert v.returncode in ((1, 5) if name == "note-byte" else (5,)), (name, v)
    restarts_like_reference(procs, cr, out, argv, tmp_path, "--eager")


def test_layout_check_extended_numbering(tmp_path):
    """More than 65535 program headers (PN_XNUM, the count in section header
    0): the layout check accepts the writer's form and refuses a section
    header 0 that lies about the count."""
    phdrs = [ec.Elf64_Phdr() for _ in range(ec.PN_XNUM + 1)]
    head = len(ec.build_headers(phdrs))
    note = ec.pack_note(b"CRELF", nt.CR_HEADER, b"{}")
    phdrs[0].p_type, phdrs[0].p_offset, phdrs[0].p_filesz = ec.PT_NOTE, head, len(note)
    for p in phdrs[1:]:
        p.p_type, p.p_vaddr, p.p_memsz = ec.PT_LOAD, 0x10000, 4096
    good = tmp_path / "xnum.cr"
    good.write_bytes(ec.build_headers(phdrs) + note)
    with open(good, "rb") as f:
        assert reader.layout_problems(f.fileno(), good.stat().st_size) == []
    data = bytearray(good.read_bytes())
    shoff = struct.unpack_from("<Q", data, 40)[0]
    struct.pack_into("<I", data, shoff + 44, 1000)            # sh_info
    bad = tmp_path / "xnum-bad.cr"
    bad.write_bytes(data)
    with open(bad, "rb") as f:
        probs = reader.layout_problems(f.fileno(), len(data))
    assert probs and "sh_info 1000 is below PN_XNUM" in probs[0], probs
    struct.pack_into("<I", data, shoff + 44, ec.PN_XNUM + 10)   # more than the file holds
    bad.write_bytes(data)
    with open(bad, "rb") as f:
        probs = reader.layout_problems(f.fileno(), len(data))
    assert probs, probs


# ------------------------------------------------------------------ format 1

def to_format1(src: Path, dst: Path) -> Path:
    """The statefile as crelf's format 1 wrote it: CR_HEADER format 1,
    CR_SEGMENTS without chunk_size and chunks (the whole-segment crc32 was
    already there), CR_INTEGRITY recomputed, the PT_NOTE rewritten in place."""
    sf = reader.load(str(src))
    notes = []
    for n in sf.notes:
        desc = n.desc
        if n.owner == "CRELF" and n.n_type == nt.CR_INTEGRITY:
            continue
        if n.owner == "CRELF" and n.n_type in (nt.CR_HEADER, nt.CR_SEGMENTS):
            obj = json.loads(bytes(desc).rstrip(b"\0"))
            if n.n_type == nt.CR_HEADER:
                obj["format"] = 1
            else:
                obj.pop("chunk_size")
                for seg in obj["segments"]:
                    seg.pop("chunks", None)
            desc = json.dumps(obj, separators=(",", ":")).encode()
        notes.append((n.owner.encode(), n.n_type, desc))
    integrity = {"v": 1, "notes": [[o.decode(), t, crc32(d)] for o, t, d in notes]}
    notes.append((b"CRELF", nt.CR_INTEGRITY, json.dumps(integrity, separators=(",", ":"))
                  .encode()))
    blob = b"".join(ec.pack_note(o, t, d) for o, t, d in notes)
    data = bytearray(src.read_bytes())
    note_off = struct.unpack_from("<Q", data, 64 + 8)[0]
    del data[note_off:]
    data += blob
    struct.pack_into("<Q", data, 64 + 32, len(blob))
    dst.write_bytes(data)
    os.chmod(dst, 0o600)
    return dst


def test_format1_statefile_restarts_eagerly_verified_whole(sample_bin, procs, tmp_path):
    """Format 1 (one crc32 per segment, no chunks): crrestart restarts it
    eagerly (the default here, and --eager) with the uninterrupted run's
    output, after checking each segment whole; a damaged one is refused
    naming the whole segment; --lazy refuses it in one line (it cannot verify
    pages as it serves them) and says what to do."""
    require_root()
    cr, out, pid, argv = ticker_statefile(sample_bin, procs, tmp_path)
    old = to_format1(cr, tmp_path / "f1.cr")
    sf = reader.load(str(old))
    assert sf.format == 1 and sf.chunk_size == 0
    assert all(s.chunks is None for s in sf.segments)
    assert run([CRINSPECT, "verify", old]).returncode == 0
    line = refused(old, [pid], "--lazy", step="verify", what="is a format 1 statefile")
    assert "--eager" in line and "checkpoint it again" in line, line
    seg = heap_segment(old)
    bad = flip(old, tmp_path / "f1-bad.cr", seg.offset + seg.runs[0][0] + 3 * 2**20)
    whole = f"memory of pid {pid} at {seg.vaddr:#x}-{seg.vaddr + seg.filesz:#x}"
    assert run([CRINSPECT, "verify", bad]).returncode == 1
    refused(bad, [pid], "--eager", step="verify", what=whole + " is damaged")
    before = out.read_bytes()
    for mode in ("--eager", None):
        out.write_bytes(before)
        rr = procs.spawn([*CRRESTART, *([mode] if mode else []), "--force-files", old],
                         stderr=subprocess.PIPE, cwd=REPO)
        _, err = rr.communicate(timeout=120)
        assert rr.returncode == 0 and b"Traceback" not in err, err
        assert out.read_bytes() == reference([*argv[:3], 0], tmp_path), mode


@pytest.mark.parametrize("seed", [1])
def test_random_mutants_never_run_wrong(sample_bin, procs, tmp_path, seed):
    """Random 1-4 byte mutants of the bytes a restart reads (headers, stored
    runs, notes): each is refused in one line (exit 3) or, when the bytes are
    ones crrestart never uses, restarts with exactly the uninterrupted run's
    output.  (Before format 2, 34 of 40 such mutants of a 16 MiB statefile
    restarted with exit 0 and wrong output.)"""
    import random
    require_root()
    cr, out, pid, argv = ticker_statefile(sample_bin, procs, tmp_path, mib=4)
    sf = reader.load(str(cr))
    data = cr.read_bytes()
    head = 64 + 56 * (1 + len(sf.segments))
    ranges = [(0, head), (sf.phdrs[0]["offset"], sf.phdrs[0]["offset"] + sf.phdrs[0]["filesz"])]
    ranges += [(s.offset + o, s.offset + o + n) for s in sf.segments for o, n in s.runs]
    weights = [b - a for a, b in ranges]
    weights[0] = weights[1] = max(weights)        # headers and notes as often as memory
    rnd = random.Random(seed)
    want = reference([*argv[:3], 0], tmp_path)
    before = out.read_bytes()
    refusals = 0
    for i in range(12):
        a, b = rnd.choices(ranges, weights)[0]
        n = rnd.randint(1, 4)
        off = rnd.randrange(a, max(a + 1, b - n))
        new = bytes((x ^ rnd.randrange(1, 256)) for x in data[off:off + n])
        bad = corrupt(cr, tmp_path / f"m{i}.cr", [(off, new)])
        out.write_bytes(before)
        since = _now_ticks()
        r = run([*CRRESTART, rnd.choice(MODES), "--force-files", bad], timeout=120)
        assert "Traceback" not in r.stderr, (off, r.stderr)
        if r.returncode == 3:
            # --force-files warns about the output file this loop rewrites;
            # a lazy refusal comes after that warning, at fault time
            one_line("".join(ln for ln in r.stderr.splitlines(keepends=True)
                             if not ln.startswith("crrestart: warning: file ")))
            refusals += 1
        else:
            assert r.returncode == 0 and out.read_bytes() == want, (off, n, r.returncode, r.stderr)
        nothing_left([pid], since)
        bad.unlink()
    assert refusals >= 6, refusals
