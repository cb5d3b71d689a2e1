"""The initiator against real targets: tgtd (Debian tgt) and our own daemon, started per test.

Every test runs against both peers ("tgt" and "sanstack").  Paths are taken away with a
small TCP proxy in front of a portal (closing it is a pulled cable, reopening it a
repaired one) or by killing the target process.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from iscsi.initiator.client import discover, open_device, open_session
from iscsi.initiator.device import BlockDevice
from iscsi.initiator.errors import LoginError, TaskAborted
from iscsi.initiator.multipath import open_multipath
from iscsi.initiator.session import SessionOptions, State, Task
from iscsi.initiator.url import IscsiUrl, parse_url
from tools.peers import Chap, make_peer
from tools.peers.base import Portal, free_port
from tools.peers.tgt import available as tgt_problem

INITIATOR = "iqn.2026-11.org.sanstack:test-initiator"
REPO = Path(__file__).resolve().parents[2]
PEERS = ["tgt", "sanstack"]
MiB = 1 << 20


def start_peer(kind: str, tmp_path: Path, **kw):
    if kind == "tgt" and tgt_problem():
        pytest.skip(tgt_problem())
    kw.setdefault("size", "256M")
    peer = make_peer(kind, tmp_path / kind, **kw)
    peer.start()
    return peer


@pytest.fixture(params=PEERS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def peers_started():
    started = []
    yield started
    for p in started:
        try:
            p.stop()
        except Exception:
            p.kill()


def url_of(peer, index: int = 0, portal: int = 0, **kw) -> IscsiUrl:
    return parse_url(peer.url(index, portal=portal, **kw))


def restart(peer) -> None:
    """Start a stopped/killed peer again on the same portals and images."""
    if hasattr(peer, "restart"):
        peer.restart()
    else:
        peer.start()


class TcpProxy:
    """Forward one loopback port to a portal; ``close`` drops every connection (path loss)."""

    def __init__(self, target: Portal) -> None:
        self.target = target
        self.port = free_port()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, uw}
        await asyncio.gather(self._pipe(reader, uw), self._pipe(ur, writer))
        self._writers -= {writer, uw}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def url(self, peer, index: int = 0) -> IscsiUrl:
        return parse_url(peer.url(index)).with_portal("127.0.0.1", self.port)


# ---------------------------------------------------------------------------
# discovery, login, basic I/O
# ---------------------------------------------------------------------------

async def test_discovery_lists_target_and_portals(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path, portals=2)
    peers_started.append(peer)
    targets = await discover(peer.portals[0].host, peer.portals[0].port, initiator_name=INITIATOR)
    names = {t.name for t in targets}
    assert peer.iqn in names
    mine = next(t for t in targets if t.name == peer.iqn)
    ports = {p for _h, p, _t in mine.portals}
    # tgt reports only the portal the discovery session came in on; ours reports both.
    assert peer.portals[0].port in ports


async def test_inventory_and_read_write_roundtrip(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path)
    peers_started.append(peer)
    session, dev = await open_device(url_of(peer), initiator_name=INITIATOR)
    try:
        assert dev.size == peer.luns[0].size
        assert dev.block_size == 512
        assert dev.identity and dev.identity.startswith("naa.")
        luns = await dev.report_luns()
        assert peer.lun_ids[0] in luns
        data = os.urandom(3 * MiB + 4096)
        await dev.write(1000, data, fua=True)
        assert await dev.read(1000, len(data) // 512) == data
        await dev.flush()
        await dev.write_same(20000, 64, b"\x5a" * 512)
        assert await dev.read(20000, 64) == b"\x5a" * 512 * 64
        # Reading past the end is refused by the device layer, not sent.
        with pytest.raises(ValueError):
            await dev.read(dev.blocks - 1, 2)
        rtt = await session.ping()
        assert 0 <= rtt < 5
    finally:
        await session.close()
    assert session.state == State.CLOSED


async def test_mutual_chap(kind, tmp_path, peers_started):
    chap = Chap("alice", "alice-secret-123", "tgt-user", "target-secret-456")
    peer = start_peer(kind, tmp_path, chap=chap)
    peers_started.append(peer)
    session, dev = await open_device(url_of(peer), initiator_name=INITIATOR)
    try:
        assert session.login_result.auth_method == "CHAP"
        assert len(await dev.read(0, 8)) == 4096
    finally:
        await session.close()
    # The target proves a secret we do not expect: we refuse it.
    bad_target = url_of(peer, chap=Chap("alice", "alice-secret-123", "tgt-user", "wrong-secret-789"))
    with pytest.raises(LoginError, match="mutual CHAP"):
        await open_session(bad_target, initiator_name=INITIATOR)
    # We know the wrong secret: the target refuses us (authentication failure, 0x0201).
    bad_us = url_of(peer, chap=Chap("alice", "not-alices-secret", "tgt-user", "target-secret-456"))
    with pytest.raises(LoginError) as err:
        await open_session(bad_us, initiator_name=INITIATOR)
    assert err.value.status_class == 2


async def test_header_and_data_digests(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path, params={"HeaderDigest": "CRC32C", "DataDigest": "CRC32C"})
    peers_started.append(peer)
    u = url_of(peer)
    u = IscsiUrl(**{**vars(u), "header_digest": "CRC32C,None", "data_digest": "CRC32C,None"})
    session, dev = await open_device(u, initiator_name=INITIATOR)
    try:
        cp = session.params.connection
        assert cp.header_digest and cp.data_digest
        data = os.urandom(MiB + 1536)
        await dev.write(77, data)
        assert await dev.read(77, len(data) // 512) == data
    finally:
        await session.close()


async def test_1mib_write_across_many_r2ts(kind, tmp_path, peers_started):
    params = {"FirstBurstLength": "65536", "MaxBurstLength": "262144", "InitialR2T": "Yes"}
    peer = start_peer(kind, tmp_path, params=params)
    peers_started.append(peer)
    session, dev = await open_device(url_of(peer), initiator_name=INITIATOR,
                                     keys={"MaxBurstLength": "262144", "FirstBurstLength": "65536"})
    try:
        sp = session.params.session
        assert sp.first_burst_length == 65536 and sp.max_burst_length == 262144
        r2ts = []
        orig = session.rx_r2t

        def counting(h):
            r2ts.append((h[12], h[13]))
            orig(h)

        session.rx_r2t = counting
        data = os.urandom(MiB)
        await dev.write(4096, data)
        # 1 MiB minus what went as immediate data, in bursts of at most 256 KiB.
        assert len(r2ts) >= 4
        assert all(length <= 262144 for _off, length in r2ts)
        covered = sorted(r2ts)
        first = covered[0][0]
        assert first <= 65536
        end = first
        for off, length in covered:
            assert off == end
            end += length
        assert end == MiB
        assert await dev.read(4096, MiB // 512) == data
    finally:
        await session.close()


async def test_128_commands_in_flight(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path)
    peers_started.append(peer)
    session, dev = await open_device(url_of(peer), initiator_name=INITIATOR)
    try:
        blocks = {i * 64: os.urandom(4096) for i in range(128)}
        peak = 0
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        remaining = [len(blocks)]
        errors = []

        def cb(task: Task) -> None:
            if task.exc or task.status:
                errors.append((task.exc, task.status, task.sense))
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set_result(None)

        from iscsi.initiator import scsi
        for lba, data in blocks.items():
            session.submit(Task(dev.lun, scsi.write16(lba, 8), out=data, cb=cb))
            peak = max(peak, session.queued)
        assert peak == 128  # all 128 accepted at once; the CmdSN window meters them out
        await asyncio.wait_for(done, 30)
        assert not [e for e in errors if not (e[1] == 2 and e[2] and e[2].key == 6)]
        results = await asyncio.gather(*(dev.read(lba, 8) for lba in blocks))
        for (lba, data), got in zip(blocks.items(), results):
            if not any(e for e in errors):
                assert got == data
    finally:
        await session.close()


async def test_abort_task_and_lun_reset(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path, params={"InitialR2T": "Yes", "FirstBurstLength": "65536"})
    peers_started.append(peer)
    session, dev = await open_device(url_of(peer), initiator_name=INITIATOR,
                                     keys={"InitialR2T": "Yes", "ImmediateData": "No"})
    try:
        # Hold back the Data-Out of one write so it stays in progress at the target.
        held = []
        orig = session._send_data_out
        session._send_data_out = lambda task, ttt, off, n: held.append((task, ttt, off, n))
        from iscsi.initiator import scsi
        fut = asyncio.ensure_future(session.execute(dev.lun, scsi.write16(0, 2048), data=bytes(MiB)))
        for _ in range(200):
            if held:
                break
            await asyncio.sleep(0.01)
        assert held, "target sent no R2T"
        task = held[0][0]
        assert await session.abort_task(task) is True
        with pytest.raises(TaskAborted):
            await fut
        session._send_data_out = orig
        # The session is still healthy.
        data = os.urandom(8192)
        await dev.write(100, data)
        assert await dev.read(100, 16) == data
        # LUN reset: completes, and the device layer absorbs the unit attention it raises.
        await session.lun_reset(dev.lun)
        assert await dev.read(100, 16) == data
    finally:
        await session.close()


# ---------------------------------------------------------------------------
# recovery
# ---------------------------------------------------------------------------

async def _copy(dev: BlockDevice, data: bytes, chunk: int, qd: int, progress: list[int]) -> None:
    sem = asyncio.Semaphore(qd)

    async def one(off: int) -> None:
        async with sem:
            await dev.write(off // 512, data[off:off + chunk])
            progress[0] += chunk

    await asyncio.gather(*(one(off) for off in range(0, len(data), chunk)))


async def test_target_killed_and_restarted_mid_dd(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path)
    peers_started.append(peer)
    session, dev = await open_device(url_of(peer), initiator_name=INITIATOR,
                                     options=SessionOptions(replacement_timeout=60))
    try:
        data = os.urandom(48 * MiB)
        progress = [0]
        copy = asyncio.ensure_future(_copy(dev, data, 256 * 1024, 8, progress))
        for _ in range(2000):
            if progress[0] >= len(data) // 4 or copy.done():
                break
            await asyncio.sleep(0.005)
        assert not copy.done(), "copy finished before the target could be killed"
        await asyncio.to_thread(peer.kill)
        await asyncio.sleep(1.0)
        assert session.state == State.RECOVERING
        await asyncio.to_thread(restart, peer)
        await asyncio.wait_for(copy, 60)
        assert session.reconnects >= 1
        assert session.state == State.LOGGED_IN
        back = await dev.read(0, len(data) // 512)
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    finally:
        await session.close()


async def test_session_fails_after_replacement_timeout(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path)
    peers_started.append(peer)
    session, dev = await open_device(url_of(peer), initiator_name=INITIATOR,
                                     options=SessionOptions(replacement_timeout=1.5))
    try:
        await asyncio.to_thread(peer.kill)
        from iscsi.initiator.errors import SessionFailed
        with pytest.raises(SessionFailed):
            await asyncio.wait_for(dev.read(0, 8), 20)
    finally:
        await session.close()


async def test_multipath_survives_losing_a_portal(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path, portals=2)
    peers_started.append(peer)
    proxies = [await TcpProxy(p).open() for p in peer.portals]
    mp, dev = await open_multipath([px.url(peer) for px in proxies], policy="round-robin",
                                   initiator_name=INITIATOR)
    try:
        assert len(mp.paths) == 2
        written: dict[int, bytes] = {}
        errors: list[BaseException] = []
        stop = asyncio.Event()
        rnd = random.Random(7)

        async def worker(wid: int) -> None:
            while not stop.is_set():
                # Each worker owns its own blocks: concurrent writers of one block would race.
                lba = (rnd.randrange(0, 512) * 8 + wid) * 8
                data = os.urandom(4096)
                try:
                    await dev.write(lba, data)
                    written[lba] = data
                    got = await dev.read(lba, 8)
                    if written.get(lba) == data and got != data:
                        errors.append(AssertionError(f"lba {lba} read back differs"))
                except Exception as exc:  # any error is a failure of the multipath promise
                    errors.append(exc)

        workers = [asyncio.ensure_future(worker(i)) for i in range(8)]
        await asyncio.sleep(0.7)
        before = [p.failures for p in mp.paths]
        await proxies[0].close()          # pull the cable of path 0
        await asyncio.sleep(1.5)
        assert not mp.paths[0].up
        await proxies[0].open()           # repair it: the session comes back by itself
        for _ in range(200):
            if mp.paths[0].up:
                break
            await asyncio.sleep(0.05)
        assert mp.paths[0].up
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        assert not errors, errors[:3]
        assert len(written) > 50
        for lba, data in list(written.items())[:200]:
            assert await dev.read(lba, 8) == data
        assert sum(p.failures for p in mp.paths) >= sum(before)
    finally:
        await mp.close()
        for px in proxies:
            await px.close()


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def test_cli_dd_completes_across_target_restart(kind, tmp_path, peers_started):
    """The target is killed and restarted in the middle of an ``iscsi-initiator dd``."""
    import re
    import threading
    import time

    peer = start_peer(kind, tmp_path)
    peers_started.append(peer)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(160 * MiB))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISCSI_INITIATOR_NAME": INITIATOR}
    # 4 KiB writes one at a time keep the copy going for seconds (64 KiB at QD 4 ends in
    # ~0.2 s, before the first progress line), so the kill lands in the middle of it.
    proc = subprocess.Popen([sys.executable, "-m", "iscsi.initiator.cli", "dd", f"if={src}",
                             f"of={peer.url()}", "bs=4k", "qd=1", "--progress"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    seen = {"pct": 0.0, "text": b""}

    def reader() -> None:
        while True:
            chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(64)
            if not chunk:
                return
            seen["text"] += chunk
            found = re.findall(rb"(\d+\.\d)%", seen["text"][-200:])
            if found:
                seen["pct"] = float(found[-1])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while seen["pct"] < 15 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"dd ended before the kill: {seen['text'][-300:]!r}"
        killed_at = seen["pct"]
        peer.kill()
        time.sleep(1.5)
        restart(peer)
        assert proc.wait(timeout=120) == 0, seen["text"][-500:]
    finally:
        if proc.poll() is None:
            proc.kill()
        t.join(5)
    assert killed_at < 100
    assert b"copied" in seen["text"]

    async def check() -> bool:
        session, dev = await open_device(url_of(peer), initiator_name=INITIATOR)
        try:
            back = await dev.read(0, src.stat().st_size // 512)
        finally:
            await session.close()
        return hashlib.sha256(back).digest() == hashlib.sha256(src.read_bytes()).digest()

    assert asyncio.run(check())


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISCSI_INITIATOR_NAME": INITIATOR}
    return subprocess.run([sys.executable, "-m", "iscsi.initiator.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_discover_ls_dd_bench(kind, tmp_path, peers_started):
    peer = start_peer(kind, tmp_path)
    peers_started.append(peer)
    portal = str(peer.portals[0])
    res = _cli("discover", portal)
    assert res.returncode == 0, res.stderr
    assert peer.iqn in res.stdout
    res = _cli("ls", peer.url())
    assert res.returncode == 0, res.stderr
    assert "256.0 MiB" in res.stdout
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5 * MiB + 1000))
    res = _cli("dd", f"if={src}", f"of={peer.url()}", "bs=256k")
    assert res.returncode == 0, res.stderr
    assert "copied" in res.stderr
    back = tmp_path / "back.bin"
    res = _cli("dd", f"if={peer.url()}", f"of={back}", "bs=256k", "count=21")
    assert res.returncode == 0, res.stderr
    assert back.read_bytes()[:src.stat().st_size] == src.read_bytes()
    res = _cli("bench", peer.url(), "--runtime", "1", "--qd", "8", "--json")
    assert res.returncode == 0, res.stderr
    import json
    out = json.loads(res.stdout)
    assert out["ios"] > 0 and out["errors"] == 0 and out["lat_us"]["p50"] > 0
    res = _cli("readcap", "iscsi://127.0.0.1:1/iqn.x/0")
    assert res.returncode == 1 and "error" in res.stderr
