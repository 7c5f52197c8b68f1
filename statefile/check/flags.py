"""Runtime "not checkpointable" flags.

`crrun` watches a program and, the moment a task creates state crelf cannot
save (an io_uring, a perf event, ...), appends a flag for that task here.
`crcheck`, `crcheckpoint` and `crinspect` read them back.

One JSON-lines file per task: ``FLAG_DIR/<pid>-<starttime>.jsonl`` (the
starttime from /proc/PID/stat field 22 tells a reused pid apart).  Each line:
``{"pid", "tid", "time" (unix seconds), "syscall" (name), "nr", "resource",
"reason", "action" ("flagged" or "denied")}``.
"""

from __future__ import annotations

import json
import os
import time

import msgspec

from statefile.control import procfs
from statefile.format import records


def flag_dir() -> str:
    if os.geteuid() == 0:
        return "/run/crelf/flags"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/crelf-{os.geteuid()}"
    return os.path.join(base, "crelf", "flags")


def _path(pid: int, starttime: int, directory: str | None = None) -> str:
    return os.path.join(directory or flag_dir(), f"{pid}-{starttime}.jsonl")


def add(pid: int, record: dict, directory: str | None = None) -> None:
    """Append one flag for a task (called by the crrun monitor)."""
    d = directory or flag_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    start = procfs.stat(pid)["starttime"]
    rec = {"pid": pid, "time": time.time(), **record}
    with open(_path(pid, start, d), "a") as f:
        f.write(json.dumps(rec) + "\n")


def read(pid: int, directory: str | None = None) -> list[records.CrrunFlag]:
    """Flags recorded for the live task `pid` (empty when none or not running;
    typed as the CR_TASK record that keeps them: records.CrrunFlag)."""
    try:
        start = procfs.stat(pid)["starttime"]
    except (FileNotFoundError, ProcessLookupError):
        return []
    try:
        with open(_path(pid, start, directory)) as f:
            return [msgspec.json.decode(line, type=records.CrrunFlag) for line in f
                    if line.strip()]
    except (FileNotFoundError, msgspec.DecodeError):
        return []


def clear_stale(directory: str | None = None) -> None:
    """Remove flag files of tasks that are gone."""
    d = directory or flag_dir()
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for name in names:
        pid, _, rest = name.partition("-")
        try:
            alive = procfs.stat(int(pid))["starttime"] == int(rest.split(".")[0])
        except (FileNotFoundError, ProcessLookupError, ValueError):
            alive = False
        if not alive:
            try:
                os.unlink(os.path.join(d, name))
            except FileNotFoundError:
                pass
