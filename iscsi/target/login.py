"""Target side of the iSCSI login phase, without I/O (RFC 7143 §6, §11.12, §11.13).

One :class:`TargetLogin` per new TCP connection.  The connection feeds it every
Login Request PDU and sends back what :meth:`TargetLogin.receive` returns.
When ``outcome`` is set, the login is over: either a :class:`LoginSuccess`
(the connection goes to Full Feature Phase) or a :class:`LoginFailure` (the
failure response has been produced; the connection is then closed, §6.7).

Stages (CSG/NSG, §11.12.3): 0 = SecurityNegotiation, 1 = LoginOperationalNegotiation,
3 = FullFeaturePhase.  Allowed moves form the table ``_TRANSITIONS``; anything
else is a protocol error answered with status 0x0200 / 0x020B.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from .. import keys as K
from .. import pdu as P
from .. import auth as A
from ..auth import AuthState, ChapTargetAuth
from ..log import event
from .registry import AccessGrant, ChapCredentials, TargetAccess, TargetRegistry
from ..keys import format_portal
from .config import ConfigError, canonical_iscsi_name

log = logging.getLogger("iscsi.target.login")

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
# Legal (current stage → next stage) moves when T=1 (RFC 7143 §6.3, §11.12.3).
_TRANSITIONS = {SECURITY: {OPERATIONAL, FULL_FEATURE}, OPERATIONAL: {FULL_FEATURE}}

# The only iSCSI version there is (RFC 7143 §11.12.4: Version-max/min 0x00).
ISCSI_VERSION = 0x00
# A login that has not reached Full Feature Phase after this many PDUs is a peer
# looping on us (a real login needs ≤ 6: security, CHAP_A, CHAP_N/R, operational, …).
MAX_LOGIN_PDUS = 64
# Total text a login may accumulate across C-bit continuations (8 PDUs of 8 KiB).
MAX_LOGIN_TEXT = 65536


# Login Response status codes (RFC 7143 §11.13.5) live with the key rules.
LoginStatus = K.LoginStatus


def describe_params(neg: "K.Negotiated") -> dict[str, str]:
    """The values in force, by RFC key name, for logs and the admin status output."""
    s, c = neg.session, neg.connection
    yes = lambda b: "Yes" if b else "No"  # noqa: E731
    return {
        "HeaderDigest": "CRC32C" if c.header_digest else "None",
        "DataDigest": "CRC32C" if c.data_digest else "None",
        "MaxRecvDataSegmentLength": str(c.max_recv_data_segment_length),
        "MaxXmitDataSegmentLength": str(c.max_send_data_segment_length),
        "InitialR2T": yes(s.initial_r2t), "ImmediateData": yes(s.immediate_data),
        "FirstBurstLength": str(s.first_burst_length), "MaxBurstLength": str(s.max_burst_length),
        "MaxOutstandingR2T": str(s.max_outstanding_r2t), "MaxConnections": str(s.max_connections),
        "ErrorRecoveryLevel": str(s.error_recovery_level),
        "DefaultTime2Wait": str(s.default_time2wait), "DefaultTime2Retain": str(s.default_time2retain),
        "DataPDUInOrder": yes(s.data_pdu_in_order), "DataSequenceInOrder": yes(s.data_sequence_in_order),
    }


class LoginError(Exception):
    def __init__(self, status: LoginStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class LoginSuccess:
    initiator_name: str
    initiator_alias: str | None
    session_type: str  # "Normal" | "Discovery"
    target: TargetAccess | None
    grant: AccessGrant | None
    isid: int
    tsih: int  # as sent by the initiator (0 = new session)
    cid: int
    tpgt: int
    cmdsn: int  # ExpCmdSN at the start of Full Feature Phase
    statsn: int  # next StatSN to use on this connection
    params: "K.Negotiated"
    offered: list[tuple[str, str]] = field(default_factory=list)
    answered: list[tuple[str, str]] = field(default_factory=list)
    authenticated_as: str | None = None


@dataclass
class LoginFailure:
    status: LoginStatus
    reason: str


def _chap_for(creds: ChapCredentials | None) -> ChapTargetAuth:
    """A CHAP responder for the configured credentials (None: AuthMethod=None only)."""
    if creds is None:
        return ChapTargetAuth(None, required=False)
    mutual = None
    if creds.mutual_username and creds.mutual_secret:
        mutual = A.ChapCredentials(creds.mutual_username, creds.mutual_secret)
    expected_name, secret = creds.username, creds.secret
    return ChapTargetAuth(lambda name: secret if name == expected_name else None,
                          required=True, mutual=mutual)


class TargetLogin:
    """Sans-IO login negotiation for one connection.

    ``allocate_tsih(isid, initiator, target, tsih)`` is called once the initiator
    is authenticated and authorised, just before the final response: it returns
    the TSIH to report (a new one for TSIH=0, the same one for a connection
    reinstatement) or raises :class:`LoginError` (e.g. session does not exist).

    ``session_params(isid, initiator, target, tsih)`` gives the values in force in the
    session a login with TSIH != 0 joins (None: no such session of this initiator port).
    Session-wide keys (Use: LO, RFC 7143 §13.10-§13.20) are negotiated by the leading
    login only, so such a login starts from the session's values, not the RFC defaults:
    an initiator replacing its connection (§6.3.4) need not (and should not) offer them
    again.  Without it a TSIH != 0 login starts from the RFC defaults.
    """

    def __init__(self, registry: TargetRegistry, local_host: str, local_port: int,
                 allocate_tsih: Callable[[int, str, str, int, int], int],
                 statsn_start: int = 0, *,
                 session_params: Callable[[int, str, str, int], K.Negotiated | None] | None = None,
                 peer: str = "") -> None:
        self.registry = registry
        self.local_host, self.local_port = local_host, local_port
        self.peer = peer  # the initiator's address:port, for the log (who failed to log in, from where)
        self.allocate_tsih = allocate_tsih
        self.session_params = session_params
        self.outcome: LoginSuccess | LoginFailure | None = None
        self._statsn = statsn_start
        self._pdus = 0
        self._first: P.LoginRequest | None = None
        self._stage = SECURITY
        self._text = K.TextAccumulator(MAX_LOGIN_TEXT)
        self._pending_out: list[bytes] = []   # remaining chunks of a long response (C bit)
        self._initiator_name: str | None = None
        self._initiator_alias: str | None = None
        self._session_type = "Normal"
        self._target: TargetAccess | None = None
        self._target_name: str | None = None  # as asked for: the log names it even when refused
        self._grant: AccessGrant | None = None
        self._tpgt = 1
        self._auth: ChapTargetAuth | None = None
        self._auth_required = False
        self._auth_done = False
        self._negotiator: K.Negotiator | None = None
        self._offered: list[tuple[str, str]] = []
        self._answered: list[tuple[str, str]] = []
        self.drop_without_response = False  # reflected CHAP challenge: just close (§12.1.3)
        self._max_send_segment = 8192  # RFC 7143 §13.12 default until declared

    # ------------------------------------------------------------------
    def receive(self, req: P.LoginRequest) -> list[P.Pdu]:
        """Process one Login Request; return the response PDU(s) to send."""
        if self.outcome is not None:
            raise RuntimeError("login already finished")
        try:
            return [self._receive(req)]
        except LoginError as err:
            return [self._fail(req, err.status, err.reason)]
        except K.ProtocolError as err:
            return [self._fail(req, LoginStatus(err.status), str(err))]

    def _receive(self, req: P.LoginRequest) -> P.LoginResponse:
        self._pdus += 1
        if self._pdus > MAX_LOGIN_PDUS:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "login takes too many PDUs")
        first = self._first
        if first is None:
            self._first = first = req
            if req.version_min > ISCSI_VERSION:
                raise LoginError(LoginStatus.UNSUPPORTED_VERSION,
                                 f"version {req.version_min}..{req.version_max} not supported")
            self._stage = req.csg
        elif (req.isid, req.tsih, req.cid, req.itt) != (first.isid, first.tsih, first.cid, first.itt):
            # §11.12: ISID, TSIH, CID and ITT stay the same through one login.
            raise LoginError(LoginStatus.INITIATOR_ERROR, "ISID/TSIH/CID/ITT changed during login")
        if req.csg != self._stage:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"CSG {req.csg} while in stage {self._stage}")
        if req.csg not in (SECURITY, OPERATIONAL):
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"invalid CSG {req.csg}")
        if req.transit and req.cont:
            raise LoginError(LoginStatus.INITIATOR_ERROR, "T and C both set")  # §11.12.2
        if req.transit and req.nsg not in _TRANSITIONS[req.csg]:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"invalid NSG {req.nsg} from CSG {req.csg}")

        # The initiator is still receiving a long response of ours (§6.2 C bit).
        if self._pending_out:
            if req.data:
                raise LoginError(LoginStatus.INITIATOR_ERROR, "text while target response continues")
            chunk = self._next_chunk()
            # C=1 on every piece but the last (§11.13, C bit): the initiator keeps asking until C=0.
            return self._response(req, chunk, transit=False, cont=bool(self._pending_out))

        complete = self._text.append(req.data, req.cont)
        if complete is None:  # more text to come: answer with an empty response (§6.2)
            return self._response(req, b"", transit=False)
        received = K.parse_text(complete)

        if self._initiator_name is None:
            self._leading_keys(received)
        else:
            for key, value in received:
                if key == "SessionType" and value != self._session_type:
                    # The first request chose the session type (absent: Normal, §13.21) and
                    # with it the target, ACL, CHAP and which keys are relevant; a later
                    # SessionType may only repeat it (§6.2: no redeclaration).
                    raise LoginError(LoginStatus.INITIATOR_ERROR,
                                     f"SessionType={value[:32]!r} after a {self._session_type} login began")
        answers: list[tuple[str, str]] = []
        self._offered.extend(received)

        if req.csg == SECURITY:
            answers += self._security(received, req)
            can_transit = self._auth_done
        else:
            if self._auth_required and not self._auth_done:
                raise LoginError(LoginStatus.AUTHENTICATION_FAILURE,
                                 "operational stage reached without the required authentication")
            answers += self._operational(received)
            can_transit = True

        nsg = req.nsg
        answers += self._declarations("security" if req.csg == SECURITY else "operational")
        if req.csg == SECURITY and req.transit and can_transit and nsg == FULL_FEATURE:
            if self._negotiator.operational_offers_pending():  # type: ignore[union-attr]
                # We must offer keys (e.g. required digests) that need an answer: go to the
                # operational stage instead of skipping it (§6.3: a target may answer a lower
                # NSG than the initiator asked for).
                nsg = OPERATIONAL
            else:
                # Skipping the operational stage: our declarations must still go out (§13.12).
                answers += self._declarations("operational")
        if req.csg == OPERATIONAL and self._negotiator.outstanding:  # type: ignore[union-attr]
            # §6.2: no transit while an offer of ours is unanswered (else a required
            # digest could be skipped by an initiator that simply never answers).
            can_transit = False

        transit = bool(req.transit and can_transit)
        if transit:
            self._stage = nsg
        self._answered.extend(answers)
        text = K.encode_text(answers)
        chunks = K.split_text(text, self._max_send_segment) if text else [b""]
        self._pending_out = chunks[1:]
        if self._pending_out:
            transit = False
            self._stage = req.csg
        resp = self._response(req, chunks[0], transit=transit, cont=bool(self._pending_out), nsg=nsg)
        if transit and nsg == FULL_FEATURE:
            self._finish(req, resp)
        return resp

    def _next_chunk(self) -> bytes:
        return self._pending_out.pop(0)

    # ------------------------------------------------------------------
    def _leading_keys(self, received: list[tuple[str, str]]) -> None:
        """Keys of the first login request (§13.5, §13.6, §13.21): who, to whom, what kind."""
        values = dict(received)
        name = values.get("InitiatorName")
        if not name:
            raise LoginError(LoginStatus.MISSING_PARAMETER, "InitiatorName missing")
        invalid: ConfigError | None = None
        try:
            # iSCSI names compare after stringprep (RFC 7143 §4.2.7.1, RFC 3722: case folded):
            # "IQN.X" and "iqn.x" name one initiator, so one session identity (§6.3.5
            # reinstatement by initiator name + ISID) and one I_T nexus.  A name that is not
            # valid is kept as sent, and refused below with the reason.
            name = canonical_iscsi_name(name)
        except ConfigError as e:
            invalid = e
        self._initiator_name = name
        self._initiator_alias = values.get("InitiatorAlias")
        stype = values.get("SessionType", "Normal")
        if stype not in ("Normal", "Discovery"):
            raise LoginError(LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {stype!r}")
        self._session_type = stype
        if stype == "Normal":
            tname = values.get("TargetName")
            if not tname:
                raise LoginError(LoginStatus.MISSING_PARAMETER, "TargetName missing")
            self._target_name = tname
            target = self.registry.find_target(tname)
            if target is None:
                raise LoginError(LoginStatus.NOT_FOUND, f"no target {tname}")
            tpgt = target.portal_group_tag(self.local_host, self.local_port)
            if tpgt is None:
                raise LoginError(LoginStatus.NOT_FOUND, f"target {tname} not offered on this portal")
            grant = target.authorize(name)
            if grant is None:
                if invalid is not None:  # open access admits valid names only: say which rule refused it
                    raise LoginError(LoginStatus.AUTHORIZATION_FAILURE, f"InitiatorName refused: {invalid}")
                raise LoginError(LoginStatus.AUTHORIZATION_FAILURE, "initiator not in the target's ACL")
            self._target, self._grant, self._tpgt = target, grant, tpgt
            creds = grant.chap
            local = dict(grant.params)
            local["TargetPortalGroupTag"] = str(tpgt)
            if target.alias:
                local["TargetAlias"] = target.alias
        else:
            if invalid is not None:
                # Every target lists only valid names (an ACL names them, open access admits
                # them): an invalid one would get an empty list and no word why.
                raise LoginError(LoginStatus.AUTHORIZATION_FAILURE, f"InitiatorName refused: {invalid}")
            creds = self.registry.discovery_auth()
            local = {}
            self._tpgt = 1
        self._auth_required = creds is not None
        self._auth = _chap_for(creds)
        if not self._auth_required:
            self._auth_done = True
        self._negotiator = K.Negotiator("target", session_type=stype, local=local,
                                        initial=self._joined_session_values(name))

    def _joined_session_values(self, initiator: str) -> K.Negotiated | None:
        """The session-wide values of the session a TSIH != 0 login joins (see the class
        docstring); connection-only keys (digests, MaxRecvDataSegmentLength, §13.1,
        §13.12) start again from their defaults on every new connection."""
        first = self._first
        if first is None or first.tsih == 0 or self.session_params is None:
            return None
        target = self._target.name if self._target is not None else ""
        current = self.session_params(first.isid, initiator, target, first.tsih)
        if current is None:
            return None  # allocate_tsih refuses the login later (0x020A)
        return K.Negotiated(session=current.session, connection=K.ConnectionParams())

    def _security(self, received: list[tuple[str, str]], req: P.LoginRequest) -> list[tuple[str, str]]:
        """Security stage (§6.3.1, §12): names are declared, AuthMethod/CHAP answered by auth.py."""
        assert self._negotiator is not None and self._auth is not None
        sec = [(k, v) for k, v in received if k == "AuthMethod" or k.startswith("CHAP_")]
        rest = [(k, v) for k, v in received if not (k == "AuthMethod" or k.startswith("CHAP_"))]
        answers = self._negotiator.respond(rest, phase="security")
        if self._auth_done and not sec:
            return answers
        step = self._auth.step(sec)
        answers += step.keys
        if step.state is AuthState.FAILURE:
            self.drop_without_response = step.drop_connection
            raise LoginError(LoginStatus(step.status), step.reason)
        if step.state is AuthState.SUCCESS and not self._auth_done:
            self._auth_done = True
            if self._auth.method == "CHAP":
                event(log, "login.auth.ok", initiator=self._initiator_name, user=self._auth.peer_name)
        return answers

    def _operational(self, received: list[tuple[str, str]]) -> list[tuple[str, str]]:
        sec = [k for k, _ in received if k == "AuthMethod" or k.startswith("CHAP_")]
        if sec:
            raise LoginError(LoginStatus.INITIATOR_ERROR, f"security keys {sec} in the operational stage")
        return self._negotiator.respond(received, phase="operational")  # type: ignore[union-attr]

    def _declarations(self, phase: str) -> list[tuple[str, str]]:
        """What the target sends unasked: TPGT/alias first (§13.9), MaxRecvDataSegmentLength
        and offers of values it needs, in the operational stage."""
        return self._negotiator.pending_declarations(phase)  # type: ignore[union-attr]

    # ------------------------------------------------------------------
    def _response(self, req: P.LoginRequest, data: bytes, *, transit: bool, cont: bool = False,
                  status: int = 0, tsih: int | None = None, nsg: int | None = None) -> P.LoginResponse:
        statsn = self._statsn
        if status == 0:
            self._statsn = (self._statsn + 1) & 0xFFFFFFFF
        return P.LoginResponse(
            transit=transit, cont=cont, csg=req.csg, nsg=(req.nsg if nsg is None else nsg) if transit else 0,
            version_max=ISCSI_VERSION, version_active=ISCSI_VERSION,
            isid=req.isid, tsih=req.tsih if tsih is None else tsih, itt=req.itt,
            statsn=statsn, expcmdsn=req.cmdsn, maxcmdsn=req.cmdsn,
            status_class=status >> 8, status_detail=status & 0xFF, data=data,
        )

    def _fail(self, req: P.LoginRequest, status: LoginStatus, reason: str) -> P.LoginResponse:
        self.outcome = LoginFailure(status, reason)
        event(log, "login.failed", logging.WARNING, initiator=self._initiator_name,
              target=self._target.name if self._target else self._target_name, status=f"0x{status:04x}",
              reason=reason, portal=format_portal(self.local_host, self.local_port), peer=self.peer or None)
        resp = self._response(req, b"", transit=False, status=int(status))
        resp.csg, resp.nsg = req.csg, 0
        return resp

    def _recheck_access(self) -> None:
        """The target and the access grant were looked up at the first Login Request; an
        admin may have removed the target, taken it off this portal or revoked the ACL while
        the login went on (a CHAP exchange takes round trips).  The admin's session drop ran
        before this session existed, so the login itself must now fail, instead of ending
        in a session on closed images or past a revoked ACL."""
        assert self._target is not None and self._initiator_name is not None
        target = self.registry.find_target(self._target.name)
        if target is None:
            raise LoginError(LoginStatus.TARGET_REMOVED, f"target {self._target.name} was removed during the login")
        if target.portal_group_tag(self.local_host, self.local_port) != self._tpgt:
            raise LoginError(LoginStatus.NOT_FOUND, f"target {self._target.name} left this portal during the login")
        grant = target.authorize(self._initiator_name)
        if grant is None:
            raise LoginError(LoginStatus.AUTHORIZATION_FAILURE, "access revoked during the login")
        self._target, self._grant = target, grant

    def _finish(self, req: P.LoginRequest, resp: P.LoginResponse) -> None:
        """Allocate the TSIH and record the outcome; a LoginError here fails the login."""
        assert self._negotiator is not None and self._initiator_name is not None
        if self._session_type == "Normal":
            self._recheck_access()
        target_name = self._target.name if self._target else ""
        tsih = self.allocate_tsih(req.isid, self._initiator_name, target_name, req.tsih, req.cid)
        resp.tsih = tsih
        params = self._negotiator.negotiated()
        self.outcome = LoginSuccess(
            initiator_name=self._initiator_name, initiator_alias=self._initiator_alias,
            session_type=self._session_type, target=self._target, grant=self._grant,
            isid=req.isid, tsih=tsih, cid=req.cid, tpgt=self._tpgt, cmdsn=req.cmdsn,
            statsn=self._statsn, params=params, offered=self._offered, answered=self._answered,
            authenticated_as=self._auth.peer_name if self._auth else None,
        )
