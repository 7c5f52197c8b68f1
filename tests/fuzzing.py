"""Statefile fuzzing, shared by tests/test_fuzz.py (a few hundred mutants in
CI) and bench/fuzz.py (100,000 by default).

Two real statefiles are the seeds (build_bases): the ticker (one task; its
output is a checksum of its whole heap at every tick) and `treeblob` (a
parent and a child, a deleted-but-open file saved as a blob, a pipe with
bytes in flight, a heap each; it prints checksums of all of them at the end).
Each mutant is one seed with one damage (mutate): bit flips in the ELF
header, the program headers, a note's header, a JSON note, a binary note,
memory, a blob; a truncation; two notes swapped; a note duplicated; a range
zeroed.  A second family is *forged*: a JSON note edited and its checksum in
CR_INTEGRITY fixed up, so it passes every checksum: nothing can tell it from
a genuine file, so it is never restarted, but every reader must still refuse
or show it without a traceback.

check_mutant (run in worker processes, two at a time, under an address-space
limit and a per-mutant alarm) writes the mutant, runs every crinspect
subcommand but gdb on it in-process through crinspect.cli.main (the very
function the `crinspect` command runs, argv and streams swapped as click's
CliRunner does), and the checks crrestart makes before it touches anything
(restorer.restart.load_verified, then validate), and tells whether
everything the restorer reads of the mutant (every note, program header and
stored run of memory or blob) is what it reads of its seed: if so crrestart
cannot behave differently.  Mutants crrestart would accept with different
data are restarted for real (real_restart), and the output must be the
seed's uninterrupted run's, byte for byte.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# what each command may exit with (README, the commands' --help)
CRINSPECT_CODES = {0, 1, 2, 4, 5}
CRRESTART_REFUSED = 3
SUBCOMMANDS = ["summary", "ps", "threads", "mem", "files", "shared", "notes", "verify", "core"]

CATEGORIES = {      # name: weight
    "elf-header": 6, "phdrs": 8, "note-header": 8, "note-json": 10, "note-binary": 8,
    "memory": 14, "blob": 6, "truncate": 8, "swap-notes": 6, "duplicate-note": 6,
    "zero-range": 8, "forged-json": 12,
}
FORGED = {"forged-json"}

PT_NOTE = 4
JSON_TYPES = {0x43520001, 0x43520002, 0x43520004, 0x43520005, 0x43520006, 0x4352FFFF}
CR_INTEGRITY = 0x4352FFFF


# ------------------------------------------------------------------ the seeds

TREEBLOB = r"""
/* treeblob DIR: a parent and a child; a deleted-but-open file (saved as a
 * blob), a pipe with bytes in flight, a heap each.  After "ready" its output
 * is a pure function of them. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static uint64_t fnv(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}
static void ticks(int n) {
    struct timespec ts = {0, 20000000};
    for (int i = 0; i < n; i++) nanosleep(&ts, NULL);
}
static unsigned char *fill(size_t n, unsigned seed) {
    unsigned char *b = malloc(n);
    for (size_t i = 0; i < n; i++) b[i] = (unsigned char)((i * 2654435761u + seed) >> 13);
    return b;
}
int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    char path[4096];
    snprintf(path, sizeof path, "%s/blob.tmp", argv[1]);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, fill(65536, 7), 65536) != 65536) return 1;
    unlink(path);
    int p[2];
    if (pipe(p) || write(p[1], fill(1000, 3), 1000) != 1000) return 1;
    size_t n = 256 << 10;
    pid_t kid = fork();
    if (kid == 0) {
        close(p[1]);
        unsigned char *mine = fill(n, 11), got[1000];
        ticks(15);
        size_t have = 0;
        for (ssize_t r; have < 1000 && (r = read(p[0], got + have, 1000 - have)) > 0; )
            have += r;
        printf("child pipe %zu %016llx heap %016llx\n", have,
               (unsigned long long)fnv(got, have), (unsigned long long)fnv(mine, n));
        return 7;
    }
    close(p[0]);
    unsigned char *mine = fill(n, 5), back[65536];
    printf("ready\n");
    ticks(20);
    int st;
    waitpid(kid, &st, 0);
    ssize_t r = pread(fd, back, sizeof back, 0);
    printf("parent blob %zd %016llx heap %016llx child %d\n", r,
           (unsigned long long)fnv(back, r > 0 ? r : 0), (unsigned long long)fnv(mine, n),
           WEXITSTATUS(st));
    return 0;
}
"""


@dataclasses.dataclass
class Base:
    name: str
    path: str            # the statefile
    output: str          # the file the restored program writes
    prefix: bytes        # what it held at the checkpoint
    mtime_ns: int        # and its mtime then (validate checks it)
    reference: bytes     # what it holds after an uninterrupted run


def build_bases(sample_bin: Path, work: Path, procs) -> list[Base]:
    """The two seed statefiles (crcheckpoint --kill of real runs), with the
    reference output of an uninterrupted run of each."""
    from helpers import wait_for_line
    bases = []
    # the ticker: 1 MiB heap checksummed at every tick
    out = work / "ticker.out"
    p = procs.spawn([sample_bin / "ticker", 8, 1, 80], stdout=out, stderr=subprocess.DEVNULL)
    wait_for_line(out, r"^tick 2 ", proc=p)
    bases.append(_seed("ticker", p, out, work,
                       [sample_bin / "ticker", "8", "1", "0"]))
    # treeblob: two tasks, a blob, a pipe
    src = work / "treeblob.c"
    src.write_text(TREEBLOB)
    exe = work / "treeblob"
    subprocess.run(["gcc", "-O1", "-Wall", "-o", exe, src], check=True)
    out = work / "treeblob.out"
    p = procs.spawn([exe, work], stdout=out, stderr=subprocess.DEVNULL)
    wait_for_line(out, r"^ready$", proc=p)
    bases.append(_seed("treeblob", p, out, work, [exe, work]))
    return bases


def _seed(name: str, proc, out: Path, work: Path, argv) -> Base:
    cr = work / f"{name}.cr"
    r = subprocess.run([str(BIN / "crcheckpoint"), str(proc.pid), "-o", str(cr), "--kill"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    proc.wait(timeout=10)
    prefix = out.read_bytes()
    mtime = os.stat(out).st_mtime_ns
    ref = work / f"{name}.ref"
    with open(ref, "wb") as f:
        subprocess.run([str(a) for a in argv], stdout=f, check=True, timeout=120)
    return Base(name, str(cr), str(out), prefix, mtime, ref.read_bytes())


# ------------------------------------------------------------------ mutations

@dataclasses.dataclass
class Layout:
    size: int
    phoff: int
    phnum: int
    note_ph: int               # file offset of the PT_NOTE program header
    note_off: int
    notes: list                # (record start, record end, desc start, desc end, owner, type)
    memory: list               # (offset, length) of stored runs of memory segments
    blobs: list                # the same for blob segments


def _align4(n: int) -> int:
    return (n + 3) & ~3


def layout(path: str) -> Layout:
    from statefile.format import reader
    with open(path, "rb") as f:
        data = f.read()
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    note_ph = note_off = note_len = None
    for i in range(phnum):
        ptype, _, off, _, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if ptype == PT_NOTE:
            note_ph, note_off, note_len = phoff + i * phentsize, off, filesz
            break
    notes, pos = [], note_off
    while pos < note_off + note_len:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        owner = data[pos + 12:pos + 12 + namesz].rstrip(b"\0").decode()
        desc = pos + 12 + _align4(namesz)
        end = desc + _align4(descsz)
        notes.append((pos, end, desc, desc + descsz, owner, ntype))
        pos = end
    sf = reader.load(path)
    memory, blobs = [], []
    for seg in sf.segments:
        for rel, ln in seg.runs:
            (blobs if seg.blob is not None else memory).append((seg.offset + rel, ln))
    return Layout(len(data), phoff, phnum, note_ph, note_off, notes, memory, blobs)


def _flip(data: bytearray, lo: int, hi: int, rng: random.Random) -> str:
    bits = rng.choice([1, 1, 1, 2, 3, 8])
    done = []
    for _ in range(bits):
        off = rng.randrange(lo, hi)
        bit = rng.randrange(8)
        data[off] ^= 1 << bit
        done.append(f"{off:#x}.{bit}")
    return "flip " + ",".join(done)


def _records(data: bytes, lay: Layout) -> list[bytes]:
    return [bytes(data[s:e]) for s, e, *_ in lay.notes]


def _set_notes(data: bytearray, lay: Layout, records: list[bytes]) -> bytearray:
    """Replace the note area (the last thing in the file) by these records."""
    blob = b"".join(records)
    out = bytearray(data[:lay.note_off]) + blob
    struct.pack_into("<Q", out, lay.note_ph + 32, len(blob))      # p_filesz
    return out


def _forge_json(data: bytearray, lay: Layout, rng: random.Random) -> tuple[bytearray, str]:
    """Edit one JSON note (a value replaced, a key dropped, an item added)
    and fix its checksum in CR_INTEGRITY: every checksum passes."""
    records = _records(data, lay)
    json_idx = [i for i, n in enumerate(lay.notes)
                if n[4] == "CRELF" and n[5] in JSON_TYPES and n[5] != CR_INTEGRITY]
    i = rng.choice(json_idx)
    s, e, d0, d1, owner, ntype = lay.notes[i]
    obj = json.loads(bytes(data[d0:d1]).rstrip(b"\0"))
    path = []
    node = obj
    while isinstance(node, (dict, list)) and node and rng.random() < 0.8:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        parent, node = node, node[key]
    op = rng.choice(["value", "value", "drop", "add"])
    junk = rng.choice([None, -1, 0, 2**64, 2**70, -2**63, 1.5, "x", "", [], {}, [1, 2], {"a": 1},
                       True])
    if not path:
        op = "add"
        parent, key = obj, None
    else:
        key = path[-1]
    if op == "value":
        parent[key] = junk
    elif op == "drop":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    else:
        target = parent[key] if key is not None and isinstance(parent[key], (dict, list)) \
            else parent
        if isinstance(target, dict):
            target[rng.choice(["junk", "pid", "fd", "file", "start"])] = junk
        else:
            target.append(junk)
    desc = forged_json(obj)   # (any content: the loader must refuse what is wrong)
    new = _pack(owner, ntype, desc)
    records[i] = new
    # the integrity note lists (owner, type, crc32(desc)) for every other note in order
    ii = next(k for k, n in enumerate(lay.notes) if n[5] == CR_INTEGRITY and n[4] == "CRELF")
    integ = json.loads(bytes(data[lay.notes[ii][2]:lay.notes[ii][3]]).rstrip(b"\0"))
    others = [k for k in range(len(lay.notes)) if k != ii]
    integ["notes"][others.index(i)][2] = zlib.crc32(desc)
    records[ii] = _pack("CRELF", CR_INTEGRITY, forged_json(integ))
    return _set_notes(data, lay, records), f"note {i} {'/'.join(map(str, path))} {op} {junk!r}"


def forged_json(obj) -> bytes:
    """A JSON note's payload as a forger writes it: whatever obj holds, not
    checked against the format's records (nt.encode_json would refuse it)."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _pack(owner: str, ntype: int, desc: bytes) -> bytes:
    name = owner.encode() + b"\0"
    return (struct.pack("<III", len(name), len(desc), ntype) + name + b"\0" * (
        _align4(len(name)) - len(name)) + desc + b"\0" * (_align4(len(desc)) - len(desc)))


def mutate(data: bytes, lay: Layout, rng: random.Random, category: str) -> tuple[bytes, str]:
    """One damage of the given category; returns (mutant, what was done)."""
    d = bytearray(data)
    if category == "elf-header":
        return d, _flip(d, 0, 64, rng)
    if category == "phdrs":
        return d, _flip(d, lay.phoff, lay.phoff + 56 * lay.phnum, rng)
    if category in ("note-header", "note-json", "note-binary"):
        pick = [n for n in lay.notes
                if category == "note-header"
                or (category == "note-json") == (n[4] == "CRELF" and n[5] in JSON_TYPES)]
        s, e, d0, d1, owner, ntype = rng.choice(pick)
        lo, hi = (s, s + 12) if category == "note-header" else (d0, d1)
        return d, f"{owner}:{ntype:#x} " + _flip(d, lo, hi, rng)
    if category in ("memory", "blob"):
        runs = lay.memory if category == "memory" else lay.blobs
        off, ln = rng.choice(runs)
        return d, _flip(d, off, off + ln, rng)
    if category == "truncate":
        size = rng.randrange(lay.note_off, lay.size) if rng.random() < 0.4 \
            else rng.randrange(0, lay.size)
        return d[:size], f"truncate at {size:#x}"
    if category == "zero-range":
        ln = rng.choice([1, 8, 64, 512, 4096, 65536])
        at = rng.randrange(lay.note_off, lay.size) if rng.random() < 0.4 \
            else rng.randrange(0, lay.size)
        d[at:at + ln] = bytes(len(d[at:at + ln]))
        return d, f"zero {at:#x}+{ln}"
    if category == "swap-notes":
        records = _records(d, lay)
        i, j = rng.sample(range(len(records)), 2)
        records[i], records[j] = records[j], records[i]
        return _set_notes(d, lay, records), f"swap notes {i} {j}"
    if category == "duplicate-note":
        records = _records(d, lay)
        i, j = rng.randrange(len(records)), rng.randrange(len(records))
        if rng.random() < 0.5:
            records.insert(j, records[i])
            what = f"note {i} again before {j}"
        else:
            records[j] = records[i]
            what = f"note {i} over {j}"
        return _set_notes(d, lay, records), what
    if category == "forged-json":
        return _forge_json(d, lay, rng)
    raise ValueError(category)


def pick_category(rng: random.Random, has_blob: bool) -> str:
    cats = {k: w for k, w in CATEGORIES.items() if has_blob or k != "blob"}
    return rng.choices(list(cats), weights=list(cats.values()))[0]


# --------------------------------------------------------------- the checks

def fingerprint(path: str) -> str | None:
    """A digest of everything the restorer reads of a statefile: every note,
    the program headers, every stored run of every segment.  None when it
    does not load."""
    from statefile.format import reader
    try:
        sf = reader.load(path)
    except Exception:       # noqa: BLE001  (what does not load has no fingerprint)
        return None
    h = hashlib.sha256()
    for n in sf.notes:
        h.update(f"{n.owner}:{n.n_type}:{len(n.desc)}:".encode())
        h.update(n.desc)
    h.update(json.dumps(sf.phdrs, sort_keys=True, default=str).encode())
    try:
        with open(path, "rb") as f:
            for seg in sf.segments:
                for rel, ln in seg.runs:
                    f.seek(seg.offset + rel)
                    h.update(f.read(ln))
    except (TypeError, ValueError, OverflowError, OSError):
        return None         # runs that are not byte ranges (a forged note)
    return h.hexdigest()


def crinspect_inprocess(args: list[str]) -> tuple[object, str, str]:
    """`crinspect ARGS` run in this process: crinspect.cli.main, the entry
    point of the command, with argv and the standard streams swapped (click's
    CliRunner isolation).  Returns (exit code, stdout, stderr); an exception
    that escapes main() propagates (a traceback in the real command)."""
    from click.testing import CliRunner
    from crinspect import cli as ccli
    old_argv = sys.argv
    code: object = 0
    with CliRunner().isolation(env={"CRINSPECT_DEBUG": None}) as (out, err, _):
        sys.argv = ["crinspect", *args]
        try:
            ccli.main()
        except SystemExit as e:
            code = e.code if e.code is not None else 0
        finally:
            sys.argv = old_argv
            sys.stdout.flush()
            sys.stderr.flush()
        return code, out.getvalue().decode(errors="replace"), err.getvalue().decode(
            errors="replace")


def stderr_problem(prog: str, err: str) -> str:
    """'' when stderr is clean: no traceback, every line the command's own
    (`prog: ...`), at most one error line."""
    if "Traceback" in err:
        return "traceback on stderr"
    lines = err.strip().splitlines()
    if any(not ln.startswith(f"{prog}: ") and not ln.startswith("  ") for ln in lines):
        return f"stray stderr line: {next(ln for ln in lines if not ln.startswith(prog))!r}"
    if sum(ln.startswith(f"{prog}: error") or ln.startswith(f"{prog}: failed") for ln in lines) > 1:
        return "more than one error line"
    return ""


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang()


def worker_init(limit_bytes: int = 4 << 30) -> None:
    """In a worker: a cap on the address space (a mutated size must not make a
    reader allocate the machine away: MemoryError instead), the alarm."""
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    signal.signal(signal.SIGALRM, _alarm)
    sys.path.insert(0, str(Path(__file__).resolve().parent))


_CACHE: dict = {}


def _base_info(base_path: str):
    if base_path not in _CACHE:
        with open(base_path, "rb") as f:
            data = f.read()
        _CACHE[base_path] = (data, layout(base_path), fingerprint(base_path))
    return _CACHE[base_path]


def check_mutant(base_path: str, seed: int, index: int, work: str, full: bool = True,
                 timeout: int = 30) -> dict:
    """Make mutant `index` of a seed statefile and run the in-process checks
    on it.  `full`: every crinspect subcommand through crinspect.cli.main
    (test_fuzz); else one load and crinspect's renderers called directly
    (bench/fuzz.py, faster).  Returns a JSON-able record; the mutant file is
    kept when it needs a real restart ("restart": true)."""
    data, lay, base_fp = _base_info(base_path)
    rng = random.Random(f"{seed}:{os.path.basename(base_path)}:{index}")
    cat = pick_category(rng, bool(lay.blobs))
    mutant, what = mutate(data, lay, rng, cat)
    path = os.path.join(work, f"{Path(base_path).stem}-{index}.cr")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(mutant)
    rec = {"base": base_path, "index": index, "seed": seed, "category": cat, "what": what,
           "path": path, "forged": cat in FORGED, "problems": [], "internal": [],
           "restart": False, "hang": False}
    signal.alarm(timeout)
    try:
        if full:
            _crinspect_all(path, rng, rec, work)
        else:
            _crinspect_direct(path, rec, work)
        _precheck(path, rec)
        rec["same"] = rec["outcome"] == "accepted" and fingerprint(path) == base_fp
        if rec["outcome"] == "accepted" and not rec["same"] and not rec["forged"]:
            rec["restart"] = True
    except Hang:
        rec["hang"] = True
        rec["problems"].append(f"hang (over {timeout} s in-process)")
    except Exception as e:      # noqa: BLE001  recorded, the caller fails on it
        rec["problems"].append(f"exception in the checks: {type(e).__name__}: {e}")
    finally:
        signal.alarm(0)
    if not rec["restart"]:
        os.unlink(path)
    return rec


def _crinspect_all(path: str, rng: random.Random, rec: dict, work: str) -> None:
    results = {}
    for sub in SUBCOMMANDS:
        args = [path] if sub == "summary" else [sub, path]
        if sub != "summary" and rng.random() < 0.5:
            args.append("--json")
        core = None
        if sub == "core":
            core = os.path.join(work, f"core-{os.getpid()}")
            args += ["-o", core]
        try:
            code, out, err = crinspect_inprocess(args)
        except Hang:
            raise
        except BaseException as e:   # noqa: BLE001  escaped main(): a traceback for the user
            rec["problems"].append(f"crinspect {sub}: exception escaped: "
                                   f"{type(e).__name__}: {e}")
            continue
        finally:
            if core and os.path.exists(core):
                os.unlink(core)
        results[sub] = code
        if code not in CRINSPECT_CODES:
            rec["problems"].append(f"crinspect {sub}: exit {code!r}")
        p = stderr_problem("crinspect", err)
        if p:
            rec["problems"].append(f"crinspect {sub}: {p}")
        if "cannot read the statefile (" in err:      # main()'s catch-all: a reader bug
            rec["internal"].append(f"crinspect {sub}: {err.strip()}")
        if "--json" in args and code == 0:
            try:
                json.loads(out)
            except ValueError:
                rec["problems"].append(f"crinspect {sub} --json: stdout is not JSON")
    rec["crinspect"] = results
    rec["verify"] = results.get("verify")


def _crinspect_direct(path: str, rec: dict, work: str) -> None:
    """Bench mode: one load, then what each subcommand computes and prints."""
    from statefile.format import reader
    from statefile.errors import CrelfError
    from crinspect import model, render, shared as shared_view, views
    from crinspect.corefile import write_core
    try:
        sf = reader.load(path)
    except CrelfError:
        rec["verify"] = 5
        return
    except Exception as e:  # noqa: BLE001
        rec["internal"].append(f"load: {type(e).__name__}: {e}")
        rec["verify"] = 5
        return
    try:
        model.note_problems(sf)
        s = model.summary(sf, path)
        list(render.header(s.header, path))
        for part in (render.ps(s.tasks), render.threads(s.threads),
                     render.memory(s.memory), render.files(s.files),
                     shared_view.render(s.shared), render.notes(model.note_list(sf))):
            list(part)
        views.encode(s)
        core = os.path.join(work, f"core-{os.getpid()}")
        try:
            write_core(sf, sf.root.pid, core)
        finally:
            if os.path.exists(core):
                os.unlink(core)
    except CrelfError:
        pass
    except MemoryError:
        rec["internal"].append("render: MemoryError")
    except Exception as e:  # noqa: BLE001  the CLI's catch-all would say "cannot read"
        tb = e.__traceback__
        while tb.tb_next:
            tb = tb.tb_next
        rec["internal"].append(f"render: {type(e).__name__}: {e} "
                               f"({tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:"
                               f"{tb.tb_lineno})")
    try:
        rec["verify"] = 1 if reader.verify(sf) else 0
    except Exception as e:  # noqa: BLE001
        rec["internal"].append(f"verify: {type(e).__name__}: {e}")
        rec["verify"] = 5


def _precheck(path: str, rec: dict) -> None:
    """What crrestart checks before it creates anything: load (with every
    note checksum), then validate (the executable, the files, the
    environment); a note that lacks a field there is refused at plan."""
    from restorer.errors import RestoreError
    from restorer.restart import load_verified
    from restorer.validate import validate
    from statefile.format.reader import MALFORMED
    rec["notes_ok"] = False
    sf = None
    # (a malformed note met at load is the reader's to refuse: an internal error)
    for refused, step, expected in (
            ("refused-at-load", lambda: load_verified(path), (RestoreError,)),
            ("refused-by-crrestart", lambda: validate(sf, True), (RestoreError, *MALFORMED))):
        try:
            got = step()
        except expected:
            rec["outcome"] = refused
            return
        except Exception as e:  # noqa: BLE001
            rec["internal"].append(f"crrestart {refused}: {type(e).__name__}: {e}")
            rec["outcome"] = "internal"
            return
        rec["notes_ok"] = True
        sf = sf or got
    rec["outcome"] = "accepted"


# ------------------------------------------------------------ real restarts

def real_restart(base: Base, path: str, procs, timeout: float = 30) -> dict:
    """crrestart --pidns on a statefile (in a pid namespace of its own, so
    that whatever a damaged image runs cannot signal anything outside), with
    the program's output file as it was at the checkpoint.  Returns
    {"outcome": refused-by-crrestart | accepted-and-identical |
    accepted-and-wrong | hang, "code", "stderr", "problem"}."""
    with open(base.output, "wb") as f:
        f.write(base.prefix)
    os.utime(base.output, ns=(base.mtime_ns, base.mtime_ns))
    p = procs.spawn([str(BIN / "crrestart"), "--pidns", path], stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, cwd=REPO)
    rec = {"problem": ""}
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.kill_all()
        rec.update(outcome="hang", code=None, stderr="")
        rec["problem"] = f"crrestart still running after {timeout} s"
        return rec
    procs.kill_all()     # whatever it left (it must leave nothing)
    err = err.decode(errors="replace")
    rec["code"], rec["stderr"] = p.returncode, err.strip()
    rec["problem"] = stderr_problem("crrestart", err)
    if "internal error" in err:
        rec["problem"] = rec["problem"] or "internal error"
    refused = any(ln.startswith("crrestart: failed at") for ln in err.splitlines())
    if p.returncode == CRRESTART_REFUSED and refused:
        rec["outcome"] = "refused-by-crrestart"
        if Path(base.output).read_bytes() != base.prefix:
            rec["outcome"] = "accepted-and-wrong"
            rec["problem"] = "refused, yet the output file changed"
        return rec
    same = Path(base.output).read_bytes() == base.reference and p.returncode == 0
    rec["outcome"] = "accepted-and-identical" if same else "accepted-and-wrong"
    return rec


@contextlib.contextmanager
def pool(workers: int = 2):
    """Worker processes (spawned: nothing of the parent's threads or ptrace
    state), each with worker_init."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=worker_init) as p:
        yield p


def run_mutants(bases: list[Base], count_per_base: int, seed: int, work: str, full: bool,
                workers: int = 2, timeout: int = 30, progress=None) -> list[dict]:
    """check_mutant for `count_per_base` mutants of every seed, in workers.
    A worker stuck beyond the alarm is a hang too."""
    records = []
    with pool(workers) as p:
        jobs = [(b.path, i) for i in range(count_per_base) for b in bases]
        pending = [(bp, i, p.apply_async(check_mutant, (bp, seed, i, work, full, timeout)))
                   for bp, i in jobs]
        for bp, i, job in pending:
            try:
                records.append(job.get(timeout=timeout * 4))
            except Exception as e:    # noqa: BLE001  a worker died or hung in C
                records.append({"base": bp, "index": i, "seed": seed, "category": "?",
                                "what": "?", "forged": False, "hang": True, "restart": False,
                                "internal": [], "outcome": "?",
                                "problems": [f"worker failed: {type(e).__name__}: {e}"]})
            if progress:
                progress(len(records), len(jobs))
    return records


__all__ = ["Base", "build_bases", "layout", "mutate", "check_mutant", "run_mutants",
           "real_restart", "crinspect_inprocess", "stderr_problem", "fingerprint",
           "CATEGORIES", "SUBCOMMANDS"]
