"""The target's transport over real loopback TCP, with a fake SCSI layer (RFC 7143 rules)."""
import asyncio
import struct

import pytest

from iscsi import keys as K
from iscsi import pdu as P
from iscsi.target.server import IscsiServer

from .fakes import FakeLunMap, FakeRegistry, FakeTarget
from .wire import Wire

IQN_T = "iqn.2026-11.org.sanstack:t1"


@pytest.fixture
async def target(request):
    luns = FakeLunMap(4096)
    reg = FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=luns)})
    fast_pings = request.node.get_closest_marker("fast_pings") is not None
    server = IscsiServer(reg, nop_interval=0.3 if fast_pings else 30, nop_timeout=0.6 if fast_pings else 30)
    host, port = await server.add_portal("127.0.0.1", 0)
    server.port = port
    server.luns = luns
    yield server
    await server.shutdown(drain_timeout=1)


async def logged_in(server, **kw) -> Wire:
    wire = await Wire.open(server.port)
    resp = await wire.login(IQN_T, **kw)
    assert resp.status_class == 0, resp
    return wire


def read10(lba, blocks):
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


def write10(lba, blocks):
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, blocks, 0)


async def test_discovery_send_targets():
    luns = FakeLunMap()
    reg = FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=luns, tpgt=3)})
    server = IscsiServer(reg)
    _, port = await server.add_portal("127.0.0.1", 0)
    wire = await Wire.open(port)
    resp = await wire.login(None, session_type="Discovery")
    assert resp.status_class == 0
    wire.send(P.TextRequest(itt=wire.next_itt(), cmdsn=wire.cmdsn, expstatsn=wire.expstatsn,
                            data=K.encode_text([("SendTargets", "All")])))
    text = await wire.recv()
    assert isinstance(text, P.TextResponse) and text.final
    assert K.parse_text(text.data) == [("TargetName", IQN_T), ("TargetAddress", f"127.0.0.1:{port},3")]
    # SCSI commands are not allowed in a discovery session (§4.3)
    wire.command(b"\0" * 6)
    rej = await wire.recv()
    assert isinstance(rej, P.Reject)
    await server.shutdown(drain_timeout=1)


async def test_write_with_immediate_unsolicited_and_r2t_then_read(target):
    wire = await logged_in(target)
    payload = bytes(range(256)) * 4096  # 1 MiB
    blocks = len(payload) // 512
    itt = wire.command(write10(8, blocks), write=True, edtl=len(payload), data=payload[:8192], final=False)
    # unsolicited Data-Out up to FirstBurstLength (65536)
    off, sn = 8192, 0
    while off < 65536:
        wire.send(P.DataOut(itt=itt, ttt=P.RESERVED_TAG, datasn=sn, offset=off, final=off + 8192 >= 65536,
                            expstatsn=wire.expstatsn, data=payload[off:off + 8192]))
        off += 8192
        sn += 1
    bursts = 0
    while True:
        pdu = await wire.recv()
        if isinstance(pdu, P.ScsiResponse):
            break
        assert isinstance(pdu, P.R2T)
        assert pdu.length <= 262144 and pdu.r2tsn == bursts
        bursts += 1
        for i, o in enumerate(range(pdu.offset, pdu.offset + pdu.length, 65536)):
            n = min(65536, pdu.offset + pdu.length - o)
            wire.send(P.DataOut(itt=itt, ttt=pdu.ttt, datasn=i, offset=o, final=o + n >= pdu.offset + pdu.length,
                                expstatsn=wire.expstatsn, data=payload[o:o + n]))
    assert pdu.status == 0 and not pdu.overflow and not pdu.underflow
    assert bursts == 4  # (1 MiB - 64 KiB) / 256 KiB, rounded up
    assert bytes(target.luns.disk[8 * 512:8 * 512 + len(payload)]) == payload
    # read it back: Data-In split at our MaxRecvDataSegmentLength (262144), status collapsed
    wire.command(read10(8, blocks), read=True, edtl=len(payload))
    got = bytearray()
    while True:
        pdu = await wire.recv()
        assert isinstance(pdu, P.DataIn)
        assert len(pdu.data) <= 262144
        got += pdu.data
        if pdu.has_status:
            break
    assert pdu.status == 0 and bytes(got) == payload


async def test_read_residual_underflow_and_overflow(target):
    wire = await logged_in(target)
    wire.command(read10(0, 1), read=True, edtl=4096)
    pdu = await wire.recv()
    assert isinstance(pdu, P.DataIn) and pdu.has_status and pdu.underflow and pdu.residual == 4096 - 512
    wire.command(read10(0, 2), read=True, edtl=512)
    pdu = await wire.recv()
    assert pdu.overflow and pdu.residual == 512 and len(pdu.data) == 512


async def test_cmdsn_outside_window_is_silently_ignored(target):
    wire = await logged_in(target)
    wire.command(b"\0" * 6, cmdsn=wire.cmdsn + 100000)
    with pytest.raises(asyncio.TimeoutError):
        await wire.recv(timeout=0.5)
    wire.command(b"\0" * 6)
    resp = await wire.recv()
    assert isinstance(resp, P.ScsiResponse) and resp.status == 0


async def test_commands_held_until_missing_cmdsn_arrives(target):
    wire = await logged_in(target)
    first = wire.cmdsn
    wire.command(b"\0" * 6, cmdsn=first + 1)
    with pytest.raises(asyncio.TimeoutError):
        await wire.recv(timeout=0.3)
    wire.command(b"\0" * 6, cmdsn=first)
    a, b = await wire.recv(), await wire.recv()
    assert {a.itt, b.itt} and a.status == b.status == 0


@pytest.mark.fast_pings
async def test_nop_out_ping_answered_and_target_pings_idle_initiator(target):
    wire = await logged_in(target)
    wire.send(P.NopOut(itt=wire.next_itt(), cmdsn=wire.cmdsn, expstatsn=wire.expstatsn, immediate=True,
                       data=b"hello"))
    pong = await wire.recv()
    assert isinstance(pong, P.NopIn) and pong.data == b"hello" and pong.ttt == P.RESERVED_TAG
    ping = await wire.recv(timeout=2)
    assert isinstance(ping, P.NopIn) and ping.ttt != P.RESERVED_TAG and ping.itt == P.RESERVED_TAG
    wire.send(P.NopOut(itt=P.RESERVED_TAG, ttt=ping.ttt, cmdsn=wire.cmdsn, expstatsn=wire.expstatsn,
                       immediate=True))
    # answered: the connection stays up past the timeout
    await asyncio.sleep(0.8)
    wire.command(b"\0" * 6)
    while True:
        resp = await wire.recv()
        if isinstance(resp, P.NopIn):
            wire.send(P.NopOut(itt=P.RESERVED_TAG, ttt=resp.ttt, cmdsn=wire.cmdsn, expstatsn=wire.expstatsn,
                               immediate=True))
            continue
        break
    assert isinstance(resp, P.ScsiResponse)


@pytest.mark.fast_pings
async def test_unanswered_target_ping_drops_connection(target):
    wire = await logged_in(target)
    assert await wire.closed(timeout=3)


async def test_abort_task(target):
    target.luns.gate = asyncio.Event()
    wire = await logged_in(target)
    itt = wire.command(read10(0, 1), read=True, edtl=512)
    await asyncio.sleep(0.05)
    wire.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK, rtt=itt, itt=wire.next_itt(),
                                cmdsn=wire.cmdsn, expstatsn=wire.expstatsn, immediate=True))
    resp = await wire.recv()
    assert isinstance(resp, P.TaskMgmtResponse) and resp.response == P.TmfResponse.COMPLETE
    target.luns.gate.set()
    wire.send(P.TaskMgmtRequest(function=P.TmfFunction.ABORT_TASK, rtt=0xDEAD, itt=wire.next_itt(),
                                cmdsn=wire.cmdsn, expstatsn=wire.expstatsn, immediate=True))
    resp = await wire.recv()
    assert resp.response == P.TmfResponse.TASK_DOES_NOT_EXIST  # and no response for the aborted read


async def test_lun_reset_reaches_the_scsi_layer(target):
    wire = await logged_in(target)
    wire.send(P.TaskMgmtRequest(function=P.TmfFunction.LOGICAL_UNIT_RESET, itt=wire.next_itt(),
                                cmdsn=wire.cmdsn, expstatsn=wire.expstatsn, immediate=True))
    resp = await wire.recv()
    assert resp.response == P.TmfResponse.COMPLETE
    assert target.luns.tmfs == [("lun_reset", 0)]


async def test_logout(target):
    wire = await logged_in(target)
    wire.send(P.LogoutRequest(reason=0, itt=wire.next_itt(), cmdsn=wire.cmdsn, expstatsn=wire.expstatsn,
                              immediate=True))
    resp = await wire.recv()
    assert isinstance(resp, P.LogoutResponse) and resp.response == 0
    assert await wire.closed()
    assert target.sessions() == []


async def test_session_reinstatement_replaces_old_session(target):
    first = await logged_in(target)
    second = await logged_in(target)  # same ISID and initiator, TSIH 0
    assert await first.closed()
    rows = target.sessions()
    assert len(rows) == 1
    second.command(b"\0" * 6)
    assert (await second.recv()).status == 0


async def test_header_digest_negotiated_and_enforced(target):
    wire = await Wire.open(target.port)
    resp = await wire.login(IQN_T, extra=[])
    # re-login with digests on a fresh connection
    wire2 = await Wire.open(target.port)
    keys = [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]
    await _login_with(wire2, keys)
    assert wire2.answers["HeaderDigest"] == "CRC32C" and wire2.answers["DataDigest"] == "CRC32C"
    wire2.header_digest = wire2.data_digest = True
    wire2.parser.header_digest = wire2.parser.data_digest = True
    wire2.command(read10(0, 1), read=True, edtl=512)
    pdu = await wire2.recv()
    assert isinstance(pdu, P.DataIn) and pdu.has_status
    # a response with sense data (odd length: padded) passes the data digest check too
    wire2.command(b"\xfe" + bytes(15))
    resp = await wire2.recv()
    assert isinstance(resp, P.ScsiResponse) and resp.status == 2 and resp.sense[2] & 0xF == 5
    # a corrupted header digest kills the connection (§7.8)
    raw = bytearray(P.ScsiCommandPdu(cdb=b"\0" * 6, cmdsn=wire2.cmdsn, itt=99).header()) + b"\0\0\0\0"
    wire2.send_raw(bytes(raw))
    assert await wire2.closed()


async def _login_with(wire, keys):
    return await wire.login(IQN_T, extra=[], isid=0x400000000002) if not keys else await _raw_login(wire, keys)


async def _raw_login(wire, extra):
    keys = [("InitiatorName", "iqn.2026-11.org.sanstack.test:digest"), ("SessionType", "Normal"),
            ("TargetName", IQN_T), ("MaxRecvDataSegmentLength", "65536")] + extra
    wire.send(P.LoginRequest(transit=True, csg=1, nsg=3, isid=0x400000000009, cid=0, cmdsn=1, itt=1,
                             data=K.encode_text(keys)))
    resp = await wire.recv()
    wire.answers = dict(K.parse_text(resp.data))
    assert resp.status_class == 0
    return resp


async def test_garbage_bytes_drop_only_that_connection(target):
    good = await logged_in(target)
    bad = await Wire.open(target.port)
    bad.send_raw(b"\x1c" + b"\xff" * 47)  # unknown opcode before login
    assert await bad.closed()
    good.command(b"\0" * 6)
    assert (await good.recv()).status == 0


async def test_login_that_never_finishes_is_dropped(monkeypatch):
    from iscsi.target import connection as C

    monkeypatch.setattr(C, "LOGIN_TIMEOUT", 0.3)
    reg = FakeRegistry({IQN_T: FakeTarget(IQN_T, luns=FakeLunMap())})
    server = IscsiServer(reg)
    _, port = await server.add_portal("127.0.0.1", 0)
    wire = await Wire.open(port)
    assert await wire.closed(timeout=3)
    await server.shutdown(drain_timeout=1)
