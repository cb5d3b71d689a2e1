"""Transport effects of SCSI commands, over loopback with the real SCSI core."""
import asyncio
import struct

import pytest

from iscsi import pdu as P
from iscsi.backstore.ram import RamBackstore
from iscsi.scsi.lu import LogicalUnit
from iscsi.scsi.target import LunMap
from iscsi.target.server import IscsiServer

from .fakes import FakeRegistry, FakeTarget
from .wire import Wire

IQN_T = "iqn.2026-11.org.sanstack:pr"


@pytest.fixture
async def server():
    lu = LogicalUnit(RamBackstore(8 << 20, 512), serial="prtest01", lun_id=0)
    reg = FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=LunMap({0: lu}))})
    srv = IscsiServer(reg, nop_interval=60, nop_timeout=60)
    _, srv.port = await srv.add_portal("127.0.0.1", 0)
    yield srv
    await srv.shutdown(drain_timeout=1)


async def login(server, initiator, isid):
    wire = await Wire.open(server.port)
    assert (await wire.login(IQN_T, initiator=initiator, isid=isid)).status_class == 0
    # clear the power-on unit attention
    for _ in range(3):
        wire.command(bytes(6))
        if (await wire.recv()).status == 0:
            break
    return wire


def prout(sa: int, key: int, sa_key: int = 0, rtype: int = 0) -> tuple[bytes, bytes]:
    cdb = struct.pack(">BBBHIB", 0x5F, sa, rtype & 0xF, 0, 24, 0).ljust(16, b"\0")
    params = struct.pack(">QQ", key, sa_key) + bytes(8)
    return cdb, params


async def run_prout(wire, sa, key, sa_key=0, rtype=0):
    cdb, params = prout(sa, key, sa_key, rtype)
    wire.command(cdb, write=True, edtl=len(params), data=params)
    resp = await wire.recv()
    assert isinstance(resp, P.ScsiResponse), resp
    return resp.status


async def test_preempt_and_abort_aborts_the_preempted_nexus_tasks(server):
    a = await login(server, "iqn.2026-11.org.sanstack.test:a", 0x400000000011)
    b = await login(server, "iqn.2026-11.org.sanstack.test:b", 0x400000000022)
    assert await run_prout(b, 0x00, 0, 0xBB) == 0          # REGISTER
    assert await run_prout(a, 0x00, 0, 0xAA) == 0
    assert await run_prout(b, 0x01, 0xBB, rtype=1) == 0    # RESERVE, Write Exclusive
    # B starts a write and waits for its R2T: a task in flight on the target.
    itt = b.command(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), write=True, edtl=512)
    r2t = await b.recv()
    assert isinstance(r2t, P.R2T) and r2t.itt == itt
    # A preempts B's reservation and aborts its tasks (SPC-4 §5.13.11.2.4).
    assert await run_prout(a, 0x05, 0xAA, 0xBB, rtype=1) == 0
    # B's write is gone: the Data-Out still answering its R2T is dropped quietly (no Reject
    # that libiscsi could not match), and no response for the write ever comes...
    b.send(P.DataOut(itt=itt, ttt=r2t.ttt, datasn=0, offset=0, final=True, expstatsn=b.expstatsn,
                     data=b"\1" * 512))
    with pytest.raises(asyncio.TimeoutError):
        await b.recv(timeout=0.3)
    # ...nor is the data written: B's next command sees the preemption, and a READ finds zeroes.
    b.command(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0), read=True, edtl=512)
    first = await b.recv()
    assert isinstance(first, P.ScsiResponse) and first.status == 2  # UNIT ATTENTION (cleared)
    a.command(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 1, 0), read=True, edtl=512)
    data = await a.recv()
    assert isinstance(data, P.DataIn) and bytes(data.data) == bytes(512)


async def test_read_of_4k_blocks_split_at_initiator_max_recv(server):
    wire = await Wire.open(server.port)
    from iscsi import keys as K

    wire.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000033, cmdsn=1, itt=1,
                             data=K.encode_text([("InitiatorName", "iqn.2026-11.org.sanstack.test:c"),
                                                 ("TargetName", IQN_T), ("MaxRecvDataSegmentLength", "4096")])))
    assert (await wire.recv()).status_class == 0
    for _ in range(3):
        wire.command(bytes(6))
        if (await wire.recv()).status == 0:
            break
    wire.command(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 64, 0), read=True, edtl=64 * 512)
    sizes, datasns = [], []
    while True:
        pdu = await wire.recv()
        assert isinstance(pdu, P.DataIn)
        sizes.append(len(pdu.data))
        datasns.append(pdu.datasn)
        if pdu.has_status:
            break
    assert sizes == [4096] * 8 and datasns == list(range(8))  # §13.12: never above 4096


async def test_large_fua_write_in_steps_completes(server):
    """A WRITE over sbc.LARGE_TRANSFER_STEP is written in steps (bare yields) and then
    flushed (a future): the eager runner must survive that second kind of suspension
    (it used to answer HARDWARE ERROR, INTERNAL TARGET FAILURE)."""
    wire = await login(server, "iqn.2026-11.org.sanstack.test:bigfua", 0x400000000044)
    payload = bytes(range(256)) * (5 * 4096)  # 5 MiB
    blocks = len(payload) // 512
    cdb = struct.pack(">BBIBHB", 0x2A, 0x08, 0, 0, blocks, 0)  # WRITE(10), FUA
    itt = wire.command(cdb, write=True, edtl=len(payload), data=payload[:65536])
    while True:
        pdu = await wire.recv()
        if isinstance(pdu, P.ScsiResponse):
            break
        assert isinstance(pdu, P.R2T)
        for i, o in enumerate(range(pdu.offset, pdu.offset + pdu.length, 65536)):
            n = min(65536, pdu.offset + pdu.length - o)
            wire.send(P.DataOut(itt=itt, ttt=pdu.ttt, datasn=i, offset=o, final=o + n >= pdu.offset + pdu.length,
                                expstatsn=wire.expstatsn, data=payload[o:o + n]))
    assert pdu.status == 0, pdu
    assert server.registry.targets[IQN_T].luns.get(0).backstore.read(0, len(payload)) == payload


async def test_a_mixed_case_initiator_name_is_one_nexus_with_its_lower_case_transport_id(server):
    """iSCSI names compare case-insensitively (RFC 3722, RFC 7143 §4.2.7.1): REGISTER AND MOVE
    to the TransportID of ``...:NodeB`` (lower-cased, as every TransportID) makes NodeB the
    holder, so NodeB's writes go through instead of meeting RESERVATION CONFLICT."""
    a = await login(server, "iqn.2026-11.org.sanstack.test:a", 0x400000000051)
    b = await login(server, "iqn.2026-11.org.sanstack.test:NodeB", 0x400000000052)
    assert await run_prout(a, 0x00, 0, 0xAA) == 0                 # A: REGISTER
    assert await run_prout(a, 0x01, 0xAA, rtype=1) == 0           # A: RESERVE, Write Exclusive
    name = b"iqn.2026-11.org.sanstack.test:NodeB,i,0x400000000052"
    name += bytes(-len(name) % 4 or 4)                            # NUL-terminated, 4-byte multiple
    tid = bytes((0x45, 0)) + struct.pack(">H", len(name)) + name  # iSCSI TransportID, format 01b
    params = struct.pack(">QQxBHI", 0xAA, 0xBB, 0, 1, len(tid)) + tid  # RELATIVE TARGET PORT 1
    cdb = bytes((0x5F, 0x07, 0x01, 0, 0)) + len(params).to_bytes(4, "big") + b"\x00"
    a.command(cdb, write=True, edtl=len(params), data=params)
    moved = await a.recv()
    assert isinstance(moved, P.ScsiResponse) and moved.status == 0, moved
    b.command(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), write=True, edtl=512, data=b"\2" * 512)
    for _ in range(3):                                            # past any unit attention
        resp = await b.recv()
        assert isinstance(resp, P.ScsiResponse)
        if resp.status != 2:
            break
        b.command(struct.pack(">BBIBHB", 0x2A, 0, 0, 0, 1, 0), write=True, edtl=512, data=b"\2" * 512)
    assert resp.status == 0, "NodeB holds the reservation now"


async def test_shutdown_waits_for_the_logout_it_asks_for(server):
    """RFC 7143 §11.9.1 event 1: shutdown asks each initiator to log out; one that answers at
    once gets its Logout Response (a clean end it will not retry), instead of a connection
    closed under it as soon as no command was in flight."""
    wire = await login(server, "iqn.2026-11.org.sanstack.test:bye", 0x400000000061)
    stopping = asyncio.ensure_future(server.shutdown(drain_timeout=5))
    ask = await wire.recv()
    assert isinstance(ask, P.AsyncMessage) and ask.event == P.AsyncEvent.LOGOUT_REQUEST
    wire.send(P.LogoutRequest(immediate=True, reason=P.LogoutReason.CLOSE_SESSION, cmdsn=wire.cmdsn,
                              expstatsn=wire.expstatsn, itt=0x77))
    resp = await wire.recv()
    assert isinstance(resp, P.LogoutResponse) and resp.response == 0
    await asyncio.wait_for(stopping, 5)
