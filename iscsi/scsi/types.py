"""Transport-free types shared by the SCSI target core and every transport.

The iSCSI layer turns PDUs into a :class:`ScsiCommand`, hands it to the
SCSI core, and turns the :class:`ScsiResult` back into Data-In / SCSI
Response PDUs.  Nothing here knows about iSCSI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Status(IntEnum):
    """SAM-5 §5.3 status codes."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class TaskAttr(IntEnum):
    """SAM-5 task attributes, numbered as in the iSCSI SCSI Command PDU ATTR field."""

    UNTAGGED = 0
    SIMPLE = 1
    ORDERED = 2
    HEAD_OF_QUEUE = 3
    ACA = 4


@dataclass(frozen=True, slots=True)
class ITNexus:
    """One I_T nexus (SAM-5 §4.7): an initiator port talking to a target port.

    For iSCSI the port names are RFC 7143 §4.2.7.1 SCSI port names:
    ``<iSCSI name>,i,0x<ISID as 12 hex digits>`` and ``<iSCSI name>,t,0x<TPGT as 4 hex digits>``.
    """

    initiator_port: str
    target_port: str
    relative_port_id: int = 1
    target_port_group: int = 1
    # Looked up in per-LU dicts (unit attentions, users) on every command: hash once.
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.initiator_port, self.target_port,
                                                self.relative_port_id, self.target_port_group)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self):
        # Rebuilt through __init__ (pickle, copy): string hashes differ between processes.
        return (ITNexus, (self.initiator_port, self.target_port, self.relative_port_id,
                          self.target_port_group))

    @property
    def initiator_name(self) -> str:
        return self.initiator_port.split(",i,", 1)[0]

    @property
    def target_name(self) -> str:
        return self.target_port.split(",t,", 1)[0]


@dataclass(slots=True)
class ScsiCommand:
    """A command as the transport delivers it to the SCSI core.

    ``data_out`` holds every Data-Out byte the initiator actually sent; it may be
    shorter than the CDB asks for (iSCSI residual overflow) or longer (underflow).
    The core uses only what the CDB calls for and never more than it received.
    """

    cdb: bytes
    lun: int
    nexus: ITNexus
    data_out: bytes | bytearray | memoryview = b""
    expected_length: int = 0
    task_attr: TaskAttr = TaskAttr.SIMPLE
    task_tag: int = 0
    # The transport can send a large READ's Data-In from the image file itself
    # (iscsi/scsi/zerocopy.py): the result's data may then be a FileExtent.
    zero_copy: bool = False


@dataclass(slots=True)
class ScsiResult:
    """What the core answers: status, Data-In (already cut to the allocation length) and sense."""

    status: int = Status.GOOD
    data: bytes | bytearray | memoryview = b""
    sense: bytes = b""
    # Effects on other tasks, e.g. {"abort_nexuses": [...]} (pr.py); None for nearly every
    # command (a dict per result was a measurable part of the per-I/O cost).
    extra: dict | None = None
