"""Helpers shared by the SCSI core tests: CDB builders, an in-process "initiator", sense parsing.

No network: commands go straight to LunMap.execute / LogicalUnit.execute.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from iscsi.backstore.file import FileBackstore
from iscsi.backstore.ram import RamBackstore
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.types import ITNexus, ScsiCommand, ScsiResult, Status, TaskAttr

GOOD = Status.GOOD
CHECK = Status.CHECK_CONDITION

NEXUS_A = ITNexus("iqn.2026-01.org.example:a,i,0x000000000001", "iqn.2026-01.org.example:t,t,0x0001", 1, 1)
NEXUS_B = ITNexus("iqn.2026-01.org.example:b,i,0x000000000002", "iqn.2026-01.org.example:t,t,0x0002", 2, 2)


@dataclass
class Sense:
    key: int
    asc: int
    ascq: int
    info: int | None
    sks: bytes | None
    descriptor: bool

    @property
    def code(self) -> tuple[int, int, int]:
        return (self.key, self.asc, self.ascq)


def parse_sense(raw: bytes) -> Sense:
    code = raw[0] & 0x7F
    if code in (0x72, 0x73):
        key, asc, ascq = raw[1] & 0xF, raw[2], raw[3]
        info = sks = None
        pos = 8
        while pos < 8 + raw[7]:
            dtype, dlen = raw[pos], raw[pos + 1]
            if dtype == 0x00:
                info = struct.unpack_from(">Q", raw, pos + 4)[0]
            elif dtype == 0x02:
                sks = raw[pos + 4: pos + 7]
            pos += 2 + dlen
        return Sense(key, asc, ascq, info, sks, True)
    assert code in (0x70, 0x71), f"bad sense response code {raw[0]:#x}"
    info = struct.unpack_from(">I", raw, 3)[0] if raw[0] & 0x80 else None
    sks = raw[15:18] if raw[15] & 0x80 else None
    return Sense(raw[2] & 0xF, raw[12], raw[13], info, sks, False)


def make_backstore(kind: str, tmp_path, size: int = 8 << 20, block_size: int = 512):
    if kind == "ram":
        return RamBackstore(size, block_size)
    return FileBackstore(tmp_path / f"lu-{block_size}.img", size=size, block_size=block_size)


def make_lu(kind: str = "ram", tmp_path=None, size: int = 8 << 20, block_size: int = 512, **kw) -> LogicalUnit:
    kw.setdefault("serial", f"ser-{kind}-{block_size}")
    return LogicalUnit(make_backstore(kind, tmp_path, size, block_size), **kw)


class Initiator:
    """Sends CDBs to a LunMap (or one LU) on behalf of one I_T nexus."""

    def __init__(self, target, nexus: ITNexus = NEXUS_A, lun: int = 0) -> None:
        self.target = target
        self.nexus = nexus
        self.lun = lun

    async def cmd(self, cdb, data=b"", *, attr=TaskAttr.SIMPLE, expected: int | None = None) -> ScsiResult:
        raw = bytes(cdb)
        if expected is None:
            expected = len(data)
        return await self.target.execute(
            ScsiCommand(raw.ljust(16, b"\x00"), self.lun, self.nexus, data, expected, attr)
        )

    async def ok(self, cdb, data=b"", **kw) -> ScsiResult:
        r = await self.cmd(cdb, data, **kw)
        assert r.status == GOOD, f"expected GOOD, got {r.status} {parse_sense(r.sense) if r.sense else ''}"
        return r

    async def fails(self, cdb, data=b"", **kw) -> Sense:
        r = await self.cmd(cdb, data, **kw)
        assert r.status == CHECK, f"expected CHECK CONDITION, got {r.status}"
        return parse_sense(r.sense)

    async def clear_ua(self) -> int:
        """TEST UNIT READY until GOOD (bounded); returns how many unit attentions were seen."""
        for n in range(20):
            r = await self.cmd(tur())
            if r.status == GOOD:
                return n
            assert parse_sense(r.sense).key == 0x6
        raise AssertionError("unit attentions never cleared")


# -- CDB builders -------------------------------------------------------------------------

def tur() -> bytes:
    return bytes(6)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return bytes((0x12, evpd, page)) + struct.pack(">H", alloc) + b"\x00"


def request_sense(desc: int = 0, alloc: int = 252) -> bytes:
    return bytes((0x03, desc, 0, 0, alloc, 0))


def read6(lba: int, n: int) -> bytes:
    return bytes((0x08, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, 0))


def write6(lba: int, n: int) -> bytes:
    return bytes((0x0A, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, 0))


def rw10(op: int, lba: int, n: int, flags: int = 0, control: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, 0, n, control)


def rw12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, flags, lba & 0xFFFFFFFF, n, 0, 0)


def rw16(op: int, lba: int, n: int, flags: int = 0, control: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba & 0xFFFFFFFFFFFFFFFF, n, 0, control)


def read10(lba, n, flags=0):
    return rw10(0x28, lba, n, flags)


def write10(lba, n, flags=0):
    return rw10(0x2A, lba, n, flags)


def read16(lba, n, flags=0):
    return rw16(0x88, lba, n, flags)


def write16(lba, n, flags=0):
    return rw16(0x8A, lba, n, flags)


def read_capacity16(alloc: int = 32) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def get_lba_status(lba: int, alloc: int = 24) -> bytes:
    return struct.pack(">BBQIBB", 0x9E, 0x12, lba, alloc, 0, 0)


def mode_sense6(page: int = 0x3F, pc: int = 0, dbd: int = 0, alloc: int = 255, subpage: int = 0) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc, 0))


def mode_sense10(page: int = 0x3F, pc: int = 0, dbd: int = 0, llbaa: int = 0, alloc: int = 1024) -> bytes:
    return bytes((0x5A, (0x08 if dbd else 0) | (0x10 if llbaa else 0), (pc << 6) | page, 0, 0, 0, 0)) + \
        struct.pack(">HB", alloc, 0)


def mode_select6(plen: int, pf: int = 1, sp: int = 0) -> bytes:
    return bytes((0x15, (0x10 if pf else 0) | (1 if sp else 0), 0, 0, plen, 0))


def compare_and_write(lba: int, n: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQBBBBBB", 0x89, flags, lba, 0, 0, 0, n, 0, 0)


def write_same10(lba: int, n: int, flags: int = 0) -> bytes:
    return rw10(0x41, lba, n, flags)


def write_same16(lba: int, n: int, flags: int = 0) -> bytes:
    return rw16(0x93, lba, n, flags)


def unmap_cdb(plen: int, anchor: int = 0) -> bytes:
    return bytes((0x42, anchor, 0, 0, 0, 0, 0)) + struct.pack(">HB", plen, 0)


def unmap_params(ranges) -> bytes:
    body = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def rsoc(option: int = 0, opcode: int = 0, sa: int = 0, rctd: int = 0, alloc: int = 65535) -> bytes:
    return struct.pack(">BBBBHIBB", 0xA3, 0x0C, (0x80 if rctd else 0) | option, opcode, sa, alloc, 0, 0)


def report_luns(alloc: int = 4096, select: int = 0) -> bytes:
    return struct.pack(">BBB3xIBB", 0xA0, 0, select, alloc, 0, 0)


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(params=["ram", "file"])
def kind(request):
    return request.param
