"""Software iSCSI initiator (RFC 7143) on asyncio.

    from iscsi.initiator import open_device
    session, dev = await open_device("iscsi://host/iqn.2026-11.org.example:disk/0")
    data = await dev.read(0, 8)
    await dev.compare_and_write(0, data, new_data)   # raises MiscompareError on a lost race
    await session.close()

Layers: :mod:`.login` (sans-IO login), :mod:`.connection` (PDU transport),
:mod:`.session` (commands, recovery), :mod:`.device` (BlockDevice), :mod:`.multipath`,
:mod:`.attach` (FUSE + loop), :mod:`.cli` (``iscsi-initiator``).
"""
from .client import DiscoveredTarget, default_initiator_name, discover, open_device, open_session
from .device import BlockDevice
from .errors import (
    AbortedCommand, Busy, CheckCondition, CommandTimeout, ConnectionLost, DataProtect, HardwareError,
    IllegalRequest, IscsiError, LoginError, LoginRedirect, MediumError, MiscompareError, NotReady,
    ProtocolViolation, ReservationConflict, ScsiError, Sense, SessionFailed, ShortTransfer, TargetFailure,
    TaskAborted, TaskSetFull, TmfError, UnitAttention,
)
from .multipath import MultipathExecutor, open_multipath
from .session import Session, SessionOptions, Task
from .url import IscsiUrl, parse_url

__all__ = [
    "AbortedCommand", "BlockDevice", "Busy", "CheckCondition", "CommandTimeout", "ConnectionLost",
    "DataProtect", "DiscoveredTarget", "HardwareError", "IllegalRequest", "IscsiError", "IscsiUrl",
    "LoginError", "LoginRedirect", "MediumError", "MiscompareError", "MultipathExecutor", "NotReady",
    "ProtocolViolation", "ReservationConflict", "ScsiError", "Sense", "Session", "SessionFailed",
    "SessionOptions", "ShortTransfer", "TargetFailure", "Task", "TaskAborted", "TaskSetFull", "TmfError", "UnitAttention",
    "default_initiator_name", "discover", "open_device", "open_multipath", "open_session", "parse_url",
]
