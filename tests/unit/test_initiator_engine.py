"""Session engine rules against a scripted target over loopback TCP.

The fake target (shared framing + PDU codec, the test's own behaviour) lets each test
provoke what real targets do rarely: a closed CmdSN window, split Data-In, residuals,
R2T sequences, NOP-In pings, async events, dropped connections, DataSN gaps.
"""
from __future__ import annotations

import asyncio
import os
import struct

import pytest

from iscsi import framing
from iscsi import pdu as P
from iscsi.initiator import scsi
from iscsi.initiator.device import BlockDevice
from iscsi.initiator.errors import SessionFailed
from iscsi.initiator.login import LoginConfig
from iscsi.initiator.session import Session, SessionOptions, State
from tests.unit.test_initiator_login import INI, TGT, FakeTargetLogin

R = P.RESERVED_TAG


class FakeConn:
    def __init__(self, target: "FakeTarget", reader, writer) -> None:
        self.target, self.reader, self.writer = target, reader, writer
        self.pdus = framing.PduReader(allowed=P.INITIATOR_OPCODES, max_data_segment=1 << 24)
        self.login = FakeTargetLogin(local=dict(target.login_local))
        self.ffp = False
        self.statsn = 1000
        self.expcmdsn = 0
        self.received: list[P.Pdu] = []
        self.writes: dict[int, bytearray] = {}
        self.closed = False

    @property
    def maxcmdsn(self) -> int:
        if self.target.fixed_maxcmdsn is not None:
            return self.target.fixed_maxcmdsn
        return (self.expcmdsn + self.target.window - 1) & 0xFFFFFFFF

    def send(self, pdu: P.Pdu) -> None:
        if isinstance(pdu, P._TargetPdu):
            pdu.expcmdsn, pdu.maxcmdsn = self.expcmdsn, self.maxcmdsn
        if not self.closed:
            self.writer.write(framing.encode_bytes(pdu))

    def next_statsn(self) -> int:
        s = self.statsn
        self.statsn += 1
        return s

    def status(self, cmd: P.ScsiCommandPdu, status: int = 0, sense: bytes = b"", *, underflow: int = 0) -> None:
        self.send(P.ScsiResponse(itt=cmd.itt, status=status, statsn=self.next_statsn(),
                                 underflow=bool(underflow), residual=underflow,
                                 data=P.ScsiResponse.sense_segment(sense)))

    def data_in(self, cmd: P.ScsiCommandPdu, data: bytes, *, split: int = 4096, collapse: bool = True,
                underflow: int = 0, datasn_skip: int | None = None) -> None:
        offsets = list(range(0, len(data), split)) or [0]
        for i, off in enumerate(offsets):
            last = i == len(offsets) - 1
            sn = i + (1 if datasn_skip is not None and i >= datasn_skip else 0)
            pdu = P.DataIn(itt=cmd.itt, datasn=sn, offset=off, data=data[off:off + split],
                           final=last, has_status=last and collapse)
            if last and collapse:
                pdu.statsn = self.next_statsn()
                pdu.underflow, pdu.residual = bool(underflow), underflow
            else:
                pdu.statsn = self.statsn
            self.send(pdu)
        if not collapse:
            self.status(cmd, underflow=underflow)

    def drop(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    async def run(self) -> None:
        try:
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    break
                for pdu in self.pdus.feed(data):
                    if not self.ffp:
                        self.target.logins.append((pdu.isid, pdu.tsih))
                        resp = self.login.respond(pdu)
                        resp.tsih = self.target.tsih if self.login.finished else resp.tsih
                        resp.statsn = self.next_statsn()
                        resp.expcmdsn, resp.maxcmdsn = pdu.cmdsn, pdu.cmdsn + self.target.window - 1
                        self.writer.write(framing.encode_bytes(resp))
                        if self.login.finished:
                            self.ffp = True
                            self.expcmdsn = pdu.cmdsn
                        continue
                    self.received.append(pdu)
                    if not pdu.immediate and isinstance(pdu, (P.ScsiCommandPdu, P.TextRequest)):
                        assert pdu.cmdsn == self.expcmdsn, "commands must arrive in CmdSN order"
                        if ((self.maxcmdsn - pdu.cmdsn) & 0xFFFFFFFF) >= 0x80000000:
                            self.target.window_violations += 1
                        self.expcmdsn = (self.expcmdsn + 1) & 0xFFFFFFFF
                    await self.target.handle(self, pdu)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed = True
            self.writer.close()


class FakeTarget:
    def __init__(self, handler=None, *, window: int = 32, login_local: dict | None = None) -> None:
        self.handler = handler
        self.window = window
        self.login_local = login_local or {}
        self.conns: list[FakeConn] = []
        self.logins: list[tuple[int, int]] = []
        self.tsih = 0x42
        self.window_violations = 0
        self.fixed_maxcmdsn: int | None = None
        self.disk = bytearray(1 << 20)
        self.luns = [0]

    async def start(self) -> "FakeTarget":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer) -> None:
        conn = FakeConn(self, reader, writer)
        self.conns.append(conn)
        await conn.run()

    async def handle(self, conn: FakeConn, pdu: P.Pdu) -> None:
        if self.handler is not None and await self.handler(conn, pdu):
            return
        await default_handler(self, conn, pdu)

    async def stop(self) -> None:
        self.server.close()
        for c in self.conns:
            c.drop()


async def default_handler(target: FakeTarget, conn: FakeConn, pdu: P.Pdu) -> None:
    """A tiny disk: READ(16)/WRITE(16) with R2T, NOP, TMF, logout."""
    if isinstance(pdu, P.ScsiCommandPdu):
        op = pdu.cdb[0]
        if op == 0x88:
            lba, n = struct.unpack_from(">QI", pdu.cdb, 2)
            conn.data_in(pdu, bytes(target.disk[lba * 512:(lba + n) * 512]))
        elif op == 0x8A:
            buf = conn.writes.setdefault(pdu.itt, bytearray())
            buf += pdu.data
            if len(buf) < pdu.edtl and pdu.final:
                conn.send(P.R2T(itt=pdu.itt, ttt=0x100 + pdu.itt, r2tsn=0, offset=len(buf),
                                length=pdu.edtl - len(buf), statsn=conn.statsn))
            elif len(buf) == pdu.edtl:
                _write_done(target, conn, pdu.itt, pdu)
            conn.writes[pdu.itt] = buf
            target.cmds = getattr(target, "cmds", {})
            target.cmds[pdu.itt] = pdu
        elif op in (0x00, 0x35, 0x91):
            conn.status(pdu)
        elif op == 0xA0:  # REPORT LUNS: LUNs 0 and the ones listed in target.luns
            body = b"".join(struct.pack(">H6x", lun) for lun in target.luns)
            conn.data_in(pdu, struct.pack(">I4x", len(body)) + body)
        else:
            conn.status(pdu, 2, bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0]))
    elif isinstance(pdu, P.DataOut):
        buf = conn.writes[pdu.itt]
        assert pdu.offset == len(buf), "Data-Out offsets must be contiguous"
        buf += pdu.data
        cmd = target.cmds[pdu.itt]
        if pdu.final and len(buf) < cmd.edtl and pdu.ttt == R:
            conn.send(P.R2T(itt=pdu.itt, ttt=0x100 + pdu.itt, r2tsn=0, offset=len(buf),
                            length=cmd.edtl - len(buf), statsn=conn.statsn))
        elif len(buf) == cmd.edtl and pdu.final:
            _write_done(target, conn, pdu.itt, cmd)
    elif isinstance(pdu, P.NopOut):
        if pdu.itt != R:
            conn.send(P.NopIn(itt=pdu.itt, ttt=R, statsn=conn.next_statsn(), data=pdu.data))
    elif isinstance(pdu, P.TaskMgmtRequest):
        conn.send(P.TaskMgmtResponse(itt=pdu.itt, response=0, statsn=conn.next_statsn()))
    elif isinstance(pdu, P.LogoutRequest):
        conn.send(P.LogoutResponse(itt=pdu.itt, response=0, statsn=conn.next_statsn()))
        await asyncio.sleep(0)
        conn.drop()
    elif isinstance(pdu, P.TextRequest):
        conn.send(P.TextResponse(itt=pdu.itt, ttt=R, statsn=conn.next_statsn(), data=b""))


def _write_done(target: FakeTarget, conn: FakeConn, itt: int, cmd: P.ScsiCommandPdu) -> None:
    lba = struct.unpack_from(">Q", cmd.cdb, 2)[0]
    data = conn.writes.pop(itt)
    target.disk[lba * 512:lba * 512 + len(data)] = data
    conn.status(cmd)


def started_targets(cls):
    """A fixture giving ``make(*args, **kw)``: a started ``cls`` target; all are stopped at the end."""
    @pytest.fixture
    async def fixture():
        targets = []

        async def make(*args, **kw):
            t = await cls(*args, **kw).start()
            targets.append(t)
            return t

        yield make
        for t in targets:
            await t.stop()

    return fixture


fake = started_targets(FakeTarget)


async def open_session(t: FakeTarget, **opts) -> Session:
    opts.setdefault("noop_interval", 0)
    keys = opts.pop("keys", {})
    return await Session.open("127.0.0.1", t.port, LoginConfig(INI, TGT, keys=keys), SessionOptions(**opts))


# ---------------------------------------------------------------------------

async def test_cmdsn_window_is_respected(fake):
    held: list[tuple[FakeConn, P.ScsiCommandPdu]] = []

    async def hold(conn, pdu):
        if isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] == 0x00:
            held.append((conn, pdu))
            return True
        return False

    t = await fake(hold, window=4)
    s = await open_session(t)
    try:
        dev = BlockDevice(s, 0)
        jobs = [asyncio.ensure_future(dev.test_unit_ready()) for _ in range(20)]
        await asyncio.sleep(0.2)
        assert len(held) == 4                     # MaxCmdSN = ExpCmdSN + 3: only 4 may be sent
        assert s.queued == 20 and s.in_flight == 4
        # Answer them one at a time; the window (ExpCmdSN moves, MaxCmdSN with it) admits more.
        for _ in range(100):
            if all(j.done() for j in jobs):
                break
            while held:
                conn, pdu = held.pop(0)
                conn.status(pdu)
            await asyncio.sleep(0.02)
        await asyncio.gather(*jobs)
        assert t.window_violations == 0
        # Freeze MaxCmdSN (a target may never lower it, §4.2.2.1): four more commands fill the
        # window, their status moves ExpCmdSN past it, and the window is closed
        # (MaxCmdSN = ExpCmdSN - 1) until a NOP-In raises MaxCmdSN.
        conn = t.conns[-1]
        t.fixed_maxcmdsn = conn.maxcmdsn
        jobs = [asyncio.ensure_future(dev.test_unit_ready()) for _ in range(4)]
        await asyncio.sleep(0.1)
        assert len(held) == 4
        while held:
            c, pdu = held.pop(0)
            c.status(pdu)
        await asyncio.gather(*jobs)
        assert conn.maxcmdsn == (conn.expcmdsn - 1) & 0xFFFFFFFF
        job = asyncio.ensure_future(dev.test_unit_ready())
        await asyncio.sleep(0.1)
        assert not held and s.queued == 1
        t.fixed_maxcmdsn = None
        conn.send(P.NopIn(itt=R, ttt=R, statsn=conn.statsn))
        for _ in range(50):
            if held:
                break
            await asyncio.sleep(0.01)
        c, pdu = held.pop()
        c.status(pdu)
        await asyncio.wait_for(job, 2)
        assert t.window_violations == 0
    finally:
        await s.close()


@pytest.mark.parametrize("collapse", [True, False])
async def test_split_data_in_with_status_and_residual(fake, collapse):
    payload = os.urandom(10000)

    async def reads(conn, pdu):
        if isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] == 0x12:
            conn.data_in(pdu, payload, split=3000, collapse=collapse, underflow=pdu.edtl - len(payload))
            return True
        return False

    t = await fake(reads)
    s = await open_session(t)
    try:
        task = await s.execute(0, scsi.inquiry(None, 16384), read_len=16384)
        assert task.status == 0
        assert task.underflow and task.residual == 16384 - 10000
        assert bytes(task.data) == payload
    finally:
        await s.close()


async def test_large_data_in_is_received_in_place(fake):
    payload = os.urandom(1 << 20)

    async def reads(conn, pdu):
        if isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] == 0x88:
            conn.data_in(pdu, payload, split=262144)
            return True
        return False

    t = await fake(reads)
    s = await open_session(t)
    try:
        buf = bytearray(1 << 20)
        task = await s.execute(0, scsi.read16(0, 2048), read_len=1 << 20, buf=buf)
        assert task.status == 0 and buf == payload
    finally:
        await s.close()


@pytest.mark.parametrize("keys,expect_unsolicited", [
    ({"InitialR2T": "No", "ImmediateData": "Yes", "FirstBurstLength": "16384"}, True),
    ({"InitialR2T": "Yes", "ImmediateData": "Yes", "FirstBurstLength": "16384"}, False),
    ({"InitialR2T": "Yes", "ImmediateData": "No"}, False),
])
async def test_write_immediate_unsolicited_and_r2t(fake, keys, expect_unsolicited):
    t = await fake(login_local={"MaxRecvDataSegmentLength": "4096", **keys})
    s = await open_session(t, keys=keys)
    try:
        data = os.urandom(100 * 512)
        task = await s.execute(0, scsi.write16(10, 100), data=data)
        assert task.status == 0
        assert bytes(t.disk[10 * 512:110 * 512]) == data
        conn = t.conns[-1]
        cmd = next(p for p in conn.received if isinstance(p, P.ScsiCommandPdu))
        outs = [p for p in conn.received if isinstance(p, P.DataOut)]
        immediate = len(cmd.data)
        assert immediate == (4096 if keys["ImmediateData"] == "Yes" else 0)  # ≤ target's MRDSL
        unsolicited = [p for p in outs if p.ttt == R]
        solicited = [p for p in outs if p.ttt != R]
        assert bool(unsolicited) == expect_unsolicited
        assert cmd.final == (not expect_unsolicited)
        if expect_unsolicited:
            # Up to FirstBurstLength in total, DataSN 0.., F on the last only.
            assert immediate + sum(len(p.data) for p in unsolicited) == 16384
            assert [p.datasn for p in unsolicited] == list(range(len(unsolicited)))
            assert [p.final for p in unsolicited] == [False] * (len(unsolicited) - 1) + [True]
        assert all(len(p.data) <= 4096 for p in outs)
        assert [p.datasn for p in solicited] == list(range(len(solicited)))
        assert solicited[-1].final and not any(p.final for p in solicited[:-1])
    finally:
        await s.close()


async def test_answers_target_ping_and_pings_idle_target(fake):
    t = await fake()
    s = await open_session(t, noop_interval=0.2, noop_timeout=1.0)
    try:
        conn = t.conns[-1]
        conn.send(P.NopIn(itt=R, ttt=0x7777, lun=P.encode_lun(3), statsn=conn.statsn, data=b"ping"))
        await asyncio.sleep(0.6)
        answers = [p for p in conn.received if isinstance(p, P.NopOut) and p.ttt == 0x7777]
        assert answers and answers[0].itt == R and answers[0].immediate
        assert answers[0].lun == P.encode_lun(3) and answers[0].data == b"ping"
        pings = [p for p in conn.received if isinstance(p, P.NopOut) and p.itt != R]
        assert pings and all(p.ttt == R and p.immediate for p in pings)
        assert s.state == State.LOGGED_IN
    finally:
        await s.close()


async def test_dead_target_is_detected_and_session_reinstated(fake):
    mute = {"on": True}

    async def silent_first(conn, pdu):
        return mute["on"] and conn is t.conns[0]  # swallow everything on the first connection

    t = await fake(silent_first)
    s = await open_session(t, noop_interval=0.2, noop_timeout=0.3)
    try:
        isid = s.isid
        dev = BlockDevice(s, 0)
        t.disk[0:512] = b"z" * 512
        job = asyncio.ensure_future(dev.read(0, 1))
        result = await asyncio.wait_for(job, 10)
        assert result == b"z" * 512
        assert s.reconnects == 1 and len(t.conns) == 2
        # Session reinstatement: same ISID, TSIH 0 on every login (RFC 7143 §6.3.5).
        assert {i for i, _ in t.logins} == {isid}
        assert all(tsih == 0 for _, tsih in t.logins)
    finally:
        await s.close()


async def test_command_retried_after_connection_drop(fake):
    dropped = []

    async def drop_first_read(conn, pdu):
        if isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] == 0x88 and not dropped:
            dropped.append(pdu)
            conn.drop()
            return True
        return False

    t = await fake(drop_first_read)
    s = await open_session(t)
    try:
        t.disk[512:1024] = b"q" * 512
        assert await BlockDevice(s, 0).read(1, 1) == b"q" * 512
        assert dropped and s.reconnects == 1 and s.generation == 2
    finally:
        await s.close()


async def test_datasn_gap_drops_connection_and_retries(fake):
    bad = []

    async def gap(conn, pdu):
        if isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] == 0x88 and not bad:
            bad.append(1)
            conn.data_in(pdu, bytes(8192), split=2048, datasn_skip=2)
            return True
        return False

    t = await fake(gap)
    s = await open_session(t)
    try:
        t.disk[0:8192] = b"k" * 8192
        assert await BlockDevice(s, 0).read(0, 16) == b"k" * 8192
        assert s.reconnects == 1
    finally:
        await s.close()


async def test_async_logout_request_and_lun_change(fake):
    t = await fake()
    s = await open_session(t)
    events = []
    s.listeners.append(lambda name, info: events.append((name, info)) if name == "luns" else events.append(name))
    try:
        conn = t.conns[-1]
        assert await s.rescan() == [0]
        t.luns = [0, 1, 2]
        sense = bytes([0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x3F, 0x0E, 0, 0, 0, 0])
        conn.send(P.AsyncMessage(event=P.AsyncEvent.SCSI_ASYNC_EVENT, statsn=conn.next_statsn(),
                                 data=P.ScsiResponse.sense_segment(sense)))
        conn.send(P.AsyncMessage(event=P.AsyncEvent.LOGOUT_REQUEST, param3=2, statsn=conn.next_statsn()))
        for _ in range(200):  # the reconnect, and the REPORT LUNS that may be queued across it
            if s.reconnects and s.luns == [0, 1, 2]:
                break
            await asyncio.sleep(0.02)
        assert "luns_changed" in events
        # The inventory was re-read with REPORT LUNS.
        assert s.luns == [0, 1, 2]
        assert ("luns", {"luns": [0, 1, 2], "added": [1, 2], "removed": []}) in events
        assert any(isinstance(p, P.LogoutRequest) and p.reason == 0 for p in conn.received)
        assert s.reconnects == 1 and s.state == State.LOGGED_IN and len(t.conns) == 2
        await BlockDevice(s, 0).test_unit_ready()
    finally:
        await s.close()


async def test_replacement_timeout_fails_queued_commands(fake):
    t = await fake()
    s = await open_session(t, replacement_timeout=0.5)
    try:
        await t.stop()
        with pytest.raises(SessionFailed):
            await asyncio.wait_for(BlockDevice(s, 0).test_unit_ready(), 10)
        # After expiry new commands fail at once instead of waiting.
        with pytest.raises(SessionFailed):
            await asyncio.wait_for(BlockDevice(s, 0).test_unit_ready(), 1)
    finally:
        await s.close()


async def test_reject_fails_the_command(fake):
    async def reject(conn, pdu):
        if isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] == 0x00:
            conn.send(P.Reject(reason=P.RejectReason.COMMAND_NOT_SUPPORTED, statsn=conn.next_statsn(),
                               data=pdu.header()[:48]))
            return True
        return False

    t = await fake(reject)
    s = await open_session(t)
    try:
        from iscsi.initiator.errors import ProtocolViolation
        with pytest.raises(ProtocolViolation, match="rejected"):
            await BlockDevice(s, 0).test_unit_ready()
        assert s.state == State.LOGGED_IN
    finally:
        await s.close()


async def test_command_timeout_aborts_the_task(fake):
    async def never(conn, pdu):
        return isinstance(pdu, P.ScsiCommandPdu) and pdu.cdb[0] == 0x00

    t = await fake(never)
    s = await open_session(t)
    try:
        from iscsi.initiator.errors import CommandTimeout
        with pytest.raises(CommandTimeout):
            await s.execute(0, scsi.test_unit_ready(), timeout=0.3)
        conn = t.conns[-1]
        cmd = next(p for p in conn.received if isinstance(p, P.ScsiCommandPdu))
        tmf = [p for p in conn.received if isinstance(p, P.TaskMgmtRequest)]
        assert tmf and tmf[0].function == P.TmfFunction.ABORT_TASK
        assert tmf[0].rtt == cmd.itt and tmf[0].refcmdsn == cmd.cmdsn and tmf[0].immediate
        assert s.in_flight == 0 and s.state == State.LOGGED_IN
    finally:
        await s.close()
