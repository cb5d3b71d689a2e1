"""APTPL across a real daemon restart (SPC-4 §5.13.5): two cluster nodes, a registrants-only
reservation.  With APTPL=1 the registrations and the reservation come back from the "pr"
state file; once the last REGISTER carried APTPL=0 nothing comes back."""
from __future__ import annotations

import asyncio
import struct

from iscsi.initiator import SessionOptions
from iscsi.initiator.client import login_config
from iscsi.initiator.session import Session
from iscsi.initiator.url import parse_url
from tools.peers.sanstack import SanstackPeer

NODE1 = "iqn.1991-05.com.microsoft:node1"
NODE2 = "iqn.1991-05.com.microsoft:node2"
OUTSIDER = "iqn.1994-05.com.redhat:outsider"
WE_RO = 5
GOOD, CHECK_CONDITION, RESERVATION_CONFLICT = 0x00, 0x02, 0x18
TIMEOUT = 15.0


def prout(sa: int, pr_type: int = 0, key: int = 0, sa_key: int = 0, aptpl: bool = False) -> tuple[bytes, bytes]:
    params = struct.pack(">QQ4xBxH", key, sa_key, 0x01 if aptpl else 0, 0)
    return bytes((0x5F, sa, pr_type, 0, 0)) + len(params).to_bytes(4, "big") + b"\x00", params


def prin(sa: int) -> bytes:
    return bytes((0x5E, sa, 0, 0, 0, 0, 0, 0x10, 0x00, 0))


WRITE10 = bytes((0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0))


async def login(peer: SanstackPeer, initiator: str, isid: int = 0x400001370001):
    """A session with a fixed ISID, as Windows and open-iscsi use: the same initiator port
    (so the same registered I_T nexus) after the restart."""
    url = parse_url(peer.url(0))
    cfg = login_config(url, initiator_name=initiator)
    opts = SessionOptions(noop_interval=0, command_timeout=TIMEOUT)
    return await asyncio.wait_for(Session.open(url.host, url.port, cfg, opts, isid=isid), TIMEOUT)


async def run(session, cdb: bytes, data: bytes | None = None, read_len: int = 0) -> tuple[int, bytes]:
    """Status and data of one command; a pending unit attention (POWER ON after the restart)
    is cleared by sending the command again."""
    for _ in range(4):
        t = await session.execute(0, cdb, read_len=read_len, data=data, timeout=TIMEOUT)
        if t.status != CHECK_CONDITION:
            return t.status, bytes(t.data) if read_len else b""
    raise AssertionError(f"command {cdb[0]:#x} kept failing with CHECK CONDITION")


async def state(session) -> tuple[list[int], tuple[int, int] | None]:
    _, data = await run(session, prin(0), read_len=4096)
    n = struct.unpack_from(">I", data, 4)[0]
    keys = [int.from_bytes(data[8 + i:16 + i], "big") for i in range(0, n, 8)]
    _, data = await run(session, prin(1), read_len=4096)
    res = None
    if struct.unpack_from(">I", data, 4)[0]:
        res = (int.from_bytes(data[8:16], "big"), data[21] & 0x0F)
    return keys, res


async def test_aptpl_1_survives_a_daemon_restart_and_aptpl_0_does_not(tmp_path):
    peer = SanstackPeer.create(tmp_path, size="8M", use_config=True)
    peer.start()
    try:
        n1, n2 = await login(peer, NODE1), await login(peer, NODE2)
        assert (await run(n1, *prout(6, sa_key=0x1111, aptpl=True)))[0] == GOOD
        assert (await run(n2, *prout(6, sa_key=0x2222, aptpl=True)))[0] == GOOD
        assert (await run(n1, *prout(1, WE_RO, key=0x1111)))[0] == GOOD
        await n1.close()
        await n2.close()

        assert peer.stop() == 0
        peer.restart()
        n1, outsider = await login(peer, NODE1), await login(peer, OUTSIDER)
        assert await state(n1) == ([0x1111, 0x2222], (0x1111, WE_RO))
        assert (await run(outsider, WRITE10, data=bytes(512)))[0] == RESERVATION_CONFLICT
        assert (await run(n1, WRITE10, data=bytes(512)))[0] == GOOD
        # The last REGISTER now carries APTPL=0: power loss drops everything (SPC-4 §5.13.5).
        assert (await run(n1, *prout(0, key=0x1111, sa_key=0x1112)))[0] == GOOD
        await n1.close()
        await outsider.close()

        assert peer.stop() == 0
        peer.restart()
        outsider = await login(peer, OUTSIDER)
        assert await state(outsider) == ([], None)
        assert (await run(outsider, WRITE10, data=bytes(512)))[0] == GOOD
        await outsider.close()
    finally:
        peer.stop()
