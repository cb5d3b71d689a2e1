"""SCSI behaviour the conformance suite does not reach: limits the Block Limits page
advertises, and REPORT SUPPORTED OPERATION CODES usage maps against what the dispatcher
really does with each CDB field."""
from __future__ import annotations

import struct

from iscsi.scsi import vpd

from .test_scsi_misc import ready
from .test_scsi_support import inquiry, make_lu, rsoc, rw10, rw16

INVALID_FIELD = (0x5, 0x24, 0x00)


def _max_prefetch(page: bytes) -> int:
    return struct.unpack_from(">I", page, 16)[0]  # Block Limits byte 16: MAXIMUM PREFETCH LENGTH


async def test_prefetch_longer_than_the_advertised_maximum_is_refused():
    # SBC-4 §6.6.4, Table "Transfer limits for commands": a PREFETCH LENGTH beyond MAXIMUM
    # PREFETCH LENGTH is an INVALID FIELD IN CDB pointing at the length field.
    lu = make_lu("ram")
    lu.max_transfer = 64
    ini = await ready(lu)
    limit = _max_prefetch((await ini.ok(inquiry(1, vpd.PAGE_BLOCK_LIMITS))).data)
    assert limit == 64
    await ini.ok(rw10(0x34, 0, limit))
    await ini.ok(rw16(0x90, 0, limit))
    await ini.ok(rw16(0x90, 0, 0))  # 0: to the last LBA, a hint with no length to check
    for cdb, field in ((rw10(0x34, 0, limit + 1), 7), (rw16(0x90, 0, limit + 1), 10)):
        sense = await ini.fails(cdb)
        assert sense.code == INVALID_FIELD
        assert sense.sks is not None and struct.unpack_from(">H", sense.sks, 1)[0] == field


async def test_prefetch_does_not_hint_beyond_the_maximum():
    hinted = []
    lu = make_lu("ram")
    lu.backstore.prefetch = lambda offset, length: hinted.append((offset, length))
    lu.max_transfer = 64
    ini = await ready(lu)
    await ini.fails(rw16(0x90, 0, 65))
    await ini.ok(rw16(0x90, 8, 2))
    assert hinted == [(8 * lu.block_size, 2 * lu.block_size)]


def _usage(data: bytes) -> bytes:
    """CDB USAGE DATA of a one-command REPORT SUPPORTED OPERATION CODES answer."""
    return data[4:4 + struct.unpack_from(">H", data, 2)[0]]


async def _refused(ini, cdb: bytes, data: bytes = b"") -> bool:
    r = await ini.cmd(cdb, data)
    return r.status != 0


# (opcode, CDB length, {byte: bits}) that the device server refuses whatever non-zero value
# they hold: "treated as reserved", so the usage map must show them as zero (SPC-4 §6.35.3).
_REFUSED_FIELDS = (
    (0x56, 10, {1: 0x12, 2: 0xFF, 7: 0xFF, 8: 0xFF}),  # RESERVE(10): third-party reservations
    (0x57, 10, {1: 0x12, 2: 0xFF, 7: 0xFF, 8: 0xFF}),  # RELEASE(10)
    (0x1D, 6, {3: 0xFF, 4: 0xFF}),  # SEND DIAGNOSTIC: no diagnostic pages (parameter list)
    (0x9C, 16, {10: 0xFF, 11: 0xFF}),  # WRITE ATOMIC(16): ATOMIC BOUNDARY (no boundaries)
)


async def test_usage_map_does_not_claim_fields_that_are_always_refused():
    lu = make_lu("ram")
    ini = await ready(lu)
    for op, length, fields in _REFUSED_FIELDS:
        usage = _usage((await ini.ok(rsoc(1, op))).data)
        assert len(usage) == length
        for byte, bits in fields.items():
            assert usage[byte] & bits == 0, f"opcode {op:#04x} byte {byte}: {usage[byte]:#04x}"
    # ... and the device server does refuse them (a non-zero value of each, alone).
    assert await _refused(ini, bytes((0x56, 0x10)) + bytes(8))  # RESERVE(10) 3RDPTY
    assert await _refused(ini, bytes((0x57, 0x02)) + bytes(8))  # RELEASE(10) LONGID
    assert await _refused(ini, bytes((0x1D, 0x04, 0, 0, 4, 0)), bytes(4))  # SEND DIAGNOSTIC plen
    atomic = struct.pack(">BBQHHBB", 0x9C, 0, 0, 1, 1, 0, 0)  # ATOMIC BOUNDARY 1
    assert await _refused(ini, atomic, bytes(lu.block_size))


async def test_usage_map_keeps_the_fields_that_are_acted_on():
    lu = make_lu("ram")
    ini = await ready(lu)
    diag = _usage((await ini.ok(rsoc(1, 0x1D))).data)
    assert diag[1] & 0xE4 == 0xE4  # SELF-TEST CODE and SELFTEST
    atomic = _usage((await ini.ok(rsoc(1, 0x9C))).data)
    assert atomic[1] == 0x18 and atomic[2:10] == b"\xff" * 8 and atomic[12:14] == b"\xff\xff"
