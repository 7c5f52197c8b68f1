"""BPF maps held by fds (anon_inode:bpf-map): their definition and content.

A map is saved from a duplicate of the task's fd (pidfd_getfd):
BPF_OBJ_GET_INFO_BY_FD gives its type, key and value sizes, maximum number
of entries, flags and name; fdinfo says whether it is frozen; every entry is
read with BPF_MAP_GET_NEXT_KEY and BPF_MAP_LOOKUP_ELEM (nothing is changed
in the map).  The `bpf` record (docs/FORMAT.md) keeps the entries as hex.
Restored by restorer/restore/bpf.py: BPF_MAP_CREATE with the same
definition, every entry written back with BPF_MAP_UPDATE_ELEM, then
BPF_MAP_FREEZE if it was frozen.

Only maps whose whole state is their entries are saved: hash, array and LRU
hash maps, not per-CPU ones, not maps of maps, programs, BTF objects or
links (support table: fd:bpf), not maps a program is attached to in a way
the tree cannot see, not maps bound to a device (offloaded, `ifindex`) or
carrying BTF type ids (the BTF object would have to come back first).
"""

from __future__ import annotations

import ctypes
import os

from statefile.control import ptrace as pt

NR_BPF = 321
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM = 0, 1, 2
BPF_MAP_GET_NEXT_KEY, BPF_OBJ_GET_INFO_BY_FD, BPF_MAP_FREEZE = 4, 15, 22
BPF_F_RDONLY, BPF_F_WRONLY = 1 << 3, 1 << 4
MAP_TYPES = {1: "hash", 2: "array", 9: "lru_hash"}   # restorable: entries are the state
OTHER_TYPES = {3: "program array", 4: "perf event array", 5: "per-CPU hash",
               6: "per-CPU array", 10: "per-CPU LRU hash", 12: "array of maps",
               13: "hash of maps", 27: "ring buffer"}
MAX_BYTES = 16 << 20     # keys + values kept inline in the JSON record

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class map_create_attr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16),
                ("map_ifindex", ctypes.c_uint32), ("btf_fd", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("_rest", ctypes.c_uint8 * 64)]


class map_elem_attr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("key", ctypes.c_uint64), ("value", ctypes.c_uint64),   # (or next_key)
                ("flags", ctypes.c_uint64), ("_rest", ctypes.c_uint8 * 96)]


class info_attr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64), ("_rest", ctypes.c_uint8 * 112)]


class bpf_map_info(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
                ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
                ("netns_ino", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
                ("btf_key_type_id", ctypes.c_uint32), ("btf_value_type_id", ctypes.c_uint32),
                ("btf_vmlinux_id", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
                ("_rest", ctypes.c_uint8 * 64)]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    r = _libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def map_info(fd: int) -> bpf_map_info:
    info = bpf_map_info()
    bpf(BPF_OBJ_GET_INFO_BY_FD, info_attr(bpf_fd=fd, info_len=ctypes.sizeof(info),
                                          info=ctypes.addressof(info)))
    return info


def entries(fd: int, key_size: int, value_size: int) -> list[tuple[bytes, bytes]]:
    out = []
    key, nxt = ctypes.create_string_buffer(key_size), ctypes.create_string_buffer(key_size)
    value = ctypes.create_string_buffer(value_size)
    first = True
    while True:
        a = map_elem_attr(map_fd=fd, key=0 if first else ctypes.addressof(key),
                          value=ctypes.addressof(nxt))
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, a)
        except OSError as e:
            if e.errno == 2:      # ENOENT: the last key
                return out
            raise
        first = False
        ctypes.memmove(key, nxt, key_size)
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, map_elem_attr(map_fd=fd, key=ctypes.addressof(key),
                                                   value=ctypes.addressof(value)))
        except OSError as e:
            if e.errno == 2:      # deleted meanwhile (by a BPF program)
                continue
            raise
        out.append((key.raw, value.raw))
        if len(out) * (key_size + value_size) > MAX_BYTES:
            raise OSError(27, f"more than {MAX_BYTES >> 20} MiB of entries")


def parse(pid: int, fd: int, fdinfo: dict[str, str]) -> dict:
    """The `bpf` record of one map fd; `unsupported` says why it cannot be
    restored (then the support table refuses it)."""
    rec: dict = {"frozen": fdinfo.get("frozen", "0").strip() == "1"}
    try:
        dup = pt.dup_fd_of(pid, fd)
    except OSError as e:
        return {**rec, "unsupported": f"cannot be read ({e.strerror})"}
    try:
        info = map_info(dup)
        rec.update(type=info.type, key_size=info.key_size, value_size=info.value_size,
                   max_entries=info.max_entries, map_flags=info.map_flags,
                   name=info.name.decode(errors="replace"), map_extra=info.map_extra)
        why = None
        if info.type not in MAP_TYPES:
            why = (f"a {OTHER_TYPES.get(info.type, f'type {info.type}')} map (only hash, array "
                   "and LRU hash maps are saved)")
        elif info.ifindex:
            why = "it is offloaded to a network device"
        elif info.btf_id or info.btf_key_type_id or info.btf_value_type_id:
            why = "it carries BTF type information"
        elif info.map_flags & BPF_F_WRONLY:
            why = "it is write-only from user space (BPF_F_WRONLY): its entries cannot be read"
        elif info.map_flags & BPF_F_RDONLY:
            why = ("it is read-only from user space (BPF_F_RDONLY): its entries could not be "
                   "written back")
        if why:
            rec["unsupported"] = why
            return rec
        rec["entries"] = [[k.hex(), v.hex()] for k, v in
                          entries(dup, info.key_size, info.value_size)]
    except OSError as e:
        rec["unsupported"] = f"cannot be read ({e.strerror or e})"
    finally:
        os.close(dup)
    return rec
