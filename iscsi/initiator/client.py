"""Convenience entry points: URL → logged-in session → BlockDevice, and SendTargets discovery."""
from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

from .. import keys as K
from ..auth import ChapCredentials
from .device import BlockDevice
from .errors import ConfigError, ConnectionLost, IscsiError, LoginError, PortalError, ProtocolViolation
from .login import LoginConfig
from .session import Session, SessionOptions
from .url import DEFAULT_PORT, IscsiUrl, parse_portal, parse_url

#: Where open-iscsi keeps the host's initiator name; used when present so that ACLs written
#: for this host's kernel initiator also admit us.
INITIATOR_NAME_FILE = "/etc/iscsi/initiatorname.iscsi"
#: Login status 0201h (RFC 7143 §11.13.5).
AUTHENTICATION_FAILURE = 0x0201


def default_initiator_name() -> str:
    env = os.environ.get("ISCSI_INITIATOR_NAME")
    if env:
        return env
    try:
        with open(INITIATOR_NAME_FILE) as f:
            for line in f:
                if line.startswith("InitiatorName="):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    host = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname().lower()) or "host"
    return f"iqn.2026-11.org.sanstack:initiator:{host}"


#: Keys a caller may not set through ``keys``: the login declares them itself from the URL,
#: the initiator name and the session type, or only the target may send them (RFC 7143 §13).
RESERVED_KEYS = {
    "InitiatorName": "give the initiator name instead (--initiator-name / initiator_name=)",
    "TargetName": "the URL names the target",
    "SessionType": "set by the command (discovery or normal session)",
    "TargetAlias": "declared by the target only",
    "TargetAddress": "declared by the target only",
    "TargetPortalGroupTag": "declared by the target only",
}


#: Keys whose Yes the session relies on (Data-In in order, checked per PDU: session.py).
IN_ORDER_KEYS = ("DataPDUInOrder", "DataSequenceInOrder")


def normalize_keys(keys: dict[str, str] | None) -> dict[str, str]:
    """``keys`` with what follows from them: a MaxBurstLength below our default
    FirstBurstLength brings FirstBurstLength down with it (RFC 7143 §13.14 wants
    FirstBurstLength <= MaxBurstLength), unless the caller set both."""
    k = dict(keys or {})
    mbl, fbl = k.get("MaxBurstLength"), K.INITIATOR_DEFAULTS.get("FirstBurstLength")
    if (mbl is not None and "FirstBurstLength" not in k and mbl.isdigit() and fbl is not None
            and int(mbl) < int(fbl)):
        k["FirstBurstLength"] = mbl
    return k


def validate_keys(keys: dict[str, str] | None, session_type: str = "Normal") -> None:
    """Refuse login key preferences that cannot work, before connecting (:class:`ConfigError`)."""
    if not keys:
        return
    for name in keys:
        if name in RESERVED_KEYS:
            raise ConfigError(f"login key {name} cannot be set: {RESERVED_KEYS[name]}")
        if name in IN_ORDER_KEYS and keys[name] != "Yes":
            raise ConfigError(f"login key {name}={keys[name]} cannot be used: this initiator places "
                              f"and checks Data-In in order (RFC 7143 §13.18/§13.19)")
    try:
        K.Negotiator("initiator", session_type=session_type, local=normalize_keys(keys))
    except ValueError as exc:
        raise ConfigError(f"login key: {exc}") from None


#: RFC 7143 §4.2.7 naming formats.
_NAME_PREFIXES = ("iqn.", "eui.", "naa.")


def check_iscsi_name(name: str, what: str) -> None:
    """Refuse a name no target can accept (ConfigError) before connecting: the login would
    only answer "initiator error" or "authorization failure" without saying why.  Lenient
    on purpose: RFC 3722 allows only letters, digits, '-', '.', ':', but targets that accept
    e.g. '_' exist, so only a wrong format, spaces and control characters are refused."""
    lowered = name.lower()
    if len(name.encode()) > K.MAX_ISCSI_NAME_LEN:
        raise ConfigError(f"{what} is {len(name.encode())} bytes; RFC 7143 §4.2.7.1 allows "
                          f"{K.MAX_ISCSI_NAME_LEN}")
    if not name.isprintable() or any(c.isspace() for c in name) or not lowered.startswith(_NAME_PREFIXES):
        raise ConfigError(f"{what} {name!r} is not an iSCSI name: iqn.YYYY-MM.domain[:unique], "
                          f"eui.<16 hex> or naa.<hex>, without spaces (RFC 7143 §4.2.7)")


def _check_chap(user: str | None, secret: str | None, whose: str, hint: str) -> None:
    if user and secret is None:
        raise ConfigError(f"{whose} CHAP name {user!r} given without a secret ({hint})")
    if secret is not None and not user:
        raise ConfigError(f"{whose} CHAP secret given without a name")


def login_config(url: IscsiUrl, *, initiator_name: str | None = None, session_type: str = "Normal",
                 keys: dict[str, str] | None = None) -> LoginConfig:
    _check_chap(url.user, url.password, "initiator", "iscsi://user%secret@host/... or ISCSI_PASSWORD")
    _check_chap(url.target_user, url.target_password, "target (mutual)",
                "target_password= or ISCSI_TARGET_PASSWORD")
    if url.target_user and not url.user:
        raise ConfigError("mutual CHAP (target_user=) needs the initiator's CHAP name and secret too")
    validate_keys(keys, session_type)
    keys = normalize_keys(keys)
    name = initiator_name or url.initiator_name or default_initiator_name()
    check_iscsi_name(name, "initiator name")
    if session_type == "Normal" and url.target:
        check_iscsi_name(url.target, "target name")
    try:
        chap = ChapCredentials(url.user, url.password) if url.user and url.password is not None else None
        mutual = (ChapCredentials(url.target_user, url.target_password)
                  if url.target_user and url.target_password is not None else None)
        if chap is not None and mutual is not None and chap.secret == mutual.secret:
            raise ValueError("the target's CHAP secret must differ from the initiator's (RFC 7143 §12.1.3)")
    except ConfigError:
        raise
    except ValueError as exc:      # length and charset rules of iscsi.auth.ChapCredentials
        raise ConfigError(str(exc)) from None
    k = dict(keys or {})
    if url.header_digest:
        k.setdefault("HeaderDigest", url.header_digest)
    if url.data_digest:
        k.setdefault("DataDigest", url.data_digest)
    if session_type == "Discovery":
        # open-iscsi declares 32768 on discovery sessions; SendTargets answers are small.
        k.setdefault("MaxRecvDataSegmentLength", "32768")
    return LoginConfig(
        initiator_name=name,
        target_name=url.target if session_type == "Normal" else None,
        session_type=session_type, chap=chap, mutual_chap=mutual, keys=k,
    )


async def open_session(url: IscsiUrl | str, *, options: SessionOptions | None = None,
                       initiator_name: str | None = None, keys: dict[str, str] | None = None) -> Session:
    """Log in to the target named by ``url`` (Session.login follows login redirects)."""
    if isinstance(url, str):
        url = parse_url(url)
    cfg = login_config(url, initiator_name=initiator_name, keys=keys)
    return await _login(url.host, url.port, cfg, options)


async def _login(host: str, port: int, cfg: LoginConfig, options: SessionOptions | None) -> Session:
    """:meth:`Session.open`, with the portal named in transport failures: a reset or a peer
    that does not speak iSCSI surfaces as a typed error, not a bare ``[Errno 104]``."""
    portal = K.format_portal(host, port)
    try:
        return await Session.open(host, port, cfg, options)
    except ProtocolViolation as exc:
        raise ProtocolViolation(f"login to {portal}: {exc}") from exc
    except ConnectionLost as exc:
        if portal in str(exc) or f"{host}:{port}" in str(exc):
            raise
        raise PortalError(f"login to {portal}: {exc}") from exc
    except IscsiError:
        raise
    except OSError as exc:
        raise PortalError(f"login to {portal}: {exc.strerror or exc}") from exc


async def open_device(url: IscsiUrl | str, **kw) -> tuple[Session, BlockDevice]:
    """Session + :class:`BlockDevice` on the URL's LUN."""
    if isinstance(url, str):
        url = parse_url(url)
    session = await open_session(url, **kw)
    try:
        dev = await BlockDevice.open(session, url.lun)
    except BaseException:
        await session.close()
        raise
    return session, dev


@dataclass(frozen=True)
class DiscoveredTarget:
    name: str
    portals: tuple[tuple[str, int, int], ...]   # (host, port, tpgt)


def parse_send_targets(pairs: list[tuple[str, str]]) -> list[DiscoveredTarget]:
    """RFC 7143 Appendix C: TargetName starts a record, TargetAddress=host:port,tpgt follow it.

    An address that is not one (§13.8: no host, a port out of range, an open bracket, a
    portal group tag that is not a 16-bit number) is left out, not guessed at."""
    out: list[DiscoveredTarget] = []
    name: str | None = None
    portals: list[tuple[str, int, int]] = []
    for key, value in pairs:
        if key == "TargetName":
            if name:
                out.append(DiscoveredTarget(name, tuple(portals)))
            name, portals = value, []
            try:
                # Not an iSCSI name (§4.2.7): control characters would reach the admin's
                # terminal ('discover' prints names) and the node store.  Left out.
                check_iscsi_name(value, "TargetName")
            except ConfigError:
                name = ""
        elif key == "TargetAddress" and name:
            try:
                host, port, tpgt = K.parse_target_address(value)
                parse_portal(K.format_portal(host, port))      # a host name we can use
            except (K.ProtocolError, ValueError):
                continue
            portals.append((host, port, tpgt if tpgt is not None else 1))
    if name:
        out.append(DiscoveredTarget(name, tuple(portals)))
    return out


async def discover(host: str, port: int = DEFAULT_PORT, *, url: IscsiUrl | None = None,
                   initiator_name: str | None = None, timeout: float = 15.0,
                   keys: dict[str, str] | None = None) -> list[DiscoveredTarget]:
    """SendTargets=All over a Discovery session (RFC 7143 §4.3, Appendix C)."""
    url = url or IscsiUrl(host=host, port=port)
    cfg = login_config(url, initiator_name=initiator_name, session_type="Discovery", keys=keys)
    opts = SessionOptions(login_timeout=timeout, noop_interval=0, reconnect=False)
    try:
        session = await _login(host, port, cfg, opts)
    except LoginError as exc:
        if exc.status == AUTHENTICATION_FAILURE and url.target_user:
            # We offer only CHAP when the target must prove itself, and most targets do not
            # authenticate discovery sessions at all (tgtd, ours, libiscsi fails the same way).
            raise LoginError(f"{exc} (discovery with mutual CHAP: drop target_user/target_password "
                             f"if the target does not authenticate discovery sessions)",
                             exc.status_class, exc.status_detail) from exc
        raise
    try:
        pairs = await asyncio.wait_for(session.text_exchange([("SendTargets", "All")]), timeout)
    finally:
        await session.close()
    targets = parse_send_targets(pairs)
    # A target may report no address for the portal we used (RFC 7143 Appendix C: the
    # address of the discovery session is implied): fill it in.
    return [t if t.portals else DiscoveredTarget(t.name, ((host, port, 1),)) for t in targets]
