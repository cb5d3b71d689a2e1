"""CDB layouts: operation codes, service actions and precompiled structs for the fields.

Only what the target core decodes lives here; the structs are compiled once because
READ/WRITE decode one per I/O.
"""
from __future__ import annotations

import struct
from enum import IntEnum


class Op(IntEnum):
    """Operation codes (SPC-4 Annex D.3.1, SBC-4 Table 14)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    FORMAT_UNIT = 0x04
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    RESERVE_6 = 0x16
    RELEASE_6 = 0x17
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    SEND_DIAGNOSTIC = 0x1D
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_AND_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    PRE_FETCH_10 = 0x34
    SYNCHRONIZE_CACHE_10 = 0x35
    READ_DEFECT_DATA_10 = 0x37
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    SANITIZE = 0x48
    LOG_SENSE = 0x4D
    MODE_SELECT_10 = 0x55
    RESERVE_10 = 0x56
    RELEASE_10 = 0x57
    MODE_SENSE_10 = 0x5A
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    EXTENDED_COPY = 0x83
    RECEIVE_COPY_RESULTS = 0x84
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    ORWRITE_16 = 0x8B
    WRITE_AND_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    PRE_FETCH_16 = 0x90
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    WRITE_ATOMIC_16 = 0x9C
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_AND_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF
    READ_DEFECT_DATA_12 = 0xB7


class SaIn16(IntEnum):
    """SERVICE ACTION IN(16) service actions (SBC-4 §5.16, §5.8)."""

    READ_CAPACITY_16 = 0x10
    GET_LBA_STATUS = 0x12


class MaintIn(IntEnum):
    """MAINTENANCE IN service actions (SPC-4 §6.30, §6.35, §6.36)."""

    REPORT_TARGET_PORT_GROUPS = 0x0A
    REPORT_SUPPORTED_OPERATION_CODES = 0x0C
    REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS = 0x0D


class SanitizeSa(IntEnum):
    """SANITIZE service actions (SBC-4 §5.30)."""

    OVERWRITE = 0x01
    BLOCK_ERASE = 0x02
    CRYPTOGRAPHIC_ERASE = 0x03
    EXIT_FAILURE_MODE = 0x1F


def cdb_length(opcode: int) -> int:
    """CDB length from the GROUP CODE, the top three bits of the operation code (SPC-4 §4.2.5.1)."""
    group = opcode >> 5
    if group == 0:
        return 6
    if group in (1, 2):
        return 10
    if group == 4:
        return 16
    if group == 5:
        return 12
    return 0  # groups 3 (variable/reserved), 6 and 7 (vendor specific)


# Precompiled field layouts (big-endian, offsets as in the SBC-4 CDB tables).
# READ(10)/WRITE(10)/VERIFY(10)/WRITE AND VERIFY(10)/PRE-FETCH(10)/SYNC CACHE(10)/WRITE SAME(10):
#   byte 1 flags, bytes 2-5 LBA, byte 6 group, bytes 7-8 length.
RW10 = struct.Struct(">xBIBH")
# READ(12)/WRITE(12)/...: byte 1 flags, 2-5 LBA, 6-9 length.
RW12 = struct.Struct(">xBII")
# READ(16)/WRITE(16)/...: byte 1 flags, 2-9 LBA, 10-13 length, byte 14 group.
RW16 = struct.Struct(">xBQIB")
# READ(6)/WRITE(6): bytes 1-3 hold a 21-bit LBA, byte 4 length (0 means 256).
RW6 = struct.Struct(">xI")  # bytes 1-4 as one word: LBA = (w >> 8) & 0x1FFFFF, length = w & 0xFF
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


def alloc_len_6(cdb: bytes) -> int:
    return cdb[4]


def alloc_len_10(cdb: bytes) -> int:
    """Bytes 7-8 (MODE SENSE(10), LOG SENSE ...)."""
    return (cdb[7] << 8) | cdb[8]


def be16(buf, off: int) -> int:
    return (buf[off] << 8) | buf[off + 1]


def be32(buf, off: int) -> int:
    return U32.unpack_from(buf, off)[0]


def be64(buf, off: int) -> int:
    return U64.unpack_from(buf, off)[0]


def service_action(cdb: bytes) -> int:
    """SERVICE ACTION in byte 1 bits 4:0 (SPC-4 §4.2.5.2)."""
    return cdb[1] & 0x1F


# -- LUN encoding (SAM-5 §4.7) ----------------------------------------------------------

MAX_LUN = 0x3FFF  # 14 bits: the largest LUN the flat space addressing method can carry


def encode_lun(lun: int) -> bytes:
    """8-byte LUN: peripheral device addressing below 256, flat space addressing above (SAM-5 §4.7.7)."""
    if not 0 <= lun <= MAX_LUN:
        raise ValueError(f"LUN {lun} out of range 0..{MAX_LUN}")
    if lun < 256:
        return bytes((0x00, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


def decode_lun(raw: bytes) -> int:
    """Inverse of :func:`encode_lun` for the single-level forms; other forms give -1 (no such LU)."""
    method = raw[0] >> 6
    if method in (0, 1) and not any(raw[2:8]):
        if method == 0 and raw[0] & 0x3F:
            return -1  # peripheral addressing with a bus number: not a LUN of ours
        return ((raw[0] & 0x3F) << 8) | raw[1]
    return -1
