"""Initiator side of the login phase, without I/O (RFC 7143 §6, §11.12, §11.13).

:class:`InitiatorLogin` produces Login Requests and consumes Login Responses; the
asyncio edge (:mod:`iscsi.initiator.connection`) only moves them over TCP.  Key
negotiation is :class:`iscsi.keys.Negotiator` (role ``initiator``); CHAP is
:class:`iscsi.auth.ChapInitiatorAuth`.

Stages (CSG/NSG, §11.12.3): 0 SecurityNegotiation → 1 LoginOperationalNegotiation →
3 FullFeaturePhase.  We always begin with the security stage (AuthMethod is offered even
when it is ``None``), as open-iscsi and libiscsi do, so targets that require CHAP see it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum

from .. import keys as K
from .. import pdu as P
from ..framing import LOGIN_MAX_DATA_SEGMENT
from ..auth import AuthState, ChapCredentials, ChapInitiatorAuth
from .errors import LoginError, LoginRedirect

SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3
ISCSI_VERSION = 0x00  # RFC 7143 §11.12.4
# A real login needs at most ~6 round trips (security with mutual CHAP = 3, operational = 1-2).
# More means the target loops on us.
MAX_LOGIN_ROUND_TRIPS = 32
# Text a target may send back across C-bit continuations (same bound as the target side).
MAX_LOGIN_TEXT = 65536


def random_isid() -> int:
    """RFC 7143 §11.12.5: ISID type 10b ("random"): T=2 in the top bits, 22 random bits in A/B/C,
    qualifier D. One ISID per session, reused when the session is reinstated (§6.3.5)."""
    rnd = int.from_bytes(os.urandom(5), "big")
    return (0x2 << 46) | (rnd & ((1 << 46) - 1))


@dataclass
class LoginConfig:
    """What the initiator brings to a login."""

    initiator_name: str
    target_name: str | None = None        # None for a Discovery session
    session_type: str = "Normal"
    initiator_alias: str | None = None
    chap: ChapCredentials | None = None
    mutual_chap: ChapCredentials | None = None   # the target's name and secret
    # Operational preferences as RFC key strings (HeaderDigest, MaxBurstLength, ...); they
    # override iscsi.keys.INITIATOR_DEFAULTS.
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class LoginResult:
    params: K.Negotiated
    tsih: int
    isid: int
    cid: int
    statsn: int        # StatSN of the final Login Response; the next status carries statsn+1
    expcmdsn: int
    maxcmdsn: int
    cmdsn: int         # CmdSN of the first full-feature command
    target_keys: dict[str, str]
    auth_method: str | None


class _Stage(Enum):
    SECURITY = 0
    OPERATIONAL = 1
    DONE = 3


class InitiatorLogin:
    """One login attempt.

        login = InitiatorLogin(cfg, isid=..., cid=0, cmdsn=1)
        req = login.start()
        while req is not None:
            send(req); req = login.receive(next_response())
        login.result  # LoginResult

    Failures raise :class:`LoginError` (status from the target, or our own refusal:
    mutual CHAP that does not verify, a negotiation that cannot complete).
    """

    def __init__(self, cfg: LoginConfig, *, isid: int, tsih: int = 0, cid: int = 0, cmdsn: int = 1,
                 itt: int = 0) -> None:
        self.cfg = cfg
        self.isid, self.tsih, self.cid, self.cmdsn, self.itt = isid, tsih, cid, cmdsn, itt
        local: dict[str, str] = {"InitiatorName": cfg.initiator_name, **cfg.keys}
        if cfg.initiator_alias:
            local["InitiatorAlias"] = cfg.initiator_alias
        if cfg.target_name:
            local["TargetName"] = cfg.target_name
        self.neg = K.Negotiator("initiator", session_type=cfg.session_type, local=local)
        self.auth = ChapInitiatorAuth(cfg.chap, mutual=cfg.mutual_chap,
                                      algorithms=(5,) if cfg.chap else (7, 5))
        self._stage = _Stage.SECURITY
        self._expstatsn = 0
        self._text = K.TextAccumulator(MAX_LOGIN_TEXT)
        self._target_keys: dict[str, str] = {}
        self._trips = 0
        self._auth_done = False
        self._want_transit = False
        self._pending_answers: list[tuple[str, str]] = []
        self.result: LoginResult | None = None
        self._max_send = LOGIN_MAX_DATA_SEGMENT
        self._outbox: list[bytes] = []

    # ------------------------------------------------------------------
    def start(self) -> P.LoginRequest:
        step = self.auth.start()
        pairs = self.neg.pending_declarations("security") + list(step.keys)
        self._want_transit = step.transit
        return self._request(pairs, SECURITY, OPERATIONAL, transit=step.transit)

    def _request(self, pairs: list[tuple[str, str]], csg: int, nsg: int, *, transit: bool) -> P.LoginRequest:
        text = K.encode_text(pairs) if pairs else b""
        chunks = K.split_text(text, self._max_send)
        self._outbox = chunks[1:]
        cont = bool(self._outbox)
        return P.LoginRequest(
            transit=transit and not cont, cont=cont, csg=csg, nsg=nsg if (transit and not cont) else 0,
            version_max=ISCSI_VERSION, version_min=ISCSI_VERSION, isid=self.isid, tsih=self.tsih,
            cid=self.cid, cmdsn=self.cmdsn, expstatsn=self._expstatsn, itt=self.itt, data=chunks[0],
        )

    def _current_csg(self) -> int:
        return SECURITY if self._stage is _Stage.SECURITY else OPERATIONAL

    # ------------------------------------------------------------------
    def receive(self, resp: P.LoginResponse) -> P.LoginRequest | None:
        """Consume one Login Response; return the next request, or None when logged in."""
        self._trips += 1
        if self._trips > MAX_LOGIN_ROUND_TRIPS:
            raise LoginError("login does not converge (too many round trips)")
        if resp.status_class != 0:
            self._fail_from_status(resp)
        if resp.itt != self.itt or resp.isid != self.isid:
            raise LoginError("Login Response for another ITT/ISID")
        if resp.version_active != ISCSI_VERSION and resp.version_max < ISCSI_VERSION:
            raise LoginError(f"target speaks iSCSI version {resp.version_active}")
        self._expstatsn = (resp.statsn + 1) & 0xFFFFFFFF
        csg = self._current_csg()
        if resp.csg != csg:
            raise LoginError(f"Login Response for stage {resp.csg} while in stage {csg}")

        # We still have continued text of our own to send (RFC 7143 §6.2 C bit).
        if self._outbox:
            chunk = self._outbox.pop(0)
            cont = bool(self._outbox)
            return P.LoginRequest(transit=self._want_transit and not cont, cont=cont, csg=csg,
                                  nsg=self._nsg(csg) if (self._want_transit and not cont) else 0,
                                  version_max=0, version_min=0, isid=self.isid, tsih=self.tsih,
                                  cid=self.cid, cmdsn=self.cmdsn, expstatsn=self._expstatsn,
                                  itt=self.itt, data=chunk)

        try:
            whole = self._text.append(resp.data, resp.cont)
        except K.ProtocolError as exc:
            raise LoginError(str(exc)) from exc
        if whole is None:  # target continues: ask for the rest with an empty request
            return P.LoginRequest(transit=False, cont=False, csg=csg, nsg=0, isid=self.isid,
                                  tsih=self.tsih, cid=self.cid, cmdsn=self.cmdsn,
                                  expstatsn=self._expstatsn, itt=self.itt)
        try:
            received = K.parse_text(whole)
        except K.ProtocolError as exc:
            raise LoginError(f"malformed login text: {exc}") from exc
        for k, v in received:
            self._target_keys[k] = v
        try:
            if self._stage is _Stage.SECURITY:
                return self._security(resp, received)
            return self._operational(resp, received)
        except K.ProtocolError as exc:
            raise LoginError(f"negotiation failed: {exc}") from exc

    def _nsg(self, csg: int) -> int:
        return OPERATIONAL if csg == SECURITY else FULL_FEATURE

    def _fail_from_status(self, resp: P.LoginResponse) -> None:
        if resp.status_class == 1:
            try:
                keys = dict(K.parse_text(resp.data))
            except K.ProtocolError:
                keys = {}
            addr = keys.get("TargetAddress")
            if addr:
                raise LoginRedirect(addr, resp.status_detail == 2)
        raise LoginError(_status_text(resp.status_class, resp.status_detail),
                         resp.status_class, resp.status_detail)

    def _security(self, resp: P.LoginResponse, received: list[tuple[str, str]]) -> P.LoginRequest | None:
        sec = [(k, v) for k, v in received if k == "AuthMethod" or k.startswith("CHAP_")]
        rest = [(k, v) for k, v in received if not (k == "AuthMethod" or k.startswith("CHAP_"))]
        answers = self.neg.respond(rest, "security") if rest else []
        out: list[tuple[str, str]] = list(answers)
        transit = True
        if not self._auth_done:
            if sec or self.auth.state is AuthState.CONTINUE:
                step = self.auth.step(sec)
                if step.state is AuthState.FAILURE:
                    raise LoginError(f"authentication: {step.reason}", 2, 1)
                out += step.keys
                transit = step.transit
                if step.state is AuthState.SUCCESS:
                    self._auth_done = True
        if resp.transit:
            # The target may leave the security stage only once CHAP is complete (§6.3, §12.1.3).
            if not self._auth_done:
                raise LoginError("target left the security stage before authentication finished")
            return self._enter(resp)
        self._want_transit = transit
        return self._request(out, SECURITY, OPERATIONAL, transit=transit)

    def _enter(self, resp: P.LoginResponse) -> P.LoginRequest | None:
        if resp.nsg == FULL_FEATURE:
            # Straight from security to full feature phase: every operational key keeps its
            # RFC default (§6.3 allows it when the initiator asked for NSG=3; we never do,
            # but tolerate it as open-iscsi does).
            self._stage = _Stage.DONE
            self.finish(resp)
            return None
        self._stage = _Stage.OPERATIONAL
        pairs = self.neg.pending_declarations("operational")
        self._want_transit = True
        return self._request(pairs, OPERATIONAL, FULL_FEATURE, transit=True)

    def _operational(self, resp: P.LoginResponse, received: list[tuple[str, str]]) -> P.LoginRequest | None:
        answers = self.neg.respond(received, "operational")
        if resp.transit and resp.nsg == FULL_FEATURE:
            if self.neg.outstanding:
                raise LoginError(f"target moved to full feature phase without answering "
                                 f"{', '.join(sorted(self.neg.outstanding))}")
            self._stage = _Stage.DONE
            self.finish(resp)
            return None
        self._want_transit = True
        return self._request(answers, OPERATIONAL, FULL_FEATURE, transit=True)

    # ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._stage is _Stage.DONE

    def finish(self, resp: P.LoginResponse) -> LoginResult:
        """Build the result from the final Login Response (T=1, NSG=3)."""
        params = self.neg.negotiated()
        # §13.9: the target MUST declare TargetPortalGroupTag in a Normal session; we tolerate
        # its absence (older targets omit it) and leave it None rather than invent a value.
        self.result = LoginResult(
            params=params, tsih=resp.tsih, isid=self.isid, cid=self.cid, statsn=resp.statsn,
            expcmdsn=resp.expcmdsn, maxcmdsn=resp.maxcmdsn, cmdsn=self.cmdsn,
            target_keys=dict(self._target_keys), auth_method=self.auth.method,
        )
        return self.result


_STATUS_TEXT = {
    0x0101: "target moved temporarily", 0x0102: "target moved permanently",
    0x0200: "initiator error", 0x0201: "authentication failure", 0x0202: "authorization failure",
    0x0203: "target not found", 0x0204: "target removed", 0x0205: "unsupported version",
    0x0206: "too many connections", 0x0207: "missing parameter", 0x0208: "can't include in session",
    0x0209: "session type not supported", 0x020A: "session does not exist",
    0x020B: "invalid request during login", 0x0300: "target error", 0x0301: "service unavailable",
    0x0302: "out of resources",
}


def _status_text(cls: int, detail: int) -> str:
    code = (cls << 8) | detail
    return f"login failed: {_STATUS_TEXT.get(code, 'status')} (0x{code:04x})"
