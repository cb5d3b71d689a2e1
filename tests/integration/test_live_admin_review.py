"""Review sweep: what logged-in initiators see while an admin changes the running daemon.

The promise under test: an admin change never harms sessions it does not concern and never
loses acknowledged data.  The daemon runs as a subprocess (``iscsi-target serve --config``)
on free loopback ports; the admin CLI runs as its own process while our initiator library
(and libiscsi's tools, qemu-io) keep doing I/O.

- LUN resize during writes: CAPACITY DATA HAS CHANGED on every nexus (SBC-4 §4.6,
  SPC-4 §5.14), READ CAPACITY shows the new size, data written before stays.
- LUN add/remove while another LUN is busy: REPORTED LUNS DATA HAS CHANGED, cleared on
  every LU of the nexus by one REPORT LUNS (SPC-4 §6.33); a removed LUN answers LOGICAL
  UNIT NOT SUPPORTED, the session stays up, the busy LUN is not disturbed.
- target / portal removal, ACL revocation, CHAP change with sessions logged in.
- SIGHUP reload and SIGTERM + restart with clients attached: synced writes and APTPL
  reservations survive.
- admin commands racing each other stay serialized (targetcli-fb PR #161).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from iscsi.initiator import SessionOptions, open_session
from iscsi.initiator.device import BlockDevice
from iscsi.initiator.errors import decode_sense
from tools.peers.base import free_portals, stop_process, wait_listening

REPO = Path(__file__).resolve().parents[2]
IQN = "iqn.2026-11.org.example:live"
IQN2 = "iqn.2026-11.org.example:bystander"
INIT_A = "iqn.2026-11.org.example:live-a"
INIT_B = "iqn.2026-11.org.example:live-b"
BS = 512
#: Any one admin CLI call; a hung daemon fails the test, not CI.
ADMIN_TIMEOUT = 30.0
#: Any one SCSI command of these tests.
CMD_TIMEOUT = 10.0

UNIT_ATTENTION = 0x6
ILLEGAL_REQUEST = 0x5
CHECK_CONDITION = 0x02
REPORTED_LUNS_CHANGED = (0x3F, 0x0E)
CAPACITY_CHANGED = (0x2A, 0x09)
LU_NOT_SUPPORTED = (0x25, 0x00)

TUR = bytes(6)
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])
READ_CAPACITY16 = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class Daemon:
    """``iscsi-target serve --config FILE --control SOCK`` as a subprocess, restartable."""

    def __init__(self, workdir: Path, config: dict) -> None:
        self.workdir = workdir
        self.config_path = workdir / "target.json"
        self.control = Path(tempfile.mkdtemp(prefix="live", dir="/tmp")) / "c.sock"
        self.config_path.write_text(json.dumps(config, indent=2))
        os.chmod(self.config_path, 0o600)
        self.portals: list = []
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "daemon.log"

    def start(self, portals) -> Daemon:
        self.portals = list(portals)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iscsi.target", "serve", "--config", str(self.config_path),
             "--control", str(self.control)],
            env=_env(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_listening(self.portals, self.proc, 30, self.log_path)
        return self

    def stop(self) -> int:
        code = stop_process(self.proc, timeout=30)
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """One admin CLI process, run without blocking the event loop (I/O goes on meanwhile)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "iscsi.target", "--control", str(self.control), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env=_env())
        try:
            out, err = await asyncio.wait_for(proc.communicate(), ADMIN_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"admin {' '.join(args)} hung{self._tail()}") from None
        res = subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())
        if check and res.returncode != 0:
            raise AssertionError(f"admin {' '.join(args)} exited {res.returncode}: {res.stderr}{self._tail()}")
        return res

    def _tail(self) -> str:
        return "\n--- daemon log ---\n" + "\n".join(self.log().splitlines()[-25:])

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        with contextlib.suppress(OSError):
            for p in self.control.parent.iterdir():
                p.unlink()
            self.control.parent.rmdir()


@pytest.fixture
def daemon(tmp_path):
    made: list[Daemon] = []

    def factory(config: dict) -> Daemon:
        made.append(Daemon(tmp_path, config))
        return made[-1]

    yield factory
    for d in made:
        d.cleanup()


def target_cfg(iqn: str, portal, luns: list[tuple[int, str, str]], **extra) -> dict:
    return {
        "iqn": iqn,
        "portal_groups": [{"tag": 1, "portals": [str(portal)]}],
        "luns": [{"number": n, "path": path, "size": size} for n, path, size in luns],
        **extra,
    }


def config(tmp_path: Path, *targets: dict) -> dict:
    return {"version": 1, "data_dir": str(tmp_path), "targets": list(targets)}


async def login(portal, iqn: str = IQN, initiator: str = INIT_A, reconnect: bool = False,
                auth: str = "", command_timeout: float = CMD_TIMEOUT):
    opts = SessionOptions(reconnect=reconnect, noop_interval=0, command_timeout=command_timeout,
                          replacement_timeout=20.0)
    return await asyncio.wait_for(
        open_session(f"iscsi://{auth}{portal}/{iqn}/0", options=opts, initiator_name=initiator), 15)


async def raw(session, lun: int, cdb: bytes, read_len: int = 0, data: bytes | None = None):
    """(status, (asc, ascq) or None, sense key or None, data) of one command, UAs not retried."""
    task = await session.execute(lun, cdb, read_len=read_len, data=data, timeout=CMD_TIMEOUT)
    sense = decode_sense(task.sense_data) if task.sense_data else None
    return (task.status, (sense.asc, sense.ascq) if sense else None, sense.key if sense else None,
            bytes(task.data) if read_len else b"")


async def pending_ua(session, lun: int) -> tuple[int, int] | None:
    """The unit attention a TEST UNIT READY to ``lun`` reports, or None (GOOD)."""
    status, asc, key, _ = await raw(session, lun, TUR)
    if status == 0:
        return None
    assert key == UNIT_ATTENTION, (status, asc, key)
    return asc


async def drain_uas(session, lun: int) -> list[tuple[int, int]]:
    seen = []
    for _ in range(20):
        ua = await pending_ua(session, lun)
        if ua is None:
            return seen
        seen.append(ua)
    raise AssertionError(f"LUN {lun} keeps reporting unit attentions: {seen}")


def pattern(tag: int, lba: int) -> bytes:
    head = f"{tag:08x}:{lba:012x}:".encode()
    return (head * (BS // len(head) + 1))[:BS]


class Writer:
    """Writes distinct blocks to one LUN until stopped; remembers what was acknowledged."""

    def __init__(self, dev: BlockDevice, tag: int, first_lba: int, count: int) -> None:
        self.dev, self.tag, self.first, self.count = dev, tag, first_lba, count
        self.acked: dict[int, bytes] = {}
        self.errors: list[BaseException] = []
        self.count_acked = 0
        self.unknown: tuple[int, bytes] | None = None
        self._stop = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            lba = self.first + i % self.count
            data = pattern(self.tag * 1000 + i, lba)
            try:
                await self.dev.write(lba, data)
            except Exception as e:  # noqa: BLE001 - recorded, the test asserts on it
                # A write that failed (connection lost) may or may not have landed.
                self.unknown = (lba, data)
                self.errors.append(e)
                return
            self.acked[lba] = data
            i += 1
            self.count_acked = i
            await asyncio.sleep(0)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self.task, CMD_TIMEOUT)

    async def verify(self) -> None:
        assert self.acked, "the writer never got a write acknowledged"
        for lba, data in sorted(self.acked.items()):
            got = await self.dev.read(lba, 1)
            assert got == data, f"LBA {lba} lost an acknowledged write"


# --------------------------------------------------------------------------- LUN add / remove


async def test_lun_add_remove_while_another_lun_is_busy(daemon, tmp_path):
    """Session A writes LUN 0 without pause; session B uses LUNs 0 and 1.  LUN 2 is added,
    then LUN 1 removed: B sees REPORTED LUNS DATA HAS CHANGED, one REPORT LUNS clears it on
    every LU of its nexus (SPC-4 §6.33, as tgt does), LUN 1 then answers LOGICAL UNIT NOT
    SUPPORTED on a session that stays up, and A's writes are all there afterwards."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "l0.img", "32M"), (1, "l1.img", "16M")],
                                           open_access=True))).start([portal])
    a = await login(portal, initiator=INIT_A)
    b = await login(portal, initiator=INIT_B)
    try:
        dev_a = await BlockDevice.open(a, 0)
        writer = Writer(dev_a, 1, 0, 256)
        for lun in (0, 1):
            await drain_uas(b, lun)
        await asyncio.sleep(0.2)

        await d.admin("lun", "add", IQN, f"{tmp_path}/l2.img:8M", "--lun", "2")
        status, _, _, data = await raw(b, 0, REPORT_LUNS, read_len=4096)
        assert status == 0
        # that REPORT LUNS answered the condition for every LU of B's nexus
        assert await pending_ua(b, 1) is None, "LUN 1 still reports REPORTED LUNS DATA HAS CHANGED"
        assert await pending_ua(b, 0) is None

        await d.admin("lun", "remove", IQN, "1")
        status, asc, key, _ = await raw(b, 1, TUR)
        assert (status, key, asc) == (CHECK_CONDITION, ILLEGAL_REQUEST, LU_NOT_SUPPORTED)
        write = bytes([0x8A]) + bytes(9) + (1).to_bytes(4, "big") + bytes(2)
        status, asc, key, _ = await raw(b, 1, write, data=bytes(BS))
        assert (status, key, asc) == (CHECK_CONDITION, ILLEGAL_REQUEST, LU_NOT_SUPPORTED)
        status, _, _, data = await raw(b, 0, REPORT_LUNS, read_len=4096)
        assert status == 0 and int.from_bytes(data[:4], "big") == 16  # LUNs 0 and 2
        assert await pending_ua(b, 0) is None
        assert REPORTED_LUNS_CHANGED not in await drain_uas(b, 2)  # a new LU: POWER ON only
        assert b.is_up and a.is_up
        assert not writer.errors, writer.errors
        await writer.stop()
        assert not writer.errors, writer.errors
        await writer.verify()
    finally:
        await b.close()
        await a.close()
    assert d.stop() == 0


# --------------------------------------------------------------------------- LUN resize


async def test_resize_during_writes_reaches_every_nexus_and_keeps_data(daemon, tmp_path):
    """Grow LUN 0 while session A writes it and qemu-io writes it: A, an idle session B and
    a libiscsi session all get CAPACITY DATA HAS CHANGED, READ CAPACITY says the new size,
    the blocks past the old end are writable, and every acknowledged write is intact.  A
    shrink without --force is refused and changes nothing."""
    from tools.libiscsi import CheckCondition
    from tools.libiscsi import Session as LibSession

    from .conftest import require_qemu_iscsi

    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "r0.img", "32M")], open_access=True))).start([portal])
    a = await login(portal, initiator=INIT_A)
    b = await login(portal, initiator=INIT_B)
    lib = await asyncio.to_thread(LibSession(str(portal), IQN, 0, initiator="iqn.2026-11.org.example:live-c").connect)
    qemu = None
    try:
        dev_a = await BlockDevice.open(a, 0)
        await drain_uas(b, 0)
        with contextlib.suppress(CheckCondition):
            await asyncio.to_thread(lib.test_unit_ready)  # its first contact (POWER ON) is answered
        writer = Writer(dev_a, 2, 0, 512)
        try:
            require_qemu_iscsi()
            qemu = await asyncio.create_subprocess_exec(
                "qemu-io", "-f", "raw", "-c", "write -P 0x5a 16M 8M", "-c", "flush",
                f"iscsi://{portal}/{IQN}/0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL)
        except pytest.skip.Exception:
            qemu = None
        await asyncio.sleep(0.2)
        res = await d.admin("lun", "resize", IQN, "0", "64M")
        assert res.returncode == 0
        if qemu is not None:
            out, _ = await asyncio.wait_for(qemu.communicate(), 60)
            assert qemu.returncode == 0, out.decode()
        await asyncio.sleep(0.1)
        await writer.stop()
        assert not writer.errors, writer.errors

        assert await pending_ua(b, 0) == CAPACITY_CHANGED
        assert await pending_ua(b, 0) is None
        with pytest.raises(CheckCondition) as e:
            await asyncio.to_thread(lib.test_unit_ready)
        assert (e.value.sense_key, e.value.ascq) == (UNIT_ATTENTION, 0x2A09), str(e.value)
        assert await asyncio.to_thread(lib.read_capacity16) == ((64 << 20) // BS, BS)
        assert CAPACITY_CHANGED in dev_a.ua_seen  # the writer's nexus got it too (and retried)
        await dev_a.refresh()  # what the initiator does on CAPACITY DATA HAS CHANGED
        assert dev_a.blocks == (64 << 20) // BS
        last = (64 << 20) // BS - 1
        await asyncio.to_thread(lib.write16, last, pattern(9, last))
        assert await dev_a.read(last, 1) == pattern(9, last)

        res = await d.admin("lun", "resize", IQN, "0", "16M", check=False)
        assert res.returncode != 0 and "--force" in res.stderr
        assert await pending_ua(b, 0) is None
        assert await asyncio.to_thread(lib.read_capacity16) == ((64 << 20) // BS, BS)
        await writer.verify()
        if qemu is not None:
            assert await dev_a.read((16 << 20) // BS, 8) == b"\x5a" * (8 * BS)
    finally:
        await asyncio.to_thread(lib.close)
        await b.close()
        await a.close()
    assert d.stop() == 0
    assert (tmp_path / "r0.img").stat().st_size == 64 << 20
    assert json.loads(d.config_path.read_text())["targets"][0]["luns"][0]["size"] in (64 << 20, "64M")


# --------------------------------------------------------------------------- target / portal removal


def _image_block(path: Path, lba: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(lba * BS)
        return f.read(BS)


async def test_target_remove_force_ends_its_sessions_only(daemon, tmp_path):
    """``target remove --force`` with a writer on it and another target busy on the same
    portal: refused without --force; with it the writer's session ends (told by an Async
    Message first, RFC 7143 §11.9.1), every write it had acknowledged is in the image, and
    the other target's session goes on undisturbed."""
    portal = free_portals(1)[0]
    d = daemon(config(
        tmp_path,
        target_cfg(IQN, portal, [(0, "gone.img", "16M")], open_access=True),
        target_cfg(IQN2, portal, [(0, "stay.img", "16M")], open_access=True),
    )).start([portal])
    a = await login(portal, IQN, INIT_A)
    c = await login(portal, IQN2, INIT_B)
    events: list[tuple[str, dict]] = []
    a.listeners.append(lambda name, info: events.append((name, info)))
    try:
        dev_a = await BlockDevice.open(a, 0)
        dev_c = await BlockDevice.open(c, 0)
        wa = Writer(dev_a, 3, 0, 1024)
        wc = Writer(dev_c, 4, 0, 1024)
        await asyncio.sleep(0.2)
        res = await d.admin("target", "remove", IQN, check=False)
        assert res.returncode != 0 and "--force" in res.stderr
        assert a.is_up and not wa.errors
        await d.admin("target", "remove", IQN, "--force")
        await asyncio.wait_for(wa.task, CMD_TIMEOUT)  # the writer stops on its first error
        assert wa.errors, "the removed target's session still takes writes"
        await asyncio.sleep(0.2)
        assert c.is_up and not wc.errors, wc.errors
        await wc.stop()
        assert not wc.errors, wc.errors
        await wc.verify()
        for lba, data in wa.acked.items():
            if wa.unknown is not None and wa.unknown[0] == lba and _image_block(tmp_path / "gone.img", lba) == wa.unknown[1]:
                continue  # the write that failed with the connection landed: allowed
            assert _image_block(tmp_path / "gone.img", lba) == data, \
                f"acknowledged LBA {lba} lost ({wa.count_acked} acknowledged, then {wa.errors!r})"
    finally:
        await c.close()
        await a.close(logout=False)
    assert d.stop() == 0


async def test_target_remove_force_tells_the_session_before_it_ends(daemon, tmp_path):
    """RFC 7143 §11.9.1: a target that ends a session on its own says so first (AsyncEvent 1,
    logout request, or 3, session drop), so the initiator stops sending and does not spin on
    reconnects to a target that is gone."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "gone.img", "8M")], open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A)
    events: list[int] = []
    a.listeners.append(lambda name, info: events.append(info.get("event")) if name == "async" else None)
    try:
        await drain_uas(a, 0)
        await d.admin("target", "remove", IQN, "--force")
        for _ in range(50):
            if not a.is_up:
                break
            await asyncio.sleep(0.05)
        assert not a.is_up
        assert events and events[0] in (1, 3), f"no Async Message before the end (events {events})"
    finally:
        await a.close(logout=False)
    assert d.stop() == 0


# --------------------------------------------------------------------------- ACL and CHAP


SECRET_OLD = "live-review-secret-1"
SECRET_NEW = "live-review-secret-2"


async def test_acl_revoke_and_chap_change_while_logged_in(daemon, tmp_path):
    """Revoking A's ACL ends A's session (and only A's); B keeps writing.  Changing the
    target's CHAP secret leaves logged-in B alone; a new login needs the new secret.  Closing
    open access ends the session of an initiator that had come in without an ACL."""
    from iscsi.initiator.errors import LoginError as InitLoginError

    portal = free_portals(1)[0]
    init_c = "iqn.2026-11.org.example:live-c"
    d = daemon(config(tmp_path, target_cfg(
        IQN, portal, [(0, "acl.img", "16M")], open_access=True,
        acls=[{"initiator": INIT_A}, {"initiator": INIT_B}],
        chap={"username": "alice", "secret": SECRET_OLD}))).start([portal])
    old = f"alice%{SECRET_OLD}@"
    a = await login(portal, IQN, INIT_A, auth=old)
    b = await login(portal, IQN, INIT_B, auth=old)
    c = await login(portal, IQN, init_c, auth=old)
    try:
        dev_a = await BlockDevice.open(a, 0)
        dev_b = await BlockDevice.open(b, 0)
        await BlockDevice.open(c, 0)
        wa = Writer(dev_a, 5, 0, 64)
        wb = Writer(dev_b, 6, 1024, 256)
        await asyncio.sleep(0.2)

        await d.admin("acl", "remove", IQN, INIT_A)
        await asyncio.wait_for(wa.task, CMD_TIMEOUT)
        assert wa.errors, "a revoked initiator's session still takes writes"
        assert not a.is_up
        assert b.is_up and c.is_up and not wb.errors, wb.errors

        secret = tmp_path / "new-secret"
        secret.write_text(SECRET_NEW + "\n")
        await d.admin("chap", "set", "--target", IQN, "--username", "alice", "--secret-file", str(secret))
        await asyncio.sleep(0.2)
        assert b.is_up and c.is_up and not wb.errors, wb.errors
        with pytest.raises(InitLoginError):
            await login(portal, IQN, INIT_B, auth=old)
        fresh = await login(portal, IQN, INIT_B, auth=f"alice%{SECRET_NEW}@")
        await fresh.close()

        await d.admin("target", "set", IQN, "--no-open-access")
        for _ in range(50):
            if not c.is_up:
                break
            await asyncio.sleep(0.05)
        assert not c.is_up, "closing open access left a session without an ACL logged in"
        assert b.is_up and not wb.errors, wb.errors
        await wb.stop()
        assert not wb.errors, wb.errors
        await wb.verify()
    finally:
        for s in (a, b, c):
            await s.close(logout=s.is_up)
    assert d.stop() == 0


# --------------------------------------------------------------------------- reload and restart


PR_REGISTER, PR_RESERVE = 0x00, 0x01
PR_READ_KEYS, PR_READ_RESERVATION = 0x00, 0x01
WRITE_EXCLUSIVE = 0x1
RESERVATION_CONFLICT = 0x18


async def test_reload_and_restart_with_clients_attached(daemon, tmp_path):
    """A writer keeps going through a SIGHUP that adds a LUN (its session stays, it learns of
    the LUN) and through SIGTERM + start on the same file (it reconnects by itself).  Every
    acknowledged write (the ones before SYNCHRONIZE CACHE above all) is there afterwards, and
    a reservation made with APTPL=1 holds across the restart (SPC-4 §5.13.5)."""
    from tools.libiscsi import CheckCondition
    from tools.libiscsi import Session as LibSession

    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "keep.img", "16M")], open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A, reconnect=True, command_timeout=30.0)
    events: list[str] = []
    a.listeners.append(lambda name, info: events.append(name))
    try:
        dev = await BlockDevice.open(a, 0)
        synced = {lba: pattern(7, lba) for lba in range(2048, 2112)}
        for lba, data in synced.items():
            await dev.write(lba, data)
        await dev.flush()
        await dev.persistent_reserve_out(PR_REGISTER, sa_key=0xABC, aptpl=True)
        await dev.persistent_reserve_out(PR_RESERVE, key=0xABC, type=WRITE_EXCLUSIVE)
        writer = Writer(dev, 8, 0, 512)
        await asyncio.sleep(0.2)

        cfg = json.loads(d.config_path.read_text())
        cfg["targets"][0]["luns"].append({"number": 1, "path": "hup.img", "size": "8M"})
        d.config_path.write_text(json.dumps(cfg))
        os.kill(d.proc.pid, signal.SIGHUP)
        for _ in range(100):
            if 1 in (a.luns or []):
                break
            await asyncio.sleep(0.05)
        assert 1 in (a.luns or []), f"the initiator never learnt of the LUN SIGHUP added ({a.luns})"
        assert a.is_up and "state" not in events, "SIGHUP disturbed a session it did not concern"
        assert not writer.errors, writer.errors

        assert d.stop() == 0
        stopped_at = writer.count_acked
        d.start([portal])
        for _ in range(300):
            if writer.count_acked > stopped_at + 20 or writer.task.done():
                break
            await asyncio.sleep(0.05)
        assert writer.count_acked > stopped_at + 20, "the writer did not get going again after the restart"
        assert "state" in events  # it did go through a reconnect
        await writer.stop()
        assert not writer.errors, writer.errors
        assert a.is_up
        await writer.verify()
        for lba, data in synced.items():
            assert await dev.read(lba, 1) == data

        # the reservation came back from its APTPL file: another initiator is fenced off
        keys = await dev.persistent_reserve_in(PR_READ_KEYS)
        assert 0xABC.to_bytes(8, "big") in keys[8:], keys[:32].hex()
        other = await asyncio.to_thread(LibSession(str(portal), IQN, 0, initiator=INIT_B).connect)
        try:
            with contextlib.suppress(CheckCondition):
                await asyncio.to_thread(other.test_unit_ready)
            with pytest.raises(CheckCondition) as e:
                await asyncio.to_thread(other.write16, 0, bytes(BS))
            assert e.value.status == RESERVATION_CONFLICT, str(e.value)
        finally:
            await asyncio.to_thread(other.close)
        await dev.write(3000, pattern(9, 3000))  # the holder still may
    finally:
        await a.close()
    assert d.stop() == 0


# --------------------------------------------------------------------------- racing admins


async def test_racing_admin_commands_are_serialized(daemon, tmp_path):
    """Six ``lun add`` processes at once (no LUN number given) plus a resize and a SIGHUP,
    while a session writes LUN 0: each add gets its own LUN, the config file ends with all
    of them (targetcli-fb PR #161: concurrent saves lost entries), the initiator sees them
    all, and the writer is undisturbed."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "base.img", "16M")], open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A)
    try:
        dev = await BlockDevice.open(a, 0)
        writer = Writer(dev, 10, 0, 256)
        adds = [d.admin("lun", "add", IQN, f"{tmp_path}/race{i}.img:{i + 1}M", check=False) for i in range(6)]
        results = await asyncio.gather(*adds, d.admin("lun", "resize", IQN, "0", "32M", check=False))
        os.kill(d.proc.pid, signal.SIGHUP)
        for res in results:
            assert res.returncode == 0, res.stderr
        listed = json.loads((await d.admin("lun", "list", IQN, "--json")).stdout)
        numbers = sorted(row["lun"] for row in listed)
        assert numbers == list(range(7)), numbers
        by_path = {Path(row["path"]).name: row for row in listed}
        for i in range(6):
            assert by_path[f"race{i}.img"]["size"] == (i + 1) << 20
        saved = json.loads(d.config_path.read_text())["targets"][0]["luns"]
        assert sorted(l["number"] for l in saved) == list(range(7))
        assert len({l["path"] for l in saved}) == 7
        status, _, _, data = await raw(a, 0, REPORT_LUNS, read_len=4096)
        assert status == 0 and int.from_bytes(data[:4], "big") == 7 * 8
        # two admins wanting the same LUN number: one gets it, the other is told, and leaves
        # no image of its own behind
        both = await asyncio.gather(*(d.admin("lun", "add", IQN, f"{tmp_path}/nine{i}.img:4M", "--lun", "9",
                                              check=False) for i in range(2)))
        assert sorted(r.returncode == 0 for r in both) == [False, True], [(r.returncode, r.stderr) for r in both]
        loser = [i for i, r in enumerate(both) if r.returncode != 0][0]
        assert "LUN 9" in both[loser].stderr, both[loser].stderr
        assert not (tmp_path / f"nine{loser}.img").exists()
        saved = json.loads(d.config_path.read_text())["targets"][0]["luns"]
        assert [Path(l["path"]).name for l in saved if l["number"] == 9] == [f"nine{1 - loser}.img"]
        await asyncio.sleep(0.2)
        await writer.stop()
        assert not writer.errors, writer.errors
        await writer.verify()
    finally:
        await a.close()
    assert d.stop() == 0
    d.start([portal])  # the file the race left behind starts as it was
    res = await d.admin("lun", "list", IQN, "--json")
    assert sorted(row["lun"] for row in json.loads(res.stdout)) == list(range(7)) + [9]
    assert d.stop() == 0


async def test_lun_change_reaches_only_the_nexuses_whose_inventory_changed(daemon, tmp_path):
    """B's ACL shows target LUN 1 as its LUN 0 (an explicit mapping); A sees every LUN.  A
    LUN added to the target changes A's inventory, not B's: A gets REPORTED LUNS DATA HAS
    CHANGED, B's I/O goes on without a unit attention that is not about it (SPC-4 §6.33; LIO
    raises it per ACL too)."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(
        IQN, portal, [(0, "m0.img", "8M"), (1, "m1.img", "8M")],
        acls=[{"initiator": INIT_A}, {"initiator": INIT_B, "lun_map": {"0": 1}}]))).start([portal])
    a = await login(portal, IQN, INIT_A)
    b = await login(portal, IQN, INIT_B)
    for s in (a, b):  # no REPORT LUNS of their own on the Async Message: the UAs stay visible
        s.rescan_soon = lambda: None
    try:
        for lun in (0, 1):
            await drain_uas(a, lun)
        await drain_uas(b, 0)
        await d.admin("lun", "add", IQN, f"{tmp_path}/m2.img:8M", "--lun", "2")
        assert await pending_ua(b, 0) is None, "B got a LUN inventory change that is not its own"
        assert await pending_ua(a, 1) == REPORTED_LUNS_CHANGED
        assert await pending_ua(a, 0) == REPORTED_LUNS_CHANGED
        status, _, _, data = await raw(b, 0, REPORT_LUNS, read_len=4096)
        assert status == 0 and int.from_bytes(data[:4], "big") == 8  # B still sees one LUN
    finally:
        await b.close()
        await a.close()
    assert d.stop() == 0


async def test_acl_added_for_an_open_access_session_takes_effect(daemon, tmp_path):
    """An initiator logged in through open access, then given an ACL that maps only LUN 0:
    its session must not keep reaching LUN 1 (the ACL narrows what it may reach; a session
    that keeps the wider open-access view is an access-control hole until it logs out)."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "o0.img", "8M"), (1, "o1.img", "8M")],
                                           open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A)
    try:
        await drain_uas(a, 1)
        await d.admin("acl", "add", IQN, INIT_A, "--map", "0=0")
        await asyncio.sleep(0.2)
        if a.is_up:
            status, asc, key, _ = await raw(a, 1, bytes([0x88]) + bytes(9) + (1).to_bytes(4, "big") + bytes(2),
                                            read_len=BS)
            assert (status, key, asc) == (CHECK_CONDITION, ILLEGAL_REQUEST, LU_NOT_SUPPORTED), \
                "the session still reads a LUN its new ACL does not map"
    finally:
        await a.close(logout=a.is_up)
    assert d.stop() == 0


async def test_lun_remove_under_queued_large_writes_ends_them_cleanly(daemon, tmp_path):
    """LUN 1 is removed while 8 large writes (1 MiB, R2T-driven) at a time stream to it, and
    another image is added right after (it may get the closed image's descriptor number).
    Every write to LUN 1 ends GOOD or LOGICAL UNIT NOT SUPPORTED (no MEDIUM or HARDWARE
    ERROR, no hang), the session stays up, LUN 0 is undisturbed, and the new image holds
    nothing of LUN 1's data."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "q0.img", "16M"), (1, "q1.img", "64M")],
                                           open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A, command_timeout=20.0)
    outcomes: list[tuple[int, object]] = []
    stop = asyncio.Event()
    chunk = 1 << 20
    blob = b"\xc3" * chunk

    async def stream(slot: int) -> None:
        lba = slot * (chunk // BS)
        while not stop.is_set():
            cdb = bytes([0x8A, 0]) + lba.to_bytes(8, "big") + (chunk // BS).to_bytes(4, "big") + bytes(2)
            try:
                status, asc, key, _ = await raw(a, 1, cdb, data=blob)
            except Exception as e:  # noqa: BLE001 - asserted below
                outcomes.append((-1, e))
                return
            outcomes.append((status, (key, asc)))
            if status != 0 and key != UNIT_ATTENTION:
                return
            lba = (lba + 8 * chunk // BS) % ((64 << 20) // BS)

    async def syncer() -> None:  # SYNCHRONIZE CACHE (16) in flight when the LU closes
        cdb = bytes([0x91]) + bytes(15)
        while not stop.is_set():
            try:
                status, asc, key, _ = await raw(a, 1, cdb)
            except Exception as e:  # noqa: BLE001 - asserted below
                outcomes.append((-1, e))
                return
            outcomes.append((status, (key, asc)))
            if status != 0 and key != UNIT_ATTENTION:
                return

    try:
        await drain_uas(a, 0)
        await drain_uas(a, 1)
        dev0 = await BlockDevice.open(a, 0)
        writer = Writer(dev0, 11, 0, 128)
        streams = [asyncio.ensure_future(stream(i)) for i in range(8)]
        streams += [asyncio.ensure_future(syncer()) for _ in range(2)]
        await asyncio.sleep(0.5)
        await d.admin("lun", "remove", IQN, "1")
        await d.admin("lun", "add", IQN, f"{tmp_path}/fresh.img:64M", "--lun", "2")
        await asyncio.wait_for(asyncio.gather(*streams), 30)
        stop.set()
        bad = [o for o in outcomes if o[0] not in (0, CHECK_CONDITION) or
               (o[0] == CHECK_CONDITION and o[1] not in ((ILLEGAL_REQUEST, LU_NOT_SUPPORTED),
                                                         (UNIT_ATTENTION, REPORTED_LUNS_CHANGED)))]
        assert not bad, f"writes to the removed LUN ended badly: {bad[:5]}"
        assert sum(1 for o in outcomes if o[0] == 0) > 0
        assert sum(1 for o in outcomes if o[1] == (ILLEGAL_REQUEST, LU_NOT_SUPPORTED)) == 10
        assert a.is_up
        await writer.stop()
        assert not writer.errors, writer.errors
        await writer.verify()
    finally:
        stop.set()
        await a.close(logout=a.is_up)
    assert d.stop() == 0
    with open(tmp_path / "fresh.img", "rb") as f:
        while block := f.read(1 << 20):
            assert b"\xc3" not in block, "a write to the removed LUN landed in another image"


async def test_portal_remove_keeps_sessions_and_other_targets(daemon, tmp_path):
    """Portal P1 is shared by two targets; T1 also has P2.  ``portal remove T1 P1`` with a
    writer on T1 through P1 and one on T2 through P1: the listener stays for T2 (its writer
    and new logins go on), T1 is no longer offered on P1 (discovery, login), its connection
    made through P1 goes on as documented, and T1 through P2 is untouched."""
    from iscsi.initiator import discover
    from iscsi.initiator.errors import LoginError as InitLoginError

    p1, p2 = free_portals(2)
    t1 = target_cfg(IQN, p1, [(0, "p1.img", "8M")], open_access=True)
    t1["portal_groups"].append({"tag": 2, "portals": [str(p2)]})
    d = daemon(config(tmp_path, t1, target_cfg(IQN2, p1, [(0, "p2.img", "8M")], open_access=True))).start([p1, p2])
    a = await login(p1, IQN, INIT_A)
    c = await login(p1, IQN2, INIT_B)
    try:
        wa = Writer(await BlockDevice.open(a, 0), 12, 0, 64)
        wc = Writer(await BlockDevice.open(c, 0), 13, 0, 64)
        await asyncio.sleep(0.2)
        res = await d.admin("portal", "remove", IQN, str(p1))
        await asyncio.sleep(0.3)
        assert a.is_up and c.is_up and not wa.errors and not wc.errors, (wa.errors, wc.errors)
        found = await asyncio.wait_for(discover(p1.host, p1.port, initiator_name=INIT_B), 15)
        assert [t.name for t in found] == [IQN2], found
        with pytest.raises(InitLoginError):
            await login(p1, IQN, INIT_B)
        other = await login(p2, IQN, INIT_B)
        await other.close()
        again = await login(p1, IQN2, INIT_A)
        await again.close()
        for w in (wa, wc):
            await w.stop()
            assert not w.errors, w.errors
            await w.verify()
        assert f"portal {p1} removed (TPGT 1)" in res.stdout, res.stdout
    finally:
        await c.close()
        await a.close()
    assert d.stop() == 0


async def test_forced_shrink_under_reads_and_writes(daemon, tmp_path):
    """``lun resize --force`` to half the size while 1 MiB READs (zero-copy) and writes run
    at the end being cut off: no READ of the cut range answers GOOD with zeroes in place of
    data written there, commands past the new end get CAPACITY DATA HAS CHANGED then LOGICAL
    BLOCK ADDRESS OUT OF RANGE, and the first half is intact."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "s.img", "64M")], open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A, reconnect=True, command_timeout=20.0)
    chunk = 1 << 20
    half = (32 << 20) // BS
    per = chunk // BS
    try:
        dev = await BlockDevice.open(a, 0)
        keep = {lba: pattern(14, lba) for lba in range(0, half, 997)}
        for lba, data in keep.items():
            await dev.write(lba, data)
        tail = bytes(b"\x7e" * chunk)
        for lba in range(half, 2 * half, per):
            await dev.write(lba, tail)
        await dev.flush()
        outcomes: list[tuple[str, object]] = []
        stop = asyncio.Event()

        async def reader(slot: int) -> None:
            lba = half + slot * per
            while not stop.is_set():
                cdb = bytes([0x88, 0]) + lba.to_bytes(8, "big") + per.to_bytes(4, "big") + bytes(2)
                try:
                    status, asc, key, data = await raw(a, 0, cdb, read_len=chunk)
                except Exception as e:  # noqa: BLE001
                    outcomes.append(("exc", repr(e)))
                    return
                if status == 0:
                    assert data == tail, f"READ at LBA {lba} answered GOOD without the data written there"
                    outcomes.append(("good", lba))
                else:
                    outcomes.append(("check", (key, asc)))
                    if key != UNIT_ATTENTION:
                        return
                lba = half + (lba - half + 4 * per) % half

        readers = [asyncio.ensure_future(reader(i)) for i in range(4)]
        await asyncio.sleep(0.3)
        await d.admin("lun", "resize", IQN, "0", "32M", "--force")
        await asyncio.wait_for(asyncio.gather(*readers), 40)
        stop.set()
        ends = [o for o in outcomes if o[0] != "good"]
        # The zero-copy READs holding the cut range lost their connection (lu.resize): the
        # reconnected nexus sees I_T NEXUS LOSS, and still the capacity change after it.
        assert all(o in (("check", (ILLEGAL_REQUEST, (0x21, 0x00))), ("check", (UNIT_ATTENTION, CAPACITY_CHANGED)),
                         ("check", (UNIT_ATTENTION, (0x29, 0x07)))) for o in ends), ends
        assert ("check", (UNIT_ATTENTION, CAPACITY_CHANGED)) in ends, \
            f"the initiator never learnt that the LUN shrank: {ends}"
        assert a.is_up
        await dev.refresh()
        assert dev.blocks == half
        for lba, data in keep.items():
            assert await dev.read(lba, 1) == data
    finally:
        await a.close(logout=a.is_up)
    assert d.stop() == 0


async def test_capacity_change_survives_a_reconnect(daemon, tmp_path):
    """A LUN grows, and the initiator's connection drops before its next command (it logs in
    again with the same ISID: the same I_T nexus, SAM-5 §6.3.4).  It is told I_T NEXUS LOSS
    OCCURRED and still CAPACITY DATA HAS CHANGED after it: a reset says nothing about the
    capacity, and an initiator that misses the condition keeps using the old size."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "g.img", "8M")], open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A, reconnect=True)
    try:
        a.rescan_soon = lambda: None  # keep the inventory condition visible
        await drain_uas(a, 0)
        await d.admin("lun", "resize", IQN, "0", "16M")
        await d.admin("lun", "add", IQN, f"{tmp_path}/g1.img:8M", "--lun", "1")
        old_conn = a.conn
        old_conn.abort("test: connection lost")
        for _ in range(200):
            if a.is_up and a.conn is not old_conn:
                break
            await asyncio.sleep(0.05)
        assert a.is_up and a.conn is not old_conn, "the initiator did not log in again"
        seen = await drain_uas(a, 0)
        assert seen[0] == (0x29, 0x07), seen
        assert CAPACITY_CHANGED in seen and REPORTED_LUNS_CHANGED in seen, seen
    finally:
        await a.close()
    assert d.stop() == 0


async def test_qemu_io_rides_through_a_restart(daemon, tmp_path):
    """qemu-io (libiscsi) writes 96 MiB in 64 KiB commands while the daemon gets SIGTERM and
    is started again on the same file: qemu-io reconnects by itself, exits 0, and every byte
    it wrote is in the image.  The restart comes as soon as the first write is in the image
    (not after a fixed delay: on a fast machine qemu-io once finished within it)."""
    from .conftest import require_qemu_iscsi

    require_qemu_iscsi()
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "qemu.img", "128M")], open_access=True))).start([portal])
    writes = 1536
    cmds: list[str] = []
    for i in range(writes):
        cmds += ["-c", f"write -P 0x3c {i * 64}k 64k"]
    qemu = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", "raw", *cmds, "-c", "flush", f"iscsi://{portal}/{IQN}/0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(400):  # until its first write is in the image (page cache), at most 10 s
            with open(tmp_path / "qemu.img", "rb") as f:
                if f.read(1) == b"\x3c":
                    break
            await asyncio.sleep(0.025)
        assert qemu.returncode is None, "qemu-io finished before the restart: nothing was tested"
        assert await asyncio.to_thread(d.stop) == 0
        await asyncio.sleep(0.3)
        await asyncio.to_thread(d.start, [portal])
        out, err = await asyncio.wait_for(qemu.communicate(), 60)
    finally:
        if qemu.returncode is None:
            qemu.kill()
            await qemu.wait()
    text = out.decode(errors="replace")
    assert qemu.returncode == 0, text[-2000:] + err.decode(errors="replace")[-2000:]
    assert text.count("wrote 65536/65536") == writes
    assert d.stop() == 0
    with open(tmp_path / "qemu.img", "rb") as f:
        assert f.read(writes << 16) == b"\x3c" * (writes << 16)
    assert "login.ok" in d.log().split("daemon.stopped", 1)[1], "qemu-io never logged in again"


async def test_lun_change_async_message_only_where_the_inventory_changed(daemon, tmp_path):
    """The Async Message carrying REPORTED LUNS DATA HAS CHANGED (RFC 7143 §11.9.1 event 0)
    goes to the sessions whose inventory changed: B, whose ACL maps one fixed LUN, is not
    made to rescan because A's view grew."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(
        IQN, portal, [(0, "n0.img", "8M"), (1, "n1.img", "8M")],
        acls=[{"initiator": INIT_A}, {"initiator": INIT_B, "lun_map": {"0": 1}}]))).start([portal])
    a = await login(portal, IQN, INIT_A)
    b = await login(portal, IQN, INIT_B)
    got: dict[str, list] = {"a": [], "b": []}
    a.listeners.append(lambda name, info: got["a"].append(name) if name == "scsi_event" else None)
    b.listeners.append(lambda name, info: got["b"].append(name) if name == "scsi_event" else None)
    try:
        await drain_uas(a, 0)
        await drain_uas(b, 0)
        await d.admin("lun", "add", IQN, f"{tmp_path}/n2.img:8M", "--lun", "2")
        await asyncio.sleep(0.3)
        assert got["a"], "A's inventory changed and A was not told"
        assert not got["b"], "B was told of an inventory change that is not its own"
    finally:
        await b.close()
        await a.close()
    assert d.stop() == 0


async def test_unrelated_admin_changes_leave_sessions_alone(daemon, tmp_path):
    """Alias, CHAP, a new ACL, a new portal, a new target, a SIGHUP with the file unchanged:
    none of them concerns the sessions logged in, so their writer sees no unit attention, no
    Async Message, no reconnect, and every write lands."""
    p1, p2 = free_portals(2)
    d = daemon(config(tmp_path, target_cfg(IQN, p1, [(0, "u.img", "8M")], open_access=True,
                                           acls=[{"initiator": INIT_A}]))).start([p1])
    a = await login(p1, IQN, INIT_A)
    b = await login(p1, IQN, INIT_B)
    events: list[str] = []
    for s in (a, b):
        s.listeners.append(lambda name, info: events.append(name))
    try:
        devs = [await BlockDevice.open(s, 0) for s in (a, b)]
        writers = [Writer(dev, 20 + i, i * 4096, 128) for i, dev in enumerate(devs)]
        await asyncio.sleep(0.1)
        secret = tmp_path / "s"
        secret.write_text(SECRET_NEW + "\n")
        await d.admin("target", "set", IQN, "--alias", "renamed")
        await d.admin("chap", "set", "--target", IQN, "--initiator", INIT_A, "--username", "u",
                      "--secret-file", str(secret))
        await d.admin("acl", "add", IQN, "iqn.2026-11.org.example:live-newcomer")
        await d.admin("portal", "add", IQN, str(p2))
        await d.admin("target", "add", IQN2, "--portal", str(p2))
        os.kill(d.proc.pid, signal.SIGHUP)
        await asyncio.sleep(0.3)
        for w in writers:
            await w.stop()
            assert not w.errors, w.errors
            await w.verify()
        for dev in devs:
            assert dev.ua_seen == [(0x29, 0x00)], dev.ua_seen  # the first contact only
        assert events == [], events
    finally:
        await b.close()
        await a.close()
    assert d.stop() == 0


async def test_reload_that_reopens_a_lun_under_writes(daemon, tmp_path):
    """SIGHUP with a LUN's product string changed reopens that LUN (the same image) while a
    session writes it: the session stays up, learns the change (a unit attention it retries
    past), and every acknowledged write is in the image, before and after the swap."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "re.img", "8M")], open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A)
    try:
        dev = await BlockDevice.open(a, 0)
        writer = Writer(dev, 30, 0, 64)  # a small range: the same blocks rewritten across the swap
        await asyncio.sleep(0.2)
        cfg = json.loads(d.config_path.read_text())
        cfg["targets"][0]["luns"][0]["product"] = "RELOADED"
        d.config_path.write_text(json.dumps(cfg))
        before = writer.count_acked
        os.kill(d.proc.pid, signal.SIGHUP)
        for _ in range(100):
            if "lun.closed" in d.log():
                break
            await asyncio.sleep(0.05)
        assert "lun.closed" in d.log(), "the reload did not reopen the LUN"
        await asyncio.sleep(0.3)
        await writer.stop()
        assert not writer.errors, writer.errors
        assert writer.count_acked > before + 50
        assert a.is_up
        assert len(dev.ua_seen) > 1, dev.ua_seen
        await writer.verify()
        inq = await dev.inquiry()
        assert "RELOADED" in str(inq), inq
    finally:
        await a.close()
    assert d.stop() == 0
    for lba, data in writer.acked.items():
        assert _image_block(tmp_path / "re.img", lba) == data


async def test_removing_lun_0_keeps_report_luns_working_through_it(daemon, tmp_path):
    """LUN 0 removed under a session that uses LUNs 0 and 1: REPORT LUNS still answers through
    LUN 0 (SPC-4 §6.33; our initiator and Linux rescan there), lists LUN 1, and clears the
    condition LUN 1 holds; INQUIRY of LUN 0 says no LU there (qualifier 011b)."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "z0.img", "8M"), (1, "z1.img", "8M")],
                                           open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A)
    a.rescan_soon = lambda: None
    try:
        await drain_uas(a, 0)
        await drain_uas(a, 1)
        await d.admin("lun", "remove", IQN, "0")
        status, _, _, data = await raw(a, 0, REPORT_LUNS, read_len=4096)
        assert status == 0 and data[:4] == (8).to_bytes(4, "big") and data[8:10] == b"\x00\x01", data[:16].hex()
        assert await pending_ua(a, 1) is None
        status, _, _, data = await raw(a, 0, bytes([0x12, 0, 0, 0, 36, 0]), read_len=36)
        assert status == 0 and data[0] >> 5 == 0b011
    finally:
        await a.close()
    assert d.stop() == 0


async def test_portal_removed_and_added_back_while_a_session_reconnects(daemon, tmp_path):
    """targetcli-fb #116: a portal taken away and given back must not leave the initiator with
    I/O errors.  The writer's connection drops while its portal is gone; once the portal is
    back, the session logs in again (same portal group tag) and the writer never saw an error."""
    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(IQN, portal, [(0, "pb.img", "8M")], open_access=True))).start([portal])
    a = await login(portal, IQN, INIT_A, reconnect=True, command_timeout=30.0)
    try:
        writer = Writer(await BlockDevice.open(a, 0), 40, 0, 64)
        await asyncio.sleep(0.2)
        await d.admin("portal", "remove", IQN, str(portal))
        a.conn.abort("test: the network drops the connection")
        await asyncio.sleep(0.6)
        assert not a.is_up  # nothing listens: it keeps trying
        stalled = writer.count_acked
        res = await d.admin("portal", "add", IQN, str(portal))
        assert "added (TPGT 1)" in res.stdout, res.stdout  # the tag the session logged in with
        for _ in range(200):
            if writer.count_acked > stalled + 20:
                break
            await asyncio.sleep(0.05)
        await writer.stop()
        assert not writer.errors, writer.errors
        assert writer.count_acked > stalled + 20, "the writer did not resume once the portal was back"
        await writer.verify()
    finally:
        await a.close(logout=a.is_up)
    assert d.stop() == 0


class HoldingRelay:
    """A loopback TCP relay that forwards the initiator's first PDU (its first Login Request)
    and holds everything after it until :meth:`release`: a login kept half way (CHAP needs
    more round trips) while the admin changes the target under it."""

    def __init__(self, upstream) -> None:
        self.upstream = upstream
        self.released = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> HoldingRelay:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.released.set()
        self.server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def release(self) -> None:
        self.released.set()

    async def _serve(self, reader, writer) -> None:
        up_r, up_w = await asyncio.open_connection(self.upstream.host, self.upstream.port)

        async def pump(src, dst, hold: bool) -> None:
            try:
                if hold:
                    bhs = await src.readexactly(48)
                    dlen = int.from_bytes(bhs[5:8], "big")
                    dst.write(bhs + await src.readexactly(bhs[4] * 4 + (dlen + 3) // 4 * 4))
                    await self.released.wait()
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.close()

        self._tasks += [asyncio.ensure_future(pump(reader, up_w, True)),
                        asyncio.ensure_future(pump(up_r, writer, False))]


@pytest.mark.parametrize("change", ["target", "acl"])
async def test_admin_change_during_a_login_in_progress(daemon, tmp_path, change):
    """A login half way through CHAP when the target is removed (or the initiator's ACL
    revoked) must not end in a session: its target and grant were looked up at the first
    Login Request, and the admin's session drop ran before the session existed.  Before the
    fix the login completed, onto closed images or past the revoked ACL."""
    from iscsi.initiator.errors import LoginError as InitLoginError

    portal = free_portals(1)[0]
    d = daemon(config(tmp_path, target_cfg(
        IQN, portal, [(0, "li.img", "8M")], acls=[{"initiator": INIT_A}],
        chap={"username": "alice", "secret": SECRET_OLD}))).start([portal])
    async with HoldingRelay(portal) as relay:
        via = f"127.0.0.1:{relay.port}"
        login_task = asyncio.ensure_future(login(via, IQN, INIT_A, auth=f"alice%{SECRET_OLD}@"))
        for _ in range(100):
            if "login" in d.log() and relay._tasks:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the first Login Request has reached the target
        if change == "target":
            await d.admin("target", "remove", IQN, "--force")
        else:
            await d.admin("acl", "remove", IQN, INIT_A)
        relay.release()
        try:
            session = await asyncio.wait_for(login_task, 15)
        except InitLoginError:
            session = None
        if session is not None:
            try:
                status, asc, key, _ = await raw(session, 0, bytes([0x88]) + bytes(9) + (1).to_bytes(4, "big")
                                                + bytes(2), read_len=BS)
            except Exception:  # noqa: BLE001 - a dropped session is a fine outcome
                status = None
            finally:
                await session.close(logout=False)
            pytest.fail(f"the login completed after the {change} change (a READ then got {status}, {key}, {asc})")
    assert d.stop() == 0


def test_a_write_after_the_image_closed_never_lands_in_another_file(tmp_path):
    """What a command suspended on a removed LUN (behind an ORDERED task, a zero-copy hold)
    does when it resumes after ``lun remove`` closed the image: its write must fail, not be
    gathered onto the old descriptor number, which the next image opened may have taken."""
    from iscsi.backstore import gather
    from iscsi.backstore.file import FileBackstore

    removed = FileBackstore(tmp_path / "removed.img", size=1 << 20, gather_writes=True)
    removed.close()  # lun remove: flushed and closed
    other = FileBackstore(tmp_path / "other.img", size=1 << 20, gather_writes=True)  # lun add
    try:
        with contextlib.suppress(OSError):
            removed.write(0, b"\xab" * 4096)  # the late write
            gather.drain_all()  # what the transport does before it answers
        other_bytes = (tmp_path / "other.img").read_bytes()
        assert b"\xab" not in other_bytes, "a write to the closed image landed in another image"
        with pytest.raises(OSError):
            removed.write(0, b"\xab" * 4096)
    finally:
        other.close()
        gather.pending_runs.clear()
