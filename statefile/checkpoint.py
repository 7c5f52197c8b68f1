"""Checkpoint a process tree: freeze, gather every task's state, write, thaw."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime, timezone

from . import FORMAT_VERSION, __version__, procfs
from .dump_files import FileTable
from .dump_memory import PAGE, dump_mappings
from .dump_task import dump_task
from .errors import TargetError
from .freeze import Freezer, check_target
from .writer import StatefileWriter


def checkpoint(pid: int, output: str, *, kill: bool = False, fsync: bool = False,
               progress=None) -> dict:
    """Write the statefile of the tree rooted at pid; return a summary."""
    check_target(pid)
    writer = StatefileWriter(output, fsync=fsync)
    freezer = Freezer(pid)
    t_start = time.monotonic()
    try:
        freezer.freeze()
        t_frozen = time.monotonic()
        tasks, regs, plans_by_task = [], [], []
        files = FileTable()
        order = [p for p in procfs.descendants(pid) if p in freezer.tasks]
        for p in order:
            try:
                task, task_regs = dump_task(freezer.tasks[p], files)
                maps, plans = dump_mappings(p)
            except (FileNotFoundError, ProcessLookupError):
                raise TargetError(f"pid {p} vanished during the checkpoint") from None
            task["mappings"] = maps
            tasks.append(task)
            regs += task_regs
            plans_by_task.append(plans)
        # Segment order: the root task (PT_LOAD), the other tasks, then blobs.
        segments = []
        for task, plans in zip(tasks, plans_by_task):
            base = 1 + len(segments)  # phdr 0 is PT_NOTE
            for m in task["mappings"]:
                m["segments"] = [base + j for j in m["segments"]]
            segments += plans
        for f in files.files:
            if "blob" in f:
                f["blob"] = 1 + len(segments) + f["blob"]
        segments += files.blobs
        uname = os.uname()
        header = {
            "format": FORMAT_VERSION, "crelf": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "created_unix": time.time(), "host": socket.gethostname(),
            "kernel": uname.release, "machine": uname.machine, "page_size": PAGE,
            "root_pid": pid,
            "tree": [{"pid": t["pid"], "ppid": t["ppid"]} for t in tasks],
            "zombies": [{"pid": z["pid"], "ppid": z["ppid"], "pgid": z["pgid"],
                         "sid": z["sid"], "comm": z["comm"], "exit_code": z["exit_code"]}
                        for z in freezer.zombies.values()],
            "checkpoint_uid": os.geteuid(),
            "skipped": [],
            "leave_running": not kill,
        }
        stats = writer.write(header=header, tasks=tasks, regs=regs, files=files.files,
                             segments=segments, progress=progress)
    except BaseException:
        # Nothing is lost: no half-written file, the tree runs on.
        writer.abort()
        freezer.thaw()
        raise
    t_written = time.monotonic()
    freezer.thaw(kill=kill)
    t_end = time.monotonic()
    return {
        "statefile": os.path.abspath(output), "root_pid": pid,
        "pids": [t["pid"] for t in tasks],
        "threads": sum(len(t["threads"]) for t in tasks),
        "killed": kill,
        "bytes_stored": stats["bytes_stored"], "file_size": stats["file_size"],
        "segments": stats["segments"],
        "frozen_seconds": round(t_end - t_frozen, 6),
        "freeze_seconds": round(t_frozen - t_start, 6),
        "write_seconds": round(t_written - t_frozen, 6),
        "total_seconds": round(t_end - t_start, 6),
    }
