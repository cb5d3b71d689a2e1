"""Multipath path selection and ALUA against two scripted portals of one fake LU."""
from __future__ import annotations

import asyncio
import struct

import pytest

from iscsi import pdu as P
from iscsi.initiator.multipath import MultipathError, open_multipath
from iscsi.initiator.scsi import AluaState
from iscsi.initiator.session import SessionOptions
from iscsi.initiator.url import IscsiUrl
from tests.unit.test_initiator_engine import FakeConn, FakeTarget
from tests.unit.test_initiator_login import TGT

NAA = bytes.fromhex("6001405aabbccdd0")


class AluaLu:
    """One LU behind two ports (relative port 1 in group 1, relative port 2 in group 2)."""

    def __init__(self, naa: bytes = NAA) -> None:
        self.states = {1: AluaState.ACTIVE_OPTIMIZED, 2: AluaState.ACTIVE_OPTIMIZED}
        self.naa = naa
        self.reads = {1: 0, 2: 0}
        self.disk = bytearray(1 << 20)

    def handler(self, port: int):
        async def handle(conn: FakeConn, pdu: P.Pdu) -> bool:
            if not isinstance(pdu, P.ScsiCommandPdu):
                return False
            cdb = pdu.cdb
            op = cdb[0]
            if op == 0x12 and cdb[1] & 1:          # VPD
                page = cdb[2]
                if page == 0x00:
                    body = bytes([0x00, 0x83])
                elif page == 0x83:
                    body = (bytes([1, 3, 0, 8]) + self.naa
                            + bytes([1, 0x14, 0, 4]) + struct.pack(">HH", 0, port)
                            + bytes([1, 0x15, 0, 4]) + struct.pack(">HH", 0, port))
                else:
                    conn.status(pdu, 2, _sense(5, 0x24))
                    return True
                conn.data_in(pdu, bytes([0, page]) + struct.pack(">H", len(body)) + body)
            elif op == 0x12:                        # standard INQUIRY, TPGS = 1 (implicit ALUA)
                data = bytearray(96)
                data[2], data[3], data[4], data[5] = 6, 2, 91, 0x10
                data[8:16] = b"FAKE    "
                conn.data_in(pdu, bytes(data))
            elif op == 0xA3 and cdb[1] & 0x1F == 0x0A:  # REPORT TARGET PORT GROUPS
                body = b""
                for g in (1, 2):
                    body += bytes([self.states[g], 0x01, 0, g, 0, 0, 0, 1]) + struct.pack(">HH", 0, g)
                conn.data_in(pdu, struct.pack(">I", len(body)) + body)
            elif op == 0x9E:                        # READ CAPACITY (16)
                conn.data_in(pdu, struct.pack(">QI", len(self.disk) // 512 - 1, 512) + bytes(20))
            elif op == 0x88:
                state = self.states[port]
                if state not in (AluaState.ACTIVE_OPTIMIZED, AluaState.ACTIVE_NON_OPTIMIZED):
                    conn.status(pdu, 2, _sense(2, 0x04, 0x0B))   # NOT READY: port in standby
                    return True
                self.reads[port] += 1
                lba, n = struct.unpack_from(">QI", cdb, 2)
                conn.data_in(pdu, bytes(self.disk[lba * 512:(lba + n) * 512]))
            else:
                conn.status(pdu)
            return True
        return handle


def _sense(key: int, asc: int, ascq: int = 0) -> bytes:
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


@pytest.fixture
async def two_ports():
    lu = AluaLu()
    targets = [await FakeTarget(lu.handler(1)).start(), await FakeTarget(lu.handler(2)).start()]
    yield lu, targets
    for t in targets:
        await t.stop()


def _urls(targets) -> list[IscsiUrl]:
    return [IscsiUrl(host="127.0.0.1", port=t.port, target=TGT, lun=0) for t in targets]


async def test_round_robin_spreads_and_least_queue_works(two_ports):
    lu, targets = two_ports
    mp, dev = await open_multipath(_urls(targets), options=SessionOptions(noop_interval=0))
    try:
        assert [p.alua for p in mp.paths] == [AluaState.ACTIVE_OPTIMIZED] * 2
        assert [(p.rel_port, p.group) for p in mp.paths] == [(1, 1), (2, 2)]
        await asyncio.gather(*(dev.read(i * 8, 8) for i in range(40)))
        assert lu.reads[1] >= 15 and lu.reads[2] >= 15
        mp.policy = "least-queue"
        before = dict(lu.reads)
        await asyncio.gather(*(dev.read(i * 8, 8) for i in range(40)))
        assert sum(lu.reads.values()) - sum(before.values()) == 40
    finally:
        await mp.close()


async def test_alua_standby_path_is_not_used_and_transition_is_followed(two_ports):
    lu, targets = two_ports
    lu.states[2] = AluaState.STANDBY
    mp, dev = await open_multipath(_urls(targets), options=SessionOptions(noop_interval=0))
    try:
        assert [p.alua for p in mp.paths] == [AluaState.ACTIVE_OPTIMIZED, AluaState.STANDBY]
        await asyncio.gather(*(dev.read(i * 8, 8) for i in range(20)))
        assert lu.reads == {1: 20, 2: 0}
        # The groups swap: port 1 now answers "standby"; the initiator re-reads the states
        # (REPORT TARGET PORT GROUPS) and moves to port 2 without an error reaching the caller.
        lu.states[1], lu.states[2] = AluaState.STANDBY, AluaState.ACTIVE_OPTIMIZED
        await asyncio.gather(*(dev.read(i * 8, 8) for i in range(20)))
        assert lu.reads[2] >= 19
        assert mp.paths[0].alua == AluaState.STANDBY and mp.paths[1].alua == AluaState.ACTIVE_OPTIMIZED
    finally:
        await mp.close()


async def test_paths_to_different_lus_are_refused():
    a, b = AluaLu(), AluaLu(naa=bytes.fromhex("6001405a00000001"))
    ta, tb = await FakeTarget(a.handler(1)).start(), await FakeTarget(b.handler(2)).start()
    try:
        with pytest.raises(MultipathError, match="different logical units"):
            await open_multipath(_urls([ta, tb]), options=SessionOptions(noop_interval=0))
    finally:
        await ta.stop()
        await tb.stop()
