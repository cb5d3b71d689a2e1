"""iSCSI PDU codec (RFC 7143 §11): Basic Header Segment, AHS, data segment, padding.

Every PDU has a 48-byte BHS.  Bytes 0-7 carry the opcode, flags, two opcode
specific bytes, TotalAHSLength and DataSegmentLength; bytes 8-15 the LUN (or
ISID/TSIH at login); bytes 16-47 eight 32-bit words whose meaning depends on
the opcode.  So one precompiled ``struct.Struct`` decodes every header, and
each opcode class only names the words it uses.  That keeps the per-PDU path
to a single ``unpack_from`` and a single ``pack``.

Decoding never trusts the peer: :func:`parse_bhs` returns the lengths so the
caller can bound what it reads, and :class:`PduFormatError` carries the
Reject reason (RFC 7143 §11.17.1) to answer with.
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import ClassVar

BHS_LEN = 48
# Bytes 0-3, the length word, the LUN/ISID field and the eight words at 16..47: every BHS.
BHS_STRUCT = struct.Struct(">BBBBIQ8I")
_BHS = BHS_STRUCT
_U32 = struct.Struct(">I")
_AHS_HDR = struct.Struct(">HB")

RESERVED_TAG = 0xFFFFFFFF  # RFC 7143 §11.2.1.8 / §11.9: "no task" tag value


class Opcode(IntEnum):
    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT_REQUEST = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK_REQUEST = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


class RejectReason(IntEnum):
    """RFC 7143 §11.17.1."""

    DATA_DIGEST_ERROR = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_COMMAND_REJECT = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    LONG_OP_REJECT = 0x0A
    DEPRECATED = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class TmfFunction(IntEnum):
    """RFC 7143 §11.5.1."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    """RFC 7143 §11.6.1."""

    COMPLETE = 0
    TASK_DOES_NOT_EXIST = 1
    LUN_DOES_NOT_EXIST = 2
    TASK_STILL_ALLEGIANT = 3
    REASSIGNMENT_NOT_SUPPORTED = 4
    NOT_SUPPORTED = 5
    AUTHORIZATION_FAILED = 6
    REJECTED = 255


class AsyncEvent(IntEnum):
    """RFC 7143 §11.9.1."""

    SCSI_ASYNC_EVENT = 0
    LOGOUT_REQUEST = 1
    CONNECTION_DROP = 2
    SESSION_DROP = 3
    NEGOTIATION_REQUEST = 4
    TASK_TERMINATION = 5
    VENDOR = 255


class LogoutReason(IntEnum):
    CLOSE_SESSION = 0
    CLOSE_CONNECTION = 1
    REMOVE_CONNECTION_FOR_RECOVERY = 2


class PduFormatError(Exception):
    """The peer sent bytes that are not a valid PDU; ``reason`` is the Reject reason to send."""

    def __init__(self, message: str, reason: RejectReason = RejectReason.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


def pad4(n: int) -> int:
    """Bytes of padding after a segment of ``n`` bytes (RFC 7143 §11.1: 4-byte boundary)."""
    return -n & 3


class Pdu:
    """Base of every PDU class: the fields common to all opcodes.

    ``words`` are BHS bytes 16..47 as eight big-endian integers; subclasses name
    the ones they use through :meth:`_from_words` / :meth:`_to_words`.
    """

    OPCODE: ClassVar[Opcode]
    __slots__ = ("immediate", "final", "itt", "ahs", "data")

    def __init__(self, *, immediate: bool = False, final: bool = True, itt: int = 0,
                 ahs: bytes = b"", data: bytes | bytearray | memoryview = b"") -> None:
        self.immediate = immediate
        self.final = final
        self.itt = itt
        self.ahs = ahs
        self.data = data

    # -- subclass hooks -------------------------------------------------
    def _flags(self) -> int:
        """Byte 1 bits other than F."""
        return 0

    def _bytes23(self) -> tuple[int, int]:
        return 0, 0

    def _lun_field(self) -> int:
        return 0

    def _words(self) -> tuple[int, ...]:
        """Words at bytes 20..47 (seven words; ITT at 16 is common)."""
        return (0, 0, 0, 0, 0, 0, 0)

    def _load(self, b1: int, b2: int, b3: int, lun: int, w: tuple[int, ...]) -> None:
        """Fill subclass fields from the decoded BHS (w = words at bytes 20..47)."""

    # -- codec ----------------------------------------------------------
    def header(self) -> bytes:
        """The 48-byte BHS followed by the AHS (no digest, no data)."""
        b2, b3 = self._bytes23()
        b0 = self.OPCODE | (0x40 if self.immediate else 0)
        b1 = (0x80 if self.final else 0) | self._flags()
        ahs = self.ahs
        if len(ahs) & 3:
            raise ValueError("AHS length must be a multiple of 4")
        length_word = ((len(ahs) >> 2) << 24) | len(self.data)
        hdr = _BHS.pack(b0, b1, b2, b3, length_word, self._lun_field(), self.itt, *self._words())
        return hdr + ahs if ahs else hdr

    def encode(self) -> bytes:
        """Whole PDU without digests: header, data, padding."""
        data = self.data
        return b"".join((self.header(), data, b"\0" * pad4(len(data))))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._repr_fields())
        return f"{type(self).__name__}({fields}, data={len(self.data)}B)"

    def _repr_fields(self) -> tuple[str, ...]:
        names: list[str] = []
        for cls in type(self).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if slot not in ("ahs", "data") and slot not in names:
                    names.append(slot)
        return tuple(names)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.encode() == other.encode()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Initiator → target
# ---------------------------------------------------------------------------

class NopOut(Pdu):
    """RFC 7143 §11.18."""

    OPCODE = Opcode.NOP_OUT
    __slots__ = ("lun", "ttt", "cmdsn", "expstatsn")

    def __init__(self, *, lun: int = 0, ttt: int = RESERVED_TAG, cmdsn: int = 0, expstatsn: int = 0,
                 itt: int = RESERVED_TAG, **kw) -> None:
        super().__init__(itt=itt, **kw)
        self.lun, self.ttt, self.cmdsn, self.expstatsn = lun, ttt, cmdsn, expstatsn

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.ttt, self.cmdsn, self.expstatsn, 0, 0, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.lun, self.ttt, self.cmdsn, self.expstatsn = lun, w[0], w[1], w[2]


class ScsiCommandPdu(Pdu):
    """RFC 7143 §11.3.  ``cdb`` may be longer than 16 bytes (extended CDB AHS, §11.2.2.3)."""

    OPCODE = Opcode.SCSI_COMMAND
    __slots__ = ("read", "write", "attr", "lun", "edtl", "cmdsn", "expstatsn", "cdb", "bidi_read_length")

    _CDB_WORDS = struct.Struct(">4I")

    def __init__(self, *, read: bool = False, write: bool = False, attr: int = 1, lun: int = 0,
                 edtl: int = 0, cmdsn: int = 0, expstatsn: int = 0, cdb: bytes = b"",
                 bidi_read_length: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.read, self.write, self.attr, self.lun = read, write, attr, lun
        self.edtl, self.cmdsn, self.expstatsn, self.cdb = edtl, cmdsn, expstatsn, cdb
        self.bidi_read_length = bidi_read_length

    def _flags(self) -> int:
        return (0x40 if self.read else 0) | (0x20 if self.write else 0) | (self.attr & 7)

    def _lun_field(self) -> int:
        return self.lun

    def header(self) -> bytes:
        # Build the AHS for long CDBs / bidirectional commands before the BHS.
        ahs = b""
        cdb = self.cdb
        if len(cdb) > 16:
            ext = cdb[16:]
            ahs += _AHS_HDR.pack(len(ext) + 1, 1) + b"\0" + ext + b"\0" * pad4(len(ext) + 4)
        if self.bidi_read_length is not None:
            ahs += _AHS_HDR.pack(5, 2) + b"\0" + _U32.pack(self.bidi_read_length)
        self.ahs = ahs
        return super().header()

    def _words(self):
        cdb16 = (bytes(self.cdb[:16]) + b"\0" * 16)[:16]
        return (self.edtl, self.cmdsn, self.expstatsn) + self._CDB_WORDS.unpack(cdb16)

    def _load(self, b1, b2, b3, lun, w):
        self.read, self.write, self.attr = bool(b1 & 0x40), bool(b1 & 0x20), b1 & 7
        self.lun, self.edtl, self.cmdsn, self.expstatsn = lun, w[0], w[1], w[2]
        self.cdb = self._CDB_WORDS.pack(*w[3:7])
        self.bidi_read_length = None
        for ahs_type, payload in iter_ahs(self.ahs):
            if ahs_type == 1:  # extended CDB: one reserved byte, then CDB bytes 16..
                self.cdb += bytes(payload[1:])
            elif ahs_type == 2 and len(payload) >= 5:
                self.bidi_read_length = _U32.unpack_from(payload, 1)[0]
            else:
                raise PduFormatError(f"unknown AHS type {ahs_type}", RejectReason.INVALID_PDU_FIELD)


class TaskMgmtRequest(Pdu):
    """RFC 7143 §11.5."""

    OPCODE = Opcode.TASK_MGMT_REQUEST
    __slots__ = ("function", "lun", "rtt", "cmdsn", "expstatsn", "refcmdsn", "expdatasn")

    def __init__(self, *, function: int = 1, lun: int = 0, rtt: int = RESERVED_TAG, cmdsn: int = 0,
                 expstatsn: int = 0, refcmdsn: int = 0, expdatasn: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.function, self.lun, self.rtt, self.cmdsn = function, lun, rtt, cmdsn
        self.expstatsn, self.refcmdsn, self.expdatasn = expstatsn, refcmdsn, expdatasn

    def _flags(self) -> int:
        return self.function & 0x7F

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.rtt, self.cmdsn, self.expstatsn, self.refcmdsn, self.expdatasn, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.function, self.lun = b1 & 0x7F, lun
        self.rtt, self.cmdsn, self.expstatsn, self.refcmdsn, self.expdatasn = w[:5]


class _LoginStages:
    """What Login Request and Response share (§11.12.1-3): T in the F bit position, C,
    CSG/NSG in byte 1, and ISID/TSIH where other PDUs carry the LUN."""

    __slots__ = ()

    @property
    def transit(self) -> bool:
        return self.final  # type: ignore[attr-defined]

    def _flags(self) -> int:
        return (0x40 if self.cont else 0) | ((self.csg & 3) << 2) | (self.nsg & 3)  # type: ignore[attr-defined]

    def _lun_field(self) -> int:
        return (self.isid << 16) | self.tsih  # type: ignore[attr-defined]

    def _load_stages(self, b1: int, lun: int) -> None:
        self.cont, self.csg, self.nsg = bool(b1 & 0x40), (b1 >> 2) & 3, b1 & 3  # type: ignore[attr-defined]
        self.isid, self.tsih = lun >> 16, lun & 0xFFFF  # type: ignore[attr-defined]


class LoginRequest(_LoginStages, Pdu):
    """RFC 7143 §11.12.  The F bit position holds T (transit)."""

    OPCODE = Opcode.LOGIN_REQUEST
    __slots__ = ("cont", "csg", "nsg", "version_max", "version_min", "isid", "tsih", "cid",
                 "cmdsn", "expstatsn")

    def __init__(self, *, transit: bool = False, cont: bool = False, csg: int = 0, nsg: int = 0,
                 version_max: int = 0, version_min: int = 0, isid: int = 0, tsih: int = 0,
                 cid: int = 0, cmdsn: int = 0, expstatsn: int = 0, **kw) -> None:
        kw.setdefault("immediate", True)  # §11.12: the I bit is always 1
        super().__init__(final=transit, **kw)
        self.cont, self.csg, self.nsg = cont, csg, nsg
        self.version_max, self.version_min = version_max, version_min
        self.isid, self.tsih, self.cid, self.cmdsn, self.expstatsn = isid, tsih, cid, cmdsn, expstatsn

    def _bytes23(self):
        return self.version_max, self.version_min

    def _words(self):
        return (self.cid << 16, self.cmdsn, self.expstatsn, 0, 0, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self._load_stages(b1, lun)
        self.version_max, self.version_min = b2, b3
        self.cid, self.cmdsn, self.expstatsn = w[0] >> 16, w[1], w[2]


class TextRequest(Pdu):
    """RFC 7143 §11.10."""

    OPCODE = Opcode.TEXT_REQUEST
    __slots__ = ("cont", "lun", "ttt", "cmdsn", "expstatsn")

    def __init__(self, *, cont: bool = False, lun: int = 0, ttt: int = RESERVED_TAG, cmdsn: int = 0,
                 expstatsn: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.cont, self.lun, self.ttt, self.cmdsn, self.expstatsn = cont, lun, ttt, cmdsn, expstatsn

    def _flags(self) -> int:
        return 0x40 if self.cont else 0

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.ttt, self.cmdsn, self.expstatsn, 0, 0, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.cont, self.lun, self.ttt, self.cmdsn, self.expstatsn = bool(b1 & 0x40), lun, w[0], w[1], w[2]


class DataOut(Pdu):
    """RFC 7143 §11.7."""

    OPCODE = Opcode.DATA_OUT
    __slots__ = ("lun", "ttt", "expstatsn", "datasn", "offset")

    def __init__(self, *, lun: int = 0, ttt: int = RESERVED_TAG, expstatsn: int = 0, datasn: int = 0,
                 offset: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.lun, self.ttt, self.expstatsn, self.datasn, self.offset = lun, ttt, expstatsn, datasn, offset

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.ttt, 0, self.expstatsn, 0, self.datasn, self.offset, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.lun, self.ttt, self.expstatsn, self.datasn, self.offset = lun, w[0], w[2], w[4], w[5]


class LogoutRequest(Pdu):
    """RFC 7143 §11.14."""

    OPCODE = Opcode.LOGOUT_REQUEST
    __slots__ = ("reason", "cid", "cmdsn", "expstatsn")

    def __init__(self, *, reason: int = 0, cid: int = 0, cmdsn: int = 0, expstatsn: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.reason, self.cid, self.cmdsn, self.expstatsn = reason, cid, cmdsn, expstatsn

    def _flags(self) -> int:
        return self.reason & 0x7F

    def _words(self):
        return (self.cid << 16, self.cmdsn, self.expstatsn, 0, 0, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.reason, self.cid, self.cmdsn, self.expstatsn = b1 & 0x7F, w[0] >> 16, w[1], w[2]


class SnackRequest(Pdu):
    """RFC 7143 §11.16."""

    OPCODE = Opcode.SNACK_REQUEST
    __slots__ = ("type", "lun", "ttt", "expstatsn", "begrun", "runlength")

    def __init__(self, *, type: int = 0, lun: int = 0, ttt: int = RESERVED_TAG, expstatsn: int = 0,
                 begrun: int = 0, runlength: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.type, self.lun, self.ttt, self.expstatsn = type, lun, ttt, expstatsn
        self.begrun, self.runlength = begrun, runlength

    def _flags(self) -> int:
        return self.type & 0x0F

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.ttt, 0, self.expstatsn, 0, 0, self.begrun, self.runlength)

    def _load(self, b1, b2, b3, lun, w):
        self.type, self.lun, self.ttt, self.expstatsn = b1 & 0x0F, lun, w[0], w[2]
        self.begrun, self.runlength = w[5], w[6]


# ---------------------------------------------------------------------------
# Target → initiator
# ---------------------------------------------------------------------------

class _TargetPdu(Pdu):
    """Target PDUs all carry StatSN/ExpCmdSN/MaxCmdSN at bytes 24..35."""

    __slots__ = ("statsn", "expcmdsn", "maxcmdsn")

    def __init__(self, *, statsn: int = 0, expcmdsn: int = 0, maxcmdsn: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.statsn, self.expcmdsn, self.maxcmdsn = statsn, expcmdsn, maxcmdsn

    def _load_sn(self, w) -> None:
        self.statsn, self.expcmdsn, self.maxcmdsn = w[1], w[2], w[3]


class NopIn(_TargetPdu):
    """RFC 7143 §11.19."""

    OPCODE = Opcode.NOP_IN
    __slots__ = ("lun", "ttt")

    def __init__(self, *, lun: int = 0, ttt: int = RESERVED_TAG, itt: int = RESERVED_TAG, **kw) -> None:
        super().__init__(itt=itt, **kw)
        self.lun, self.ttt = lun, ttt

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn, 0, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.lun, self.ttt = lun, w[0]
        self._load_sn(w)


class ScsiResponse(_TargetPdu):
    """RFC 7143 §11.4.  ``data`` is SenseLength(2) + sense + response data (§11.4.7)."""

    OPCODE = Opcode.SCSI_RESPONSE
    __slots__ = ("response", "status", "bidi_overflow", "bidi_underflow", "overflow", "underflow",
                 "snack_tag", "expdatasn", "bidi_residual", "residual")

    def __init__(self, *, response: int = 0, status: int = 0, bidi_overflow: bool = False,
                 bidi_underflow: bool = False, overflow: bool = False, underflow: bool = False,
                 snack_tag: int = 0, expdatasn: int = 0, bidi_residual: int = 0, residual: int = 0,
                 **kw) -> None:
        super().__init__(**kw)
        self.response, self.status = response, status
        self.bidi_overflow, self.bidi_underflow = bidi_overflow, bidi_underflow
        self.overflow, self.underflow = overflow, underflow
        self.snack_tag, self.expdatasn, self.bidi_residual, self.residual = snack_tag, expdatasn, bidi_residual, residual

    @staticmethod
    def sense_segment(sense: bytes) -> bytes:
        return struct.pack(">H", len(sense)) + sense if sense else b""

    @property
    def sense(self) -> bytes:
        data = bytes(self.data)
        if len(data) < 2:
            return b""
        n = struct.unpack_from(">H", data)[0]
        return data[2:2 + n]

    def _flags(self) -> int:
        return ((0x10 if self.bidi_overflow else 0) | (0x08 if self.bidi_underflow else 0)
                | (0x04 if self.overflow else 0) | (0x02 if self.underflow else 0))

    def _bytes23(self):
        return self.response, self.status

    def _words(self):
        return (self.snack_tag, self.statsn, self.expcmdsn, self.maxcmdsn, self.expdatasn,
                self.bidi_residual, self.residual)

    def _load(self, b1, b2, b3, lun, w):
        self.bidi_overflow, self.bidi_underflow = bool(b1 & 0x10), bool(b1 & 0x08)
        self.overflow, self.underflow = bool(b1 & 0x04), bool(b1 & 0x02)
        self.response, self.status = b2, b3
        self.snack_tag = w[0]
        self._load_sn(w)
        self.expdatasn, self.bidi_residual, self.residual = w[4], w[5], w[6]


class TaskMgmtResponse(_TargetPdu):
    """RFC 7143 §11.6."""

    OPCODE = Opcode.TASK_MGMT_RESPONSE
    __slots__ = ("response",)

    def __init__(self, *, response: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.response = response

    def _bytes23(self):
        return self.response, 0

    def _words(self):
        return (0, self.statsn, self.expcmdsn, self.maxcmdsn, 0, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.response = b2
        self._load_sn(w)


class LoginResponse(_LoginStages, _TargetPdu):
    """RFC 7143 §11.13."""

    OPCODE = Opcode.LOGIN_RESPONSE
    __slots__ = ("cont", "csg", "nsg", "version_max", "version_active", "isid", "tsih",
                 "status_class", "status_detail")

    def __init__(self, *, transit: bool = False, cont: bool = False, csg: int = 0, nsg: int = 0,
                 version_max: int = 0, version_active: int = 0, isid: int = 0, tsih: int = 0,
                 status_class: int = 0, status_detail: int = 0, **kw) -> None:
        super().__init__(final=transit, **kw)
        self.cont, self.csg, self.nsg = cont, csg, nsg
        self.version_max, self.version_active = version_max, version_active
        self.isid, self.tsih = isid, tsih
        self.status_class, self.status_detail = status_class, status_detail

    def _bytes23(self):
        return self.version_max, self.version_active

    def _words(self):
        return (0, self.statsn, self.expcmdsn, self.maxcmdsn,
                (self.status_class << 24) | (self.status_detail << 16), 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self._load_stages(b1, lun)
        self.version_max, self.version_active = b2, b3
        self._load_sn(w)
        self.status_class, self.status_detail = w[4] >> 24, (w[4] >> 16) & 0xFF


class TextResponse(_TargetPdu):
    """RFC 7143 §11.11."""

    OPCODE = Opcode.TEXT_RESPONSE
    __slots__ = ("cont", "lun", "ttt")

    def __init__(self, *, cont: bool = False, lun: int = 0, ttt: int = RESERVED_TAG, **kw) -> None:
        super().__init__(**kw)
        self.cont, self.lun, self.ttt = cont, lun, ttt

    def _flags(self) -> int:
        return 0x40 if self.cont else 0

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn, 0, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.cont, self.lun, self.ttt = bool(b1 & 0x40), lun, w[0]
        self._load_sn(w)


class DataIn(_TargetPdu):
    """RFC 7143 §11.7.  With ``has_status`` (S bit) it carries the command's status too."""

    OPCODE = Opcode.DATA_IN
    __slots__ = ("ack", "overflow", "underflow", "has_status", "status", "lun", "ttt",
                 "datasn", "offset", "residual")

    def __init__(self, *, ack: bool = False, overflow: bool = False, underflow: bool = False,
                 has_status: bool = False, status: int = 0, lun: int = 0, ttt: int = RESERVED_TAG,
                 datasn: int = 0, offset: int = 0, residual: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.ack, self.overflow, self.underflow = ack, overflow, underflow
        self.has_status, self.status, self.lun, self.ttt = has_status, status, lun, ttt
        self.datasn, self.offset, self.residual = datasn, offset, residual

    def _flags(self) -> int:
        return ((0x40 if self.ack else 0) | (0x04 if self.overflow else 0)
                | (0x02 if self.underflow else 0) | (0x01 if self.has_status else 0))

    def _bytes23(self):
        return 0, self.status

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn, self.datasn, self.offset, self.residual)

    def _load(self, b1, b2, b3, lun, w):
        self.ack, self.overflow, self.underflow = bool(b1 & 0x40), bool(b1 & 0x04), bool(b1 & 0x02)
        self.has_status, self.status, self.lun, self.ttt = bool(b1 & 0x01), b3, lun, w[0]
        self._load_sn(w)
        self.datasn, self.offset, self.residual = w[4], w[5], w[6]


class LogoutResponse(_TargetPdu):
    """RFC 7143 §11.15."""

    OPCODE = Opcode.LOGOUT_RESPONSE
    __slots__ = ("response", "time2wait", "time2retain")

    def __init__(self, *, response: int = 0, time2wait: int = 0, time2retain: int = 0, **kw) -> None:
        super().__init__(**kw)
        self.response, self.time2wait, self.time2retain = response, time2wait, time2retain

    def _bytes23(self):
        return self.response, 0

    def _words(self):
        return (0, self.statsn, self.expcmdsn, self.maxcmdsn, 0,
                (self.time2wait << 16) | self.time2retain, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.response = b2
        self._load_sn(w)
        self.time2wait, self.time2retain = w[5] >> 16, w[5] & 0xFFFF


class R2T(_TargetPdu):
    """RFC 7143 §11.8."""

    OPCODE = Opcode.R2T
    __slots__ = ("lun", "ttt", "r2tsn", "offset", "length")

    def __init__(self, *, lun: int = 0, ttt: int = 0, r2tsn: int = 0, offset: int = 0, length: int = 0,
                 **kw) -> None:
        super().__init__(**kw)
        self.lun, self.ttt, self.r2tsn, self.offset, self.length = lun, ttt, r2tsn, offset, length

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (self.ttt, self.statsn, self.expcmdsn, self.maxcmdsn, self.r2tsn, self.offset, self.length)

    def _load(self, b1, b2, b3, lun, w):
        self.lun, self.ttt = lun, w[0]
        self._load_sn(w)
        self.r2tsn, self.offset, self.length = w[4], w[5], w[6]


class AsyncMessage(_TargetPdu):
    """RFC 7143 §11.9."""

    OPCODE = Opcode.ASYNC_MESSAGE
    __slots__ = ("lun", "event", "vcode", "param1", "param2", "param3")

    def __init__(self, *, lun: int = 0, event: int = 0, vcode: int = 0, param1: int = 0, param2: int = 0,
                 param3: int = 0, itt: int = RESERVED_TAG, **kw) -> None:
        super().__init__(itt=itt, **kw)
        self.lun, self.event, self.vcode = lun, event, vcode
        self.param1, self.param2, self.param3 = param1, param2, param3

    def _lun_field(self) -> int:
        return self.lun

    def _words(self):
        return (0, self.statsn, self.expcmdsn, self.maxcmdsn,
                (self.event << 24) | (self.vcode << 16) | self.param1,
                (self.param2 << 16) | self.param3, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.lun = lun
        self._load_sn(w)
        self.event, self.vcode, self.param1 = w[4] >> 24, (w[4] >> 16) & 0xFF, w[4] & 0xFFFF
        self.param2, self.param3 = w[5] >> 16, w[5] & 0xFFFF


class Reject(_TargetPdu):
    """RFC 7143 §11.17.  ``data`` holds the header of the rejected PDU."""

    OPCODE = Opcode.REJECT
    __slots__ = ("reason", "datasn")

    def __init__(self, *, reason: int = RejectReason.PROTOCOL_ERROR, datasn: int = 0,
                 itt: int = RESERVED_TAG, **kw) -> None:
        super().__init__(itt=itt, **kw)
        self.reason, self.datasn = reason, datasn

    def _bytes23(self):
        return self.reason, 0

    def _words(self):
        return (0, self.statsn, self.expcmdsn, self.maxcmdsn, self.datasn, 0, 0)

    def _load(self, b1, b2, b3, lun, w):
        self.reason = b2
        self._load_sn(w)
        self.datasn = w[4]


PDU_CLASSES: dict[int, type[Pdu]] = {
    cls.OPCODE: cls
    for cls in (NopOut, ScsiCommandPdu, TaskMgmtRequest, LoginRequest, TextRequest, DataOut,
                LogoutRequest, SnackRequest, NopIn, ScsiResponse, TaskMgmtResponse, LoginResponse,
                TextResponse, DataIn, LogoutResponse, R2T, AsyncMessage, Reject)
}
INITIATOR_OPCODES = frozenset(op for op in PDU_CLASSES if op < 0x20)
TARGET_OPCODES = frozenset(op for op in PDU_CLASSES if op >= 0x20)
#: Requests that start a task of their own: their ITT names it, and 0xffffffff "is reserved and
#: MUST NOT be assigned for a task by the initiator" (RFC 7143 §11.2.1.8; only NOP-Out, answering
#: a NOP-In, carries it).  A command under it could never be aborted or told apart.
_TASK_OPCODES = frozenset({Opcode.SCSI_COMMAND, Opcode.TASK_MGMT_REQUEST, Opcode.TEXT_REQUEST,
                           Opcode.LOGOUT_REQUEST})


def request_violation(pdu: Pdu) -> tuple[RejectReason, str] | None:
    """What a target must refuse in a decoded initiator request, as (Reject reason, why); None
    when it may act on it.

    :func:`decode` is a faithful codec (any field value round-trips); these are the values a
    target must not act on though they decode, checked where requests are dispatched:
    - a task's ITT 0xffffffff (RFC 7143 §11.2.1.8);
    - a Logout reason code 3-127, reserved (§11.14.1) -- taking one for "close the session"
      would end what the initiator never asked to end.
    Both are answered with Reject 0x09 (invalid PDU field, §11.17.1) and the connection goes on.
    """
    if pdu.itt == RESERVED_TAG and pdu.OPCODE in _TASK_OPCODES:
        return RejectReason.INVALID_PDU_FIELD, f"{type(pdu).__name__} with the reserved ITT 0xffffffff"
    if pdu.OPCODE == Opcode.LOGOUT_REQUEST and pdu.reason > max(LogoutReason):  # type: ignore[attr-defined]
        return RejectReason.INVALID_PDU_FIELD, f"reserved Logout reason code {pdu.reason}"  # type: ignore[attr-defined]
    return None


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

def iter_ahs(ahs: bytes | memoryview):
    """Yield (type, payload) for each AHS (RFC 7143 §11.2.2)."""
    pos, end = 0, len(ahs)
    while pos < end:
        if end - pos < 4:
            raise PduFormatError("truncated AHS", RejectReason.INVALID_PDU_FIELD)
        length, ahs_type = _AHS_HDR.unpack_from(ahs, pos)
        payload = ahs[pos + 3:pos + 3 + length]
        if len(payload) != length:
            raise PduFormatError("AHS length beyond TotalAHSLength", RejectReason.INVALID_PDU_FIELD)
        pos += 3 + length + pad4(3 + length)
        yield ahs_type, payload


def parse_bhs(bhs: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """Return (opcode, AHS length in bytes, data segment length) from the first 48 bytes."""
    if len(bhs) < BHS_LEN:
        raise PduFormatError("truncated BHS")
    length_word = _U32.unpack_from(bhs, 4)[0]
    return bhs[0] & 0x3F, (length_word >> 24) * 4, length_word & 0xFFFFFF


def decode(bhs: bytes | bytearray | memoryview, ahs: bytes = b"",
           data: bytes | bytearray | memoryview = b"", *, allowed: frozenset[int] | None = None,
           offset: int = 0, fields: tuple[int, ...] | None = None) -> Pdu:
    """Build the typed PDU from its BHS, AHS and (unpadded) data segment.

    ``allowed`` restricts the opcodes accepted (a target accepts only initiator
    opcodes); anything else raises :class:`PduFormatError` with reason
    COMMAND_NOT_SUPPORTED (RFC 7143 §11.17.1: unknown opcodes are rejected).
    The BHS starts at ``offset`` of ``bhs``; ``fields`` is its BHS_STRUCT unpacking when
    the caller already made it (the stream reader does: no copy of the header, one unpack).
    """
    if fields is None:
        fields = _BHS.unpack_from(bhs, offset)
    b0 = fields[0]
    opcode = b0 & 0x3F
    if opcode == 0x01 and not ahs and (allowed is None or opcode in allowed):
        # The hot path: a SCSI Command without AHS, decoded inline (no _load call).
        pdu = ScsiCommandPdu.__new__(ScsiCommandPdu)
        b1 = fields[1]
        pdu.immediate = b0 & 0x40 != 0
        pdu.final = b1 & 0x80 != 0
        pdu.read = b1 & 0x40 != 0
        pdu.write = b1 & 0x20 != 0
        pdu.attr = b1 & 7
        pdu.lun = fields[5]
        pdu.itt = fields[6]
        pdu.edtl = fields[7]
        pdu.cmdsn = fields[8]
        pdu.expstatsn = fields[9]
        pdu.cdb = bhs[offset + 32:offset + 48] if type(bhs) is bytes else bytes(bhs[offset + 32:offset + 48])
        pdu.bidi_read_length = None
        pdu.ahs = b""
        pdu.data = data
        return pdu
    cls = PDU_CLASSES.get(opcode)
    if cls is None or (allowed is not None and opcode not in allowed):
        raise PduFormatError(f"unsupported opcode 0x{opcode:02x}", RejectReason.COMMAND_NOT_SUPPORTED)
    pdu = cls.__new__(cls)
    pdu.immediate = bool(b0 & 0x40)
    pdu.final = bool(fields[1] & 0x80)
    pdu.itt = fields[6]
    pdu.ahs = bytes(ahs)
    pdu.data = data
    pdu._load(fields[1], fields[2], fields[3], fields[5], fields[7:])
    return pdu


def decode_pdu(raw: bytes | bytearray | memoryview, *, allowed: frozenset[int] | None = None) -> Pdu:
    """Decode one whole PDU (no digests) from ``raw``; convenience for tests and tools."""
    _op, ahs_len, data_len = parse_bhs(raw)
    end = BHS_LEN + ahs_len
    if len(raw) < end + data_len:
        raise PduFormatError("truncated PDU")
    return decode(raw[:BHS_LEN], bytes(raw[BHS_LEN:end]), bytes(raw[end:end + data_len]), allowed=allowed)


def encode_lun(lun: int) -> int:
    """SAM-5 §4.7.3 single-level LUN as the 64-bit BHS field: peripheral (<256) or flat addressing."""
    if lun < 256:
        return lun << 48
    if lun < 0x4000:
        return (0x4000 | lun) << 48
    raise ValueError(f"LUN {lun} needs extended addressing")


def decode_lun(field: int) -> int:
    """Inverse of :func:`encode_lun`; returns -1 for address methods we do not serve."""
    first = field >> 48
    method = first >> 14
    if method == 0:  # peripheral device addressing, bus 0
        return first & 0xFF if (first >> 8) == 0 else -1
    if method == 1:  # flat space addressing
        return first & 0x3FFF
    return -1
