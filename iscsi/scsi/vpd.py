"""Standard INQUIRY data and the vital product data pages (SPC-4 §6.6, §7.8; SBC-4 §6.6).

Pages: 00h supported pages, 80h unit serial number, 83h device identification,
86h extended INQUIRY data, B0h block limits, B1h block device characteristics,
B2h logical block provisioning (+ 8Fh third-party copy when EXTENDED COPY is present).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .types import ITNexus

# Version descriptors (SPC-4 Table 29): SAM-5, iSCSI (no version claimed), SPC-4, SBC-3.
# libiscsi's iscsi-test-cu only treats a device as SBC-3 capable (READ CAPACITY(16),
# 60-byte Block Limits page ...) when it lists SBC-3 (04C0h).
VERSION_DESCRIPTORS = (0x00A0, 0x0960, 0x0460, 0x04C0)

PAGE_SUPPORTED = 0x00
PAGE_SERIAL = 0x80
PAGE_DEVICE_ID = 0x83
PAGE_EXTENDED_INQUIRY = 0x86
PAGE_THIRD_PARTY_COPY = 0x8F
PAGE_BLOCK_LIMITS = 0xB0
PAGE_BLOCK_DEVICE_CHARACTERISTICS = 0xB1
PAGE_LOGICAL_BLOCK_PROVISIONING = 0xB2

# Designator fields (SPC-4 §7.8.6.1)
CODE_BINARY, CODE_ASCII, CODE_UTF8 = 1, 2, 3
ASSOC_LU, ASSOC_PORT, ASSOC_TARGET = 0, 1, 2
TYPE_T10, TYPE_NAA, TYPE_REL_PORT, TYPE_TPG, TYPE_SCSI_NAME = 1, 3, 4, 5, 8
PROTO_ISCSI = 5


@dataclass(frozen=True)
class Identity:
    """What names one logical unit: unique per LU across the daemon."""

    vendor: str
    product: str
    revision: str
    serial: str
    name: str  # stable unique name (defaults to the serial) the NAA and T10 ids derive from

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.name.encode()).digest()

    def naa(self) -> bytes:
        """NAA 3h "locally assigned" designator (SPC-4 §7.8.6.6.3): 4-bit NAA + 60 bits from the name.

        Locally assigned needs no IEEE company id we do not own, and ESXi accepts it (naa.3...).
        """
        v = int.from_bytes(self.digest[:8], "big") & ((1 << 60) - 1)
        return ((0x3 << 60) | v).to_bytes(8, "big")

    def t10_vendor_specific(self) -> str:
        """Vendor-specific part of the T10 id: first 8 characters unique per LU (ESXi reads only those)."""
        return f"{self.digest.hex()[:8]}-{self.serial}"[:64]


def ascii_field(text: str, width: int) -> bytes:
    """Left-aligned, space padded printable ASCII (SPC-4 §4.3.1)."""
    raw = "".join(ch if 0x20 <= ord(ch) < 0x7F else "_" for ch in text)
    return raw.encode("ascii")[:width].ljust(width, b" ")


def standard_inquiry(ident: Identity, *, removable: bool, tpgs: int, three_pc: bool) -> bytes:
    """Standard INQUIRY data, 96 bytes (SPC-4 §6.6.2)."""
    buf = bytearray(96)
    buf[0] = 0x00  # peripheral qualifier 000b, direct access block device
    buf[1] = 0x80 if removable else 0x00  # RMB
    buf[2] = 0x06  # VERSION: SPC-4
    buf[3] = 0x10 | 0x02  # HISUP, RESPONSE DATA FORMAT 2
    buf[4] = len(buf) - 5  # ADDITIONAL LENGTH
    buf[5] = ((tpgs & 3) << 4) | (0x08 if three_pc else 0)  # TPGS, 3PC
    buf[6] = 0x00
    buf[7] = 0x02  # CMDQUE: task attributes and queueing
    buf[8:16] = ascii_field(ident.vendor, 8)
    buf[16:32] = ascii_field(ident.product, 16)
    buf[32:36] = ascii_field(ident.revision, 4)
    for i, v in enumerate(VERSION_DESCRIPTORS):
        struct.pack_into(">H", buf, 58 + 2 * i, v)
    return bytes(buf)


def unmapped_inquiry() -> bytes:
    """INQUIRY data for a LUN with no logical unit: qualifier 011b, type 1Fh (SPC-4 §6.6.2)."""
    buf = bytearray(36)
    buf[0] = 0x7F
    buf[2] = 0x06
    buf[3] = 0x12
    buf[4] = 31
    return bytes(buf)


def _page(code: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0, code, len(body)) + body


def supported_pages(pages: list[int]) -> bytes:
    return _page(PAGE_SUPPORTED, bytes(sorted(pages)))


def serial_page(ident: Identity) -> bytes:
    return _page(PAGE_SERIAL, ident.serial.encode("ascii", "replace"))


def _designator(code_set: int, assoc: int, dtype: int, value: bytes, *, piv_proto: int | None = None) -> bytes:
    b0 = code_set
    b1 = (assoc << 4) | dtype
    if piv_proto is not None:
        b0 |= piv_proto << 4
        b1 |= 0x80  # PIV: the PROTOCOL IDENTIFIER field is valid
    return bytes((b0, b1, 0, len(value))) + value


def _scsi_name(text: str) -> bytes:
    """SCSI name string: UTF-8, NUL terminated, padded to a multiple of 4 (SPC-4 §7.8.6.11)."""
    raw = text.encode("utf-8") + b"\x00"
    return raw + bytes(-len(raw) % 4)


def device_id_page(ident: Identity, nexus: ITNexus | None) -> bytes:
    """Device Identification (SPC-4 §7.8.6): LU designators, then the target port and target device."""
    body = bytearray()
    body += _designator(CODE_BINARY, ASSOC_LU, TYPE_NAA, ident.naa())
    t10 = ascii_field(ident.vendor, 8) + ident.t10_vendor_specific().encode("ascii", "replace")
    body += _designator(CODE_ASCII, ASSOC_LU, TYPE_T10, t10)
    if nexus is not None:
        body += _designator(
            CODE_BINARY, ASSOC_PORT, TYPE_REL_PORT, struct.pack(">HH", 0, nexus.relative_port_id & 0xFFFF),
            piv_proto=PROTO_ISCSI,
        )
        body += _designator(
            CODE_BINARY, ASSOC_PORT, TYPE_TPG, struct.pack(">HH", 0, nexus.target_port_group & 0xFFFF),
            piv_proto=PROTO_ISCSI,
        )
        if nexus.target_port:
            body += _designator(CODE_UTF8, ASSOC_PORT, TYPE_SCSI_NAME, _scsi_name(nexus.target_port), piv_proto=PROTO_ISCSI)
            body += _designator(CODE_UTF8, ASSOC_TARGET, TYPE_SCSI_NAME, _scsi_name(nexus.target_name), piv_proto=PROTO_ISCSI)
    return _page(PAGE_DEVICE_ID, bytes(body))


def extended_inquiry_page(*, write_cache: bool) -> bytes:
    """Extended INQUIRY Data (SPC-4 §7.8.7): which task attributes and caches exist."""
    body = bytearray(60)
    body[1] = 0x07  # HEADSUP, ORDSUP, SIMPSUP
    body[2] = 0x01 if write_cache else 0x00  # V_SUP: volatile cache
    return _page(PAGE_EXTENDED_INQUIRY, bytes(body))


@dataclass(frozen=True)
class BlockLimits:
    max_compare_and_write: int
    optimal_granularity: int
    max_transfer: int
    optimal_transfer: int
    max_prefetch: int
    max_unmap_lba_count: int
    max_unmap_descriptors: int
    unmap_granularity: int
    max_write_same: int
    max_atomic_transfer: int


def block_limits_page(bl: BlockLimits) -> bytes:
    """Block Limits (SBC-4 §6.6.4), 3Ch bytes of page data as SBC-3 and later."""
    body = struct.pack(
        ">BBHIIIIIII QIIIII",
        0x00,  # WSNZ=0: WRITE SAME with 0 blocks means "to the last LBA"
        bl.max_compare_and_write,
        bl.optimal_granularity,
        bl.max_transfer,
        bl.optimal_transfer,
        bl.max_prefetch,
        bl.max_unmap_lba_count,
        bl.max_unmap_descriptors,
        bl.unmap_granularity,
        0x80000000,  # UGAVALID=1, UNMAP GRANULARITY ALIGNMENT 0
        bl.max_write_same,
        bl.max_atomic_transfer,
        0,  # ATOMIC ALIGNMENT: any
        0,  # ATOMIC TRANSFER LENGTH GRANULARITY: any
        0,  # MAXIMUM ATOMIC TRANSFER LENGTH WITH ATOMIC BOUNDARY
        0,  # MAXIMUM ATOMIC BOUNDARY SIZE
    )
    assert len(body) == 0x3C
    return _page(PAGE_BLOCK_LIMITS, body)


def block_device_characteristics_page(*, sanitize: bool) -> bytes:
    """Block Device Characteristics (SBC-4 §6.6.2): non-rotating medium.

    VBULS=1: a VERIFY with BYTCHK=01b/11b over deallocated LBAs compares their data (the
    zeroes a READ returns) like any other; with VBULS=0 SBC-4 §5.38 would require it to end
    in MISCOMPARE, MISCOMPARE VERIFY OF UNMAPPED LBA (1Dh/01h), which sbc.py never reports.
    """
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, 0x0001)  # MEDIUM ROTATION RATE: non-rotating (solid state)
    if sanitize:
        body[3] = 0x50  # WABEREQ=01b, WACEREQ=01b: reads after erase succeed (return zeroes)
    body[4] = 0x01  # byte 8: VBULS
    return _page(PAGE_BLOCK_DEVICE_CHARACTERISTICS, bytes(body))


def logical_block_provisioning_page(*, thin: bool, lbprz: bool = True) -> bytes:
    """Logical Block Provisioning (SBC-4 §6.6.6): thin, UNMAP and WRITE SAME unmap, zeroes after unmap.

    LBPRZ must say what READ CAPACITY(16) says (SBC-4 §5.20 and §6.6.6 describe the same property).
    """
    body = bytearray(4)
    if thin:
        body[1] = 0x80 | 0x40 | 0x20 | (0x04 if lbprz else 0)  # LBPU, LBPWS, LBPWS10, LBPRZ=001b
        body[2] = 0x02  # PROVISIONING TYPE: thin
    return _page(PAGE_LOGICAL_BLOCK_PROVISIONING, bytes(body))
