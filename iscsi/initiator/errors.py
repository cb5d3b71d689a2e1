"""Typed errors of the initiator: transport/session failures and SCSI command failures.

Two families, as h11 separates them:

* :class:`IscsiError` and subclasses — the iSCSI layer failed (login refused, connection
  lost, session recovery timed out, the target broke the protocol);
* :class:`ScsiError` and subclasses — the command reached the logical unit and ended with a
  status other than GOOD.  CHECK CONDITION carries the decoded sense (SPC-4 §4.5), and the
  sense key picks the subclass so callers can ``except MiscompareError`` (an ATS lost race)
  or ``except ReservationConflict`` without decoding bytes.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# One definition of SAM-5 status codes and SPC-4 sense keys for target and initiator;
# re-exported here because initiator callers import them from this module.
from ..scsi import sense as _sense_codes
from ..scsi.sense import SenseKey
from ..scsi.types import Status as ScsiStatus
from .scsi import Op as _Op


def _asc_names() -> dict[tuple[int, int], str]:
    """(ASC, ASCQ) → SPC-4 Annex D name, from the constants iscsi.scsi.sense defines."""
    out: dict[tuple[int, int], str] = {}
    for name, value in vars(_sense_codes).items():
        if (name.isupper() and isinstance(value, tuple) and len(value) == 2
                and all(isinstance(v, int) for v in value)):
            out.setdefault(value, name.lower().replace("_", " "))
    return out


#: Human names of the additional sense codes, so "asc=0x27" reads "write protected".
ASC_NAMES = _asc_names()


@dataclass(frozen=True, slots=True)
class Sense:
    """Decoded sense data (fixed 70h/71h or descriptor 72h/73h format, SPC-4 §4.5)."""

    key: int
    asc: int
    ascq: int
    information: int | None = None
    deferred: bool = False
    raw: bytes = b""

    @property
    def asc_ascq(self) -> tuple[int, int]:
        return self.asc, self.ascq

    def __str__(self) -> str:
        try:
            name = SenseKey(self.key).name
        except ValueError:
            name = f"0x{self.key:x}"
        info = f" info={self.information}" if self.information is not None else ""
        what = ASC_NAMES.get((self.asc, self.ascq))
        what = f": {what}" if what else ""
        return f"{name} asc=0x{self.asc:02x} ascq=0x{self.ascq:02x}{info}{what}"


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def decode_sense(raw: bytes | bytearray | memoryview) -> Sense | None:
    """Decode sense bytes; None when there are none or the format is unknown."""
    raw = bytes(raw)
    if len(raw) < 2:
        return None
    code = raw[0] & 0x7F
    if code in (0x70, 0x71):  # fixed format, SPC-4 §4.5.3
        key = raw[2] & 0x0F if len(raw) > 2 else 0
        asc = raw[12] if len(raw) > 12 else 0
        ascq = raw[13] if len(raw) > 13 else 0
        info = _U32.unpack_from(raw, 3)[0] if raw[0] & 0x80 and len(raw) >= 7 else None
        return Sense(key, asc, ascq, info, code == 0x71, raw)
    if code in (0x72, 0x73):  # descriptor format, SPC-4 §4.5.2
        key = raw[1] & 0x0F
        asc = raw[2] if len(raw) > 2 else 0
        ascq = raw[3] if len(raw) > 3 else 0
        info = None
        pos, end = 8, min(len(raw), 8 + (raw[7] if len(raw) > 7 else 0))
        while pos + 2 <= end:
            dtype, dlen = raw[pos], raw[pos + 1]
            if dtype == 0x00 and dlen >= 0x0A and pos + 12 <= end:  # information descriptor
                info = _U64.unpack_from(raw, pos + 4)[0]
            pos += 2 + dlen
        return Sense(key, asc, ascq, info, code == 0x73, raw)
    return None


# ---------------------------------------------------------------------------
# iSCSI layer
# ---------------------------------------------------------------------------

class IscsiError(Exception):
    """Something below SCSI failed."""


class ProtocolViolation(IscsiError):
    """The target broke RFC 7143 (bad PDU, unknown ITT, DataSN gap...): the connection is dropped."""


class LoginError(IscsiError):
    """The target refused the login (RFC 7143 §11.13.5 status class/detail)."""

    def __init__(self, message: str, status_class: int = 2, status_detail: int = 0) -> None:
        super().__init__(message)
        self.status_class = status_class
        self.status_detail = status_detail

    @property
    def status(self) -> int:
        return (self.status_class << 8) | self.status_detail

    @property
    def retryable(self) -> bool:
        """Class 3 (target error: service unavailable, out of resources) is worth retrying."""
        return self.status_class == 3


class LoginRedirect(LoginError):
    """Status class 1: the target moved to ``address`` (RFC 7143 §11.13.5, TargetAddress key)."""

    def __init__(self, address: str, permanent: bool) -> None:
        # The address is the target's text: shown escaped when it is not printable.
        shown = address if address.isprintable() else ascii(address)
        super().__init__(f"target moved {'permanently' if permanent else 'temporarily'} to {shown}",
                         1, 2 if permanent else 1)
        self.address = address
        self.permanent = permanent


class ConnectionLost(IscsiError):
    """The TCP connection went away while the command was outstanding."""


class SessionFailed(IscsiError):
    """The session could not be recovered within the replacement timeout, or was closed."""


class TaskAborted(IscsiError):
    """The command was aborted by a task management function (ours or another nexus's)."""


class TmfError(IscsiError):
    """A task management request was refused (RFC 7143 §11.6.1 response code)."""

    def __init__(self, message: str, response: int) -> None:
        super().__init__(message)
        self.response = response


class ConfigError(IscsiError, ValueError):
    """What the caller asked for cannot work (a login key we set ourselves, a CHAP user without
    a secret...): refused before any connection is made."""


class PortalError(ConnectionLost, ConnectionError):
    """The portal could not be reached or dropped the connection during login; still an
    ``OSError`` (``ConnectionError``) for callers that catch those."""


class CommandTimeout(IscsiError):
    """No status within the command timeout; the task was aborted."""


class ShortTransfer(IscsiError):
    """A READ ended GOOD with fewer bytes than it asked for (residual underflow, RFC 7143
    §11.4.5.2).  SBC-4 READ transfers every block or ends in CHECK CONDITION, so the bytes
    that did not come are not data: the read fails instead of handing back a hole."""


class TargetFailure(IscsiError):
    """SCSI Response with Response != 0 (RFC 7143 §11.4.3: target failure)."""


# ---------------------------------------------------------------------------
# SCSI layer
# ---------------------------------------------------------------------------

class ScsiError(Exception):
    """The command completed with a status other than GOOD."""

    def __init__(self, status: int, sense: Sense | None = None, cdb: bytes = b"") -> None:
        try:
            sname = ScsiStatus(status).name
        except ValueError:
            sname = f"0x{status:02x}"
        op = ""
        if cdb:
            try:
                op = f"{_Op(cdb[0]).name.replace('_', ' ')} (opcode 0x{cdb[0]:02x}): "
            except ValueError:
                op = f"opcode 0x{cdb[0]:02x}: "
        super().__init__(f"{op}{sname}" + (f" ({sense})" if sense else ""))
        self.status = status
        self.sense = sense
        self.cdb = bytes(cdb)

    @property
    def key(self) -> int | None:
        return self.sense.key if self.sense else None

    @property
    def asc_ascq(self) -> tuple[int, int] | None:
        return self.sense.asc_ascq if self.sense else None


class CheckCondition(ScsiError):
    """CHECK CONDITION with a sense key that has no more specific class."""


class NotReady(CheckCondition):
    pass


class MediumError(CheckCondition):
    pass


class HardwareError(CheckCondition):
    pass


class IllegalRequest(CheckCondition):
    pass


class UnitAttention(CheckCondition):
    """Reported once per I_T nexus per condition; the device layer retries the command."""


class DataProtect(CheckCondition):
    pass


class AbortedCommand(CheckCondition):
    pass


class MiscompareError(CheckCondition):
    """COMPARE AND WRITE found different data (SBC-4 §5.3); ``offset`` is the first differing byte."""

    @property
    def offset(self) -> int | None:
        return self.sense.information if self.sense else None


class LunNotAvailable(IllegalRequest):
    """The LUN is not there (INQUIRY peripheral qualifier 3 or type 1Fh, SPC-4 §6.6.2) or is not
    a block device; carries LOGICAL UNIT NOT SUPPORTED as its sense."""

    def __init__(self, lun: int, reason: str) -> None:
        super().__init__(ScsiStatus.CHECK_CONDITION,
                         Sense(SenseKey.ILLEGAL_REQUEST, *_sense_codes.LOGICAL_UNIT_NOT_SUPPORTED),
                         b"\x12")
        self.args = (f"LUN {lun} {reason}",)
        self.lun = lun


class ReservationConflict(ScsiError):
    pass


class Busy(ScsiError):
    pass


class TaskSetFull(ScsiError):
    pass


_BY_KEY: dict[int, type[CheckCondition]] = {
    SenseKey.NOT_READY: NotReady,
    SenseKey.MEDIUM_ERROR: MediumError,
    SenseKey.HARDWARE_ERROR: HardwareError,
    SenseKey.ILLEGAL_REQUEST: IllegalRequest,
    SenseKey.UNIT_ATTENTION: UnitAttention,
    SenseKey.DATA_PROTECT: DataProtect,
    SenseKey.ABORTED_COMMAND: AbortedCommand,
    SenseKey.MISCOMPARE: MiscompareError,
}
_BY_STATUS: dict[int, type[ScsiError]] = {
    ScsiStatus.RESERVATION_CONFLICT: ReservationConflict,
    ScsiStatus.BUSY: Busy,
    ScsiStatus.TASK_SET_FULL: TaskSetFull,
}


def scsi_error(status: int, sense_bytes: bytes | None, cdb: bytes = b"") -> ScsiError:
    """The typed exception for a non-GOOD status."""
    if status == ScsiStatus.CHECK_CONDITION:
        sense = decode_sense(sense_bytes) if sense_bytes else None
        cls = _BY_KEY.get(sense.key, CheckCondition) if sense else CheckCondition
        return cls(status, sense, cdb)
    if status == ScsiStatus.TASK_ABORTED:
        return ScsiError(status, None, cdb)
    return _BY_STATUS.get(status, ScsiError)(status, None, cdb)
