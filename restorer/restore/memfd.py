"""memfds and shared file objects (statefile/dump/memfd.py, CR_FILES "shmem"),
recreated once each by the initiator before the tree forks (docs/TREE.md).

* a memfd: ``memfd_create`` with its name (MFD_ALLOW_SEALING, MFD_EXEC or
  MFD_NOEXEC_SEAL as its mode and seals need), its mode and owner, its saved
  data ranges written, ftruncate to its size, then its seals;
* a file mapped MAP_SHARED after it was deleted (a shm_unlink'ed POSIX shm):
  a new file in the same directory (else /tmp) with its content, unlinked at
  once;
* a file on tmpfs saved under the ``dump_tmpfs`` policy: opened at its path
  when it is there (same host: the content lives in the file), recreated there
  from the saved content when it is missing (another host, or deleted).

Every open file description of the object (CR_FILES entries with ``shmem``)
is opened again from it in the initiator (``/proc/self/fd/N``, saved flags and
offset) and inherited by the tasks that hold it, so fds shared across tasks
keep one offset; every task that maps the object inherits an O_RDWR and an
O_RDONLY fd of it (restore_memory.plan_extras), maps it by injection at the
saved address and offset (MAP_SHARED: one shared object again; MAP_PRIVATE:
its copied-on-write pages are written on top) and closes it.

Seals: F_SEAL_WRITE refuses a writable shared mapping and cannot be added
while one exists, and a read-only MAP_SHARED mapping of an O_RDWR fd counts
as writable (EBUSY): so every seal but F_SEAL_FUTURE_WRITE and F_SEAL_SEAL is
added before the tasks map anything (a write-sealed memfd had no writable
shared mapping).  F_SEAL_FUTURE_WRITE only refuses *new* writable mappings,
which the program may have made before sealing: it is added with F_SEAL_SEAL
after every task's mappings are made (finish()).
"""

from __future__ import annotations

import fcntl
import mmap
import os

from msgspec import UNSET

from statefile.format.integrity import DamagedError, SegmentReader
from statefile.format.records import (DeletedFileObject, Mapping, MemfdObject, RegularFile,
                                      Segment, Shmem, TmpfsFileObject)

from restorer.errors import RestoreError, ValidationError
from restorer.release.guard import journal_path
from restorer.kernel import close_all
from restorer.restore.files import REG_FLAG_MASK

F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8
F_SEAL_FUTURE_WRITE, F_SEAL_EXEC = 0x10, 0x20
MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_NOEXEC_SEAL, MFD_EXEC = 0x1, 0x2, 0x8, 0x10
MFD_HUGETLB, MFD_HUGE_SHIFT = 0x4, 26
LATE_SEALS = F_SEAL_FUTURE_WRITE | F_SEAL_SEAL   # added once every task is mapped
SETFL_MASK = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME | 0o20000  # O_ASYNC
O_TMPFILE = 0o20000000 | os.O_DIRECTORY
O_NOATIME = 0o1000000
SHMEM_ID_BASE = -100000      # synthetic "file ids" of the objects in the inherited fds


def inherited_id(obj: int, rw: bool) -> int:
    """The {file id: fd} key of object obj's O_RDWR (rw) or O_RDONLY fd."""
    return SHMEM_ID_BASE - 2 * obj - (0 if rw else 1)


def extra_key(obj: int, rw: bool) -> str:
    """ExtraOpen key of that fd in a task (restore_memory.plan_extras)."""
    return f"shmem:{obj}:{'rw' if rw else 'ro'}"


def mapped_rw(m: Mapping) -> bool:
    """A mapping is made from the O_RDWR fd when it is shared and may be
    writable (VM_MAYWRITE, "mw"), else from the O_RDONLY one, as before."""
    return m.perms[3] == "s" and "mw" in m.vmflags


def _dev(devstr: str) -> tuple[int, int]:
    maj, mnr = devstr.split(":")
    return int(maj, 16), int(mnr, 16)


def describe(o: Shmem) -> str:
    if isinstance(o, MemfdObject):
        return f"memfd {o.name or ''!r}"
    if isinstance(o, DeletedFileObject):
        return f"deleted shared file {o.path}"
    return f"tmpfs file {o.path}"


def _seals(o: Shmem) -> int:
    """The saved seals of an object (only a memfd has any)."""
    return o.seals if isinstance(o, MemfdObject) else 0


def check(sf, force_files: bool, warnings: list[str]) -> None:
    """Refuse what cannot be recreated here, before anything is created."""
    for o in sf.shmem:
        if o.unsupported:
            raise ValidationError(f"{describe(o)}: {o.unsupported}")
        if isinstance(o, TmpfsFileObject):
            path = o.path
            try:
                s = os.stat(path)
            except FileNotFoundError:
                if o.blob is None:
                    raise ValidationError(f"{path} no longer exists") from None
                warnings.append(f"{path} (tmpfs) is missing here; recreated from the content "
                                "saved in the statefile")
                continue
            if (s.st_ino, (os.major(s.st_dev), os.minor(s.st_dev))) != \
                    (o.ino, _dev(o.dev)):
                if not force_files:
                    raise ValidationError(f"{path} was replaced since the checkpoint (another "
                                          "inode; --force-files restores with it)")
                warnings.append(f"{path} was replaced since the checkpoint; used as it is")
        elif o.blob is None and o.size:
            raise ValidationError(f"{describe(o)} has no saved content")


def _reopen(fd: int, flags: int) -> int:
    """A new description of object fd, O_NOATIME where we may (owner or root)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC | O_NOATIME)
    except PermissionError:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


class SharedObjects:
    """The objects the initiator made: kept open until every task is mapped
    (then the late seals are added), removed on failure."""

    def __init__(self, sf):
        self.sf = sf
        self.fds: dict[int, int] = {}      # object id -> O_RDWR fd in the initiator
        self.created: list[str] = []        # tmpfs paths recreated here

    def create(self) -> dict[int, int]:
        """Make every object, every open file description of it, and the fds
        tasks map it from; returns {file id or inherited_id(): fd}."""
        out: dict[int, int] = {}
        if not self.sf.shmem:
            return out
        rd = SegmentReader(self.sf)
        try:
            for o in self.sf.shmem:
                try:
                    self.fds[o.id] = self._make(o, rd)
                except OSError as e:
                    raise RestoreError("memfds", f"{describe(o)}: {e.strerror or e}") from None
            own: set[int] = set()     # memfds whose memfd_create'd description is taken
            for f in self.sf.files:
                if not isinstance(f, RegularFile) or f.shmem is None:
                    continue
                i = f.shmem
                o = self.sf.shmem[i]
                flags = (f.flags & REG_FLAG_MASK) | os.O_CLOEXEC
                try:
                    if isinstance(o, MemfdObject) and i not in own and \
                            f.flags & os.O_ACCMODE == os.O_RDWR:
                        # The description memfd_create made: unlike an O_RDWR
                        # reopen through /proc it holds no write access that
                        # would make execveat(memfd) fail (ETXTBSY).
                        own.add(i)
                        fd = fcntl.fcntl(self.fds[i], fcntl.F_DUPFD_CLOEXEC, 0)
                        fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & SETFL_MASK)
                    elif isinstance(o, TmpfsFileObject):   # by its path: O_NOFOLLOW as it was
                        fd = os.open(o.path, flags)
                    else:                        # (a /proc/self/fd link is a symlink)
                        fd = os.open(f"/proc/self/fd/{self.fds[i]}", flags & ~os.O_NOFOLLOW)
                    out[f.id] = fd
                    if f.pos:
                        os.lseek(fd, f.pos, os.SEEK_SET)
                except OSError as e:
                    raise RestoreError("memfds", f"{f.path}: {e.strerror or e}") from None
            mapped = {m.shmem for t in self.sf.tasks for m in t.mappings
                      if m.shmem is not None}
            for i in sorted(mapped):
                # O_NOATIME: mapping a file updates its atime (file_accessed),
                # which the restart must leave as it was saved
                out[inherited_id(i, True)] = _reopen(self.fds[i], os.O_RDWR)
                out[inherited_id(i, False)] = _reopen(self.fds[i], os.O_RDONLY)
        except BaseException:
            close_all(out)
            raise
        finally:
            rd.close()
        return out

    def _make(self, o: Shmem, rd: SegmentReader) -> int:
        kind = o.kind
        if isinstance(o, TmpfsFileObject) and os.path.exists(o.path):
            return os.open(o.path, os.O_RDWR | os.O_CLOEXEC)   # its content is current
        mode = o.mode
        if o.hugetlb:
            fd = self._hugetlb(o)
        elif isinstance(o, MemfdObject):
            fd = self._memfd(o)
        elif isinstance(o, DeletedFileObject):
            fd = self._deleted_file(o.path, mode, o.tmpfile)
        else:
            journal_path(o.path)
            fd = os.open(o.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            self.created.append(o.path)
        try:
            if os.geteuid() == 0 and o.uid is not None:
                os.fchown(fd, o.uid, o.gid)   # (before the mode: it clears set-id bits)
            if os.fstat(fd).st_mode & 0o7777 != mode:
                try:
                    os.fchmod(fd, mode)
                except OSError:
                    if kind != "memfd":
                        raise       # (a noexec memfd refuses exec bits: it was one)
            os.ftruncate(fd, o.size)
            if o.blob is not None and o.hugetlb:
                self._map_content(fd, o, self.sf.segment(o.blob), rd)
            elif o.blob is not None:
                self._write_content(fd, self.sf.segment(o.blob), rd)
            if isinstance(o, DeletedFileObject) and o.mtime_ns is not None:
                # a deleted file's times, after its content
                atime = o.mtime_ns if o.atime_ns is UNSET else o.atime_ns
                os.utime(fd, ns=(atime, o.mtime_ns))
            early = _seals(o) & ~LATE_SEALS & ~self._seals(fd)
            if kind == "memfd" and early:
                fcntl.fcntl(fd, F_ADD_SEALS, early)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _seals(fd: int) -> int:
        try:
            return fcntl.fcntl(fd, F_GET_SEALS)
        except OSError:
            return 0

    @staticmethod
    def _memfd(o: MemfdObject) -> int:
        seals, mode = o.seals, o.mode
        flags = MFD_CLOEXEC | MFD_ALLOW_SEALING   # an unsealable one gets F_SEAL_SEAL later
        if seals & F_SEAL_EXEC and not mode & 0o111:
            flags |= MFD_NOEXEC_SEAL
        elif mode & 0o111:
            try:
                return os.memfd_create(o.name, flags | MFD_EXEC)
            except OSError:
                pass        # a kernel without MFD_EXEC: its memfds are executable anyway
        return os.memfd_create(o.name, flags)

    @staticmethod
    def _hugetlb(o: Shmem) -> int:
        """A memfd on hugetlbfs with the saved page size, for a hugetlb memfd,
        MAP_SHARED|MAP_HUGETLB memory or a deleted hugetlbfs file."""
        size = o.hugetlb if o.hugetlb is not True and o.hugetlb > 1 else 2 << 20
        name = (o.name if isinstance(o, MemfdObject) else os.path.basename(o.path)) \
            or "crelf-hugetlb"
        try:
            return os.memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB
                                   | (size.bit_length() - 1) << MFD_HUGE_SHIFT)
        except OSError as e:
            raise RestoreError("memfds", f"cannot create {describe(o)} on hugetlbfs again "
                               f"({e.strerror}: free {size >> 10} kB huge pages are needed, "
                               "/proc/sys/vm/nr_hugepages)") from None

    @staticmethod
    def _map_content(fd: int, o: Shmem, seg: Segment, rd: SegmentReader) -> None:
        """hugetlbfs takes no write(2): the content goes in through a shared
        mapping, each chunk verified first."""
        if not o.size:
            return
        m = mmap.mmap(fd, o.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            for pos, view in rd.pieces(seg):
                m[pos:pos + len(view)] = view
        except DamagedError as e:
            raise RestoreError("verify", f"{e}: not restarted") from None
        finally:
            m.close()

    @staticmethod
    def _deleted_file(path: str, mode: int, tmpfile: bool = False) -> int:
        """A new unlinked file where the deleted one was: an O_TMPFILE file in
        its directory (never named; linkable with linkat only if the old one
        was an O_TMPFILE file too), else a scratch name beside it or in /tmp,
        unlinked at once."""
        base = os.path.basename(path)
        where = os.path.dirname(path) or "/"
        try:
            return os.open(where, O_TMPFILE | os.O_RDWR | os.O_CLOEXEC
                           | (0 if tmpfile else os.O_EXCL), mode)
        except OSError:
            pass    # no such directory now, or a file system without O_TMPFILE
        for where in (where, "/tmp"):
            cand = os.path.join(where, f".{base}.crelf-{os.getpid()}")
            journal_path(cand)
            try:
                fd = os.open(cand, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
            except OSError:
                continue
            os.unlink(cand)
            return fd
        raise RestoreError("memfds", f"cannot recreate deleted shared file {path}: no "
                           "writable directory")

    @staticmethod
    def _write_content(fd: int, seg: Segment, rd: SegmentReader) -> None:
        """The blob's stored runs, at their offsets in the object (holes stay
        holes), each chunk verified before a byte of it is written."""
        try:
            rd.write_into(fd, seg)
        except DamagedError as e:
            raise RestoreError("verify", f"{e}: not restarted") from None

    def finish(self) -> None:
        """Every task has its mappings: add the late seals, close the objects."""
        try:
            for o in self.sf.shmem:
                late = _seals(o) & LATE_SEALS
                fd = self.fds.get(o.id)
                if late and fd is not None:
                    try:
                        fcntl.fcntl(fd, F_ADD_SEALS, late)
                    except OSError as e:
                        raise RestoreError("memfds", f"sealing {describe(o)}: "
                                           f"{e.strerror}") from None
        finally:
            self.close()
        self.created = []

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}

    def remove(self) -> None:
        """A failed restore: close everything, remove the tmpfs files made here."""
        self.close()
        for path in self.created:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.created = []
