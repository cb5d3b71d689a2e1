"""The command table: one entry per operation code (and service action) a logical unit supports.

Each entry carries what the dispatcher and REPORT SUPPORTED OPERATION CODES need:
handler, CDB usage data (SPC-4 §6.35.3: a bit set where the device server evaluates
the CDB bit), how many Data-Out bytes the CDB asks for, gating flags and the
recommended timeout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import logpages, sbc, spc
from .cdb import Op, SaIn16, MaintIn, be16, be32, cdb_length

# Gating flags
F_MEDIUM = 0x01  # needs the medium: NOT READY, MEDIUM NOT PRESENT when ejected
F_UA_EXEMPT = 0x02  # INQUIRY, REPORT LUNS, REQUEST SENSE: not blocked by unit attentions (SPC-4 §5.14)
F_SANITIZE_OK = 0x04  # still answered while a SANITIZE runs (SBC-4 §4.11.2)

DEFAULT_TIMEOUT = 30  # seconds; open-iscsi and Linux sd use 30 s per command
SANITIZE_TIMEOUT = 3600  # a full overwrite of a large image takes minutes


@dataclass(slots=True)
class CommandSpec:
    opcode: int
    sa: int | None
    name: str
    handler: Callable | None
    usage: bytes
    flags: int = F_MEDIUM
    dout: Callable[[bytes, int], int] | None = None
    timeout: int = DEFAULT_TIMEOUT
    sub: dict[int, "CommandSpec"] | None = field(default=None)
    cdb_len: int = 0

    def __post_init__(self) -> None:
        if not self.cdb_len:
            self.cdb_len = cdb_length(self.opcode) or len(self.usage)


def usage(*b: int) -> bytes:
    return bytes(b)


def _ff(n: int) -> tuple[int, ...]:
    return (0xFF,) * n


# Data-Out sizes computed from the CDB (bytes); block size passed in.
def _dout_w6(cdb: bytes, bs: int) -> int:
    return (cdb[4] or 256) * bs


def _dout_w10(cdb: bytes, bs: int) -> int:
    return be16(cdb, 7) * bs


def _dout_w12(cdb: bytes, bs: int) -> int:
    return be32(cdb, 6) * bs


def _dout_w16(cdb: bytes, bs: int) -> int:
    return be32(cdb, 10) * bs


def _dout_atomic(cdb: bytes, bs: int) -> int:
    return be16(cdb, 12) * bs


def _dout_caw(cdb: bytes, bs: int) -> int:
    return 2 * cdb[13] * bs


def _dout_p4(cdb: bytes, bs: int) -> int:
    return cdb[4]


def _dout_p7(cdb: bytes, bs: int) -> int:
    return be16(cdb, 7)


def _dout_p3(cdb: bytes, bs: int) -> int:
    return be16(cdb, 3)


def _dout_p5_32(cdb: bytes, bs: int) -> int:
    return be32(cdb, 5)


def _dout_p10_32(cdb: bytes, bs: int) -> int:
    return be32(cdb, 10)


RW10_USAGE = (0x18, *_ff(4), 0x00, 0xFF, 0xFF, 0x00)
RW12_USAGE = (0x18, *_ff(8), 0x00, 0x00)
RW16_USAGE = (0x18, *_ff(8), *_ff(4), 0x00, 0x00)


def base_commands() -> list[CommandSpec]:
    """SPC-4 and SBC-4 commands implemented in spc.py and sbc.py."""
    C = CommandSpec
    M, X, S_OK = F_MEDIUM, F_UA_EXEMPT, F_SANITIZE_OK
    return [
        C(Op.TEST_UNIT_READY, None, "TEST UNIT READY", spc.test_unit_ready, usage(0x00, 0, 0, 0, 0, 0), M),
        C(Op.REQUEST_SENSE, None, "REQUEST SENSE", spc.request_sense, usage(0x03, 0x01, 0, 0, 0xFF, 0), X | S_OK),
        C(Op.READ_6, None, "READ(6)", sbc.read_6, usage(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0), M),
        C(Op.WRITE_6, None, "WRITE(6)", sbc.write_6, usage(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0), M, _dout_w6),
        C(Op.INQUIRY, None, "INQUIRY", spc.inquiry, usage(0x12, 0x01, 0xFF, 0xFF, 0xFF, 0), X | S_OK),
        C(Op.MODE_SELECT_6, None, "MODE SELECT(6)", spc.mode_select_6, usage(0x15, 0x11, 0, 0, 0xFF, 0), 0, _dout_p4),
        C(Op.MODE_SENSE_6, None, "MODE SENSE(6)", spc.mode_sense_6, usage(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0), 0),
        C(Op.START_STOP_UNIT, None, "START STOP UNIT", sbc.start_stop_unit, usage(0x1B, 0x01, 0, 0x0F, 0xF7, 0), 0),
        # Usage maps mark only what the handler acts on: a field it refuses whatever its non-zero
        # value is "treated as reserved" and its bits are zero (SPC-4 §6.35.3).  SEND DIAGNOSTIC:
        # no diagnostic pages (PF, PARAMETER LIST LENGTH) and DEVOFFL/UNITOFFL have no effect.
        C(Op.SEND_DIAGNOSTIC, None, "SEND DIAGNOSTIC", spc.send_diagnostic, usage(0x1D, 0xE4, 0, 0, 0, 0), 0, _dout_p3),
        C(Op.PREVENT_ALLOW_MEDIUM_REMOVAL, None, "PREVENT ALLOW MEDIUM REMOVAL", spc.prevent_allow_medium_removal,
          usage(0x1E, 0, 0, 0, 0x03, 0), 0),
        C(Op.READ_CAPACITY_10, None, "READ CAPACITY(10)", sbc.read_capacity_10,
          usage(0x25, 0, *_ff(4), 0, 0, 0x01, 0), M),
        C(Op.READ_10, None, "READ(10)", sbc.read_10, usage(0x28, *RW10_USAGE), M),
        C(Op.WRITE_10, None, "WRITE(10)", sbc.write_10, usage(0x2A, *RW10_USAGE), M, _dout_w10),
        C(Op.WRITE_AND_VERIFY_10, None, "WRITE AND VERIFY(10)", sbc.write_and_verify_10,
          usage(0x2E, 0x12, *_ff(4), 0, 0xFF, 0xFF, 0), M, _dout_w10),
        C(Op.VERIFY_10, None, "VERIFY(10)", sbc.verify_10, usage(0x2F, 0x16, *_ff(4), 0, 0xFF, 0xFF, 0), M,
          sbc.verify_data_out_length),
        C(Op.PRE_FETCH_10, None, "PRE-FETCH(10)", sbc.pre_fetch_10, usage(0x34, 0x02, *_ff(4), 0, 0xFF, 0xFF, 0), M),
        C(Op.SYNCHRONIZE_CACHE_10, None, "SYNCHRONIZE CACHE(10)", sbc.synchronize_cache_10,
          usage(0x35, 0x02, *_ff(4), 0, 0xFF, 0xFF, 0), M),
        C(Op.READ_DEFECT_DATA_10, None, "READ DEFECT DATA(10)", sbc.read_defect_data_10,
          usage(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0), M),
        C(Op.WRITE_SAME_10, None, "WRITE SAME(10)", sbc.write_same_10, usage(0x41, 0x08, *_ff(4), 0, 0xFF, 0xFF, 0), M,
          sbc.write_same_data_out_length),
        C(Op.UNMAP, None, "UNMAP", sbc.unmap, usage(0x42, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), M, _dout_p7),
        C(Op.SANITIZE, None, "SANITIZE", None, b"", M, sbc.sanitize_data_out_length, SANITIZE_TIMEOUT, sub={
            sa: C(Op.SANITIZE, sa, "SANITIZE", sbc.sanitize, usage(0x48, 0xA0 | sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), M,
                  sbc.sanitize_data_out_length, SANITIZE_TIMEOUT)
            for sa in (0x01, 0x02, 0x03, 0x1F)
        }),
        C(Op.LOG_SENSE, None, "LOG SENSE", logpages.log_sense,
          usage(0x4D, 0x03, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0), 0),
        C(Op.MODE_SELECT_10, None, "MODE SELECT(10)", spc.mode_select_10,
          usage(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), 0, _dout_p7),
        C(Op.MODE_SENSE_10, None, "MODE SENSE(10)", spc.mode_sense_10,
          usage(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0), 0),
        C(Op.READ_16, None, "READ(16)", sbc.read_16, usage(0x88, *RW16_USAGE), M),
        C(Op.COMPARE_AND_WRITE, None, "COMPARE AND WRITE", sbc.compare_and_write,
          usage(0x89, 0x18, *_ff(8), 0, 0, 0, 0xFF, 0, 0), M, _dout_caw),
        C(Op.WRITE_16, None, "WRITE(16)", sbc.write_16, usage(0x8A, *RW16_USAGE), M, _dout_w16),
        C(Op.ORWRITE_16, None, "ORWRITE(16)", sbc.orwrite_16, usage(0x8B, *RW16_USAGE), M, _dout_w16),
        C(Op.WRITE_AND_VERIFY_16, None, "WRITE AND VERIFY(16)", sbc.write_and_verify_16,
          usage(0x8E, 0x12, *_ff(8), *_ff(4), 0, 0), M, _dout_w16),
        C(Op.VERIFY_16, None, "VERIFY(16)", sbc.verify_16, usage(0x8F, 0x16, *_ff(8), *_ff(4), 0, 0), M,
          sbc.verify_data_out_length),
        C(Op.PRE_FETCH_16, None, "PRE-FETCH(16)", sbc.pre_fetch_16, usage(0x90, 0x02, *_ff(8), *_ff(4), 0, 0), M),
        C(Op.SYNCHRONIZE_CACHE_16, None, "SYNCHRONIZE CACHE(16)", sbc.synchronize_cache_16,
          usage(0x91, 0x02, *_ff(8), *_ff(4), 0, 0), M),
        C(Op.WRITE_SAME_16, None, "WRITE SAME(16)", sbc.write_same_16, usage(0x93, 0x09, *_ff(8), *_ff(4), 0, 0), M,
          sbc.write_same_data_out_length),
        # ATOMIC BOUNDARY must be 0 (MAXIMUM ATOMIC BOUNDARY SIZE 0): not evaluated (SPC-4 §6.35.3).
        C(Op.WRITE_ATOMIC_16, None, "WRITE ATOMIC(16)", sbc.write_atomic_16,
          usage(0x9C, 0x18, *_ff(8), 0, 0, 0xFF, 0xFF, 0, 0), M, _dout_atomic),
        C(Op.SERVICE_ACTION_IN_16, None, "SERVICE ACTION IN(16)", None, b"", M, sub={
            SaIn16.READ_CAPACITY_16: C(Op.SERVICE_ACTION_IN_16, SaIn16.READ_CAPACITY_16, "READ CAPACITY(16)",
                                       sbc.read_capacity_16, usage(0x9E, 0x10, *_ff(8), *_ff(4), 0x01, 0), M),
            SaIn16.GET_LBA_STATUS: C(Op.SERVICE_ACTION_IN_16, SaIn16.GET_LBA_STATUS, "GET LBA STATUS",
                                     sbc.get_lba_status, usage(0x9E, 0x12, *_ff(8), *_ff(4), 0, 0), M),
        }),
        C(Op.REPORT_LUNS, None, "REPORT LUNS", spc.lu_report_luns, usage(0xA0, 0, 0xFF, 0, 0, 0, *_ff(4), 0, 0),
          X | S_OK),
        C(Op.MAINTENANCE_IN, None, "MAINTENANCE IN", None, b"", 0, sub={
            MaintIn.REPORT_TARGET_PORT_GROUPS: C(
                Op.MAINTENANCE_IN, MaintIn.REPORT_TARGET_PORT_GROUPS, "REPORT TARGET PORT GROUPS",
                spc.report_target_port_groups, usage(0xA3, 0xEA, 0, 0, 0, 0, *_ff(4), 0, 0), 0),
            MaintIn.REPORT_SUPPORTED_OPERATION_CODES: C(
                Op.MAINTENANCE_IN, MaintIn.REPORT_SUPPORTED_OPERATION_CODES, "REPORT SUPPORTED OPERATION CODES",
                spc.report_supported_operation_codes, usage(0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, *_ff(4), 0, 0), 0),
            MaintIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS: C(
                Op.MAINTENANCE_IN, MaintIn.REPORT_SUPPORTED_TASK_MANAGEMENT_FUNCTIONS,
                "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS",
                spc.report_supported_tmfs, usage(0xA3, 0x0D, 0x80, 0, 0, 0, *_ff(4), 0, 0), 0),
        }),
        C(Op.READ_12, None, "READ(12)", sbc.read_12, usage(0xA8, *RW12_USAGE), M),
        C(Op.WRITE_12, None, "WRITE(12)", sbc.write_12, usage(0xAA, *RW12_USAGE), M, _dout_w12),
        C(Op.WRITE_AND_VERIFY_12, None, "WRITE AND VERIFY(12)", sbc.write_and_verify_12,
          usage(0xAE, 0x12, *_ff(8), 0, 0), M, _dout_w12),
        C(Op.VERIFY_12, None, "VERIFY(12)", sbc.verify_12, usage(0xAF, 0x16, *_ff(8), 0, 0), M,
          sbc.verify_data_out_length),
        C(Op.READ_DEFECT_DATA_12, None, "READ DEFECT DATA(12)", sbc.read_defect_data_12,
          usage(0xB7, 0x1F, 0, 0, 0, 0, *_ff(4), 0, 0), M),
    ]


# Persistent reservations (iscsi/scsi/pr.py), SPC-4 §6.15, §6.16, and SCSI-2 RESERVE/RELEASE.
PR_IN_SERVICE_ACTIONS = (0x00, 0x01, 0x02, 0x03)  # READ KEYS, READ RESERVATION, REPORT CAPABILITIES, READ FULL STATUS
PR_OUT_SERVICE_ACTIONS = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07)


def pr_commands(pr_in, pr_out, reserve6, release6, reserve10, release10) -> list[CommandSpec]:
    C = CommandSpec
    return [
        C(Op.RESERVE_6, None, "RESERVE(6)", reserve6, usage(0x16, 0, 0, 0, 0, 0), 0),
        C(Op.RELEASE_6, None, "RELEASE(6)", release6, usage(0x17, 0, 0, 0, 0, 0), 0),
        # Third-party reservations (3RDPTY, LONGID, THIRD PARTY DEVICE ID and the parameter list
        # that carries a long id) are refused: those bits are not evaluated (SPC-4 §6.35.3).
        C(Op.RESERVE_10, None, "RESERVE(10)", reserve10, usage(0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0), 0, _dout_p7),
        C(Op.RELEASE_10, None, "RELEASE(10)", release10, usage(0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0), 0, _dout_p7),
        C(Op.PERSISTENT_RESERVE_IN, None, "PERSISTENT RESERVE IN", None, b"", 0, sub={
            sa: C(Op.PERSISTENT_RESERVE_IN, sa, "PERSISTENT RESERVE IN", pr_in,
                  usage(0x5E, sa, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0), 0)
            for sa in PR_IN_SERVICE_ACTIONS
        }),
        C(Op.PERSISTENT_RESERVE_OUT, None, "PERSISTENT RESERVE OUT", None, b"", 0, _dout_p5_32, sub={
            sa: C(Op.PERSISTENT_RESERVE_OUT, sa, "PERSISTENT RESERVE OUT", pr_out,
                  usage(0x5F, sa, 0xFF, 0, 0, *_ff(4), 0), 0, _dout_p5_32)
            for sa in PR_OUT_SERVICE_ACTIONS
        }),
    ]


def xcopy_commands(extended_copy, receive_copy_results) -> list[CommandSpec]:
    """EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 §6.4, §6.27) from iscsi/scsi/xcopy.py."""
    C = CommandSpec
    return [
        C(Op.EXTENDED_COPY, None, "EXTENDED COPY", None, b"", F_MEDIUM, _dout_p10_32, sub={
            0x00: C(Op.EXTENDED_COPY, 0x00, "EXTENDED COPY(LID1)", extended_copy,
                    usage(0x83, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, *_ff(4), 0, 0), F_MEDIUM, _dout_p10_32),
        }),
        C(Op.RECEIVE_COPY_RESULTS, None, "RECEIVE COPY RESULTS", None, b"", 0, sub={
            sa: C(Op.RECEIVE_COPY_RESULTS, sa, "RECEIVE COPY RESULTS", receive_copy_results,
                  usage(0x84, sa, 0xFF, 0, 0, 0, 0, 0, 0, 0, *_ff(4), 0, 0), 0)
            for sa in (0x00, 0x03, 0x04)  # COPY STATUS, OPERATING PARAMETERS, FAILED SEGMENT DETAILS (LID1)
        }),
    ]
