"""AIO rings (io_setup): the `[aio]` mapping of a task's AIO context.

The context's id is the address of its ring, a page-aligned mapping of the
kernel's aio file (`/[aio] (deleted)`).  The ring starts with a header
(struct aio_ring: id, nr, head, tail, magic, compat_features,
incompat_features, header_length; 32 bytes) followed by `nr` io_events of 32
bytes (data, obj, res, res2).  Events between head and tail are completed and
not yet reaped.  The `aio` record of the mapping keeps nr, head, tail and
those events (hex); nothing else of the ring is stored.

Restored by restorer/restore/aio.py: io_setup makes a ring of the same size,
mremap moves it to the saved address (the kernel follows: the context's id is
the address again), requests on /dev/null bring head and tail to their
saved positions, and the saved events are written over the dummy ones.
Requests still in flight at the checkpoint (submitted, not completed) are not
visible anywhere (the kernel has no list of them): they are not restored.
"""

from __future__ import annotations

import struct

AIO_PATH = "/[aio] (deleted)"
HEADER = struct.Struct("<8I")
EVENT = 32
AIO_RING_MAGIC = 0xA10A10A1


def is_aio(m: dict) -> bool:
    return m["path"] == AIO_PATH


def parse(pid: int, m: dict) -> dict:
    """The `aio` record of an [aio] mapping (read from /proc/PID/mem)."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(m["start"])
        head = f.read(HEADER.size)
        _id, nr, h, t, magic, _compat, _incompat, hlen = HEADER.unpack(head)
        rec = {"nr": nr, "head": h, "tail": t}
        if magic != AIO_RING_MAGIC or not nr or h >= nr or t >= nr or \
                hlen != HEADER.size or HEADER.size + nr * EVENT > m["end"] - m["start"]:
            rec["unsupported"] = "its ring header is not one crelf knows"
            return rec
        events = []
        i = h
        while i != t:
            f.seek(m["start"] + HEADER.size + i * EVENT)
            events.append(f.read(EVENT).hex())
            i = (i + 1) % nr
        rec["events"] = events
    return rec
