"""CRC-32 (IEEE, the one zlib computes) for segments and notes.

zlib-ng computes the same value as zlib.crc32 about ten times faster; without
it the standard library's zlib is used, so statefiles stay interchangeable.
"""

try:
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a declared dependency
    from zlib import crc32

__all__ = ["crc32"]
