"""Primary commands (SPC-4): the handlers every logical unit answers.

Each handler takes ``(lu, cmd)`` and returns a :class:`ScsiResult` (or an awaitable of
one), raising :class:`SenseError` for CHECK CONDITION.  Data-In is cut to the
allocation length here, so the transport can compute residuals from ``len(data)``.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from . import sense as S
from .cdb import U16, U32, be16, be32, encode_lun
from .sense import SenseError, SenseKey, build_sense
from .types import ScsiCommand, ScsiResult

if TYPE_CHECKING:
    from .lu import LogicalUnit


def inquiry(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """INQUIRY (SPC-4 §6.6)."""
    cdb = cmd.cdb
    if cdb[1] & 0xFE:  # CMDDT (obsolete) and reserved bits
        raise S.illegal_field(1, (cdb[1] & 0xFE).bit_length() - 1)
    page = cdb[2]
    alloc = be16(cdb, 3)
    if not cdb[1] & 0x01:
        if page:
            raise S.illegal_field(2)  # PAGE CODE without EVPD (SPC-4 §6.6.1)
        data = lu.standard_inquiry
    else:
        data = lu.vpd_page(page, cmd.nexus)
        if data is None:
            raise S.illegal_field(2)
    return ScsiResult(data=data[:alloc])


def sense_data(key: int, asc_ascq: tuple[int, int], descriptor: bool) -> bytes:
    return build_sense(key, asc_ascq, descriptor=descriptor)


def request_sense(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """REQUEST SENSE (SPC-4 §6.39): a pending unit attention, else the not-ready state, else NO SENSE.

    Autosense always delivers the sense of a failed command, so no per-command sense is
    kept for later (SPC-4 §5.12).  A reported unit attention is cleared (UA_INTLCK_CTRL=0).
    """
    cdb = cmd.cdb
    desc = bool(cdb[1] & 0x01)
    alloc = cdb[4]
    ua = lu.ua.pop(cmd.nexus)
    if ua is not None:
        data = sense_data(SenseKey.UNIT_ATTENTION, ua, desc)
    elif lu.not_ready is not None:
        data = lu.not_ready_sense(desc)
    else:
        data = sense_data(SenseKey.NO_SENSE, S.NO_ADDITIONAL_SENSE, desc)
    return ScsiResult(data=data[:alloc])


def test_unit_ready(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """TEST UNIT READY (SPC-4 §6.47); the not-ready states are checked before dispatch."""
    return ScsiResult()


def mode_sense(lu: LogicalUnit, cmd: ScsiCommand, ten: bool) -> ScsiResult:
    """MODE SENSE(6)/(10) (SPC-4 §6.11, §6.12)."""
    cdb = cmd.cdb
    alloc = be16(cdb, 7) if ten else cdb[4]
    data = lu.mode.sense(
        ten=ten, cdb=cdb, num_blocks=lu.num_blocks, block_size=lu.block_size,
        write_protected=lu.write_protected,
    )
    return ScsiResult(data=data[:alloc])


def mode_sense_6(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return mode_sense(lu, cmd, False)


def mode_sense_10(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return mode_sense(lu, cmd, True)


def mode_select(lu: LogicalUnit, cmd: ScsiCommand, ten: bool):
    """MODE SELECT(6)/(10) (SPC-4 §6.9, §6.10).

    A change raises MODE PARAMETERS CHANGED for the other I_T nexuses (SPC-4 §5.14),
    since the pages are shared by all of them.

    Turning the write cache off (WCE 1 -> 0, SBC-4 §6.5.5) empties it before GOOD: from then
    on the initiator sees no volatile cache and sends no SYNCHRONIZE CACHE (Linux sd makes
    fsync a no-op on a write-through disk), so what it wrote before the switch would stay in
    the page cache with nothing left to ask for it to be made stable.
    """
    cdb = cmd.cdb
    plen = be16(cdb, 7) if ten else cdb[4]
    params = bytes(cmd.data_out[:plen])
    if len(params) < plen:
        raise SenseError(SenseKey.ILLEGAL_REQUEST, S.PARAMETER_LIST_LENGTH_ERROR)
    cached = lu.mode.wce
    changed = lu.mode.select(
        ten=ten, cdb=cdb, params=params, block_size=lu.block_size, num_blocks=lu.num_blocks,
    )
    if changed:
        lu.ua.establish(S.MODE_PARAMETERS_CHANGED, except_nexus=cmd.nexus)
    if cached and not lu.mode.wce:
        return lu.flushed(ScsiResult())
    return ScsiResult()


def mode_select_6(lu: LogicalUnit, cmd: ScsiCommand):
    return mode_select(lu, cmd, False)


def mode_select_10(lu: LogicalUnit, cmd: ScsiCommand):
    return mode_select(lu, cmd, True)


def report_luns_data(luns: list[int]) -> bytes:
    """REPORT LUNS parameter data (SPC-4 §6.33): 8-byte header then 8-byte LUNs."""
    body = b"".join(encode_lun(n) for n in sorted(luns))
    return U32.pack(len(body)) + bytes(4) + body


# SELECT REPORT values (SPC-4 Table 214 / SPC-5): 00h, 02h all LUNs, 01h well known only,
# 10h/11h/12h administrative and subsidiary forms that we answer like 00h.
_SELECT_REPORT = {0x00, 0x01, 0x02, 0x10, 0x11, 0x12}


def report_luns(lu: LogicalUnit | None, cmd: ScsiCommand, luns: list[int]) -> ScsiResult:
    """REPORT LUNS (SPC-4 §6.33): valid through any LUN, even one with no logical unit.

    The target level answers it without the logical unit's dispatch, so the CONTROL byte is
    checked here: NACA=1 is an INVALID FIELD IN CDB with ACA unsupported (SAM-5 §5.9.1.4).
    """
    cdb = cmd.cdb
    S.refuse_naca(cdb)
    select = cdb[2]
    if select not in _SELECT_REPORT:
        raise S.illegal_field(2)
    alloc = be32(cdb, 6)
    data = report_luns_data([] if select == 0x01 else luns)
    if lu is not None:
        lu.ua.clear(cmd.nexus, S.REPORTED_LUNS_DATA_HAS_CHANGED)
    return ScsiResult(data=data[:alloc])


def lu_report_luns(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    return report_luns(lu, cmd, lu.lun_numbers())


# -- REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35) ----------------------------------------

_CMD_DESC = struct.Struct(">BxHxBH")  # opcode, SA, flags (CTDP|SERVACTV), CDB length
_TIMEOUTS = struct.Struct(">HxBII")  # descriptor length 0Ah, command specific, nominal, recommended


def _timeouts(spec) -> bytes:
    return _TIMEOUTS.pack(0x0A, 0, 0, spec.timeout)


def report_supported_operation_codes(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    cdb = cmd.cdb
    rctd = bool(cdb[2] & 0x80)
    option = cdb[2] & 0x07
    req_op = cdb[3]
    req_sa = be16(cdb, 4)
    alloc = be32(cdb, 6)
    specs = lu.supported_commands()
    if option == 0:
        out = bytearray()
        for spec in specs:
            flags = (0x02 if rctd else 0) | (0x01 if spec.sa is not None else 0)
            out += _CMD_DESC.pack(spec.opcode, spec.sa or 0, flags, len(spec.usage))
            if rctd:
                out += _timeouts(spec)
        data = U32.pack(len(out)) + bytes(out)
        return ScsiResult(data=data[:alloc])
    if option not in (1, 2, 3):
        raise S.illegal_field(2, 2)
    has_sa = lu.opcode_has_service_actions(req_op)
    if option == 1 and has_sa:
        raise S.illegal_field(3)  # this opcode needs a service action (SPC-4 §6.35.2)
    if option == 2 and not has_sa and lu.opcode_supported(req_op):
        raise S.illegal_field(3)  # no service actions for this opcode
    spec = None
    for s in specs:
        if s.opcode == req_op and (s.sa is None or (option in (2, 3) and s.sa == req_sa)):
            spec = s
            break
    if spec is None:
        data = bytes((0, 0x01, 0, 0))  # SUPPORT 001b: not supported
    else:
        head = bytes((0, (0x80 if rctd else 0) | 0x03)) + U16.pack(len(spec.usage))
        data = head + spec.usage + (_timeouts(spec) if rctd else b"")
    return ScsiResult(data=data[:alloc])


def report_supported_tmfs(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS (SPC-4 §6.36).

    ABORT TASK, ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET and TARGET RESET
    (iSCSI TARGET WARM/COLD RESET) - what RFC 7143 §11.5 carries.
    """
    cdb = cmd.cdb
    repd = cdb[2] & 0x80
    alloc = be32(cdb, 6)
    if alloc < 4:
        raise S.illegal_field(6)
    data = bytes((0x80 | 0x40 | 0x10 | 0x08 | 0x02, 0, 0, 0))
    if repd:
        data = data[:3] + bytes((0x0C,)) + bytes(12)
    return ScsiResult(data=data[:alloc])


def report_target_port_groups(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """REPORT TARGET PORT GROUPS (SPC-4 §6.37): implicit ALUA, every group active/optimized."""
    cdb = cmd.cdb
    fmt = cdb[1] >> 5
    alloc = be32(cdb, 6)
    if fmt not in (0, 1):
        raise S.illegal_field(1, 7)
    body = bytearray()
    for tpg, state, ports in lu.port_groups(cmd.nexus):
        body += bytes((0x80 | (state & 0x0F), 0x01)) + U16.pack(tpg) + bytes((0, 0, 0, len(ports)))
        for rel in ports:
            body += U16.pack(0) + U16.pack(rel)
    if fmt == 1:
        head = U32.pack(len(body) + 4) + bytes((0x10, 0, 0, 0))  # extended header, no transition time
    else:
        head = U32.pack(len(body))
    data = head + bytes(body)
    return ScsiResult(data=data[:alloc])


def send_diagnostic(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """SEND DIAGNOSTIC (SPC-4 §6.42): the default self-test and the self-test codes pass at once.

    No diagnostic pages are implemented, so a parameter list is refused.
    """
    cdb = cmd.cdb
    code = cdb[1] >> 5
    selftest = cdb[1] & 0x04
    plen = be16(cdb, 3)
    if plen:
        raise S.illegal_field(3)
    if selftest and code:
        raise S.illegal_field(1, 7)  # SELF-TEST CODE must be 0 with SELFTEST=1
    if code not in (0, 1, 2, 4, 5, 6):
        raise S.illegal_field(1, 7)
    return ScsiResult()


def prevent_allow_medium_removal(lu: LogicalUnit, cmd: ScsiCommand) -> ScsiResult:
    """PREVENT ALLOW MEDIUM REMOVAL (SBC-4 §5.14 / SPC-4 §6.16): per I_T nexus."""
    prevent = cmd.cdb[4] & 0x03
    if prevent & 0x02:
        raise S.illegal_field(4, 1)  # 10b/11b are for medium changers
    lu.set_prevent(cmd.nexus, bool(prevent))
    return ScsiResult()
