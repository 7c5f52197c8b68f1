"""The XSAVE area's layout, and the NT_X86_XSTATE note gdb can read.

PTRACE_GETREGSET(NT_X86_XSTATE) gives a thread's extended state in the
standard (non-compacted) XSAVE format, each state component at the offset
CPUID leaf 0xD gives for it on this CPU.  On Intel CPUs those offsets are the
ones the SDM lists and gdb assumes; AMD CPUs without AVX-512 put PKRU at 2432
instead of 2688.  gdb 13 reads a core's xstate with the Intel offsets only:
given the kernel's 2440-byte area it says "Section `.reg-xstate/N' in core
file too small" and shows the ymm upper halves and pkru as unavailable (the
kernel's own core dumps have the same problem; gcore writes its own layout).

So the gdb view of every thread (statefile/format/notes.py standard_notes) is the
area moved to the Intel offsets, followed by an NT_X86_XSAVE_LAYOUT note that
says so, as the kernel (6.11+) writes one describing its own area.  The raw
area, in the CPU's layout, stays in CR_THREAD_REGS: it is what the restorer
hands back to PTRACE_SETREGSET, so the layout is recorded in CR_HEADER
(`xsave_layout`) and a restart on a CPU that lays the area out differently is
refused (restorer/validate.py).

The offsets come from CPUID leaf 0xD, read through the kernel's cpuid driver
(/dev/cpu/0/cpuid: root only).  Python cannot execute CPUID itself; where the
device cannot be read the layout is unknown, the gdb view is the kernel's
area unchanged (as in a kernel core dump) and the header says null.
"""

from __future__ import annotations

import os
import struct

LEGACY = 576          # fxsave area (512) + XSAVE header (64): the same on every CPU
XCR0_AT = 464         # the kernel stores XCR0 in the fxsave area's sw_reserved bytes

# state component -> (offset, size) in the Intel layout gdb 13 assumes
# (gdb/gdbsupport x86-xstate.h; AMX as the SDM lists it)
INTEL = {2: (576, 256),                       # AVX: ymm upper halves
         3: (960, 64), 4: (1024, 64),         # MPX bound registers, BNDCFGU/BNDSTATUS
         5: (1088, 64), 6: (1152, 512), 7: (1664, 1024),   # AVX-512: k, zmm_hi256, hi16_zmm
         9: (2688, 8),                        # PKRU
         17: (2752, 64), 18: (2816, 8192)}    # AMX: XTILECFG, XTILEDATA

_COMPONENT = struct.Struct("<IIII")           # struct x86_xfeat_component: type, size, offset, flags


def xcr0_of(area: bytes) -> int:
    return struct.unpack_from("<Q", area, XCR0_AT)[0] if len(area) >= XCR0_AT + 8 else 0


def _components(xcr0: int):
    return [i for i in range(2, 64) if xcr0 >> i & 1]


def host_layout(xcr0: int, cpuid_dev: str = "/dev/cpu/0/cpuid") -> dict[str, list[int]] | None:
    """{"component": [offset, size]} (the CR_HEADER form: JSON keys are
    strings) for every extended component in xcr0, from CPUID leaf 0xD
    sub-leaf i (EAX size, EBX offset); None if xcr0 has none or the cpuid
    device cannot be read (not root, or no cpuid driver)."""
    if not _components(xcr0):
        return None
    try:
        fd = os.open(cpuid_dev, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        out = {}
        for i in _components(xcr0):
            eax, ebx, _, _ = struct.unpack("<4I", os.pread(fd, 16, 0xD | i << 32))
            out[str(i)] = [ebx, eax]
        return out
    except OSError:
        return None
    finally:
        os.close(fd)


def header_layout(areas) -> dict[str, list[int]] | None:
    """The layout of the areas dumped on this host, for CR_HEADER; None when
    no thread has an area or CPUID cannot be read."""
    xcr0 = 0
    for a in areas:
        xcr0 |= xcr0_of(a)
    return host_layout(xcr0)


def _decode(layout: dict | None) -> dict[int, tuple[int, int]] | None:
    return None if layout is None else {int(k): (v[0], v[1]) for k, v in layout.items()}


def gdb_view(area: bytes, layout: dict | None) -> tuple[bytes, bytes | None]:
    """(NT_X86_XSTATE desc, NT_X86_XSAVE_LAYOUT desc or None) for one thread.

    With a known layout: the components gdb knows at their Intel offsets (the
    others, AMX, where the Intel layout puts them too), sized as gdb sizes
    it, and a layout note saying where each one is.  Unknown layout: the area
    as the kernel gave it, no layout note."""
    src = _decode(layout)
    xcr0 = xcr0_of(area)
    if not area or src is None or xcr0 == 0:
        return area, None
    comps = [i for i in _components(xcr0) if i in src]
    dst = {i: INTEL.get(i, src[i]) for i in comps}
    size = max([LEGACY] + [o + s for o, s in dst.values()])
    out = bytearray(size)
    out[:LEGACY] = area[:LEGACY]
    for i in comps:
        so, ss = src[i]
        do, ds = dst[i]
        n = min(ss, ds, max(0, len(area) - so))
        out[do:do + n] = area[so:so + n]
    note = b"".join(_COMPONENT.pack(i, dst[i][1], dst[i][0], 0) for i in comps)
    return bytes(out), note


def restart_problem(saved: dict | None) -> str | None:
    """Why the areas saved with layout `saved` (CR_HEADER xsave_layout)
    cannot be handed to this CPU's PTRACE_SETREGSET: a component this CPU
    places elsewhere, or lacks.  None if the layouts agree or either is
    unknown."""
    a = _decode(saved)
    b = _decode(host_layout(sum(1 << i for i in a))) if a else None
    if b is None:
        return None
    for i, (off, size) in sorted(a.items()):
        there = b.get(i, (0, 0))
        if there == (0, 0):
            return f"XSAVE component {i} of the statefile does not exist on this CPU"
        if there != (off, size):
            return (f"XSAVE component {i} is at offset {off} ({size} bytes) in the statefile, "
                    f"at {there[0]} ({there[1]} bytes) on this CPU")
    return None
