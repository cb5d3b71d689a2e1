"""An initiator session (ErrorRecoveryLevel 0, one connection): commands in flight, recovery.

What this module does, with the rule it follows:

* login with :class:`~iscsi.initiator.login.InitiatorLogin` over a
  :class:`~iscsi.initiator.connection.Connection`;
* numbers commands with CmdSN and never sends a non-immediate one beyond MaxCmdSN
  (RFC 7143 §4.2.2.1) — the rest wait in order; ExpStatSN acknowledges status (§4.2.2.2);
* write data: immediate data in the command PDU and unsolicited Data-Out up to
  FirstBurstLength when ImmediateData / InitialR2T allow it (§3.2.4.2), then one
  Data-Out sequence per R2T (§11.8), each PDU ≤ the target's MaxRecvDataSegmentLength;
* read data: Data-In placed at its Buffer Offset, DataSN checked, status in the last
  Data-In (phase collapse, §11.7.4) or a SCSI Response; residuals (§11.4.5);
* NOP (§11.18/§11.19): answer target pings, ping an idle target, drop a dead connection;
* task management (§11.5), async messages (§11.9), logout (§11.14);
* session recovery (§6.3.5, §7.1 at ERL 0): on connection loss log in again with the
  *same ISID* and TSIH 0 (session reinstatement: the target discards the old session) and
  re-issue every unfinished command, with exponential backoff, for at most
  ``replacement_timeout`` seconds (open-iscsi's node.session.timeo.replacement_timeout,
  120 s) before failing them.

The public surface is :meth:`Session.execute` (await one command) and :meth:`Session.submit`
(callback style, used by the benchmark where a coroutine per I/O would be the bottleneck).
"""
from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from .. import pdu as P
from ..keys import format_portal
from ..log import event
from ..digest import crc32c as _crc, pack_digest
from .connection import BHS, Connection, open_connection
from .errors import (
    CommandTimeout, ConnectionLost, IscsiError, LoginError, LoginRedirect, ProtocolViolation,
    SessionFailed, TargetFailure, TaskAborted, TmfError, decode_sense,
)
from .login import InitiatorLogin, LoginConfig, LoginResult, random_isid
from .url import parse_portal

log = logging.getLogger("iscsi.initiator.session")

# Timers, open-iscsi's defaults (iscsid.conf) unless said otherwise.
#: node.conn[0].timeo.login_timeout
LOGIN_TIMEOUT = 15.0
#: node.conn[0].timeo.noop_out_interval / noop_out_timeout
NOOP_INTERVAL = 5.0
NOOP_TIMEOUT = 5.0
#: node.session.timeo.replacement_timeout: how long commands wait for a reconnect.
REPLACEMENT_TIMEOUT = 120.0
#: Reconnect backoff: first retry quickly (a restarted target is usually back within a
#: second), then double up to 5 s so a dead target is not hammered.
RECONNECT_FIRST_DELAY = 0.2
RECONNECT_MAX_DELAY = 5.0
#: A connection that dies sooner than this after its login counts as a flap: the next
#: recovery starts with the backoff grown, not at zero, so a target that accepts the login
#: and drops us again (crash loop, a command that kills it) is not hammered in a hot loop.
STABLE_CONNECTION = 5.0
#: Re-sends of one command after connection losses before it fails (Linux sd's
#: SD_MAX_RETRIES = 5): a command that takes the connection down every time it is sent
#: must end with an error, not reconnect forever with the caller waiting.
MAX_COMMAND_RETRIES = 5
#: Login redirects followed in one reconnect attempt (RFC 7143 §11.13.5 status 0101h/0102h);
#: a loop between two portals would otherwise never end.
MAX_REDIRECTS = 4
#: A TMF / logout / text exchange that takes longer than this means the target is stuck.
MGMT_TIMEOUT = 30.0
# An Async Message announcing a connection/session drop sets the wait before reconnecting;
# a loss more than this long after it (or after its Time2Retain, if longer) is not that drop.
ANNOUNCED_DROP_VALID = 10.0
#: The longest Time2Wait an Async Message may impose: DefaultTime2Wait's range is 0..3600
#: (RFC 7143 §13.15); Parameter2 is 16 bits, and 65535 s would park the session 18 hours.
MAX_TIME2WAIT = 3600.0
#: An ABORT TASK for a timed-out command unanswered this long means the target (or the
#: connection) is stuck: the connection is dropped and the session reinstated (ERL 0), as
#: open-iscsi escalates.  node.session.err_timeo.abort_timeout.
ABORT_TIMEOUT = 15.0
#: How long a logout waits for in-flight commands to drain when the target asks for it.
LOGOUT_DRAIN_MAX = 10.0
#: How often a text exchange looks again at a closed command window (rare; see _window_slot).
WINDOW_POLL = 0.01

SN_MASK = 0xFFFFFFFF
SN_HALF = 0x80000000
RESERVED = P.RESERVED_TAG

# Task attributes, RFC 7143 §11.3.1 / SAM-5.
ATTR_UNTAGGED, ATTR_SIMPLE, ATTR_ORDERED, ATTR_HEAD_OF_QUEUE, ATTR_ACA = 0, 1, 2, 3, 4

#: SCSI Command BHS (RFC 7143 §11.3) in one pack: the same bytes iscsi.pdu.ScsiCommandPdu
#: produces for a CDB of at most 16 bytes (cross-checked in the unit tests).
_CMD = struct.Struct(">BBBBIQIIII16s")
_NOP_OUT = P.Opcode.NOP_OUT


class State:
    NEW = "new"
    LOGGING_IN = "logging-in"
    LOGGED_IN = "logged-in"
    RECOVERING = "recovering"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass
class SessionOptions:
    login_timeout: float = LOGIN_TIMEOUT
    noop_interval: float = NOOP_INTERVAL      # 0 disables pings from our side
    noop_timeout: float = NOOP_TIMEOUT
    replacement_timeout: float = REPLACEMENT_TIMEOUT
    #: Fail in-flight commands at once on connection loss instead of retrying them after the
    #: reconnect (multipath sets this: another path can take them sooner).
    fail_fast: bool = False
    reconnect: bool = True
    command_timeout: float | None = None


class Task:
    """One SCSI command from submission to status.

    A finished task may be submitted again (the benchmark keeps one per queue slot) once its
    caller has reset ``done``, ``status``, ``next_datasn`` and ``received`` (and the rarely set
    ``sense_data``/``residual``/``underflow``/``overflow``/``exc``/``next_r2tsn``/``solicited``
    if they were set).  ``tries`` counts re-sends after a connection loss.

    ``received``: Data-In bytes placed so far.  Data-In comes in order (DataPDUInOrder and
    DataSequenceInOrder are Yes, RFC 7143 §13.18/§13.19), so it is also the Buffer Offset the
    next Data-In must carry, and at the status the residual follows from it (§11.4.5.2).
    ``next_r2tsn``/``solicited``: R2TSN expected next and bytes asked for by R2Ts (§11.8).
    """

    __slots__ = ("itt", "lun", "lun_field", "cdb", "read_len", "buf", "view", "out", "attr",
                 "cmdsn", "status", "sense_data", "residual", "underflow", "overflow",
                 "next_datasn", "cb", "exc", "response", "done", "tries", "sent",
                 "user", "received", "next_r2tsn", "solicited")

    def __init__(self, lun: int, cdb: bytes, read_len: int = 0, out: bytes | memoryview | None = None,
                 buf: bytearray | memoryview | None = None, attr: int = ATTR_SIMPLE,
                 cb: Callable[["Task"], None] | None = None) -> None:
        self.itt = RESERVED
        self.lun = lun
        self.lun_field = P.encode_lun(lun)
        self.cdb = cdb
        self.read_len = read_len
        if read_len and buf is None:
            buf = bytearray(read_len)
        self.buf = buf
        self.view = memoryview(buf) if buf is not None else None
        self.out = memoryview(out) if out is not None and not isinstance(out, memoryview) else out
        self.attr = attr
        self.cmdsn = 0
        self.status = -1
        self.sense_data = b""
        self.residual = 0
        self.underflow = False
        self.overflow = False
        self.next_datasn = 0
        self.received = 0
        self.next_r2tsn = 0
        self.solicited = 0
        self.cb = cb
        self.exc: BaseException | None = None
        self.response = 0
        self.done = False
        self.tries = 0
        self.sent = 0.0
        self.user: Any = None

    @property
    def data(self) -> memoryview:
        """Data-In actually transferred (read_len minus an underflow residual)."""
        if self.view is None:
            return memoryview(b"")
        n = self.read_len - self.residual if self.underflow else self.read_len
        return self.view[:max(0, n)]

    @property
    def sense(self):
        return decode_sense(self.sense_data) if self.sense_data else None

    def _reset_for_retry(self) -> None:
        self.itt = RESERVED
        self.status = -1
        self.sense_data = b""
        self.residual = 0
        self.underflow = self.overflow = False
        self.next_datasn = 0
        self.received = self.next_r2tsn = self.solicited = 0
        self.tries += 1


class Session:
    """One iSCSI session to one portal.  Create with :meth:`open` (logs in)."""

    def __init__(self, host: str, port: int, cfg: LoginConfig, options: SessionOptions | None = None,
                 *, isid: int | None = None) -> None:
        self.host, self.port = host, port
        self.cfg = cfg
        self.opts = options or SessionOptions()
        self.isid = isid if isid is not None else random_isid()
        self.loop = asyncio.get_running_loop()
        self.state = State.NEW
        #: Logged in over a connection: submit's fast path may run.
        self._ready = False
        self.conn: Connection | None = None
        self.login_result: LoginResult | None = None
        self.params = None
        self.tsih = 0
        # sequence numbers
        self._cmdsn = 1
        self._expcmdsn = 1
        self._maxcmdsn = 1
        self._expstatsn = 0
        self._itt = 0
        #: Header of the newest status PDU whose sequence numbers are not applied yet (apply_sn).
        self.sn_pending: tuple | None = None
        #: Header whose ExpCmdSN/MaxCmdSN are not applied yet (apply_sn, _apply_window).
        self._win_pending: tuple | None = None
        # tasks
        self._tasks: dict[int, Task] = {}
        self._waiting: deque[Task] = deque()
        self._mgmt: dict[int, asyncio.Future] = {}
        # negotiated, cached for the hot path
        self._max_send = 8192
        self._first_burst = 65536
        self._immediate = False
        self._initial_r2t = True
        # recovery and timers
        self._recovery: asyncio.Task | None = None
        self._keepalive: asyncio.Task | None = None
        self._aborters: set[asyncio.Task] = set()  # ABORT TASKs for commands whose caller gave up
        self._expired = False
        self._next_delay: float | None = None       # Time2Wait of an announced drop (§11.9.1)
        self._next_delay_until = 0.0                # ... valid until then
        self._ffp_since = 0.0            # loop time of the last successful login
        self._flap_delay = 0.0           # backoff carried from one recovery to the next
        self._last_error: BaseException | None = None   # why the last reconnect failed
        self._logged_in_at: tuple[str, int] | None = None   # address of the last login
        self._closing = False
        self.generation = 0          # bumps on every successful (re)login
        self.reconnects = 0
        self.listeners: list[Callable[[str, dict], None]] = []
        self.luns: list[int] | None = None      # last REPORT LUNS answer (see rescan)
        self._rescan: asyncio.Task | None = None
        self._renegotiation: asyncio.Task | None = None
        self._logout_task: asyncio.Task | None = None      # a logout the target asked for
        self._state_waiters: list[asyncio.Future] = []

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    async def open(cls, host: str, port: int, cfg: LoginConfig, options: SessionOptions | None = None,
                   **kw) -> "Session":
        s = cls(host, port, cfg, options, **kw)
        await s.login()
        return s

    @property
    def portal(self) -> str:
        return format_portal(self.host, self.port)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def queued(self) -> int:
        return len(self._tasks) + len(self._waiting)

    @property
    def is_up(self) -> bool:
        return self.state == State.LOGGED_IN

    def _emit(self, name: str, **info: Any) -> None:
        for cb in list(self.listeners):
            try:
                cb(name, info)
            except Exception:  # a listener bug must not break the session
                log.exception("session listener failed on %s", name)

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        conn = self.conn
        self._ready = state == State.LOGGED_IN and conn is not None
        for w in self._state_waiters:
            if not w.done():
                w.set_result(state)
        self._state_waiters.clear()
        self._emit("state", state=state)

    async def wait_state(self, *states: str, timeout: float) -> str:
        deadline = self.loop.time() + timeout
        while self.state not in states:
            fut = self.loop.create_future()
            self._state_waiters.append(fut)
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                raise asyncio.TimeoutError(f"session still {self.state}")
            await asyncio.wait_for(fut, remaining)
        return self.state

    async def login(self) -> LoginResult:
        """Connect and log in (first time or after a loss); sets up full feature phase.

        Login redirects (RFC 7143 §11.13.5) are followed: "moved permanently" (0102h) makes
        the new address this session's portal, "moved temporarily" (0101h) is used for this
        login only.  On a reconnect to the same portal the target portal group tag must not
        have changed (§13.9): another TPGT is another I_T nexus, so the old session would not
        be reinstated (its tasks and reservations stay behind); that login is refused.
        """
        if self.state == State.NEW:
            self._set_state(State.LOGGING_IN)
        host, port = self.host, self.port
        for _ in range(MAX_REDIRECTS + 1):
            try:
                return await self._login_at(host, port)
            except LoginRedirect as redirect:
                try:
                    host, port = parse_portal(redirect.address)
                except ValueError:
                    raise LoginError(f"{redirect} (not a usable address)", 1, redirect.status_detail) from None
                event(log, "session.login_redirect", portal=self.portal, to=f"{host}:{port}",
                      permanent=redirect.permanent)
                if redirect.permanent:
                    self.host, self.port = host, port
        raise LoginError(f"login to {self.portal}: more than {MAX_REDIRECTS} redirects", 1, 1)

    async def _login_at(self, host: str, port: int) -> LoginResult:
        name = format_portal(host, port)
        conn = await open_connection(host, port, timeout=self.opts.login_timeout, name=name)
        try:
            result = await asyncio.wait_for(self._login_on(conn), self.opts.login_timeout)
        except asyncio.TimeoutError:
            conn.abort("login timed out")
            raise ConnectionLost(f"login to {name} timed out after {self.opts.login_timeout:.0f}s") from None
        except BaseException:
            conn.abort("login failed")
            raise
        sp = result.params.session
        if not (sp.data_pdu_in_order and sp.data_sequence_in_order):
            conn.abort("out-of-order data negotiated")
            key = "DataPDUInOrder" if not sp.data_pdu_in_order else "DataSequenceInOrder"
            raise LoginError(f"login to {name}: {key}=No negotiated; this initiator places and checks "
                             f"Data-In in order (RFC 7143 §13.18/§13.19), do not set {key}=No")
        prev = self.login_result
        if prev is not None and (host, port) == self._logged_in_at:
            old = prev.target_keys.get("TargetPortalGroupTag")
            new = result.target_keys.get("TargetPortalGroupTag")
            if old is not None and new is not None and old != new:
                conn.abort("portal group tag changed")
                raise LoginError(f"login to {name}: target portal group tag changed from {old} to {new} "
                                 f"(RFC 7143 §13.9: not the same I_T nexus, the session cannot be reinstated)")
        if conn.closed:
            # The target dropped the connection right after its final Login Response (a
            # crash, a crash loop, a reset in between): that close reached a connection that
            # had no session to tell yet.  Taken as logged in, the session would sit on a
            # dead connection — every command queued for ever, the keepalive skipping closed
            # connections, no recovery running.  It is a failed login attempt instead.
            raise ConnectionLost(f"login to {name}: connection lost right after the login "
                                 f"({conn.close_reason})")
        self._logged_in_at = (host, port)
        self._enter_ffp(conn, result)
        return result

    async def _login_on(self, conn: Connection) -> LoginResult:
        itt = self._new_itt()
        login = InitiatorLogin(self.cfg, isid=self.isid, tsih=0, cid=0, cmdsn=self._cmdsn, itt=itt)
        req = login.start()
        while req is not None:
            conn.send_pdu(req)
            resp = await conn.recv_pdu(self.opts.login_timeout)
            if not isinstance(resp, P.LoginResponse):
                raise LoginError(f"unexpected {type(resp).__name__} during login")
            req = login.receive(resp)
        assert login.result is not None
        return login.result

    def _enter_ffp(self, conn: Connection, result: LoginResult) -> None:
        params = result.params
        self.login_result = result
        self.params = params
        self.tsih = result.tsih
        sp, cp = params.session, params.connection
        self._max_send = cp.max_send_data_segment_length
        self._first_burst = sp.first_burst_length
        self._immediate = sp.immediate_data
        self._initial_r2t = sp.initial_r2t
        self._expstatsn = (result.statsn + 1) & SN_MASK
        self.sn_pending = self._win_pending = None
        self._cmdsn = result.expcmdsn
        self._expcmdsn = result.expcmdsn
        self._maxcmdsn = result.maxcmdsn
        if ((result.maxcmdsn + 1 - result.expcmdsn) & SN_MASK) >= SN_HALF:
            # MaxCmdSN < ExpCmdSN - 1: not a window (§4.2.2.1 says ignore it), and taken as is
            # no valid MaxCmdSN would ever count as newer.  Room for one command: its answer
            # brings a real window.
            event(log, "session.login_window_invalid", logging.WARNING, portal=self.portal,
                  expcmdsn=result.expcmdsn, maxcmdsn=result.maxcmdsn)
            self._maxcmdsn = result.expcmdsn
        self.conn = conn
        self.generation += 1
        self._expired = False
        self._ffp_since = self.loop.time()
        self._last_error = None
        self._set_state(State.LOGGED_IN)
        self._ready = True  # also when the state was LOGGED_IN already (a new connection)
        event(log, "session.login", initiator=self.cfg.initiator_name, target=self.cfg.target_name,
              portal=self.portal, isid=f"{self.isid:012x}", tsih=self.tsih,
              digests=f"{cp.header_digest}/{cp.data_digest}", mrdsl=cp.max_send_data_segment_length,
              first_burst=sp.first_burst_length, max_burst=sp.max_burst_length,
              initial_r2t=sp.initial_r2t, immediate=sp.immediate_data, generation=self.generation)
        # Anything that arrived after the final Login Response is full-feature traffic.
        conn.start_ffp(self, header_digest=cp.header_digest, data_digest=cp.data_digest,
                       max_recv=cp.max_recv_data_segment_length)
        if self.opts.noop_interval > 0 and (self._keepalive is None or self._keepalive.done()):
            self._keepalive = self.loop.create_task(self._keepalive_loop())
        self._drain()

    async def close(self, *, logout: bool = True) -> None:
        """Log out (close the session, RFC 7143 §11.14) and stop; pending commands fail."""
        if self.state == State.CLOSED:
            return
        self._closing = True
        if self._recovery is not None:
            self._recovery.cancel()
        if logout and self.state == State.LOGGED_IN and self.conn is not None and not self.conn.closed:
            self._set_state(State.CLOSING)
            try:
                await self._logout(P.LogoutReason.CLOSE_SESSION)
            except (IscsiError, asyncio.TimeoutError) as exc:
                event(log, "session.logout_failed", logging.WARNING, portal=self.portal, error=exc)
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.conn is not None:
            self.conn.abort("session closed")
        self._fail_all(SessionFailed("session closed"))
        self._set_state(State.CLOSED)
        # The session's own tasks end before close() returns: a caller that closes and then
        # stops its loop (or checks for leaks) finds nothing of ours still pending.
        mine = asyncio.current_task()
        helpers = {t for t in (self._keepalive, self._recovery, self._rescan, self._renegotiation,
                               self._logout_task, *self._aborters)
                   if t is not None and t is not mine and not t.done()}
        for t in helpers:
            t.cancel()
        if helpers:
            await asyncio.wait(helpers)  # never raises their outcome; our own cancellation still propagates

    async def _logout(self, reason: int) -> P.LogoutResponse:
        conn = self.conn
        assert conn is not None
        itt = self._new_itt()
        fut = self.loop.create_future()
        self._mgmt[itt] = fut
        # A logout is sent as an immediate command (§11.14): CmdSN not advanced.
        conn.send_pdu(P.LogoutRequest(immediate=True, reason=reason, cid=0, cmdsn=self._cmdsn,
                                      expstatsn=self._expstatsn, itt=itt))
        try:
            resp = await asyncio.wait_for(fut, MGMT_TIMEOUT)
        finally:
            self._mgmt.pop(itt, None)
        conn.abort("logged out")
        event(log, "session.logout", portal=self.portal, response=resp.response)
        return resp

    # ------------------------------------------------------------------ numbering
    def _new_itt(self) -> int:
        itt = self._itt
        while True:
            itt = (itt + 1) & SN_MASK
            if itt != RESERVED and itt not in self._tasks and itt not in self._mgmt:
                self._itt = itt
                return itt

    def _window_open(self) -> bool:
        return ((self._maxcmdsn - self._cmdsn) & SN_MASK) < SN_HALF

    def _update_window(self, expcmdsn: int, maxcmdsn: int) -> None:
        """RFC 7143 §4.2.2.1: take newer ExpCmdSN/MaxCmdSN; ignore MaxCmdSN < ExpCmdSN - 1."""
        if ((maxcmdsn + 1 - expcmdsn) & SN_MASK) >= SN_HALF:
            return
        if ((maxcmdsn - self._maxcmdsn) & SN_MASK) < SN_HALF:
            self._maxcmdsn = maxcmdsn
        if ((expcmdsn - self._expcmdsn) & SN_MASK) < SN_HALF:
            self._expcmdsn = expcmdsn
        if self._waiting:
            self._drain()

    def _status_seen(self, statsn: int) -> None:
        if ((statsn + 1 - self._expstatsn) & SN_MASK) < SN_HALF:
            self._expstatsn = (statsn + 1) & SN_MASK

    # ------------------------------------------------------------------ submission
    def submit(self, task: Task) -> None:
        """Queue ``task``; ``task.cb(task)`` runs when it completes (status or ``task.exc``)."""
        cmdsn = self._cmdsn
        if self._ready and not self._waiting and ((self._maxcmdsn - cmdsn) & 0xFFFFFFFF) < 0x80000000:
            if task.out is None and len(task.cdb) <= 16:
                # Fast path (reads and no-data commands): _send's first branch, inlined.
                # Logged in, window open (§4.2.2.1 serial arithmetic); with a header digest the
                # BHS is followed by its CRC32C, least significant byte first (RFC 7143 §12.1).
                conn = self.conn
                tasks = self._tasks
                itt = (self._itt + 1) & 0xFFFFFFFF
                if itt in tasks or itt == RESERVED or itt in self._mgmt:
                    itt = self._new_itt()
                self._itt = itt
                task.itt = itt
                tasks[itt] = task
                task.cmdsn = cmdsn
                self._cmdsn = (cmdsn + 1) & 0xFFFFFFFF
                header = _CMD.pack(0x01, 0xC0 | task.attr if task.read_len else 0x80 | task.attr, 0, 0, 0,
                                   task.lun_field, itt, task.read_len, cmdsn, self._expstatsn, task.cdb)
                out = conn.out
                out.append(header)
                if conn.header_digest:
                    out.append(pack_digest(_crc(header)))
                if not conn.flush_pending:
                    conn.schedule_flush()
                return
            self._send(task)
            return
        if self.sn_pending is not None:
            self.apply_sn()      # a status earlier in this read may have opened the window
        if self._win_pending is not None:
            self._apply_window()
        state = self.state
        if state == State.LOGGED_IN and not self._closing:
            if not self._waiting and self._window_open():
                self._send(task)
            else:
                self._waiting.append(task)
                self._drain()
            return
        if state in (State.CLOSED, State.CLOSING) or self._closing:
            self._finish(task, SessionFailed("session closed"))
        elif state == State.RECOVERING and (self._expired or self.opts.fail_fast):
            self._finish(task, ConnectionLost(f"path {self.portal} is down") if self.opts.fail_fast
                         else SessionFailed(f"session to {self.portal} not recovered within "
                                            f"{self.opts.replacement_timeout:g}s"
                                            + (f" (last attempt: {self._last_error})"
                                               if self._last_error is not None else "")))
        else:
            self._waiting.append(task)

    async def execute(self, lun: int, cdb: bytes, *, read_len: int = 0,
                      data: bytes | bytearray | memoryview | None = None,
                      buf: bytearray | memoryview | None = None, attr: int = ATTR_SIMPLE,
                      timeout: float | None = None) -> Task:
        """Run one command; returns the finished :class:`Task` (status not checked here).

        Raises :class:`IscsiError` subclasses for transport-level failures.  Once this returns
        or raises, nothing writes ``buf`` any more, also when the await was cancelled or timed
        out.  ``data`` of a WRITE cancelled that way may still be read for Data-Out already
        queued on the socket: do not reuse it until the abort has completed (or the session
        has closed).
        """
        fut = self.loop.create_future()
        task = Task(lun, cdb, read_len, data, buf, attr, fut_cb(fut))
        self.submit(task)
        timeout = timeout if timeout is not None else self.opts.command_timeout
        try:
            if timeout is None:
                await fut
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout)
                except asyncio.TimeoutError:
                    await self._abort_quietly(task)
                    raise CommandTimeout(f"no status after {timeout:g}s for opcode 0x{cdb[0]:02x}") from None
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        if task.exc is not None:
            raise task.exc
        return task

    def _drain(self) -> None:
        waiting = self._waiting
        while waiting and self.state == State.LOGGED_IN and self._window_open():
            self._send(waiting.popleft())

    def _send(self, task: Task) -> None:
        conn = self.conn
        assert conn is not None
        tasks = self._tasks
        itt = (self._itt + 1) & SN_MASK
        if itt == RESERVED or itt in tasks or itt in self._mgmt:
            itt = self._new_itt()
        self._itt = itt
        task.itt = itt
        tasks[itt] = task
        cmdsn = self._cmdsn
        task.cmdsn = cmdsn
        self._cmdsn = (cmdsn + 1) & SN_MASK
        out = task.out
        cdb = task.cdb
        if out is None and not conn.header_digest and len(cdb) <= 16:
            # The common read / no-data command: one header, one buffer, no branches below.
            conn.send1(_CMD.pack(0x01, 0xC0 | task.attr if task.read_len else 0x80 | task.attr, 0, 0, 0,
                                 task.lun_field, itt, task.read_len, cmdsn, self._expstatsn, cdb))
            return
        read = task.read_len > 0
        edtl = len(out) if out is not None else task.read_len
        imm = 0
        final = True
        unsolicited = 0
        if out is not None and edtl:
            if self._initial_r2t:
                unsolicited = 0
                if self._immediate:
                    imm = min(edtl, self._first_burst, self._max_send)
            else:
                unsolicited = min(edtl, self._first_burst)
                if self._immediate:
                    imm = min(unsolicited, self._max_send)
                final = imm >= unsolicited
        if len(cdb) > 16:
            pdu = P.ScsiCommandPdu(read=read, write=out is not None, attr=task.attr, lun=task.lun_field,
                                   edtl=edtl, cmdsn=cmdsn, expstatsn=self._expstatsn, cdb=cdb, itt=itt,
                                   final=final, data=out[:imm] if imm else b"")
            conn.send_pdu(pdu)
        else:
            flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if out is not None else 0) | task.attr
            header = _CMD.pack(0x01, flags, 0, 0, imm, task.lun_field, itt, edtl, cmdsn,
                               self._expstatsn, cdb)
            if conn.header_digest:
                parts = conn.header_parts(header)
                if imm:
                    parts += conn.data_parts(out[:imm])
                conn.send(parts)
            elif imm:
                conn.send(conn.header_parts(header) + conn.data_parts(out[:imm]))
            else:
                conn.send((header,))
        if unsolicited > imm:
            self._send_data_out(task, RESERVED, imm, unsolicited - imm)

    def _send_data_out(self, task: Task, ttt: int, offset: int, length: int) -> None:
        """One Data-Out sequence (RFC 7143 §11.7): DataSN from 0, PDUs ≤ MaxXmitDataSegmentLength."""
        conn = self.conn
        assert conn is not None and task.out is not None
        out = task.out
        step = self._max_send
        end = offset + length
        datasn = 0
        parts: list = []
        pack = BHS.pack
        lun_field, itt, expstatsn = task.lun_field, task.itt, self._expstatsn
        while offset < end:
            n = min(step, end - offset)
            last = offset + n >= end
            header = pack(0x05, 0x80 if last else 0, 0, 0, n, lun_field, itt, ttt, 0, expstatsn, 0,
                          datasn, offset, 0)
            parts += conn.header_parts(header)
            parts += conn.data_parts(out[offset:offset + n])
            offset += n
            datasn += 1
        conn.send(parts)

    # ------------------------------------------------------------------ completion
    def _finish(self, task: Task, exc: BaseException | None = None) -> None:
        if task.done:
            return
        task.done = True
        task.exc = exc
        cb = task.cb
        if cb is not None:
            try:
                cb(task)
            except Exception:  # a caller's callback must not tear down the connection
                log.exception("task completion callback failed")

    def _fail_all(self, exc: BaseException) -> None:
        tasks = list(self._tasks.values()) + list(self._waiting)
        self._tasks.clear()
        self._waiting.clear()
        for t in tasks:
            self._finish(t, exc)
        for fut in self._mgmt.values():
            if not fut.done():
                fut.set_exception(exc)
        self._mgmt.clear()

    # ------------------------------------------------------------------ receive (Sink)
    def rx_data_in_dest(self, itt: int, offset: int, length: int, room: int = 0) -> memoryview | None:
        """Where a large Data-In payload goes: the task's buffer at Buffer Offset (§11.7.5).

        With ``room``, the view runs that many bytes past the payload when this is the last
        segment and the task's buffer is longer than read_len (those bytes are scratch).
        """
        task = self._tasks.get(itt)
        if task is None:
            return None
        if offset != task.received:
            raise ProtocolViolation(_misplaced(task, offset, length))
        view = task.view
        end = offset + length
        if end > task.read_len or view is None:
            if view is None:
                return None
            raise ProtocolViolation(f"Data-In beyond the expected length ({offset}+{length} > {task.read_len})")
        if room and end == task.read_len and len(view) >= end + room:
            return view[offset:end + room]
        return view[offset:end]

    def apply_sn(self) -> None:
        """Take the newest status PDU's StatSN now, its ExpCmdSN/MaxCmdSN when needed.

        Status PDUs only note their header in ``sn_pending``; the connection calls this once
        at the end of each read, so a read that completes 32 commands does the serial-number
        arithmetic once, not 32 times.  ExpStatSN (§4.2.2.2) is advanced here; the command
        window (§4.2.2.1) only when a command waits for it — :meth:`submit` applies it when the
        window it knows looks closed.  A value applied late is only an older acknowledgement
        or a smaller window for a moment: both on the safe side.
        """
        h = self.sn_pending
        if h is None:
            return
        self.sn_pending = None
        # The newest status PDU holds the highest StatSN (one more per status, in TCP order;
        # rx_pdu applies this before its own); the check keeps a confused target from moving
        # ExpStatSN back (§4.2.2.2).
        statsn = (h[8] + 1) & 0xFFFFFFFF
        if ((statsn - self._expstatsn) & 0xFFFFFFFF) < 0x80000000:
            self._expstatsn = statsn
        w = self._win_pending
        if w is None or ((h[10] - w[10]) & 0xFFFFFFFF) < 0x80000000:
            self._win_pending = h       # keep the one with the newest MaxCmdSN
        if self._waiting:
            self._apply_window()

    def _apply_window(self) -> None:
        h = self._win_pending
        if h is not None:
            self._win_pending = None
            self._update_window(h[9], h[10])

    @property
    def window(self) -> tuple[int, int]:
        """(ExpCmdSN, MaxCmdSN) as known now (RFC 7143 §4.2.2.1)."""
        self.apply_sn()
        self._apply_window()
        return self._expcmdsn, self._maxcmdsn

    def rx_data_in(self, h: tuple, payload: memoryview | None) -> None:
        # h: op, flags, _, status, lenword, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, datasn, offset, residual
        task = self._tasks.get(h[6])
        if task is None:
            return  # aborted or timed out meanwhile; its data is discarded
        if payload is not None:
            off = h[12]
            end = off + len(payload)
            if end > task.read_len or task.view is None:
                raise ProtocolViolation(f"Data-In beyond the expected length ({end} > {task.read_len})")
            if off != task.received:
                raise ProtocolViolation(_misplaced(task, off, len(payload)))
            task.view[off:end] = payload
            task.received = end
        else:
            # Received in place (rx_data_in_dest checked its Buffer Offset), or no data.
            task.received += h[4] & 0xFFFFFF
        datasn = h[11]
        if datasn != task.next_datasn:
            # ERL 0 cannot recover a lost Data-In (§7.1): drop the connection, the command is retried.
            raise ProtocolViolation(f"DataSN {datasn} where {task.next_datasn} was expected")
        flags = h[1]
        if not flags & 0x01:
            task.next_datasn = datasn + 1
            return
        # S bit: status in this PDU (phase collapse, §11.7.4); its sequence numbers are applied
        # by apply_sn at the end of the read.  next_datasn stays: the task ends here.
        if flags & 0x06 or task.received != task.read_len:
            if flags & 0x06 == 0x06:
                raise ProtocolViolation(BOTH_RESIDUALS)
            task.overflow = bool(flags & 0x04)
            task.underflow = bool(flags & 0x02)
            task.residual = h[13]
            if task.read_len:
                self._settle_residual(task, h[3])
        self.sn_pending = h
        task.status = h[3]
        del self._tasks[h[6]]
        self._finish(task)

    def rx_response(self, h: tuple, payload: bytes) -> None:
        # h: op, flags, response, status, lenword, _, itt, snacktag, statsn, expcmdsn, maxcmdsn,
        #    expdatasn, bidi_residual, residual
        flags = h[1]
        if flags & 0x06 == 0x06 or flags & 0x18 == 0x18:
            raise ProtocolViolation(BOTH_RESIDUALS)
        self.sn_pending = h        # applied by apply_sn at the end of the read
        task = self._tasks.pop(h[6], None)
        if task is None:
            return
        task.status = h[3]
        task.response = h[2]
        task.overflow = bool(flags & 0x04)
        task.underflow = bool(flags & 0x02)
        task.residual = h[13] if flags & 0x06 else 0
        if task.read_len and (task.received != task.read_len or flags & 0x06):
            self._settle_residual(task, h[3])
        if len(payload) >= 2:
            n = (payload[0] << 8) | payload[1]
            task.sense_data = payload[2:2 + n]
        if h[2] != 0:  # iSCSI response: target failure (§11.4.3)
            self._finish(task, TargetFailure(f"target failure (response 0x{h[2]:02x})"))
            return
        self._finish(task)

    def _settle_residual(self, task: Task, status: int) -> None:
        """A read's residual is what it says only when it matches the Data-In that came:
        RFC 7143 §11.4.5.2 defines it as EDTL minus the bytes sent.  A target that sent less
        than it reports (no U bit, or a residual too small) must not have the caller take the
        bytes it never sent (zeros, or what the buffer held) for data; one that reports less
        than it sent is taken at its bytes too.  Only GOOD status: with another the data is
        not the command's result, and many targets send CHECK CONDITION without a residual."""
        short = task.read_len - task.received
        said = task.residual if task.underflow else 0
        if short == said or status != 0:
            return
        event(log, "session.residual_mismatch", logging.WARNING, portal=self.portal, itt=task.itt,
              expected=task.read_len, received=task.received,
              residual=f"{'U' if task.underflow else 'O' if task.overflow else '-'}{task.residual}")
        if short > 0:
            task.underflow, task.overflow, task.residual = True, False, short
        else:
            task.underflow = False
            if not task.overflow:
                task.residual = 0

    def rx_r2t(self, h: tuple) -> None:
        # h: op, flags, _, _, lenword, lun, itt, ttt, statsn, expcmdsn, maxcmdsn, r2tsn, offset, length
        self._update_window(h[9], h[10])
        task = self._tasks.get(h[6])
        if task is None:
            return
        out = task.out
        if out is None or h[12] + h[13] > len(out) or h[13] == 0:
            raise ProtocolViolation(f"R2T for bytes {h[12]}+{h[13]} of a {len(out or b'')}-byte write")
        # R2TSN counts the task's R2Ts from 0 (§11.8.2); at ERL 0 none is repeated or lost, and
        # no byte is asked for twice (recovery R2Ts need ERL > 0, §7.1): together the R2Ts ask
        # for at most the write's length, so a target cannot make us send it again and again.
        if h[11] != task.next_r2tsn:
            raise ProtocolViolation(f"R2TSN {h[11]} where {task.next_r2tsn} was expected (RFC 7143 §11.8.2)")
        solicited = task.solicited + h[13]
        if solicited > len(out):
            raise ProtocolViolation(f"R2Ts ask for {solicited} bytes of a {len(out)}-byte write "
                                    f"(at ErrorRecoveryLevel 0 no byte is asked for twice)")
        task.next_r2tsn += 1
        task.solicited = solicited
        self._send_data_out(task, h[7], h[12], h[13])

    def rx_pdu(self, pdu: P.Pdu) -> None:
        if self.sn_pending is not None:
            self.apply_sn()     # statuses earlier in this read come first (StatSN order)
        maxcmdsn = getattr(pdu, "maxcmdsn", None)
        if maxcmdsn is not None:
            self._update_window(pdu.expcmdsn, maxcmdsn)
        if isinstance(pdu, P.NopIn):
            self._on_nop_in(pdu)
        elif isinstance(pdu, (P.TaskMgmtResponse, P.LogoutResponse, P.TextResponse)):
            self._status_seen(pdu.statsn)
            fut = self._mgmt.get(pdu.itt)
            if fut is not None and not fut.done():
                fut.set_result(pdu)
        elif isinstance(pdu, P.AsyncMessage):
            self._status_seen(pdu.statsn)
            self._on_async(pdu)
        elif isinstance(pdu, P.Reject):
            self._status_seen(pdu.statsn)
            self._on_reject(pdu)
        else:
            raise ProtocolViolation(f"unexpected {type(pdu).__name__} in full feature phase")

    def rx_lost(self, conn: Connection, exc: BaseException | None) -> None:
        if conn is not self.conn:
            return
        self.sn_pending = self._win_pending = None
        event(log, "session.connection_lost", logging.WARNING if not self._closing else logging.INFO,
              portal=self.portal, reason=exc, in_flight=len(self._tasks), queued=len(self._waiting))
        for fut in self._mgmt.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(str(exc)))
        self._mgmt.clear()
        if self._closing or self.state in (State.CLOSING, State.CLOSED):
            return
        unfinished = list(self._tasks.values())
        self._tasks.clear()
        if self.opts.fail_fast or not self.opts.reconnect:
            # fail_fast hands back the commands not sent yet as well (the window was closed):
            # multipath re-issues them on a path it trusts instead of on this one after its
            # reconnect, which may lead to another LU by then.
            unfinished += self._waiting
            self._waiting.clear()
            for t in unfinished:
                self._finish(t, ConnectionLost(f"connection to {self.portal} lost: {exc}"))
        else:
            # Re-issue in the order they were first sent, ahead of commands not yet sent;
            # one that has taken MAX_COMMAND_RETRIES connections down with it fails instead.
            for t in reversed(unfinished):
                if t.tries >= MAX_COMMAND_RETRIES:
                    self._finish(t, SessionFailed(
                        f"connection to {self.portal} lost {t.tries + 1} times while opcode "
                        f"0x{t.cdb[0]:02x} was outstanding; not sent again (last: {exc})"))
                    continue
                t._reset_for_retry()
                self._waiting.appendleft(t)
        if not self.opts.reconnect:
            self._fail_all(SessionFailed(f"connection to {self.portal} lost: {exc}"))
            self._set_state(State.CLOSED)
            return
        self._set_state(State.RECOVERING)
        if self._recovery is None or self._recovery.done():
            self._recovery = self.loop.create_task(self._recover())

    # ------------------------------------------------------------------ NOP
    def _on_nop_in(self, pdu: P.NopIn) -> None:
        if pdu.itt != RESERVED:  # answer to our ping (§11.19): StatSN advances
            self._status_seen(pdu.statsn)
            fut = self._mgmt.get(pdu.itt)
            if fut is not None and not fut.done():
                fut.set_result(pdu)
            return
        if pdu.ttt != RESERVED and self.conn is not None:
            # A ping from the target: answer with its TTT and LUN, ITT reserved, immediate (§11.18).
            # Its ping data is echoed, but never more than the target can receive (§13.12
            # MaxRecvDataSegmentLength): it may send us more than it takes itself.
            self.conn.send_pdu(P.NopOut(immediate=True, lun=pdu.lun, ttt=pdu.ttt, itt=RESERVED,
                                        cmdsn=self._cmdsn, expstatsn=self._expstatsn,
                                        data=pdu.data[:self._max_send]))

    async def ping(self, timeout: float = NOOP_TIMEOUT, data: bytes = b"") -> float:
        """NOP-Out with a reply requested; returns the round trip in seconds."""
        conn = self.conn
        if conn is None or self.state != State.LOGGED_IN:
            raise ConnectionLost("not logged in")
        itt = self._new_itt()
        fut = self.loop.create_future()
        self._mgmt[itt] = fut
        t0 = self.loop.time()
        conn.send_pdu(P.NopOut(immediate=True, itt=itt, ttt=RESERVED, cmdsn=self._cmdsn,
                               expstatsn=self._expstatsn, data=data))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._mgmt.pop(itt, None)
        return self.loop.time() - t0

    async def _keepalive_loop(self) -> None:
        """Ping when nothing came in for noop_interval; no byte for noop_timeout after = dead.

        "Nothing came in" is seen from the connection's byte counter, sampled every half
        interval, so the receive path does not read the clock per read.
        """
        interval, timeout = self.opts.noop_interval, self.opts.noop_timeout
        seen_conn: Connection | None = None
        seen_bytes = 0
        seen_at = self.loop.time()
        try:
            while not self._closing:
                await asyncio.sleep(interval / 2)
                conn = self.conn
                if conn is None or conn.closed or self.state != State.LOGGED_IN:
                    continue
                now = self.loop.time()
                if conn is not seen_conn or conn.bytes_in != seen_bytes:
                    seen_conn, seen_bytes, seen_at = conn, conn.bytes_in, now
                    continue
                if now - seen_at < interval:
                    continue
                before = conn.bytes_in
                try:
                    await self.ping(timeout)
                except asyncio.TimeoutError:
                    if conn.bytes_in == before and conn is self.conn and not conn.closed:
                        event(log, "session.nop_timeout", logging.WARNING, portal=self.portal,
                              timeout=timeout)
                        conn.abort(ConnectionLost(f"no answer to NOP-Out within {timeout:g}s"))
                except IscsiError:
                    pass
        except asyncio.CancelledError:
            pass

    # ------------------------------------------------------------------ async events, reject
    def _on_async(self, pdu: P.AsyncMessage) -> None:
        ev = pdu.event
        event(log, "session.async_event", portal=self.portal, async_event=ev, lun=P.decode_lun(pdu.lun),
              param1=pdu.param1, param2=pdu.param2, param3=pdu.param3)
        if ev == P.AsyncEvent.SCSI_ASYNC_EVENT:
            sense = decode_sense(pdu.data[2:]) if len(pdu.data) > 2 else None
            self._emit("scsi_event", lun=P.decode_lun(pdu.lun), sense=sense)
            if sense is not None and sense.asc_ascq == (0x3F, 0x0E):
                # REPORTED LUNS DATA HAS CHANGED (SPC-4 §6.33): rescan the inventory.
                self._emit("luns_changed", lun=P.decode_lun(pdu.lun))
                self.rescan_soon()
        elif ev == P.AsyncEvent.LOGOUT_REQUEST:
            # §11.9.1: log out within Parameter3 seconds; we drain, log out and log in again.
            self._logout_requested(pdu.param3 or LOGOUT_DRAIN_MAX)
        elif ev in (P.AsyncEvent.CONNECTION_DROP, P.AsyncEvent.SESSION_DROP):
            # The target will drop us; Parameter2 = Time2Wait before reconnecting.  It holds
            # for that drop only: a loss long after (the drop never came) waits as usual.
            self._next_delay = min(float(pdu.param2), MAX_TIME2WAIT)
            self._next_delay_until = self.loop.time() + max(float(pdu.param3), ANNOUNCED_DROP_VALID)
        elif ev == P.AsyncEvent.NEGOTIATION_REQUEST:
            # §11.9.1 event 4: the target wants a Text negotiation; an empty Text Request
            # lets it make its offers.  One at a time: a burst of requests is one exchange.
            if self._renegotiation is None or self._renegotiation.done():
                self._renegotiation = self.loop.create_task(self._renegotiate())
        self._emit("async", event=ev, lun=P.decode_lun(pdu.lun))

    def _logout_requested(self, within: float) -> None:
        """The target wants a logout (Async Message event 1, or a Reject "Waiting for
        Logout"): stop sending now — new commands wait in the queue until the new login —
        then drain what is in flight, log out and log in again."""
        if self.state != State.LOGGED_IN:
            return
        self._set_state(State.RECOVERING)
        self._logout_task = self.loop.create_task(self._requested_logout(self.conn, within))

    async def _requested_logout(self, conn: Connection | None, within: float) -> None:
        deadline = self.loop.time() + max(0.0, min(within, LOGOUT_DRAIN_MAX) - 0.5)
        while self._tasks and self.loop.time() < deadline and conn is self.conn and not conn.closed:
            await asyncio.sleep(0.01)
        if conn is None or conn.closed or conn is not self.conn:
            return
        try:
            await self._logout(P.LogoutReason.CLOSE_SESSION)
        except (IscsiError, asyncio.TimeoutError):
            conn.abort("logout requested by target")
        # rx_lost has moved unfinished tasks back to the queue and started recovery.
        if self._recovery is None or self._recovery.done():
            self._recovery = self.loop.create_task(self._recover())

    async def _renegotiate(self) -> None:
        try:
            await self.text_exchange([])
        except (IscsiError, asyncio.TimeoutError) as exc:
            event(log, "session.renegotiate_failed", logging.WARNING, portal=self.portal, error=exc)

    def _on_reject(self, pdu: P.Reject) -> None:
        if len(pdu.data) < P.BHS_LEN:
            # §11.17: the data segment holds the complete header of the rejected PDU.  Without
            # it the PDU, maybe a command now waiting for ever, cannot be named: at ERL 0
            # the connection goes, and session recovery re-issues what was outstanding.
            raise ProtocolViolation(f"Reject (reason 0x{pdu.reason:02x}) without the rejected PDU's "
                                    f"header ({len(pdu.data)} bytes, RFC 7143 §11.17)")
        rejected_itt = struct.unpack_from(">I", bytes(pdu.data), 16)[0]
        event(log, "session.reject", logging.WARNING, portal=self.portal, reason=pdu.reason,
              itt=rejected_itt)
        task = self._tasks.pop(rejected_itt, None)
        if task is not None:
            if pdu.reason == P.RejectReason.WAITING_FOR_LOGOUT and task.tries < MAX_COMMAND_RETRIES:
                # §11.9.1 event 1 / §11.17.1: refused, not carried out, because the target
                # waits for our logout.  It goes again after the logout and the new login.
                task._reset_for_retry()
                self._waiting.appendleft(task)
                self._logout_requested(LOGOUT_DRAIN_MAX)
                return
            self._finish(task, ProtocolViolation(f"target rejected the command (reason 0x{pdu.reason:02x})"))
        fut = self._mgmt.get(rejected_itt)
        if fut is not None and not fut.done():
            fut.set_exception(ProtocolViolation(f"target rejected the request (reason 0x{pdu.reason:02x})"))

    # ------------------------------------------------------------------ recovery
    async def _recover(self) -> None:
        """Session reinstatement with backoff until the replacement timeout (RFC 7143 §6.3.5).

        The timeout is a timer of its own: a reconnect attempt that hangs (a target that
        accepts TCP but never answers the login) does not hold the waiting commands past it.
        """
        start = self.loop.time()
        deadline = start + self.opts.replacement_timeout
        # A connection that died soon after its login: go on with the grown backoff.
        if start - self._ffp_since < STABLE_CONNECTION:
            self._flap_delay = min(max(self._flap_delay * 2, RECONNECT_FIRST_DELAY), RECONNECT_MAX_DELAY)
        else:
            self._flap_delay = 0.0
        delay = max(RECONNECT_FIRST_DELAY, self._flap_delay)
        attempt = 0
        expiry = None if self._expired else self.loop.call_at(deadline, self._expire)
        try:
            while not self._closing:
                if self._next_delay is not None and self.loop.time() <= self._next_delay_until:
                    wait = self._next_delay
                else:
                    wait = delay if attempt else self._flap_delay
                self._next_delay = None
                if wait:
                    await asyncio.sleep(wait)
                attempt += 1
                try:
                    await self.login()
                    self.reconnects += 1
                    event(log, "session.recovered", portal=self.portal, attempts=attempt,
                          seconds=round(self.loop.time() - start, 2), retried=len(self._waiting) + len(self._tasks))
                    self._emit("recovered", attempts=attempt)
                    return
                except (IscsiError, OSError, asyncio.TimeoutError) as exc:
                    self._last_error = exc
                    event(log, "session.reconnect_failed", logging.INFO, portal=self.portal,
                          attempt=attempt, error=exc)
                if attempt > 1:
                    delay = min(delay * 2, RECONNECT_MAX_DELAY)
        except asyncio.CancelledError:
            pass
        finally:
            if expiry is not None:
                expiry.cancel()

    def _expire(self) -> None:
        """The replacement timeout passed without a login: fail what waits, and what comes."""
        if self._expired or self.state != State.RECOVERING or self._closing:
            return
        self._expired = True
        why = f" (last attempt: {self._last_error})" if self._last_error is not None else ""
        event(log, "session.replacement_timeout", logging.ERROR, portal=self.portal,
              seconds=self.opts.replacement_timeout, failed=len(self._waiting), error=self._last_error)
        waiting = list(self._waiting)
        self._waiting.clear()
        for t in waiting:
            self._finish(t, SessionFailed(
                f"session to {self.portal} not recovered within {self.opts.replacement_timeout:g}s{why}"))
        self._emit("expired")

    # ------------------------------------------------------------------ LUN inventory
    def rescan_soon(self) -> None:
        if self._rescan is None or self._rescan.done():
            self._rescan = self.loop.create_task(self._rescan_quietly())

    async def _rescan_quietly(self) -> None:
        try:
            await self.rescan()
        except Exception as exc:  # a failed rescan is logged; I/O goes on
            event(log, "session.rescan_failed", logging.WARNING, portal=self.portal, error=exc)

    async def rescan(self) -> list[int]:
        """REPORT LUNS through LUN 0 (SPC-4 §6.33: every target answers it there); emits "luns"."""
        from .device import BlockDevice  # device builds on session, not the other way round
        luns = await BlockDevice(self, 0).report_luns()
        added = sorted(set(luns) - set(self.luns or []))
        removed = sorted(set(self.luns or []) - set(luns))
        self.luns = luns
        event(log, "session.rescan", portal=self.portal, luns=",".join(map(str, luns)),
              added=",".join(map(str, added)) or None, removed=",".join(map(str, removed)) or None)
        self._emit("luns", luns=luns, added=added, removed=removed)
        return luns

    # ------------------------------------------------------------------ task management
    async def task_management(self, function: int, lun: int = 0, rtt: int = RESERVED,
                              refcmdsn: int = 0, *, timeout: float = MGMT_TIMEOUT) -> int:
        """Send a TMF request (immediate, §11.5) and return the response code (§11.6.1)."""
        conn = self.conn
        if conn is None or self.state != State.LOGGED_IN:
            raise ConnectionLost("not logged in")
        itt = self._new_itt()
        fut = self.loop.create_future()
        self._mgmt[itt] = fut
        conn.send_pdu(P.TaskMgmtRequest(immediate=True, function=function, lun=P.encode_lun(lun), rtt=rtt,
                                        cmdsn=self._cmdsn, expstatsn=self._expstatsn, refcmdsn=refcmdsn,
                                        itt=itt))
        try:
            resp = await asyncio.wait_for(fut, timeout)
        finally:
            self._mgmt.pop(itt, None)
        event(log, "session.tmf", portal=self.portal, function=function, lun=lun, response=resp.response)
        return resp.response

    async def abort_task(self, task: Task, *, timeout: float = MGMT_TIMEOUT) -> bool:
        """ABORT TASK (§11.5.1 function 1); True if the task ended aborted, False if it had finished."""
        if task.done:
            return False
        if task.itt not in self._tasks:
            # Not sent yet: just take it out of the queue.
            try:
                self._waiting.remove(task)
            except ValueError:
                return False
            self._finish(task, TaskAborted("aborted before it was sent"))
            return True
        resp = await self.task_management(P.TmfFunction.ABORT_TASK, task.lun, task.itt, task.cmdsn,
                                          timeout=timeout)
        if resp not in (P.TmfResponse.COMPLETE, P.TmfResponse.TASK_DOES_NOT_EXIST):
            raise TmfError(f"ABORT TASK refused (response {resp})", resp)
        if not task.done:
            self._let_go(task, TaskAborted("aborted by ABORT TASK"))
            return True
        return False

    async def _abort_quietly(self, task: Task) -> None:
        conn = self.conn
        try:
            await self.abort_task(task, timeout=min(ABORT_TIMEOUT, MGMT_TIMEOUT))
        except asyncio.TimeoutError:
            if not task.done:
                self._let_go(task, CommandTimeout("command timed out; abort unanswered"))
            # Neither the command nor its ABORT TASK was answered: check the connection in
            # the background (the caller has its error now).
            if conn is not None and conn is self.conn and not conn.closed:
                checker = self.loop.create_task(self._check_alive(conn))
                self._aborters.add(checker)
                checker.add_done_callback(self._aborters.discard)
        except IscsiError:
            if not task.done:
                self._let_go(task, CommandTimeout("command timed out; abort failed"))

    async def _check_alive(self, conn: Connection) -> None:
        """After an unanswered ABORT TASK: a NOP-Out ping; no answer and not a byte received
        meanwhile = the target or the connection is stuck.  Drop it, as open-iscsi escalates
        a failed abort: recovery reinstates the session, which ends every task the target
        still holds (§6.3.5), instead of leaving each next command to time out the same way
        (the keepalive, when disabled, would never notice)."""
        before = conn.bytes_in
        timeout = self.opts.noop_timeout or NOOP_TIMEOUT
        try:
            await self.ping(timeout)
        except asyncio.TimeoutError:
            if conn is self.conn and not conn.closed and conn.bytes_in == before:
                event(log, "session.abort_timeout", logging.WARNING, portal=self.portal, timeout=timeout)
                conn.abort(ConnectionLost(f"no answer to ABORT TASK nor to a NOP-Out within {timeout:g}s"))
        except IscsiError:
            pass

    def _let_go(self, task: Task, exc: BaseException) -> None:
        """End a sent ``task`` here while the target may still answer it: its later Data-In
        and status are discarded (unknown ITT), and a payload arriving into its buffer right
        now is diverted, so nothing writes the caller's buffer once it has it back.

        A connection loss while the caller waited for its abort may have put the task back in
        the queue for re-sending after the reconnect (rx_lost): it leaves the queue too, or
        the command the caller was told failed would be carried out after all: a READ into
        a buffer handed back, a WRITE landing after its caller was told it failed."""
        if self._tasks.get(task.itt) is task:
            del self._tasks[task.itt]
        elif not task.done:
            try:
                self._waiting.remove(task)
            except ValueError:
                pass
        if self.conn is not None:
            self.conn.stop_receiving_into(task.itt)
        self._finish(task, exc)

    def _abandon(self, task: Task) -> None:
        """The caller's wait for ``task`` was cancelled.  Unsent, it just leaves the queue;
        sent, it is let go and the target is asked to abort it in the background (§11.5.1
        ABORT TASK), so a cancelled WRITE does not land later behind the caller's back."""
        if task.done:
            return
        if self._tasks.get(task.itt) is not task:
            try:
                self._waiting.remove(task)
            except ValueError:
                pass
            self._finish(task, TaskAborted("cancelled before it was sent"))
            return
        self._let_go(task, TaskAborted("cancelled by its caller"))
        aborter = self.loop.create_task(self._abort_abandoned(task.lun, task.itt, task.cmdsn))
        self._aborters.add(aborter)
        aborter.add_done_callback(self._aborters.discard)

    async def _abort_abandoned(self, lun: int, itt: int, cmdsn: int) -> None:
        try:
            await self.task_management(P.TmfFunction.ABORT_TASK, lun, itt, cmdsn)
        except (IscsiError, asyncio.TimeoutError) as exc:
            # The session is going or gone: the target ends the task with it (§6.3.5).
            event(log, "session.abort_failed", logging.INFO, portal=self.portal, itt=itt, error=exc)

    async def lun_reset(self, lun: int) -> None:
        """LOGICAL UNIT RESET (§11.5.1 function 5): every task on ``lun`` is ended by the target."""
        resp = await self.task_management(P.TmfFunction.LOGICAL_UNIT_RESET, lun)
        if resp != P.TmfResponse.COMPLETE:
            raise TmfError(f"LOGICAL UNIT RESET refused (response {resp})", resp)
        for itt, task in list(self._tasks.items()):
            if task.lun == lun:
                del self._tasks[itt]
                self._finish(task, TaskAborted("ended by LOGICAL UNIT RESET"))

    # ------------------------------------------------------------------ text (full feature phase)
    async def _window_slot(self, conn: Connection, deadline: float) -> None:
        """Return once a non-immediate PDU other than a SCSI command may take the next CmdSN
        (CmdSN <= MaxCmdSN, RFC 7143 §4.2.2.1).  Polled: only text exchanges wait here, and
        a target that keeps its window closed is rare; commands wait in ``_waiting``."""
        while True:
            self.apply_sn()        # what the last reads brought
            self._apply_window()
            if self._window_open():
                return
            if conn is not self.conn or conn.closed or self.state != State.LOGGED_IN:
                raise ConnectionLost("not logged in")
            if self.loop.time() >= deadline:
                raise asyncio.TimeoutError(f"command window closed (MaxCmdSN {self._maxcmdsn})")
            await asyncio.sleep(WINDOW_POLL)

    async def text_exchange(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """One Text Request/Response exchange (§11.10), following C-bit continuations."""
        from .. import keys as K
        conn = self.conn
        if conn is None or self.state != State.LOGGED_IN:
            raise ConnectionLost("not logged in")
        acc = K.TextAccumulator()
        itt = self._new_itt()
        ttt = RESERVED
        data = K.encode_text(pairs) if pairs else b""
        # Text Requests are non-immediate here, so they take a CmdSN (§11.10) and wait for
        # the command window like any command (§4.2.2.1).
        deadline = self.loop.time() + MGMT_TIMEOUT
        for _ in range(1024):  # bound: 1024 continuation PDUs = 8 MiB of text at 8 KiB each
            await self._window_slot(conn, deadline)
            fut = self.loop.create_future()
            self._mgmt[itt] = fut
            cmdsn = self._cmdsn
            self._cmdsn = (cmdsn + 1) & SN_MASK
            conn.send_pdu(P.TextRequest(final=True, itt=itt, ttt=ttt, cmdsn=cmdsn,
                                        expstatsn=self._expstatsn, data=data))
            try:
                resp = await asyncio.wait_for(fut, MGMT_TIMEOUT)
            finally:
                self._mgmt.pop(itt, None)
            try:
                whole = acc.append(resp.data, resp.cont)
                if whole is not None:
                    return K.parse_text(whole)
            except K.ProtocolError as exc:
                # Text that breaks §6.1 (no '=', not UTF-8, longer than we take): the
                # caller gets the session layer's error, not the text codec's.
                raise ProtocolViolation(f"Text Response from {self.portal}: {exc}") from None
            data = b""
            ttt = resp.ttt
        raise ProtocolViolation("text response never ends")


#: RFC 7143 §11.4.1 (SCSI Response) and §11.7.5 (Data-In): O and U are mutually exclusive.
BOTH_RESIDUALS = "status with both residual overflow and underflow (O and U bits, RFC 7143 §11.4.1)"


def _misplaced(task: Task, offset: int, length: int) -> str:
    return (f"Data-In at Buffer Offset {offset} (+{length}) where {task.received} was next "
            f"(DataPDUInOrder/DataSequenceInOrder=Yes, RFC 7143 §13.18/§13.19: no gaps, no overlays)")


def fut_cb(fut: asyncio.Future) -> Callable[[Task], None]:
    def done(task: Task) -> None:
        if not fut.done():
            fut.set_result(None)
    return done
