"""crinspect on real statefiles: JSON views, verify, standalone cores for gdb,
bad input, and the `inspect/` folder that must not shadow the stdlib."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from datetime import datetime
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from helpers import REPO_ROOT, children, require_root, require_tool, wait_for_line

from statefile.format import reader
from statefile.format.elfcore import CRELF_IDENT_PAD, EI_PAD

BIN = Path(sys.executable).parent
CRINSPECT = str(BIN / "crinspect")
CRCHECKPOINT = str(BIN / "crcheckpoint")
WAIT_SYMBOLS = {"clock_nanosleep", "nanosleep"}


def crinspect(*args, cwd=None):
    return subprocess.run([CRINSPECT, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def crinspect_json(*args) -> dict:
    res = crinspect(*args, "--json")
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    return json.loads(res.stdout)  # stdout is nothing but JSON


def checkpoint(pid, out, *extra):
    res = subprocess.run([CRCHECKPOINT, str(pid), "-o", str(out), "--json", *extra],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def snapshot_flag() -> list[str]:
    """crcheckpoint refuses trees it cannot restart unless told to write a snapshot."""
    helptext = subprocess.run([CRCHECKPOINT, "--help"], capture_output=True, text=True).stdout
    return ["--snapshot"] if "--snapshot" in helptext else []


def gdb_batch(prog, core, *cmds) -> str:
    require_tool("gdb")
    argv = ["gdb", "-nx", "-batch"] + [a for c in cmds for a in ("-ex", c)]
    res = subprocess.run(argv + [str(prog), "-c", str(core)], capture_output=True, text=True,
                         timeout=120)
    return res.stdout + res.stderr


def assert_one_line_error(res, *, json_ok=False):
    assert res.returncode != 0, res.stdout
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crinspect: error: "), res.stderr
    if json_ok and res.stdout:
        assert json.loads(res.stdout)["ok"] is False
    else:
        assert res.stdout == ""


# ----------------------------------------------------------------- fixtures

@pytest.fixture
def mt_cr(sample_bin, procs, tmp_path):
    """A running 4-thread mt_values and a statefile of it."""
    require_root()
    out = tmp_path / "mt.out"
    proc = procs.spawn([sample_bin / "mt_values"], stdout=out)
    wait_for_line(out, r"tick 3 ", proc=proc)
    cr = tmp_path / "mt.cr"
    checkpoint(proc.pid, cr)
    return proc, out, cr


@pytest.fixture
def tree_cr(sample_bin, procs, tmp_path):
    """A running parent with two children and a statefile of the tree."""
    require_root()
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree"], stdout=out)
    wait_for_line(out, r"child 2 tick 2", proc=proc)
    cr = tmp_path / "tree.cr"
    summary = checkpoint(proc.pid, cr, *snapshot_flag())
    assert len(summary["pids"]) == 3
    return proc, cr


def _note_offsets(path):
    """(offset of desc, n_type, owner) of every note, from pyelftools."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        out = []
        for seg in elf.iter_segments():
            if seg.header.p_type == "PT_NOTE":
                for n in seg.iter_notes():
                    name_size = (n["n_namesz"] + 3) // 4 * 4
                    out.append((n["n_offset"] + 12 + name_size, n["n_type"], n["n_name"]))
        return out


def _core_note_names(path) -> list[str]:
    """Type names of the CORE/LINUX notes of path, in file order (readelf)."""
    res = subprocess.run(["readelf", "-n", "-W", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return re.findall(r"^\s+(?:CORE|LINUX)\s+0x[0-9a-f]+\s+(NT_\w+)", res.stdout, re.M)


def _flip(path, offset, count=4):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# ------------------------------------------------------------ the inspect trap

def test_stdlib_inspect_wins_from_the_repo_root():
    assert (REPO_ROOT / "inspect").is_dir()
    assert not (REPO_ROOT / "inspect" / "__init__.py").exists()
    res = subprocess.run([sys.executable, "-c", "import inspect; print(inspect.__file__)"],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip()).resolve()
    assert path.parent == Path(sysconfig.get_paths()["stdlib"]).resolve(), path
    assert REPO_ROOT not in path.parents


@pytest.mark.parametrize("argv", [[CRINSPECT, "--help"],
                                  [sys.executable, "-m", "crinspect", "--help"]])
def test_help_works_from_the_repo_root(argv):
    res = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout and "verify" in res.stdout


# ------------------------------------------------------------- the JSON views

def test_summary_json_of_a_multithreaded_program(mt_cr):
    proc, out, cr = mt_cr
    s = crinspect_json(cr)
    h = s["header"]
    assert h["root_pid"] == proc.pid and h["format"] == 2 and h["crelf"]
    assert h["host"] == os.uname().nodename and h["kernel"] == os.uname().release
    assert h["skipped"] == []

    assert [t["pid"] for t in s["tasks"]] == [proc.pid]
    task = s["tasks"][0]
    assert task["threads"] == 4 and task["uid"] == 0 and task["depth"] == 0
    assert task["cmdline"][0].endswith("mt_values")

    ths = s["threads"]
    assert len(ths) == 4 and {t["pid"] for t in ths} == {proc.pid}
    assert {t["comm"] for t in ths} >= {"alpha", "beta", "gamma"}
    for t in ths:  # all of them sleep in nanosleep, seen from the libc symbol
        assert t["symbol"] in WAIT_SYMBOLS, t
        assert "libc" in t["object"], t
        assert t["syscall"]["name"] in WAIT_SYMBOLS, t

    heap = [m for m in s["memory"] if m["kind"] == "heap"]
    assert len(heap) == 1 and 0 < heap[0]["stored"] <= heap[0]["size"]
    # the sample's 1 MiB malloc is an anonymous mapping, fully touched
    assert any(m["kind"] == "anon-private" and m["stored"] >= 1 << 20 for m in s["memory"])
    stack = [m for m in s["memory"] if m["kind"] == "stack"]
    assert stack and stack[0]["stored"] > 0

    fds = {f["fd"]: f for f in s["files"]}
    assert fds[1]["path"] == str(out) and fds[1]["kind"] == "regular"
    assert fds[1]["flags_text"].startswith("O_WRONLY")
    assert fds[1]["offset"] > 0  # the ticks written so far
    assert fds[0]["path"] == "/dev/null"


def test_text_summary(mt_cr):
    proc, _, cr = mt_cr
    res = crinspect(cr)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for needle in ("checkpoint", "kernel", "skipped     none", str(proc.pid), "alpha",
                   "clock_nanosleep", "[heap]", "/dev/null", "process tree", "memory",
                   "files"):
        assert needle in text, needle
    # When, where and on what: the checkpoint time, the host and the kernel.
    h = crinspect_json(cr)["header"]
    created = datetime.fromisoformat(h["created"])
    assert created.tzinfo is not None
    assert abs(created.timestamp() - h["created_unix"]) < 1.5
    assert h["created_unix"] <= time.time()
    head = text.split("process tree", 1)[0]
    checkpoint_line = next(line for line in head.splitlines() if line.startswith("checkpoint"))
    assert h["created"] in checkpoint_line, checkpoint_line
    assert os.uname().nodename in checkpoint_line, checkpoint_line
    kernel_line = next(line for line in head.splitlines() if line.startswith("kernel"))
    assert os.uname().release in kernel_line, kernel_line
    assert h["crelf"] in head


def _proc_ids(pid) -> tuple[int, int, int]:
    """(ppid, pgid, sid) of pid from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), int(fields[3])


def test_ps_json_pgid_and_sid_are_the_real_ones(sample_bin, procs, tmp_path):
    """A parent with two children in a process group of its own inside the test's
    session (so pid, pgid and sid are not all the same number)."""
    require_root()
    out = tmp_path / "tree.out"
    proc = procs.spawn([sample_bin / "tree"], stdout=out, start_new_session=False,
                       process_group=0)
    wait_for_line(out, r"child 2 tick 2", proc=proc)
    kids = children(proc.pid)
    assert len(kids) == 2
    real = {pid: _proc_ids(pid) for pid in [proc.pid, *kids]}
    assert real[proc.pid][1] == proc.pid and real[proc.pid][2] == os.getsid(0)
    assert os.getsid(0) != proc.pid
    cr = tmp_path / "tree.cr"
    checkpoint(proc.pid, cr, *snapshot_flag())
    tasks = crinspect_json("ps", cr)["tasks"]
    got = {t["pid"]: (t["ppid"], t["pgid"], t["sid"]) for t in tasks}
    assert got == real
    # the tree runs on after the checkpoint
    wait_for_line(out, r"child 2 tick 6", proc=proc)
    assert proc.poll() is None


@pytest.mark.parametrize("cmd,key", [("ps", "tasks"), ("threads", "threads"),
                                     ("mem", "memory"), ("files", "files"),
                                     ("notes", "notes")])
def test_subcommands_print_clean_json_and_text(mt_cr, cmd, key):
    _, _, cr = mt_cr
    data = crinspect_json(cmd, cr)
    assert data["statefile"] == str(cr) and data[key]
    res = crinspect(cmd, cr)
    assert res.returncode == 0 and res.stdout.strip() and res.stderr == ""


def test_notes_lists_every_note_by_name(mt_cr):
    _, _, cr = mt_cr
    notes = crinspect_json("notes", cr)["notes"]
    names = [n["name"] for n in notes]
    assert names.count("NT_PRSTATUS") == 4 and names.count("CR_THREAD_REGS") == 4
    assert names.count("CR_TASK") == 1 and names[-1] == "CR_INTEGRITY"
    assert "unknown" not in names
    assert len(notes) == len(reader.load(str(cr)).notes)
    prstatus = next(n for n in notes if n["name"] == "NT_PRSTATUS")
    assert prstatus == {"index": 0, "owner": "CORE", "type": 1, "name": "NT_PRSTATUS",
                        "size": 336}


def test_symbols_in_the_executable_and_the_vdso(mt_cr, sample_bin):
    """Cross-check the lief lookup against pyelftools' symbol table and the
    vDSO image stored in the statefile."""
    from crinspect.symbols import Symbolizer

    _, _, cr = mt_cr
    sf = reader.load(str(cr))
    task = sf.root
    with open(sample_bin / "mt_values", "rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name("crelf_wait_point")
        value = sym[0]["st_value"]
    base = next(m.start for m in task.mappings
                if m.path == str(sample_bin / "mt_values") and m.offset == 0)
    symbolizer = Symbolizer(sf)
    loc = symbolizer.locate(task, base + value + 4)
    assert (loc["symbol"], loc["offset"]) == ("crelf_wait_point", 4)

    vdso = next(m for m in task.mappings if m.path == "[vdso]")
    img = symbolizer._vdso_image(task.pid, vdso)
    assert img is not None and img.addrs
    loc = symbolizer.locate(task, vdso.start + img.addrs[0] + 1)
    assert loc["object"] == "[vdso]" and loc["offset"] == 1
    assert loc["symbol"] in {"clock_gettime", "gettimeofday", "time", "getcpu",
                             "clock_getres", "getrandom"} or loc["symbol"].startswith("__vdso")

    anon = next(m for m in task.mappings if m.kind == "heap")
    assert symbolizer.locate(task, anon.start)["symbol"] is None


def test_python_program_threads_and_syscalls(sample_bin, procs, tmp_path):
    require_root()
    out = tmp_path / "py.out"
    proc = procs.spawn([sys.executable, sample_bin / "pyworker.py"], stdout=out)
    wait_for_line(out, r"py tick 3 ", proc=proc)
    cr = tmp_path / "py.cr"
    checkpoint(proc.pid, cr, *snapshot_flag())
    ths = crinspect_json("threads", cr)["threads"]
    assert len(ths) == 3 and all(t["pid"] == proc.pid for t in ths)
    main = next(t for t in ths if t["tid"] == proc.pid)
    assert main["syscall"]["name"] in WAIT_SYMBOLS | {"select", "pselect6", "futex"}, main
    workers = [t for t in ths if t["tid"] != proc.pid]
    assert all(t["syscall"]["name"] == "futex" for t in workers), workers  # queue.get()
    assert all("libc" in t["object"] for t in ths), ths


# -------------------------------------------------------------------- verify

def test_verify_passes_on_a_good_file(mt_cr):
    _, _, cr = mt_cr
    res = crinspect("verify", cr)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout
    data = crinspect_json("verify", cr)
    assert data["ok"] is True and data["problems"] == []


def test_verify_fails_on_a_corrupted_note(mt_cr, tmp_path):
    _, _, cr = mt_cr
    bad = tmp_path / "bad.cr"
    shutil.copyfile(cr, bad)
    desc, ntype, _ = _note_offsets(bad)[0]
    assert ntype == "NT_PRSTATUS"
    _flip(bad, desc + 120)  # inside pr_reg
    res = crinspect("verify", bad)
    assert res.returncode == 1
    assert "checksum mismatch" in res.stdout and "Traceback" not in res.stderr
    data = json.loads(crinspect("verify", bad, "--json").stdout)
    assert data["ok"] is False and any("note 0" in p for p in data["problems"])
    # the other commands still read it, with a warning on stderr only
    res = crinspect("ps", bad, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["tasks"]
    assert res.stderr.startswith("crinspect: warning:")


def test_verify_fails_on_corrupted_memory(mt_cr, tmp_path):
    _, _, cr = mt_cr
    bad = tmp_path / "bad.cr"
    shutil.copyfile(cr, bad)
    sf = reader.load(str(bad))
    seg = next(sf.segment(p) for m in sf.root.mappings if m.kind == "heap"
               for p in m.segments if sf.segment(p).runs)
    _flip(bad, seg.offset + seg.runs[0][0] + 16)
    data = json.loads(crinspect("verify", bad, "--json").stdout)
    assert data["ok"] is False
    assert any(f"segment {seg.phdr} " in p for p in data["problems"]), data


# -------------------------------------------------------- cores for gdb

def test_core_of_a_forked_child_loads_in_gdb(tree_cr, sample_bin, tmp_path):
    proc, cr = tree_cr
    tasks = crinspect_json("ps", cr)["tasks"]
    assert tasks[0]["pid"] == proc.pid and len(tasks) == 3
    kids = [t for t in tasks if t["ppid"] == proc.pid]
    assert len(kids) == 2 and all(t["depth"] == 1 for t in kids)
    assert tasks[0]["children"] == sorted(t["pid"] for t in kids)
    child = kids[-1]["pid"]
    # the children inherited the parent's stdout: one open file description
    fds = crinspect_json("files", cr)["files"]
    child_out = next(f for f in fds if f["pid"] == child and f["fd"] == 1)
    assert {"pid": proc.pid, "fd": 1} in child_out["shared_with"]
    tree_text = crinspect("ps", cr).stdout
    assert "├─ " in tree_text and "└─ " in tree_text

    core = tmp_path / f"{child}.core"
    res = crinspect_json("core", cr, "--pid", child, "-o", core)
    assert res["pid"] == child and res["threads"] == 1 and res["bytes_stored"] > 0
    st = core.stat()
    assert st.st_mode & 0o777 == 0o600
    with open(core, "rb") as f:  # a plain core: no statefile marker
        assert f.read(16)[EI_PAD:] != CRELF_IDENT_PAD
        elf = ELFFile(f)
        assert elf.header.e_type == "ET_CORE"
        loads = [s for s in elf.iter_segments() if s.header.p_type == "PT_LOAD"]
        assert loads and all(s.header.p_offset % 4096 == 0 for s in loads)

    out = gdb_batch(sample_bin / "tree", core, "bt", "info threads")
    assert f"LWP {child}" in out, out
    assert "nanosleep" in out and " loop " in out and " main " in out, out
    assert "k=k@entry=2" in out or "k=2" in out, out  # the second child's frame

    # crinspect gdb does the same in one step
    res = subprocess.run([CRINSPECT, "gdb", str(cr), "--pid", str(child), "--",
                          "-nx", "-batch", "-ex", "bt"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert " main " in res.stdout and " loop " in res.stdout, res.stdout


def test_core_of_the_root_is_sparse_and_readable(mt_cr, sample_bin, tmp_path):
    proc, _, cr = mt_cr
    core = tmp_path / "root.core"
    crinspect_json("core", cr, "-o", core)
    st = core.stat()
    assert st.st_blocks * 512 < st.st_size  # untouched thread stacks are holes
    # the same per-thread baseline as the statefile (and gcore): 4 threads
    notes = _core_note_names(core)
    for name in ("NT_PRSTATUS", "NT_FPREGSET", "NT_X86_XSTATE", "NT_SIGINFO"):
        assert notes.count(name) == 4, (name, notes)
    for name in ("NT_PRPSINFO", "NT_AUXV", "NT_FILE"):
        assert notes.count(name) == 1, (name, notes)
    assert _core_note_names(cr) == notes  # the statefile's standard notes, same order
    out = gdb_batch(sample_bin / "mt_values", core, "info threads", "print crelf_magic",
                    "print crelf_banner", "thread apply all print $_siginfo.si_signo")
    assert len(re.findall(r"^[* ] +\d+ +Thread ", out, re.M)) == 4, out
    assert len(re.findall(r"^\$\d+ = 19$", out, re.M)) == 4, out
    assert "0x1234abcd5678ef00" in out or str(0x1234abcd5678ef00) in out, out
    assert "crelf-banner-v1" in out, out

    # crinspect gdb on the root task opens the statefile itself
    res = subprocess.run([CRINSPECT, "gdb", str(cr), "--", "-nx", "-batch", "-ex",
                          "info threads"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(re.findall(r"^[* ] +\d+ +Thread ", res.stdout, re.M)) == 4, res.stdout


def test_core_of_a_pid_not_in_the_tree(mt_cr, tmp_path):
    _, _, cr = mt_cr
    res = crinspect("core", cr, "--pid", "1", "-o", tmp_path / "x.core")
    assert_one_line_error(res)
    assert "no task 1" in res.stderr
    assert not (tmp_path / "x.core").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".crinspect-")]


def test_core_into_a_missing_directory(mt_cr, tmp_path):
    _, _, cr = mt_cr
    res = crinspect("core", cr, "-o", tmp_path / "nope" / "x.core")
    assert_one_line_error(res)


# ---------------------------------------------------------------- bad input

ALL_COMMANDS = [[], ["ps"], ["threads"], ["mem"], ["files"], ["notes"], ["verify"],
                ["core", "-o", "OUT"]]


def _bad_inputs(tmp_path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    bad = {}
    bad["not-elf"] = tmp_path / "text.cr"
    bad["not-elf"].write_text("hello, not an ELF file\n" * 20)
    bad["empty"] = tmp_path / "empty.cr"
    bad["empty"].write_bytes(b"")
    bad["truncated"] = tmp_path / "trunc.cr"
    bad["truncated"].write_bytes(data[:len(data) // 2])
    bad["truncated-header"] = tmp_path / "trunc70.cr"
    bad["truncated-header"].write_bytes(data[:70])
    # flip bytes inside the CR_TASK note's JSON
    bad["corrupted-note"] = tmp_path / "corrupt.cr"
    bad["corrupted-note"].write_bytes(data)
    desc = next(o for o, t, owner in _note_offsets(good) if owner == "CRELF" and t == 0x43520002)
    _flip(bad["corrupted-note"], desc + 20, 8)
    bad["missing"] = tmp_path / "missing.cr"
    bad["directory"] = tmp_path
    return bad


def test_bad_input_gives_one_line_errors(mt_cr, tmp_path):
    _, _, cr = mt_cr
    out = str(tmp_path / "o.core")
    bad = _bad_inputs(tmp_path, cr)
    runs = [(name, cmd) for name in bad
            for cmd in ([], ["verify"], ["core", "-o", out])]
    runs += [("corrupted-note", cmd) for cmd in ALL_COMMANDS]
    for name, cmd in runs:
        argv = [a.replace("OUT", out) for a in cmd] + [str(bad[name])]
        for extra in ([], ["--json"]):
            res = crinspect(*argv, *extra)
            try:
                assert_one_line_error(res, json_ok=cmd == ["verify"] and bool(extra))
                # not a readable statefile: 5 from every command, verify included
                assert res.returncode == 5, res.returncode
            except AssertionError as e:
                raise AssertionError(f"{name}: crinspect {' '.join(argv + extra)}: {e}")
    assert not (tmp_path / "o.core").exists()


def test_plain_gcore_core_is_refused(mt_cr, tmp_path):
    require_tool("gcore")
    proc, _, _ = mt_cr
    prefix = tmp_path / "gc"
    subprocess.run(["gcore", "-o", str(prefix), str(proc.pid)], capture_output=True,
                   timeout=120)
    gc = Path(f"{prefix}.{proc.pid}")
    assert gc.exists()
    for cmd in (["ps"], ["verify"], [], ["notes"], ["core", "-o", tmp_path / "x.core"]):
        res = crinspect(*cmd, gc)
        assert_one_line_error(res)
        assert "not a crelf statefile" in res.stderr
        assert res.returncode == 5, (cmd, res.returncode)
    res = crinspect("verify", gc, "--json")
    assert_one_line_error(res, json_ok=True)
    assert res.returncode == 5 and json.loads(res.stdout)["ok"] is False
    assert not (tmp_path / "x.core").exists()


def test_exit_codes_are_documented_and_consistent(mt_cr, tmp_path):
    """verify: 0 good, 1 checksum problems in a file it could read, 5 for a file
    that is no statefile at all, the code every other command gives it."""
    _, _, cr = mt_cr
    helptext = crinspect("--help").stdout
    for line in ("0  success", "1  verify found checksum problems", "2  bad usage",
                 "4  output not writable", "5  not a readable statefile"):
        assert line in helptext, helptext
    assert "5 (like every other" in crinspect("verify", "--help").stdout
    assert crinspect("verify", cr).returncode == 0
    bad = tmp_path / "bad.cr"
    shutil.copyfile(cr, bad)
    desc, _, _ = _note_offsets(bad)[0]
    _flip(bad, desc + 120)
    assert crinspect("verify", bad).returncode == 1
    assert crinspect("ps", bad).returncode == 0  # readable, with a warning
    junk = tmp_path / "junk.cr"
    junk.write_bytes(b"\x7fELF" + bytes(200))
    for cmd in ([], ["ps"], ["notes"], ["verify"]):
        assert crinspect(*cmd, junk).returncode == 5, cmd
    assert crinspect("ps").returncode == 2  # bad usage: no statefile given
