#!/usr/bin/env python3
"""Benchmark: N mutated statefiles (default 100,000) against crelf's readers
and crrestart, with counts.

The seeds and mutations are tests/fuzzing.py's (the ones tests/test_fuzz.py
uses in CI): a ticker and a two-task tree with a blob and a pipe, checkpointed
with --kill; each mutant is one of them with one damage (bit flips in the ELF
header, program headers, note headers, JSON and binary notes, memory, blobs;
truncations; swapped or duplicated notes; zeroed ranges) or a forged note (its
checksum fixed up).  Per mutant, in two worker processes: one load, every
crinspect view computed and rendered as the subcommands do (the renderers
called directly, for speed: test_fuzz runs them through the command's entry
point), crinspect verify's checks, and crrestart's checks before it creates
anything.  A sample of the mutants crrestart would accept with data that
differ from the seed's is restarted for real (--restarts) and its output
compared with an uninterrupted run's.  Prints:

  refused-at-load         crrestart's load step refuses it (reader or a note checksum)
  refused-by-verify       crrestart's load accepts it, crinspect verify does not
                          (segment checksums): a restart must not run these
  refused-by-crrestart    refused by crrestart's later checks (validate, plan, or
                          the real run)
  accepted-and-identical  everything the restorer reads is the seed's, or it ran
                          and printed exactly the uninterrupted run's output
  accepted-and-wrong      ran and printed something else (must be 0)
  accepted, not run       beyond the --restarts sample
  internal errors         exceptions a command's catch-all would turn into one line
                          (reader bugs), problems (tracebacks, bad exit codes), hangs

    sudo python3 bench/fuzz.py -n 5000                 # ~2.5 minutes
    sudo python3 bench/fuzz.py                         # 100,000 mutants (~35 minutes)
    sudo python3 bench/fuzz.py -n 2000 --seed 7 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fuzzing import build_bases, real_restart, run_mutants  # noqa: E402
from helpers import ProcessManager  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--mutants", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--restarts", type=int, default=200,
                    help="real crrestart runs, at most (default 200)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/fuzz.py: needs root (crcheckpoint --kill and crrestart)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    work = Path(tempfile.mkdtemp(prefix="crelf-fuzz-"))
    procs = ProcessManager()
    t0 = time.monotonic()
    try:
        bins = work / "bin"
        subprocess.run(["sh", str(REPO / "samples" / "build.sh"), str(bins)], check=True,
                       capture_output=True)
        bases = build_bases(bins, work, procs)
        by_path = {b.path: b for b in bases}
        last = [0.0]

        def progress(done, total):
            if sys.stderr.isatty() and time.monotonic() - last[0] > 1:
                last[0] = time.monotonic()
                print(f"\rfuzz: {done}/{total} mutants", end="", file=sys.stderr)

        records = run_mutants(bases, (args.mutants + len(bases) - 1) // len(bases), seed,
                              str(work), full=False, workers=args.workers, progress=progress)
        records = records[:args.mutants]
        t_inproc = time.monotonic() - t0
        todo = [r for r in records if r["restart"]]
        random.Random(seed).shuffle(todo)
        for r in todo[:args.restarts]:
            r["real"] = real_restart(by_path[r["base"]], r["path"], procs)
        for r in todo:
            if os.path.exists(r["path"]):
                os.unlink(r["path"])
    finally:
        procs.kill_all()
        shutil.rmtree(work, ignore_errors=True)
    counts, forged = Counter(), Counter()
    internal = Counter()
    for r in records:
        (forged if r["forged"] else counts)[_outcome(r)] += 1
        for line in r["internal"]:
            kind = "forged" if r["forged"] else "damaged, notes intact" if r.get("notes_ok") \
                else "damaged notes"
            internal[f"{kind}: {line.split(': ', 1)[-1][:160]}"] += 1
    report = {
        "seed": seed, "mutants": len(records), "seconds": round(time.monotonic() - t0, 1),
        "in_process_seconds": round(t_inproc, 1),
        "real_restarts": sum("real" in r for r in records),
        "damaged": dict(counts), "forged": dict(forged),
        "internal_errors": sum(bool(r["internal"]) for r in records),
        "internal_errors_damaged": sum(bool(r["internal"]) for r in records if not r["forged"]),
        "internal_errors_intact_notes": sum(bool(r["internal"]) for r in records
                                            if not r["forged"] and r.get("notes_ok")),
        "problems": sum(bool(r["problems"] or r.get("real", {}).get("problem"))
                        for r in records),
        "hangs": sum(bool(r["hang"]) or r.get("real", {}).get("outcome") == "hang"
                     for r in records),
        "by_category": dict(Counter(r["category"] for r in records)),
        "wrong": [f"{r['category']} {r['what']} ({Path(r['base']).stem} #{r['index']})"
                  for r in records if _outcome(r) == "accepted-and-wrong"][:20],
        "internal_kinds": dict(internal.most_common(15)),
        "problem_list": [f"{r['category']} {r['what']} ({Path(r['base']).stem} #{r['index']}): "
                         + "; ".join(r["problems"] + [r.get("real", {}).get("problem", "")])
                         for r in records if r["problems"] or r.get("real", {}).get("problem")
                         ][:20],
        "crrestart_internal": [f"{r['category']} {r['what']}: {line}" for r in records
                               for line in r["internal"] if line.startswith("crrestart")][:20],
    }
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 1 if counts["accepted-and-wrong"] or report["problems"] or report["hangs"] else 0


def _outcome(r: dict) -> str:
    if "real" in r:
        return r["real"]["outcome"]
    if r.get("same"):
        return "accepted-and-identical"
    if r["outcome"] == "refused-at-load":
        return "refused-at-load"
    if r.get("verify") == 1:
        return "refused-by-verify"
    if r["outcome"] == "accepted":
        return "accepted, not run"
    return r["outcome"]


def _print(rep: dict) -> None:
    print(f"fuzz: {rep['mutants']} mutants (seed {rep['seed']}), {rep['seconds']} s "
          f"({rep['in_process_seconds']} s in-process), {rep['real_restarts']} real restarts")
    order = ["refused-at-load", "refused-by-verify", "refused-by-crrestart",
             "accepted-and-identical", "accepted-and-wrong", "accepted, not run", "internal"]
    print(f"  {'':24} {'damaged':>8} {'forged':>8}")
    for k in order + sorted((set(rep["damaged"]) | set(rep["forged"])) - set(order)):
        if k in rep["damaged"] or k in rep["forged"] or k == "accepted-and-wrong":
            print(f"  {k:24} {rep['damaged'].get(k, 0):8} {rep['forged'].get(k, 0):8}")
    print(f"  internal errors (a catch-all's one line): {rep['internal_errors']} "
          f"({rep['internal_errors_damaged']} on damaged files, "
          f"{rep['internal_errors_intact_notes']} of them with intact notes)")
    print(f"  problems (tracebacks, undocumented exit codes): {rep['problems']}; "
          f"hangs: {rep['hangs']}")
    for w in rep["wrong"]:
        print(f"  WRONG: {w}")
    for k, n in rep["internal_kinds"].items():
        print(f"  internal x{n}: {k}")
    for line in rep["problem_list"] + rep["crrestart_internal"]:
        print(f"  PROBLEM: {line}")


if __name__ == "__main__":
    sys.exit(main())
