"""User policy: which resources a checkpoint may leave out, and how.

A policy comes from flags (``--skip CLASS``, ``--dump-tmpfs``, ``--snapshot``)
and/or a TOML file (``--policy FILE``)::

    skip = ["network", "scratch"]   # policy classes from statefile/support.py
    dump_tmpfs = true               # keep the content of files on tmpfs//dev/shm
    on_unsupported = "refuse"       # or "snapshot": write a debug-only statefile,
                                    # marked not restartable, instead of refusing

What a policy skipped is recorded in the statefile (CR_HEADER "skipped") and
shown by crinspect; crrestart says what it did about each.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from .errors import CrelfError
from .support import POLICY_CLASSES


class PolicyError(CrelfError):
    exit_code = 2


@dataclass
class Policy:
    skip: set[str] = field(default_factory=set)
    dump_tmpfs: bool = False
    snapshot: bool = False
    source: str = ""

    def as_dict(self) -> dict:
        return {"skip": sorted(self.skip), "dump_tmpfs": self.dump_tmpfs,
                "on_unsupported": "snapshot" if self.snapshot else "refuse",
                "source": self.source}


def _check_classes(classes, where: str) -> set[str]:
    bad = [c for c in classes if c not in POLICY_CLASSES]
    if bad:
        raise PolicyError(f"{where}: unknown policy class {bad[0]!r} "
                          f"(known: {', '.join(POLICY_CLASSES)})")
    return set(classes)


def load(path: str) -> Policy:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise PolicyError(f"policy {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"policy {path}: not valid TOML ({e})") from None
    unknown = set(data) - {"skip", "dump_tmpfs", "on_unsupported"}
    if unknown:
        raise PolicyError(f"policy {path}: unknown key {sorted(unknown)[0]!r}")
    skip = data.get("skip", [])
    if not isinstance(skip, list) or not all(isinstance(c, str) for c in skip):
        raise PolicyError(f"policy {path}: 'skip' must be a list of class names")
    action = data.get("on_unsupported", "refuse")
    if action not in ("refuse", "snapshot"):
        raise PolicyError(f"policy {path}: on_unsupported must be 'refuse' or 'snapshot'")
    return Policy(_check_classes(skip, f"policy {path}"), bool(data.get("dump_tmpfs", False)),
                  action == "snapshot", path)


def build(policy_file: str | None, skip: tuple[str, ...] = (), dump_tmpfs: bool = False,
          snapshot: bool = False) -> Policy:
    """A policy from an optional file plus command-line flags (flags add to it)."""
    p = load(policy_file) if policy_file else Policy()
    p.skip |= _check_classes(skip, "--skip")
    p.dump_tmpfs |= dump_tmpfs
    p.snapshot |= snapshot
    return p
