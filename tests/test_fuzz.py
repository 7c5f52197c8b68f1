"""Mutated statefiles against every crinspect subcommand and crrestart: no
traceback, no hang, and never a run on wrong data (tests/fuzzing.py).

What gives confidence, within two minutes on two cores:
  * Two real seeds, not synthetic files: a one-task ticker whose output is a
    checksum of its whole heap at every tick, and a two-task tree with a
    deleted-but-open file (a blob), a pipe with bytes in flight and a heap
    per task, whose output checksums all of them.  A wrong byte of stored
    memory or blob that a restart let through changes the output.
  * 150 mutants of each (CRELF_FUZZ_SEED repeats a run; the seed is in every
    failure message): bit flips in the ELF header, program headers, note
    headers, JSON notes, binary notes, memory and blob runs; truncations;
    swapped and duplicated notes; zeroed ranges; and forged notes (a JSON
    note edited and its checksum fixed up: they pass every check, so they
    only have to be refused or shown without a traceback, never run).
  * Every crinspect subcommand but gdb on every mutant, in-process through
    crinspect.cli.main itself (the function the command runs); a handful of
    mutants through the real commands too (gdb included), which must give the
    same exit codes and output as in-process.
  * crrestart's own checks before it creates anything (load with every note
    checksum, validate) on every mutant, in-process.  A mutant it accepts
    whose notes, program headers and stored runs are all byte-identical to
    its seed's cannot restart differently (that is all the restorer reads).
    Every other accepted one is restarted for real (up to MAX_RESTARTS, in a
    pid namespace of its own), and its output must be byte for byte that of
    an uninterrupted run.  A few refused ones go through the real crrestart
    too: exit 3, one line, nothing left running.
bench/fuzz.py runs the same on 100,000 mutants.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import ProcessManager, require_root
from fuzzing import (SUBCOMMANDS, build_bases, crinspect_inprocess, real_restart,
                     run_mutants, stderr_problem)

SEED = int(os.environ.get("CRELF_FUZZ_SEED", random.randrange(1 << 32)))
PER_BASE = int(os.environ.get("CRELF_FUZZ_MUTANTS", 150))
MAX_RESTARTS = 80
CRINSPECT = str(Path(sys.executable).parent / "crinspect")
WHERE = f"(CRELF_FUZZ_SEED={SEED} repeats this run)"


@pytest.fixture(scope="module")
def fuzz(sample_bin, tmp_path_factory):
    require_root()
    work = tmp_path_factory.mktemp("fuzz")
    procs = ProcessManager()
    rng = random.Random(SEED)
    try:
        bases = build_bases(sample_bin, work, procs)
        for b in bases:     # the seeds themselves restart exactly
            r = real_restart(b, b.path, procs)
            assert r["outcome"] == "accepted-and-identical", (b.name, r)
        records = run_mutants(bases, PER_BASE, SEED, str(work), full=True)
        by_path = {b.path: b for b in bases}
        todo = [r for r in records if r["restart"]]
        rng.shuffle(todo)
        for r in todo[:MAX_RESTARTS]:
            r["real"] = real_restart(by_path[r["base"]], r["path"], procs)
        for r in todo:
            os.unlink(r["path"])
        cross = _through_the_commands(bases, records, rng, work, procs)
    finally:
        procs.kill_all()
    outcomes = Counter()
    for r in records:
        o = r.get("real", {}).get("outcome") or (
            "accepted-and-identical" if r.get("same") else
            "accepted, not restarted" if r["restart"] else
            "forged, accepted (not restarted)" if r["forged"] and r["outcome"] == "accepted"
            else r["outcome"])
        outcomes[o] += 1
    summary = {"seed": SEED, "mutants": len(records), "outcomes": dict(outcomes),
               "by_category": dict(Counter(r["category"] for r in records)),
               "real_restarts": sum("real" in r for r in records),
               "internal_errors": sum(bool(r["internal"]) for r in records),
               "problems": sum(bool(r["problems"]) for r in records)}
    print(json.dumps(summary, indent=1))
    return {"records": records, "cross": cross, "summary": summary}


def _through_the_commands(bases, records, rng, work, procs) -> list[str]:
    """Remake a few mutants (refused at load, forged, failing verify, accepted)
    and run them through the real crinspect (every subcommand, gdb too) and
    crrestart: the same exit codes and output as in-process, one line, no
    traceback, no hang.  Returns the differences found."""
    from fuzzing import _base_info, mutate, pick_category   # the same mutants again
    problems = []
    picks = []
    for want in ("refused-at-load", "refused-by-crrestart", "accepted"):
        pool = [r for r in records if r.get("outcome") == want and not r["restart"]]
        picks += rng.sample(pool, min(2, len(pool)))
    picks += rng.sample([r for r in records if r["forged"]], 1)
    for r in picks:
        data, lay, _ = _base_info(r["base"])
        mrng = random.Random(f"{r['seed']}:{os.path.basename(r['base'])}:{r['index']}")
        mutant, _ = mutate(data, lay, mrng, pick_category(mrng, bool(lay.blobs)))
        path = work / f"cross-{r['index']}.cr"
        path.write_bytes(mutant)
        for sub in SUBCOMMANDS:
            args = [str(path)] if sub == "summary" else [sub, str(path), "--json"]
            if sub == "core":
                args += ["-o", str(work / "cross.core")]
            mine = crinspect_inprocess(args)
            real = subprocess.run([CRINSPECT, *args], capture_output=True, text=True,
                                  timeout=120, stdin=subprocess.DEVNULL)
            if (mine[0], mine[1]) != (real.returncode, real.stdout) or mine[2] != real.stderr:
                problems.append(f"{r['what']}: crinspect {sub}: in-process {mine[0]} "
                                f"{mine[2]!r}, command {real.returncode} {real.stderr!r}")
            p = stderr_problem("crinspect", real.stderr)
            if p:
                problems.append(f"{r['what']}: crinspect {sub}: {p}")
        g = subprocess.run([CRINSPECT, "gdb", str(path), "--", "-nx", "-batch", "-ex",
                            "info threads"], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        if "Traceback" in g.stderr or (g.returncode == 5) != (r["verify"] == 5):
            problems.append(f"{r['what']}: crinspect gdb: {g.returncode} {g.stderr[-300:]!r}")
        if r["outcome"] != "accepted":
            rr = real_restart(next(b for b in bases if b.path == r["base"]), str(path), procs)
            if rr["outcome"] != "refused-by-crrestart" or rr["code"] != 3 or rr["problem"] \
                    or len(rr["stderr"].splitlines()) != 1:
                problems.append(f"{r['what']}: crrestart: {rr}")
        path.unlink()
    return problems


def _lines(records, key) -> str:
    return "\n".join(f"  {r['category']} {r['what']} ({Path(r['base']).stem} #{r['index']}): "
                     + "; ".join(r[key]) for r in records if r[key])


def test_no_traceback_no_hang_documented_codes(fuzz):
    """Every subcommand on every mutant: exit 0 or a documented code, stderr
    only the command's own lines with at most one error, no exception, no
    hang."""
    bad = [r for r in fuzz["records"] if r["problems"]]
    assert not bad, f"{len(bad)} mutant(s) {WHERE}:\n" + _lines(bad, "problems")


def test_damaged_files_are_refused_by_the_readers_not_by_their_catch_all(fuzz):
    """A damaged (not forged) statefile whose notes are intact (the damage is
    in the headers or the data) is refused or shown with the reader's own
    messages, never through a command's catch-all for an exception it did not
    expect ("cannot read the statefile (KeyError: ...)", "internal error").
    Notes that fail their checksum are still shown, after a warning, and a
    field they lost may end there in one line: that is counted
    (bench/fuzz.py), not failed, as are forged notes."""
    bad = [r for r in fuzz["records"] if r["internal"] and not r["forged"] and r.get("notes_ok")]
    assert not bad, f"{len(bad)} mutant(s) {WHERE}:\n" + _lines(bad, "internal")


def test_never_a_run_on_wrong_data(fuzz):
    """Every mutant crrestart accepted and ran printed exactly what an
    uninterrupted run prints, and exited as it does."""
    recs = fuzz["records"]
    wrong = [r for r in recs if r.get("real", {}).get("outcome") in
             ("accepted-and-wrong", "hang")]
    assert not wrong, f"{len(wrong)} of {sum('real' in r for r in recs)} restarted mutant(s) " \
                      f"ran on wrong data {WHERE}:\n" + "\n".join(
                          f"  {r['category']} {r['what']} ({Path(r['base']).stem} #{r['index']}):"
                          f" exit {r['real']['code']}, {r['real']['stderr'][-200:]!r}"
                          for r in wrong)
    assert all(not r["real"]["problem"] for r in recs if "real" in r), WHERE


def test_in_process_is_what_the_commands_do(fuzz):
    assert not fuzz["cross"], f"{WHERE}\n" + "\n".join(fuzz["cross"])
