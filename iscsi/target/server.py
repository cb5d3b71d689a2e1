"""The iSCSI target server: portals, the session table, and session-wide operations.

:class:`IscsiServer` listens on any number of portals (IPv4 and IPv6), creates a
:class:`~iscsi.target.connection.TargetConnection` per TCP connection and keeps
the table of sessions keyed by (initiator name, ISID, target) for TSIH
allocation and session reinstatement (RFC 7143 §6.3.5).  The registry (the
daemon) answers who may see and log in to what.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from .. import keys as K
from ..keys import format_portal
from .. import pdu as P
from ..log import event
from ..scsi.types import ITNexus
from ..session import CommandWindow, sn_add, sn_le, sn_lt
from .connection import NOP_INTERVAL, NOP_TIMEOUT, TargetConnection
from .login import LoginError, LoginStatus, LoginSuccess, describe_params
from .registry import TargetRegistry

log = logging.getLogger("iscsi.target.server")

# Bound on concurrent sessions: each costs a few KiB idle, so this is about
# refusing a connection flood rather than memory (issue 6 asks for 256 to work).
MAX_SESSIONS = 4096
# Logout response Time2Wait/Time2Retain at ERL 0 (RFC 7143 §11.15.2/3): no
# connection recovery is offered, so retain 0; wait the open-iscsi default 2 s.
LOGOUT_TIME2WAIT = 2
LOGOUT_TIME2RETAIN = 0
# What the command window holds for a CmdSN an ABORT TASK declared received without its
# command (RFC 7143 §11.6.1 b; §11.5.5): delivered in turn, it runs nothing.
_NEVER_ARRIVED = object()
# Logout Response codes (RFC 7143 §11.15.1).
LOGOUT_CID_NOT_FOUND = 1
LOGOUT_RECOVERY_NOT_SUPPORTED = 2
# How long shutdown waits for in-flight commands before closing connections.
SHUTDOWN_DRAIN_TIMEOUT = 10.0
# How long shutdown then waits for the logouts it asked for (RFC 7143 §11.9.1 event 1);
# open-iscsi and libiscsi answer within a round trip, a peer that ignores it costs this much.
SHUTDOWN_LOGOUT_GRACE = 2.0


# The TTTs of our Text Responses with F=0 (§11.10.4): one asks for the rest of a request
# continued with C=1, the other carries on an exchange (the rest of our answer, or the next step
# of a request with F=0).  The initiator copies the one it got into its next request.
TEXT_TTT_MORE_REQUEST = 0x7FFF0000
TEXT_TTT_GO_ON = 0x7FFF0001


def _text_response(conn: TargetConnection, req: P.TextRequest, data: bytes, *, more: bool) -> None:
    """One piece of our answer to ``req``; ``more``: pieces of it are still to come (C bit).

    RFC 7143 §11.11.1: F=1 never answers a request with F=0 (the initiator means to go on);
    a response with F=0 carries a TTT the initiator echoes to get the rest (§11.11.4).
    """
    final = not more and req.final
    _send_text(conn, req, data, cont=more, ttt=P.RESERVED_TAG if final else TEXT_TTT_GO_ON)


def _send_text(conn: TargetConnection, req: P.TextRequest, data: bytes, *, cont: bool, ttt: int) -> None:
    """A Text Response; F=1 exactly when ``ttt`` is 0xffffffff (§11.11.1, §11.11.4).  The TTT
    of one with F=0 is the only one the next request of the exchange may carry."""
    final = ttt == P.RESERVED_TAG
    conn.text_ttt = None if final else ttt
    conn.send(P.TextResponse(itt=req.itt, cont=cont, final=final, ttt=ttt, data=data))


def _text_reset(conn: TargetConnection) -> None:
    """Forget the text exchange in progress: its half-sent request, the rest of our answer."""
    conn.text_in.reset()
    conn.text_out.clear()
    conn.text_ttt = None


class TargetSession:
    """One iSCSI session (MaxConnections=1, so one connection at a time)."""

    def __init__(self, server: "IscsiServer", ok: LoginSuccess, conn: TargetConnection) -> None:
        self.server = server
        self.initiator_name = ok.initiator_name
        self.initiator_alias = ok.initiator_alias
        self.session_type = ok.session_type
        self.target = ok.target
        self.target_name = ok.target.name if ok.target else ""
        self.isid = ok.isid
        self.tsih = ok.tsih
        self.tpgt = ok.tpgt
        self.params = ok.params
        self.luns = ok.grant.luns if ok.grant is not None else None
        self.window = CommandWindow(ok.cmdsn)
        self.first_cmdsn = self.window.expcmdsn
        self.logged_in_at = time.monotonic()
        self.connection: TargetConnection | None = conn
        self.offered = ok.offered
        self.answered = ok.answered
        self.nexus = ITNexus(
            # iSCSI names compare case-insensitively (RFC 3722, RFC 7143 §4.2.7.1) and the
            # TransportIDs of PERSISTENT RESERVE OUT are lower-cased: so is the nexus.
            initiator_port=f"{ok.initiator_name.lower()},i,0x{ok.isid:012x}",
            target_port=f"{self.target_name},t,0x{ok.tpgt:04x}",
            relative_port_id=ok.tpgt, target_port_group=ok.tpgt,
        )

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.initiator_name, self.isid, self.target_name)

    def connection_lost(self, conn: TargetConnection) -> None:
        if self.connection is conn:
            self.connection = None
            # ErrorRecoveryLevel 0, DefaultTime2Retain 0: the session ends with its
            # only connection (§6.3.5, §7.1.1); the I_T nexus is lost.
            self.server.end_session(self, reason="connection lost" if not conn.logging_out else "logout")

    # -- Text (SendTargets, negotiation in FFP) --------------------------------
    def text_request(self, conn: TargetConnection, req: P.TextRequest) -> None:
        acc = conn.text_in
        pending = conn.text_out
        if req.ttt == P.RESERVED_TAG:
            # §11.10.4: TTT 0xffffffff starts a new request; whatever text exchange was in
            # progress (its half-sent request, the rest of our answer) is reset.
            _text_reset(conn)
        elif (req.ttt, req.itt) != (conn.text_ttt, conn.text_itt):
            # §11.10.3/§11.10.4: a request going on with an exchange carries its ITT and copies
            # the TTT of our last response (F=0).  Another ITT, or a TTT we did not give (or no
            # longer stands: the exchange ended), is an invalid field (§11.17.1 reason 0x09,
            # "invalid TTT"); the exchange is dropped.
            _text_reset(conn)
            conn._reject(req, P.RejectReason.INVALID_PDU_FIELD)
            return
        if pending:
            if req.data:
                # The initiator asks for the rest of an answer cut with C=1 by an empty request
                # (§6.2, as at login); text in it could be neither answered nor told apart.
                _text_reset(conn)
                conn._reject(req, P.RejectReason.PROTOCOL_ERROR)
                return
            # Continuation of a long answer of ours (§11.11.1).
            _text_response(conn, req, pending.pop(0), more=bool(pending))
            return
        conn.text_itt = req.itt
        if req.cont and req.final:
            # §11.10.2: a Text Request with C=1 must have F=0.
            _text_reset(conn)
            conn._reject(req, P.RejectReason.PROTOCOL_ERROR)
            return
        answers: list[tuple[str, str]] = []
        declared: int | None = None
        try:
            complete = acc.append(req.data, req.cont)
            if complete is None:
                _send_text(conn, req, b"", cont=False, ttt=TEXT_TTT_MORE_REQUEST)
                return
            received = K.parse_text(complete)
            rest = []
            for key, value in received:
                if key == "SendTargets":
                    answers += self.send_targets(conn, value)
                else:
                    rest.append((key, value))
            if rest:
                negotiator = K.Negotiator("target", session_type=self.session_type, local={})
                answers += negotiator.respond(rest, phase="ffp")
                if "MaxRecvDataSegmentLength" in negotiator.peer_declared:
                    declared = int(negotiator.peer_declared["MaxRecvDataSegmentLength"])
        except K.ProtocolError:
            # Text too long, not key=value, a key twice (§6.2): the request is refused
            # (§11.17.1 reason 0x04) and the connection goes on; a text sequence in progress
            # is dropped.
            _text_reset(conn)
            conn._reject(req, P.RejectReason.PROTOCOL_ERROR)
            return
        text = K.encode_text(answers)
        chunks = K.split_text(text, conn.max_send_segment) if text else [b""]
        first, pending[:] = chunks[0], chunks[1:]
        _text_response(conn, req, first, more=bool(pending))
        if declared is not None:
            # §13.12: MaxRecvDataSegmentLength is declarative and may be declared again in
            # Full Feature Phase; PDUs we send from now on respect the new limit.
            conn.peer_max_recv_changed(declared)

    def send_targets(self, conn: TargetConnection, value: str) -> list[tuple[str, str]]:
        """RFC 7143 §13.3 / Appendix C: SendTargets=All | <target name> | (empty)."""
        registry = self.server.registry
        listed = registry.discovery_targets(self.initiator_name, conn.local[0], conn.local[1])
        if self.session_type == "Normal":
            # In a Normal session only the session's own target is reported (§13.3).
            wanted = self.target_name if value in ("", "All") else value
            listed = [(n, a) for n, a in listed if n == wanted == self.target_name]
        elif value not in ("All", ""):
            listed = [(n, a) for n, a in listed if n == value]
        elif value == "":
            listed = []
        out: list[tuple[str, str]] = []
        for name, addresses in listed:
            out.append(("TargetName", name))
            out += [("TargetAddress", a) for a in addresses]
        return out

    # -- Task management (§11.5) -----------------------------------------------
    async def task_management(self, conn: TargetConnection, req: P.TaskMgmtRequest) -> None:
        """RFC 7143 §11.5.1 functions; SCSI side effects (UAs, resets) go to the LU (SAM-5 §7)."""
        fn = req.function
        lun = P.decode_lun(req.lun)
        R = P.TmfResponse
        response = R.COMPLETE
        luns = self.luns
        lu = luns.get(lun) if luns is not None else None
        if fn == P.TmfFunction.ABORT_TASK:
            task = conn.tasks.get(req.rtt)
            if task is not None and task.lun == lun:
                conn.abort_tasks(lambda t: t is task, by_tmf=True)
            elif self._never_arrived(req):
                # §11.6.1 b): the task's command never reached us but its RefCmdSN is in
                # the window, below the TMF's own CmdSN: that CmdSN counts as received (the
                # gap closes and the commands held behind it run) and the abort is complete.
                window = self.window
                for item in window.arrive(req.refcmdsn, _NEVER_ARRIVED):
                    conn._run_in_order(item)
            else:
                # §11.6.1 c): a task we do not have, RefCmdSN outside the window: it was
                # never received or has already completed.
                response = R.TASK_DOES_NOT_EXIST
        elif fn == P.TmfFunction.ABORT_TASK_SET:
            if lu is None:
                response = R.LUN_DOES_NOT_EXIST
            else:
                conn.abort_tasks(lambda t: t.lun == lun, by_tmf=True)
                lu.abort_task_set(self.nexus)
        elif fn == P.TmfFunction.CLEAR_TASK_SET:
            if lu is None:
                response = R.LUN_DOES_NOT_EXIST
            else:
                affected = self.server.abort_tasks_everywhere(lu)
                luns.clear_task_set(lun, self.nexus, affected)
        elif fn == P.TmfFunction.LOGICAL_UNIT_RESET:
            if lu is None:
                response = R.LUN_DOES_NOT_EXIST
            else:
                self.server.abort_tasks_everywhere(lu)
                luns.lun_reset(lun)
        elif fn in (P.TmfFunction.TARGET_WARM_RESET, P.TmfFunction.TARGET_COLD_RESET) and \
                not getattr(self.target, "target_reset", True):
            # The admin turned target resets off (config target_reset): one initiator may not
            # reset every LU, or end every session, of the target for all (§11.6.1 response 6).
            response = R.AUTHORIZATION_FAILED
        elif fn in (P.TmfFunction.TARGET_WARM_RESET, P.TmfFunction.TARGET_COLD_RESET):
            # RFC 7143 §11.5.1: a target reset "cancels all pending operations across all
            # LUs known to the issuing initiator" -- the LUs its ACL maps (SAM access controls:
            # no change to an LU it is denied).  Tasks another initiator has on an LU this one
            # cannot reach are not its to abort: they were aborted silently (no response, no
            # unit attention: that LU is not reset) and the other initiator's I/O hung.
            self.server.abort_tasks_on(luns.logical_units() if luns is not None else [])
            if fn == P.TmfFunction.TARGET_WARM_RESET:
                luns.warm_reset()
            else:
                luns.cold_reset()
                conn.send(P.TaskMgmtResponse(itt=req.itt, response=R.COMPLETE))
                # §11.5.1: after a cold reset the target closes every connection of the target.
                for other in list(self.server.session_table.values()):
                    if other.target_name == self.target_name and other.connection is not None:
                        other.connection.close()
                event(log, "tmf", initiator=self.initiator_name, function=int(fn), lun=lun, response=0)
                return
        elif fn == P.TmfFunction.TASK_REASSIGN:
            response = R.REASSIGNMENT_NOT_SUPPORTED  # ErrorRecoveryLevel 0 (§11.5.1)
        else:
            response = R.NOT_SUPPORTED  # CLEAR ACA: NormACA is not supported
        event(log, "tmf", initiator=self.initiator_name, function=int(fn), lun=lun, response=int(response))
        conn.send(P.TaskMgmtResponse(itt=req.itt, response=response))

    def _never_arrived(self, req: P.TaskMgmtRequest) -> bool:
        """RefCmdSN of an ABORT TASK names a CmdSN the window still waits for, below the
        TMF's own CmdSN (RFC 7143 §11.6.1 b)."""
        window = self.window
        ref = req.refcmdsn
        return (window.in_window(ref)  # (a held command's CmdSN is not in it: it did arrive)
                and sn_lt(ref, req.cmdsn) and sn_le(req.cmdsn, sn_add(window.expcmdsn, window.depth)))

    # -- Logout (§11.14) ---------------------------------------------------------
    async def logout(self, conn: TargetConnection, req: P.LogoutRequest) -> None:
        if req.reason != P.LogoutReason.CLOSE_SESSION and req.cid != conn.cid:
            # §11.14.1: the CID names the connection to close or remove; this session has
            # only ``conn`` (MaxConnections=1), so another CID is not found (§11.15.1
            # response 1) and nothing is closed.
            conn.send(P.LogoutResponse(itt=req.itt, response=LOGOUT_CID_NOT_FOUND))
            return
        if req.reason == P.LogoutReason.REMOVE_CONNECTION_FOR_RECOVERY:
            # Connection recovery is not supported at ERL 0 (§11.15.1 response 2); the
            # connection stays in use.
            conn.send(P.LogoutResponse(itt=req.itt, response=LOGOUT_RECOVERY_NOT_SUPPORTED))
            return
        conn.logging_out = True
        # Let commands already running finish before the response (§6.3.4: all
        # outstanding commands complete or are terminated before logout response).
        pending = [t.future for t in conn.tasks.values() if t.future is not None and not t.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_DRAIN_TIMEOUT)
            if self.connection is not conn:
                # While we waited, a login with this TSIH and CID reinstated the connection
                # (§6.3.4): the old one, this Logout with it, was terminated, and the session
                # lives on the new one -- ending it now would take it from the tables (and its
                # nexus from the LUs) under a connection that goes on using it.
                return
        # The session ends now, before the response: an initiator that logs straight
        # back in must not find its old nexus still holding a RESERVE(6) (SAM-5 §6.3.4).
        self.server.end_session(self, reason="logout")
        conn.send(P.LogoutResponse(itt=req.itt, response=0, time2wait=LOGOUT_TIME2WAIT,
                                   time2retain=LOGOUT_TIME2RETAIN))
        event(log, "logout", initiator=self.initiator_name, target=self.target_name,
              isid=f"{self.isid:012x}", tsih=self.tsih)
        conn.close()

    def describe(self) -> dict[str, Any]:
        conn = self.connection
        return {
            "target": self.target_name,
            "initiator": self.initiator_name,
            "alias": self.initiator_alias,
            "type": self.session_type,
            "isid": f"{self.isid:012x}",
            "tsih": self.tsih,
            "tpgt": self.tpgt,
            "connections": [] if conn is None else [{
                "cid": conn.cid,
                "peer": format_portal(*conn.peer),
                "local": format_portal(*conn.local),
                "tasks": len(conn.tasks),
                "params": describe_params(self.params),
            }],
            "stats": self.stats(),
        }

    def stats(self) -> dict[str, int | float]:
        """Counters since login, for ``iscsi-target status`` and ``stats`` (rates are the
        difference of two samples): commands numbered by CmdSN (immediate ones, which take
        no CmdSN, are not counted), bytes received and sent by its connection, data digest
        errors, and seconds since login."""
        conn = self.connection
        return {
            "commands": (self.window.expcmdsn - self.first_cmdsn) & 0xFFFFFFFF,
            "rx_bytes": conn.rx_bytes if conn is not None else 0,
            "tx_bytes": conn.tx_bytes if conn is not None else 0,
            "data_digest_errors": conn.data_digest_errors if conn is not None else 0,
            "seconds": round(time.monotonic() - self.logged_in_at, 3),
        }


class IscsiServer:
    """All portals and sessions of one daemon."""

    def __init__(self, registry: TargetRegistry, *, nop_interval: float = NOP_INTERVAL,
                 nop_timeout: float = NOP_TIMEOUT) -> None:
        self.registry = registry
        self.nop_interval = nop_interval
        self.nop_timeout = nop_timeout
        # Large READs sent with sendfile (iscsi/scsi/zerocopy.py); SANSTACK_ZERO_COPY=0 turns
        # it off (for A/B measurements, or a filesystem whose sendfile misbehaves).
        self.zero_copy = os.environ.get("SANSTACK_ZERO_COPY", "1") != "0"
        self.portals: dict[tuple[str, int], asyncio.base_events.Server] = {}
        self.session_table: dict[tuple[str, int, str], TargetSession] = {}
        self.by_tsih: dict[int, TargetSession] = {}
        self.connections: set[TargetConnection] = set()
        self._next_tsih = 1
        self.accepting = True

    # -- portals -------------------------------------------------------------
    async def add_portal(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port; returns the bound address (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = await loop.create_server(lambda: TargetConnection(self), host=host, port=port,
                                          family=family, reuse_address=True, backlog=256)
        for sock in server.sockets:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover
                pass
        bound = server.sockets[0].getsockname()
        key = (host, bound[1])
        self.portals[key] = server
        event(log, "portal.listen", portal=format_portal(host, bound[1]))
        return key

    async def remove_portal(self, host: str, port: int) -> None:
        server = self.portals.pop((host, port), None)
        if server is None:
            raise KeyError(f"no portal {format_portal(host, port)}")
        server.close()
        await server.wait_closed()
        event(log, "portal.closed", portal=format_portal(host, port))

    # -- sessions ------------------------------------------------------------
    def allocate_tsih(self, isid: int, initiator: str, target: str, tsih: int, cid: int) -> int:
        """Called by the login just before Full Feature Phase (RFC 7143 §6.3.5)."""
        if not self.accepting:
            raise LoginError(LoginStatus.SERVICE_UNAVAILABLE, "target is shutting down")
        if tsih == 0:
            if len(self.by_tsih) >= MAX_SESSIONS:  # Discovery sessions count too
                raise LoginError(LoginStatus.OUT_OF_RESOURCES, "too many sessions")
            # New session; an existing one with the same ISID is reinstated in bind_session.
            for _ in range(0x10000):
                candidate = self._next_tsih
                self._next_tsih = candidate % 0xFFFF + 1  # TSIH 0 is reserved
                if candidate not in self.by_tsih:
                    return candidate
            raise LoginError(LoginStatus.OUT_OF_RESOURCES, "no free TSIH")
        existing = self.by_tsih.get(tsih)
        if existing is None or existing.key != (initiator, isid, target):
            raise LoginError(LoginStatus.SESSION_DOES_NOT_EXIST, f"no session with TSIH {tsih}")
        old = existing.connection
        if old is not None and old.cid != cid:
            raise LoginError(LoginStatus.TOO_MANY_CONNECTIONS, "MaxConnections=1")
        return tsih

    def bind_session(self, conn: TargetConnection, ok: LoginSuccess) -> TargetSession:
        key = (ok.initiator_name, ok.isid, ok.target.name if ok.target else "")
        existing = self.by_tsih.get(ok.tsih)
        if existing is not None and existing.key == key:
            # Connection reinstatement (same TSIH, same CID): the old connection goes.
            old = existing.connection
            existing.connection = conn
            if old is not None and old is not conn:
                # Its tasks go while it still names the session: each gives back its place
                # in the shared command window (else MaxCmdSN shrinks for good).
                old.abort_tasks(lambda t: True)
                old.session = None
                old.abort_connection()
            # The session's only connection is replaced and every task of it ended: the
            # command stream goes on from the login's CmdSN, the next one the initiator
            # uses (§11.12.8) and the ExpCmdSN the login response announced.  Commands the
            # old connection lost, or held behind such a gap, can never come now; waiting
            # for them would hang the session.
            window = existing.window
            window.pending.clear()
            window.expcmdsn = ok.cmdsn
            return existing
        previous = self.session_table.get(key)
        if previous is not None and ok.session_type == "Normal":
            # Session reinstatement (§6.3.5): same initiator port, TSIH 0 → the old
            # session is closed and its tasks are aborted.
            event(log, "session.reinstated", initiator=ok.initiator_name, isid=f"{ok.isid:012x}",
                  old_tsih=previous.tsih, new_tsih=ok.tsih)
            old = previous.connection
            self.end_session(previous, reason="reinstated")
            if old is not None:
                old.session = None
                old.abort_tasks(lambda t: True)
                old.abort_connection()
        session = TargetSession(self, ok, conn)
        if ok.session_type == "Normal":
            self.session_table[key] = session
        self.by_tsih[ok.tsih] = session
        if session.luns is not None:
            session.luns.nexus_joined(session.nexus)  # shared from the login on, not the first command
        return session

    def end_session(self, session: TargetSession, reason: str) -> None:
        if self.session_table.get(session.key) is session:
            del self.session_table[session.key]
        if self.by_tsih.get(session.tsih) is session:
            del self.by_tsih[session.tsih]
            if session.luns is not None:
                session.luns.nexus_lost(session.nexus)
            event(log, "session.end", initiator=session.initiator_name, target=session.target_name,
                  tsih=session.tsih, reason=reason)

    def abort_tasks_everywhere(self, lu: Any) -> list[ITNexus]:
        """Abort tasks on logical unit ``lu`` in every session (LUN RESET, CLEAR TASK SET).

        Returns the nexuses that lost tasks (they get COMMANDS CLEARED BY ANOTHER INITIATOR).
        """
        affected = []
        for session in list(self.session_table.values()):
            conn = session.connection
            if conn is None or session.luns is None:
                continue
            if conn.abort_tasks(lambda t, s=session: s.luns.get(t.lun) is lu, by_tmf=True):
                affected.append(session.nexus)
        return affected

    def abort_tasks_on(self, lus: list[Any]) -> None:
        """Abort, in every session, the tasks on any of ``lus`` (a target reset of the LUs one
        initiator may reach; RFC 7143 §11.5.1)."""
        if not lus:
            return
        reset = {id(lu) for lu in lus}
        for session in list(self.session_table.values()):
            conn = session.connection
            if conn is None or session.luns is None:
                continue
            conn.abort_tasks(lambda t, s=session: id(s.luns.get(t.lun)) in reset, by_tmf=True)

    def abort_tasks_of_nexuses(self, lu: Any, patterns: list[ITNexus]) -> None:
        """Abort the tasks on ``lu`` of every session whose nexus one of ``patterns`` names."""
        from ..scsi.pr import nexus_matches

        for session in list(self.session_table.values()):
            conn = session.connection
            if conn is None or session.luns is None:
                continue
            if any(nexus_matches(p, session.nexus) for p in patterns):
                # Aborted by another nexus (PREEMPT AND ABORT): Data-Out still answering their
                # R2Ts is dropped quietly, as after CLEAR TASK SET (SAM-5 §5.6, RFC 7143 §11.6.2).
                conn.abort_tasks(lambda t, s=session: s.luns.get(t.lun) is lu, by_tmf=True)

    def sessions_info(self) -> list[dict[str, Any]]:
        seen = set()
        out = []
        for session in list(self.by_tsih.values()):
            if id(session) not in seen:
                seen.add(id(session))
                out.append(session.describe())
        return out

    def sessions(self) -> list[dict[str, Any]]:
        """Status rows for the admin CLI: one per session, with its connection and parameters."""
        return self.sessions_info()

    async def drop_sessions(self, target: str | None = None, initiator: str | None = None,
                            tsih: int | None = None) -> int:
        """End the sessions of ``target`` (of ``initiator`` only, and the one with ``tsih``
        only, if given): the admin removed the target, took the initiator's access away, or
        asked for it (``iscsi-target session drop``).

        Each is told first (RFC 7143 §11.9.1 AsyncEvent 3, "all connections of this session
        will be dropped", Time2Retain 0: nothing to reinstate), then closed once that is
        written, so the initiator stops sending instead of finding a reset connection."""
        dropped = 0
        for session in list(self.by_tsih.values()):
            if (target is None or session.target_name == target) and \
               (initiator is None or session.initiator_name == initiator) and \
               (tsih is None or session.tsih == tsih):
                conn = session.connection
                if conn is not None:
                    if conn.backlogged:
                        # The peer is not reading: the message would wait behind READ data
                        # it may never take, holding ranges of an image being removed.
                        conn.abort_connection()
                    else:
                        if session.session_type == "Normal" and not conn.closed:
                            wait = getattr(getattr(session.params, "session", None), "default_time2wait", 2)
                            conn.send(P.AsyncMessage(event=P.AsyncEvent.SESSION_DROP, param2=int(wait),
                                                     param3=0))
                        conn.close()
                dropped += 1
        return dropped

    def notify_luns_changed(self, target: str, maps: list | None = None) -> None:
        """Tell logged-in initiators of ``target`` that their LUN inventory changed (§11.9.1
        event 0): those whose session uses one of ``maps`` (every session of the target when
        None).  An initiator whose own ACL map did not change is not made to rescan."""
        from ..scsi.sense import REPORTED_LUNS_DATA_HAS_CHANGED, SenseKey, build_sense

        sense = build_sense(SenseKey.UNIT_ATTENTION, REPORTED_LUNS_DATA_HAS_CHANGED)
        for session in list(self.session_table.values()):
            conn = session.connection
            if maps is not None and not any(session.luns is m for m in maps):
                continue
            if session.target_name == target and conn is not None:
                conn.send(P.AsyncMessage(event=P.AsyncEvent.SCSI_ASYNC_EVENT,
                                         data=P.ScsiResponse.sense_segment(sense)))

    async def shutdown(self, drain_timeout: float = SHUTDOWN_DRAIN_TIMEOUT) -> None:
        """Stop accepting, ask initiators to log out, let in-flight commands finish, close."""
        self.accepting = False
        for key in list(self.portals):
            server = self.portals.pop(key)
            server.close()
        for session in list(self.by_tsih.values()):
            conn = session.connection
            if conn is not None and session.session_type == "Normal":
                # §11.9.1 event 1: the target requests a logout within Parameter3 seconds.
                conn.send(P.AsyncMessage(event=P.AsyncEvent.LOGOUT_REQUEST, param3=int(drain_timeout)))
        deadline = asyncio.get_running_loop().time() + drain_timeout
        pending = [t.future for c in list(self.connections) for t in c.tasks.values()
                   if t.future is not None and not t.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=drain_timeout)
        # Give the initiators a moment to log out as asked (a clean session end on their
        # side, instead of a connection loss they retry): bounded, idle peers do not answer.
        grace = min(SHUTDOWN_LOGOUT_GRACE, max(0.0, deadline - asyncio.get_running_loop().time()))
        for _ in range(int(grace / 0.05)):
            if not any(s.session_type == "Normal" and s.connection is not None
                       for s in self.by_tsih.values()):
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        await asyncio.sleep(0)
