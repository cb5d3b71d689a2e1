"""CDBs the initiator sends and the parameter data it decodes (SPC-4, SBC-4), no I/O.

Builders return ``bytes`` ready for a SCSI Command PDU; parsers take the Data-In
bytes.  The per-I/O builders (READ/WRITE 16) use precompiled structs; the rest
are called a few times per session.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum


class Op(IntEnum):
    TEST_UNIT_READY = 0x00
    INQUIRY = 0x12
    MODE_SENSE_10 = 0x5A
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    UNMAP = 0x42
    PERSISTENT_RESERVE_IN = 0x5E
    PERSISTENT_RESERVE_OUT = 0x5F
    READ_16 = 0x88
    COMPARE_AND_WRITE = 0x89
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3


SAI_READ_CAPACITY_16 = 0x10      # SBC-4 §5.16
SAI_GET_LBA_STATUS = 0x12        # SBC-4 §5.6
MI_REPORT_TARGET_PORT_GROUPS = 0x0A  # SPC-4 §6.36

_RW16 = struct.Struct(">BBQIBB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


# ---------------------------------------------------------------------------
# Per-I/O CDBs
# ---------------------------------------------------------------------------

def read16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """SBC-4 §5.13 READ (16)."""
    return _RW16.pack(Op.READ_16, 0x08 if fua else 0, lba, blocks, 0, 0)


def write16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """SBC-4 §5.40 WRITE (16); FUA = the data is on the medium when GOOD comes back."""
    return _RW16.pack(Op.WRITE_16, 0x08 if fua else 0, lba, blocks, 0, 0)


def synchronize_cache16(lba: int = 0, blocks: int = 0) -> bytes:
    """SBC-4 §5.27: 0 blocks = the whole medium."""
    return _RW16.pack(Op.SYNCHRONIZE_CACHE_16, 0, lba, blocks, 0, 0)


def synchronize_cache10() -> bytes:
    return bytes((Op.SYNCHRONIZE_CACHE_10,)) + b"\0" * 9


def write_same16(lba: int, blocks: int, *, unmap: bool = False, anchor: bool = False,
                 ndob: bool = False) -> bytes:
    """SBC-4 §5.50 WRITE SAME (16)."""
    flags = (0x08 if unmap else 0) | (0x10 if anchor else 0) | (0x01 if ndob else 0)
    return _RW16.pack(Op.WRITE_SAME_16, flags, lba, blocks, 0, 0)


def compare_and_write(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    """SBC-4 §5.3 COMPARE AND WRITE: NUMBER OF LOGICAL BLOCKS is one byte (byte 13)."""
    if not 0 < blocks <= 255:
        raise ValueError("COMPARE AND WRITE covers 1..255 blocks")
    return struct.pack(">BBQ3xBBB", Op.COMPARE_AND_WRITE, 0x08 if fua else 0, lba, blocks, 0, 0)


def unmap(param_len: int) -> bytes:
    """SBC-4 §5.32 UNMAP CDB; the ranges go in :func:`unmap_parameters`."""
    return struct.pack(">BB4xBHB", Op.UNMAP, 0, 0, param_len, 0)


def unmap_parameters(ranges: list[tuple[int, int]]) -> bytes:
    """SBC-4 §5.32.2: 8-byte header then one 16-byte descriptor (LBA, count) per range."""
    descs = b"".join(struct.pack(">QI4x", lba, count) for lba, count in ranges)
    return struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs


def get_lba_status(lba: int, alloc_len: int = 4096) -> bytes:
    """SBC-4 §5.6 GET LBA STATUS (SERVICE ACTION IN 16)."""
    return struct.pack(">BBQIBB", Op.SERVICE_ACTION_IN_16, SAI_GET_LBA_STATUS, lba, alloc_len, 0, 0)


def read_capacity16(alloc_len: int = 32) -> bytes:
    return struct.pack(">BBQIBB", Op.SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 0, alloc_len, 0, 0)


def read_capacity10() -> bytes:
    return bytes((Op.READ_CAPACITY_10,)) + b"\0" * 9


# ---------------------------------------------------------------------------
# Inventory and management CDBs
# ---------------------------------------------------------------------------

def test_unit_ready() -> bytes:
    return b"\0" * 6


def inquiry(page: int | None = None, alloc_len: int = 255) -> bytes:
    """SPC-4 §6.6: standard data, or VPD ``page`` (EVPD=1)."""
    if page is None:
        return struct.pack(">BBBHB", Op.INQUIRY, 0, 0, alloc_len, 0)
    return struct.pack(">BBBHB", Op.INQUIRY, 1, page, alloc_len, 0)


def report_luns(alloc_len: int = 16384, select: int = 0) -> bytes:
    """SPC-4 §6.33."""
    return struct.pack(">BxB3xIxx", Op.REPORT_LUNS, select, alloc_len)


def report_target_port_groups(alloc_len: int = 4096) -> bytes:
    """SPC-4 §6.36 REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0Ah)."""
    return struct.pack(">BB4xIxx", Op.MAINTENANCE_IN, MI_REPORT_TARGET_PORT_GROUPS, alloc_len)


def persistent_reserve_in(action: int, alloc_len: int = 8192) -> bytes:
    """SPC-4 §6.15: 0 READ KEYS, 1 READ RESERVATION, 2 REPORT CAPABILITIES, 3 READ FULL STATUS."""
    return struct.pack(">BB5xHx", Op.PERSISTENT_RESERVE_IN, action & 0x1F, alloc_len)


PR_OUT_PARAM_LEN = 24  # SPC-4 §6.16.3: basic parameter list without TransportIDs


def persistent_reserve_out(action: int, scope: int = 0, type: int = 0,
                           param_len: int = PR_OUT_PARAM_LEN) -> bytes:
    """SPC-4 §6.16: action 0 REGISTER, 1 RESERVE, 2 RELEASE, 3 CLEAR, 4 PREEMPT, 5 PREEMPT AND ABORT,
    6 REGISTER AND IGNORE EXISTING KEY."""
    return struct.pack(">BBB2xIx", Op.PERSISTENT_RESERVE_OUT, action & 0x1F,
                       ((scope & 0xF) << 4) | (type & 0xF), param_len)


def pr_out_parameters(key: int = 0, sa_key: int = 0, *, aptpl: bool = False,
                      all_tg_pt: bool = False, spec_i_pt: bool = False) -> bytes:
    flags = (0x01 if aptpl else 0) | (0x04 if all_tg_pt else 0) | (0x08 if spec_i_pt else 0)
    return struct.pack(">QQ4xBx2x", key, sa_key, flags)


def mode_sense10(page: int, subpage: int = 0, alloc_len: int = 4096, dbd: bool = True) -> bytes:
    return struct.pack(">BBBB3xHx", Op.MODE_SENSE_10, 0x08 if dbd else 0, page & 0x3F, subpage, alloc_len)


# ---------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Capacity:
    """READ CAPACITY (16) data, SBC-4 §5.16.2."""

    last_lba: int
    block_size: int
    prot_enable: bool = False
    lbppb_exponent: int = 0     # logical blocks per physical block (2^n)
    lbpme: bool = False          # logical block provisioning management enabled (thin)
    lbprz: bool = False          # unmapped blocks read as zeros
    lowest_aligned_lba: int = 0

    @property
    def blocks(self) -> int:
        return self.last_lba + 1

    @property
    def size(self) -> int:
        return self.blocks * self.block_size


def parse_read_capacity16(data: bytes) -> Capacity:
    if len(data) < 12:
        raise ValueError("READ CAPACITY (16) data shorter than 12 bytes")
    last, bs = struct.unpack_from(">QI", data)
    b12 = data[12] if len(data) > 12 else 0
    b13 = data[13] if len(data) > 13 else 0
    b14 = data[14] if len(data) > 14 else 0
    b15 = data[15] if len(data) > 15 else 0
    return Capacity(last, bs, bool(b12 & 1), b13 & 0x0F, bool(b14 & 0x80), bool(b14 & 0x40),
                    ((b14 & 0x3F) << 8) | b15)


def parse_read_capacity10(data: bytes) -> Capacity:
    if len(data) < 8:
        raise ValueError("READ CAPACITY (10) data shorter than 8 bytes")
    last, bs = struct.unpack_from(">II", data)
    return Capacity(last, bs)


@dataclass(frozen=True)
class Inquiry:
    """Standard INQUIRY data, SPC-4 §6.6.2."""

    peripheral_qualifier: int
    device_type: int
    removable: bool
    version: int
    tpgs: int            # 0 none, 1 implicit ALUA, 2 explicit, 3 both (SPC-4 §6.6.2)
    vendor: str
    product: str
    revision: str
    cmdque: bool
    raw: bytes = field(repr=False, default=b"")


def parse_inquiry(data: bytes) -> Inquiry:
    if len(data) < 36:
        data = bytes(data) + b" " * (36 - len(data))
    txt = lambda b: bytes(b).decode("ascii", "replace").rstrip(" \0")  # noqa: E731
    return Inquiry(data[0] >> 5, data[0] & 0x1F, bool(data[1] & 0x80), data[2], (data[5] >> 4) & 3,
                   txt(data[8:16]), txt(data[16:32]), txt(data[32:36]), bool(data[7] & 0x02),
                   bytes(data))


@dataclass(frozen=True)
class Designator:
    """One VPD 83h identification descriptor (SPC-4 §7.8.6)."""

    code_set: int
    association: int    # 0 LU, 1 target port, 2 target device
    type: int           # 1 T10 vendor, 2 EUI-64, 3 NAA, 4 relative port, 5 TPG, 8 SCSI name
    value: bytes

    @property
    def text(self) -> str:
        if self.code_set in (2, 3):
            return self.value.decode("utf-8", "replace").rstrip("\0 ")
        return self.value.hex()


def parse_vpd83(data: bytes) -> list[Designator]:
    out = []
    end = min(len(data), 4 + _U16.unpack_from(data, 2)[0]) if len(data) >= 4 else 0
    pos = 4
    while pos + 4 <= end:
        code_set = data[pos] & 0x0F
        assoc = (data[pos + 1] >> 4) & 3
        dtype = data[pos + 1] & 0x0F
        length = data[pos + 3]
        out.append(Designator(code_set, assoc, dtype, bytes(data[pos + 4:pos + 4 + length])))
        pos += 4 + length
    return out


def lu_identity(designators: list[Designator]) -> str | None:
    """The LU's preferred identity: NAA (type 3), then EUI-64, SCSI name, T10 vendor id."""
    for wanted in (3, 2, 8, 1):
        for d in designators:
            if d.association == 0 and d.type == wanted:
                return f"{'naa' if wanted == 3 else 'eui' if wanted == 2 else 'name' if wanted == 8 else 't10'}.{d.text}"
    return None


def port_identity(designators: list[Designator]) -> tuple[int | None, int | None]:
    """(relative target port, target port group) from VPD 83h port designators."""
    rel = tpg = None
    for d in designators:
        if d.association == 1 and d.type == 4 and len(d.value) >= 4:
            rel = _U16.unpack_from(d.value, 2)[0]
        elif d.association == 1 and d.type == 5 and len(d.value) >= 4:
            tpg = _U16.unpack_from(d.value, 2)[0]
    return rel, tpg


def parse_vpd_pages(data: bytes) -> list[int]:
    if len(data) < 4:
        return []
    n = _U16.unpack_from(data, 2)[0]
    return list(data[4:4 + n])


def parse_vpd80(data: bytes) -> str:
    n = _U16.unpack_from(data, 2)[0] if len(data) >= 4 else 0
    return bytes(data[4:4 + n]).decode("ascii", "replace").strip(" \0")


@dataclass(frozen=True)
class BlockLimits:
    """VPD B0h, SBC-4 §6.6.4 (0 = no limit reported)."""

    max_compare_and_write: int = 0
    optimal_granularity: int = 0
    max_transfer: int = 0
    optimal_transfer: int = 0
    max_unmap_lba_count: int = 0
    max_unmap_descriptors: int = 0
    unmap_granularity: int = 0
    max_write_same: int = 0


def parse_vpd_b0(data: bytes) -> BlockLimits:
    d = bytes(data) + b"\0" * max(0, 64 - len(data))
    return BlockLimits(d[5], _U16.unpack_from(d, 6)[0], _U32.unpack_from(d, 8)[0], _U32.unpack_from(d, 12)[0],
                       _U32.unpack_from(d, 20)[0], _U32.unpack_from(d, 24)[0], _U32.unpack_from(d, 28)[0],
                       _U64.unpack_from(d, 36)[0])


@dataclass(frozen=True)
class Provisioning:
    """VPD B2h, SBC-4 §6.6.6."""

    lbpu: bool       # UNMAP supported
    lbpws: bool      # WRITE SAME (16) with UNMAP supported
    lbprz: bool
    provisioning_type: int


def parse_vpd_b2(data: bytes) -> Provisioning:
    d = bytes(data) + b"\0" * max(0, 8 - len(data))
    return Provisioning(bool(d[5] & 0x80), bool(d[5] & 0x40), bool(d[5] & 0x04), d[6] & 7)


def parse_report_luns(data: bytes) -> list[int]:
    """SPC-4 §6.33: LUN numbers (peripheral and flat addressing decoded; others as raw 64-bit)."""
    if len(data) < 8:
        return []
    n = _U32.unpack_from(data, 0)[0]
    luns = []
    for pos in range(8, min(len(data), 8 + n) - 7, 8):     # whole 8-byte entries only
        first = _U16.unpack_from(data, pos)[0]
        method = first >> 14
        if method == 0:
            luns.append(first & 0xFF)
        elif method == 1:
            luns.append(first & 0x3FFF)
        else:
            luns.append(_U64.unpack_from(data, pos)[0])
    return luns


@dataclass(frozen=True)
class LbaStatus:
    """One GET LBA STATUS descriptor (SBC-4 §5.6.3): 0 mapped, 1 deallocated, 2 anchored."""

    lba: int
    count: int
    status: int

    @property
    def mapped(self) -> bool:
        return self.status == 0


def parse_lba_status(data: bytes) -> list[LbaStatus]:
    if len(data) < 8:
        return []
    n = _U32.unpack_from(data, 0)[0]
    end = min(len(data), 4 + n)
    out = []
    for pos in range(8, end - 15, 16):
        lba, count = struct.unpack_from(">QI", data, pos)
        out.append(LbaStatus(lba, count, data[pos + 12] & 0x0F))
    return out


class AluaState(IntEnum):
    """SPC-4 §6.36.2 asymmetric access states."""

    ACTIVE_OPTIMIZED = 0x0
    ACTIVE_NON_OPTIMIZED = 0x1
    STANDBY = 0x2
    UNAVAILABLE = 0x3
    LBA_DEPENDENT = 0x4
    OFFLINE = 0xE
    TRANSITIONING = 0xF


@dataclass(frozen=True)
class PortGroup:
    group: int
    state: AluaState
    preferred: bool
    ports: tuple[int, ...]


def parse_report_target_port_groups(data: bytes) -> list[PortGroup]:
    if len(data) < 4:
        return []
    n = _U32.unpack_from(data, 0)[0]
    end = min(len(data), 4 + n)
    pos = 4
    out = []
    while pos + 8 <= end:
        b0 = data[pos]
        group = _U16.unpack_from(data, pos + 2)[0]
        count = data[pos + 7]
        ports = tuple(_U16.unpack_from(data, pos + 8 + 4 * i + 2)[0]
                      for i in range(count) if pos + 8 + 4 * i + 4 <= end)
        try:
            state = AluaState(b0 & 0x0F)
        except ValueError:
            state = AluaState.UNAVAILABLE
        out.append(PortGroup(group, state, bool(b0 & 0x80), ports))
        pos += 8 + 4 * count
    return out


@dataclass(frozen=True)
class Reservation:
    generation: int
    key: int | None = None
    scope: int = 0
    type: int = 0


def _pr_header(data: bytes) -> None:
    if len(data) < 8:
        raise ValueError("PERSISTENT RESERVE IN data shorter than its 8-byte header")


def parse_pr_read_keys(data: bytes) -> tuple[int, list[int]]:
    """(PRgeneration, registered keys), SPC-4 §6.15.2."""
    _pr_header(data)
    gen, n = struct.unpack_from(">II", data)
    keys = [_U64.unpack_from(data, 8 + i)[0] for i in range(0, min(n, len(data) - 8) - 7, 8)]
    return gen, keys


def parse_pr_read_reservation(data: bytes) -> Reservation:
    """SPC-4 §6.15.3."""
    _pr_header(data)
    gen, n = struct.unpack_from(">II", data)
    if n < 16 or len(data) < 24:
        return Reservation(gen)
    key = _U64.unpack_from(data, 8)[0]
    st = data[21]
    return Reservation(gen, key, st >> 4, st & 0x0F)
