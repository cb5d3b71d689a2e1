"""CRC32C (Castagnoli) for iSCSI header and data digests (RFC 7143 §12.1, Appendix B).

Three implementations, the first that is present and passes a cross-check is bound:

* ``fastcrc`` (Rust): folds with carry-less multiplication (PCLMULQDQ, and VPCLMULQDQ on
  AVX-512 parts), about 4x the CRC instruction's speed on large segments here (128 KiB:
  2.0 vs 7.7 µs) and a little faster on a 48-byte header (0.18 vs 0.24 µs);
* ``crc32c`` (ICRAR, C): the SSE4.2 / ARMv8 CRC instruction, three streams interleaved;
* crcmod's table-driven CRC, slow and obviously correct: the reference the others are
  checked against at import and in the tests.

Both native ones take any buffer (memoryview slices included), so data segments are
digested where they lie.  Where both are installed, a short timing at import keeps the
faster one on this CPU: fastcrc without carry-less multiply falls back to tables, slower
than the CRC instruction.
"""
from __future__ import annotations

import os
import struct
import time
from typing import Callable

import crcmod.predefined

_reference = crcmod.predefined.mkCrcFun("crc-32c")

#: RFC 3720 Appendix B.4 gives 0xE3069283 as the CRC32C of "123456789".
_CHECK = (b"123456789", 0xE3069283)
#: Bytes timed at import to choose between two native implementations (a data segment's size).
_CALIBRATION_BYTES = 64 * 1024

_DIGEST = struct.Struct("<I")  # RFC 7143 §12.1: the digest is sent least significant byte first


def crc32c_reference(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The slow, obviously-correct CRC32C (crcmod); ``crc`` continues an earlier one."""
    return _reference(bytes(data), crc)


def _agrees(fn: Callable[..., int]) -> bool:
    """Known answer, a continued CRC and an unaligned view, each against the reference."""
    sample = bytearray(os.urandom(1031))
    view = memoryview(sample)[3:]
    try:
        return (fn(_CHECK[0]) == _CHECK[1]
                and fn(view) == _reference(bytes(view))
                and fn(view[500:], fn(view[:500])) == _reference(bytes(view)))
    except Exception:  # pragma: no cover - a broken build is simply not used
        return False


def _native() -> dict[str, Callable[..., int]]:
    """The native implementations installed here that agree with the reference."""
    found: dict[str, Callable[..., int]] = {}
    try:
        from fastcrc import crc32 as _fastcrc
        found["fastcrc"] = _fastcrc.iscsi        # iscsi(data, initial=None): the C-level function
    except ImportError:
        pass
    try:
        import crc32c as _icrar
        if _icrar.hardware_based:                # its software fallback is slower than crcmod's C
            found["crc32c"] = _icrar.crc32c
    except ImportError:
        pass
    return {name: fn for name, fn in found.items() if _agrees(fn)}


def _fastest(candidates: dict[str, Callable[..., int]]) -> tuple[str, Callable[..., int]] | None:
    if not candidates:
        return None
    if len(candidates) == 1:
        return next(iter(candidates.items()))
    sample = bytes(_CALIBRATION_BYTES)

    def cost(fn: Callable[..., int]) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            fn(sample)
            best = min(best, time.perf_counter() - t0)
        return best

    name = min(candidates, key=lambda n: cost(candidates[n]))
    return name, candidates[name]


_chosen = _fastest(_native())
#: Which implementation ``crc32c`` is: "fastcrc", "crc32c" or "reference" (logged at start-up).
IMPLEMENTATION: str = _chosen[0] if _chosen else "reference"
#: True when a native (hardware-assisted) implementation is bound, not the table fallback.
HARDWARE: bool = _chosen is not None

#: ``crc32c(data[, crc])``: CRC32C of ``data``, continuing ``crc`` when given.  Bound straight to
#: the native function: on the per-PDU paths a Python wrapper frame costs as much as the CRC
#: of a 48-byte header.
crc32c: Callable[..., int] = _chosen[1] if _chosen else crc32c_reference
#: The 4 digest bytes for a CRC (RFC 7143 §12.1: least significant byte first).
pack_digest = _DIGEST.pack
#: The CRC32C of any bytes followed by their own digest (the CRC's residue).  A digest is
#: checked with one call over the bytes *and* the digest, ``crc32c(b) == RESIDUE``: the last
#: four bytes map one-to-one onto the result, so this holds exactly when the digest is right,
#: and it saves unpacking the digest (a third of a header check's cost).  Both the target's
#: reader (framing.py) and the initiator's receive paths check digests this way.
RESIDUE = 0x48674BC7
#: ``unpack_digest_from(buffer, offset)[0]`` reads a digest in place.
unpack_digest_from = _DIGEST.unpack_from


def crc32c_extend(crc: int, data: bytes | bytearray | memoryview) -> int:
    """Continue a CRC32C over more bytes (the padding after a data segment)."""
    return crc32c(data, crc)


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The 4 bytes that follow a header or data segment on the wire."""
    return _DIGEST.pack(crc32c(data))


def unpack_digest(raw: bytes | memoryview) -> int:
    return _DIGEST.unpack(raw)[0]
