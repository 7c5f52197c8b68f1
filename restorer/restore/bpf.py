"""BPF maps (statefile/dump/bpf.py): created again by the task that holds
them (in child_setup, as root or with CAP_BPF), same type, sizes, maximum
entries, flags and name, every saved entry written back, then frozen if it
was.  Several fds of one map share the one open file description."""

from __future__ import annotations

import ctypes
import os

from msgspec import UNSET

from statefile.dump.bpf import (BPF_MAP_CREATE, BPF_MAP_FREEZE, BPF_MAP_UPDATE_ELEM, bpf,
                                map_create_attr, map_elem_attr)
from statefile.format.records import BpfMapFile

KIND = "anon:bpf-map"


class BpfError(OSError):
    pass


def open_map(f: BpfMapFile) -> int:
    rec = f.bpf
    if rec.entries is UNSET:
        raise BpfError(0, f"BPF map: {rec.unsupported or 'no saved state'}")
    attr = map_create_attr(map_type=rec.type, key_size=rec.key_size,
                           value_size=rec.value_size, max_entries=rec.max_entries,
                           map_flags=rec.map_flags, map_name=(rec.name or "").encode()[:15],
                           map_extra=rec.map_extra)
    try:
        fd = bpf(BPF_MAP_CREATE, attr)
    except OSError as e:
        raise BpfError(e.errno, f"BPF map {rec.name!r}: cannot create it again "
                       f"({e.strerror}; needs root or CAP_BPF)") from None
    try:
        for k, v in rec.entries:
            key, value = bytes.fromhex(k), bytes.fromhex(v)
            kb, vb = ctypes.create_string_buffer(key, len(key)), \
                ctypes.create_string_buffer(value, len(value))
            bpf(BPF_MAP_UPDATE_ELEM, map_elem_attr(map_fd=fd, key=ctypes.addressof(kb),
                                                   value=ctypes.addressof(vb)))
        if rec.frozen:
            bpf(BPF_MAP_FREEZE, map_elem_attr(map_fd=fd))
    except OSError as e:
        os.close(fd)
        raise BpfError(e.errno, f"BPF map {rec.name!r}: cannot fill it again "
                       f"({e.strerror})") from None
    return fd
