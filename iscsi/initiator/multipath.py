"""Multipath: one logical unit reached through sessions to several portals.

Like dm-multipath with ``queue_if_no_path`` for a bounded time:

* paths are matched by the LU's identity in VPD page 83h (NAA designator first): paths
  to different LUs are refused, and a path whose session logged in again is used only once
  its identity has been read again and still matches (behind the same portal there may now
  be another LU: a re-mapped LUN, a target rebuilt with other images);
* each path's session runs with ``fail_fast`` so a lost connection hands its commands
  back at once; they are re-issued on another path, and the session reconnects in the
  background and rejoins when logged in again;
* ALUA (SPC-4 §5.16): when the LU reports TPGS, REPORT TARGET PORT GROUPS gives each
  path's asymmetric access state; I/O goes to active/optimized paths, then
  active/non-optimized ones; standby / unavailable / offline paths are used for nothing
  but state refreshes; transitioning is retried.  Sense NOT READY 04h/0Ah-0Ch and the
  UNIT ATTENTION 2Ah/06h (asymmetric access state changed) trigger a refresh;
* path selection: ``round-robin`` (one command per path in turn) or ``least-queue``
  (the path with the fewest outstanding commands, dm's queue-length selector).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from ..log import event
from . import scsi
from .device import BlockDevice, check_lu_present
from .errors import CommandTimeout, ConnectionLost, IscsiError, ScsiError, SessionFailed
from .session import Session, SessionOptions, State

log = logging.getLogger("iscsi.initiator.multipath")

#: How long I/O waits when no path is usable (dm-multipath's no_path_retry × polling
#: interval is typically 12 × 5 s = 60 s; open-iscsi's replacement_timeout is 120 s).
NO_PATH_TIMEOUT = 120.0
#: Re-issues of one command across path failures before giving up.
MAX_PATH_RETRIES = 32
#: While no port group serves I/O, REPORT TARGET PORT GROUPS is asked again this often (an
#: array's failover takes seconds; dm-multipath's polling_interval is 5 s, but the I/O waits).
ALUA_POLL_INTERVAL = 0.5
#: A path that could not log in when the device was opened is tried again in the background,
#: first after this many seconds, doubling up to REVIVE_MAX_DELAY (dm-multipath keeps checking
#: failed paths every polling_interval, 5 s, and adds them back when they answer).
REVIVE_FIRST_DELAY = 1.0
REVIVE_MAX_DELAY = 30.0
POLICIES = ("round-robin", "least-queue")

_USABLE = (scsi.AluaState.ACTIVE_OPTIMIZED, scsi.AluaState.ACTIVE_NON_OPTIMIZED,
           scsi.AluaState.LBA_DEPENDENT)
_ALUA_SENSE = {(0x04, 0x0A), (0x04, 0x0B), (0x04, 0x0C)}  # transitioning / standby / unavailable


class MultipathError(IscsiError):
    pass


@dataclass
class Path:
    session: Session
    lun: int
    identity: str | None = None
    rel_port: int | None = None
    group: int | None = None
    alua: scsi.AluaState | None = None   # None: the LU does not do ALUA
    failures: int = 0
    #: Session generation whose login the LU identity was checked for (see _verify).
    verified_generation: int | None = None
    #: Why this path is never used again (it leads to another LU), or None.
    refused: str | None = None

    def __post_init__(self) -> None:
        if self.verified_generation is None:
            self.verified_generation = self.session.generation

    @property
    def up(self) -> bool:
        return self.session.state == State.LOGGED_IN

    @property
    def verified(self) -> bool:
        return self.refused is None and self.verified_generation == self.session.generation

    @property
    def usable(self) -> bool:
        return self.up and self.verified and (self.alua is None or self.alua in _USABLE)

    @property
    def name(self) -> str:
        return f"{self.session.portal}/lun{self.lun}"


class MultipathExecutor:
    """Has the ``execute`` coroutine of a Session, so a :class:`BlockDevice` runs on it."""

    def __init__(self, paths: list[Path], policy: str = "round-robin",
                 no_path_timeout: float = NO_PATH_TIMEOUT) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if not paths:
            raise ValueError("no paths")
        self.paths = paths
        self.policy = policy
        self.no_path_timeout = no_path_timeout
        self.listeners: list[Callable[[str, dict], None]] = []
        self._rr = 0
        self._alua = False
        self._change = asyncio.Event()
        self._refreshing: asyncio.Task | None = None
        self._verifying: dict[int, asyncio.Task] = {}
        self._alua_polled = 0.0
        self._reviving: set[asyncio.Task] = set()
        self.identity = paths[0].identity
        self.failovers = 0
        for p in paths:
            p.session.listeners.append(self._path_event(p))

    def _path_event(self, path: Path):
        def on_event(name: str, info: dict) -> None:
            if name == "state":
                event(log, "multipath.path_state", path=path.name, state=info.get("state"))
                self._change.set()
                if info.get("state") == State.LOGGED_IN and not path.verified and path.refused is None:
                    self._verify_soon(path)
                elif info.get("state") == State.LOGGED_IN and self._alua:
                    self.refresh_alua_soon()
            for cb in list(self.listeners):
                cb(name, {**info, "path": path.name})
        return on_event

    # ------------------------------------------------------------------ path choice
    def _pick(self, avoid: set[int] | None = None) -> Path | None:
        usable = [p for p in self.paths if p.usable]
        if avoid:
            # Paths this command already timed out on, unless nothing else is left.
            usable = [p for p in usable if id(p) not in avoid] or usable
        if not usable:
            return None
        best = [p for p in usable if p.alua in (None, scsi.AluaState.ACTIVE_OPTIMIZED)]
        candidates = best or usable
        if self.policy == "least-queue":
            return min(candidates, key=lambda p: p.session.queued)
        self._rr += 1
        return candidates[self._rr % len(candidates)]

    async def _wait_for_path(self, deadline: float, avoid: set[int] | None = None) -> Path:
        loop = asyncio.get_running_loop()
        while True:
            path = self._pick(avoid)
            if path is not None:
                return path
            if all(p.session.state == State.CLOSED or p.refused for p in self.paths):
                refused = [f"{p.name} {p.refused}" for p in self.paths if p.refused]
                raise SessionFailed("every path is closed" + (f" or refused: {'; '.join(refused)}"
                                                               if refused else ""))
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SessionFailed(f"no usable path for {self.no_path_timeout:.0f}s")
            wait = min(remaining, 1.0)
            if self._alua and any(p.up and p.verified for p in self.paths):
                # Paths are logged in but no port group serves I/O (all transitioning,
                # standby, unavailable): only REPORT TARGET PORT GROUPS tells when that ends,
                # so ask again every ALUA_POLL_INTERVAL.
                now = loop.time()
                if now - self._alua_polled >= ALUA_POLL_INTERVAL:
                    self._alua_polled = now
                    self.refresh_alua_soon()
                wait = min(wait, ALUA_POLL_INTERVAL)
            self._change.clear()
            try:
                await asyncio.wait_for(self._change.wait(), wait)
            except asyncio.TimeoutError:
                pass

    # ------------------------------------------------------------------ execute
    async def execute(self, lun: int, cdb: bytes, *, read_len: int = 0, data: Any = None, buf: Any = None,
                      attr: int = 1, timeout: float | None = None):
        """Run ``cdb`` on some path (``lun`` is ignored: each path knows its own LUN number)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.no_path_timeout
        last_exc: BaseException | None = None
        resends = 0          # sends after a path lost the command (it may have been carried out)
        timed_out: set[int] = set()
        for _ in range(MAX_PATH_RETRIES):
            path = await self._wait_for_path(deadline, timed_out)
            try:
                task = await path.session.execute(path.lun, cdb, read_len=read_len, data=data, buf=buf,
                                                  attr=attr, timeout=timeout)
            except CommandTimeout as exc:
                # The path's target port or link stalls (the session aborted the command and
                # checks the connection).  Another path may answer: try it there, as
                # dm-multipath retries a command the SCSI error handler failed on one path.
                if not any(p.usable and p is not path and id(p) not in timed_out for p in self.paths):
                    raise
                timed_out.add(id(path))
                last_exc = exc
                path.failures += 1
                self.failovers += 1
                resends += 1
                event(log, "multipath.failover", logging.WARNING, path=path.name, error=exc)
                continue
            except (ConnectionLost, SessionFailed) as exc:
                last_exc = exc
                path.failures += 1
                self.failovers += 1
                event(log, "multipath.failover", logging.WARNING, path=path.name, error=exc)
                self._change.set()
                if isinstance(exc, ConnectionLost):
                    resends += 1
                continue
            task.tries += resends
            if task.status == 2 and task.sense_data:
                sense = task.sense
                if sense is not None and sense.key == 0x2 and sense.asc_ascq in _ALUA_SENSE:
                    # The path's port group cannot serve I/O right now: learn the new states, try another.
                    path.alua = scsi.AluaState.TRANSITIONING if sense.ascq == 0x0A else scsi.AluaState.STANDBY
                    self.refresh_alua_soon()
                    await asyncio.sleep(0.05)
                    continue
                if sense is not None and sense.key == 0x6 and sense.asc_ascq == (0x2A, 0x06):
                    self.refresh_alua_soon()
            return task
        raise SessionFailed(f"command failed on every path: {last_exc}")

    # ------------------------------------------------------------------ identity
    def _verify_soon(self, path: Path) -> None:
        key = id(path)
        t = self._verifying.get(key)
        if t is None or t.done():
            self._verifying[key] = asyncio.get_running_loop().create_task(self._verify(path))

    async def _verify(self, path: Path) -> None:
        """Read VPD 83h again through a path that logged in again; use it only if it is the
        same LU (SPC-4 §7.8.6).  Another LU there is refused for good: mixing its blocks into
        this device would corrupt both."""
        session = path.session
        while path.refused is None and not path.verified and session.state == State.LOGGED_IN:
            generation = session.generation
            try:
                dev = BlockDevice(session, path.lun)
                inq = await dev.inquiry()
                check_lu_present(path.lun, inq)
                identity = scsi.lu_identity(scsi.parse_vpd83(await dev.vpd(0x83)))
            except (IscsiError, ScsiError, asyncio.TimeoutError) as exc:
                event(log, "multipath.path_verify_failed", logging.WARNING, path=path.name, error=exc)
                await asyncio.sleep(1.0)
                continue
            if identity != self.identity:
                path.refused = f"leads to another logical unit ({identity}, not {self.identity})"
                event(log, "multipath.path_refused", logging.ERROR, path=path.name, reason=path.refused)
                self._change.set()
                return
            if session.generation == generation:
                path.verified_generation = generation
                event(log, "multipath.path_verified", path=path.name)
                self._change.set()
                if self._alua:
                    self.refresh_alua_soon()

    # ------------------------------------------------------------------ ALUA
    def refresh_alua_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh_alua()
        except (IscsiError, ScsiError, asyncio.TimeoutError) as exc:
            event(log, "multipath.alua_refresh_failed", logging.WARNING, error=exc)

    async def refresh_alua(self) -> None:
        """REPORT TARGET PORT GROUPS through any live path; map states to paths by port group."""
        if not self._alua:
            return
        for p in self.paths:
            if not p.up or not p.verified:
                continue
            dev = BlockDevice(p.session, p.lun)
            groups = await dev.report_target_port_groups()
            by_group = {g.group: g.state for g in groups}
            by_port = {port: g.state for g in groups for port in g.ports}
            for q in self.paths:
                state = None
                if q.group is not None and q.group in by_group:
                    state = by_group[q.group]
                elif q.rel_port is not None and q.rel_port in by_port:
                    state = by_port[q.rel_port]
                if state is not None and state != q.alua:
                    event(log, "multipath.alua", path=q.name, state=state.name)
                    q.alua = state
            self._change.set()
            return

    # ------------------------------------------------------------------ lifecycle
    def revive_later(self, url: Any, opener: Callable[[Any], Any]) -> None:
        """Keep trying to log in through ``url`` (a path that was down when the device was
        opened) and add it once it is up and leads to this LU; ``opener(url)`` logs in."""
        t = asyncio.get_running_loop().create_task(self._revive(url, opener))
        self._reviving.add(t)
        t.add_done_callback(self._reviving.discard)

    async def _revive(self, url: Any, opener: Callable[[Any], Any]) -> None:
        from .errors import ConfigError
        delay = REVIVE_FIRST_DELAY
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, REVIVE_MAX_DELAY)
            session = None
            try:
                session = await opener(url)
                path = await probe_path(session, url.lun)
            except ConfigError as exc:
                event(log, "multipath.path_unused", logging.ERROR, portal=url.portal, error=exc)
                return
            except (IscsiError, ScsiError, OSError, asyncio.TimeoutError) as exc:
                if session is not None:
                    await session.close(logout=False)
                event(log, "multipath.path_still_down", logging.INFO, portal=url.portal, error=exc)
                continue
            except BaseException:
                if session is not None:
                    await session.close(logout=False)
                raise
            if path.identity is None or path.identity != self.identity:
                await session.close()
                event(log, "multipath.path_refused", logging.ERROR, path=path.name,
                      reason=f"leads to another logical unit ({path.identity}, not {self.identity})")
                return
            if path.alua is not None and not self._alua:
                path.alua = None               # the device runs without ALUA
            self.paths.append(path)
            session.listeners.append(self._path_event(path))
            event(log, "multipath.path_added", path=path.name)
            self._change.set()
            if self._alua:
                self.refresh_alua_soon()
            return

    async def close(self) -> None:
        for t in list(self._reviving):
            t.cancel()
        if self._reviving:
            await asyncio.wait(self._reviving)
        verifying = [t for t in self._verifying.values() if not t.done()]
        for t in verifying:
            t.cancel()
        if verifying:
            await asyncio.wait(verifying)
        await asyncio.gather(*(p.session.close() for p in self.paths), return_exceptions=True)


async def probe_path(session: Session, lun: int) -> Path:
    """Identity (VPD 83h LU designator) and port (relative port, port group) of one path."""
    dev = BlockDevice(session, lun)
    inq = await dev.inquiry()
    check_lu_present(lun, inq)
    designators = scsi.parse_vpd83(await dev.vpd(0x83))
    rel, tpg = scsi.port_identity(designators)
    path = Path(session, lun, scsi.lu_identity(designators), rel, tpg)
    if inq.tpgs:
        path.alua = scsi.AluaState.ACTIVE_OPTIMIZED  # until REPORT TARGET PORT GROUPS says otherwise
    return path


async def open_multipath(urls: list, *, policy: str = "round-robin", initiator_name: str | None = None,
                         options: SessionOptions | None = None, keys: dict[str, str] | None = None,
                         no_path_timeout: float = NO_PATH_TIMEOUT) -> tuple[MultipathExecutor, BlockDevice]:
    """Log in through every URL (same LU, different portals) and return the executor and device."""
    from .client import open_session
    from .url import parse_url

    opts = options or SessionOptions()
    opts.fail_fast = True
    parsed = [parse_url(u) if isinstance(u, str) else u for u in urls]
    sessions = await asyncio.gather(*(open_session(u, options=SessionOptions(**vars(opts)),
                                                   initiator_name=initiator_name, keys=keys) for u in parsed),
                                    return_exceptions=True)
    live = [(s, u) for s, u in zip(sessions, parsed) if isinstance(s, Session)]
    if not live:
        raise MultipathError(f"no path could log in: {sessions[0]}")
    down = []
    for s, u in zip(sessions, parsed):
        if not isinstance(s, Session):
            # Used once it answers: tried again in the background (revive_later).
            event(log, "multipath.path_down", logging.WARNING, portal=u.portal, error=s)
            down.append(u)
    paths = []
    try:
        for s, u in live:
            paths.append(await probe_path(s, u.lun))
        ids = {p.identity for p in paths}
        if None in ids or len(ids) != 1:
            raise MultipathError(f"paths lead to different logical units: {sorted(map(str, ids))}")
    except BaseException:
        await asyncio.gather(*(s.close() for s, _ in live), return_exceptions=True)
        raise
    mp = MultipathExecutor(paths, policy, no_path_timeout)
    mp._alua = any(p.alua is not None for p in paths)
    if mp._alua:
        try:
            await mp.refresh_alua()
        except ScsiError:
            mp._alua = False
            for p in paths:
                p.alua = None
    try:
        dev = await BlockDevice.open(mp, paths[0].lun)
    except BaseException:
        await mp.close()          # the sessions must not outlive a failed open
        raise

    async def opener(u):
        return await open_session(u, options=SessionOptions(**vars(opts)), initiator_name=initiator_name,
                                  keys=keys)
    for u in down:
        mp.revive_later(u, opener)
    return mp, dev
