"""LOG SENSE (SPC-4 §6.6 LOG SENSE, §7.3 log parameters): what a logical unit logs.

The pages an admin's tools ask a virtual disk for:

* Supported Log Pages (00h) and Supported Log Pages and Subpages (00h/FFh), SPC-4 §7.3.18/§7.3.19;
* Logical Block Provisioning (0Ch, SBC-4 §6.4.5), thin LUs only: how much of the LU is
  mapped (blocks the image really occupies) and how much the filesystem under it can still
  map.  ``sg_logs -p 0xc`` shows it; Windows reads it for thin-provisioning resource
  counts (IOCTL_STORAGE_GET_LB_PROVISIONING_MAP_RESOURCES);
* Informational Exceptions (2Fh, SPC-4 §7.3.8): no failure predicted — the page a health
  check (``smartctl -H``) reads, consistent with the Informational Exceptions Control mode page.

Nothing is saved: LOG SELECT is not supported, SP=1 is refused, and every parameter says so
with TSD (target save disable).  Counters that could be reset do not exist here.
"""
from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Callable

from . import sense as S
from .cdb import be16
from .types import ScsiCommand, ScsiResult

if TYPE_CHECKING:
    from .lu import LogicalUnit

PAGE_SUPPORTED = 0x00
PAGE_LOGICAL_BLOCK_PROVISIONING = 0x0C
PAGE_INFORMATIONAL_EXCEPTIONS = 0x2F
SUBPAGE_ALL = 0xFF

# Parameter control byte (SPC-4 §7.3.2.2.2): TSD (bit 5) — the target does not save this
# parameter; FORMAT AND LINKING 11b — a binary format list parameter.
_CONTROL_BINARY_LIST = 0x20 | 0x03
# Scope of a resource count (SBC-4 Table "SCOPE field"): 10b — the resources may be used by
# other logical units too (the images of several LUs can share one filesystem).
_SCOPE_SHARED = 0x02
_RESOURCE_COUNT_MAX = 0xFFFFFFFF  # a 4-byte field; THRESHOLD EXPONENT 0 counts single LBAs
# SPC-4 §7.3.8.2: FFh in MOST RECENT TEMPERATURE READING — no valid reading (a virtual disk).
_NO_TEMPERATURE = 0xFF

Parameters = list[tuple[int, bytes]]  # (parameter code, control byte + length + value)


def _param(code: int, value: bytes, control: int = _CONTROL_BINARY_LIST) -> tuple[int, bytes]:
    return code, struct.pack(">HBB", code, control, len(value)) + value


def _resource_count(code: int, blocks: int) -> tuple[int, bytes]:
    """An LBA mapping resource count parameter (SBC-4 §6.4.5.2/§6.4.5.3): 4-byte count, SCOPE."""
    count = max(0, min(blocks, _RESOURCE_COUNT_MAX))
    return _param(code, struct.pack(">IB3x", count, _SCOPE_SHARED))


def _reports_provisioning(lu: "LogicalUnit") -> bool:
    backstore = lu.backstore
    return lu.thin and callable(getattr(backstore, "allocated_bytes", None)) and hasattr(backstore, "fileno")


def _provisioning(lu: "LogicalUnit") -> Parameters:
    """Logical Block Provisioning parameters: used = blocks the image occupies; available =
    what its filesystem can still give, never more than the LU has left to map.

    A write error kept for later (a gathered write that failed) surfaces here as it would in
    any command: as a deferred error, not as a page."""
    backstore = lu.backstore
    bs = lu.block_size
    used = backstore.allocated_bytes() // bs
    params = []
    try:
        fs = os.fstatvfs(backstore.fileno)
    except OSError:
        fs = None  # the available count is unknown: that parameter is left out
    if fs is not None:
        available = min(fs.f_bavail * fs.f_frsize // bs, max(0, lu.num_blocks - used))
        params.append(_resource_count(0x0001, available))
    params.append(_resource_count(0x0002, used))
    return params


def _informational_exceptions(lu: "LogicalUnit") -> Parameters:
    """General parameter (SPC-4 §7.3.8.2): ASC/ASCQ 00h/00h — no failure predicted."""
    return [_param(0x0000, bytes([0x00, 0x00, _NO_TEMPERATURE]))]


def _pages(lu: "LogicalUnit") -> dict[tuple[int, int], Callable[["LogicalUnit"], Parameters]]:
    pages: dict[tuple[int, int], Callable] = {}
    if _reports_provisioning(lu):
        pages[(PAGE_LOGICAL_BLOCK_PROVISIONING, 0)] = _provisioning
    pages[(PAGE_INFORMATIONAL_EXCEPTIONS, 0)] = _informational_exceptions
    return pages


def _page(page: int, subpage: int, body: bytes, *, spf: bool = False) -> bytes:
    """Log page header (SPC-4 §7.3.2.1): DS=1 (parameters not saved), SPF, page, subpage, length."""
    return bytes([0x80 | (0x40 if spf else 0) | page, subpage]) + struct.pack(">H", len(body)) + body


def supported_pages(lu: "LogicalUnit") -> list[tuple[int, int]]:
    """Every (page, subpage) this LU answers, in order."""
    listed = [(PAGE_SUPPORTED, 0), (PAGE_SUPPORTED, SUBPAGE_ALL)] + list(_pages(lu))
    return sorted(listed)


def log_sense(lu: "LogicalUnit", cmd: ScsiCommand) -> ScsiResult:
    """LOG SENSE (SPC-4 §6.6)."""
    cdb = cmd.cdb
    if cdb[1] & 0x01:
        raise S.illegal_field(1, 0)  # SP: nothing here can be saved
    if cdb[1] & 0x02:
        raise S.illegal_field(1, 1)  # PPC (obsolete): parameter-change reporting is not kept
    page = cdb[2] & 0x3F  # PC (bits 7-6): no thresholds kept, every PC reads the same values
    subpage = cdb[3]
    pointer = be16(cdb, 5)
    alloc = be16(cdb, 7)
    if page == PAGE_SUPPORTED and subpage in (0, SUBPAGE_ALL):
        if pointer:
            raise S.illegal_field(5)  # these pages have no parameters to point into
        listed = supported_pages(lu)
        if subpage == 0:
            body = bytes(sorted({p for p, _ in listed}))
            data = _page(PAGE_SUPPORTED, 0, body)
        else:
            body = b"".join(bytes([p, s]) for p, s in listed)
            data = _page(PAGE_SUPPORTED, SUBPAGE_ALL, body, spf=True)
        return ScsiResult(data=data[:alloc])
    build = _pages(lu).get((page, subpage))
    if build is None:
        raise S.illegal_field(2 if subpage == 0 else 3)
    params = build(lu)
    if params and pointer > params[-1][0]:
        raise S.illegal_field(5)  # §6.6: beyond the largest parameter code of the page
    body = b"".join(raw for code, raw in params if code >= pointer)
    return ScsiResult(data=_page(page, subpage, body, spf=subpage != 0)[:alloc])
