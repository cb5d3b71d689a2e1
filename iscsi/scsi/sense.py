"""Sense data (SPC-4 §4.5): sense keys, additional sense codes, fixed and descriptor formats.

Command handlers raise :class:`SenseError`; the logical unit turns it into a
CHECK CONDITION with sense in whichever format the initiator chose
(Control mode page D_SENSE bit).
"""
from __future__ import annotations

import struct
from enum import IntEnum

from .cdb import cdb_length


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    RESERVED = 0xC
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE
    COMPLETED = 0xF


# (ASC, ASCQ) pairs used by the core, named as in SPC-4 Annex D.
INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
WRITE_PROTECTED = (0x27, 0x00)
SOFTWARE_WRITE_PROTECTED = (0x27, 0x02)
SPACE_ALLOCATION_FAILED_WRITE_PROTECT = (0x27, 0x07)  # SBC-4 §4.7.3.7: thin LU out of resources
POWER_ON_RESET = (0x29, 0x00)
POWER_ON_OCCURRED = (0x29, 0x01)
BUS_RESET = (0x29, 0x02)
DEVICE_RESET = (0x29, 0x03)
I_T_NEXUS_LOSS = (0x29, 0x07)
MODE_PARAMETERS_CHANGED = (0x2A, 0x01)
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)
CAPACITY_DATA_HAS_CHANGED = (0x2A, 0x09)
COMMANDS_CLEARED_BY_ANOTHER_INITIATOR = (0x2F, 0x00)
MEDIUM_NOT_PRESENT = (0x3A, 0x00)
REPORTED_LUNS_DATA_HAS_CHANGED = (0x3F, 0x0E)
INQUIRY_DATA_HAS_CHANGED = (0x3F, 0x03)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
INVALID_FIELD_IN_INFORMATION_UNIT = (0x0E, 0x03)
INTERNAL_TARGET_FAILURE = (0x44, 0x00)
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
MEDIUM_REMOVAL_PREVENTED = (0x53, 0x02)
LOGICAL_UNIT_NOT_READY_CAUSE_NOT_REPORTABLE = (0x04, 0x00)
LOGICAL_UNIT_NOT_READY_INIT_REQUIRED = (0x04, 0x02)
LOGICAL_UNIT_NOT_READY_FORMAT_IN_PROGRESS = (0x04, 0x04)
LOGICAL_UNIT_NOT_READY_SANITIZE_IN_PROGRESS = (0x04, 0x1B)
MEDIUM_FORMAT_CORRUPTED = (0x31, 0x00)
SANITIZE_COMMAND_FAILED = (0x31, 0x03)
COPY_TARGET_DEVICE_NOT_REACHABLE = (0x0D, 0x02)
UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE = (0x26, 0x07)
UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE = (0x26, 0x09)
TOO_MANY_TARGET_DESCRIPTORS = (0x26, 0x06)
TOO_MANY_SEGMENT_DESCRIPTORS = (0x26, 0x08)
INSUFFICIENT_RESOURCES = (0x55, 0x03)
OVERLAPPED_COMMANDS_ATTEMPTED = (0x4E, 0x00)
NO_ADDITIONAL_SENSE = (0x00, 0x00)
PARAMETER_VALUE_INVALID = (0x26, 0x02)
PARAMETER_NOT_SUPPORTED = (0x26, 0x01)
MEDIUM_NOT_PRESENT_TRAY_CLOSED = (0x3A, 0x01)
MEDIUM_NOT_PRESENT_TRAY_OPEN = (0x3A, 0x02)
DEFECT_LIST_NOT_FOUND = (0x1C, 0x00)
WRITE_AFTER_SANITIZE_REQUIRED = (0x30, 0x14)
LOGICAL_UNIT_NOT_READY_MANUAL_INTERVENTION = (0x04, 0x03)
MODE_PARAMETERS_CHANGED_ANY = (0x2A, 0x00)
ASYMMETRIC_ACCESS_STATE_CHANGED = (0x2A, 0x06)
SCSI_BUS_RESET_OCCURRED = BUS_RESET
BUS_DEVICE_RESET_FUNCTION_OCCURRED = DEVICE_RESET
INVALID_MESSAGE_ERROR = (0x49, 0x00)
NOT_READY_TO_READY_CHANGE = (0x28, 0x00)


class SenseError(Exception):
    """Raised by a command handler to end the command with CHECK CONDITION.

    ``field_pointer`` (byte index in the CDB or parameter list) and ``bit`` fill the
    sense-key specific field of SPC-4 §4.5.2.4.2; ``in_cdb`` says which one it points to.
    ``information`` fills the INFORMATION field (e.g. the miscompare offset).
    """

    def __init__(
        self,
        key: SenseKey,
        asc_ascq: tuple[int, int],
        *,
        information: int | None = None,
        field_pointer: int | None = None,
        bit: int | None = None,
        in_cdb: bool = True,
    ) -> None:
        super().__init__(f"{key.name} asc=0x{asc_ascq[0]:02x} ascq=0x{asc_ascq[1]:02x}")
        self.key = key
        self.asc, self.ascq = asc_ascq
        self.information = information
        self.field_pointer = field_pointer
        self.bit = bit
        self.in_cdb = in_cdb

    def to_bytes(self, descriptor: bool = False) -> bytes:
        return build_sense(
            self.key, (self.asc, self.ascq),
            descriptor=descriptor, information=self.information,
            field_pointer=self.field_pointer, bit=self.bit, in_cdb=self.in_cdb,
        )


def illegal_field(byte: int, bit: int | None = None) -> SenseError:
    """INVALID FIELD IN CDB pointing at CDB byte ``byte`` (and ``bit``)."""
    return SenseError(SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB, field_pointer=byte, bit=bit)


def refuse_naca(cdb: bytes) -> None:
    """NACA=1 in the CONTROL byte (the CDB's last byte) asks for ACA, which is not supported:
    INVALID FIELD IN CDB at that bit (SAM-5 §5.9.1.4).  For the commands answered without the
    logical unit's dispatch, which makes this check itself for the rest."""
    n = cdb_length(cdb[0])
    if n and len(cdb) >= n and cdb[n - 1] & 0x04:
        raise illegal_field(n - 1, 2)


def illegal_param(byte: int, bit: int | None = None) -> SenseError:
    """INVALID FIELD IN PARAMETER LIST pointing at parameter byte ``byte``."""
    return SenseError(
        SenseKey.ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST,
        field_pointer=byte, bit=bit, in_cdb=False,
    )


def _sense_key_specific(field_pointer: int | None, bit: int | None, in_cdb: bool) -> bytes | None:
    if field_pointer is None:
        return None
    b0 = 0x80 | (0x40 if in_cdb else 0)
    if bit is not None:
        b0 |= 0x08 | (bit & 0x7)
    return bytes((b0,)) + struct.pack(">H", field_pointer & 0xFFFF)


def build_sense(
    key: int,
    asc_ascq: tuple[int, int],
    *,
    descriptor: bool = False,
    information: int | None = None,
    field_pointer: int | None = None,
    bit: int | None = None,
    in_cdb: bool = True,
    progress: int | None = None,
    deferred: bool = False,
) -> bytes:
    """Build current-error sense data: fixed format 70h (SPC-4 §4.5.3) or descriptor 72h (§4.5.2).

    ``progress`` (0..FFFFh, the fraction done in 65536ths) fills the sense-key specific
    field as a PROGRESS INDICATION instead of a field pointer (SPC-4 §4.5.2.4.4).
    ``deferred`` reports an error of an earlier, already completed command: response code
    71h / 73h instead of 70h / 72h (SPC-4 §4.5.4).
    """
    asc, ascq = asc_ascq
    if progress is not None:
        sks = bytes((0x80,)) + struct.pack(">H", min(max(progress, 0), 0xFFFF))
    else:
        sks = _sense_key_specific(field_pointer, bit, in_cdb)
    if descriptor:
        descs = b""
        if information is not None:
            # Information descriptor (type 00h), VALID bit set.
            descs += bytes((0x00, 0x0A, 0x80, 0x00)) + struct.pack(">Q", information & 0xFFFFFFFFFFFFFFFF)
        if sks is not None:
            descs += bytes((0x02, 0x06, 0x00, 0x00)) + sks + b"\x00"
        return bytes((0x73 if deferred else 0x72, key & 0xF, asc, ascq, 0, 0, 0, len(descs))) + descs
    buf = bytearray(18)
    buf[0] = 0x71 if deferred else 0x70
    buf[2] = key & 0xF
    if information is not None:
        buf[3:7] = struct.pack(">I", information & 0xFFFFFFFF)
        if information <= 0xFFFFFFFF:
            buf[0] |= 0x80  # VALID: the 4-byte INFORMATION field holds the whole value (SPC-4 §4.5.3)
    buf[7] = 10  # additional sense length
    buf[12] = asc
    buf[13] = ascq
    if sks is not None:
        buf[15:18] = sks
    return bytes(buf)
