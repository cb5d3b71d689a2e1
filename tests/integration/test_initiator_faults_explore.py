"""Target-side faults a production initiator must survive, against our target daemon (and
tgtd where it says so), with a small fault-injecting TCP relay of this file in between.

What earlier sweeps cover is not repeated (test_initiator_recovery_review.py: kill -9 and
restart, SIGSTOP with the NOP-Out keepalive, redirects, Time2Wait of an announced drop,
multipath path loss through a proxy; test_initiator_hostile_target_review.py: malformed
PDUs).  Here:

* a TCP reset at an exact byte of the target's stream — inside a Data-In header, inside a
  payload the initiator receives in place, between two PDUs — and inside a WRITE's data on
  the way out: every command completes once, with the right data;
* a command that times out while the target is stopped, whose ABORT TASK is then cut off by
  the connection loss: the caller gets CommandTimeout and the command is not carried out
  behind its back after the reconnect (its READ buffer stays untouched);
* the admin's ``session drop`` and ``acl remove`` (Async Message event 3) mid-I/O, and
  ``portal remove`` + ``session drop`` of one of two multipath paths.

Every wait is bounded; nothing sleeps a fixed time where a condition can be polled.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time

import pytest

from iscsi import pdu as P
from iscsi.initiator import scsi
from iscsi.initiator.client import open_device
from iscsi.initiator.errors import CommandTimeout, SessionFailed
from iscsi.initiator.multipath import open_multipath
from iscsi.initiator.session import SessionOptions, State
from tools.peers import make_peer

INITIATOR = "iqn.2026-11.org.sanstack:faults-explore"
KiB, MiB = 1024, 1 << 20
BHS_LEN = 48


def pattern(lba: int, blocks: int = 1) -> bytes:
    return b"".join(struct.pack(">Q", lba + i) * 64 for i in range(blocks))


def quick(**kw) -> SessionOptions:
    base = dict(login_timeout=3.0, noop_interval=0, replacement_timeout=10.0)
    base.update(kw)
    return SessionOptions(**base)


async def poll(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- cut relay
class CutRelay:
    """Loopback TCP relay that can reset a connection pair at an exact byte.

    ``cut(direction, n)`` arms a cut: after ``n`` more bytes have been forwarded in that
    direction ("down" = target to initiator, "up" = initiator to target) both sockets are
    reset (SO_LINGER 0: an RST, as a crashed host or a middlebox sends).  Bytes past the
    cut are not forwarded.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.accepted = 0
        self.cuts = 0
        self._armed: dict[str, int | None] = {"down": None, "up": None}
        self._socks: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> "CutRelay":
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def cut(self, direction: str, n: int) -> None:
        self._armed[direction] = n

    async def close(self) -> None:
        self.server.close()
        for w in list(self._socks):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    @staticmethod
    def _reset(w: asyncio.StreamWriter) -> None:
        sock = w.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        w.transport.abort()

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.accepted += 1
        me = asyncio.current_task()
        self._tasks.add(me)
        self._socks.add(cw)
        uw = None
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
            self._socks.add(uw)
            pumps = [asyncio.ensure_future(self._pump(cr, uw, "up", cw)),
                     asyncio.ensure_future(self._pump(ur, cw, "down", uw))]
            self._tasks.update(pumps)
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in pumps:
                    t.cancel()
                    self._tasks.discard(t)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (cw, uw):
                if w is not None:
                    self._reset(w)
                    self._socks.discard(w)
            self._tasks.discard(me)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, direction: str,
                    other: asyncio.StreamWriter) -> None:
        while True:
            data = await r.read(65536)
            if not data:
                return
            left = self._armed[direction]
            if left is not None:
                if len(data) >= left:
                    self._armed[direction] = None
                    if left:
                        w.write(data[:left])
                        await w.drain()
                    self.cuts += 1
                    self._reset(w)
                    self._reset(other)
                    return
                self._armed[direction] = left - len(data)
            w.write(data)
            await w.drain()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """Our daemon: two portals (two portal groups), one 8 MiB LUN."""
    peer = make_peer("sanstack", tmp_path_factory.mktemp("faults"), size="8M", portals=2)
    peer.start()
    yield peer
    peer.stop()




def portal(peer, i: int = 0) -> tuple[str, int]:
    p = peer.portals[i]
    return (p.host, p.port)


def url_via(peer, port: int) -> str:
    """The peer's first data LU (tgtd's LUN 0 is its controller) through a relay on ``port``."""
    lun = peer.url(0).rsplit("/", 1)[1]
    return f"iscsi://127.0.0.1:{port}/{peer.iqn}/{lun}"


# --------------------------------------------------------------------------- TCP resets
#: Where in the target's answer to one 256 KiB READ the stream is reset: inside the first
#: Data-In header, right after it, inside a payload received in place, one byte short of
#: a PDU boundary, at a boundary, and inside the next header.
DOWN_CUTS = [0, 20, BHS_LEN, BHS_LEN + 5000, BHS_LEN + 65536 + 3, BHS_LEN + 128 * KiB - 1,
             BHS_LEN + 128 * KiB, BHS_LEN + 128 * KiB + 30]


@pytest.mark.parametrize("cut", DOWN_CUTS)
async def test_reset_at_any_byte_of_the_data_in_stream_read_is_retried_whole(target, cut):
    relay = await CutRelay(portal(target)).start()
    try:
        s, dev = await open_device(url_via(target, relay.port), initiator_name=INITIATOR, options=quick())
        try:
            want = os.urandom(256 * KiB)
            await dev.write(1024, want)
            buf = bytearray(b"\xEE" * (256 * KiB))
            relay.cut("down", cut)
            # dev.command: the reinstated session's first command meets the target's UNIT
            # ATTENTION (I_T nexus loss, SAM-5 §6.3), retried by the device layer.
            t = await asyncio.wait_for(dev.command(scsi.read16(1024, 512), read_len=len(buf), buf=buf), 15)
            assert t.status == 0 and t.exc is None
            assert (0x29, 0x07) in dev.ua_seen, dev.ua_seen
            assert relay.cuts == 1 and s.reconnects == 1
            assert bytes(buf) == want
            # The session is sound afterwards: many reads in flight, right data.
            got = await asyncio.wait_for(asyncio.gather(*(dev.read(1024 + 64 * i, 64) for i in range(8))), 10)
            assert b"".join(got) == want
        finally:
            await asyncio.wait_for(s.close(), 10)
    finally:
        await relay.close()


@pytest.mark.parametrize("cut", [10, BHS_LEN + 100, 70 * KiB, 200 * KiB])
async def test_reset_inside_a_write_on_its_way_out_write_is_resent_whole(target, cut):
    """The reset cuts the WRITE's command or data PDUs (immediate data, unsolicited and
    solicited Data-Out): the write is sent again from its first byte; the image holds it."""
    relay = await CutRelay(portal(target)).start()
    try:
        s, dev = await open_device(url_via(target, relay.port), initiator_name=INITIATOR, options=quick())
        try:
            await dev.write(3000, bytes(256 * KiB))
            data = os.urandom(256 * KiB)
            relay.cut("up", cut)
            await asyncio.wait_for(dev.write(3000, data), 15)
            assert relay.cuts == 1 and s.reconnects == 1
            assert await dev.read(3000, 512) == data
        finally:
            await asyncio.wait_for(s.close(), 10)
    finally:
        await relay.close()


async def _resets_under_a_deep_queue(peer) -> None:
    relay = await CutRelay(portal(peer)).start()
    try:
        s, dev = await open_device(url_via(peer, relay.port), initiator_name=INITIATOR,
                                   options=quick(replacement_timeout=15.0))
        completions = 0
        try:
            for round_, cut in enumerate((777, 40_000, 123_457)):
                base = 4096 + round_ * 2048
                relay.cut("down", cut)
                writes = [dev.write(base + 16 * i, pattern(base + 16 * i, 16)) for i in range(64)]
                await asyncio.wait_for(asyncio.gather(*writes), 20)
                completions += len(writes)
                reads = await asyncio.wait_for(
                    asyncio.gather(*(dev.read(base + 16 * i, 16) for i in range(64))), 20)
                completions += len(reads)
                for i, got in enumerate(reads):
                    assert got == pattern(base + 16 * i, 16), f"round {round_} extent {i}"
                await poll(lambda: relay.cuts == round_ + 1, 5, "the cut")
            assert s.reconnects == 3 and completions == 384
            assert s.in_flight == 0 and s.queued == 0
        finally:
            await asyncio.wait_for(s.close(), 10)
    finally:
        await relay.close()


async def test_resets_under_a_deep_queue_lose_and_repeat_nothing(target):
    """64 writes then 64 reads of distinct extents in flight while the target's stream is
    reset three times at odd bytes: every command ends once, GOOD, and the data is right."""
    await _resets_under_a_deep_queue(target)


async def test_resets_under_a_deep_queue_against_tgtd(tmp_path):
    """The same against tgtd, a target nobody here wrote."""
    import shutil
    if shutil.which("tgtd") is None or shutil.which("tgtadm") is None:
        pytest.skip("tgtd not installed (apt-get install tgt)")
    peer = make_peer("tgt", tmp_path / "tgt", size="8M")
    peer.start()
    try:
        await _resets_under_a_deep_queue(peer)
    finally:
        peer.stop()


# --------------------------------------------------------------------------- stalled target
async def test_timed_out_read_whose_abort_is_cut_off_is_not_resent_after_the_reconnect(own_target, monkeypatch):
    """SIGSTOP: the READ times out (command_timeout), its ABORT TASK goes unanswered, then the
    NOP-Out keepalive drops the connection.  The caller has CommandTimeout; after SIGCONT the
    session logs in again — and must not send that READ again: its buffer was handed back
    (nothing may write it any more), and a WRITE would land after its caller was told it
    failed.  Before the fix the loss re-queued the task and the failed abort did not take it
    out of the queue: the READ went out again after the reconnect (here the reinstated
    nexus's UNIT ATTENTION happened to absorb it; the unit test shows the buffer overwritten)."""
    from iscsi.initiator import session as S
    from tests.integration.test_initiator_recovery_review import FaultProxy
    monkeypatch.setattr(S, "ABORT_TIMEOUT", 10.0)
    proxy = await FaultProxy(portal(own_target)).start()
    s, dev = await open_device(url_via(own_target, proxy.port), initiator_name=INITIATOR,
                               options=quick(command_timeout=0.3, noop_interval=0.6, noop_timeout=0.6,
                                             login_timeout=1.0, replacement_timeout=20.0))
    try:
        await dev.write(700, pattern(700, 8))
        buf = bytearray(b"\xEE" * 4096)
        pid = own_target.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(CommandTimeout):
                await asyncio.wait_for(s.execute(0, scsi.read16(700, 8), read_len=4096, buf=buf), 10)
            # The abort ended with the connection loss, not with ABORT_TIMEOUT.
            assert time.monotonic() - t0 < 5
            assert s.state == State.RECOVERING
        finally:
            os.kill(pid, signal.SIGCONT)
        await s.wait_state(State.LOGGED_IN, timeout=10)
        await dev.test_unit_ready()
        assert s.in_flight == 0 and s.queued == 0
        assert proxy.commands.count((0x88, 700)) == 1, proxy.commands
        assert bytes(buf) == b"\xEE" * 4096, "the timed-out READ was carried out after all"
        assert await asyncio.wait_for(dev.read(700, 8), 5) == pattern(700, 8)
    finally:
        await asyncio.wait_for(s.close(), 10)
        await proxy.close()


# --------------------------------------------------------------------------- admin actions
class Written(dict):
    """LBA -> data last written there, and how many writes completed."""
    done = 0


async def _writers(dev, n: int, stop: asyncio.Event, written: Written, errors: list, base: int = 0) -> list:
    async def one(w: int) -> None:
        for k in range(10_000):
            if stop.is_set():
                return
            lba = base + (w * 64 + k % 64) * 8
            data = os.urandom(4096)
            try:
                await dev.write(lba, data)
                written[lba] = data
                written.done += 1
            except Exception as exc:
                errors.append(exc)
                return
    return [asyncio.ensure_future(one(w)) for w in range(n)]


async def test_admin_session_drop_mid_io_is_invisible_to_the_caller(target):
    """``iscsi-target session drop`` sends Async Message event 3 (Time2Wait = 2 s) and closes
    the connection: in-flight writes are re-sent after the reinstatement, none fails, and
    the session waited Time2Wait before logging in again."""
    s, dev = await open_device(target.url(0), initiator_name=INITIATOR, options=quick())
    events: list = []
    s.listeners.append(lambda name, info: events.append((name, info.get("event"), time.monotonic())))
    stop, written, errors = asyncio.Event(), Written(), []
    try:
        workers = await _writers(dev, 8, stop, written, errors)
        await poll(lambda: written.done >= 32, 10, "writes going")
        r = await asyncio.to_thread(target.admin, "session", "drop", target.iqn, "--tsih", str(s.tsih))
        assert r.returncode == 0, r.stderr
        await poll(lambda: s.reconnects >= 1, 15, "reconnect")
        n = written.done
        await poll(lambda: written.done >= n + 32, 10, "writes after the reconnect")
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 10)
        assert not errors, errors[:3]
        announced = [t for name, ev, t in events if name == "async" and ev == P.AsyncEvent.SESSION_DROP]
        recovered = [t for name, _, t in events if name == "recovered"]
        assert announced and recovered and recovered[0] - announced[0] >= 1.8
        for lba, data in written.items():
            assert await dev.read(lba, 8) == data
    finally:
        stop.set()
        await asyncio.wait_for(s.close(), 10)


async def test_acl_removed_mid_io_fails_the_io_after_the_window_naming_the_refusal(tmp_path):
    peer = make_peer("sanstack", tmp_path / "acl", size="8M", acl=[INITIATOR])
    peer.start()
    try:
        s, dev = await open_device(peer.url(0), initiator_name=INITIATOR, options=quick(replacement_timeout=3.0))
        stop, written, errors = asyncio.Event(), Written(), []
        try:
            workers = await _writers(dev, 8, stop, written, errors)
            await poll(lambda: written.done >= 16, 10, "writes going")
            t0 = time.monotonic()
            r = await asyncio.to_thread(peer.admin, "acl", "remove", peer.iqn, INITIATOR)
            assert r.returncode == 0, r.stderr
            await asyncio.wait_for(asyncio.gather(*workers), 15)
            took = time.monotonic() - t0
            assert len(errors) == 8
            for e in errors:
                assert isinstance(e, SessionFailed)
                assert "not recovered within 3s" in str(e) and "authorization failure (0x0202)" in str(e), e
            assert 2.5 <= took <= 8, took
        finally:
            stop.set()
            await asyncio.wait_for(s.close(), 10)
    finally:
        peer.stop()


async def test_multipath_portal_removed_and_its_session_dropped_io_goes_on(target):
    """Two paths with I/O on both.  The admin removes portal 2 (existing sessions stay) and
    drops the session on it: its commands move to path 1 with no error, path 2 stays down
    (no portal to log in to), the data is right.  The portal is added back at the end and
    the path rejoins by itself."""
    p2 = target.portals[1]
    mp, dev = await open_multipath([target.url(0, portal=0), target.url(0, portal=1)],
                                   initiator_name=INITIATOR, no_path_timeout=10,
                                   options=quick(login_timeout=1.0))
    stop, written, errors = asyncio.Event(), Written(), []
    removed = False
    try:
        b = mp.paths[1].session
        workers = await _writers(dev, 8, stop, written, errors, base=8192)
        await poll(lambda: b.in_flight > 0 and written.done >= 32, 10, "I/O on path 2")
        r = await asyncio.to_thread(target.admin, "portal", "remove", target.iqn, f"{p2.host}:{p2.port}")
        assert r.returncode == 0, r.stderr
        removed = True
        r = await asyncio.to_thread(target.admin, "session", "drop", target.iqn, "--tsih", str(b.tsih))
        assert r.returncode == 0, r.stderr
        await poll(lambda: not mp.paths[1].up, 5, "path 2 down")
        n = written.done
        await poll(lambda: written.done >= n + 64, 10, "I/O through path 1")
        assert not mp.paths[1].up
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 10)
        assert not errors, errors[:3]
        for lba, data in written.items():
            assert await dev.read(lba, 8) == data
        r = await asyncio.to_thread(target.admin, "portal", "add", target.iqn, f"{p2.host}:{p2.port}")
        assert r.returncode == 0, r.stderr
        removed = False
        await poll(lambda: mp.paths[1].usable, 15, "path 2 back")
    finally:
        stop.set()
        if removed:
            await asyncio.to_thread(target.admin, "portal", "add", target.iqn, f"{p2.host}:{p2.port}")
        await asyncio.wait_for(mp.close(), 10)
