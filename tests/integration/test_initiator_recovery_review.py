"""Hostile review of the initiator's error recovery, as a storage admin meets it in production:
targets that restart, stall, redirect, change their login rules or their LUNs under a live
session, and multipath paths that fail, come back, or come back to the wrong LU.

Faults are made by a small in-process TCP proxy between the initiator and our real target
daemon (a subprocess, tools.peers): it can drop every connection, swallow connections
(accept, never answer: a stalled target), answer logins with a redirect, point at another
upstream, or drop the connection whenever the initiator sends one chosen command.
Every wait is bounded; the file runs in well under a minute.
"""
from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
from pathlib import Path

import pytest

from iscsi import pdu as P
from iscsi.framing import encode as encode_pdu
from iscsi.initiator import scsi
from iscsi.initiator.client import open_device
from iscsi.initiator.device import BlockDevice
from iscsi.initiator.errors import ConnectionLost, SessionFailed
from iscsi.initiator.multipath import open_multipath
from iscsi.initiator.session import SessionOptions, State
from tools.peers import make_peer

INITIATOR = "iqn.2026-11.org.sanstack:recovery-review"
MiB = 1 << 20
BHS_LEN = 48


# --------------------------------------------------------------------------- fault proxy
class FaultProxy:
    """TCP proxy on 127.0.0.1 with switchable faults (see the module docstring).

    ``mode``: "forward" (default), "reset" (accept and close at once: a portal that is down),
    "blackhole" (accept, read and discard, never answer),
    "redirect" (answer the first Login Request with status 0101h/0102h and ``redirect_to``).
    ``drop_on(pred)``: parse the initiator's PDUs (no digests) and abort the connection pair
    when ``pred(bhs)`` is true for one of them.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.mode = "forward"
        self.redirect_to = ""
        self.redirect_permanent = False
        self.drop_pred = None
        #: Like drop_pred, but the PDU is delivered first and its answer swallowed: the
        #: target carries the command out, the initiator never hears of it.
        self.lose_answer_pred = None
        self._muted: set[asyncio.StreamWriter] = set()
        #: Cleared = every established connection stalls (bytes held, nothing closed).
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.accepted = 0
        self.dropped_on_pred = 0
        #: (opcode, LBA) of every READ (16) / WRITE (16) the initiator sent through us.
        self.commands: list[tuple[int, int]] = []
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> "FaultProxy":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def drop_all(self) -> None:
        for cw, uw in list(self._pairs):
            for w in (cw, uw):
                if w is not None:
                    w.transport.abort()
        self._pairs.clear()

    async def close(self) -> None:
        self.drop_all()
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.accepted += 1
        me = asyncio.current_task()
        self._tasks.add(me)
        pair = (cw, None)
        self._pairs.add(pair)
        try:
            if self.mode == "reset":
                return
            if self.mode == "blackhole":
                while await cr.read(65536):
                    pass
                return
            if self.mode == "redirect":
                hdr = await cr.readexactly(BHS_LEN)
                dlen = int.from_bytes(hdr[5:8], "big")
                await cr.readexactly(dlen + (-dlen & 3))
                req = P.decode(hdr + bytes(dlen + (-dlen & 3)))
                data = f"TargetAddress={self.redirect_to}".encode() + b"\0"
                resp = P.LoginResponse(transit=False, csg=0, nsg=0, isid=req.isid, tsih=0, itt=req.itt,
                                       statsn=0, expcmdsn=req.cmdsn, maxcmdsn=req.cmdsn,
                                       status_class=1, status_detail=2 if self.redirect_permanent else 1,
                                       data=data)
                cw.write(b"".join(bytes(b) for b in encode_pdu(resp)))
                await cw.drain()
                await asyncio.sleep(0.2)
                return
            ur, uw = await asyncio.open_connection(*self.upstream)
            self._pairs.discard(pair)
            pair = (cw, uw)
            self._pairs.add(pair)
            up = asyncio.ensure_future(self._pump_up(cr, uw, cw))
            down = asyncio.ensure_future(self._pump(ur, cw, self._muted, self.flowing))
            self._tasks.update((up, down))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (up, down):
                    t.cancel()
                    self._tasks.discard(t)
                uw.transport.abort()
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            cw.transport.abort()
            self._pairs.discard(pair)
            self._tasks.discard(me)

    @staticmethod
    async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, muted: set, flowing: asyncio.Event) -> None:
        while True:
            data = await r.read(65536)
            if not data:
                return
            if w in muted:
                continue
            await flowing.wait()
            w.write(data)
            await w.drain()

    async def _pump_up(self, r: asyncio.StreamReader, uw: asyncio.StreamWriter,
                       cw: asyncio.StreamWriter) -> None:
        """Initiator → target, PDU by PDU, so drop_pred can see each BHS."""
        while True:
            hdr = await r.readexactly(BHS_LEN)
            ahs = hdr[4] * 4
            dlen = int.from_bytes(hdr[5:8], "big")
            rest = await r.readexactly(ahs + dlen + (-dlen & 3)) if ahs or dlen else b""
            await self.flowing.wait()
            if hdr[0] & 0x3F == 0x01 and hdr[32] in (0x88, 0x8A):      # READ/WRITE (16)
                self.commands.append((hdr[32], struct.unpack_from(">Q", hdr, 34)[0]))
            if self.drop_pred is not None and self.drop_pred(hdr):
                self.dropped_on_pred += 1
                cw.transport.abort()
                uw.transport.abort()
                return
            if self.lose_answer_pred is not None and self.lose_answer_pred(hdr):
                self.lose_answer_pred = None
                self._muted.add(cw)
                uw.write(hdr + rest)
                await uw.drain()
                await asyncio.sleep(0.3)          # the target executes and answers into the void
                self._muted.discard(cw)
                cw.transport.abort()
                uw.transport.abort()
                return
            uw.write(hdr + rest)
            await uw.drain()


def is_write_at(lba: int):
    """drop_pred: a SCSI Command (opcode 01h) carrying WRITE (16) to ``lba``."""
    def pred(bhs: bytes) -> bool:
        return bhs[0] & 0x3F == 0x01 and bhs[32] == 0x8A and struct.unpack_from(">Q", bhs, 34)[0] == lba
    return pred


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """Our target daemon: two portals (two portal groups), two 8 MiB LUNs."""
    peer = make_peer("sanstack", tmp_path_factory.mktemp("recovery"), size="8M", luns=2, portals=2)
    peer.start()
    yield peer
    peer.stop()
    if hasattr(peer, "cleanup"):
        peer.cleanup()


def url_via(peer, port: int, lun: int = 0) -> str:
    return f"iscsi://127.0.0.1:{port}/{peer.iqn}/{lun}"


def quick(**kw) -> SessionOptions:
    """Short timers so faults show within the test's budget."""
    base = dict(login_timeout=5.0, noop_interval=0, replacement_timeout=3.0)
    base.update(kw)
    return SessionOptions(**base)


def upstream(peer, i: int = 0) -> tuple[str, int]:
    p = peer.portals[i]
    return (p.host, p.port)


# --------------------------------------------------------------------------- replacement timeout
async def test_replacement_timeout_holds_when_the_reconnect_itself_hangs(target):
    """A target that accepts TCP but never answers the login (stopped process, hung daemon):
    waiting commands fail at replacement_timeout, not after the login timeout on top."""
    proxy = await FaultProxy(upstream(target)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR,
                                   options=quick(login_timeout=15.0, replacement_timeout=1.5))
        try:
            proxy.mode = "blackhole"
            proxy.drop_all()
            await s.wait_state(State.RECOVERING, timeout=5)
            t0 = time.monotonic()
            with pytest.raises(SessionFailed):
                await asyncio.wait_for(dev.read(0, 1), 20)
            took = time.monotonic() - t0
            assert took < 3.5, f"commands failed {took:.1f}s into a 1.5s replacement timeout"
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()


async def test_a_command_that_kills_the_connection_every_time_fails_with_backoff(target, monkeypatch):
    """A target that logs us in and drops us whenever one command arrives (crash loop, a bug
    that command hits): the command fails after MAX_COMMAND_RETRIES re-sends, the reconnects
    back off instead of spinning, and the session goes on serving other commands."""
    from iscsi.initiator import session as S
    monkeypatch.setattr(S, "RECONNECT_FIRST_DELAY", 0.05)
    proxy = await FaultProxy(upstream(target)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR,
                                   options=quick(replacement_timeout=10.0))
        try:
            proxy.drop_pred = is_write_at(777)
            t0 = time.monotonic()
            with pytest.raises(SessionFailed, match="lost 6 times"):
                await asyncio.wait_for(dev.write(777, b"\x5a" * 512), 15)
            took = time.monotonic() - t0
            assert proxy.dropped_on_pred == S.MAX_COMMAND_RETRIES + 1
            # Backoff between the flaps: 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s at least.
            assert took >= 1.4, f"{proxy.dropped_on_pred} reconnects in {took:.2f}s: no backoff"
            proxy.drop_pred = None
            await asyncio.wait_for(dev.write(778, b"\xa5" * 512), 10)
            assert await asyncio.wait_for(dev.read(778, 1), 10) == b"\xa5" * 512
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()


@pytest.mark.parametrize("permanent", [False, True], ids=["moved-temporarily", "moved-permanently"])
async def test_reconnect_follows_a_login_redirect(target, permanent):
    """The portal we logged in through now answers logins with 0101h/0102h and a
    TargetAddress (RFC 7143 §11.13.5): the reconnect goes there, the I/O completes."""
    proxy = await FaultProxy(upstream(target)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR,
                                   options=quick(replacement_timeout=4.0))
        try:
            await dev.write(10, b"\x11" * 512)
            host, port = upstream(target)
            proxy.mode = "redirect"
            proxy.redirect_permanent = permanent
            proxy.redirect_to = f"{host}:{port},1"
            proxy.drop_all()
            assert await asyncio.wait_for(dev.read(10, 1), 10) == b"\x11" * 512
            assert s.reconnects == 1
            assert s.port == (port if permanent else proxy.port)
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()


async def test_reconnect_refuses_a_changed_portal_group_tag_and_says_why(target):
    """The same address now answers with another TPGT (the admin moved the portal to another
    portal group): that is another I_T nexus (§13.9), the old session would not be
    reinstated.  The reconnect is refused, the caller's error names the cause, and when the
    portal comes back in its group the session recovers by itself."""
    proxy = await FaultProxy(upstream(target, 0)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR,
                                   options=quick(replacement_timeout=1.5))
        try:
            assert s.login_result.target_keys.get("TargetPortalGroupTag") == "1"
            proxy.upstream = upstream(target, 1)        # portal group 2
            proxy.drop_all()
            with pytest.raises(SessionFailed, match="portal group tag changed from 1 to 2"):
                await asyncio.wait_for(dev.read(0, 1), 10)
            proxy.upstream = upstream(target, 0)
            await s.wait_state(State.LOGGED_IN, timeout=10)
            await asyncio.wait_for(dev.read(0, 1), 5)
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()


async def test_target_that_now_requires_chap_fails_the_io_with_the_login_error(target, tmp_path):
    """The admin turned on CHAP while we were connected; on the next reconnect the login is
    refused.  After the replacement timeout the caller's error says "authentication failure",
    not only "not recovered"; once CHAP is off again the session comes back by itself."""
    proxy = await FaultProxy(upstream(target)).start()
    secret = tmp_path / "secret"
    secret.write_text("averylongsecret1\n")
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR,
                                   options=quick(replacement_timeout=1.5))
        try:
            r = await asyncio.to_thread(target.admin, "chap", "set", "--target", target.iqn,
                                        "--username", "u1", "--secret-file", str(secret))
            assert r.returncode == 0, r.stderr
            proxy.drop_all()
            with pytest.raises(SessionFailed, match="authentication failure"):
                await asyncio.wait_for(dev.read(0, 1), 10)
            r = await asyncio.to_thread(target.admin, "chap", "clear", "--target", target.iqn)
            assert r.returncode == 0, r.stderr
            await s.wait_state(State.LOGGED_IN, timeout=10)
            await asyncio.wait_for(dev.read(0, 1), 5)
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()
        await asyncio.to_thread(target.admin, "chap", "clear", "--target", target.iqn)


# --------------------------------------------------------------------------- LUN changes
async def test_resize_and_lun_add_under_a_live_session(target):
    """The admin grows LUN 1 and adds LUN 2 online.  The next command gets CAPACITY DATA HAS
    CHANGED / REPORTED LUNS DATA HAS CHANGED; it is retried (not failed), the device's size
    follows, writes to the new end work, and the session's LUN list learns of LUN 2."""
    s, dev = await open_device(target.url(0).rsplit("/", 1)[0] + "/1", initiator_name=INITIATOR,
                               options=quick())
    try:
        await s.rescan()
        assert s.luns == [0, 1]
        old_blocks = dev.blocks
        new_bytes = old_blocks * dev.block_size + 4 * MiB
        r = await asyncio.to_thread(target.admin, "lun", "resize", target.iqn, "1", str(new_bytes))
        assert r.returncode == 0, r.stderr
        img = Path(target.workdir) / "extra.img"
        r = await asyncio.to_thread(target.admin, "lun", "add", target.iqn, f"{img}:4M")
        assert r.returncode == 0, r.stderr
        await asyncio.wait_for(dev.read(0, 1), 5)          # gets the UAs, retried
        assert (0x2A, 0x09) in dev.ua_seen
        assert dev.blocks == new_bytes // dev.block_size, (dev.blocks, old_blocks)
        last = dev.blocks - 1
        await asyncio.wait_for(dev.write(last, b"\x77" * dev.block_size), 5)
        assert await asyncio.wait_for(dev.read(last, 1), 5) == b"\x77" * dev.block_size
        for _ in range(50):
            if s.luns and 2 in s.luns:
                break
            await dev.test_unit_ready()
            await asyncio.sleep(0.05)
        assert s.luns == [0, 1, 2]
    finally:
        await asyncio.wait_for(s.close(), 5)


# --------------------------------------------------------------------------- multipath
def _pattern(lba: int, blocks: int = 1) -> bytes:
    return b"".join(struct.pack(">Q", lba + i) * 64 for i in range(blocks))


async def test_multipath_path_that_comes_back_to_another_lu_is_refused(target, tmp_path):
    """Path B's portal is re-pointed (a rebuilt target, a re-mapped LUN: same IQN, same TPGT,
    another image).  After B logs in again, its LU identity (VPD 83h) no longer matches: no
    write may go there, the path is refused and says why; I/O goes on over path A."""
    other = make_peer("sanstack", tmp_path / "other", size="8M")
    assert other.iqn == target.iqn
    other.start()
    pa = await FaultProxy(upstream(target)).start()
    pb = await FaultProxy(upstream(target)).start()
    mp = None
    try:
        mp, dev = await open_multipath([url_via(target, pa.port), url_via(target, pb.port)],
                                       initiator_name=INITIATOR, no_path_timeout=5,
                                       options=quick(login_timeout=2.0))
        b = mp.paths[1].session
        pb.upstream = upstream(other)
        pb.drop_all()
        for _ in range(100):
            if b.state == State.LOGGED_IN and b.reconnects:
                break
            await asyncio.sleep(0.05)
        assert b.state == State.LOGGED_IN and b.reconnects == 1
        await asyncio.wait_for(asyncio.gather(*(dev.write(100 + i, _pattern(100 + i)) for i in range(16))), 10)
        for i in range(16):
            assert await dev.read(100 + i, 1) == _pattern(100 + i)
        for _ in range(100):
            if mp.paths[1].refused:
                break
            await asyncio.sleep(0.05)
        assert "another logical unit" in (mp.paths[1].refused or "")
        s2, wrong = await open_device(other.url(0), initiator_name=INITIATOR, options=quick())
        try:
            assert await wrong.read(100, 16) == bytes(16 * 512), "writes went to the wrong LU"
        finally:
            await s2.close()
    finally:
        if mp is not None:
            await asyncio.wait_for(mp.close(), 10)
        await pa.close()
        await pb.close()
        other.stop()


async def test_multipath_survives_one_path_then_both_paths_failing(target):
    """Kill path A mid-I/O: every write completes through B.  A comes back and is used again.
    Both paths fail, then B returns: the I/O that waited completes.  Data checked at the end."""
    pa = await FaultProxy(upstream(target, 0)).start()
    pb = await FaultProxy(upstream(target, 1)).start()
    mp = None
    try:
        mp, dev = await open_multipath([url_via(target, pa.port), url_via(target, pb.port)],
                                       initiator_name=INITIATOR, no_path_timeout=10,
                                       options=quick(login_timeout=1.0))
        a = mp.paths[0].session

        writes = [asyncio.ensure_future(dev.write(200 + 8 * i, _pattern(200 + 8 * i, 8))) for i in range(64)]
        for _ in range(1000):
            if a.in_flight:
                break
            await asyncio.sleep(0)
        assert a.in_flight, "no write in flight on path A to interrupt"
        pa.mode = "blackhole"
        pa.drop_all()
        await asyncio.wait_for(asyncio.gather(*writes), 15)
        assert not mp.paths[0].up
        assert mp.failovers >= 1
        pa.mode = "forward"
        await a.wait_state(State.LOGGED_IN, timeout=10)
        for _ in range(100):
            if mp.paths[0].usable:
                break
            await asyncio.sleep(0.05)
        itt_before = a._itt
        await asyncio.gather(*(dev.read(200, 1) for _ in range(8)))
        assert a._itt != itt_before, "path A came back but is not used"
        # Both paths down; B returns after a while.
        for p in (pa, pb):
            p.mode = "blackhole"
            p.drop_all()
        pending = asyncio.ensure_future(dev.read(200, 8))
        await asyncio.sleep(0.5)
        assert not pending.done()
        pb.mode = "forward"
        assert await asyncio.wait_for(pending, 10) == _pattern(200, 8)
        for i in range(64):
            assert await dev.read(200 + 8 * i, 8) == _pattern(200 + 8 * i, 8)
    finally:
        if mp is not None:
            await asyncio.wait_for(mp.close(), 10)
        await pa.close()
        await pb.close()


async def test_fail_fast_hands_back_commands_still_waiting_for_the_window(target):
    """With fail_fast (multipath's setting) a lost connection hands back at once every command
    of the session, also those queued behind a closed command window (RFC 7143 §4.2.2.1):
    they must not sit there to be sent after the reconnect, to whatever is behind that portal
    by then, while another path could take them now."""
    proxy = await FaultProxy(upstream(target)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR,
                                   options=quick(fail_fast=True, replacement_timeout=5.0))
        try:
            reads = [asyncio.ensure_future(s.execute(0, scsi.read16(i, 1), read_len=512)) for i in range(400)]
            await asyncio.sleep(0)
            assert s.queued > s.in_flight > 0
            proxy.mode = "blackhole"
            proxy.drop_all()
            t0 = time.monotonic()
            done = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
            took = time.monotonic() - t0
            failed = [r for r in done if isinstance(r, BaseException)]
            assert failed and all(isinstance(r, ConnectionLost) for r in failed), {type(r) for r in failed}
            assert took < 1.0, f"queued commands handed back after {took:.1f}s"
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()


# --------------------------------------------------------------------------- target restart / stall


async def _writes_survive_a_restart(s, dev, peer, n: int) -> None:
    """``n`` 64-block writes in flight, kill -9 of ``peer`` and its restart: every write
    completes (re-sent after session reinstatement) and reads back right."""
    writes = [asyncio.ensure_future(dev.write(64 * i, _pattern(64 * i, 64))) for i in range(n)]
    for _ in range(1000):
        if s.in_flight:
            break
        await asyncio.sleep(0)
    assert s.in_flight
    peer.kill()
    await asyncio.to_thread(peer.restart)
    await asyncio.wait_for(asyncio.gather(*writes), 20)
    assert s.reconnects >= 1
    for i in range(n):
        assert await dev.read(64 * i, 64) == _pattern(64 * i, 64), f"extent {i} wrong after restart"


async def test_target_kill9_and_restart_mid_io_then_gone_past_the_timeout(own_target):
    """kill -9 with writes in flight, start again on the same port and images: every write
    completes (re-sent after session reinstatement) and reads back right.  Then kill it for
    longer than replacement_timeout: the caller gets SessionFailed near that timeout, with the
    cause, and the reconnect loop does not spin the CPU; started again, the session recovers."""
    s, dev = await open_device(own_target.url(0), initiator_name=INITIATOR,
                               options=quick(replacement_timeout=3.0))
    try:
        await _writes_survive_a_restart(s, dev, own_target, 48)

        own_target.kill()
        cpu0, t0 = time.process_time(), time.monotonic()
        with pytest.raises(SessionFailed, match=r"not recovered within 3s \(last attempt: connect to "):
            await asyncio.wait_for(dev.read(0, 1), 15)
        took = time.monotonic() - t0
        assert 2.0 <= took <= 5.0, took
        await asyncio.sleep(1.0)
        cpu = time.process_time() - cpu0
        assert cpu < 1.0, f"{cpu:.2f}s of CPU in {took + 1:.1f}s while the target was down"
        await asyncio.to_thread(own_target.restart)
        await s.wait_state(State.LOGGED_IN, timeout=10)
        assert await dev.read(0, 64) == _pattern(0, 64)
    finally:
        await asyncio.wait_for(s.close(logout=False), 5)


async def test_stopped_target_nop_timeout_then_resume(own_target):
    """SIGSTOP the target with a read outstanding: the NOP-Out keepalive declares the
    connection dead within noop_interval + noop_timeout, the session reconnects (the login
    waits while the target is stopped), and after SIGCONT the read completes once, right."""
    s, dev = await open_device(own_target.url(0), initiator_name=INITIATOR,
                               options=quick(noop_interval=0.5, noop_timeout=0.5, login_timeout=2.0,
                                             replacement_timeout=15.0))
    done: list = []
    try:
        await dev.write(300, _pattern(300, 4))
        lost = asyncio.Event()
        s.listeners.append(lambda name, info: lost.set() if info.get("state") == State.RECOVERING else None)
        pid = own_target.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            task = asyncio.ensure_future(dev.command(scsi.read16(300, 4), read_len=2048))
            task.add_done_callback(done.append)
            await asyncio.wait_for(lost.wait(), 4)
            await asyncio.sleep(1.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        t = await asyncio.wait_for(task, 15)
        assert t.status == 0 and bytes(t.data) == _pattern(300, 4)
        assert len(done) == 1 and s.reconnects >= 1
    finally:
        await asyncio.wait_for(s.close(), 10)


async def test_command_timeout_on_a_stopped_target_aborts_then_drops_the_connection(own_target, monkeypatch):
    """No keepalive, command_timeout 0.5 s, target SIGSTOPped: the command's ABORT TASK goes
    unanswered too.  The caller gets CommandTimeout after the abort timeout (not the 30 s
    management timeout); a NOP-Out finds the connection dead and it is dropped (ERL 0
    escalation) rather than kept for the next command to hang on the same way; after SIGCONT
    the session is back, data intact."""
    from iscsi.initiator import session as S
    from iscsi.initiator.errors import CommandTimeout
    monkeypatch.setattr(S, "ABORT_TIMEOUT", 1.0, raising=False)
    s, dev = await open_device(own_target.url(0), initiator_name=INITIATOR,
                               options=quick(command_timeout=0.5, noop_timeout=1.0, login_timeout=2.0,
                                             replacement_timeout=20.0))
    try:
        await dev.write(500, _pattern(500, 2))
        pid = own_target.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(CommandTimeout):
                await asyncio.wait_for(dev.read(500, 2), 10)
            took = time.monotonic() - t0
            assert took < 2.5, took
            await s.wait_state(State.RECOVERING, timeout=2.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        await s.wait_state(State.LOGGED_IN, timeout=10)
        assert await asyncio.wait_for(dev.read(500, 2), 5) == _pattern(500, 2)
    finally:
        await asyncio.wait_for(s.close(), 10)


async def test_target_clean_restart_asks_us_to_log_out_and_the_io_carries_on(own_target):
    """SIGTERM: the daemon sends Async Message "logout requested" (§11.9.1 event 1), lets
    in-flight commands finish and stops.  We log out, keep new commands queued, reconnect
    when it is back; no command fails, the data is right."""
    s, dev = await open_device(own_target.url(0), initiator_name=INITIATOR,
                               options=quick(replacement_timeout=15.0))
    events: list[str] = []
    s.listeners.append(lambda name, info: events.append(f"{name}:{info.get('event', info.get('state', ''))}"))
    try:
        writes = [asyncio.ensure_future(dev.write(1000 + 8 * i, _pattern(1000 + 8 * i, 8))) for i in range(32)]
        await asyncio.sleep(0)
        await asyncio.to_thread(own_target.stop)
        later = [asyncio.ensure_future(dev.write(2000 + 8 * i, _pattern(2000 + 8 * i, 8))) for i in range(8)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_target.restart)
        await asyncio.wait_for(asyncio.gather(*writes, *later), 15)
        assert f"async:{P.AsyncEvent.LOGOUT_REQUEST}" in events, events
        for i in range(32):
            assert await dev.read(1000 + 8 * i, 8) == _pattern(1000 + 8 * i, 8)
        for i in range(8):
            assert await dev.read(2000 + 8 * i, 8) == _pattern(2000 + 8 * i, 8)
    finally:
        await asyncio.wait_for(s.close(), 10)


async def test_tgtd_kill9_and_restart_mid_io(tmp_path):
    """The same against tgtd (a target nobody here wrote): while it comes back it listens
    before its target is configured (logins answer "target not found" for a moment); the
    session keeps trying through that, re-sends the writes once, and the data is right."""
    import shutil
    if shutil.which("tgtd") is None or shutil.which("tgtadm") is None:
        pytest.skip("tgtd not installed (apt-get install tgt)")
    peer = make_peer("tgt", tmp_path / "tgt", size="8M")
    peer.start()
    try:
        s, dev = await open_device(peer.url(0), initiator_name=INITIATOR, options=quick(replacement_timeout=15.0))
        try:
            await _writes_survive_a_restart(s, dev, peer, 32)
        finally:
            await asyncio.wait_for(s.close(), 10)
    finally:
        peer.stop()


# --------------------------------------------------------------------------- ATS after a retry
def is_caw_at(lba: int):
    def pred(bhs: bytes) -> bool:
        return bhs[0] & 0x3F == 0x01 and bhs[32] == 0x89 and struct.unpack_from(">Q", bhs, 34)[0] == lba
    return pred


@pytest.mark.parametrize("multipath", [False, True], ids=["session-retry", "multipath-failover"])
async def test_ats_whose_status_was_lost_is_not_reported_as_a_miscompare(target, multipath):
    """COMPARE AND WRITE (VMware's ATS: vmfs locks and heartbeats) reaches the target and is
    carried out, then the connection dies before its status arrives.  The re-send (same
    session after reinstatement, or another path) compares against our own new data and gets
    MISCOMPARE: reporting that would tell the caller it lost a lock it holds.  The device
    reads the blocks back and reports success when they hold what it wrote.  A genuine
    miscompare still raises."""
    from iscsi.initiator.errors import MiscompareError
    lba = 3000 + (8 if multipath else 0)
    pa = await FaultProxy(upstream(target, 0)).start()
    pb = await FaultProxy(upstream(target, 1)).start()
    mp = s = None
    try:
        if multipath:
            mp, dev = await open_multipath([url_via(target, pa.port), url_via(target, pb.port)],
                                           initiator_name=INITIATOR, no_path_timeout=5, options=quick())
            mp.policy = "least-queue"           # path A (first, idle) takes the command
        else:
            s, dev = await open_device(url_via(target, pa.port), initiator_name=INITIATOR, options=quick())
        old, new = bytes(512), _pattern(lba)
        await dev.write(lba, old)
        pa.lose_answer_pred = is_caw_at(lba)
        await asyncio.wait_for(dev.compare_and_write(lba, old, new), 10)
        assert pa.lose_answer_pred is None, "the fault was not injected"
        assert await dev.read(lba, 1) == new
        with pytest.raises(MiscompareError):
            await asyncio.wait_for(dev.compare_and_write(lba, old, _pattern(lba + 1)), 10)
    finally:
        if mp is not None:
            await asyncio.wait_for(mp.close(), 10)
        if s is not None:
            await asyncio.wait_for(s.close(logout=False), 5)
        await pa.close()
        await pb.close()


async def test_multipath_all_port_groups_transitioning_then_back():
    """ALUA (SPC-4 §5.16): every port group goes "transitioning" for a moment (a controller
    failover on an array).  The I/O that meets it must wait and complete once a group is
    active again: the initiator has to keep re-reading REPORT TARGET PORT GROUPS while no
    path is usable, not wait for a state change it never asks about."""
    from iscsi.initiator.scsi import AluaState
    from tests.unit.test_initiator_multipath import AluaLu, FakeTarget, _urls
    lu = AluaLu()
    targets = [await FakeTarget(lu.handler(1)).start(), await FakeTarget(lu.handler(2)).start()]
    mp = None
    try:
        mp, dev = await open_multipath(_urls(targets), options=SessionOptions(noop_interval=0), no_path_timeout=6)
        polls = 0
        real = mp.refresh_alua

        async def counting():
            nonlocal polls
            polls += 1
            await real()
        mp.refresh_alua = counting
        lu.states[1] = lu.states[2] = AluaState.TRANSITIONING
        pending = asyncio.ensure_future(dev.read(0, 8))
        await asyncio.sleep(1.0)
        assert not pending.done()
        assert 1 <= polls <= 6, f"{polls} REPORT TARGET PORT GROUPS rounds in 1 s"
        lu.states[1] = lu.states[2] = AluaState.ACTIVE_OPTIMIZED
        assert await asyncio.wait_for(pending, 4) == bytes(8 * 512)
    finally:
        if mp is not None:
            await asyncio.wait_for(mp.close(), 10)
        for t in targets:
            await t.stop()


async def test_multipath_path_down_at_open_joins_when_it_comes_up(target, monkeypatch):
    """One portal is down when the device is opened (a switch port, a rebooting controller):
    the device opens on the other path, and the missing path is tried again in the background
    and joins once it answers and leads to the same LU; I/O then uses it too."""
    from iscsi.initiator import multipath as M
    monkeypatch.setattr(M, "REVIVE_FIRST_DELAY", 0.1, raising=False)
    pa = await FaultProxy(upstream(target, 0)).start()
    pb = await FaultProxy(upstream(target, 1)).start()
    pb.mode = "reset"
    mp = None
    try:
        mp, dev = await open_multipath([url_via(target, pa.port), url_via(target, pb.port)],
                                       initiator_name=INITIATOR, no_path_timeout=5, options=quick())
        assert len(mp.paths) == 1
        await asyncio.sleep(0.3)
        pb.mode = "forward"
        for _ in range(100):
            if len(mp.paths) == 2 and mp.paths[1].usable:
                break
            await asyncio.sleep(0.05)
        assert len(mp.paths) == 2 and mp.paths[1].usable, "the path that came up was not added"
        b = mp.paths[1].session
        itt = b._itt
        await asyncio.gather(*(dev.read(8 * i, 8) for i in range(8)))
        assert b._itt != itt, "the added path carries no I/O"
    finally:
        if mp is not None:
            await asyncio.wait_for(mp.close(), 10)
        await pa.close()
        await pb.close()


async def test_multipath_command_timing_out_on_a_stalled_path_completes_on_the_other(target, monkeypatch):
    """Path A's link stalls (nothing closes, nothing moves: a hung switch port).  A command
    sent there times out and its ABORT TASK is not answered; with path B healthy the caller
    must not get CommandTimeout: the command is sent again on B.  Path A is then dropped by
    the session's liveness check and comes back when the link moves again."""
    from iscsi.initiator import session as S
    monkeypatch.setattr(S, "ABORT_TIMEOUT", 0.5, raising=False)
    pa = await FaultProxy(upstream(target, 0)).start()
    pb = await FaultProxy(upstream(target, 1)).start()
    mp = None
    try:
        mp, dev = await open_multipath([url_via(target, pa.port), url_via(target, pb.port)],
                                       initiator_name=INITIATOR, no_path_timeout=10,
                                       options=quick(command_timeout=0.5, noop_timeout=0.5, login_timeout=2.0))
        await dev.write(4000, _pattern(4000, 8))
        pa.flowing.clear()
        t0 = time.monotonic()
        got = await asyncio.wait_for(asyncio.gather(*(dev.read(4000, 8) for _ in range(6))), 10)
        assert all(g == _pattern(4000, 8) for g in got)
        assert mp.failovers >= 1 and time.monotonic() - t0 < 5
        await mp.paths[0].session.wait_state(State.RECOVERING, State.LOGGING_IN, timeout=5)
        pa.flowing.set()
        await mp.paths[0].session.wait_state(State.LOGGED_IN, timeout=10)
    finally:
        pa.flowing.set()
        if mp is not None:
            await asyncio.wait_for(mp.close(), 10)
        await pa.close()
        await pb.close()


async def test_reconnect_to_a_portal_that_no_longer_has_our_target_names_the_cause(target, tmp_path):
    """Behind our portal there is now another target (renamed / re-provisioned): the login
    says "target not found" (0203h); after the replacement timeout the caller's error says so."""
    other = make_peer("sanstack", tmp_path / "renamed", size="8M", iqn="iqn.2026-11.org.example:renamed")
    other.start()
    proxy = await FaultProxy(upstream(target)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR,
                                   options=quick(replacement_timeout=1.5))
        try:
            proxy.upstream = upstream(other)
            proxy.drop_all()
            with pytest.raises(SessionFailed, match=r"not recovered within 1.5s \(last attempt: .*0x0203"):
                await asyncio.wait_for(dev.read(0, 1), 10)
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()
        other.stop()


async def test_connection_loss_resends_each_unfinished_command_exactly_once(target):
    """Connection lost with writes in flight: after reinstatement every unfinished command is
    sent once more, a finished one never, nothing twice (counted on the wire)."""
    from collections import Counter
    proxy = await FaultProxy(upstream(target)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR, options=quick())
        try:
            lbas = [6000 + 8 * i for i in range(64)]
            writes = [asyncio.ensure_future(dev.write(lba, _pattern(lba, 8))) for lba in lbas]
            for _ in range(1000):
                if s.in_flight:
                    break
                await asyncio.sleep(0)
            unfinished = {t.cdb and struct.unpack_from(">Q", t.cdb, 2)[0] for t in s._tasks.values()}
            assert unfinished
            proxy.drop_all()
            await asyncio.wait_for(asyncio.gather(*writes), 10)
            sent = Counter(lba for op, lba in proxy.commands if op == 0x8A and lba in set(lbas))
            assert set(sent) == set(lbas)
            twice = {lba for lba, n in sent.items() if n == 2}
            assert max(sent.values()) <= 2 and twice <= unfinished, (twice - unfinished)
            for lba in lbas:
                assert await dev.read(lba, 8) == _pattern(lba, 8)
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()


# --------------------------------------------------------------------------- split transfers
@pytest.mark.parametrize("op", ["read_into", "write"])
async def test_split_transfer_reports_a_failed_piece_only_after_the_others_ended(op):
    """A transfer larger than the target's maximum is split; when one piece fails the caller's
    error must come after the other pieces ended: else their READ data lands in the caller's
    buffer (or their WRITE on the medium) after the caller was told it failed, and it may
    already be reusing that buffer or retrying that write."""
    from iscsi.initiator.errors import IllegalRequest
    from iscsi.initiator.session import Task

    running: list[int] = []
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0])   # LBA out of range

    class SlowFirstPiece:
        listeners: list = []

        async def execute(self, lun, cdb, *, read_len=0, data=None, buf=None, attr=1, timeout=None):
            lba = struct.unpack_from(">Q", cdb, 2)[0]
            t = Task(lun, cdb, read_len, data, buf)
            if lba == 0:
                running.append(lba)
                await asyncio.sleep(0.2)
                if buf is not None:
                    buf[:] = b"\x01" * len(buf)
                running.remove(lba)
                t.status = 0
            else:
                t.status, t.sense_data = 2, sense
            return t

    dev = BlockDevice(SlowFirstPiece(), 0)
    dev.blocks, dev.max_transfer_blocks = 64, 8
    buf = bytearray(16 * 512)
    with pytest.raises(IllegalRequest):
        if op == "read_into":
            await dev.read_into(0, buf)
        else:
            await dev.write(0, bytes(buf))
    assert not running, "a piece of the failed transfer was still running when the caller got the error"


# --------------------------------------------------------------------------- attach + resize
def test_attached_loop_device_grows_after_an_online_lun_resize(tmp_path, monkeypatch):
    """``iscsi-initiator attach`` then ``iscsi-target lun resize``: after the next I/O (which
    gets CAPACITY DATA HAS CHANGED) the loop device has the new size, as a rescan gives sd."""
    from tests.integration.test_initiator_attach import _cli, _problem, _run
    if _problem():
        pytest.skip(_problem())
    run = tmp_path / "run"
    env = {"SANSTACK_INITIATOR_RUN": str(run), "SANSTACK_INITIATOR_DIR": str(tmp_path / "cfg")}
    peer = make_peer("sanstack", tmp_path / "t", size="16M")
    peer.start()
    try:
        res = _cli("attach", peer.url(), env_extra=env)
        assert res.returncode == 0, res.stderr
        loop = res.stdout.strip()
        assert int(_run("blockdev", "--getsize64", loop)) == 16 * MiB
        r = peer.admin("lun", "resize", peer.iqn, "0", str(24 * MiB))
        assert r.returncode == 0, r.stderr
        _run("dd", f"if={loop}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct")
        deadline = time.monotonic() + 10
        while int(_run("blockdev", "--getsize64", loop)) != 24 * MiB and time.monotonic() < deadline:
            time.sleep(0.1)
        assert int(_run("blockdev", "--getsize64", loop)) == 24 * MiB
        _run("dd", "if=/dev/zero", f"of={loop}", "bs=4096", "count=1", f"seek={(20 * MiB) // 4096}",
             "oflag=direct")
    finally:
        _cli("detach", "--all", env_extra=env)
        peer.stop()


def _announce_connection_drop(s, proxy, *, time2wait: int, time2retain: int) -> None:
    """The target's Async Message "connection drop" (RFC 7143 §11.9.1 event 2), written into
    the proxied connection as if the target had sent it."""
    exp, mx = s.window
    msg = P.AsyncMessage(event=P.AsyncEvent.CONNECTION_DROP, param1=0, param2=time2wait, param3=time2retain,
                         statsn=s._expstatsn, expcmdsn=exp, maxcmdsn=mx)
    (cw, _uw), = proxy._pairs
    cw.write(b"".join(bytes(b) for b in encode_pdu(msg)))


async def test_async_connection_drop_waits_time2wait_before_reconnecting(target):
    """Async Message "connection drop" (§11.9.1 event 2) with Parameter2 = Time2Wait 1 s, then
    the drop: the session reconnects no sooner than Time2Wait, and the I/O goes on."""
    proxy = await FaultProxy(upstream(target)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR, options=quick())
        try:
            await dev.write(7000, _pattern(7000))
            _announce_connection_drop(s, proxy, time2wait=1, time2retain=20)
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            proxy.drop_all()
            assert await asyncio.wait_for(dev.read(7000, 1), 10) == _pattern(7000)
            assert s.reconnects == 1 and time.monotonic() - t0 >= 0.9
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()


async def test_a_refused_connect_says_connection_refused():
    """asyncio's connect error reads 'Connect call failed (...)'; the admin is told the errno."""
    import socket as _socket

    from iscsi.initiator.connection import open_connection
    from iscsi.initiator.errors import ConnectionLost

    probe = _socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(ConnectionLost, match="Connection refused") as err:
        await open_connection("127.0.0.1", port, timeout=2)
    assert "Connect call failed" not in str(err.value)


async def test_an_announced_drop_that_never_came_does_not_slow_a_later_reconnect(target, monkeypatch):
    """The Time2Wait of an Async Message "connection drop" holds for that drop: a loss long
    after it (the drop never came) reconnects as usual, not after the stale Time2Wait."""
    from iscsi.initiator import session as session_mod

    monkeypatch.setattr(session_mod, "ANNOUNCED_DROP_VALID", 0.2)
    proxy = await FaultProxy(upstream(target)).start()
    try:
        s, dev = await open_device(url_via(target, proxy.port), initiator_name=INITIATOR, options=quick())
        try:
            await dev.write(7100, _pattern(7100))
            _announce_connection_drop(s, proxy, time2wait=5, time2retain=0)
            await asyncio.sleep(0.5)           # the announced drop does not come
            t0 = time.monotonic()
            proxy.drop_all()                   # an unrelated loss, later
            assert await asyncio.wait_for(dev.read(7100, 1), 10) == _pattern(7100)
            assert s.reconnects == 1 and time.monotonic() - t0 < 4, "waited the stale Time2Wait (5 s)"
        finally:
            await asyncio.wait_for(s.close(logout=False), 5)
    finally:
        await proxy.close()
