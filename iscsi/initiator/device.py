"""``BlockDevice``: the block API the layers above use (vmfs/ takes one of these).

It turns SCSI commands into Python calls and non-GOOD status into typed exceptions
(:mod:`iscsi.initiator.errors`).  It runs on anything with an ``execute`` coroutine —
one :class:`~iscsi.initiator.session.Session` or a
:class:`~iscsi.initiator.multipath.MultipathExecutor` — so multipath is invisible here.

Retries (SAM-5 §5.14 / what Linux's sd does): UNIT ATTENTION is reported once per
condition, so the command is simply sent again (up to ``UA_RETRIES`` times); BUSY and
TASK SET FULL are retried after a short, growing pause.  Nothing else is retried here:
transport failures are the session's business (it reconnects and re-issues).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from ..log import event
from . import scsi
from ..scsi.sense import (CAPACITY_DATA_HAS_CHANGED, LOGICAL_UNIT_NOT_SUPPORTED,
                          REPORTED_LUNS_DATA_HAS_CHANGED)
from .errors import (Busy, IllegalRequest, LunNotAvailable, MiscompareError, ScsiError, ScsiStatus,
                     ShortTransfer, TaskSetFull, UnitAttention, scsi_error)

log = logging.getLogger("iscsi.initiator.device")

#: A UA is reported once per condition; a few conditions can be queued (power on, reservations
#: preempted, capacity changed, ...), so retry a handful of times.
UA_RETRIES = 8
#: BUSY / TASK SET FULL: retry after 10 ms, doubling, for about 5 s in total.
BUSY_RETRIES = 9
BUSY_FIRST_DELAY = 0.01
#: COMPARE AND WRITE carries at most 255 blocks (the CDB field is one byte, SBC-4 §5.3);
#: targets may report less in VPD B0h.
MAX_CAW_BLOCKS = 255
#: Largest single transfer when the target does not say (VPD B0h MAXIMUM TRANSFER LENGTH = 0):
#: 1 MiB keeps one command's buffer small and matches Linux's default max_sectors_kb (1280 KiB).
DEFAULT_MAX_TRANSFER_BYTES = 1 << 20
#: Peripheral device types that speak SBC (READ CAPACITY, READ/WRITE 16), SPC-4 Table 141:
#: direct access, optical memory, simplified direct access (RBC), host-managed zoned.
BLOCK_DEVICE_TYPES = frozenset({0x00, 0x07, 0x0E, 0x14})
#: MODE SENSE (10) parameter header length (SPC-4 §7.5.5): all write_protected() needs.
MODE_SENSE10_HEADER = 8
#: "Unknown or no device type" (SPC-4 §6.6.2): with qualifier 3 it means no LU at this LUN.
NO_DEVICE_TYPE = 0x1F


def check_lu_present(lun: int, inq: Any) -> None:
    """LunNotAvailable unless standard INQUIRY data shows a logical unit at ``lun``.

    SPC-4 §6.6.2: qualifier 3 (or type 1Fh) = no logical unit at this LUN; 1 = one could be
    there but is not connected.
    """
    if inq.peripheral_qualifier != 0 or inq.device_type == NO_DEVICE_TYPE:
        raise LunNotAvailable(lun, f"does not exist (peripheral qualifier {inq.peripheral_qualifier}, "
                                   f"device type 0x{inq.device_type:02x})")


async def _all_or_first_error(commands: Iterable[Any]) -> None:
    """Run the pieces of one split transfer together; when one fails, raise its error only
    after every other piece has ended.  (A plain gather raises at the first error while the
    other pieces still run: READ data would land in the caller's buffer, and WRITE data on
    the medium, after the caller was told the transfer failed.)"""
    results = await asyncio.gather(*commands, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


class Executor(Protocol):
    listeners: list

    async def execute(self, lun: int, cdb: bytes, *, read_len: int = 0, data: Any = None,
                      buf: Any = None, attr: int = 1, timeout: float | None = None) -> Any: ...


@dataclass
class LunInfo:
    inquiry: scsi.Inquiry
    capacity: scsi.Capacity
    identity: str | None
    serial: str | None
    limits: scsi.BlockLimits
    provisioning: scsi.Provisioning | None
    vpd_pages: list[int]


class BlockDevice:
    """Async block device on one LUN.

        dev = await BlockDevice.open(session, lun)
        data = await dev.read(lba, count)
        await dev.write(lba, data, fua=True)
    """

    def __init__(self, executor: Executor, lun: int) -> None:
        self.executor = executor
        self.lun = lun
        self.block_size = 512
        self.blocks = 0
        self.info: LunInfo | None = None
        self.max_transfer_blocks = DEFAULT_MAX_TRANSFER_BYTES // 512
        self.ua_seen: list[tuple[int, int]] = []   # (asc, ascq) of every UNIT ATTENTION absorbed
        self._reading_capacity = False

    @classmethod
    async def open(cls, executor: Executor, lun: int) -> "BlockDevice":
        dev = cls(executor, lun)
        await dev.refresh()
        return dev

    # ------------------------------------------------------------------ inventory
    async def refresh(self) -> LunInfo:
        """INQUIRY, VPD pages, READ CAPACITY (16); call again after CAPACITY DATA HAS CHANGED."""
        try:
            inq = await self.inquiry()
        except IllegalRequest as exc:
            if exc.asc_ascq == LOGICAL_UNIT_NOT_SUPPORTED:
                raise LunNotAvailable(self.lun, "does not exist (LOGICAL UNIT NOT SUPPORTED)") from exc
            raise
        check_lu_present(self.lun, inq)
        if inq.device_type not in BLOCK_DEVICE_TYPES:
            raise LunNotAvailable(self.lun, f"is not a block device (peripheral device type "
                                            f"0x{inq.device_type:02x})")
        pages = []
        try:
            pages = scsi.parse_vpd_pages(await self.vpd(0x00))
        except ScsiError:
            pass
        identity = serial = None
        if 0x83 in pages:
            identity = scsi.lu_identity(scsi.parse_vpd83(await self.vpd(0x83)))
        if 0x80 in pages:
            try:
                serial = scsi.parse_vpd80(await self.vpd(0x80))
            except ScsiError:
                pass
        limits = scsi.BlockLimits()
        if 0xB0 in pages:
            try:
                limits = scsi.parse_vpd_b0(await self.vpd(0xB0))
            except ScsiError:
                pass
        prov = None
        if 0xB2 in pages:
            try:
                prov = scsi.parse_vpd_b2(await self.vpd(0xB2))
            except ScsiError:
                pass
        cap = await self.read_capacity()
        self.block_size = cap.block_size
        self.blocks = cap.blocks
        max_blocks = DEFAULT_MAX_TRANSFER_BYTES // max(1, cap.block_size)
        if limits.max_transfer:
            max_blocks = min(max_blocks, limits.max_transfer)
        self.max_transfer_blocks = max(1, max_blocks)
        self.info = LunInfo(inq, cap, identity, serial, limits, prov, pages)
        return self.info

    @property
    def size(self) -> int:
        return self.blocks * self.block_size

    @property
    def identity(self) -> str | None:
        return self.info.identity if self.info else None

    # ------------------------------------------------------------------ command plumbing
    async def command(self, cdb: bytes, *, read_len: int = 0, data: Any = None, buf: Any = None,
                      timeout: float | None = None, retry_ua: bool = True):
        """Run ``cdb``; returns the task on GOOD/CONDITION MET, raises a :class:`ScsiError` otherwise."""
        ua_left, busy_left, delay = UA_RETRIES, BUSY_RETRIES, BUSY_FIRST_DELAY
        resends = 0
        while True:
            task = await self.executor.execute(self.lun, cdb, read_len=read_len, data=data, buf=buf,
                                               timeout=timeout)
            resends += getattr(task, "tries", 0)
            status = task.status
            if status == 0 or status == ScsiStatus.CONDITION_MET:
                return task
            err = scsi_error(status, task.sense_data, cdb)
            if isinstance(err, UnitAttention) and retry_ua and ua_left > 0:
                ua_left -= 1
                if err.asc_ascq == CAPACITY_DATA_HAS_CHANGED:
                    await self._capacity_changed()   # before listeners hear of it
                self._unit_attention(err)
                continue
            if isinstance(err, (Busy, TaskSetFull)) and busy_left > 0:
                busy_left -= 1
                await asyncio.sleep(delay)
                delay *= 2
                continue
            # How often the transport sent this command again after a connection or path loss
            # (the first send may have been carried out): compare_and_write needs to know.
            err.transport_resends = resends
            raise err

    async def _capacity_changed(self) -> None:
        """CAPACITY DATA HAS CHANGED (SBC-4 §4.9, an admin resized the LU): read the capacity
        again before the command that got the UA is retried, so ``blocks``/``size`` (and the
        range checks of read/write) follow a grown or shrunk LU."""
        if self._reading_capacity:
            return                       # the READ CAPACITY below got the UA itself
        self._reading_capacity = True
        try:
            cap = await self.read_capacity()
        except ScsiError as exc:
            event(log, "device.capacity_reread_failed", logging.WARNING, lun=self.lun, error=exc)
            return
        finally:
            self._reading_capacity = False
        if (cap.blocks, cap.block_size) != (self.blocks, self.block_size):
            event(log, "device.capacity_changed", lun=self.lun, blocks=cap.blocks,
                  block_size=cap.block_size, was=self.blocks)
        self.blocks, self.block_size = cap.blocks, cap.block_size
        if self.info is not None:
            self.info.capacity = cap

    def _unit_attention(self, err: UnitAttention) -> None:
        pair = err.asc_ascq or (0, 0)
        self.ua_seen.append(pair)
        del self.ua_seen[:-32]
        event(log, "device.unit_attention", logging.INFO, lun=self.lun, asc=f"0x{pair[0]:02x}",
              ascq=f"0x{pair[1]:02x}")
        if pair == REPORTED_LUNS_DATA_HAS_CHANGED:
            # The session's LUN inventory (Session.luns) follows, as for the async event.
            rescan = getattr(self.executor, "rescan_soon", None)
            if rescan is not None:
                rescan()
        for cb in list(getattr(self.executor, "listeners", [])):
            try:
                if pair == REPORTED_LUNS_DATA_HAS_CHANGED:
                    cb("luns_changed", {"lun": self.lun})
                elif pair == CAPACITY_DATA_HAS_CHANGED:
                    cb("capacity_changed", {"lun": self.lun})
            except Exception:
                log.exception("listener failed")

    # ------------------------------------------------------------------ SPC
    async def inquiry(self) -> scsi.Inquiry:
        t = await self.command(scsi.inquiry(None, 96), read_len=96)
        return scsi.parse_inquiry(bytes(t.data))

    async def vpd(self, page: int, alloc_len: int = 1024) -> bytes:
        t = await self.command(scsi.inquiry(page, alloc_len), read_len=alloc_len)
        return bytes(t.data)

    async def test_unit_ready(self) -> None:
        await self.command(scsi.test_unit_ready())

    async def report_luns(self) -> list[int]:
        t = await self.command(scsi.report_luns(16384), read_len=16384)
        return scsi.parse_report_luns(bytes(t.data))

    async def report_target_port_groups(self) -> list[scsi.PortGroup]:
        t = await self.command(scsi.report_target_port_groups(4096), read_len=4096)
        return scsi.parse_report_target_port_groups(bytes(t.data))

    # ------------------------------------------------------------------ capacity
    async def write_protected(self) -> bool:
        """The WP bit of the MODE SENSE (10) header's device-specific parameter (SBC-4 §6.5.1):
        writes will fail DATA PROTECT.  False when the target does not answer MODE SENSE."""
        try:
            task = await self.command(scsi.mode_sense10(0x3F, alloc_len=MODE_SENSE10_HEADER),
                                      read_len=MODE_SENSE10_HEADER)
        except ScsiError:
            return False
        data = task.data
        return len(data) >= 4 and bool(data[3] & 0x80)

    async def read_capacity(self) -> scsi.Capacity:
        try:
            t = await self.command(scsi.read_capacity16(32), read_len=32)
            return scsi.parse_read_capacity16(bytes(t.data))
        except ScsiError as err:
            if err.key != 0x5:  # only ILLEGAL REQUEST means "no READ CAPACITY (16)"
                raise
        t = await self.command(scsi.read_capacity10(), read_len=8)
        return scsi.parse_read_capacity10(bytes(t.data))

    # ------------------------------------------------------------------ I/O
    def _check_range(self, lba: int, count: int) -> None:
        if lba < 0 or count < 0 or (self.blocks and lba + count > self.blocks):
            raise ValueError(f"blocks {lba}+{count} outside the LUN ({self.blocks} blocks)")

    async def read(self, lba: int, count: int, *, fua: bool = False) -> bytes:
        """Read ``count`` blocks at ``lba``."""
        self._check_range(lba, count)
        bs = self.block_size
        buf = bytearray(count * bs)
        await self.read_into(lba, buf, fua=fua)
        return bytes(buf)

    async def read_into(self, lba: int, buf: bytearray | memoryview, *, fua: bool = False) -> None:
        """Read ``len(buf) // block_size`` blocks into ``buf`` (no extra copy)."""
        bs = self.block_size
        view = memoryview(buf)
        count = len(view) // bs
        step = self.max_transfer_blocks
        if count <= step:
            await self._read(lba, count, view, fua)
            return
        await _all_or_first_error(
            self._read(lba + i, min(step, count - i), view[i * bs:(i + min(step, count - i)) * bs], fua)
            for i in range(0, count, step))

    async def _read(self, lba: int, count: int, view: memoryview, fua: bool) -> None:
        n = count * self.block_size
        task = await self.command(scsi.read16(lba, count, fua=fua), read_len=n, buf=view)
        if task.underflow and task.residual:
            raise ShortTransfer(f"READ (16) of {count} blocks at LBA {lba}: the target sent "
                                f"{n - task.residual} of {n} bytes with GOOD status")

    async def write(self, lba: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        """Write whole blocks at ``lba``; with ``fua`` the data is durable when this returns."""
        bs = self.block_size
        view = memoryview(data)
        if len(view) % bs:
            raise ValueError(f"write of {len(view)} bytes is not a multiple of the block size {bs}")
        count = len(view) // bs
        self._check_range(lba, count)
        step = self.max_transfer_blocks
        if count <= step:
            await self.command(scsi.write16(lba, count, fua=fua), data=view)
            return
        await _all_or_first_error(
            self.command(scsi.write16(lba + i, min(step, count - i), fua=fua),
                         data=view[i * bs:(i + min(step, count - i)) * bs])
            for i in range(0, count, step))

    async def flush(self) -> None:
        """SYNCHRONIZE CACHE (16) over the whole medium (10 when 16 is not supported)."""
        try:
            await self.command(scsi.synchronize_cache16())
        except ScsiError as err:
            if err.key != 0x5:
                raise
            await self.command(scsi.synchronize_cache10())

    async def unmap(self, ranges: Iterable[tuple[int, int]]) -> None:
        """UNMAP (SBC-4 §5.32) of (lba, count) ranges, split to the target's VPD B0h limits."""
        ranges = [(lba, n) for lba, n in ranges if n > 0]
        for lba, n in ranges:
            self._check_range(lba, n)
        limits = self.info.limits if self.info else scsi.BlockLimits()
        max_desc = limits.max_unmap_descriptors or 64
        max_lbas = limits.max_unmap_lba_count or 0xFFFFFFFF
        split: list[tuple[int, int]] = []
        for lba, n in ranges:
            while n > 0:
                k = min(n, max_lbas, 0xFFFFFFFF)
                split.append((lba, k))
                lba += k
                n -= k
        # One command per batch of descriptors whose total stays within MAXIMUM UNMAP LBA COUNT.
        batch: list[tuple[int, int]] = []
        total = 0
        for r in split + [None]:  # type: ignore[list-item]
            if r is None or len(batch) >= max_desc or (batch and total + r[1] > max_lbas):
                if batch:
                    params = scsi.unmap_parameters(batch)
                    await self.command(scsi.unmap(len(params)), data=params)
                batch, total = [], 0
            if r is not None:
                batch.append(r)
                total += r[1]

    async def write_same(self, lba: int, count: int, block: bytes | None = None, *,
                         unmap: bool = False) -> None:
        """WRITE SAME (16): ``block`` (one block; zeros by default) repeated ``count`` times."""
        self._check_range(lba, count)
        bs = self.block_size
        if block is None:
            block = bytes(bs)
        if len(block) != bs:
            raise ValueError("WRITE SAME takes exactly one block of data")
        limit = (self.info.limits.max_write_same if self.info and self.info.limits.max_write_same
                 else 0xFFFFFFFF)
        while count > 0:
            n = min(count, limit, 0xFFFFFFFF)
            await self.command(scsi.write_same16(lba, n, unmap=unmap), data=block)
            lba += n
            count -= n

    async def compare_and_write(self, lba: int, compare: bytes, write: bytes, *, fua: bool = False) -> None:
        """Atomic test-and-set (SBC-4 §5.3, VMware's ATS).  Raises :class:`MiscompareError`
        (with ``.offset`` of the first differing byte) when the medium did not hold ``compare``."""
        bs = self.block_size
        if len(compare) != len(write) or len(compare) % bs or not compare:
            raise ValueError("compare and write buffers must be the same whole number of blocks")
        count = len(compare) // bs
        limit = (self.info.limits.max_compare_and_write if self.info and self.info.limits.max_compare_and_write
                 else MAX_CAW_BLOCKS)
        if count > limit:
            raise ValueError(f"COMPARE AND WRITE of {count} blocks exceeds the target's limit {limit}")
        self._check_range(lba, count)
        try:
            await self.command(scsi.compare_and_write(lba, count, fua=fua), data=bytes(compare) + bytes(write))
        except MiscompareError as err:
            if not getattr(err, "transport_resends", 0):
                raise
            # The command was sent again after a connection (or path) loss: the first send may
            # have compared and written, and the re-send then compares against our own data.
            # The medium holding exactly ``write`` means that happened: report success, as
            # ESXi resolves an ATS miscompare after a retry.  Otherwise the miscompare stands.
            if await self.read(lba, count) != bytes(write):
                raise
            event(log, "device.ats_retry_miscompare_resolved", logging.WARNING, lun=self.lun, lba=lba,
                  blocks=count, resends=err.transport_resends)

    async def get_lba_status(self, lba: int) -> list[scsi.LbaStatus]:
        """GET LBA STATUS (SBC-4 §5.6): mapped/deallocated extents starting at ``lba``."""
        self._check_range(lba, 1)
        t = await self.command(scsi.get_lba_status(lba, 4096), read_len=4096)
        return scsi.parse_lba_status(bytes(t.data))

    # ------------------------------------------------------------------ persistent reservations
    async def persistent_reserve_in(self, action: int) -> bytes:
        """PERSISTENT RESERVE IN (SPC-4 §6.15); raw parameter data. See :meth:`pr_read_keys`."""
        t = await self.command(scsi.persistent_reserve_in(action, 8192), read_len=8192)
        return bytes(t.data)

    async def persistent_reserve_out(self, action: int, *, key: int = 0, sa_key: int = 0, scope: int = 0,
                                     type: int = 0, aptpl: bool = False, all_tg_pt: bool = False) -> None:
        """PERSISTENT RESERVE OUT (SPC-4 §6.16) with the basic 24-byte parameter list."""
        params = scsi.pr_out_parameters(key, sa_key, aptpl=aptpl, all_tg_pt=all_tg_pt)
        await self.command(scsi.persistent_reserve_out(action, scope, type, len(params)), data=params)

    async def pr_read_keys(self) -> tuple[int, list[int]]:
        return scsi.parse_pr_read_keys(await self.persistent_reserve_in(0))

    async def pr_read_reservation(self) -> scsi.Reservation:
        return scsi.parse_pr_read_reservation(await self.persistent_reserve_in(1))

    async def pr_register(self, key: int, *, old_key: int = 0, ignore_existing: bool = False,
                          aptpl: bool = False) -> None:
        await self.persistent_reserve_out(6 if ignore_existing else 0, key=old_key, sa_key=key, aptpl=aptpl)

    async def pr_reserve(self, key: int, type: int) -> None:
        await self.persistent_reserve_out(1, key=key, type=type)

    async def pr_release(self, key: int, type: int) -> None:
        await self.persistent_reserve_out(2, key=key, type=type)

    async def pr_clear(self, key: int) -> None:
        await self.persistent_reserve_out(3, key=key)

    async def pr_preempt(self, key: int, victim: int, type: int, *, abort: bool = False) -> None:
        await self.persistent_reserve_out(5 if abort else 4, key=key, sa_key=victim, type=type)


# Reservation types (SPC-4 §6.16.2 table 231), for callers of pr_reserve.
PR_WRITE_EXCLUSIVE = 1
PR_EXCLUSIVE_ACCESS = 3
PR_WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 5
PR_EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 6
PR_WRITE_EXCLUSIVE_ALL_REGISTRANTS = 7
PR_EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 8
