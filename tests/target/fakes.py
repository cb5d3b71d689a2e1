"""A registry and LUN map small enough to read, for target tests without the daemon."""
from __future__ import annotations

from dataclasses import dataclass, field

from iscsi.target.registry import AccessGrant, ChapCredentials


@dataclass
class FakeTarget:
    name: str
    alias: str | None = None
    tpgt: int = 1
    allowed: set[str] | None = None  # None = open ACL
    chap: ChapCredentials | None = None
    params: dict[str, str] = field(default_factory=dict)
    luns: object = None

    def portal_group_tag(self, host: str, port: int) -> int | None:
        return self.tpgt

    def authorize(self, initiator: str) -> AccessGrant | None:
        if self.allowed is not None and initiator not in self.allowed:
            return None
        return AccessGrant(luns=self.luns, chap=self.chap, params=dict(self.params))


@dataclass
class FakeRegistry:
    targets: dict[str, FakeTarget] = field(default_factory=dict)
    discovery_chap: ChapCredentials | None = None
    portal: str = "127.0.0.1:3260"

    def discovery_auth(self):
        return self.discovery_chap

    def discovery_targets(self, initiator, host, port):
        return [(t.name, [f"{host}:{port},{t.tpgt}"]) for t in self.targets.values()
                if t.allowed is None or initiator in t.allowed]

    def find_target(self, name):
        return self.targets.get(name)


class FakeLunMap:
    """Just enough SCSI (TUR, INQUIRY, READ CAPACITY 10/16, READ/WRITE 10) over a bytearray.

    Lets the transport be tested on its own; the real SCSI core is tested elsewhere.
    """

    BLOCK = 512

    def __init__(self, blocks: int = 2048) -> None:
        self.disk = bytearray(blocks * self.BLOCK)
        self.blocks = blocks
        self.nexuses: set = set()
        self.tmfs: list = []
        self.gate = None  # an asyncio.Event to hold commands (abort tests)

    def get(self, lun: int):
        return self if lun == 0 else None

    def nexus_joined(self, nexus) -> None:
        pass  # the fake has no zero-copy holds to share

    def nexus_lost(self, nexus) -> None:
        self.nexuses.discard(nexus)

    def abort_task_set(self, nexus) -> None:
        self.tmfs.append(("abort_task_set", 0))

    def clear_task_set(self, lun, nexus, affected) -> None:
        self.tmfs.append(("clear_task_set", lun))

    def lun_reset(self, lun: int) -> bool:
        self.tmfs.append(("lun_reset", lun))
        return True

    def warm_reset(self) -> None:
        self.tmfs.append(("warm_reset", None))

    def cold_reset(self) -> None:
        self.tmfs.append(("cold_reset", None))

    def data_out_length(self, lun: int, cdb: bytes):
        if cdb[0] == 0x2A:
            return int.from_bytes(cdb[7:9], "big") * self.BLOCK
        return None

    def read_now(self, lun: int, cdb: bytes, nexus, zero_copy: bool):
        """The transport's READ shortcut (LunMap.read_now): never taken here, start() decides."""
        return None

    def write_now(self, lun: int, cdb: bytes, nexus, data):
        """The transport's WRITE shortcut (LunMap.write_now): never taken here either."""
        return None

    def start(self, cmd):
        """The transport's entry point: a result, or a coroutine when it has to wait (always here)."""
        return self.execute(cmd)

    async def execute(self, cmd):
        import struct

        from iscsi.scsi.sense import INVALID_COMMAND_OPERATION_CODE, SenseKey, build_sense
        from iscsi.scsi.types import ScsiResult, Status

        if self.gate is not None:
            await self.gate.wait()
        op = cmd.cdb[0]
        if op == 0x00:
            return ScsiResult()
        if op == 0x12:
            data = bytes([0, 0, 6, 2, 31, 0, 0, 2]) + b"FAKE    " + b"fake lun        " + b"0001"
            return ScsiResult(data=data[:int.from_bytes(cmd.cdb[3:5], "big")])
        if op == 0x25:
            return ScsiResult(data=struct.pack(">II", self.blocks - 1, self.BLOCK))
        if op == 0x9E:
            return ScsiResult(data=struct.pack(">QI", self.blocks - 1, self.BLOCK).ljust(32, b"\0")[
                :int.from_bytes(cmd.cdb[10:14], "big")])
        if op in (0x28, 0x2A):
            lba = int.from_bytes(cmd.cdb[2:6], "big")
            n = int.from_bytes(cmd.cdb[7:9], "big") * self.BLOCK
            off = lba * self.BLOCK
            if op == 0x28:
                return ScsiResult(data=bytes(self.disk[off:off + n]))
            got = bytes(cmd.data_out)[:n]
            self.disk[off:off + len(got)] = got
            return ScsiResult()
        return ScsiResult(status=Status.CHECK_CONDITION,
                          sense=build_sense(SenseKey.ILLEGAL_REQUEST, INVALID_COMMAND_OPERATION_CODE))


class StubTransport:
    """An asyncio transport that sends nowhere: subclasses decide what ``writelines`` does."""

    def writelines(self, parts) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 3260)

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def close(self):
        pass

    def abort(self):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass


def logged_in_connection(lu, transport, iqn: str = "iqn.2026-11.org.sanstack:fake",
                         keys: tuple[tuple[str, str], ...] = ()):
    """A TargetConnection on ``transport``, logged in (Normal session, LUN 0 = ``lu``) with the
    power-on unit attention already consumed; returns the connection (next CmdSN is 2)."""
    from iscsi import keys as K
    from iscsi import pdu as P
    from iscsi.framing import encode_bytes
    from iscsi.scsi.target import LunMap
    from iscsi.target.connection import TargetConnection
    from iscsi.target.server import IscsiServer

    server = IscsiServer(FakeRegistry({iqn: FakeTarget(iqn, luns=LunMap({0: lu}))}), nop_interval=3600)
    conn = TargetConnection(server)
    conn.connection_made(transport)
    text = [("InitiatorName", "iqn.2026-11.org.x:y"), ("TargetName", iqn), ("SessionType", "Normal"),
            ("ImmediateData", "Yes"), *keys]
    conn.data_received(encode_bytes(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000001, cmdsn=1,
                                                   itt=1, data=K.encode_text(text))))
    assert conn.session is not None, "login failed"
    wire = {"header_digest": conn.header_digest, "data_digest": conn.data_digest}
    conn.data_received(encode_bytes(P.ScsiCommandPdu(cdb=bytes(6), cmdsn=1, itt=2), **wire))  # TUR eats the UA
    conn._flush()
    return conn
