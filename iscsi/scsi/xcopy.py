"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS: the copy manager of the target (SPC-4 §6.4, §6.18).

One :class:`CopyManager` serves every logical unit of the daemon, so a copy may go from one LU
to another: LUs are registered under their NAA designator (the one VPD page 83h reports, with
association 0 = logical unit), and an identification descriptor CSCD (E4h) in the parameter list
names the LU by that designator.  Only block -> block segments (02h) are implemented, which is
what VMware VAAI "XCOPY" and sg3_utils/ddpt send.

Wiring expected from the logical unit:

* opcode 83h (service action 00h) -> :meth:`CopyManager.extended_copy`;
* opcode 84h -> :meth:`CopyManager.receive_copy_results` (service actions 00h, 03h, 04h);
* INQUIRY VPD page 8Fh -> :meth:`CopyManager.vpd_8f`, and standard INQUIRY byte 5 bit 3 (3PC) set;
* I_T nexus loss -> :meth:`CopyManager.nexus_lost` (held copy results belong to the I_T nexus);
* register each LU (:meth:`CopyManager.register`) when it comes online, unregister when removed.

Errors are raised as :class:`~iscsi.scsi.sense.SenseError` (``CopyAborted`` for failures while
copying); the LU turns them into CHECK CONDITION.  Reservation checks on the copy source and
destination are the caller's business (EXTENDED COPY itself is a "write" command for
:meth:`PersistentReservations.check_conflict`).
"""
from __future__ import annotations

import asyncio

import struct
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .sense import (
    COPY_TARGET_DEVICE_NOT_REACHABLE,
    INSUFFICIENT_RESOURCES,
    INVALID_FIELD_IN_CDB,
    PARAMETER_LIST_LENGTH_ERROR,
    TOO_MANY_SEGMENT_DESCRIPTORS,
    TOO_MANY_TARGET_DESCRIPTORS,
    UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE,
    UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE,
    SenseError,
    SenseKey,
    illegal_field,
    illegal_param,
)
from .types import ITNexus, ScsiCommand, ScsiResult, Status

__all__ = [
    "CopyTarget",
    "CopyManager",
    "CopyAborted",
    "CopyResult",
    "MAX_TARGET_DESCRIPTORS",
    "MAX_SEGMENT_DESCRIPTORS",
    "MAX_DESCRIPTOR_LIST_LENGTH",
    "MAX_SEGMENT_LENGTH",
    "MAX_INLINE_DATA_LENGTH",
]

# ------------------------------------------------------------------------------------ limits
#: CSCD descriptors per command.  ESXi and ddpt send two (source and destination LU).
MAX_TARGET_DESCRIPTORS = 8
#: Segment descriptors per command.  ESXi sends one per XCOPY (up to its 4 MiB
#: MaxHWTransferSize); a few more let ddpt batch without a command per segment.
MAX_SEGMENT_DESCRIPTORS = 16
#: Bytes of CSCD + segment descriptors: room for the counts above even with 64-byte CSCDs
#: (8 * 64 + 16 * 28 = 960).
MAX_DESCRIPTOR_LIST_LENGTH = 1024
#: Bytes one segment may move.  The NUMBER OF BLOCKS field (16 bits) allows 32 MiB at 512-byte
#: and 256 MiB at 4 KiB blocks; 64 MiB keeps one command's work bounded.
MAX_SEGMENT_LENGTH = 64 * 1024 * 1024
#: Inline data (segment types that carry data in the list) is not supported.
MAX_INLINE_DATA_LENGTH = 0
#: Held data (stream/CAT retention) is not supported.
HELD_DATA_LIMIT = 0
#: Copies in progress at once over the whole copy manager (OPERATING PARAMETERS / VPD 8Fh).
TOTAL_CONCURRENT_COPIES = 64
#: Copies in progress at once that carry a held list identifier (one byte field).
MAX_IDENTIFIED_CONCURRENT_COPIES = 64
#: Bytes read and written per step while copying a segment: bounds memory per copy and lets
#: other commands interleave on the event loop.
COPY_CHUNK_BYTES = 1024 * 1024
#: Held results kept per I_T nexus; the oldest completed one goes first.
MAX_HELD_RESULTS_PER_NEXUS = 64

# Descriptor type codes (SPC-4 §6.4.5 / §6.4.6).
SEGMENT_BLOCK_TO_BLOCK = 0x02
CSCD_IDENTIFICATION = 0xE4
SUPPORTED_DESCRIPTOR_CODES = (SEGMENT_BLOCK_TO_BLOCK, CSCD_IDENTIFICATION)
CSCD_LENGTH = 32  # E0h-E9h (and any unknown code we only skip over)
CSCD_LONG_CODES = frozenset((0xEA, 0xEB))  # IPv6 and IP copy service CSCDs are 64 bytes
CSCD_LONG_LENGTH = 64
BLOCK_TO_BLOCK_LENGTH = 0x1C
PARAM_HEADER_LENGTH = 16

DESIGNATOR_TYPE_NAA = 0x3
ASSOCIATION_LU = 0x0
PERIPHERAL_DIRECT_ACCESS = 0x00

# RECEIVE COPY RESULTS service actions (SPC-4 §6.18).
RCR_COPY_STATUS = 0x00
RCR_OPERATING_PARAMETERS = 0x03
RCR_FAILED_SEGMENT_DETAILS = 0x04

# LIST ID USAGE (SPC-4 §6.4.3, Table "LIST ID USAGE field").
LIST_ID_HOLD = 0b00
LIST_ID_DISCARD = 0b10
LIST_ID_NONE = 0b11

# COPY MANAGER STATUS (SPC-4 §6.18.3).
STATUS_IN_PROGRESS = 0x00
STATUS_GOOD = 0x01
STATUS_ERRORS = 0x02

# Additional sense codes not in sense.py (SPC-4 Annex D).
INLINE_DATA_LENGTH_EXCEEDED = (0x26, 0x0B)
OPERATION_IN_PROGRESS = (0x00, 0x16)
NO_ADDITIONAL_SENSE = (0x00, 0x00)

_HEADER = struct.Struct(">BBH4xII")  # list id, flags, CSCD list length, segment list length, inline length
_B2B = struct.Struct(">BBHHH2xHQQ")  # block -> block segment descriptor (28 bytes)
_U16 = struct.Struct(">H")


@runtime_checkable
class CopyTarget(Protocol):
    """What the copy manager needs from a logical unit (the lead maps LogicalUnit onto it)."""

    block_size: int
    num_blocks: int
    naa_designator: bytes

    async def read_blocks(self, lba: int, count: int) -> bytes: ...

    async def write_blocks(self, lba: int, data: bytes) -> None: ...


class CopyAborted(SenseError):
    """COPY ABORTED sense (SPC-4 §6.4.4): the command-specific information field carries the
    number of segment descriptors processed before the failure."""

    def __init__(self, asc_ascq: tuple[int, int], *, segments_processed: int,
                 field_pointer: int | None = None) -> None:
        super().__init__(SenseKey.COPY_ABORTED, asc_ascq, field_pointer=field_pointer, in_cdb=False)
        self.segments_processed = segments_processed

    def to_bytes(self, descriptor: bool = False) -> bytes:
        raw = bytearray(super().to_bytes(descriptor))
        if descriptor:
            # Command-specific information descriptor (type 01h, SPC-4 §4.5.2.3).
            raw += bytes((0x01, 0x0A, 0, 0)) + self.segments_processed.to_bytes(8, "big")
            raw[7] = len(raw) - 8
        else:
            raw[8:12] = (self.segments_processed & 0xFFFFFFFF).to_bytes(4, "big")
        return bytes(raw)


@dataclass(slots=True)
class CopyResult:
    """What RECEIVE COPY RESULTS reports about one copy operation."""

    status: int = STATUS_IN_PROGRESS
    segments_processed: int = 0
    bytes_transferred: int = 0
    sense: bytes = b""  # sense data of a failed operation (FAILED SEGMENT DETAILS)


@dataclass(slots=True)
class _Cscd:
    offset: int  # byte offset of the descriptor in the parameter list
    designator: bytes | None  # NAA designator, None when the descriptor names no NAA LU designator
    block_length: int


@dataclass(slots=True)
class _Segment:
    offset: int
    src: CopyTarget
    dst: CopyTarget
    src_lba: int
    dst_lba: int
    nbytes: int


@dataclass(slots=True)
class _NexusResults:
    held: dict[int, CopyResult] = field(default_factory=dict)


def _pad4(data: bytes) -> bytes:
    return data + b"\x00" * (-len(data) % 4)


def _transfer_count(nbytes: int) -> tuple[int, int]:
    """(TRANSFER COUNT UNITS, TRANSFER COUNT): the smallest unit (bytes, KiB, MiB...) that fits 32 bits."""
    units = 0
    while nbytes > 0xFFFFFFFF and units < 5:
        nbytes >>= 10
        units += 1
    return units, min(nbytes, 0xFFFFFFFF)


def _plle() -> SenseError:
    return SenseError(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)


class CopyManager:
    """Copy manager shared by the logical units of one daemon."""

    def __init__(self) -> None:
        self._lus: dict[bytes, CopyTarget] = {}
        self._results: dict[tuple[str, str], _NexusResults] = {}
        self._in_progress = 0

    # ----------------------------------------------------------------- LU registry
    def register(self, lu_designator: bytes, lu: CopyTarget) -> None:
        """Make ``lu`` reachable as a copy source/destination under its NAA designator
        (the designator bytes of VPD 83h, without the 4-byte designation descriptor header)."""
        self._lus[bytes(lu_designator)] = lu

    def register_lu(self, lu: CopyTarget) -> None:
        self.register(lu.naa_designator, lu)

    def unregister(self, lu_designator: bytes) -> None:
        self._lus.pop(bytes(lu_designator), None)

    def lookup(self, designator: bytes) -> CopyTarget | None:
        return self._lus.get(bytes(designator))

    def nexus_lost(self, nexus: ITNexus) -> None:
        """Held results belong to the I_T nexus that sent the EXTENDED COPY (SPC-4 §6.18.1)."""
        self._results.pop((nexus.initiator_port, nexus.target_port), None)

    # ----------------------------------------------------------------- EXTENDED COPY
    async def extended_copy(self, lu: CopyTarget, cmd: ScsiCommand) -> ScsiResult:
        """EXTENDED COPY (LID1) 83h/00h (SPC-4 §6.4)."""
        cdb = cmd.cdb
        if len(cdb) < 16:
            raise illegal_field(0)
        if cdb[1] & 0x1F != 0x00:  # LID4 and token-based copies are not implemented
            raise illegal_field(1, 4)
        param_len = int.from_bytes(cdb[10:14], "big")
        if param_len == 0:
            return ScsiResult()  # SPC-4 §6.4.1: zero length is not an error and does nothing
        data = bytes(cmd.data_out[:param_len])
        if len(data) < param_len or param_len < PARAM_HEADER_LENGTH:
            raise _plle()
        list_id, flags, cscd_len, seg_len, inline_len = _HEADER.unpack_from(data)
        # SPC-4 §6.4.3: lists longer than the advertised maximum get PARAMETER LIST LENGTH ERROR
        # (libiscsi test_extendedcopy_descr_limits checks this before the descriptor counts).
        if cscd_len + seg_len > MAX_DESCRIPTOR_LIST_LENGTH:
            raise _plle()
        if PARAM_HEADER_LENGTH + cscd_len + seg_len + inline_len > param_len:
            raise _plle()
        if inline_len > MAX_INLINE_DATA_LENGTH:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, INLINE_DATA_LENGTH_EXCEEDED,
                             field_pointer=12, in_cdb=False)
        usage = (flags >> 3) & 0x3
        if usage == 0b01:
            raise illegal_param(1, 4)
        if usage == LIST_ID_NONE and list_id != 0:
            raise illegal_param(0)

        key = (cmd.nexus.initiator_port, cmd.nexus.target_port)
        held = self._results.get(key)
        if usage != LIST_ID_NONE and held is not None:
            prior = held.held.get(list_id)
            if prior is not None and prior.status == STATUS_IN_PROGRESS:
                raise SenseError(SenseKey.ILLEGAL_REQUEST, OPERATION_IN_PROGRESS, field_pointer=0, in_cdb=False)
        if self._in_progress >= TOTAL_CONCURRENT_COPIES:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, INSUFFICIENT_RESOURCES)

        cscds = self._parse_cscds(data, cscd_len)
        segments = self._parse_segments(data, PARAM_HEADER_LENGTH + cscd_len, seg_len, cscds)
        if self._access_denied(lu, cmd.nexus, segments):
            return ScsiResult(Status.RESERVATION_CONFLICT)

        result = CopyResult()
        if usage == LIST_ID_HOLD:
            self._hold(key, list_id, result)
        self._in_progress += 1
        try:
            await self._run(segments, result)
        except SenseError as exc:
            result.status = STATUS_ERRORS
            result.sense = exc.to_bytes()
            raise
        except BaseException:  # task aborted (cancelled) or a bug: the copy did not complete
            result.status = STATUS_ERRORS
            raise
        else:
            result.status = STATUS_GOOD
        finally:
            self._in_progress -= 1
        return ScsiResult()

    def _hold(self, key: tuple[str, str], list_id: int, result: CopyResult) -> None:
        nexus_results = self._results.setdefault(key, _NexusResults())
        held = nexus_results.held
        held.pop(list_id, None)
        held[list_id] = result
        while len(held) > MAX_HELD_RESULTS_PER_NEXUS:
            oldest = next((k for k, v in held.items() if v.status != STATUS_IN_PROGRESS), None)
            if oldest is None:
                break
            del held[oldest]

    @staticmethod
    def _parse_cscds(data: bytes, cscd_len: int) -> list[_Cscd]:
        """Walk the CSCD descriptor list (SPC-4 §6.4.5): count first, then check each type."""
        end = PARAM_HEADER_LENGTH + cscd_len
        spans: list[tuple[int, int]] = []
        off = PARAM_HEADER_LENGTH
        while off < end:
            code = data[off]
            length = CSCD_LONG_LENGTH if code in CSCD_LONG_CODES else CSCD_LENGTH
            if off + length > end:
                raise illegal_param(2)  # the CSCD DESCRIPTOR LIST LENGTH splits a descriptor
            spans.append((off, code))
            off += length
        if len(spans) > MAX_TARGET_DESCRIPTORS:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, TOO_MANY_TARGET_DESCRIPTORS)
        cscds = []
        for off, code in spans:
            if code != CSCD_IDENTIFICATION:
                raise SenseError(SenseKey.ILLEGAL_REQUEST, UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE,
                                 field_pointer=off, in_cdb=False)
            # Byte 1: LU ID TYPE (ignored by SPC-4 for E4h), NUL (obsolete), PERIPHERAL DEVICE TYPE.
            if data[off + 1] & 0x1F != PERIPHERAL_DIRECT_ACCESS:
                raise illegal_param(off + 1, 4)
            desig_hdr = data[off + 4:off + 8]
            dlen = desig_hdr[3]
            if dlen > 20:  # the designation descriptor must fit bytes 4..27
                raise illegal_param(off + 7)
            dtype, assoc = desig_hdr[1] & 0x0F, (desig_hdr[1] >> 4) & 0x3
            designator = data[off + 8:off + 8 + dlen] if (dtype, assoc) == (DESIGNATOR_TYPE_NAA, ASSOCIATION_LU) else None
            block_length = int.from_bytes(data[off + 29:off + 32], "big")
            cscds.append(_Cscd(off, designator, block_length))
        return cscds

    def _parse_segments(self, data: bytes, start: int, seg_len: int, cscds: list[_Cscd]) -> list[_Segment]:
        """Walk the segment descriptor list (SPC-4 §6.4.6) and resolve every source/destination."""
        end = start + seg_len
        spans: list[tuple[int, int, int]] = []
        off = start
        while off < end:
            if off + 4 > end:
                raise _plle()
            code = data[off]
            length = 4 + _U16.unpack_from(data, off + 2)[0]
            if off + length > end:
                raise _plle()
            spans.append((off, code, length))
            off += length
        if len(spans) > MAX_SEGMENT_DESCRIPTORS:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, TOO_MANY_SEGMENT_DESCRIPTORS)
        segments = []
        for index, (off, code, length) in enumerate(spans):
            if code != SEGMENT_BLOCK_TO_BLOCK:
                raise SenseError(SenseKey.ILLEGAL_REQUEST, UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE,
                                 field_pointer=off, in_cdb=False)
            if length != BLOCK_TO_BLOCK_LENGTH:
                raise illegal_param(off + 2)
            _, flags, _, src_i, dst_i, nblocks, src_lba, dst_lba = _B2B.unpack_from(data, off)
            src = self._resolve(cscds, src_i, index, off + 4)
            dst = self._resolve(cscds, dst_i, index, off + 6)
            dc = bool(flags & 0x02)  # NUMBER OF BLOCKS counts destination blocks when DC=1
            nbytes = nblocks * (dst.block_size if dc else src.block_size)
            if nbytes % src.block_size or nbytes % dst.block_size:
                raise illegal_param(off + 10)
            if nbytes > MAX_SEGMENT_LENGTH:
                raise illegal_param(off + 10)
            if (src_lba + nbytes // src.block_size > src.num_blocks
                    or dst_lba + nbytes // dst.block_size > dst.num_blocks):
                raise CopyAborted(COPY_TARGET_DEVICE_NOT_REACHABLE, segments_processed=index,
                                  field_pointer=off + 12)
            segments.append(_Segment(off, src, dst, src_lba, dst_lba, nbytes))
        return segments

    @staticmethod
    def _access_denied(lu: CopyTarget, nexus: ITNexus, segments: list[_Segment]) -> bool:
        """Whether the I_T nexus may not do these copies; checked before any data moves.

        The registry spans the whole daemon, so a CSCD can name a logical unit of another
        target, or one the initiator's ACL does not map (the hole of CVE-2020-28374 in
        Linux LIO).  A logical unit that offers ``copy_access`` (:class:`LogicalUnit`)
        decides: an LU the nexus cannot use is COPY TARGET DEVICE NOT REACHABLE, and one
        whose reservation the access would conflict with makes the command end in
        RESERVATION CONFLICT (returns True), as that READ or WRITE would from the nexus.
        """
        check = getattr(lu, "copy_access", None)
        if check is None:
            return False
        conflict = False
        for index, seg in enumerate(segments):
            for target, write, pointer in ((seg.src, False, seg.offset + 4), (seg.dst, True, seg.offset + 6)):
                verdict = check(target, nexus, write)
                if verdict == "unreachable":
                    raise CopyAborted(COPY_TARGET_DEVICE_NOT_REACHABLE, segments_processed=index,
                                      field_pointer=pointer)
                conflict = conflict or verdict == "conflict"
        return conflict

    def _resolve(self, cscds: list[_Cscd], cscd_index: int, seg_index: int, pointer: int) -> CopyTarget:
        """The LU a segment's CSCD index names, or COPY ABORTED / COPY TARGET DEVICE NOT REACHABLE."""
        lu = None
        if cscd_index < len(cscds):
            cscd = cscds[cscd_index]
            if cscd.designator is not None:
                lu = self._lus.get(cscd.designator)
            if lu is not None and cscd.block_length not in (0, lu.block_size):
                lu = None  # the descriptor describes a different device than the one we found
        if lu is None:
            raise CopyAborted(COPY_TARGET_DEVICE_NOT_REACHABLE, segments_processed=seg_index,
                              field_pointer=pointer)
        return lu

    @staticmethod
    def _steps(seg: _Segment) -> list[tuple[int, int]]:
        """(byte offset into the segment, length) of each read-then-write step, in copy order.

        A segment whose destination overlaps its source further on in the same LU is copied
        from its end backwards, as memmove does: copied forwards, a step would read blocks an
        earlier step had already overwritten, and the destination would end up holding the
        first chunk repeated instead of the source's data (the segment says "copy these
        blocks", SPC-4 §6.4.6.5, not "copy them as they are while being overwritten").
        """
        src_bs, dst_bs = seg.src.block_size, seg.dst.block_size
        step = COPY_CHUNK_BYTES - COPY_CHUNK_BYTES % src_bs
        step -= step % dst_bs
        if step <= 0:  # block sizes larger than a chunk: move one source block at a time
            step = src_bs
        steps = [(done, min(step, seg.nbytes - done)) for done in range(0, seg.nbytes, step)]
        if seg.src is seg.dst:
            src_start, dst_start = seg.src_lba * src_bs, seg.dst_lba * dst_bs
            if src_start < dst_start < src_start + seg.nbytes:
                steps.reverse()
        return steps

    @classmethod
    async def _run(cls, segments: list[_Segment], result: CopyResult) -> None:
        for index, seg in enumerate(segments):
            for done, step in cls._steps(seg):
                try:
                    chunk = await seg.src.read_blocks(seg.src_lba + done // seg.src.block_size,
                                                      step // seg.src.block_size)
                    if len(chunk) != step:
                        raise OSError(f"short read: {len(chunk)} of {step} bytes")
                    await seg.dst.write_blocks(seg.dst_lba + done // seg.dst.block_size, chunk)
                except SenseError as exc:
                    raise CopyAborted(COPY_TARGET_DEVICE_NOT_REACHABLE, segments_processed=index,
                                      field_pointer=seg.offset) from exc
                except OSError as exc:
                    raise CopyAborted(COPY_TARGET_DEVICE_NOT_REACHABLE, segments_processed=index,
                                      field_pointer=seg.offset) from exc
                result.bytes_transferred += step
                # Let every other session run between chunks: a copy of up to 1 GiB must not
                # stall NOP answers or an ATS heartbeat (ESXi drops a datastore after ~8 s).
                await asyncio.sleep(0)
            result.segments_processed = index + 1

    # ----------------------------------------------------------------- RECEIVE COPY RESULTS
    async def receive_copy_results(self, lu: CopyTarget, cmd: ScsiCommand) -> ScsiResult:
        """RECEIVE COPY RESULTS 84h (SPC-4 §6.18): COPY STATUS, OPERATING PARAMETERS, FAILED SEGMENT DETAILS."""
        cdb = cmd.cdb
        if len(cdb) < 16:
            raise illegal_field(0)
        sa = cdb[1] & 0x1F
        alloc = int.from_bytes(cdb[10:14], "big")
        if sa == RCR_OPERATING_PARAMETERS:
            return ScsiResult(data=self.operating_parameters()[:alloc])
        if sa not in (RCR_COPY_STATUS, RCR_FAILED_SEGMENT_DETAILS):
            raise illegal_field(1, 4)
        list_id = cdb[2]
        nexus_results = self._results.get((cmd.nexus.initiator_port, cmd.nexus.target_port))
        result = None if nexus_results is None else nexus_results.held.get(list_id)
        if result is None:
            # No held copy with that list identifier on this I_T nexus.
            raise SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field_pointer=2)
        if sa == RCR_COPY_STATUS:
            units, count = _transfer_count(result.bytes_transferred)
            segs = min(result.segments_processed, 0xFFFF)
            data = struct.pack(">IBHBI", 8, result.status & 0x7F, segs, units, count)
        else:
            data = self._failed_segment_details(result)
        return ScsiResult(data=data[:alloc])

    @staticmethod
    def _failed_segment_details(result: CopyResult) -> bytes:
        if result.status != STATUS_ERRORS or not result.sense:
            return struct.pack(">I", 0)  # nothing failed: no details to report
        body = bytearray(52)  # bytes 4..55 reserved
        body += bytes((0x02, 0))  # COPY COMMAND STATUS: CHECK CONDITION
        body += len(result.sense).to_bytes(2, "big") + result.sense
        return struct.pack(">I", len(body)) + bytes(body)

    @staticmethod
    def operating_parameters() -> bytes:
        """RECEIVE COPY RESULTS / OPERATING PARAMETERS data (SPC-4 §6.18.4)."""
        codes = bytes(SUPPORTED_DESCRIPTOR_CODES)
        body = struct.pack(
            ">B3xHHIIIII2xHBBBB3xB",
            0x01,  # SNLID: LIST ID USAGE 11b is supported
            MAX_TARGET_DESCRIPTORS,
            MAX_SEGMENT_DESCRIPTORS,
            MAX_DESCRIPTOR_LIST_LENGTH,
            MAX_SEGMENT_LENGTH,
            MAX_INLINE_DATA_LENGTH,
            HELD_DATA_LIMIT,
            0,  # MAXIMUM STREAM DEVICE TRANSFER SIZE: no stream devices
            TOTAL_CONCURRENT_COPIES,
            MAX_IDENTIFIED_CONCURRENT_COPIES,
            0,  # DATA SEGMENT GRANULARITY (log2): any block multiple
            0,  # INLINE DATA GRANULARITY
            0,  # HELD DATA GRANULARITY
            len(codes),
        ) + codes
        return struct.pack(">I", len(body)) + body

    # ----------------------------------------------------------------- VPD 8Fh
    @staticmethod
    def vpd_8f(peripheral: int = PERIPHERAL_DIRECT_ACCESS) -> bytes:
        """Third-party Copy VPD page (SPC-4 §7.8.17) describing the LID1 copy manager.

        ``peripheral`` is byte 0 (PERIPHERAL QUALIFIER and DEVICE TYPE) of the LU serving it.
        """
        def desc(dtype: int, payload: bytes) -> bytes:
            payload = _pad4(payload)
            return _U16.pack(dtype) + _U16.pack(len(payload)) + payload

        commands = b""
        for opcode, actions in ((0x83, (0x00,)), (0x84, (RCR_COPY_STATUS, RCR_OPERATING_PARAMETERS,
                                                         RCR_FAILED_SEGMENT_DETAILS))):
            commands += bytes((opcode, len(actions))) + bytes(actions)
        body = desc(0x0001, bytes((len(commands),)) + commands)  # Supported Commands
        body += desc(0x0004, struct.pack(">4xHHII12x", MAX_TARGET_DESCRIPTORS, MAX_SEGMENT_DESCRIPTORS,
                                         MAX_DESCRIPTOR_LIST_LENGTH, MAX_INLINE_DATA_LENGTH))  # Parameter Data
        codes = bytes(SUPPORTED_DESCRIPTOR_CODES)
        body += desc(0x0105, bytes((len(codes),)) + codes)  # Supported Descriptors
        body += desc(0x0106, _U16.pack(0))  # Supported CSCD Descriptor IDs: none
        body += desc(0x8001, struct.pack(">IIIBB18x", TOTAL_CONCURRENT_COPIES, MAX_IDENTIFIED_CONCURRENT_COPIES,
                                         MAX_SEGMENT_LENGTH, 0, 0))  # General Copy Operations
        return bytes((peripheral, 0x8F)) + _U16.pack(len(body)) + body
