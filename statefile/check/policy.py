"""User policy: which resources a checkpoint may leave out, and how.

A policy comes from flags (``--skip CLASS``, ``--dump-tmpfs``, ``--snapshot``)
and/or a TOML file (``--policy FILE``)::

    skip = ["network", "scratch"]   # policy classes from statefile/check/support.py
    dump_tmpfs = true               # keep the content of files on tmpfs//dev/shm
    on_unsupported = "refuse"       # or "snapshot": write a debug-only statefile,
                                    # marked not restartable, instead of refusing

What a policy skipped is recorded in the statefile (CR_HEADER "skipped") and
shown by crinspect; crrestart says what it did about each.

A program started with ``crrun --policy FILE`` runs under that policy: crrun
records the file's path for the task it starts (``record_crrun``), and a later
crcheck or crcheckpoint of that task or of a descendant uses it when no
``--policy`` is given (``build(..., pid=PID)``; flags still add to it).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

from statefile.errors import CrelfError
from statefile.format import records
from statefile.check.support import POLICY_CLASSES


class PolicyError(CrelfError):
    exit_code = 2


@dataclass
class Policy:
    skip: set[str] = field(default_factory=set)
    dump_tmpfs: bool = False
    snapshot: bool = False
    source: str = ""
    crrun_pid: int | None = None  # the policy file is the one crrun ran this task under

    def record(self) -> records.PolicyRecord:
        """As CR_HEADER keeps it."""
        return records.PolicyRecord(skip=sorted(self.skip), dump_tmpfs=self.dump_tmpfs,
                                    on_unsupported="snapshot" if self.snapshot else "refuse",
                                    source=self.source, from_crrun=self.crrun_pid)

    def as_dict(self) -> dict:
        """As crcheck --json shows it: every field (from_crrun only when set)."""
        d = {"skip": sorted(self.skip), "dump_tmpfs": self.dump_tmpfs,
             "on_unsupported": "snapshot" if self.snapshot else "refuse",
             "source": self.source}
        if self.crrun_pid is not None:
            d["from_crrun"] = self.crrun_pid
        return d


def _check_classes(classes, where: str) -> set[str]:
    bad = [c for c in classes if c not in POLICY_CLASSES]
    if bad:
        raise PolicyError(f"{where}: unknown policy class {bad[0]!r} "
                          f"(known: {', '.join(POLICY_CLASSES)})")
    return set(classes)


def load(path: str, what: str = "") -> Policy:
    """Read and validate a TOML policy file; PolicyError (exit 2, one line) on
    anything wrong.  `what` qualifies the path in messages."""
    where = f"policy {path}{what}"
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise PolicyError(f"{where}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PolicyError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{where}: not valid TOML ({e})") from None
    unknown = set(data) - {"skip", "dump_tmpfs", "on_unsupported"}
    if unknown:
        raise PolicyError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    skip = data.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(c, str) for c in skip):
        raise PolicyError(f"{where}: 'skip' must be a list of class names")
    dump_tmpfs = data.get("dump_tmpfs", False)
    if not isinstance(dump_tmpfs, bool):
        raise PolicyError(f"{where}: 'dump_tmpfs' must be true or false (a TOML boolean), "
                          f"not {dump_tmpfs!r}")
    action = data.get("on_unsupported", "refuse")
    if action not in ("refuse", "snapshot"):
        raise PolicyError(f"{where}: on_unsupported must be 'refuse' or 'snapshot'")
    return Policy(_check_classes(skip, where), dump_tmpfs, action == "snapshot", path)


# --- the policy a task was started under by crrun -----------------------------

def _marker(pid: int, directory: str | None = None) -> str | None:
    from statefile.check import flags
    from statefile.control import procfs
    try:
        start = procfs.stat(pid)["starttime"]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return os.path.join(directory or flags.flag_dir(), f"{pid}-{start}.policy")


def record_crrun(pid: int, path: str, directory: str | None = None) -> None:
    """crrun started `pid` under the policy file `path`: remember it next to
    the task's flags (removed by flags.clear_stale once the task is gone)."""
    from statefile.check import flags
    d = directory or flags.flag_dir()
    os.makedirs(d, mode=0o700, exist_ok=True)
    marker = _marker(pid, d)
    if marker:
        with open(marker, "w") as f:
            f.write(os.path.abspath(path) + "\n")


def crrun_policy(pid: int, directory: str | None = None) -> tuple[str, int] | None:
    """(policy path, pid crrun started) when `pid` runs under `crrun --policy`:
    the task itself or its nearest ancestor started by crrun with a policy, or
    else a policy path recorded in one of its crrun flags."""
    from statefile.check import flags
    from statefile.control import procfs
    p = pid
    while p > 1:
        marker = _marker(p, directory)
        try:
            with open(marker or "") as f:
                return f.read().strip(), p
        except OSError:
            pass
        try:
            p = procfs.stat(p)["ppid"]
        except (FileNotFoundError, ProcessLookupError):
            break
    for fl in flags.read(pid, directory):
        if fl.policy_file:
            return fl.policy_file, pid
    return None


def build(policy_file: str | None, skip: tuple[str, ...] = (), dump_tmpfs: bool = False,
          snapshot: bool = False, pid: int | None = None) -> Policy:
    """A policy from an optional file plus command-line flags (flags add to it).
    Without a file, for a `pid` crrun started with --policy, crrun's policy file."""
    if policy_file:
        p = load(policy_file)
    elif pid is not None and (found := crrun_policy(pid)):
        p = load(found[0], f" (recorded by crrun for pid {found[1]})")
        p.crrun_pid = found[1]
    else:
        p = Policy()
    p.skip |= _check_classes(skip, "--skip")
    p.dump_tmpfs |= dump_tmpfs
    p.snapshot |= snapshot
    return p
