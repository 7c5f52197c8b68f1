"""Pipes and FIFOs (statefile/dump/pipes.py): created by the initiator before the
tree forks, with their size, their bytes in flight (verified) and one open file
description for each one saved; a deleted FIFO comes back at a scratch name,
removed at once."""

from __future__ import annotations

import fcntl
import os
import stat as st

import msgspec

from statefile.format.integrity import DamagedError, SegmentReader
from statefile.format.records import FifoFile, File, PipeFile, Segment

from restorer.errors import RestoreError
from restorer.kernel import close_all
from restorer.release.guard import journal_path

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
O_ACCMODE = 3
O_DIRECT = 0o40000
SETFL_MASK = os.O_NONBLOCK | os.O_APPEND | 0o20000  # O_NONBLOCK, O_APPEND, O_ASYNC


Pipe = PipeFile | FifoFile


def _pipe_key(f: Pipe) -> tuple:
    return ("pipe", 0, f.ino) if isinstance(f, PipeFile) else ("fifo", f.dev, f.ino)


def _read_blob(plan, seg: Segment | None) -> bytes:
    """The bytes in flight of a pipe, verified (statefile/format/integrity.py)."""
    if seg is None:
        return b""
    out = bytearray()
    sfd = os.open(plan.statefile, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with SegmentReader(plan.sf, sfd) as rd:
            for pos, data in rd.read_all(seg):
                out[len(out):pos] = bytes(pos - len(out))
                out[pos:pos + len(data)] = data
    except DamagedError as e:
        raise RestoreError("verify", f"{e}: not restarted") from None
    finally:
        os.close(sfd)
    return bytes(out)


def _setfl(fd: int, flags: int) -> None:
    cur = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = (cur & ~SETFL_MASK) | (flags & SETFL_MASK)
    if want != cur:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)


def _write_all(fd: int, data: bytes, what: str) -> None:
    done = 0
    while done < len(data):
        try:
            done += os.write(fd, data[done:])
        except BlockingIOError:
            raise RestoreError("pipes", f"{what}: the saved bytes in flight do not fit in "
                               "the pipe") from None


def _reopen(fd: int, flags: int) -> int:
    """Another open file description of the same pipe (as /proc/PID/fd/N does)."""
    return os.open(f"/proc/self/fd/{fd}", (flags & (O_ACCMODE | os.O_NONBLOCK)) | os.O_CLOEXEC)


def _make_pipe(group: list[PipeFile], data: bytes, size: int) -> dict[int, int]:
    direct = any(f.flags & O_DIRECT for f in group)
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK | (O_DIRECT if direct else 0))
    out: dict[int, int] = {}
    try:
        if size and fcntl.fcntl(w, F_GETPIPE_SZ) != size:
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, size)
            except OSError as e:
                if len(data) > fcntl.fcntl(w, F_GETPIPE_SZ):
                    raise RestoreError("pipes", f"{group[0].path}: cannot set the pipe size "
                                       f"to {size} ({e.strerror})") from None
        _write_all(w, data, group[0].path)
        used: set[int] = set()
        for f in group:
            mode = f.flags & O_ACCMODE
            end = r if mode == os.O_RDONLY else w if mode == os.O_WRONLY else None
            if end is not None and end not in used:
                fd = end
                used.add(end)
            else:
                fd = _reopen(r, f.flags)
            _setfl(fd, f.flags)
            out[f.id] = fd
        for end in (r, w):
            if end not in used:
                os.close(end)   # an end nobody in the tree held (writers get EPIPE, as before)
    except BaseException:
        close_all(set(out.values()) | {r, w})
        raise
    return out


def _open_fifo(group: list[FifoFile], data: bytes, size: int,
               warnings: list[str]) -> dict[int, int]:
    path = group[0].path
    if path.endswith(" (deleted)"):
        return _open_deleted_fifo(group, data, size, warnings)
    if not os.path.exists(path):
        journal_path(path)
        os.mkfifo(path, group[0].mode & 0o7777)
        warnings.append(f"FIFO {path} was missing: created again")
    helper = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    out: dict[int, int] = {}
    try:
        s = os.fstat(helper)
        if not st.S_ISFIFO(s.st_mode):
            raise RestoreError("fifos", f"{path} is no longer a FIFO")
        if size and fcntl.fcntl(helper, F_GETPIPE_SZ) != size:
            try:
                fcntl.fcntl(helper, F_SETPIPE_SZ, size)
            except OSError:
                pass
        _write_all(helper, data, path)
        for f in group:
            fd = os.open(path, (f.flags & (O_ACCMODE | os.O_NONBLOCK)) | os.O_NONBLOCK
                         | os.O_CLOEXEC)
            _setfl(fd, f.flags)
            out[f.id] = fd
        # A FIFO reader sees end-of-file (poll: POLLHUP) only if a writer opened
        # the FIFO after it did; the readers above were opened after our helper
        # (a writer), so open and close one more writer, as the original
        # writers did once.  Without it a reader whose writers had all exited
        # at the checkpoint would wait in poll() for ever.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            pass  # no reader in the tree: nobody to wake
    except BaseException:
        close_all(out)
        raise
    finally:
        os.close(helper)
    return out


def _open_deleted_fifo(group: list[FifoFile], data: bytes, size: int,
                       warnings: list[str]) -> dict[int, int]:
    """A FIFO removed while open: a new one at a scratch name beside where it
    was (else in /tmp), with the saved mode and owner, opened for every saved
    description like a named one, its name removed at once."""
    path = group[0].path.removesuffix(" (deleted)")
    f0 = group[0]
    base = os.path.basename(path)
    for where in (os.path.dirname(path) or "/", "/tmp"):
        cand = os.path.join(where, f".{base}.crelf-{os.getpid()}")
        journal_path(cand)
        try:
            os.mkfifo(cand, 0o600)
        except OSError:
            continue
        try:
            if os.geteuid() == 0:
                os.chown(cand, f0.uid, f0.gid)
            os.chmod(cand, f0.mode & 0o7777)
            return _open_fifo([msgspec.structs.replace(f, path=cand) for f in group], data,
                              size, warnings)
        finally:
            os.unlink(cand)
    raise RestoreError("fifos", f"cannot recreate deleted FIFO {path}: no writable directory")


def open_pipes(plan, files: list[File], users: dict[int, set[int]], made: dict[int, int],
               warnings: list[str]) -> dict[int, int]:
    """Every pipe and FIFO a task of the tree holds (`users`: file id -> pids)
    and that is not made yet (`made`): one group per pipe, created with its
    bytes in flight.  Returns {file id: fd}."""
    out: dict[int, int] = {}
    try:
        groups: dict[tuple, list[Pipe]] = {}
        for f in files:
            if f.id in made:
                continue
            if f.id in users and isinstance(f, Pipe) and not f.skipped:
                groups.setdefault(_pipe_key(f), []).append(f)
        for key, group in groups.items():
            info = group[0].pipe
            holder = files[info.data_file] if info.data_file is not None else None
            data = b""
            if holder is not None and holder.blob is not None:
                data = _read_blob(plan, plan.blobs.get(holder.id))
            try:
                if key[0] == "pipe":
                    out.update(_make_pipe(group, data, info.size))
                else:
                    out.update(_open_fifo(group, data, info.size, warnings))
            except OSError as e:
                raise RestoreError("pipes", f"{group[0].path}: {e.strerror or e}") from None
    except BaseException:
        close_all(out)
        raise
    return out
