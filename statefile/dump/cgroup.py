"""cgroup membership of the tree's tasks, as far as this version handles it.

A restart puts every task in crrestart's own cgroups (it forks them), so a
task that was in another cgroup would come back without its limits and
accounting, silently.  Until cgroup membership is restored (the containers
issue), such a tree is refused at checkpoint: every thread of every task must
be in the cgroups crcheckpoint itself is in, in every hierarchy (cgroup v1
controllers and named hierarchies, and v2), as /proc/PID/task/TID/cgroup
shows them.  Support key task:cgroup.
"""

from __future__ import annotations

from statefile.control import procfs


def membership(pid: int | str, tid: int | None = None) -> dict[str, str]:
    """{hierarchy: path} ("cpu,cpuacct": "/user.slice", "": "/" for v2...)."""
    path = f"/proc/{pid}/cgroup" if tid is None else f"/proc/{pid}/task/{tid}/cgroup"
    out = {}
    for line in procfs.read(path).splitlines():
        _, ctrls, cg = line.split(":", 2)
        out[ctrls] = cg
    return out


def differences(tasks, live: bool = True) -> list[tuple[int, int, str]]:
    """(pid, tid, what) for each thread not in crcheckpoint's own cgroups.
    Each thread's membership is read once, live, and kept in its CR_TASK
    thread record (`cgroups`); a loaded statefile's records are compared as
    they are (with crrestart's own cgroups: restorer/validate.py ignores
    that, the check is the checkpoint's)."""
    mine = membership("self")
    out = []
    for t in tasks:         # (records.TaskNote, or crcheck's SurveyTask)
        for th in t.threads:
            if not th.cgroups:
                if not live:
                    continue      # (a loaded statefile's task: /proc shows another process)
                try:
                    th.cgroups = membership(t.pid, th.tid)
                except OSError:
                    continue
            theirs = th.cgroups
            diff = [f"{h or 'cgroup2'}:{p} (crelf: {mine.get(h, 'absent')})"
                    for h, p in sorted(theirs.items()) if mine.get(h) != p]
            if diff:
                out.append((t.pid, th.tid, ", ".join(diff)))
    return out
