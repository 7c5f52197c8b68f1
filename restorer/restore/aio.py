"""AIO rings (statefile/dump/aio.py), rebuilt by injection in the task:

1. io_setup with a request count that gives a ring of the saved size (the
   kernel rounds up: at least 4 per possible CPU, doubled, plus 2, to whole
   pages);
2. mremap of the new ring onto the saved address (the kernel's aio file
   follows the move: the context id is the saved address again);
3. head and tail brought to their saved places with writes to
   /dev/null (1-byte writes): `head` of them submitted and reaped, then as many more as there
   were unreaped events, submitted and left in the ring;
4. the saved events written over those dummy ones.
"""

from __future__ import annotations

import os
import struct

from statefile.format import records as R
from statefile.dump.aio import EVENT, HEADER

from restorer.errors import RestoreError

IOCB_CMD_PWRITE = 1
O_WRONLY, AT_FDCWD = 1, -100
_IOCB = struct.Struct("<QIIHhIQQqQII")   # struct iocb, 64 bytes


def _ring_pages(nr_events: int, cpus: int, page: int) -> int:
    n = max(nr_events, cpus * 4) * 2 + 2     # (as aio_setup_ring sizes it)
    return -(-(HEADER.size + n * EVENT) // page)


def _possible_cpus() -> int:
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        a, _, b = part.partition("-")
        n += int(b or a) - int(a) + 1
    return n


def restore_ring(inj, m: R.Mapping, scratch: int, page: int) -> None:
    rec = m.aio
    if rec is R.UNSET or rec.unsupported:
        raise RestoreError("aio", f"AIO ring at {m.start:#x}: "
                           f"{rec.unsupported if rec is not R.UNSET else 'no saved state'}")
    size = m.end - m.start
    pages, cpus = size // page, _possible_cpus()
    want = next((n for n in range(1, rec.nr + 2) if _ring_pages(n, cpus, page) == pages), 0)
    if not want:
        raise RestoreError("aio", f"AIO ring at {m.start:#x}: no io_setup size gives "
                           f"{pages} pages here")
    ctx_p, evt_p, iocb_p, iocbpp_p, path_p = (scratch + o for o in (0, 8, 64, 128, 136))
    inj.write(ctx_p, b"\0" * 8)
    inj.check("io_setup", want, ctx_p)
    (ctx,) = struct.unpack("<Q", inj.read(ctx_p, 8))
    if ctx != m.start:
        inj.check("mremap", ctx, size, size, 3, m.start)     # MAYMOVE | FIXED
    ctx = m.start
    nr = struct.unpack("<I", inj.read(ctx + 4, 4))[0]
    if nr != rec.nr:
        raise RestoreError("aio", f"AIO ring at {ctx:#x}: {nr} events here, {rec.nr} saved")
    inj.write(path_p, b"/dev/null\0")
    fd = inj.check("openat", AT_FDCWD, path_p, O_WRONLY, 0)
    try:
        inj.write(iocb_p, _IOCB.pack(0, 0, 0, IOCB_CMD_PWRITE, 0, fd, iocb_p, 1, 0, 0, 0, 0))
        inj.write(iocbpp_p, struct.pack("<Q", iocb_p))
        for _ in range(rec.head):
            inj.check("io_submit", ctx, 1, iocbpp_p)
            inj.check("io_getevents", ctx, 1, 1, evt_p, 0)
        for _ in rec.events:
            inj.check("io_submit", ctx, 1, iocbpp_p)
    finally:
        inj.call("close", fd)
    head, tail = struct.unpack("<II", inj.read(ctx + 8, 8))
    if (head, tail) != (rec.head, rec.tail):
        raise RestoreError("aio", f"AIO ring at {ctx:#x}: head/tail {head}/{tail}, "
                           f"saved {rec.head}/{rec.tail}")
    i = head
    for ev in rec.events:
        inj.write(ctx + HEADER.size + i * EVENT, bytes.fromhex(ev))
        i = (i + 1) % nr
