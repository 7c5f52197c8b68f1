"""CRC-32 (IEEE, the one zlib computes) for segments and notes.

zlib-ng computes the same value as zlib.crc32 about ten times faster; without
it the standard library's zlib is used, so statefiles stay interchangeable.
"""

try:
    from zlib_ng.zlib_ng import crc32, crc32_combine
except ImportError:  # pragma: no cover - zlib-ng is a declared dependency
    from zlib import crc32

    def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
        """CRC of A+B from crc(A), crc(B) and len(B): CRC-32 is affine, so
        crc(A+B) = crc(A+zeros) ^ crc(B) ^ crc(zeros)."""
        zeros = b"\0" * len2
        return crc32(zeros, crc1) ^ crc2 ^ crc32(zeros)


__all__ = ["crc32", "crc32_combine"]
