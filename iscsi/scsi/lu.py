"""One logical unit: command dispatch, unit attentions, task set, medium and reset state.

The transport calls :meth:`LogicalUnit.execute` for every SCSI command (usually via
:class:`iscsi.scsi.target.LunMap`) and :meth:`LogicalUnit.data_out_length` to know how
much Data-Out to solicit.  Every session and portal reaching this LU shares the same
object, hence the same data, reservations, mode pages and COMPARE AND WRITE lock.

Per-command order of checks (SAM-5 §5.14, SPC-4 §5.14, SBC-4 §4.11):
unit attention -> operation code (and service action) known -> NACA -> sanitize in
progress / medium not present -> reservation conflict -> task attribute -> handler.
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import inspect
import logging
import struct
import time
from collections import deque
from typing import Awaitable, Callable, Iterable

from ..log import event
from . import commands as C
from . import sbc
from . import sense as S
from . import vpd
from . import zerocopy
from .modepages import ModePages
from .sense import SenseError, SenseKey, build_sense
from .taskset import TaskSet
from .types import ITNexus, ScsiCommand, ScsiResult, Status
from .ua import UnitAttentions
from .cdb import RW10, RW16
from .sbc import LARGE_TRANSFER_STEP

log = logging.getLogger(__name__)

_WRITE_OPCODES = zerocopy.WRITE_OPCODES
GOOD_WRITE = ScsiResult()  # write_now's GOOD: one shared object, recognised by identity, never handed on
# Commands without Data-Out that flush the write cache: an I/O error there is a write error.
_FLUSH_OPCODES = frozenset((0x35, 0x91, 0x1B))  # SYNCHRONIZE CACHE(10)/(16), START STOP UNIT
# What an EXTENDED COPY's reads and writes of a copy target are, for its reservation check.
_COPY_READ_CDB = bytes((0x88,)) + bytes(15)
_COPY_WRITE_CDB = bytes((0x8A,)) + bytes(15)

# -- limits advertised in the Block Limits VPD page (SBC-4 §6.6.4) ------------------------
# Largest READ/WRITE in blocks: libiscsi's WriteSame16.Unmap writes 65536 blocks with one
# WRITE(16), and 32 MiB (at 512-byte blocks) stays a sane buffer for one Python command.
MAX_TRANSFER_BLOCKS = 0x10000
# WRITE ATOMIC(16) is the only atomic write implemented and its TRANSFER LENGTH has 16 bits:
# a larger MAXIMUM ATOMIC TRANSFER LENGTH (Block Limits VPD) cannot be asked for, and Linux
# sd, which sizes atomic writes on it, would encode 65536 blocks as 0 (a write of nothing).
MAX_ATOMIC_TRANSFER_BLOCKS = 0xFFFF
# Linux and ESXi size their I/O on the optimal length; 1 MiB amortises the per-command cost.
OPTIMAL_TRANSFER_BYTES = 1 << 20
# COMPARE AND WRITE: ESXi ATS and our vmfs use 1 block; 255 is the CDB's one-byte maximum.
MAX_COMPARE_AND_WRITE_BLOCKS = 255
# UNMAP: punching a hole costs the same for any length, so no LBA count limit (FFFFFFFFh);
# 256 descriptors fit a 4 KiB parameter list, more than Linux (1) or ESXi sends at once.
MAX_UNMAP_LBA_COUNT = 0xFFFFFFFF
MAX_UNMAP_DESCRIPTORS = 256
# WRITE SAME of a non-zero pattern writes every block synchronously; 65536 blocks
# (32 MiB at 512 bytes) keeps one command well under the initiators' 30 s timeout.
MAX_WRITE_SAME_BLOCKS = 0x10000
# Sparse images live on filesystems with 4 KiB blocks: UNMAP is most effective in whole
# 4 KiB pieces (Block Limits OPTIMAL UNMAP GRANULARITY).
UNMAP_GRANULARITY_BYTES = 4096

# errno values that mean "no room for this write", not "the medium failed".
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# An LU whose image keeps failing logs one ``lu.io_error`` line per errno at most this
# often (the next one counts those left out): a dead disk under a busy initiator must not
# write a log line per command.
IO_ERROR_LOG_INTERVAL = 1.0

# SANITIZE OVERWRITE runs in a worker thread at no more than this rate, so that it does
# not starve the other LUs whose images share the disk (a sanitize is a background job:
# SBC-4 §4.11 lets it take as long as it needs while the LU reports it in progress).
SANITIZE_BYTES_PER_SECOND = 128 << 20
SANITIZE_CHUNK_BYTES = 4 << 20

# Atomic writes (WRITE ATOMIC(16), COMPARE AND WRITE) remembered for the READs read in
# steps meanwhile (see LogicalUnit._read_whole); a READ that started before the oldest one
# kept is read again whole, so the bound costs at most a re-read, never a torn result.
ATOMIC_LOG = 64
# Tries of such a READ in steps before it is read in one loop turn (atomic writes keep
# landing in its range): bounds the work, and a READ is never starved.
ATOMIC_REREADS = 2
_READ_OPCODES = frozenset(zerocopy.READ_SPANS)

def _import_optional(module: str):
    try:
        return __import__(f"iscsi.scsi.{module}", fromlist=["_"])
    except ImportError as e:  # the module is written by someone else and may not exist yet
        if e.name and e.name.endswith(module):
            return None
        raise


_default_copy_manager = None


def default_copy_manager():
    """The process-wide EXTENDED COPY manager (one per daemon, so copies can cross LUs), or None."""
    global _default_copy_manager
    if _default_copy_manager is None:
        mod = _import_optional("xcopy")
        cls = getattr(mod, "CopyManager", None) if mod is not None else None
        if cls is not None:
            _default_copy_manager = cls()
    return _default_copy_manager


async def _maybe_await(value):
    if inspect.isawaitable(value):
        value = await value
    return value


class LogicalUnit:
    """A direct-access block device (SBC-4) on top of a :class:`~iscsi.backstore.base.Backstore`."""

    def __init__(
        self,
        backstore,
        *,
        serial: str,
        name: str | None = None,
        vendor: str = "SANSTACK",
        product: str = "VIRTUAL-DISK",
        revision: str = "0001",
        read_only: bool = False,
        lun_id: int = 0,
        removable: bool = False,
        physical_block_size: int | None = None,
        enable_pr: bool = True,
        pr_state: dict | None = None,
        pr_persist: Callable[[dict], None] | None = None,
        copy_manager=None,
        enable_xcopy: bool = True,
        mode_state: dict | None = None,
        mode_persist: Callable[[dict], None] | None = None,
    ) -> None:
        self.backstore = backstore
        self.block_size: int = backstore.block_size
        self.num_blocks: int = backstore.size // self.block_size
        self.read_only = bool(read_only or getattr(backstore, "read_only", False))
        self.lun_id = lun_id
        self.removable = removable
        self.identity = vpd.Identity(vendor, product, revision, serial, name or serial)
        self.naa = self.identity.naa()

        # thin provisioning: the backstore can deallocate and unmapped blocks read as zero
        self.thin = callable(getattr(backstore, "unmap", None)) and callable(getattr(backstore, "is_mapped", None))
        self.lbprz = self.thin and bool(getattr(backstore, "unmap_reads_zero", False))
        # READ CAPACITY(16) LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT.  Default: physical =
        # logical.  libiscsi's GetLBAStatus.UnmapSingle only holds for LBPPB=1 (it expects the
        # first descriptor at a physical boundary past the LBA asked for), so 4 KiB physical
        # blocks under 512-byte LBAs are opt-in.
        phys = physical_block_size or self.block_size
        if phys < self.block_size or phys % self.block_size or (phys // self.block_size) & (phys // self.block_size - 1):
            raise ValueError(f"physical block size {phys} is not a power-of-two multiple of {self.block_size}")
        self.lbppbe = (phys // self.block_size).bit_length() - 1

        # limits
        self.max_transfer = MAX_TRANSFER_BLOCKS
        self.max_atomic_transfer = MAX_ATOMIC_TRANSFER_BLOCKS
        self.max_compare_and_write = MAX_COMPARE_AND_WRITE_BLOCKS
        self.max_unmap_lba_count = MAX_UNMAP_LBA_COUNT
        self.max_unmap_descriptors = MAX_UNMAP_DESCRIPTORS
        self.max_write_same = MAX_WRITE_SAME_BLOCKS

        # state
        self.ua = UnitAttentions()
        self._ua_pending = self.ua._pending  # hot path: one dict lookup per command
        self.tasks = TaskSet()
        # I/O counters for `iscsi-target stats --luns` (as LIO keeps per-LU statistics): READs
        # and medium-modifying commands with the bytes their CDBs ask for, and every other
        # command, counted once where each starts (read_now or write_now on the fast lanes,
        # start() otherwise).  They cost a 4K READ ~1k instructions (callgrind, +2.6 %).
        self.reads = self.read_bytes = self.writes = self.written_bytes = self.other_commands = 0
        # MODE SELECT SP=1 must reach nonvolatile storage (SPC-4 §6.9): ``mode_persist``
        # stores the saved pages, ``mode_state`` is what it stored last time.
        self.mode = ModePages(persist=mode_persist)
        if mode_state is not None:
            self.mode.import_saved(mode_state)
        self._caw_lock = asyncio.Lock()
        # Atomic writes since the LU was made: a count, and the byte ranges of the latest
        # (count after it, start, end), for READs read in steps (_read_whole).
        self._atomic_count = 0
        self._atomic_recent: deque[tuple[int, int, int]] = deque(maxlen=ATOMIC_LOG)
        # Zero-copy READs (zerocopy.py): ranges held for Data-In still in flight, and the
        # image a transport may send from (a file backstore only).
        self.fence = zerocopy.ReadFence()
        self.zero_copy_source = backstore if isinstance(getattr(backstore, "fileno", None), int) \
            and callable(getattr(backstore, "drain", None)) else None
        # The I_T nexuses that have sent commands to this LU, and the one using it alone
        # (None when shared): only a sole user's READs are held (zerocopy.py), so a hold can
        # only be in the way of its own writes, which its next PDU acknowledges.  A nexus
        # that logged in through a map of this LU (``_maps``, LunMap.joined) shares it
        # too, before its first command; the maps keep those, so a login costs no memory
        # per LU it can reach.
        self._users: set[ITNexus] = set()
        self._maps: list = []  # the LunMaps that map this LU (map_added / map_removed)
        self.sole_user: ITNexus | None = None
        self._flush_next: asyncio.Task | None = None
        self._flush_running: asyncio.Task | None = None
        self.medium_present = True
        self.sanitizing = False
        self.sanitize_failed = False
        self._abnormal = False  # any of: sanitizing, sanitize failed, no medium
        self._sanitize_task: asyncio.Task | None = None
        self._sanitize_done = 0  # bytes of the running sanitize done so far (worker thread writes it)
        self._sanitize_total = 1
        self._prevent: set[ITNexus] = set()
        # Backstore I/O errors answered so far (MEDIUM ERROR / DATA PROTECT), the latest in
        # words, and the log rate limit per errno: (when logged, how many left out since).
        self.io_errors = 0
        self.last_io_error: str | None = None
        self._io_log: dict[int | None, list] = {}
        if hasattr(backstore, "short_file_fails"):
            # An image cut short underneath the daemon: its lost blocks are a MEDIUM ERROR,
            # not zeroes under GOOD status (FileBackstore reads them as zeroes otherwise).
            backstore.short_file_fails = True

        # providers the target level may replace
        self.lun_numbers: Callable[[], list[int]] = lambda: [self.lun_id]
        # Set once a LunMap (a target) serves this LU: from then on copies are limited to
        # the LUs the requesting I_T nexus uses (copy_access); an LU driven in-process has
        # no LUN masking to keep.
        self.served = False
        self.port_groups: Callable[[ITNexus], list[tuple[int, int, list[int]]]] = self._default_port_groups

        # optional collaborators: persistent reservations (pr.py) and the copy manager (xcopy.py)
        pr_mod = _import_optional("pr") if enable_pr else None
        pr_cls = getattr(pr_mod, "PersistentReservations", None) if pr_mod else None
        self._nexus_matches = getattr(pr_mod, "nexus_matches", None)
        self.pr = None
        if pr_cls is not None:
            self.pr = pr_cls(ua_sink=self._pr_unit_attention, persist=pr_persist, state=pr_state,
                             target_ports=self._target_ports_in_use)
        self.xcopy = None
        if enable_xcopy:
            self.xcopy = copy_manager if copy_manager is not None else default_copy_manager()
        if self.xcopy is not None:
            self.xcopy.register(self.naa, self)

        self._build_table()
        self._build_inquiry()

    # -- construction ------------------------------------------------------------------
    def _build_table(self) -> None:
        specs = C.base_commands()
        if self.pr is not None:
            pr = self.pr

            def wrap(fn):
                return lambda lu, cmd: _maybe_await(fn(cmd))

            async def persistent_reserve_out(lu, cmd):
                result = await _maybe_await(pr.persistent_reserve_out(cmd))
                if result.extra:
                    lu._preempted_and_aborted(result.extra.get("abort_nexuses"))
                return result

            specs += C.pr_commands(
                wrap(pr.persistent_reserve_in), persistent_reserve_out,
                wrap(pr.reserve6), wrap(pr.release6), wrap(pr.reserve10), wrap(pr.release10),
            )
        if self.xcopy is not None:
            xc = self.xcopy
            specs += C.xcopy_commands(
                lambda lu, cmd: _maybe_await(xc.extended_copy(lu, cmd)),
                lambda lu, cmd: _maybe_await(xc.receive_copy_results(lu, cmd)),
            )
        if not self.thin:
            # SBC-4 §4.7: without logical block provisioning management there is no UNMAP
            # and no GET LBA STATUS (WRITE SAME then simply writes).
            specs = [s for s in specs if s.opcode != 0x42]
            for s in specs:
                if s.opcode == 0x9E:
                    s.sub = {k: v for k, v in s.sub.items() if k != 0x12}
        table: list[C.CommandSpec | None] = [None] * 256
        for s in specs:
            table[s.opcode] = s
        atomic = table[0x9C]
        if atomic is not None and atomic.handler is not None:
            # WRITE ATOMIC(16) leaves its range in the log READs in steps look at.
            table[0x9C] = dataclasses.replace(atomic, handler=self._write_atomic_handler(atomic.handler))
        self._table = table
        # read_now() and write_now() stand in for these handlers only.
        def plain(pairs) -> bool:
            return all(table[op] is not None and table[op].handler is handler and table[op].sub is None
                       for op, handler in pairs)

        self._fast_reads = plain(((0x28, sbc.read_10), (0x88, sbc.read_16)))
        self._fast_writes = plain(((0x2A, sbc.write_10), (0x8A, sbc.write_16)))
        self._supported = sorted(
            [sub for s in specs if s.sub for sub in s.sub.values()] + [s for s in specs if not s.sub],
            key=lambda s: (s.opcode, s.sa or 0),
        )

    def _build_inquiry(self) -> None:
        self.standard_inquiry = vpd.standard_inquiry(
            self.identity, removable=self.removable, tpgs=1, three_pc=self.xcopy is not None,
        )
        self._vpd_static: dict[int, bytes] = {
            vpd.PAGE_SERIAL: vpd.serial_page(self.identity),
            vpd.PAGE_EXTENDED_INQUIRY: vpd.extended_inquiry_page(write_cache=True),
            vpd.PAGE_BLOCK_DEVICE_CHARACTERISTICS: vpd.block_device_characteristics_page(sanitize=True),
            vpd.PAGE_LOGICAL_BLOCK_PROVISIONING: vpd.logical_block_provisioning_page(thin=self.thin, lbprz=self.lbprz),
        }

    def block_limits_page(self) -> bytes:
        """Block Limits VPD page from the current limits (tests and the daemon may tune them)."""
        phys = 1 << self.lbppbe
        unmap_gran = max(phys, UNMAP_GRANULARITY_BYTES // self.block_size)
        if self.block_size > 512 or unmap_gran <= 1:
            # OPTIMAL UNMAP GRANULARITY 0 = not reported (SBC-4 §6.6.4).  One block says
            # nothing; and on blocks over 512 bytes qemu (7.2 .. current, block/iscsi.c) builds
            # an allocation map from it, then asks for the status of 2 GiB - 512 bytes and
            # asserts that is a multiple of the block size: any read of an unwritten range
            # of a 4 KiB-block LUN aborted qemu.  Linux falls back to the physical block size.
            unmap_gran = 0
        return vpd.block_limits_page(vpd.BlockLimits(
            max_compare_and_write=self.max_compare_and_write,
            optimal_granularity=phys,
            max_transfer=self.max_transfer,
            optimal_transfer=max(1, OPTIMAL_TRANSFER_BYTES // self.block_size),
            max_prefetch=self.max_transfer,
            max_unmap_lba_count=self.max_unmap_lba_count if self.thin else 0,
            max_unmap_descriptors=self.max_unmap_descriptors if self.thin else 0,
            unmap_granularity=unmap_gran if self.thin else 0,
            max_write_same=self.max_write_same,
            max_atomic_transfer=self.max_atomic_transfer,
        ))

    # -- INQUIRY support -----------------------------------------------------------------
    def vpd_pages(self) -> list[int]:
        pages = [vpd.PAGE_SUPPORTED, vpd.PAGE_DEVICE_ID, vpd.PAGE_BLOCK_LIMITS, *self._vpd_static]
        if self.xcopy is not None:
            pages.append(vpd.PAGE_THIRD_PARTY_COPY)
        return sorted(pages)

    def vpd_page(self, page: int, nexus: ITNexus | None) -> bytes | None:
        data = self._vpd_static.get(page)
        if data is not None:
            return data
        if page == vpd.PAGE_SUPPORTED:
            return vpd.supported_pages(self.vpd_pages())
        if page == vpd.PAGE_DEVICE_ID:
            return vpd.device_id_page(self.identity, nexus)
        if page == vpd.PAGE_BLOCK_LIMITS:
            return self.block_limits_page()
        if page == vpd.PAGE_THIRD_PARTY_COPY and self.xcopy is not None:
            return self.xcopy.vpd_8f()
        return None

    # -- collaborators' callbacks -----------------------------------------------------------
    def _pr_unit_attention(self, target: ITNexus | None, asc_ascq: tuple[int, int], except_nexus: ITNexus | None) -> None:
        """ua_sink for pr.py: ``target`` may name many nexuses (any target port, any ISID)."""
        if target is None:
            self.ua.establish(asc_ascq, except_nexus=except_nexus)
            return
        match = self._nexus_matches
        for n in self.ua.known():
            if n != except_nexus and (n == target or (match is not None and match(target, n))):
                self.ua.establish(asc_ascq, nexus=n)

    def _preempted_and_aborted(self, patterns) -> None:
        """PREEMPT AND ABORT: SPC-4 §5.13.11.2.6 h) acts as PREVENT ALLOW MEDIUM REMOVAL with
        PREVENT=0 from every preempted I_T nexus (a fenced node must not keep the medium locked).
        Aborting their tasks is the transport's part (``abort_nexuses``)."""
        match = self._nexus_matches
        if not patterns or not self._prevent or match is None:
            return
        for n in [n for n in self._prevent if any(match(p, n) for p in patterns)]:
            self._prevent.discard(n)

    # CopyTarget protocol of xcopy.py
    @property
    def naa_designator(self) -> bytes:
        return self.naa

    async def read_blocks(self, lba: int, count: int) -> bytes:
        from .sbc import check_range

        check_range(self, lba, count)
        bs = self.block_size
        return self.backstore.read(lba * bs, count * bs)

    async def write_blocks(self, lba: int, data: bytes) -> None:
        from .sbc import check_range

        bs = self.block_size
        check_range(self, lba, len(data) // bs)
        self.check_writable()
        fence = self.fence
        if fence.overlapping(lba * bs, lba * bs + len(data)):
            # A writer while it waits, as WRITE commands are (_run_write): new READs of the
            # LU are copied meanwhile, so a host reading this range cannot starve the copy.
            fence.writers += 1
            try:
                await fence.clear(lba * bs, lba * bs + len(data))
            finally:
                fence.writers -= 1
        self.backstore.write(lba * bs, data)
        if not self.mode.wce:
            await self._flush()

    def copy_access(self, other, nexus: ITNexus, write: bool) -> str:
        """May ``nexus``, through an EXTENDED COPY sent to this LU, read (or write) ``other``?

        "ok"; "unreachable" when ``other`` is not an LU this nexus uses (the copy manager
        spans every target of the daemon, and LUN masking must hold for copies too: an
        I_T nexus only ever reaches the LUs its target maps for it, and an initiator
        addresses an LU before it names it in a copy) or is not ready; "conflict" when a
        READ(16)/WRITE(16) from the nexus would get RESERVATION CONFLICT there (SPC-4
        §5.13: copies do not bypass reservations).
        """
        reachable = getattr(other, "reachable_by", None)
        if other is not self and self.served and (reachable is None or not reachable(nexus)):
            return "unreachable"
        if getattr(other, "_abnormal", False):
            return "unreachable"  # no medium, sanitizing or sanitize failed
        pr = getattr(other, "pr", None)
        if pr is not None and pr.check_conflict(nexus, _COPY_WRITE_CDB if write else _COPY_READ_CDB):
            return "conflict"
        return "ok"

    def _default_port_groups(self, nexus: ITNexus) -> list[tuple[int, int, list[int]]]:
        """One target port group holding the port the command came through, active/optimized."""
        return [(nexus.target_port_group, 0, [nexus.relative_port_id])]

    # -- REPORT SUPPORTED OPERATION CODES support ------------------------------------------
    def supported_commands(self) -> list[C.CommandSpec]:
        return self._supported

    def opcode_has_service_actions(self, opcode: int) -> bool:
        s = self._table[opcode]
        return s is not None and s.sub is not None

    def opcode_supported(self, opcode: int) -> bool:
        return self._table[opcode] is not None

    # -- state used by handlers ----------------------------------------------------------
    @property
    def write_protected(self) -> bool:
        return self.read_only or self.mode.swp

    def check_writable(self) -> None:
        """DATA PROTECT: WRITE PROTECTED for a read-only LU, SOFTWARE WRITE PROTECTED with SWP=1 (SPC-4 §7.5.8)."""
        if self.read_only:
            raise SenseError(SenseKey.DATA_PROTECT, S.WRITE_PROTECTED)
        if self.mode.swp:
            raise SenseError(SenseKey.DATA_PROTECT, S.SOFTWARE_WRITE_PROTECTED)

    @property
    def not_ready(self) -> tuple[int, int] | None:
        if self.sanitizing:
            return S.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS
        if not self.medium_present:
            return S.MEDIUM_NOT_PRESENT
        return None

    @property
    def sanitize_progress(self) -> int:
        """PROGRESS INDICATION of the running sanitize: the fraction done in 65536ths (SPC-4 §4.5.2.4.4)."""
        return min(0xFFFF, self._sanitize_done * 0x10000 // max(1, self._sanitize_total))

    def not_ready_sense(self, descriptor: bool) -> bytes | None:
        """Sense data for the not-ready state, or None when ready.

        While a sanitize runs it carries the PROGRESS INDICATION: SBC-4 §4.11 (sanitize)
        requires it in the REQUEST SENSE answer, and it is as useful in the CHECK CONDITION
        of the commands refused meanwhile.
        """
        if self.sanitizing:
            return build_sense(SenseKey.NOT_READY, S.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS,
                               descriptor=descriptor, progress=self.sanitize_progress)
        if not self.medium_present:
            return build_sense(SenseKey.NOT_READY, S.MEDIUM_NOT_PRESENT, descriptor=descriptor)
        return None

    def _flush(self) -> Awaitable[None]:
        """Make everything written so far stable: fdatasync in a worker thread, with group commit.

        Flush requests that arrive while no flush has started yet share the next one; a
        request that arrives while a flush runs waits for it and then for one more (its
        write may have landed after that flush began).  So N concurrent FUA writes cost at
        most two fdatasync calls, and none returns before its own data is stable.  The
        flush runs in its own task: an aborted command does not cancel it for the others.
        """
        nxt = self._flush_next
        if nxt is None:
            nxt = self._flush_next = asyncio.get_running_loop().create_task(self._flush_after(self._flush_running))
        return asyncio.shield(nxt)

    async def _flush_after(self, previous: asyncio.Task | None) -> None:
        if previous is not None:
            await asyncio.wait((previous,))
        me = asyncio.current_task()
        self._flush_next = None  # requests from now on need a flush that starts after this one
        self._flush_running = me
        try:
            await asyncio.to_thread(self.backstore.flush)
        finally:
            if self._flush_running is me:
                self._flush_running = None

    async def flushed(self, result: ScsiResult) -> ScsiResult:
        """Return ``result`` once everything written so far is on stable storage."""
        await self._flush()
        return result

    async def compare_and_write(self, lba: int, compare, write, fua: bool) -> ScsiResult:
        """Compare then write under the LU's lock (SBC-4 §5.3).

        Read, compare and write happen in one synchronous step, so no other command of any
        session can slip in between; the lock keeps that true if backstore I/O ever moves
        off the event loop.
        """
        from .sbc import first_difference

        bs = self.block_size
        async with self._caw_lock:
            medium = self.backstore.read(lba * bs, len(compare))
            off = first_difference(compare, medium)
            if off >= 0:
                raise SenseError(SenseKey.MISCOMPARE, S.MISCOMPARE_DURING_VERIFY, information=off)
            self.backstore.write(lba * bs, write)
            self._atomic_written(lba * bs, lba * bs + len(write))
        if fua or not self.mode.wce:
            await self._flush()
        return ScsiResult()

    # -- removable medium ------------------------------------------------------------------
    def set_prevent(self, nexus: ITNexus, prevent: bool) -> None:
        if not self.removable:
            return
        if prevent:
            self._prevent.add(nexus)
        else:
            self._prevent.discard(nexus)

    def removal_prevented(self) -> bool:
        return bool(self._prevent)

    def set_medium(self, present: bool, nexus: ITNexus | None = None) -> None:
        """Load or eject; a load is announced to the other nexuses (NOT READY TO READY CHANGE, SBC-4 §4.4)."""
        if present and not self.medium_present:
            self.ua.establish(S.NOT_READY_TO_READY_CHANGE, except_nexus=nexus)
        self.medium_present = present
        self._update_state()

    # -- sanitize ---------------------------------------------------------------------------
    def run_sanitize(self, job, immed: bool):
        """Start a SANITIZE job in a worker thread; TMFs and resets do not abort it (SBC-4 §4.11).

        While it runs, every command but INQUIRY, REPORT LUNS and REQUEST SENSE gets NOT
        READY, SANITIZE IN PROGRESS.  A failure leaves the LU in sanitize failure mode
        (MEDIUM ERROR, SANITIZE COMMAND FAILED) until EXIT FAILURE MODE.
        """
        kind, block, _count = job
        bs = self.block_size
        size = self.num_blocks * bs
        backstore = self.backstore
        thin_zero = self.thin and self.lbprz

        self._sanitize_done = 0
        self._sanitize_total = size

        def work() -> None:
            if kind == "erase":
                backstore.unmap(0, size)  # block/crypto erase: every LBA deallocated, reads zero
                return
            zero = not any(block)
            chunk = block * max(1, SANITIZE_CHUNK_BYTES // bs)
            view = memoryview(chunk)
            started = time.monotonic()
            off = 0
            while off < size:
                k = min(len(chunk), size - off)
                if zero and thin_zero:
                    backstore.unmap(off, k)  # an all-zero pattern keeps the image sparse
                else:
                    backstore.write(off, view[:k])
                off += k
                self._sanitize_done = off
                ahead = off / SANITIZE_BYTES_PER_SECOND - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
            backstore.flush()

        async def runner() -> None:
            try:
                await asyncio.to_thread(work)
                self.sanitize_failed = False
            except Exception:
                log.exception("SANITIZE failed")
                self.sanitize_failed = True
            finally:
                self.sanitizing = False
                self._sanitize_task = None
                self._update_state()

        self.sanitizing = True
        self._update_state()
        task = asyncio.get_running_loop().create_task(runner())
        self._sanitize_task = task
        if immed:
            return ScsiResult()

        async def wait() -> ScsiResult:
            await asyncio.shield(task)
            if self.sanitize_failed:
                raise SenseError(SenseKey.MEDIUM_ERROR, S.SANITIZE_COMMAND_FAILED)
            return ScsiResult()

        return wait()

    def exit_sanitize_failure_mode(self) -> None:
        self.sanitize_failed = False
        self._update_state()

    # -- dispatch ---------------------------------------------------------------------------
    def data_out_length(self, cdb: bytes) -> int | None:
        """Data-Out bytes the CDB asks for (0: none); None for an operation code this LU does not know.

        The transport should solicit min(this, Expected Data Transfer Length).
        """
        spec = self._table[cdb[0]]
        if spec is None:
            return None
        if spec.dout is None:
            if spec.sub is not None:
                sub = spec.sub.get(cdb[1] & 0x1F)
                if sub is not None and sub.dout is not None:
                    return sub.dout(cdb, self.block_size)
            return 0
        try:
            return spec.dout(cdb, self.block_size)
        except IndexError:  # a CDB shorter than its opcode's length
            return 0

    def _sense(self, key: int, asc_ascq: tuple[int, int]) -> ScsiResult:
        return ScsiResult(Status.CHECK_CONDITION, b"", build_sense(key, asc_ascq, descriptor=self.mode.d_sense))

    def _error(self, e: SenseError) -> ScsiResult:
        return ScsiResult(Status.CHECK_CONDITION, b"", e.to_bytes(self.mode.d_sense))

    def _unit_attention(self, cmd: ScsiCommand, spec: C.CommandSpec | None) -> ScsiResult | None:
        """Report a pending UA unless the command is exempt (SPC-4 §5.14: INQUIRY, REPORT LUNS, REQUEST SENSE)."""
        if spec is not None and spec.flags & C.F_UA_EXEMPT:
            self.ua.peek(cmd.nexus)  # registers a first contact without reporting it
            return None
        ua = self.ua.pop(cmd.nexus)
        if ua is None:
            return None
        return self._sense(SenseKey.UNIT_ATTENTION, ua)

    def _check_state(self, spec: C.CommandSpec, cdb: bytes) -> None:
        """Not-ready and failure states (SBC-4 §4.11 sanitize, §4.4 medium): only looked at when one is set."""
        if self.sanitizing and not spec.flags & C.F_SANITIZE_OK:
            raise SenseError(SenseKey.NOT_READY, S.LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS)
        if spec.flags & C.F_MEDIUM:
            if not self.medium_present:
                raise SenseError(SenseKey.NOT_READY, S.MEDIUM_NOT_PRESENT)
            if self.sanitize_failed and cdb[0] != 0x48:
                raise SenseError(SenseKey.MEDIUM_ERROR, S.SANITIZE_COMMAND_FAILED)

    def _update_state(self) -> None:
        self._abnormal = self.sanitizing or self.sanitize_failed or not self.medium_present

    def _count(self, op: int, cdb: bytes) -> None:
        """The I/O counters for a command that goes the full way (:meth:`start`): a READ with
        the bytes its CDB asks for, a medium-modifying command with its Data-Out bytes, or
        another command.  (read_now and write_now count what they serve themselves.)"""
        if op in _READ_OPCODES:
            self.reads += 1
            try:
                self.read_bytes += zerocopy.READ_SPANS[op](cdb)[1] * self.block_size
            except (IndexError, struct.error):
                pass  # a CDB too short to say: start() reports that
        elif op in _WRITE_OPCODES:
            self.writes += 1
            self.written_bytes += self.data_out_length(cdb) or 0
        else:
            self.other_commands += 1

    async def execute(self, cmd: ScsiCommand) -> ScsiResult:
        """Execute one SCSI command and return its status, Data-In (cut to the allocation length) and sense."""
        r = self.start(cmd)
        if r.__class__ is ScsiResult:
            return r  # type: ignore[return-value]
        return await r  # type: ignore[misc]

    def start(self, cmd: ScsiCommand) -> ScsiResult | Awaitable[ScsiResult]:
        """:meth:`execute` without a coroutine when the command completes at once.

        Returns the result, or an awaitable of it when the command has to wait (a flush, a
        lock, a task-ordering barrier, a large transfer in steps).  The transport's per-I/O
        path calls this: most reads and writes finish here, and a coroutine per command was
        a measurable part of their cost.
        """
        cdb = cmd.cdb
        op = cdb[0]
        spec = self._table[op]
        self._count(op, cdb)
        if cmd.nexus is not self.sole_user:
            self._used_by(cmd.nexus)
        if self.sanitizing and spec is not None and not spec.flags & C.F_SANITIZE_OK:
            # While a sanitize runs the LU executes nothing but the exempt commands; this
            # is reported ahead of a pending UA, which stays queued (SBC-4 §4.11; libiscsi
            # Sanitize.Reset logs in again and expects SANITIZE IN PROGRESS first).
            return ScsiResult(Status.CHECK_CONDITION, b"", self.not_ready_sense(self.mode.d_sense))
        q = self._ua_pending.get(cmd.nexus)
        if q is None or q:
            r = self._unit_attention(cmd, spec)
            if r is not None:
                return r
        if spec is None:
            return self._sense(SenseKey.ILLEGAL_REQUEST, S.INVALID_COMMAND_OPERATION_CODE)
        try:
            if spec.sub is not None:
                sub = spec.sub.get(cdb[1] & 0x1F)
                if sub is None:
                    raise S.illegal_field(1, 4)
                spec = sub
            n = spec.cdb_len
            if len(cdb) < n:
                cmd.cdb = cdb = bytes(cdb).ljust(n, b"\x00")
            if cdb[n - 1] & 0x04:
                raise S.illegal_field(n - 1, 2)  # NACA: ACA is not supported (SAM-5 §5.9.1.4)
            if self._abnormal:
                self._check_state(spec, cdb)
            pr = self.pr
            if pr is not None and pr.check_conflict(cmd.nexus, cdb):
                return ScsiResult(Status.RESERVATION_CONFLICT)
            handler = spec.handler
            # Medium-modifying commands run once no zero-copy READ holds their range.
            writes = cdb[0] in _WRITE_OPCODES
            attr = cmd.task_attr
            tasks = self.tasks
            if attr <= 1 and tasks._ordered is None:  # UNTAGGED or SIMPLE, no ORDERED barrier
                r = self._run_write(handler, cmd) if writes else handler(self, cmd)
                if r.__class__ is ScsiResult:
                    return r
                if cdb[0] in _READ_OPCODES:
                    r = self._read_whole(cdb, r)
                return self._finish(cdb, spec, tasks.track(r))
            if writes:
                return self._finish(cdb, spec, tasks.run(attr, lambda: self._run_write(handler, cmd)))
            if cdb[0] in _READ_OPCODES:
                return self._finish(cdb, spec, tasks.run(attr, lambda: self._read_whole(cdb, handler(self, cmd))))
            return self._finish(cdb, spec, tasks.run(attr, lambda: handler(self, cmd)))
        except Exception as e:
            return self._failed(cdb, spec, e)

    def read_now(self, cdb: bytes, nexus: ITNexus, zero_copy: bool):
        """A SIMPLE READ(10)/READ(16) with nothing in its way: its data, or None.

        The per-I/O shortcut of :meth:`start` for the one outcome most commands have:
        GOOD with the data at once.  It makes the same checks in the same order and gives
        up (None, nothing done) wherever :meth:`start` would do anything else — a unit
        attention to report, a reservation, an ORDERED barrier, a not-ready state, a CDB
        error, a large transfer read in steps — and the caller then runs the command
        through :meth:`start`, which decides.  A read that fails once started is answered
        here (a CHECK CONDITION :class:`ScsiResult`, as :meth:`start` would answer it).
        ``zero_copy`` as in :class:`ScsiCommand`.  No command or result objects and one call
        instead of five: a measurable part of a READ's cost.  tests/unit/test_read_now.py
        holds it to :meth:`start`.
        """
        if nexus is not self.sole_user:
            self._used_by(nexus)
        if self._abnormal or self.tasks._ordered is not None or not self._fast_reads:
            return None
        q = self._ua_pending.get(nexus)
        if q is None or q:
            return None  # a first contact or a pending unit attention
        op = cdb[0]
        if op == 0x88:
            if cdb[15] & 0x04:
                return None  # NACA
            flags, lba, n, _g = RW16.unpack_from(cdb)
        elif op == 0x28:
            if cdb[9] & 0x04:
                return None
            flags, lba, _g, n = RW10.unpack_from(cdb)
        else:
            return None
        pr = self.pr
        if pr is not None and pr.check_conflict(nexus, cdb):
            return None
        if flags & 0xE0 or not n or lba + n > self.num_blocks or n > self.max_transfer:
            return None  # protection, nothing to read, or an error to report
        bs = self.block_size
        length = n * bs
        fence = self.fence
        zero_copy = zero_copy and length >= zerocopy.MIN_BYTES and self.zero_copy_source is not None \
            and not fence.writers and nexus is self.sole_user and fence.sendfile_ok
        if not zero_copy and length > LARGE_TRANSFER_STEP:
            return None
        self.reads += 1
        self.read_bytes += length
        try:
            if zero_copy:
                source = self.zero_copy_source
                source.drain()
                return fence.hold(source, lba * bs, length)
            return self.backstore.read(lba * bs, length)
        except Exception as e:
            # Answered here, as start() would: the failure may not happen twice (a deferred
            # error of an earlier gathered write is raised once, then it is gone).
            return self._failed(cdb, self._table[op], e)

    def write_now(self, cdb: bytes, nexus: ITNexus, data) -> ScsiResult | None:
        """A SIMPLE WRITE(10)/WRITE(16) with all its data and nothing in its way, done: its
        result, or None (nothing done).

        The per-I/O shortcut of :meth:`start` for writes, as :meth:`read_now` is for READs:
        the same checks in the same order, and None wherever :meth:`start` would do anything
        but write at once — a unit attention, a reservation, an ORDERED barrier, a not-ready
        or write-protected LU, a CDB error, data not exactly the CDB's length, FUA or a write
        cache that is off (both wait for a flush), a zero-copy READ holding the range, a
        large transfer written in steps.  Once the write is started its failure is answered
        here, as :meth:`start` answers it.  tests/unit/test_write_now.py holds it to
        :meth:`start`.
        """
        # The same prologue as read_now, written out again on purpose: shared through a helper
        # it cost 4 % of a READ's instructions (callgrind).  test_read_now / test_write_now
        # hold each of them to start(), so neither can drift from it unnoticed.
        if nexus is not self.sole_user:
            self._used_by(nexus)
        if self._abnormal or self.tasks._ordered is not None or not self._fast_writes:
            return None
        q = self._ua_pending.get(nexus)
        if q is None or q:
            return None
        op = cdb[0]
        if op == 0x8A:
            if cdb[15] & 0x04:
                return None  # NACA
            flags, lba, n, _g = RW16.unpack_from(cdb)
        elif op == 0x2A:
            if cdb[9] & 0x04:
                return None
            flags, lba, _g, n = RW10.unpack_from(cdb)
        else:
            return None
        pr = self.pr
        if pr is not None and pr.check_conflict(nexus, cdb):
            return None
        if flags & 0xE8 or not n or lba + n > self.num_blocks or n > self.max_transfer:
            return None  # WRPROTECT or FUA, nothing to write, or an error to report
        if self.read_only or self.mode.swp or not self.mode.wce:
            return None
        bs = self.block_size
        start = lba * bs
        length = n * bs
        if len(data) != length or length > LARGE_TRANSFER_STEP:
            return None
        fence = self.fence
        if fence.holds and fence.overlapping(start, start + length):
            return None  # it waits for the READs holding its range (zerocopy.py)
        self.writes += 1
        self.written_bytes += length
        try:
            self.backstore.write(start, data)
        except Exception as e:
            return self._failed(cdb, self._table[op], e)
        return GOOD_WRITE

    # -- atomic writes against READs read in steps ----------------------------------------
    def _write_atomic_handler(self, inner):
        def write_atomic(lu: LogicalUnit, cmd: ScsiCommand):
            r = inner(lu, cmd)  # the write itself happens here, in one step (or raises)
            bs = lu.block_size
            lba, n = zerocopy.WRITE_SPANS[0x9C](cmd.cdb)
            lu._atomic_written(lba * bs, (lba + n) * bs)
            return r
        return write_atomic

    def _atomic_written(self, start: int, end: int) -> None:
        self._atomic_count += 1
        self._atomic_recent.append((self._atomic_count, start, end))

    def _atomic_since(self, count: int, start: int, end: int) -> bool:
        """Did an atomic write after the ``count``-th touch [start, end)?  (True if unsure.)"""
        recent = self._atomic_recent
        if not recent or recent[0][0] > count + 1:
            return self._atomic_count != count  # some were forgotten
        return any(c > count and s < end and start < e for c, s, e in recent)

    def _read_whole(self, cdb: bytes, r: ScsiResult | Awaitable[ScsiResult]) -> ScsiResult | Awaitable[ScsiResult]:
        """A READ that did not complete at once (read in steps, a loop turn between them)."""
        if r.__class__ is ScsiResult:
            return r
        return self._read_not_torn(cdb, r)  # type: ignore[arg-type]

    async def _read_not_torn(self, cdb: bytes, pending: Awaitable[ScsiResult]) -> ScsiResult:
        """Read the range again if an atomic write landed in it while it was read in steps: a
        READ returns an atomic write's blocks all as before it or all as after it (SBC-4
        §4.29.3, WRITE ATOMIC; SBC-4 §5.3, COMPARE AND WRITE), never a mix of the two.

        Again in steps (a READ may be 256 MiB, too much for one loop turn), and in one step
        after ATOMIC_REREADS tries that atomic writes kept landing in."""
        count = self._atomic_count
        result = await pending
        if self._atomic_count == count or result.status != Status.GOOD:
            return result
        try:
            lba, _n = zerocopy.READ_SPANS[cdb[0]](cdb)
        except (struct.error, IndexError):
            return result
        bs = self.block_size
        start = lba * bs
        data = result.data
        end = start + len(data)
        if not self._atomic_since(count, start, end):
            return result
        if data.__class__ is not bytearray:
            return dataclasses.replace(result, data=self.backstore.read(start, len(data)))
        view = memoryview(data)
        backstore = self.backstore
        for _ in range(ATOMIC_REREADS):
            count = self._atomic_count
            for pos in range(0, len(view), LARGE_TRANSFER_STEP):
                if pos:
                    await asyncio.sleep(0)
                backstore.read_into(start + pos, view[pos:pos + LARGE_TRANSFER_STEP])
            if not self._atomic_since(count, start, end):
                return result
        backstore.read_into(start, view)
        return result

    def _run_write(self, handler, cmd: ScsiCommand) -> ScsiResult | Awaitable[ScsiResult]:
        """Run a medium-modifying command once no zero-copy READ holds its range.

        While it waits or suspends it counts as a writer: new READs of this LU are then
        copied rather than held, so it can neither be starved by fresh holds nor write
        under one taken while it was suspended.
        """
        fence = self.fence
        if fence.holds:
            span = zerocopy.write_span(cmd.cdb, self.block_size, self.num_blocks * self.block_size)
            if fence.overlapping(*span):
                fence.writers += 1
                return self._write_after_holds(handler, cmd, span)
        r = handler(self, cmd)
        if r.__class__ is ScsiResult:
            return r
        fence.writers += 1
        return self._writer_finishing(r)

    async def _write_after_holds(self, handler, cmd: ScsiCommand, span: tuple[int, int]) -> ScsiResult:
        try:
            await self.fence.clear(*span)
            r = handler(self, cmd)
            if r.__class__ is not ScsiResult:
                r = await r
            return r
        finally:
            self.fence.writers -= 1

    async def _writer_finishing(self, pending: Awaitable[ScsiResult]) -> ScsiResult:
        try:
            return await pending
        finally:
            self.fence.writers -= 1

    async def _finish(self, cdb: bytes, spec: C.CommandSpec, pending: Awaitable[ScsiResult]) -> ScsiResult:
        """The waiting part of a command, with the same error handling as the immediate part."""
        try:
            return await pending
        except Exception as e:
            return self._failed(cdb, spec, e)

    def _failed(self, cdb: bytes, spec: C.CommandSpec | None, e: Exception) -> ScsiResult:
        """What a command that raised answers: its sense, MEDIUM ERROR for I/O errors, else
        INTERNAL TARGET FAILURE (logged).  Cancellation is never turned into a status."""
        if isinstance(e, SenseError):
            return self._error(e)
        if isinstance(e, OSError):
            # No room left under the image (full filesystem, quota): a resource exhaustion of
            # a thin-provisioned LU (SBC-4 §4.7.3.7), which initiators treat as "out of space"
            # (ESXi pauses the VM, Windows alerts) rather than as a failing disk.
            full = e.errno in _NO_SPACE_ERRNOS
            key, asc = (SenseKey.DATA_PROTECT, S.SPACE_ALLOCATION_FAILED_WRITE_PROTECT) if full \
                else (SenseKey.MEDIUM_ERROR, S.WRITE_ERROR)
            deferred = bool(getattr(e, "deferred", False))
            if not full and not deferred:
                # A failed flush (SYNCHRONIZE CACHE, START STOP UNIT, FUA) lost written data too.
                writes = (spec is not None and spec.dout is not None) or cdb[0] in _FLUSH_OPCODES
                asc = S.WRITE_ERROR if writes else S.UNRECOVERED_READ_ERROR
            self._io_failed(cdb, e, key, asc, deferred)
            if deferred:
                # An earlier, acknowledged write failed on its way to the image: a deferred
                # error, reported instead of running this command (SPC-4 §4.5.4).
                return ScsiResult(Status.CHECK_CONDITION, b"", build_sense(
                    key, asc, descriptor=self.mode.d_sense, deferred=True))
            return self._sense(key, asc)
        log.error("internal error executing opcode 0x%02x", cdb[0], exc_info=e)
        return self._sense(SenseKey.HARDWARE_ERROR, S.INTERNAL_TARGET_FAILURE)

    def _io_failed(self, cdb: bytes, e: OSError, key: int, asc_ascq: tuple[int, int], deferred: bool) -> None:
        """Count, and log (rate-limited), a backstore error answered with sense ``key/asc_ascq``.

        A medium error (anything but a full filesystem) also stops zero-copy READs of this
        LU: a READ sent with sendfile has its GOOD status queued before the kernel reads the
        image, so a failing page can only drop the connection -- and the initiator's retry
        would meet the same page again, forever.  Copied, the READ gets its MEDIUM ERROR.
        """
        op = cdb[0]
        self.io_errors += 1
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self.last_io_error = f"{name} on opcode 0x{op:02x}: {e.strerror or e}"
        zero_copy_off = False
        if e.errno not in _NO_SPACE_ERRNOS and self.fence.sendfile_ok and self.zero_copy_source is not None:
            self.fence.sendfile_ok = False
            zero_copy_off = True
        now = time.monotonic()
        slot = self._io_log.get(e.errno)
        if slot is not None and now - slot[0] < IO_ERROR_LOG_INTERVAL and not zero_copy_off:
            slot[1] += 1
            return
        left_out = slot[1] if slot is not None else 0
        self._io_log[e.errno] = [now, 0]
        span = zerocopy.READ_SPANS.get(op) or zerocopy.WRITE_SPANS.get(op)
        try:
            lba = span(cdb)[0] if span is not None else None
        except (struct.error, IndexError):
            lba = None
        event(log, "lu.io_error", logging.ERROR, lun=self.lun_id, serial=self.identity.serial,
              image=getattr(self.backstore, "path", None) or type(self.backstore).__name__,
              opcode=f"0x{op:02x}", lba=lba, errno=name, error=e.strerror or str(e),
              sense=f"{SenseKey(key).name}/{asc_ascq[0]:02X}/{asc_ascq[1]:02X}", deferred=deferred or None,
              zero_copy="off" if zero_copy_off else None, left_out=left_out or None)

    # -- events from the transport and the daemon --------------------------------------------
    def establish_ua(self, asc_ascq: tuple[int, int], except_nexus: ITNexus | None = None) -> None:
        """Queue a unit attention for every I_T nexus that has used this LU (but ``except_nexus``)."""
        self.ua.establish(asc_ascq, except_nexus=except_nexus)

    def _target_ports_in_use(self) -> dict[int, str]:
        """Relative target port id -> target port name of every nexus that has used this LU:
        where REGISTER AND MOVE may move a reservation to (SPC-4 §6.16.4), not only the
        ports that have sent a persistent reservation command themselves."""
        nexuses = set(self._users).union(*(m.joined for m in self._maps))
        return {n.relative_port_id: n.target_port for n in nexuses}

    def user_joined(self, nexus: ITNexus) -> None:
        """An I_T nexus that can reach this LU logged in (LunMap.nexus_joined): the LU is
        shared from now on, not from its first command.  Otherwise the other nexus stayed its
        sole user with its READs held for zero-copy, and a first WRITE from the newcomer
        waited for that host's acknowledgement (zerocopy.py; a single-threaded client driving
        both paths answers nothing while it waits: 5 s, then the first path was dropped)."""
        sole = self.sole_user
        if sole is not None and sole != nexus:
            self.sole_user = None

    def map_added(self, lun_map) -> None:
        """A LunMap maps this LU: the sessions logged in through it reach it from now on."""
        if lun_map not in self._maps:
            self._maps.append(lun_map)
            self._settle_sole_user()

    def map_removed(self, lun_map) -> None:
        """A LunMap no longer maps this LU: its sessions no longer reach it."""
        if lun_map in self._maps:
            self._maps.remove(lun_map)
            self._settle_sole_user()

    def reachable_by(self, nexus: ITNexus) -> bool:
        """Has ``nexus`` used this LU, or logged in through a map of it?"""
        return nexus in self._users or any(nexus in m.joined for m in self._maps)

    def _used_by(self, nexus: ITNexus) -> None:
        users = self._users
        if nexus in users:
            # Nothing changes, except that a sole user reinstated (an equal nexus of a new
            # session) is kept as this object: the fast paths compare by identity.
            if self.sole_user is not None:
                self.sole_user = nexus
            return
        users.add(nexus)
        self._settle_sole_user()

    def _settle_sole_user(self) -> None:
        """The one nexus using this LU, when no other uses it or has logged in to reach it."""
        users = self._users
        sole = next(iter(users)) if len(users) == 1 else None
        if sole is not None:
            for m in self._maps:
                joined = m.joined
                if len(joined) > 1 or (joined and sole not in joined):
                    sole = None
                    break
        self.sole_user = sole

    def nexus_lost(self, nexus: ITNexus) -> None:
        """I_T nexus loss (session closed or reinstated, SAM-5 §6.3.4)."""
        self._users.discard(nexus)
        self._settle_sole_user()
        self.ua.nexus_lost(nexus)
        self._prevent.discard(nexus)
        if self.pr is not None:
            self.pr.nexus_lost(nexus)
        if self.xcopy is not None:
            self.xcopy.nexus_lost(nexus)

    def clear_task_set(self, nexus: ITNexus, affected: Iterable[ITNexus] = ()) -> None:
        """CLEAR TASK SET from ``nexus``: other nexuses whose tasks were aborted learn it (SAM-5 §7.5)."""
        for other in set(affected):
            if other != nexus:
                self.ua.establish(S.COMMANDS_CLEARED_BY_ANOTHER_INITIATOR, nexus=other)

    def abort_task_set(self, nexus: ITNexus) -> None:
        """ABORT TASK SET: the transport cancels the tasks; nothing else changes (SAM-5 §7.3)."""

    def _reset(self, asc_ascq: tuple[int, int]) -> None:
        self.tasks.release_all()
        self._prevent.clear()
        self.mode.reset_to_saved()
        self.ua.establish(asc_ascq)

    def lun_reset(self) -> None:
        """LOGICAL UNIT RESET (SAM-5 §7.7): BUS DEVICE RESET FUNCTION OCCURRED for every nexus."""
        self._reset(S.DEVICE_RESET)
        if self.pr is not None:
            self.pr.lun_reset()

    def warm_reset(self) -> None:
        """TARGET WARM RESET (RFC 7143 §11.5.1): a hard reset of every LU (SAM-5 §6.3.2)."""
        self._reset(S.BUS_RESET)
        if self.pr is not None:
            fn = getattr(self.pr, "target_reset", None) or self.pr.lun_reset
            fn()

    def cold_reset(self) -> None:
        """TARGET COLD RESET (RFC 7143 §11.5.1): as if power-cycled (POWER ON OCCURRED)."""
        self._reset(S.POWER_ON_OCCURRED)
        if self.pr is not None:
            fn = getattr(self.pr, "power_on", None) or getattr(self.pr, "target_reset", None) or self.pr.lun_reset
            fn()

    def resize(self, new_size: int) -> None:
        """Grow or shrink the backstore; every nexus sees CAPACITY DATA HAS CHANGED (SBC-4 §4.6).

        A shrink first drops the connections whose zero-copy READs still hold the range that
        goes away: their Data-In is still in the file, and sent after the truncation it would
        arrive as zeroes under a GOOD status.  Losing the connection is what the initiator
        can recover from (it retries, and sees the capacity change).
        """
        old_size = self.num_blocks * self.block_size
        if new_size < old_size:
            self.fence.drop_holders(new_size, old_size)
        self.backstore.resize(new_size)
        self.num_blocks = self.backstore.size // self.block_size
        self.ua.establish(S.CAPACITY_DATA_HAS_CHANGED)

    def close(self) -> None:
        if self.xcopy is not None:
            self.xcopy.unregister(self.naa)
        self.backstore.close()

    def __repr__(self) -> str:
        return f"LogicalUnit(lun={self.lun_id}, serial={self.identity.serial!r}, blocks={self.num_blocks}x{self.block_size})"
