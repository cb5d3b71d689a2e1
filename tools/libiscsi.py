"""A minimal iSCSI client on libiscsi (Debian libiscsi7, shipped with libiscsi-bin) via ctypes.

For tests that need one exact command on the wire -- a WRITE(16) with FUA and nothing after it,
a SYNCHRONIZE CACHE -- where qemu-io or the iscsi-* utilities would add their own flushes.
It is a real, independent initiator (libiscsi's login, CHAP and digests), not our own code.

    with Session("127.0.0.1:3260", "iqn...", lun=0) as s:
        s.write16(0, b"\\xab" * 4096, fua=True)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import struct
from dataclasses import dataclass
from typing import Optional

from tools.peers.base import Chap

#: Seconds a synchronous call may take before libiscsi gives up (iscsi_set_timeout).
COMMAND_TIMEOUT = 30
ISCSI_SESSION_NORMAL = 2
HEADER_DIGESTS = {"none": 0, "none,crc32c": 1, "crc32c,none": 2, "crc32c": 3}
SCSI_STATUS_GOOD = 0
DEFAULT_INITIATOR = "iqn.2026-11.org.example:sanstack-tests"


class _Sense(ctypes.Structure):
    # struct scsi_sense (scsi-lowlevel.h); the three 1-bit fields are one byte here because
    # ctypes lays out bitfields differently from GCC. Offsets checked against GCC: 0,4,8,12..16.
    _fields_ = [
        ("error_type", ctypes.c_ubyte),
        ("key", ctypes.c_int),
        ("ascq", ctypes.c_int),
        ("_bits", ctypes.c_ubyte),
        ("bit_pointer", ctypes.c_ubyte),
        ("field_pointer", ctypes.c_uint16),
    ]


class _Data(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int), ("data", ctypes.POINTER(ctypes.c_ubyte))]


class _Task(ctypes.Structure):
    # Leading part of struct scsi_task (libiscsi 1.19), offsets 0/32/40/48/64 as GCC lays them.
    _fields_ = [
        ("status", ctypes.c_int),
        ("cdb_size", ctypes.c_int),
        ("xfer_dir", ctypes.c_int),
        ("expxferlen", ctypes.c_int),
        ("cdb", ctypes.c_ubyte * 16),
        ("residual_status", ctypes.c_int),
        ("residual", ctypes.c_size_t),
        ("sense", _Sense),
        ("datain", _Data),
    ]


assert _Task.sense.offset == 48 and _Task.datain.offset == 64, "struct scsi_task layout changed"

_lib: Optional[ctypes.CDLL] = None


def load() -> ctypes.CDLL:
    """Load libiscsi once and declare the functions used here."""
    global _lib
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    lib = ctypes.CDLL(name)
    P, I, S, U64, U32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint32
    T = ctypes.POINTER(_Task)
    sigs = {
        "iscsi_create_context": (P, [S]),
        "iscsi_destroy_context": (I, [P]),
        "iscsi_set_targetname": (I, [P, S]),
        "iscsi_set_session_type": (I, [P, I]),
        "iscsi_set_header_digest": (I, [P, I]),
        "iscsi_set_initiator_username_pwd": (I, [P, S, S]),
        "iscsi_set_target_username_pwd": (I, [P, S, S]),
        "iscsi_set_timeout": (I, [P, I]),
        "iscsi_full_connect_sync": (I, [P, S, I]),
        "iscsi_logout_sync": (I, [P]),
        "iscsi_get_error": (S, [P]),
        "iscsi_write16_sync": (T, [P, I, U64, ctypes.c_char_p, U32, I, I, I, I, I, I]),
        "iscsi_read16_sync": (T, [P, I, U64, U32, I, I, I, I, I, I]),
        "iscsi_synchronizecache10_sync": (T, [P, I, I, I, I, I]),
        "iscsi_synchronizecache16_sync": (T, [P, I, U64, U32, I, I]),
        "iscsi_readcapacity16_sync": (T, [P, I]),
        "iscsi_inquiry_sync": (T, [P, I, I, I, I]),
        "iscsi_testunitready_sync": (T, [P, I]),
        "scsi_free_scsi_task": (None, [T]),
    }
    for fn, (res, args) in sigs.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    _lib = lib
    return lib


class LoginError(RuntimeError):
    """Login (or connect) failed; the message is libiscsi's, e.g. '... Authentication failure(513)'."""


class TransportError(RuntimeError):
    """The command got no SCSI status (connection lost, timeout)."""


@dataclass
class CheckCondition(Exception):
    status: int
    sense_key: int
    ascq: int  # ASC << 8 | ASCQ

    def __str__(self) -> str:
        return f"SCSI status {self.status:#x}, sense key {self.sense_key:#x}, ASC/ASCQ {self.ascq:#06x}"


class Session:
    """One logged-in libiscsi session to one LUN. Synchronous, bounded by COMMAND_TIMEOUT."""

    def __init__(self, portal: str, iqn: str, lun: int, *, initiator: str = DEFAULT_INITIATOR,
                 chap: Chap | None = None, header_digest: str | None = None, timeout: int = COMMAND_TIMEOUT):
        self.portal, self.iqn, self.lun = portal, iqn, lun
        self.initiator, self.chap, self.header_digest, self.timeout = initiator, chap, header_digest, timeout
        self._ctx = None

    @classmethod
    def to_peer(cls, peer, index: int = 0, portal: int = 0, **kwargs) -> "Session":
        kwargs.setdefault("chap", peer.chap)
        return cls(str(peer.portals[portal]), peer.iqn, peer.lun_ids[index], **kwargs)

    def connect(self) -> "Session":
        lib = load()
        ctx = lib.iscsi_create_context(self.initiator.encode())
        if not ctx:
            raise RuntimeError("iscsi_create_context failed")
        self._ctx = ctx
        lib.iscsi_set_targetname(ctx, self.iqn.encode())
        lib.iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL)
        if self.header_digest is not None:
            lib.iscsi_set_header_digest(ctx, HEADER_DIGESTS[self.header_digest.lower()])
        if self.chap is not None:
            lib.iscsi_set_initiator_username_pwd(ctx, self.chap.user.encode(), self.chap.secret.encode())
            if self.chap.mutual:
                lib.iscsi_set_target_username_pwd(ctx, self.chap.target_user.encode(), self.chap.target_secret.encode())
        lib.iscsi_set_timeout(ctx, self.timeout)
        if lib.iscsi_full_connect_sync(ctx, self.portal.encode(), self.lun) != 0:
            err = self.error()
            self._destroy()
            raise LoginError(err)
        return self

    def error(self) -> str:
        return load().iscsi_get_error(self._ctx).decode(errors="replace") if self._ctx else ""

    def _run(self, task) -> bytes:
        lib = load()
        if not task:
            raise TransportError(self.error() or "no task returned")
        try:
            t = task.contents
            if t.status != SCSI_STATUS_GOOD:
                raise CheckCondition(t.status, t.sense.key, t.sense.ascq)
            return ctypes.string_at(t.datain.data, t.datain.size) if t.datain.size > 0 else b""
        finally:
            lib.scsi_free_scsi_task(task)

    # -- commands -------------------------------------------------------------------------
    def write16(self, lba: int, data: bytes, *, block_size: int = 512, fua: bool = False) -> None:
        """WRITE(16) (SBC-4 §5.47); FUA=1 means the data is on the medium before GOOD."""
        self._run(load().iscsi_write16_sync(self._ctx, self.lun, lba, data, len(data), block_size,
                                            0, 0, int(fua), 0, 0))

    def read16(self, lba: int, nblocks: int, *, block_size: int = 512) -> bytes:
        return self._run(load().iscsi_read16_sync(self._ctx, self.lun, lba, nblocks * block_size, block_size,
                                                  0, 0, 0, 0, 0))

    def synchronize_cache10(self, lba: int = 0, nblocks: int = 0) -> None:
        """SYNCHRONIZE CACHE(10) (SBC-4 §5.22), IMMED=0; 0 blocks = to the end of the medium."""
        self._run(load().iscsi_synchronizecache10_sync(self._ctx, self.lun, lba, nblocks, 0, 0))

    def synchronize_cache16(self, lba: int = 0, nblocks: int = 0) -> None:
        self._run(load().iscsi_synchronizecache16_sync(self._ctx, self.lun, lba, nblocks, 0, 0))

    def read_capacity16(self) -> tuple[int, int]:
        """(number of blocks, block size) from READ CAPACITY(16) (SBC-4 §5.16)."""
        data = self._run(load().iscsi_readcapacity16_sync(self._ctx, self.lun))
        last_lba, block_size = struct.unpack_from(">QI", data)
        return last_lba + 1, block_size

    def inquiry(self, page: int | None = None, alloc: int = 255) -> bytes:
        evpd, code = (0, 0) if page is None else (1, page)
        return self._run(load().iscsi_inquiry_sync(self._ctx, self.lun, evpd, code, alloc))

    def test_unit_ready(self) -> None:
        self._run(load().iscsi_testunitready_sync(self._ctx, self.lun))

    # -- lifecycle ------------------------------------------------------------------------
    def close(self, logout: bool = True) -> None:
        if self._ctx:
            if logout:
                load().iscsi_logout_sync(self._ctx)
            self._destroy()

    def _destroy(self) -> None:
        if self._ctx:
            load().iscsi_destroy_context(self._ctx)
            self._ctx = None

    def __enter__(self) -> "Session":
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        # After the target was killed a logout would wait for COMMAND_TIMEOUT: skip it then.
        self.close(logout=exc[0] is None)
