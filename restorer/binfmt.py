"""binfmt_misc rule so that executing a statefile (./app.cr) restarts it.

The rule matches the ELF identification with crelf's marker in the padding
(bytes 9..15, ``CRELF\\x01\\x00``) and e_type ET_CORE, so ordinary core files
still fail with "Exec format error".  It never carries the C (credentials)
flag: a statefile must not gain privileges by being executed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from statefile.format import elfcore as ec

from .errors import RestoreError

NAME = "crelf"
MOUNT = "/proc/sys/fs/binfmt_misc"
WRAPPER = "/usr/local/lib/crelf/crrestart-binfmt"


def magic_and_mask() -> tuple[bytes, bytes]:
    ident = bytes([0x7F, ord("E"), ord("L"), ord("F"), ec.ELFCLASS64, ec.ELFDATA2LSB,
                   ec.EV_CURRENT, 0, 0]) + ec.CRELF_IDENT_PAD
    magic = ident + (ec.ET_CORE).to_bytes(2, "little")
    # OSABI (7) and ABI version (8) are not matched; everything else is.
    mask = b"\xff" * 7 + b"\x00\x00" + b"\xff" * 7 + b"\xff\xff"
    assert len(magic) == len(mask) == 18
    return magic, mask


def _esc(b: bytes) -> str:
    return "".join(f"\\x{c:02x}" for c in b)


def rule(interpreter: str) -> str:
    magic, mask = magic_and_mask()
    return f":{NAME}:M:0:{_esc(magic)}:{_esc(mask)}:{interpreter}:"


def interpreter_path() -> str:
    """An absolute path to an executable crrestart: the installed entry point
    next to our Python if there is one, else a small wrapper script."""
    cand = os.path.join(os.path.dirname(sys.executable), "crrestart")
    if os.access(cand, os.X_OK):
        return os.path.abspath(cand)
    os.makedirs(os.path.dirname(WRAPPER), exist_ok=True)
    text = f"#!/bin/sh\nexec {sys.executable} -m restorer.cli \"$@\"\n"
    tmp = WRAPPER + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, WRAPPER)
    return WRAPPER


def _ensure_mounted() -> None:
    if os.path.exists(f"{MOUNT}/register"):
        return
    r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", MOUNT],
                       capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(f"{MOUNT}/register"):
        raise RestoreError("binfmt_misc", f"cannot mount binfmt_misc on {MOUNT}: "
                           f"{r.stderr.strip() or 'unknown error'}")


def _need_root() -> None:
    if os.geteuid() != 0:
        raise RestoreError("binfmt_misc", "registering needs root")


def register() -> str:
    _need_root()
    _ensure_mounted()
    if os.path.exists(f"{MOUNT}/{NAME}"):
        _write(f"{MOUNT}/{NAME}", "-1")
    interp = interpreter_path()
    _write(f"{MOUNT}/register", rule(interp))
    return f"registered: executing a crelf statefile now runs {interp}"


def unregister() -> str:
    _need_root()
    if not os.path.exists(f"{MOUNT}/{NAME}"):
        return "not registered"
    _write(f"{MOUNT}/{NAME}", "-1")
    if os.path.exists(WRAPPER):
        os.unlink(WRAPPER)
    return "unregistered"


def status() -> tuple[bool, str]:
    path = f"{MOUNT}/{NAME}"
    if not os.path.exists(f"{MOUNT}/register"):
        return False, "not registered (binfmt_misc is not mounted)"
    if not os.path.exists(path):
        return False, "not registered"
    with open(path) as f:
        info = dict(line.split(" ", 1) if " " in line else (line, "")
                    for line in f.read().splitlines())
    state = "enabled" if "enabled" in info else "disabled"
    return state == "enabled", f"registered ({state}), interpreter {info.get('interpreter', '?')}"


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise RestoreError("binfmt_misc", f"{path}: {e.strerror}") from None


__all__ = ["register", "unregister", "status", "rule", "shutil"]
