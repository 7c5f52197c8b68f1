"""Name the place an instruction pointer is at, from the mapped files (lief).

addr -> mapping of the task -> file offset (addr - start + offset) -> vaddr
through the file's PT_LOADs -> nearest function symbol of .symtab/.dynsym.
Inside [vdso] the image is parsed from the statefile's own copy of it.
"""

from __future__ import annotations

import bisect
import os

from functools import cache

DEBUG_DIR = "/usr/lib/debug"


@cache
def _lief():
    """lief takes most of a second to import: only commands that name symbols pay."""
    import lief

    lief.logging.disable()
    return lief


def _parse(source):
    return _lief().ELF.parse(source)


def _debug_file(binary):
    """The separate debug file of a stripped library, found by build-id as gdb does."""
    lief = _lief()
    note = binary.get(lief.ELF.Note.TYPE.GNU_BUILD_ID)
    if note is None:
        return None
    h = bytes(note.description).hex()
    path = os.path.join(DEBUG_DIR, ".build-id", h[:2], h[2:] + ".debug")
    return _parse(path) if len(h) > 2 and os.path.isfile(path) else None


class _Image:
    """PT_LOADs and sorted function symbols of one ELF image."""

    def __init__(self, binary, debug=None):
        lief = _lief()
        func_types = {lief.ELF.Symbol.TYPE.FUNC, lief.ELF.Symbol.TYPE.GNU_IFUNC}
        self.loads = [(s.file_offset, s.physical_size, s.virtual_address)
                      for s in binary.segments if s.type == lief.ELF.Segment.TYPE.LOAD]
        best: dict[int, tuple] = {}
        symbols = list(binary.symtab_symbols) + list(binary.dynamic_symbols)
        if debug is not None:  # a separate debug file has the full .symtab
            symbols += list(debug.symtab_symbols)
        for s in symbols:
            if s.type not in func_types or not s.value or not s.name:
                continue
            # Several names for one address: prefer the public spelling
            # (clock_nanosleep over __clock_nanosleep), then global, then short.
            key = (s.name.startswith("_"), s.binding != lief.ELF.Symbol.BINDING.GLOBAL,
                   len(s.name), s.name)
            if s.value not in best or key < best[s.value][0]:
                best[s.value] = (key, s.size, s.name)
        self.addrs = sorted(best)
        self.syms = [(best[a][1], best[a][2]) for a in self.addrs]

    def vaddr_of(self, file_off: int) -> int | None:
        for off, size, vaddr in self.loads:
            if off <= file_off < off + size:
                return file_off - off + vaddr
        return None

    def symbol(self, vaddr: int) -> tuple[str, int] | None:
        i = bisect.bisect_right(self.addrs, vaddr) - 1
        if i < 0:
            return None
        size, name = self.syms[i]
        off = vaddr - self.addrs[i]
        if size and off >= size:
            return None
        return name, off


class Symbolizer:
    def __init__(self, sf):
        self.sf = sf
        self._images: dict[tuple, _Image | None] = {}

    def _file_image(self, m) -> tuple[_Image | None, str]:
        path = m.path
        try:
            st = os.stat(path)
        except OSError:
            return None, "file missing"
        if m.inode and st.st_ino != m.inode:
            return None, "file replaced since the checkpoint"
        key = (path, st.st_ino, st.st_mtime_ns)
        if key not in self._images:
            b = _parse(path)
            self._images[key] = _Image(b, _debug_file(b)) if b is not None else None
        img = self._images[key]
        return img, "" if img else "not an ELF file"

    def _vdso_image(self, pid: int, m) -> _Image | None:
        key = ("[vdso]", pid, m.start)
        if key not in self._images:
            data = b""
            with self.sf.open() as f:
                for p in m.segments:
                    seg = self.sf.segment(p)
                    data += self.sf.read_segment(f, seg, 0, seg.memsz)
            b = _parse(list(data)) if data[:4] == b"\x7fELF" else None
            self._images[key] = _Image(b) if b is not None else None
        return self._images[key]

    def locate(self, task, addr: int) -> dict:
        """{"object", "symbol", "offset", "where"} for addr in task's address space."""
        out = {"object": None, "symbol": None, "offset": None, "where": f"{addr:#x}"}
        m = next((m for m in task.mappings if m.start <= addr < m.end), None)
        if m is None:
            out["where"] += " (unmapped)"
            return out
        path = m.path or "[anon]"
        out["object"] = path
        if path == "[vdso]":
            img, why, file_off = self._vdso_image(task.pid, m), "", addr - m.start
        elif path.startswith("/") and not m.deleted:
            img, why = self._file_image(m)
            file_off = addr - m.start + m.offset
        else:
            img, why, file_off = None, "", 0
        found = None
        if img is not None:
            vaddr = img.vaddr_of(file_off)
            found = img.symbol(vaddr) if vaddr is not None else None
        if found:
            out["symbol"], out["offset"] = found
            out["where"] = f"{found[0]}+{found[1]:#x} in {os.path.basename(path)}"
        else:
            out["where"] = f"{addr:#x} in {os.path.basename(path) if path.startswith('/') else path}"
            if why:
                out["where"] += f" ({why})"
        return out
