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
from iscsi.initiator.client import open_device, open_session
from iscsi.initiator.device import BlockDevice
from iscsi.initiator.errors import ConnectionLost, LoginError, SessionFailed
from iscsi.initiator.multipath import open_multipath
from iscsi.initiator.session import SessionOptions, State
from tools.peers import make_peer

INITIATOR = "iqn.2026-11.org.sanstack:recovery-review"
MiB = 1 << 20
BHS_LEN = 48


# --------------------------------------------------------------------------- fault proxy
class FaultProxy:
    """TCP proxy on 127.0.0.1 with switchable faults (see the module docstring).

    ``mode``: "forward" (default), "blackhole" (accept, read and discard, never answer),
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
        self.accepted = 0
        self.dropped_on_pred = 0
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
            down = asyncio.ensure_future(self._pump(ur, cw))
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
    async def _pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            data = await r.read(65536)
            if not data:
                return
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
            if self.drop_pred is not None and self.drop_pred(hdr):
                self.dropped_on_pred += 1
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
