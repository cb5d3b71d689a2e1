"""Reservations of one logical unit: SPC-4 persistent reservations and SPC-2 RESERVE/RELEASE.

Pure logic: the logical unit feeds it commands and asks it, before running any other command,
whether that command conflicts (:meth:`PersistentReservations.check_conflict`).  Nothing here
does I/O except the optional ``persist`` callback used for APTPL (SPC-4 §5.13.5).

Wiring expected from the logical unit (see also the module's report in the project notes):

* every command, after its opcode is known to be supported and before it runs:
  ``if pr.check_conflict(cmd.nexus, cmd.cdb): return ScsiResult(Status.RESERVATION_CONFLICT)``;
* 0x5E PERSISTENT RESERVE IN  -> :meth:`persistent_reserve_in`;
* 0x5F PERSISTENT RESERVE OUT -> :meth:`persistent_reserve_out` (PREEMPT AND ABORT puts the
  I_T nexuses whose tasks must be aborted in ``result.extra["abort_nexuses"]``);
* 0x16/0x56 RESERVE(6)/(10) -> :meth:`reserve`, 0x17/0x57 RELEASE(6)/(10) -> :meth:`release`;
* I_T nexus loss (session closed, connection dropped) -> :meth:`nexus_lost`;
* LOGICAL UNIT RESET, TARGET WARM/COLD RESET -> :meth:`lun_reset`.

Handlers raise :class:`~iscsi.scsi.sense.SenseError` for CHECK CONDITION and return a
:class:`ScsiResult` with RESERVATION CONFLICT status (no sense) for conflicts.

Identity: an I_T nexus is (initiator port name, target port name) as carried by :class:`ITNexus`
(RFC 7143 §4.2.7.1 SCSI port names, which the transport gives in canonical lower case).  A
registration made with ALL_TG_PT=1 has no target port and covers the initiator port on every
target port.  A registration created from a TransportID without ISID (format 00b) covers every
initiator port of that iSCSI name.  Where such a registration has to be named to the LU (unit
attentions, aborts) it is an :class:`ITNexus` whose ``target_port`` is ``""`` (every target port)
and whose ``initiator_port`` may be a bare iSCSI name (every ISID).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterable, Mapping

from .sense import (
    PARAMETER_LIST_LENGTH_ERROR,
    REGISTRATIONS_PREEMPTED,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    SenseError,
    SenseKey,
    illegal_field,
    illegal_param,
)
from .types import ITNexus, ScsiCommand, ScsiResult, Status

__all__ = [
    "PrType",
    "PrOutAction",
    "PrInAction",
    "Registration",
    "PersistentReservations",
    "encode_iscsi_transport_id",
    "parse_iscsi_transport_id",
    "nexus_matches",
    "STATE_VERSION",
]

# SPC-4 Annex D: ILLEGAL REQUEST / INVALID RELEASE OF PERSISTENT RESERVATION.
INVALID_RELEASE_OF_PERSISTENT_RESERVATION = (0x26, 0x04)

UaSink = Callable[[ITNexus | None, tuple[int, int], ITNexus | None], None]
PersistFn = Callable[[dict], None]

#: Version of the dictionary returned by :meth:`PersistentReservations.state`.
STATE_VERSION = 1

#: SPC-4 §6.15.2: the PRGENERATION field is four bytes and the counter wraps.
GENERATION_MASK = 0xFFFFFFFF

#: SPC-4 §6.16.3: every service action but REGISTER AND MOVE (and SPEC_I_PT=1) takes exactly
#: this many parameter bytes.
BASIC_PARAMETER_LIST_LENGTH = 24

#: Protocol identifier of iSCSI in TransportIDs (SPC-4 §7.6.2, Table "PROTOCOL IDENTIFIER").
PROTOCOL_ID_ISCSI = 0x5

#: SPC-4 §7.6.4.6: the iSCSI TransportID's ADDITIONAL LENGTH is at least 20 and a multiple of 4.
MIN_ISCSI_TRANSPORT_ID_LENGTH = 24

#: RFC 7143 §4.2.7.1 / §6.6: iSCSI names are at most 223 bytes; with ",i,0x" and a 12-digit ISID
#: and the terminating NUL the TransportID stays well below this, so anything longer is bogus.
MAX_ISCSI_TRANSPORT_ID_LENGTH = 256

#: REPORT CAPABILITIES ALLOW COMMANDS (SPC-4 §6.15.4) = 011b: TEST UNIT READY and PERSISTENT
#: RESERVE IN pass every reservation, and MODE SENSE, READ BUFFER, READ ATTRIBUTE, RECEIVE COPY
#: RESULTS, RECEIVE DIAGNOSTIC RESULTS, REPORT SUPPORTED OPERATION CODES / TMF pass Write
#: Exclusive ones.  That is what :data:`_ACCESS` below implements.
ALLOW_COMMANDS = 0b011


class PrType(IntEnum):
    """Persistent reservation TYPE codes (SPC-4 §6.16.2 Table "Persistent reservation type codes")."""

    WRITE_EXCLUSIVE = 0x1
    EXCLUSIVE_ACCESS = 0x3
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
    WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
    EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8


class PrOutAction(IntEnum):
    """PERSISTENT RESERVE OUT service actions (SPC-4 §6.16.2)."""

    REGISTER = 0x00
    RESERVE = 0x01
    RELEASE = 0x02
    CLEAR = 0x03
    PREEMPT = 0x04
    PREEMPT_AND_ABORT = 0x05
    REGISTER_AND_IGNORE_EXISTING_KEY = 0x06
    REGISTER_AND_MOVE = 0x07
    REPLACE_LOST_RESERVATION = 0x08


class PrInAction(IntEnum):
    """PERSISTENT RESERVE IN service actions (SPC-4 §6.15.1)."""

    READ_KEYS = 0x00
    READ_RESERVATION = 0x01
    REPORT_CAPABILITIES = 0x02
    READ_FULL_STATUS = 0x03


_VALID_TYPES = frozenset(int(t) for t in PrType)
_ALL_REGISTRANTS = frozenset((PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS, PrType.EXCLUSIVE_ACCESS_ALL_REGISTRANTS))
_REGISTRANTS_ONLY = frozenset((PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.EXCLUSIVE_ACCESS_REGISTRANTS_ONLY))
#: Types whose registrants all get full access (SPC-4 Table 63 column "from any registered I_T nexus").
_REGISTRANT_ACCESS = _ALL_REGISTRANTS | _REGISTRANTS_ONLY
#: Types under which non-holders may still read.
_WRITE_EXCLUSIVE_FAMILY = frozenset((
    PrType.WRITE_EXCLUSIVE, PrType.WRITE_EXCLUSIVE_REGISTRANTS_ONLY, PrType.WRITE_EXCLUSIVE_ALL_REGISTRANTS,
))
LU_SCOPE = 0x0

# REPORT CAPABILITIES type mask (SPC-4 §6.15.4): byte 4 bits 7,6,5,3,1 and byte 5 bit 0.
_TYPE_MASK = (
    (0x80 << 8)  # WR_EX_AR
    | (0x40 << 8)  # EX_AC_RO
    | (0x20 << 8)  # WR_EX_RO
    | (0x08 << 8)  # EX_AC
    | (0x02 << 8)  # WR_EX
    | 0x01  # EX_AC_AR
)

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HDR = struct.Struct(">II")  # PRGENERATION, ADDITIONAL LENGTH
_BASIC = struct.Struct(">QQ4xBxH")  # RESERVATION KEY, SA RESERVATION KEY, obsolete, flags, obsolete
_MOVE = struct.Struct(">QQxBHI")  # REGISTER AND MOVE: keys, flags (UNREG, APTPL), REL TGT PORT, TID LEN
_FULL_DESC = struct.Struct(">Q4xBB4xHI")  # READ FULL STATUS descriptor header (24 bytes)
_RES_DESC = struct.Struct(">Q4xxBH")  # READ RESERVATION descriptor (16 bytes)


# --------------------------------------------------------------------------------------------
# Access classes: SPC-4 §5.13.1 Table 63 "SPC commands that are allowed in the presence of
# various reservations" and SBC-4 §4.18 Table "SBC commands that are allowed in the presence of
# various reservations".  Every row of those tables is one of three patterns:
#
#                        WE    EA    registered(RO/AR)  unregistered WE-RO/AR  unregistered EA-RO/AR
#   _ALL   (always)      A     A     A                  A                      A
#   _READ  (read-like)   A     C     A                  A                      C
#   _WRITE (everything)  C     C     A                  C                      C
#
# (A = allowed, C = RESERVATION CONFLICT; the reservation holder is always allowed.)
# Read-like rows follow the SPC-5 relaxation already used by FreeBSD CTL: commands that only
# return data (MODE SENSE, READ BUFFER...) pass Write Exclusive reservations like READ does.
# --------------------------------------------------------------------------------------------
_ALL, _READ, _WRITE = 0, 1, 2
_SPECIAL = 3  # decided by a CDB field, see _classify()

_ALWAYS_OPS = {
    0x00: "TEST UNIT READY",
    0x03: "REQUEST SENSE",
    0x12: "INQUIRY",
    0x16: "RESERVE(6)",  # decided by reserve() (SPC-4 §5.13.3, CRH=1)
    0x17: "RELEASE(6)",
    0x25: "READ CAPACITY(10)",
    0x4D: "LOG SENSE",
    0x56: "RESERVE(10)",
    0x57: "RELEASE(10)",
    0x5E: "PERSISTENT RESERVE IN",  # key checks are done by the PR handlers themselves
    0x5F: "PERSISTENT RESERVE OUT",
    0xA0: "REPORT LUNS",
}
_READ_OPS = {
    0x08: "READ(6)",
    0x1A: "MODE SENSE(6)",
    0x1C: "RECEIVE DIAGNOSTIC RESULTS",
    0x28: "READ(10)",
    0x2F: "VERIFY(10)",
    0x34: "PRE-FETCH(10)",
    0x37: "READ DEFECT DATA(10)",
    0x3C: "READ BUFFER(10)",
    0x3E: "READ LONG(10)",
    0x5A: "MODE SENSE(10)",
    0x84: "RECEIVE COPY RESULTS",
    0x88: "READ(16)",
    0x8C: "READ ATTRIBUTE",
    0x8F: "VERIFY(16)",
    0x90: "PRE-FETCH(16)",
    0xA8: "READ(12)",
    0xAF: "VERIFY(12)",
    0xB7: "READ DEFECT DATA(12)",
}
_SPECIAL_OPS = {
    0x1B: "START STOP UNIT",
    0x1E: "PREVENT ALLOW MEDIUM REMOVAL",
    0x7F: "variable length (READ/VERIFY/WRITE(32))",
    0x9E: "SERVICE ACTION IN(16)",
    0xA3: "MAINTENANCE IN",
    0xAB: "SERVICE ACTION IN(12)",
}


def _build_access_table() -> tuple[int, ...]:
    table = [_WRITE] * 256
    for op in _ALWAYS_OPS:
        table[op] = _ALL
    for op in _READ_OPS:
        table[op] = _READ
    for op in _SPECIAL_OPS:
        table[op] = _SPECIAL
    return tuple(table)


_ACCESS = _build_access_table()

# SERVICE ACTION IN(16): READ CAPACITY(16) always; READ LONG(16), GET LBA STATUS, REPORT REFERRALS read-like.
_SAI16 = {0x10: _ALL, 0x11: _READ, 0x12: _READ, 0x13: _READ}
# MAINTENANCE IN: REPORT IDENTIFYING INFORMATION, REPORT TARGET PORT GROUPS, REPORT SUPPORTED
# OPERATION CODES, REPORT SUPPORTED TMF, REPORT PRIORITY, REPORT TIMESTAMP.
_MAINT_IN = {0x05: _ALL, 0x0A: _ALL, 0x0C: _ALL, 0x0D: _ALL, 0x0E: _ALL, 0x0F: _ALL}
# Variable-length CDB service actions (SBC-4): READ(32), VERIFY(32).
_VAR32 = {0x0009: _READ, 0x000A: _READ}


def _classify(cdb: bytes) -> int:
    op = cdb[0]
    access = _ACCESS[op]
    if access != _SPECIAL:
        return access
    if op == 0x9E:
        return _SAI16.get(cdb[1] & 0x1F, _WRITE) if len(cdb) > 1 else _WRITE
    if op == 0xA3:
        return _MAINT_IN.get(cdb[1] & 0x1F, _WRITE) if len(cdb) > 1 else _WRITE
    if op == 0x1B:
        # SBC-4: START STOP UNIT with START=1 and POWER CONDITION=0h is allowed, else conflicts.
        if len(cdb) > 4 and cdb[4] & 0x01 and not cdb[4] & 0xF0:
            return _ALL
        return _WRITE
    if op == 0x1E:
        # SPC-4 Table 63: PREVENT ALLOW MEDIUM REMOVAL with PREVENT=00b is allowed, else conflicts.
        return _ALL if len(cdb) > 4 and cdb[4] & 0x03 == 0 else _WRITE
    if op == 0x7F:
        return _VAR32.get(int.from_bytes(cdb[8:10], "big"), _WRITE) if len(cdb) >= 10 else _WRITE
    if op == 0xAB:
        return _ALL if len(cdb) > 1 and cdb[1] & 0x1F == 0x01 else _WRITE  # READ MEDIA SERIAL NUMBER
    return _WRITE


#: SPC-2 §5.5.1 (RESERVE/RELEASE management method): commands another I_T nexus may still send
#: while the logical unit is reserved with RESERVE.  Everything else, MODE SENSE and TEST UNIT
#: READY included, gets RESERVATION CONFLICT (libiscsi test_reserve6_2initiators checks MODE SENSE).
_SCSI2_ALLOWED = frozenset((
    0x03,  # REQUEST SENSE
    0x12,  # INQUIRY
    0x17,  # RELEASE(6)  (GOOD, no effect, for a non-holder)
    0x4D,  # LOG SENSE
    0x57,  # RELEASE(10)
    0xA0,  # REPORT LUNS
))


def _scsi2_allowed(cdb: bytes) -> bool:
    op = cdb[0]
    if op in _SCSI2_ALLOWED:
        return True
    if op == 0x1E:  # PREVENT ALLOW MEDIUM REMOVAL with PREVENT=0
        return len(cdb) > 4 and cdb[4] & 0x03 == 0
    if op == 0xA3:  # REPORT TARGET PORT GROUPS / SUPPORTED OPCODES / SUPPORTED TMF
        return len(cdb) > 1 and cdb[1] & 0x1F in (0x0A, 0x0C, 0x0D)
    return False


# --------------------------------------------------------------------------------------------
# iSCSI TransportIDs (SPC-4 §7.6.4.6)
# --------------------------------------------------------------------------------------------
_ISID_SEP = ",i,0x"


def encode_iscsi_transport_id(initiator_port: str) -> bytes:
    """TransportID for an iSCSI initiator port.

    ``"<name>,i,0x<isid>"`` gives FORMAT CODE 01b (initiator port), a bare ``"<name>"`` gives
    00b (every port of that initiator device).  The name is NUL-terminated and padded with
    zeros so that the length is a multiple of 4 and at least 24 bytes.
    """
    fmt = 0x01 if ",i," in initiator_port else 0x00
    name = initiator_port.encode("utf-8") + b"\x00"
    body_len = max(MIN_ISCSI_TRANSPORT_ID_LENGTH - 4, (len(name) + 3) & ~3)
    return bytes(((fmt << 6) | PROTOCOL_ID_ISCSI, 0)) + body_len.to_bytes(2, "big") + name.ljust(body_len, b"\x00")


def parse_iscsi_transport_id(data: bytes | memoryview, base: int = 0) -> tuple[str, int]:
    """Parse one iSCSI TransportID; return (initiator port or bare name, bytes consumed).

    ``base`` is the TransportID's offset in the parameter list, used only for the sense
    field pointer.  Raises INVALID FIELD IN PARAMETER LIST for anything malformed.
    """
    data = bytes(data)
    if len(data) < MIN_ISCSI_TRANSPORT_ID_LENGTH:
        raise illegal_param(base)
    fmt = data[0] >> 6
    if data[0] & 0x0F != PROTOCOL_ID_ISCSI:
        raise illegal_param(base, 3)
    if fmt not in (0, 1):
        raise illegal_param(base, 7)
    length = 4 + int.from_bytes(data[2:4], "big")
    if length > len(data) or length > MAX_ISCSI_TRANSPORT_ID_LENGTH or length % 4:
        raise illegal_param(base + 2)
    raw = data[4:length]
    nul = raw.find(b"\x00")
    if nul <= 0:
        raise illegal_param(base + 4)
    try:
        text = raw[:nul].decode("utf-8").lower()
    except UnicodeDecodeError:
        raise illegal_param(base + 4) from None
    if fmt == 1:
        name, sep, isid = text.partition(_ISID_SEP)
        if not sep or not name or len(isid) != 12 or any(c not in "0123456789abcdef" for c in isid):
            raise illegal_param(base + 4)
    elif "," in text:
        raise illegal_param(base + 4)
    return text, length


def nexus_matches(pattern: ITNexus, nexus: ITNexus) -> bool:
    """Whether ``nexus`` is one of the I_T nexuses ``pattern`` names in a ``ua_sink`` call or an
    ``abort_nexuses`` list: same initiator port (or iSCSI name, when ``pattern`` has no ISID)
    and same target port (any, when ``pattern.target_port`` is ``""``).  Relative port id and
    target port group are not compared: the port names identify the nexus."""
    if pattern.target_port and pattern.target_port != nexus.target_port:
        return False
    if pattern.initiator_port == nexus.initiator_port:
        return True
    return "," not in pattern.initiator_port and pattern.initiator_port == nexus.initiator_name


# --------------------------------------------------------------------------------------------
# Registrations
# --------------------------------------------------------------------------------------------
@dataclass(slots=True, eq=False)
class Registration:
    """One registered I_T nexus (or set of them, see the module docstring) and its key."""

    initiator_port: str
    target_port: str | None  # None: ALL_TG_PT=1, every target port
    relative_port_id: int
    key: int

    @property
    def all_tg_pt(self) -> bool:
        return self.target_port is None

    def covers(self, nexus: ITNexus) -> bool:
        return nexus_matches(self.as_nexus(), nexus)

    def as_nexus(self) -> ITNexus:
        """The registration as an :class:`ITNexus` (``target_port == ""`` for every target port)."""
        return ITNexus(self.initiator_port, self.target_port or "", self.relative_port_id)

    def to_dict(self) -> dict:
        return {
            "initiator_port": self.initiator_port,
            "target_port": self.target_port,
            "relative_port_id": self.relative_port_id,
            "key": self.key,
        }


def _conflict() -> ScsiResult:
    return ScsiResult(status=Status.RESERVATION_CONFLICT)


def _check_type_scope(cdb: bytes) -> int:
    """Validate SCOPE and TYPE of a PERSISTENT RESERVE OUT CDB (SPC-4 §6.16.2) and return TYPE."""
    scope, pr_type = cdb[2] >> 4, cdb[2] & 0x0F
    if scope != LU_SCOPE:
        raise illegal_field(2, 7)
    if pr_type not in _VALID_TYPES:
        raise illegal_field(2, 3)
    return pr_type


class PersistentReservations:
    """Reservation state of one logical unit.

    ``ua_sink(target, (asc, ascq), except_nexus)`` establishes a unit attention for ``target``
    (``None``: every I_T nexus), never for ``except_nexus``.  ``persist(state)`` is called with
    :meth:`state` whenever APTPL is active and the state changed (and once more when APTPL is
    switched off, with ``"aptpl": False``, so the saved copy stops counting).  ``state`` restores
    a dictionary saved that way.  ``target_ports()`` may return the LU's target ports as
    {relative port id: target port name} for REGISTER AND MOVE; ports seen in PR commands are
    learned anyway.
    """

    def __init__(
        self,
        *,
        ua_sink: UaSink | None = None,
        persist: PersistFn | None = None,
        state: dict | None = None,
        target_ports: Callable[[], Mapping[int, str]] | None = None,
    ) -> None:
        self._ua_sink = ua_sink
        self._persist = persist
        self._target_ports = target_ports
        self._ports: dict[int, str] = {}
        self._regs: dict[tuple[str, str | None], Registration] = {}
        self.generation = 0
        self._res_type: int | None = None
        self._res_holder: Registration | None = None  # None for all-registrants types
        self._aptpl = False
        self._scsi2: tuple[str, str] | None = None
        # Unit attentions of the PERSISTENT RESERVE OUT being processed (None outside one).
        self._deferred_uas: list[tuple] | None = None
        if state is not None:
            self._restore(state)

    # ----------------------------------------------------------------- introspection
    @property
    def reservation_type(self) -> int | None:
        return self._res_type

    @property
    def aptpl(self) -> bool:
        return self._aptpl

    @property
    def scsi2_holder(self) -> tuple[str, str] | None:
        """(initiator port, target port) holding a RESERVE(6)/(10) reservation, if any."""
        return self._scsi2

    def registrations(self) -> list[Registration]:
        return list(self._regs.values())

    def lookup(self, nexus: ITNexus) -> Registration | None:
        """The registration covering ``nexus``, most specific first."""
        regs = self._regs
        if not regs:
            return None
        ip, tp = nexus.initiator_port, nexus.target_port
        reg = regs.get((ip, tp)) or regs.get((ip, None))
        if reg is None:
            name = nexus.initiator_name
            if name != ip:
                reg = regs.get((name, tp)) or regs.get((name, None))
        return reg

    def is_holder(self, nexus: ITNexus) -> bool:
        return self._is_holder(self.lookup(nexus))

    def _is_holder(self, reg: Registration | None) -> bool:
        if reg is None or self._res_type is None:
            return False
        return self._res_type in _ALL_REGISTRANTS or reg is self._res_holder

    # ----------------------------------------------------------------- conflicts
    def check_conflict(self, nexus: ITNexus, cdb: bytes) -> bool:
        """True when ``cdb`` from ``nexus`` must end with RESERVATION CONFLICT.

        Call it for every command before running it (after the opcode is known to be
        supported, so unsupported opcodes still get INVALID COMMAND OPERATION CODE).
        """
        if self._res_type is None and self._scsi2 is None:
            return False
        if self._scsi2 is not None and cdb[0] in (0x5E, 0x5F):
            # SPC-2 §5.5.1 (kept by SPC-4 §5.13.3): while a RESERVE reservation exists every
            # PERSISTENT RESERVE IN/OUT conflicts, whoever sends it and whatever the service
            # action, so SPC-2 and persistent reservation state never mix.
            return True
        if self._scsi2 is not None and self._scsi2 != (nexus.initiator_port, nexus.target_port):
            return not _scsi2_allowed(cdb)
        pr_type = self._res_type
        if pr_type is None:
            return False
        access = _classify(cdb)
        if access == _ALL:
            return False
        reg = self.lookup(nexus)
        if reg is not None and (pr_type in _REGISTRANT_ACCESS or reg is self._res_holder):
            return False
        return not (access == _READ and pr_type in _WRITE_EXCLUSIVE_FAMILY)

    # ----------------------------------------------------------------- SPC-2 RESERVE / RELEASE
    async def reserve(self, cmd: ScsiCommand) -> ScsiResult:
        """RESERVE(6) 16h / RESERVE(10) 56h (SPC-2 §7.21, §7.22), logical-unit reservations only."""
        cdb = cmd.cdb
        self._check_reserve_release_cdb(cdb)
        if self._res_type is not None or self._regs:
            return self._crh_exception(cmd.nexus)
        me = (cmd.nexus.initiator_port, cmd.nexus.target_port)
        if self._scsi2 is not None and self._scsi2 != me:
            return _conflict()
        self._scsi2 = me
        return ScsiResult()

    async def release(self, cmd: ScsiCommand) -> ScsiResult:
        """RELEASE(6) 17h / RELEASE(10) 57h: the holder releases, anybody else gets GOOD, no effect."""
        cdb = cmd.cdb
        self._check_reserve_release_cdb(cdb)
        if self._scsi2 == (cmd.nexus.initiator_port, cmd.nexus.target_port):
            self._scsi2 = None
            return ScsiResult()
        if self._res_type is not None or self._regs:
            return self._crh_exception(cmd.nexus)
        return ScsiResult()

    reserve6 = reserve10 = reserve
    release6 = release10 = release

    @staticmethod
    def _check_reserve_release_cdb(cdb: bytes) -> None:
        if len(cdb) < 2:
            raise illegal_field(0)
        if cdb[0] in (0x16, 0x17):
            # SPC-2: 3RDPTY (bit 4) and EXTENT (bit 0) are obsolete; only LU reservations.
            if cdb[1] & 0x11:
                raise illegal_field(1, 4 if cdb[1] & 0x10 else 0)
        elif cdb[1] & 0x12:  # RESERVE(10)/RELEASE(10): third-party reservations not supported
            raise illegal_field(1, 4 if cdb[1] & 0x10 else 1)

    def _crh_exception(self, nexus: ITNexus) -> ScsiResult:
        """SPC-4 §5.13.3 with CRH=1: RESERVE/RELEASE while persistent reservations exist.

        GOOD without any effect from the persistent reservation holder, or from a registrant
        when a registrants-only or all-registrants reservation exists; RESERVATION CONFLICT
        from everybody else.  (With only registrations and no reservation, RESERVE conflicts:
        SPC-4 §5.13.3 item "registered I_T nexuses exist".)
        """
        reg = self.lookup(nexus)
        if reg is not None and self._res_type is not None:
            if reg is self._res_holder or self._res_type in _REGISTRANT_ACCESS:
                return ScsiResult()
        return _conflict()

    def nexus_lost(self, nexus: ITNexus) -> None:
        """I_T nexus loss: a RESERVE reservation held by it ends; registrations stay (SPC-4 §5.13.4)."""
        if self._scsi2 == (nexus.initiator_port, nexus.target_port):
            self._scsi2 = None

    def lun_reset(self) -> None:
        """LOGICAL UNIT RESET (and target resets): RESERVE reservations end, persistent ones stay."""
        self._scsi2 = None

    # ----------------------------------------------------------------- PERSISTENT RESERVE IN
    async def persistent_reserve_in(self, cmd: ScsiCommand) -> ScsiResult:
        """PERSISTENT RESERVE IN 5Eh (SPC-4 §6.15)."""
        cdb = cmd.cdb
        if len(cdb) < 10:
            raise illegal_field(0)
        self._learn_port(cmd.nexus)
        sa = cdb[1] & 0x1F
        alloc = int.from_bytes(cdb[7:9], "big")
        if sa == PrInAction.READ_KEYS:
            data = self._read_keys()
        elif sa == PrInAction.READ_RESERVATION:
            data = self._read_reservation()
        elif sa == PrInAction.REPORT_CAPABILITIES:
            data = self._report_capabilities()
        elif sa == PrInAction.READ_FULL_STATUS:
            data = self._read_full_status()
        else:
            raise illegal_field(1, 4)
        return ScsiResult(data=data[:alloc])

    def _read_keys(self) -> bytes:
        keys = b"".join(_U64.pack(r.key) for r in self._regs.values())
        return _HDR.pack(self.generation, len(keys)) + keys

    def _reservation_key(self) -> int:
        # SPC-4 §6.15.3: an all-registrants reservation reports key zero.
        holder = self._res_holder
        return 0 if holder is None else holder.key

    def _read_reservation(self) -> bytes:
        if self._res_type is None:
            return _HDR.pack(self.generation, 0)
        desc = _RES_DESC.pack(self._reservation_key(), (LU_SCOPE << 4) | self._res_type, 0)
        return _HDR.pack(self.generation, len(desc)) + desc

    def _report_capabilities(self) -> bytes:
        ptpl_c = self._persist is not None
        byte2 = 0x10 | 0x04 | (0x01 if ptpl_c else 0)  # CRH, ATP_C, PTPL_C (SIP_C=0, RLR_C=0)
        byte3 = 0x80 | (ALLOW_COMMANDS << 4) | (0x01 if self._aptpl else 0)  # TMV, ALLOW COMMANDS, PTPL_A
        return struct.pack(">HBBH2x", 8, byte2, byte3, _TYPE_MASK)

    def _read_full_status(self) -> bytes:
        out = bytearray()
        for reg in self._regs.values():
            tid = encode_iscsi_transport_id(reg.initiator_port)
            holder = self._is_holder(reg)
            flags = (0x02 if reg.all_tg_pt else 0) | (0x01 if holder else 0)
            scope_type = (LU_SCOPE << 4) | self._res_type if holder and self._res_type is not None else 0
            rel = 0 if reg.all_tg_pt else reg.relative_port_id
            out += _FULL_DESC.pack(reg.key, flags, scope_type, rel, len(tid))
            out += tid
        return _HDR.pack(self.generation, len(out)) + bytes(out)

    # ----------------------------------------------------------------- PERSISTENT RESERVE OUT
    async def persistent_reserve_out(self, cmd: ScsiCommand) -> ScsiResult:
        """PERSISTENT RESERVE OUT 5Fh (SPC-4 §6.16, semantics in §5.13).

        All or nothing: when the APTPL state cannot be saved (``persist`` raises, e.g. a full
        disk) the reservation state is put back as it was, no unit attention is established
        and the error goes to the caller.  Otherwise the initiator would be told the command
        failed while its effect stayed in memory (a retried REGISTER then conflicts) and the
        saved copy would no longer match what the logical unit does (SPC-4 §5.13.5).
        """
        before = self._snapshot()
        self._deferred_uas = []
        try:
            result = self._service_action(cmd)
        except BaseException:
            self._deferred_uas = None
            self._rollback(before)
            raise
        uas, self._deferred_uas = self._deferred_uas, None
        for args in uas:
            self._ua_sink(*args)  # type: ignore[misc]
        return result

    def _snapshot(self) -> tuple:
        regs = dict(self._regs)
        return (regs, [(r, r.key) for r in regs.values()], self._res_type, self._res_holder,
                self.generation, self._aptpl)

    def _rollback(self, before: tuple) -> None:
        regs, keys, self._res_type, self._res_holder, self.generation, self._aptpl = before
        self._regs = regs
        for reg, key in keys:
            reg.key = key

    def _service_action(self, cmd: ScsiCommand) -> ScsiResult:
        cdb = cmd.cdb
        if len(cdb) < 10:
            raise illegal_field(0)
        self._learn_port(cmd.nexus)
        sa = cdb[1] & 0x1F
        if sa > PrOutAction.REGISTER_AND_MOVE:  # REPLACE LOST RESERVATION (RLR_C=0) and reserved codes
            raise illegal_field(1, 4)
        param_len = int.from_bytes(cdb[5:9], "big")
        data = bytes(cmd.data_out[:param_len])
        if len(data) < param_len:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        if sa == PrOutAction.REGISTER_AND_MOVE:
            return self._register_and_move(cmd.nexus, cdb, data)
        if param_len != BASIC_PARAMETER_LIST_LENGTH:
            # SPC-4 §6.16.3: 24 bytes unless SPEC_I_PT=1 (which this device server refuses below).
            if param_len < BASIC_PARAMETER_LIST_LENGTH or not data[20] & 0x08:
                raise SenseError(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        key, sa_key, flags, _ = _BASIC.unpack_from(data)
        spec_i_pt, all_tg_pt, aptpl = bool(flags & 0x08), bool(flags & 0x04), bool(flags & 0x01)
        if spec_i_pt:
            # SIP_C=0 in REPORT CAPABILITIES: SPEC_I_PT is not supported (and is valid only for REGISTER).
            raise illegal_param(20, 3)
        nexus = cmd.nexus
        if sa in (PrOutAction.REGISTER, PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY):
            if aptpl and self._persist is None:
                raise illegal_param(20, 0)  # PTPL_C=0
            return self._register(nexus, key, sa_key, all_tg_pt, aptpl,
                                  ignore_key=sa == PrOutAction.REGISTER_AND_IGNORE_EXISTING_KEY)
        if sa == PrOutAction.RESERVE:
            return self._reserve(nexus, cdb, key)
        if sa == PrOutAction.RELEASE:
            return self._release(nexus, cdb, key)
        if sa == PrOutAction.CLEAR:
            return self._clear(nexus, key)
        return self._preempt(nexus, cdb, key, sa_key, abort=sa == PrOutAction.PREEMPT_AND_ABORT)

    # -- REGISTER / REGISTER AND IGNORE EXISTING KEY (SPC-4 §5.13.7)
    def _register(self, nexus: ITNexus, key: int, sa_key: int, all_tg_pt: bool, aptpl: bool,
                  *, ignore_key: bool) -> ScsiResult:
        reg = self.lookup(nexus)
        if reg is None:
            if not ignore_key and key != 0:
                return _conflict()
            if sa_key == 0:
                return ScsiResult()  # nothing to unregister: GOOD, no change
            tp = None if all_tg_pt else nexus.target_port
            reg = Registration(nexus.initiator_port, tp, nexus.relative_port_id, sa_key)
            self._regs[(reg.initiator_port, tp)] = reg
        else:
            if not ignore_key and key != reg.key:
                return _conflict()
            if sa_key == 0:
                self._unregister(reg, nexus)
            else:
                reg.key = sa_key
        self._bump_generation()
        self._set_aptpl(aptpl)
        return ScsiResult()

    def _unregister(self, reg: Registration, nexus: ITNexus | None) -> None:
        """Remove one registration; release the reservation if it held it (SPC-4 §5.13.11.2.2)."""
        del self._regs[(reg.initiator_port, reg.target_port)]
        if self._res_type is None:
            return
        if self._res_type in _ALL_REGISTRANTS:
            if not self._regs:  # the last registrant of an all-registrants reservation
                self._drop_reservation()
            return
        if reg is self._res_holder:
            released_type = self._res_type
            self._drop_reservation()
            if released_type in _REGISTRANTS_ONLY:
                self._ua(self._regs.values(), RESERVATIONS_RELEASED, nexus)

    def _drop_reservation(self) -> None:
        self._res_type = None
        self._res_holder = None

    # -- RESERVE (SPC-4 §5.13.9)
    def _reserve(self, nexus: ITNexus, cdb: bytes, key: int) -> ScsiResult:
        pr_type = _check_type_scope(cdb)
        reg = self.lookup(nexus)
        if reg is None or reg.key != key:
            return _conflict()
        if self._res_type is None:
            if self._scsi2 is not None and self._scsi2 != (nexus.initiator_port, nexus.target_port):
                return _conflict()
            self._res_type = pr_type
            self._res_holder = None if pr_type in _ALL_REGISTRANTS else reg
            self._save()
            return ScsiResult()
        if self._is_holder(reg) and self._res_type == pr_type:
            return ScsiResult()  # same reservation again: GOOD, no change
        return _conflict()

    # -- RELEASE (SPC-4 §5.13.11.2)
    def _release(self, nexus: ITNexus, cdb: bytes, key: int) -> ScsiResult:
        reg = self.lookup(nexus)
        if reg is None or reg.key != key:
            return _conflict()
        if self._res_type is None or not self._is_holder(reg):
            return ScsiResult()  # nothing to release for this I_T nexus: GOOD, no change
        scope, pr_type = cdb[2] >> 4, cdb[2] & 0x0F
        if scope != LU_SCOPE or pr_type != self._res_type:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_RELEASE_OF_PERSISTENT_RESERVATION)
        released_type = self._res_type
        self._drop_reservation()
        if released_type in _REGISTRANT_ACCESS:
            self._ua(self._regs.values(), RESERVATIONS_RELEASED, nexus)
        self._save()
        return ScsiResult()

    # -- CLEAR (SPC-4 §5.13.11.3)
    def _clear(self, nexus: ITNexus, key: int) -> ScsiResult:
        reg = self.lookup(nexus)
        if reg is None or reg.key != key:
            return _conflict()
        # Every registered I_T nexus but this one: the sender's own registration too when it
        # covers other target ports (ALL_TG_PT=1); _ua() leaves out the sending nexus itself.
        everyone = list(self._regs.values())
        self._regs.clear()
        self._drop_reservation()
        self._bump_generation()
        self._ua(everyone, RESERVATIONS_PREEMPTED, nexus)
        self._save()
        return ScsiResult()

    # -- PREEMPT / PREEMPT AND ABORT (SPC-4 §5.13.11.4, §5.13.11.5)
    def _preempt(self, nexus: ITNexus, cdb: bytes, key: int, sa_key: int, *, abort: bool) -> ScsiResult:
        reg = self.lookup(nexus)
        if reg is None or reg.key != key:
            return _conflict()
        res_type = self._res_type
        if res_type is None:
            preempt_reservation = False
        elif res_type in _ALL_REGISTRANTS:
            preempt_reservation = sa_key == 0
        else:
            assert self._res_holder is not None
            preempt_reservation = sa_key == self._res_holder.key
        # The I_T nexus that sends PREEMPT never preempts its own registration.
        if preempt_reservation:
            new_type = _check_type_scope(cdb)
            if sa_key == 0:  # all-registrants reservation: every other registration goes
                removed = [r for r in self._regs.values() if r is not reg]
            else:
                removed = [r for r in self._regs.values() if r.key == sa_key and r is not reg]
            for r in removed:
                del self._regs[(r.initiator_port, r.target_port)]
            lost = removed
            self._res_type = new_type
            self._res_holder = None if new_type in _ALL_REGISTRANTS else reg
            if new_type != res_type:
                # SPC-4 §5.13.11.4.3: every I_T nexus still registered but the sender (its
                # own ALL_TG_PT registration's other target ports included).
                self._ua(self._regs.values(), RESERVATIONS_RELEASED, nexus)
        else:
            # Only registrations are preempted; the reservation (if any) is untouched.
            if sa_key == 0:
                if res_type is None:
                    return _conflict()  # key zero identifies no registration
                raise illegal_param(8)  # SPC-4 §5.13.11.4.3: zero key with a non-all-registrants reservation
            # SPC-4 §5.13.11.2.5: every registration with that key goes, the sender's own
            # included when it names its own key ("The registration is removed"; no unit
            # attention for it, and its PERSISTENT RESERVE OUT is not aborted).
            gone = [r for r in self._regs.values() if r.key == sa_key]
            if not gone:
                return _conflict()  # SPC-4 §5.13.11.2.5: the key identifies no registration
            for r in gone:
                del self._regs[(r.initiator_port, r.target_port)]
            removed = [r for r in gone if r is not reg]
            # _ua() leaves the sending I_T nexus out, but reaches the other target ports of
            # its own registration when that one had ALL_TG_PT=1.
            lost = gone
            if res_type in _ALL_REGISTRANTS and not self._regs:
                self._drop_reservation()  # SPC-4 Table 71: the last registrant of an all-registrants type left
        self._bump_generation()
        self._ua(lost, REGISTRATIONS_PREEMPTED, nexus)
        result = ScsiResult()
        if abort:
            result.extra = {"abort_nexuses": [r.as_nexus() for r in removed]}
        self._save()
        return result

    # -- REGISTER AND MOVE (SPC-4 §5.13.8)
    def _register_and_move(self, nexus: ITNexus, cdb: bytes, data: bytes) -> ScsiResult:
        if len(data) < BASIC_PARAMETER_LIST_LENGTH:
            raise SenseError(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        key, sa_key, flags, rel_port, tid_len = _MOVE.unpack_from(data)
        if BASIC_PARAMETER_LIST_LENGTH + tid_len > len(data):
            raise SenseError(SenseKey.ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        unreg, aptpl = bool(flags & 0x02), bool(flags & 0x01)
        reg = self.lookup(nexus)
        if reg is None or reg.key != key:
            return _conflict()
        if self._res_type is None or not self._is_holder(reg) or self._res_type in _ALL_REGISTRANTS:
            return _conflict()
        # SPC-4 §5.13.8 b): the SCOPE and TYPE fields are ignored (the reservation keeps its own).
        if sa_key == 0:
            raise illegal_param(8)
        if aptpl and self._persist is None:
            raise illegal_param(17, 0)
        port_name, _ = parse_iscsi_transport_id(data[24:24 + tid_len], 24)
        ports = dict(self._ports)
        if self._target_ports is not None:
            ports.update(self._target_ports())
        target_port = ports.get(rel_port)
        if target_port is None:
            raise illegal_param(18)
        dest = ITNexus(port_name, target_port, rel_port)
        if reg.covers(dest) or port_name in (nexus.initiator_port, nexus.initiator_name):
            # SPC-4 §5.13.8: a TransportID naming the initiator port the command came from
            # (through whichever target port) is INVALID FIELD IN PARAMETER LIST.
            raise illegal_param(24)
        dest_reg = self.lookup(dest)
        if dest_reg is None:
            dest_reg = Registration(port_name, target_port, rel_port, sa_key)
            self._regs[(port_name, target_port)] = dest_reg
        else:
            # SPC-4 §5.13.8 c)-e): the destination is registered with the SERVICE ACTION
            # RESERVATION KEY whether or not it was registered before (with another key).
            dest_reg.key = sa_key
        self._res_holder = dest_reg
        if unreg:
            del self._regs[(reg.initiator_port, reg.target_port)]
        self._bump_generation()
        self._set_aptpl(aptpl)
        return ScsiResult()

    # ----------------------------------------------------------------- helpers
    def _bump_generation(self) -> None:
        """PRgeneration is a 32-bit counter that wraps (SPC-4 §6.15.2)."""
        self.generation = (self.generation + 1) & GENERATION_MASK

    def _learn_port(self, nexus: ITNexus) -> None:
        if self._ports.get(nexus.relative_port_id) != nexus.target_port:
            self._ports[nexus.relative_port_id] = nexus.target_port

    def _ua(self, regs: Iterable[Registration], asc_ascq: tuple[int, int], except_nexus: ITNexus | None) -> None:
        """Unit attention for the I_T nexuses of ``regs``, never for ``except_nexus``.

        A registration that names ``except_nexus`` alone is left out here; one that covers
        more I_T nexuses (ALL_TG_PT=1, or a TransportID without ISID) goes to the sink,
        which excludes ``except_nexus`` and reaches the others.  Inside a PERSISTENT
        RESERVE OUT they are established once the command has succeeded.
        """
        if self._ua_sink is None:
            return
        deferred = self._deferred_uas
        for r in list(regs):
            if except_nexus is not None and r.target_port == except_nexus.target_port \
                    and r.initiator_port == except_nexus.initiator_port:
                continue
            args = (r.as_nexus(), asc_ascq, except_nexus)
            if deferred is not None:
                deferred.append(args)
            else:
                self._ua_sink(*args)

    def _set_aptpl(self, aptpl: bool) -> None:
        """SPC-4 §5.13.5: the APTPL bit of the last registration decides for the whole LU."""
        was = self._aptpl
        self._aptpl = aptpl
        if self._persist is not None and (aptpl or was):
            self._persist(self.state())

    def _save(self) -> None:
        if self._aptpl and self._persist is not None:
            self._persist(self.state())

    # ----------------------------------------------------------------- persistence
    def state(self) -> dict:
        """JSON-serialisable snapshot: what APTPL saves, and what a status view shows."""
        regs = list(self._regs.values())
        reservation = None
        if self._res_type is not None:
            holder = None if self._res_holder is None else regs.index(self._res_holder)
            reservation = {"type": int(self._res_type), "scope": LU_SCOPE, "holder": holder}
        return {
            "version": STATE_VERSION,
            "aptpl": self._aptpl,
            "generation": self.generation,
            "registrations": [r.to_dict() for r in regs],
            "reservation": reservation,
            "scsi2_holder": list(self._scsi2) if self._scsi2 else None,
        }

    def _restore(self, state: dict) -> None:
        """Load a :meth:`state` dict saved with APTPL=1; a state saved with APTPL=0 restores nothing.

        Raises ValueError on anything inconsistent: better a loud start than silently lost
        reservations (field notes: "persist atomically, restore all or fail loudly").
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported persistent reservation state version {state.get('version')!r}")
        if not state.get("aptpl"):
            return
        regs: list[Registration] = []
        for item in state.get("registrations", []):
            key = int(item["key"])
            if not 0 < key < 1 << 64:
                raise ValueError(f"invalid reservation key {key!r}")
            tp = item.get("target_port")
            reg = Registration(str(item["initiator_port"]), None if tp is None else str(tp),
                               int(item.get("relative_port_id", 1)), key)
            if (reg.initiator_port, reg.target_port) in self._regs:
                raise ValueError(f"duplicate registration for {reg.initiator_port} / {reg.target_port}")
            self._regs[(reg.initiator_port, reg.target_port)] = reg
            regs.append(reg)
        res = state.get("reservation")
        if res is not None:
            pr_type = int(res["type"])
            if pr_type not in _VALID_TYPES or int(res.get("scope", 0)) != LU_SCOPE:
                raise ValueError(f"invalid reservation {res!r}")
            holder = res.get("holder")
            if pr_type in _ALL_REGISTRANTS:
                if not regs:
                    raise ValueError("all-registrants reservation without registrants")
                self._res_holder = None
            else:
                if holder is None or not 0 <= int(holder) < len(regs):
                    raise ValueError(f"reservation holder {holder!r} is not a registration")
                self._res_holder = regs[int(holder)]
            self._res_type = pr_type
        # The registrations and the reservation come back (APTPL), but PRgeneration starts
        # again from zero: a restart is the LU's power on (SPC-4 §6.15.2).
        self.generation = 0
        self._aptpl = True
