"""Target-side faults against the session engine, with the scripted target of
test_initiator_engine (loopback TCP, shared PDU codec): exact interleavings of a command
timeout, its ABORT TASK and a connection loss that a real target only shows by chance.
The end-to-end versions are in tests/integration/test_initiator_faults_explore.py.
"""
from __future__ import annotations

import asyncio

import pytest

from iscsi import pdu as P
from iscsi.initiator import scsi
from iscsi.initiator.errors import CommandTimeout, ConnectionLost, SessionFailed
from iscsi.initiator.session import State
from tests.unit.test_initiator_engine import FakeConn, fake, open_session  # noqa: F401  (fixture)


async def _until(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def _commands(t, op: int) -> list:
    return [p for c in t.conns for p in c.received if isinstance(p, P.ScsiCommandPdu) and p.cdb[0] == op]


@pytest.mark.parametrize("op", ["read", "write"])
async def test_a_command_whose_abort_dies_with_the_connection_is_not_sent_again(fake, op):
    """The command times out, its ABORT TASK is sent and the connection drops before the
    answer (NOP timeout, target reset).  The loss re-queues unfinished commands for the
    reconnect; the failed abort then hands the caller CommandTimeout — and that command must
    leave the queue: before the fix it was sent again after the new login, so a READ wrote
    the buffer its caller already had back, and a WRITE was carried out after its caller was
    told it failed (RFC 7143 §6.3.5: at ERL 0 only what the caller still waits for is
    re-issued)."""
    stalled = {"on": True}

    async def handler(conn, pdu):
        # First connection: commands and their ABORT TASK go unanswered (a stuck target).
        return stalled["on"] and isinstance(pdu, (P.ScsiCommandPdu, P.DataOut, P.TaskMgmtRequest))

    t = await fake(handler)
    t.disk[0:4096] = b"\x55" * 4096
    s = await open_session(t, replacement_timeout=10)
    try:
        buf = bytearray(b"\xAA" * 4096)
        if op == "read":
            call = s.execute(0, scsi.read16(0, 8), read_len=4096, buf=buf, timeout=0.2)
        else:
            call = s.execute(0, scsi.write16(8, 8), data=b"\x77" * 4096, timeout=0.2)
        ex = asyncio.ensure_future(call)
        await _until(lambda: any(isinstance(p, P.TaskMgmtRequest) for p in t.conns[0].received))
        stalled["on"] = False
        t.conns[0].drop()
        with pytest.raises(CommandTimeout):
            await asyncio.wait_for(ex, 5)
        await s.wait_state(State.LOGGED_IN, timeout=5)
        # A command after the reconnect goes through; the timed-out one did not go with it.
        assert (await s.execute(0, scsi.test_unit_ready())).status == 0
        assert s.queued == 0
        code = 0x88 if op == "read" else 0x8A
        assert len(_commands(t, code)) == 1, "the timed-out command was sent again after the reconnect"
        assert bytes(buf) == b"\xAA" * 4096
        assert bytes(t.disk[8 * 512:16 * 512]) == bytes(4096)
    finally:
        await s.close()


# --------------------------------------------------------------------------- dropped right after login
class DropAfterLogin:
    """Makes a started FakeTarget reset each connection right after its final Login Response
    when ``drop(n)`` is true (n = 0 for the target's first connection): a target that crashes,
    or is killed again, as soon as it has let us in."""

    def __init__(self, target, drop) -> None:
        self.target, self.drop = target, drop

    async def start(self) -> "DropAfterLogin":
        t = self.target
        t.server.close()
        t.server = await asyncio.start_server(self._serve, "127.0.0.1", t.port)
        return self

    async def _serve(self, reader, writer) -> None:
        t = self.target
        conn = FakeConn(t, reader, writer)
        n = len(t.conns)
        t.conns.append(conn)
        respond = conn.login.respond

        def respond_then_drop(pdu):
            r = respond(pdu)
            if conn.login.finished and self.drop(n):
                asyncio.get_running_loop().call_soon(conn.drop)   # after the response is written
            return r
        conn.login.respond = respond_then_drop
        await conn.run()


async def test_a_connection_dropped_right_after_the_recovery_login_is_not_taken_as_logged_in(fake):
    """Before the fix the session went LOGGED_IN on the closed connection (the close came
    before the session was the connection's sink, so nobody heard of it): commands were
    queued on it for ever, the keepalive skips closed connections, no recovery ran."""
    t = await fake()
    s = await open_session(t, replacement_timeout=10)
    try:
        await DropAfterLogin(t, lambda n: n == 1).start()
        t.conns[0].drop()
        r = await asyncio.wait_for(s.execute(0, scsi.test_unit_ready()), 5)
        assert r.status == 0 and s.state == State.LOGGED_IN and not s.conn.closed
        assert len(t.conns) == 3 and s.reconnects == 1
    finally:
        await s.close()


async def test_a_target_that_drops_every_login_fails_the_io_after_the_window(fake):
    """A crash loop: every login is answered, then the connection reset.  The caller gets
    SessionFailed after replacement_timeout, naming what happened, instead of waiting for ever."""
    t = await fake()
    s = await open_session(t, replacement_timeout=1.5)
    try:
        await DropAfterLogin(t, lambda n: n >= 1).start()
        t.conns[0].drop()
        with pytest.raises(SessionFailed, match=r"not recovered within 1.5s \(last attempt: login to "
                                                r"\S+: connection lost right after the login"):
            await asyncio.wait_for(s.execute(0, scsi.test_unit_ready()), 5)
    finally:
        await s.close()


async def test_a_first_login_whose_connection_drops_at_once_fails_the_open(fake):
    t = await fake()
    await DropAfterLogin(t, lambda n: True).start()
    with pytest.raises(ConnectionLost, match="connection lost right after the login"):
        await asyncio.wait_for(open_session(t), 5)
