"""ELF64 core-file structures for x86-64, declared once as ctypes structures.

Everything here is the Linux/x86-64 ABI that gdb, eu-stack and readelf expect
of a core file; every structure carries a size assertion.  crelf's own notes are
defined in :mod:`statefile.format.notes`.
"""

from __future__ import annotations

import ctypes
import struct

# --- identification -----------------------------------------------------------
ELFMAG = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_CORE = 4
EM_X86_64 = 62
# Marker in the identification padding (bytes 9..15): only crelf statefiles
# carry it, so a binfmt_misc rule can match statefiles and not every core file.
CRELF_IDENT_PAD = b"CRELF\x01\x00"
EI_PAD = 9

PT_NULL = 0
PT_LOAD = 1
PT_NOTE = 4
# Private program header types (PT_LOOS..PT_HIOS range), ignored by gdb,
# eu-stack and readelf.
PT_CRELF_TASKMEM = 0x6C524300  # memory of a task other than the root task
PT_CRELF_BLOB = 0x6C524301     # opaque data (e.g. content of a deleted file)

PF_X = 1
PF_W = 2
PF_R = 4

PN_XNUM = 0xFFFF

# Standard core note types (owner "CORE" unless said otherwise).
NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_PRPSINFO = 3
NT_AUXV = 6
NT_X86_XSTATE = 0x202  # owner "LINUX"
NT_X86_XSAVE_LAYOUT = 0x205  # owner "LINUX": where each XSAVE component is (kernel 6.11+)
NT_SIGINFO = 0x53494749
NT_FILE = 0x46494C45


class Elf64_Ehdr(ctypes.LittleEndianStructure):
    _fields_ = [
        ("e_ident", ctypes.c_ubyte * 16),
        ("e_type", ctypes.c_uint16),
        ("e_machine", ctypes.c_uint16),
        ("e_version", ctypes.c_uint32),
        ("e_entry", ctypes.c_uint64),
        ("e_phoff", ctypes.c_uint64),
        ("e_shoff", ctypes.c_uint64),
        ("e_flags", ctypes.c_uint32),
        ("e_ehsize", ctypes.c_uint16),
        ("e_phentsize", ctypes.c_uint16),
        ("e_phnum", ctypes.c_uint16),
        ("e_shentsize", ctypes.c_uint16),
        ("e_shnum", ctypes.c_uint16),
        ("e_shstrndx", ctypes.c_uint16),
    ]


class Elf64_Phdr(ctypes.LittleEndianStructure):
    _fields_ = [
        ("p_type", ctypes.c_uint32),
        ("p_flags", ctypes.c_uint32),
        ("p_offset", ctypes.c_uint64),
        ("p_vaddr", ctypes.c_uint64),
        ("p_paddr", ctypes.c_uint64),
        ("p_filesz", ctypes.c_uint64),
        ("p_memsz", ctypes.c_uint64),
        ("p_align", ctypes.c_uint64),
    ]


class Elf64_Shdr(ctypes.LittleEndianStructure):
    _fields_ = [
        ("sh_name", ctypes.c_uint32),
        ("sh_type", ctypes.c_uint32),
        ("sh_flags", ctypes.c_uint64),
        ("sh_addr", ctypes.c_uint64),
        ("sh_offset", ctypes.c_uint64),
        ("sh_size", ctypes.c_uint64),
        ("sh_link", ctypes.c_uint32),
        ("sh_info", ctypes.c_uint32),
        ("sh_addralign", ctypes.c_uint64),
        ("sh_entsize", ctypes.c_uint64),
    ]


# Register order of struct user_regs_struct (x86-64).
USER_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
    "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)


class user_regs_struct(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in USER_REGS]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in USER_REGS}


class timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class elf_prstatus(ctypes.Structure):
    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("pr_cursig", ctypes.c_short),
        ("pr_sigpend", ctypes.c_ulong),
        ("pr_sighold", ctypes.c_ulong),
        ("pr_pid", ctypes.c_int),
        ("pr_ppid", ctypes.c_int),
        ("pr_pgrp", ctypes.c_int),
        ("pr_sid", ctypes.c_int),
        ("pr_utime", timeval),
        ("pr_stime", timeval),
        ("pr_cutime", timeval),
        ("pr_cstime", timeval),
        ("pr_reg", user_regs_struct),
        ("pr_fpvalid", ctypes.c_int),
    ]


class elf_prpsinfo(ctypes.Structure):
    _fields_ = [
        ("pr_state", ctypes.c_char),
        ("pr_sname", ctypes.c_char),
        ("pr_zomb", ctypes.c_char),
        ("pr_nice", ctypes.c_char),
        ("pr_flag", ctypes.c_ulong),
        ("pr_uid", ctypes.c_uint),
        ("pr_gid", ctypes.c_uint),
        ("pr_pid", ctypes.c_int),
        ("pr_ppid", ctypes.c_int),
        ("pr_pgrp", ctypes.c_int),
        ("pr_sid", ctypes.c_int),
        ("pr_fname", ctypes.c_char * 16),
        ("pr_psargs", ctypes.c_char * 80),
    ]


class siginfo_t(ctypes.Structure):
    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("_data", ctypes.c_ubyte * 112),
    ]


assert ctypes.sizeof(Elf64_Ehdr) == 64
assert ctypes.sizeof(Elf64_Phdr) == 56
assert ctypes.sizeof(Elf64_Shdr) == 64
assert ctypes.sizeof(user_regs_struct) == 216
assert ctypes.sizeof(elf_prstatus) == 336
assert elf_prstatus.pr_reg.offset == 112 and elf_prstatus.pr_fpvalid.offset == 328
assert ctypes.sizeof(elf_prpsinfo) == 136
assert ctypes.sizeof(siginfo_t) == 128

FXSAVE_SIZE = 512


def pack_note(owner: bytes, n_type: int, desc: bytes) -> bytes:
    """One ELF note: header, owner name and descriptor, each padded to 4 bytes."""
    name = owner + b"\0"
    out = struct.pack("<III", len(name), len(desc), n_type)
    out += name + b"\0" * (-len(name) % 4)
    out += desc + b"\0" * (-len(desc) % 4)
    return out


def make_ident() -> bytes:
    ident = bytearray(16)
    ident[0:4] = ELFMAG
    ident[4] = ELFCLASS64
    ident[5] = ELFDATA2LSB
    ident[6] = EV_CURRENT
    ident[7] = 0  # EI_OSABI stays 0 (SYSV): 9 makes BFD pick its FreeBSD reader
    ident[EI_PAD:16] = CRELF_IDENT_PAD
    return bytes(ident)


def build_headers(phdrs: list[Elf64_Phdr]) -> bytes:
    """ELF header + program header table (+ section 0 for extended numbering)."""
    eh = Elf64_Ehdr()
    eh.e_ident[:] = make_ident()
    eh.e_type = ET_CORE
    eh.e_machine = EM_X86_64
    eh.e_version = EV_CURRENT
    eh.e_phoff = ctypes.sizeof(Elf64_Ehdr)
    eh.e_ehsize = ctypes.sizeof(Elf64_Ehdr)
    eh.e_phentsize = ctypes.sizeof(Elf64_Phdr)
    table = b"".join(bytes(p) for p in phdrs)
    shdr = b""
    if len(phdrs) >= PN_XNUM:
        # Extended numbering: the real count lives in section 0's sh_info.
        eh.e_phnum = PN_XNUM
        eh.e_shoff = eh.e_phoff + len(table)
        eh.e_shentsize = ctypes.sizeof(Elf64_Shdr)
        eh.e_shnum = 1
        sh = Elf64_Shdr()
        sh.sh_info = len(phdrs)
        shdr = bytes(sh)
    else:
        eh.e_phnum = len(phdrs)
    return bytes(eh) + table + shdr


def headers_size(nphdrs: int) -> int:
    size = ctypes.sizeof(Elf64_Ehdr) + nphdrs * ctypes.sizeof(Elf64_Phdr)
    if nphdrs >= PN_XNUM:
        size += ctypes.sizeof(Elf64_Shdr)
    return size


def has_crelf_marker(ident: bytes) -> bool:
    return len(ident) >= 16 and ident[:4] == ELFMAG and ident[EI_PAD:16] == CRELF_IDENT_PAD
