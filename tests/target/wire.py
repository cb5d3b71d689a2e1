"""A bare-bones raw-socket iSCSI client for target tests: sends exactly the PDUs a test builds."""
from __future__ import annotations

import asyncio

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.framing import PduReader, encode_bytes

IQN_I = "iqn.2026-11.org.sanstack.test:client"


class Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.parser = PduReader(allowed=P.TARGET_OPCODES, max_data_segment=1 << 24)
        self.queue: list = []
        self.cmdsn = 1
        self.expstatsn = 0
        self.itt = 0x100
        self.header_digest = self.data_digest = False

    @classmethod
    async def open(cls, port: int) -> "Wire":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, pdu: P.Pdu) -> None:
        self.w.write(encode_bytes(pdu, header_digest=self.header_digest, data_digest=self.data_digest))

    def send_raw(self, raw: bytes) -> None:
        self.w.write(raw)

    async def recv(self, timeout: float = 5.0) -> P.Pdu:
        while not self.queue:
            data = await asyncio.wait_for(self.r.read(1 << 20), timeout)
            if not data:
                raise ConnectionError("target closed the connection")
            self.queue += self.parser.feed(data)
        pdu = self.queue.pop(0)
        if isinstance(pdu, P.NopIn) and pdu.itt == P.RESERVED_TAG:
            self.expstatsn = pdu.statsn  # a target ping does not advance StatSN (§11.19.4)
        elif hasattr(pdu, "statsn") and not isinstance(pdu, (P.R2T,)) and not (
                isinstance(pdu, P.DataIn) and not pdu.has_status):
            self.expstatsn = (pdu.statsn + 1) & 0xFFFFFFFF
        return pdu

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the target closed or reset the connection (what it sent first is
        read and dropped); False if it is still open after ``timeout``."""
        try:
            while True:
                data = await asyncio.wait_for(self.r.read(65536), timeout)
                if not data:
                    return True
        except asyncio.TimeoutError:  # an OSError subclass since 3.11: test it first
            return False
        except (ConnectionError, OSError):
            return True

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    async def login(self, target: str | None, *, session_type: str = "Normal", extra=(), isid=0x400000000001,
                    tsih: int = 0, initiator: str = IQN_I) -> P.LoginResponse:
        keys = [("InitiatorName", initiator), ("SessionType", session_type)]
        if target:
            keys.append(("TargetName", target))
        keys += [("HeaderDigest", "None"), ("DataDigest", "None"), ("InitialR2T", "No"),
                 ("ImmediateData", "Yes"), ("MaxRecvDataSegmentLength", "262144"),
                 ("FirstBurstLength", "65536"), ("MaxBurstLength", "262144")]
        if session_type == "Discovery":
            keys = [k for k in keys if k[0] not in ("InitialR2T", "ImmediateData", "FirstBurstLength",
                                                     "MaxBurstLength")]
        overrides = dict(extra)  # a key given here replaces the default of the same name
        keys = [(k, overrides.pop(k, v)) for k, v in keys] + list(overrides.items())
        self.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=isid, tsih=tsih, cid=0, cmdsn=self.cmdsn,
                                 itt=self.next_itt(), data=K.encode_text(keys)))
        resp = await self.recv()
        assert isinstance(resp, P.LoginResponse)
        self.expstatsn = (resp.statsn + 1) & 0xFFFFFFFF
        self.answers = dict(K.parse_text(resp.data))
        if resp.status_class == 0:
            self.parser.max_data_segment = 1 << 24
        return resp

    def command(self, cdb: bytes, *, read: bool = False, write: bool = False, edtl: int = 0, data: bytes = b"",
                final: bool = True, lun: int = 0, attr: int = 1, immediate: bool = False,
                cmdsn: int | None = None) -> int:
        itt = self.next_itt()
        sn = self.cmdsn if cmdsn is None else cmdsn
        self.send(P.ScsiCommandPdu(read=read, write=write, attr=attr, lun=P.encode_lun(lun), edtl=edtl,
                                   cmdsn=sn, expstatsn=self.expstatsn, cdb=cdb, itt=itt, final=final,
                                   data=data, immediate=immediate))
        if not immediate and cmdsn is None:
            self.cmdsn += 1
        return itt
