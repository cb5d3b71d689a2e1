"""Text key=value negotiation, sans-IO, for both the target and the initiator.

RFC 7143 §6 (text format and negotiation rules) and §13 (the keys).  No I/O here:
callers hand in the text data of Login/Text PDUs and get back the keys to send.

Public API
----------
``parse_text(data, *, unique=False) -> list[tuple[str, str]]``
    Split NUL-delimited ``key=value`` data (§6.1), in order.  Malformed data raises
    :class:`ProtocolError`.
``encode_text(pairs) -> bytes``
    The inverse; every pair is followed by one NUL.
``TextAccumulator`` / ``split_text(data, max_len)``
    Multi-PDU text (the C bit, §11.10.2/§11.12.2): gather continued data segments,
    and cut an answer into pieces no longer than the peer's MaxRecvDataSegmentLength.
``parse_send_targets(pairs)``, ``parse_target_address(value)``, ``format_target_address``
    SendTargets answers and TargetAddress values (§13.3, §13.8).
``KEYS: Mapping[str, KeySpec]``
    One declarative entry per RFC 7143 §13 key: kind, default, range, scope,
    phases, senders.
``Negotiator(role, *, session_type="Normal", local=None, leading=True, initial=None)``
    One instance per login (or per full-feature Text exchange).  Call

    - ``respond(received, phase)`` with every key list received from the peer;
      it returns the answers to send.  Keys that answer our own earlier offers are
      absorbed (checked against what we offered), declarations are recorded, new
      offers are answered by the key's rule.  ``absorb`` is the same call, named
      for the offering side.
    - ``offer(keys, phase)`` to propose keys of our own (they become ``outstanding``
      until answered).
    - ``pending_declarations(phase)`` for what this side must send unasked: the
      target's TargetPortalGroupTag/TargetAlias in its first Login Response and its
      MaxRecvDataSegmentLength (plus offers of keys whose RFC default this side
      cannot accept); the initiator's names and its whole operational offer.
    - ``missing_declarations()`` after the peer's first PDU: keys it had to
      declare and did not (reject with ``LoginStatus.MISSING_PARAMETER``).
    - ``negotiated()`` for the typed result (:class:`Negotiated`); the peer's raw
      declarations (names, aliases) are in ``peer_declared``.

    A target handles each Login Request as
    ``respond(pairs, stage) + <auth keys> + pending_declarations(stage)`` (respond
    first: it learns SessionType), and leaves the stage only when ``outstanding``
    is empty.

    Security keys (AuthMethod, CHAP_*, SRP_*, KRB_*) are checked for phase and
    repetition here but answered by :mod:`iscsi.auth`; SendTargets is recorded in
    ``send_targets`` for the discovery code to answer.

Errors: :class:`ProtocolError` (the peer broke the protocol; carries the Login
status to reject with, RFC 7143 §11.13.5) and its subclass :class:`NegotiationError`
(a negotiation that cannot complete).  Misuse by the caller raises ``ValueError``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

__all__ = [
    "ProtocolError", "NegotiationError", "LoginStatus",
    "Kind", "Scope", "KeySpec", "KEYS",
    "parse_text", "encode_text", "TextAccumulator", "split_text",
    "parse_number", "decode_binary", "encode_hex",
    "parse_target_address", "format_target_address", "parse_send_targets",
    "Negotiator", "Negotiated", "SessionParams", "ConnectionParams",
    "TARGET_DEFAULTS", "INITIATOR_DEFAULTS",
]

Role = Literal["target", "initiator"]
Phase = Literal["security", "operational", "ffp"]

# --------------------------------------------------------------------------------------
# Limits (RFC 7143 §6.1 unless noted)
# --------------------------------------------------------------------------------------

#: "Key names MUST NOT exceed 63 bytes."
MAX_KEY_NAME_LEN = 63
#: Maximum length of an individual value (not a whole list), without delimiter.
MAX_VALUE_LEN = 255
#: CHAP_C and CHAP_R are large-binary-values whose *binary* length must not exceed
#: 1024 bytes (RFC 7143 §12.1.3, RFC 3720 §11.1.4; LIO enforces the same).
MAX_LARGE_BINARY_LEN = 1024
#: Encoded form of the largest large-binary-value: "0x" + two hex digits a byte.
MAX_LARGE_VALUE_ENCODED_LEN = 2 + 2 * MAX_LARGE_BINARY_LEN
#: Keys whose values are large-binary-values (the CHAP ones we implement; SRP and
#: Kerberos items are not answered by this stack but must still parse).
LARGE_VALUE_KEYS = frozenset({"CHAP_C", "CHAP_R", "SRP_A", "SRP_B", "SRP_M", "SRP_HM",
                              "SRP_s", "KRB_AP_REQ", "KRB_AP_REP"})
#: A whole text negotiation sequence (all PDUs joined by the C bit).  The RFC floor
#: is 8192 bytes, and 64 KiB "when proposing or accepting authentication methods
#: that explicitly require support for very long authentication items"; a
#: SendTargets answer for many targets is also long.  Anything longer is refused.
MAX_TEXT_SEQUENCE_LEN = 65536
#: iSCSI names are at most 223 bytes (RFC 7143 §4.2.7.1, RFC 3722).
MAX_ISCSI_NAME_LEN = 223

# Numerical ranges from RFC 7143 §13
_SEGMENT_MIN, _SEGMENT_MAX = 512, 2**24 - 1

# --------------------------------------------------------------------------------------
# Tunable defaults, each with its reason
# --------------------------------------------------------------------------------------

#: What we can receive per PDU.  open-iscsi declares 262144 for normal sessions;
#: LIO defaults to 8192, which forces 32 PDUs per 256 KiB I/O.  A larger segment
#: means fewer headers to parse per byte moved, which matters most in Python.
DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH = 262144
#: open-iscsi offers 16776192 (2**24 - 1024); the largest value the initiator
#: asks for is accepted under the Minimum rule, so bursts are as long as it wants.
DEFAULT_MAX_BURST_LENGTH = 16776192
#: open-iscsi offers 262144 (LIO: 65536, RFC default 65536); accept it as is.
DEFAULT_FIRST_BURST_LENGTH = 262144
#: More than one outstanding R2T per task lets large writes stream (open-iscsi
#: PR #115); 8 bounds the per-task receive buffers a target keeps.
DEFAULT_MAX_OUTSTANDING_R2T = 8
#: Only ErrorRecoveryLevel 0 is implemented (session recovery by reconnecting).
SUPPORTED_ERROR_RECOVERY_LEVEL = 0
#: One connection per session: no MC/S (open-iscsi always asks for 1).
SUPPORTED_MAX_CONNECTIONS = 1
#: RFC 7143 is iSCSIProtocolLevel 1 (RFC 7144 §2.1); level 2 features are absent.
SUPPORTED_ISCSI_PROTOCOL_LEVEL = 1

_COMMON_DEFAULTS: dict[str, str] = {
    "MaxConnections": str(SUPPORTED_MAX_CONNECTIONS),
    # InitialR2T=No and ImmediateData=Yes *allow* unsolicited and immediate data;
    # neither side is obliged to use them.
    "InitialR2T": "No",
    "ImmediateData": "Yes",
    "MaxRecvDataSegmentLength": str(DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH),
    "MaxBurstLength": str(DEFAULT_MAX_BURST_LENGTH),
    "FirstBurstLength": str(DEFAULT_FIRST_BURST_LENGTH),
    "DefaultTime2Wait": "2",
    "DefaultTime2Retain": "20",
    "MaxOutstandingR2T": str(DEFAULT_MAX_OUTSTANDING_R2T),
    "DataPDUInOrder": "Yes",
    "DataSequenceInOrder": "Yes",
    "ErrorRecoveryLevel": str(SUPPORTED_ERROR_RECOVERY_LEVEL),
    "TaskReporting": "RFC3720",
    "iSCSIProtocolLevel": str(SUPPORTED_ISCSI_PROTOCOL_LEVEL),
}

#: The target accepts both digest settings and lets the initiator's order decide.
TARGET_DEFAULTS: Mapping[str, str] = MappingProxyType({
    **_COMMON_DEFAULTS, "HeaderDigest": "CRC32C,None", "DataDigest": "CRC32C,None",
})
#: The initiator prefers no digests but accepts CRC32C if the target requires it.
INITIATOR_DEFAULTS: Mapping[str, str] = MappingProxyType({
    **_COMMON_DEFAULTS, "HeaderDigest": "None,CRC32C", "DataDigest": "None,CRC32C",
})

# --------------------------------------------------------------------------------------
# Errors and login status codes
# --------------------------------------------------------------------------------------


class LoginStatus(enum.IntEnum):
    """Login Response Status-Class and Status-Detail as one 16-bit value (§11.13.5)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMPORARILY = 0x0101
    TARGET_MOVED_PERMANENTLY = 0x0102
    INITIATOR_ERROR = 0x0200
    AUTHENTICATION_FAILURE = 0x0201
    AUTHORIZATION_FAILURE = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_NOT_SUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302

    @property
    def status_class(self) -> int:
        return self.value >> 8

    @property
    def status_detail(self) -> int:
        return self.value & 0xFF


class ProtocolError(Exception):
    """The peer broke the text protocol.

    ``status`` is what a target answers in the Login Response (an initiator just
    drops the connection; in full feature phase the caller sends a Reject PDU).
    """

    def __init__(self, message: str, status: LoginStatus = LoginStatus.INITIATOR_ERROR):
        super().__init__(message)
        self.status = status


class NegotiationError(ProtocolError):
    """A key negotiation that cannot complete (illegal answer, repetition, ...)."""

    def __init__(self, message: str, status: LoginStatus = LoginStatus.INITIATOR_ERROR,
                 key: str | None = None):
        super().__init__(message, status)
        self.key = key


# --------------------------------------------------------------------------------------
# Value encodings (RFC 7143 §6.1)
# --------------------------------------------------------------------------------------

_DECIMAL = re.compile(r"[0-9]+\Z")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+\Z")
_BASE64 = re.compile(r"0[bB][A-Za-z0-9+/]+={0,2}\Z")
# standard-label (§6.1): letters, digits, '.', '-', '+', '@', '_'.  The RFC asks for
# an initial capital, but RFC 7144's own key is "iSCSIProtocolLevel", so any letter
# is accepted.  '#' appears in public extension keys ("X#...", §6.2).
_KEY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9.\-+@_#]*\Z")
REJECT, IRRELEVANT, NOT_UNDERSTOOD = "Reject", "Irrelevant", "NotUnderstood"


def decode_binary(text: str) -> bytes:
    """Decode a hex-constant ("0x...") or base64-constant ("0b...") (§6.1).

    A hex-constant with an odd number of digits has an implied leading zero
    nibble: its byte length is (n + 1) // 2.
    """
    if _HEX.match(text):
        digits = text[2:]
        if len(digits) % 2:
            digits = "0" + digits
        return bytes.fromhex(digits)
    if _BASE64.match(text):
        try:
            return base64.b64decode(text[2:], validate=True)
        except binascii.Error as exc:
            raise ProtocolError(f"bad base64 constant: {exc}") from None
    raise ProtocolError("binary value is neither 0x-hex nor 0b-base64")


def encode_hex(data: bytes) -> str:
    """Binary value as a lower-case hex-constant, the form every initiator parses."""
    return "0x" + data.hex()


def parse_number(text: str) -> int:
    """A numerical value: decimal-constant, or hex/base64 constant; < 2**64 (§6.1)."""
    if _DECIMAL.match(text):
        value = int(text)
    elif _HEX.match(text) or _BASE64.match(text):
        value = int.from_bytes(decode_binary(text), "big")
    else:
        raise ProtocolError(f"not a number: {text[:32]!r}")
    if value >= 2**64:
        raise ProtocolError("number does not fit in 64 bits")
    return value


# --------------------------------------------------------------------------------------
# Text data: parse, encode, multi-PDU helpers
# --------------------------------------------------------------------------------------


def _check_value_length(key: str, value: str) -> None:
    raw = value.encode("utf-8")
    if key in LARGE_VALUE_KEYS:
        if len(raw) > MAX_LARGE_VALUE_ENCODED_LEN:
            raise ProtocolError(f"{key}: value longer than {MAX_LARGE_VALUE_ENCODED_LEN} bytes")
        return
    # The limit is per individual value of a list, not per whole list (§6.1).
    for item in raw.split(b","):
        if len(item) > MAX_VALUE_LEN:
            raise ProtocolError(f"{key}: value longer than {MAX_VALUE_LEN} bytes")


def _check_key_name(key: str) -> None:
    if len(key.encode("utf-8")) > MAX_KEY_NAME_LEN:
        raise ProtocolError(f"key name longer than {MAX_KEY_NAME_LEN} bytes: {key[:64]!r}")
    if not _KEY_NAME.match(key):
        raise ProtocolError(f"malformed key name: {key[:64]!r}")


def parse_text(data: bytes | bytearray | memoryview, *, unique: bool = False) -> list[tuple[str, str]]:
    """Parse text data into ``(key, value)`` pairs in order (RFC 7143 §6.1).

    Every pair should end with a NUL; a missing final NUL and empty entries
    (runs of NULs) are tolerated, as open-iscsi does.  With ``unique=True`` a key
    that occurs twice raises (a Negotiator detects repetition itself, because
    SendTargets answers legitimately repeat TargetName and TargetAddress).
    """
    if len(data) > MAX_TEXT_SEQUENCE_LEN:
        raise ProtocolError(f"text data longer than {MAX_TEXT_SEQUENCE_LEN} bytes")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in bytes(data).split(b"\x00"):
        if not raw:
            continue
        key_raw, sep, value_raw = raw.partition(b"=")
        if not sep:
            raise ProtocolError(f"text entry without '=': {raw[:64]!r}")
        try:
            key = key_raw.decode("ascii")
            value = value_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"text entry is not valid UTF-8: {raw[:64]!r}") from None
        _check_key_name(key)
        _check_value_length(key, value)
        if unique:
            if key in seen:
                raise ProtocolError(f"key {key} sent twice")
            seen.add(key)
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Encode pairs as ``key=value\\0`` each (RFC 7143 §6.1)."""
    out = bytearray()
    for key, value in pairs:
        _check_key_name(key)
        if "\x00" in value:
            raise ValueError(f"{key}: value contains NUL")
        out += key.encode("ascii") + b"=" + value.encode("utf-8") + b"\x00"
    return bytes(out)


class TextAccumulator:
    """Joins the data segments of a text sequence continued with the C bit.

    ``append(data, continue_flag)`` returns ``None`` while the C bit is set and the
    whole text (bytes) with the last segment.  A key=value pair may span a PDU
    boundary, so segments are joined as bytes before parsing.
    """

    def __init__(self, max_len: int = MAX_TEXT_SEQUENCE_LEN) -> None:
        self.max_len = max_len
        self._buf = bytearray()

    def append(self, data: bytes | bytearray | memoryview, continue_flag: bool) -> bytes | None:
        if len(self._buf) + len(data) > self.max_len:
            self._buf.clear()
            raise ProtocolError(f"text sequence longer than {self.max_len} bytes",
                                LoginStatus.OUT_OF_RESOURCES)
        self._buf += data
        if continue_flag:
            return None
        whole = bytes(self._buf)
        self._buf.clear()
        return whole

    @property
    def pending(self) -> bool:
        """True while a continued sequence is incomplete."""
        return bool(self._buf)

    def reset(self) -> None:
        """Forget a continued sequence (it was refused)."""
        self._buf.clear()


def split_text(data: bytes, max_len: int) -> list[bytes]:
    """Cut text data into segments of at most ``max_len`` bytes (the peer's
    MaxRecvDataSegmentLength).  Send all but the last with C=1.  Empty data
    gives one empty segment."""
    if max_len <= 0:
        raise ValueError("max_len must be positive")
    if not data:
        return [b""]
    return [data[i:i + max_len] for i in range(0, len(data), max_len)]


#: The well-known iSCSI port (RFC 7143 §13.8: the default when TargetAddress has none).
ISCSI_DEFAULT_PORT = 3260


def format_portal(host: str, port: int) -> str:
    """(host, port) as TargetAddress writes it, domainname:port (RFC 7143 §13.8): an IPv6
    address in brackets ([::1]:3260, not ::1:3260)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_target_address(value: str) -> tuple[str, int, int | None]:
    """TargetAddress=domainname[:port][,portal-group-tag] (RFC 7143 §13.8).

    Returns (host, port, tpgt or None); an IPv6 host loses its brackets.
    """
    address, _, tag = value.partition(",")
    tpgt = None
    if tag:
        tpgt = parse_number(tag)
        if tpgt > 65535:
            raise ProtocolError("portal group tag above 65535")
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ProtocolError(f"bad IPv6 TargetAddress {value[:64]!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = address.partition(":")
    if not host:
        raise ProtocolError(f"TargetAddress without host: {value[:64]!r}")
    port = ISCSI_DEFAULT_PORT
    if port_text:
        if not _DECIMAL.match(port_text) or not 0 < int(port_text) < 65536:
            raise ProtocolError(f"bad port in TargetAddress {value[:64]!r}")
        port = int(port_text)
    return host, port, tpgt


def format_target_address(host: str, port: int, tpgt: int) -> str:
    """The inverse of :func:`parse_target_address`; IPv6 hosts get brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port},{tpgt}"


def parse_send_targets(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Group a SendTargets answer (RFC 7143 Appendix C / §13.3): each TargetName
    is followed by the TargetAddress values that belong to it."""
    targets: list[tuple[str, list[str]]] = []
    for key, value in pairs:
        if key == "TargetName":
            targets.append((value, []))
        elif key == "TargetAddress":
            if not targets:
                raise ProtocolError("TargetAddress before any TargetName in SendTargets answer")
            targets[-1][1].append(value)
    return targets


# --------------------------------------------------------------------------------------
# The key table (RFC 7143 §13)
# --------------------------------------------------------------------------------------


class Kind(enum.Enum):
    LIST = "list"                # §6.2.1: first offered value the responder supports
    MIN = "numerical-min"        # §6.2.2: result is the smaller of the two values
    MAX = "numerical-max"        # §6.2.2: result is the larger
    AND = "boolean-and"          # §6.2.2
    OR = "boolean-or"            # §6.2.2
    DECLARATIVE = "declarative"  # §6.2: each side states its own value, no answer
    AUTH = "authentication"      # §12: answered by iscsi.auth
    REQUEST = "request"          # SendTargets: answered by the discovery code
    OBSOLETE = "obsolete"        # §13.25: RFC 3720 marker keys


class Scope(enum.Enum):
    SESSION = "session-wide"
    CONNECTION = "connection-only"


INITIATOR: frozenset[str] = frozenset({"initiator"})
TARGET: frozenset[str] = frozenset({"target"})
BOTH: frozenset[str] = INITIATOR | TARGET

_SEC: frozenset[str] = frozenset({"security"})
_OP: frozenset[str] = frozenset({"operational"})
_FFP: frozenset[str] = frozenset({"ffp"})
_LOGIN: frozenset[str] = _SEC | _OP
_ALL: frozenset[str] = _LOGIN | _FFP


@dataclass(frozen=True)
class KeySpec:
    """How one key is negotiated.

    ``phases`` are where it may appear: "security" (only the keys RFC 7143 §12
    lists), "operational", "ffp" (Text requests in full feature phase).
    """

    name: str
    kind: Kind
    default: str | None
    scope: Scope
    phases: frozenset[str]
    senders: frozenset[str]
    ref: str
    leading_only: bool = False
    irrelevant_in_discovery: bool = False
    values: tuple[str, ...] = ()       # allowed values (lists, enumerations)
    low: int = 0                       # numerical range, inclusive
    high: int = 0
    # May legitimately occur more than once -- in what the *target* sends (SendTargets answers
    # list many TargetName/TargetAddress pairs, §13.3, Appendix C).  An initiator declares its
    # TargetName once; a second one is a redeclaration the target must detect (§6.2).
    repeatable: bool = False


def _k(*args, **kw) -> KeySpec:
    return KeySpec(*args, **kw)


_S, _C = Scope.SESSION, Scope.CONNECTION
_DIGESTS = ("CRC32C", "None")

_TABLE: tuple[KeySpec, ...] = (
    _k("HeaderDigest", Kind.LIST, "None", _C, _OP, BOTH, "RFC 7143 §13.1", values=_DIGESTS),
    _k("DataDigest", Kind.LIST, "None", _C, _OP, BOTH, "RFC 7143 §13.1", values=_DIGESTS),
    _k("MaxConnections", Kind.MIN, "1", _S, _OP, BOTH, "RFC 7143 §13.2", leading_only=True,
       irrelevant_in_discovery=True, low=1, high=65535),
    _k("SendTargets", Kind.REQUEST, None, _S, _FFP, INITIATOR, "RFC 7143 §13.3"),
    # The initiator declares TargetName at login; a target sends it only inside
    # SendTargets answers, where it repeats.
    _k("TargetName", Kind.DECLARATIVE, None, _S, _ALL, BOTH, "RFC 7143 §13.4", repeatable=True),
    _k("InitiatorName", Kind.DECLARATIVE, None, _S, _LOGIN, INITIATOR, "RFC 7143 §13.5"),
    _k("TargetAlias", Kind.DECLARATIVE, None, _S, _ALL, TARGET, "RFC 7143 §13.6"),
    _k("InitiatorAlias", Kind.DECLARATIVE, None, _S, _ALL, INITIATOR, "RFC 7143 §13.7"),
    _k("TargetAddress", Kind.DECLARATIVE, None, _S, _ALL, TARGET, "RFC 7143 §13.8",
       repeatable=True),
    _k("TargetPortalGroupTag", Kind.DECLARATIVE, None, _S, _LOGIN, TARGET, "RFC 7143 §13.9",
       low=0, high=65535),
    _k("InitialR2T", Kind.OR, "Yes", _S, _OP, BOTH, "RFC 7143 §13.10", leading_only=True,
       irrelevant_in_discovery=True),
    _k("ImmediateData", Kind.AND, "Yes", _S, _OP, BOTH, "RFC 7143 §13.11", leading_only=True,
       irrelevant_in_discovery=True),
    _k("MaxRecvDataSegmentLength", Kind.DECLARATIVE, "8192", _C, _OP | _FFP, BOTH,
       "RFC 7143 §13.12", low=_SEGMENT_MIN, high=_SEGMENT_MAX),
    _k("MaxBurstLength", Kind.MIN, "262144", _S, _OP, BOTH, "RFC 7143 §13.13",
       leading_only=True, irrelevant_in_discovery=True, low=_SEGMENT_MIN, high=_SEGMENT_MAX),
    _k("FirstBurstLength", Kind.MIN, "65536", _S, _OP, BOTH, "RFC 7143 §13.14",
       leading_only=True, irrelevant_in_discovery=True, low=_SEGMENT_MIN, high=_SEGMENT_MAX),
    _k("DefaultTime2Wait", Kind.MAX, "2", _S, _OP, BOTH, "RFC 7143 §13.15", leading_only=True,
       low=0, high=3600),
    _k("DefaultTime2Retain", Kind.MIN, "20", _S, _OP, BOTH, "RFC 7143 §13.16",
       leading_only=True, low=0, high=3600),
    _k("MaxOutstandingR2T", Kind.MIN, "1", _S, _OP, BOTH, "RFC 7143 §13.17", leading_only=True,
       irrelevant_in_discovery=True, low=1, high=65535),
    _k("DataPDUInOrder", Kind.OR, "Yes", _S, _OP, BOTH, "RFC 7143 §13.18", leading_only=True,
       irrelevant_in_discovery=True),
    _k("DataSequenceInOrder", Kind.OR, "Yes", _S, _OP, BOTH, "RFC 7143 §13.19",
       leading_only=True, irrelevant_in_discovery=True),
    _k("ErrorRecoveryLevel", Kind.MIN, "0", _S, _OP, BOTH, "RFC 7143 §13.20", leading_only=True,
       low=0, high=2),
    _k("SessionType", Kind.DECLARATIVE, "Normal", _S, _LOGIN, INITIATOR, "RFC 7143 §13.21",
       leading_only=True, values=("Discovery", "Normal")),
    _k("TaskReporting", Kind.LIST, "RFC3720", _S, _OP, BOTH, "RFC 7143 §13.23",
       leading_only=True, irrelevant_in_discovery=True,
       values=("RFC3720", "ResponseFence", "FastAbort")),
    _k("iSCSIProtocolLevel", Kind.MIN, "0", _S, _OP, BOTH, "RFC 7144 §2.1", leading_only=True,
       low=0, high=31),
    # §13.25: obsolete RFC 3720 markers; never NotUnderstood.
    _k("IFMarker", Kind.OBSOLETE, None, _C, _OP, BOTH, "RFC 7143 §13.25"),
    _k("OFMarker", Kind.OBSOLETE, None, _C, _OP, BOTH, "RFC 7143 §13.25"),
    _k("IFMarkInt", Kind.OBSOLETE, None, _C, _OP, BOTH, "RFC 7143 §13.25"),
    _k("OFMarkInt", Kind.OBSOLETE, None, _C, _OP, BOTH, "RFC 7143 §13.25"),
    # §12: security negotiation keys, answered by iscsi.auth
    _k("AuthMethod", Kind.AUTH, None, _C, _SEC, BOTH, "RFC 7143 §12",
       values=("KRB5", "SRP", "CHAP", "None")),
    *(_k(name, Kind.AUTH, None, _C, _SEC, BOTH, "RFC 7143 §12.1.3")
      for name in ("CHAP_A", "CHAP_I", "CHAP_C", "CHAP_N", "CHAP_R")),
    *(_k(name, Kind.AUTH, None, _C, _SEC, BOTH, "RFC 7143 §12.1.2")
      for name in ("SRP_U", "SRP_TARGET_AUTH", "SRP_GROUP", "SRP_A", "SRP_B", "SRP_M",
                   "SRP_HM", "SRP_s")),
    *(_k(name, Kind.AUTH, None, _C, _SEC, BOTH, "RFC 7143 §12.1.1")
      for name in ("KRB_AP_REQ", "KRB_AP_REP")),
)

#: Every RFC 7143 §13 key (and §12 security key) by name.  X-/X# extension keys
#: and anything else unknown are answered NotUnderstood (§6.2).
KEYS: Mapping[str, KeySpec] = MappingProxyType({spec.name: spec for spec in _TABLE})

#: The order in which an initiator offers operational keys (the order open-iscsi
#: uses, so targets that are picky about order see something familiar).
_INITIATOR_OFFER_ORDER = (
    "HeaderDigest", "DataDigest", "DefaultTime2Wait", "DefaultTime2Retain",
    "ErrorRecoveryLevel", "InitialR2T", "ImmediateData", "MaxBurstLength",
    "FirstBurstLength", "MaxOutstandingR2T", "MaxConnections", "DataPDUInOrder",
    "DataSequenceInOrder",
)
_NEGOTIATED_KINDS = frozenset({Kind.LIST, Kind.MIN, Kind.MAX, Kind.AND, Kind.OR})

# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionParams:
    """Session-wide results (RFC defaults until negotiated otherwise)."""

    session_type: str = "Normal"
    initiator_name: str | None = None
    target_name: str | None = None
    initiator_alias: str | None = None
    target_alias: str | None = None
    target_portal_group_tag: int | None = None
    max_connections: int = 1
    initial_r2t: bool = True
    immediate_data: bool = True
    max_burst_length: int = 262144
    first_burst_length: int = 65536
    default_time2wait: int = 2
    default_time2retain: int = 20
    max_outstanding_r2t: int = 1
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    error_recovery_level: int = 0
    task_reporting: str = "RFC3720"
    iscsi_protocol_level: int = 0


@dataclass(frozen=True)
class ConnectionParams:
    """Connection-only results.

    ``max_recv_data_segment_length`` is this side's own declaration (the most it
    will receive in one PDU); ``max_send_data_segment_length`` is the peer's
    declaration (the most this side may send).  Both default to 8192 (§13.12).
    """

    header_digest: bool = False
    data_digest: bool = False
    max_recv_data_segment_length: int = 8192
    max_send_data_segment_length: int = 8192


@dataclass(frozen=True)
class Negotiated:
    session: SessionParams = field(default_factory=SessionParams)
    connection: ConnectionParams = field(default_factory=ConnectionParams)


_SESSION_FIELDS = {
    "MaxConnections": "max_connections", "InitialR2T": "initial_r2t",
    "ImmediateData": "immediate_data", "MaxBurstLength": "max_burst_length",
    "FirstBurstLength": "first_burst_length", "DefaultTime2Wait": "default_time2wait",
    "DefaultTime2Retain": "default_time2retain", "MaxOutstandingR2T": "max_outstanding_r2t",
    "DataPDUInOrder": "data_pdu_in_order", "DataSequenceInOrder": "data_sequence_in_order",
    "ErrorRecoveryLevel": "error_recovery_level", "TaskReporting": "task_reporting",
    "iSCSIProtocolLevel": "iscsi_protocol_level",
}


def _to_str(value: object) -> str:
    if isinstance(value, bool):
        return "Yes" if value else "No"
    return str(value)


def _values_from(neg: Negotiated) -> dict[str, str]:
    values = {key: _to_str(getattr(neg.session, attr)) for key, attr in _SESSION_FIELDS.items()}
    values["HeaderDigest"] = "CRC32C" if neg.connection.header_digest else "None"
    values["DataDigest"] = "CRC32C" if neg.connection.data_digest else "None"
    return values


# --------------------------------------------------------------------------------------
# The negotiator
# --------------------------------------------------------------------------------------


def _split_list(value: str) -> list[str]:
    return [item for item in value.split(",") if item]


def _phase_ok(phase: str) -> None:
    if phase not in ("security", "operational", "ffp"):
        raise ValueError(f"unknown phase {phase!r}")


class Negotiator:
    """One side of one negotiation (a whole login, or one full-feature Text exchange).

    ``local`` holds this side's values as RFC key names and strings, on top of
    :data:`TARGET_DEFAULTS` / :data:`INITIATOR_DEFAULTS`: limits for numerical
    keys (what we answer at most/least), preferences for booleans, the supported
    list for list keys (in order of preference for our own offers), and
    declarations (MaxRecvDataSegmentLength; the target's TargetPortalGroupTag and
    TargetAlias; the initiator's InitiatorName, InitiatorAlias, TargetName).

    ``initial`` gives the values already in force (a non-leading connection, or a
    Text exchange in full feature phase); RFC defaults otherwise.
    """

    def __init__(self, role: Role, *, session_type: str = "Normal",
                 local: Mapping[str, str] | None = None, leading: bool = True,
                 initial: Negotiated | None = None) -> None:
        if role not in ("target", "initiator"):
            raise ValueError(f"role must be 'target' or 'initiator', not {role!r}")
        if session_type not in ("Normal", "Discovery"):
            raise ValueError(f"unknown session type {session_type!r}")
        self.role: Role = role
        self.peer_role = "initiator" if role == "target" else "target"
        self.session_type = session_type
        self.leading = leading
        defaults = TARGET_DEFAULTS if role == "target" else INITIATOR_DEFAULTS
        self.local: dict[str, str] = {**defaults, **(local or {})}
        self._explicit = frozenset(local or {})
        self._validate_local()
        self._initial = initial or Negotiated()
        # current (agreed or default) values of negotiated keys
        self._values: dict[str, str] = (
            _values_from(initial) if initial is not None
            else {s.name: s.default for s in _TABLE if s.kind in _NEGOTIATED_KINDS and s.default}
        )
        self._received: dict[str, str] = {}       # keys the peer sent (offers/declarations)
        self._offered: dict[str, str] = {}        # our offers awaiting an answer
        self._optional: set[str] = set()          # ... whose answer is optional (§6.2.2)
        self._answered: set[str] = set()          # our offers the peer has answered
        self._sent_declarations: dict[str, str] = {}
        self.peer_declared: dict[str, str] = {}   # the peer's declarations
        self.send_targets: str | None = None      # SendTargets value, if requested
        self._identity_sent = False
        self._operational_sent = False

    # ------------------------------------------------------------------ local values

    def _validate_local(self) -> None:
        for key, value in self.local.items():
            spec = KEYS.get(key)
            if spec is None or spec.kind in (Kind.AUTH, Kind.REQUEST, Kind.OBSOLETE):
                raise ValueError(f"local value for unsupported key {key!r}")
            if spec.kind is Kind.LIST:
                items = _split_list(value)
                if not items or any(v not in spec.values for v in items):
                    raise ValueError(f"local {key}={value!r}: values must come from {spec.values}")
            elif spec.kind in (Kind.MIN, Kind.MAX) or (spec.kind is Kind.DECLARATIVE and spec.high):
                if not _DECIMAL.match(value) or not spec.low <= int(value) <= spec.high:
                    raise ValueError(f"local {key}={value!r} outside {spec.low}..{spec.high}")
            elif spec.kind in (Kind.AND, Kind.OR):
                if value not in ("Yes", "No"):
                    raise ValueError(f"local {key}={value!r} must be Yes or No")
        if int(self.local["FirstBurstLength"]) > int(self.local["MaxBurstLength"]):
            # RFC 7143 §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength. A MaxBurstLength
            # pinned below the default FirstBurstLength (262144) without a FirstBurstLength of its
            # own lowers the default with it; only an explicit contradictory pair is an error.
            if "FirstBurstLength" in self._explicit:
                raise ValueError("local FirstBurstLength exceeds MaxBurstLength (RFC 7143 §13.14)")
            self.local["FirstBurstLength"] = self.local["MaxBurstLength"]

    def _acceptable(self, spec: KeySpec, current: str) -> bool:
        """Whether a value in force would be acceptable to this side."""
        mine = self.local.get(spec.name)
        if mine is None:
            return True
        if spec.kind is Kind.LIST:
            return current in _split_list(mine)
        if spec.kind is Kind.MIN:
            return int(current) <= int(mine)
        if spec.kind is Kind.MAX:
            return int(current) >= int(mine)
        if spec.kind is Kind.AND:
            return not (mine == "No" and current == "Yes")
        if spec.kind is Kind.OR:
            return not (mine == "Yes" and current == "No")
        return True

    def _relevant(self, spec: KeySpec) -> bool:
        if self.session_type == "Discovery" and spec.irrelevant_in_discovery:
            return False
        return self.leading or not spec.leading_only

    # ------------------------------------------------------------------ receiving

    def respond(self, received: Iterable[tuple[str, str]], phase: Phase) -> list[tuple[str, str]]:
        """Process keys received from the peer; return the answers to send.

        Raises :class:`NegotiationError` when the login cannot continue: a key
        sent twice (§6.2: renegotiation "MUST be detected"; the target then
        rejects the login with initiator error), a key outside its phase
        (only the §12 list is allowed in the security stage), an illegal answer to
        one of our offers, or no acceptable value for a key whose default we
        cannot accept.  In full feature phase, keys out of place are answered
        Irrelevant instead.
        """
        _phase_ok(phase)
        received = list(received)
        # SessionType decides relevance of the keys next to it, whatever the order.
        for key, value in received:
            if key == "SessionType" and self.role == "target" and value in ("Normal", "Discovery"):
                if "SessionType" not in self._received:
                    self.session_type = value
        answers: list[tuple[str, str]] = []
        for key, value in received:
            # A key repeated within one request or across the login is caught by
            # the same bookkeeping: _received, _answered.
            spec = KEYS.get(key)
            repeatable = spec is not None and spec.repeatable and self.peer_role == "target"
            if key in self._offered:
                self._absorb_answer(key, value)
                continue
            if spec is None:
                # Unknown, including X- and X# extension keys (§6.2).
                if key not in self._received:
                    self._received[key] = value
                    answers.append((key, NOT_UNDERSTOOD))
                    continue
                raise NegotiationError(f"key {key} sent twice", key=key)
            if (key in self._received or key in self._answered) and not repeatable:
                if (spec.kind is Kind.DECLARATIVE and self._received.get(key) == value):
                    # An identical re-declaration changes nothing; libiscsi 1.19
                    # repeats its names in the first operational PDU after an
                    # AuthMethod=None security stage.
                    continue
                raise NegotiationError(f"key {key} negotiated or declared twice (RFC 7143 §6.2)",
                                       key=key)
            self._received[key] = value
            violation = self._placement_error(spec, phase)
            if violation:
                if phase == "ffp":
                    answers.append((key, IRRELEVANT))
                    continue
                raise NegotiationError(violation, key=key)
            answer = self._answer(spec, value)
            if answer == REJECT and not self._acceptable(spec, self._values.get(key, spec.default or "")):
                # The offer was malformed and the value left in force (the default) is one we
                # cannot accept (e.g. a target that requires ImmediateData=No): the key cannot
                # be negotiated again in this login, so the login fails (§6.2, §13).
                raise NegotiationError(f"{key}={value!r} rejected and the default is not acceptable",
                                       key=key)
            if answer is not None:
                answers.append((key, answer))
        self._fix_first_burst(answers)
        return answers

    absorb = respond

    def _placement_error(self, spec: KeySpec, phase: str) -> str | None:
        if self.peer_role not in spec.senders:
            return f"{spec.name} may not be sent by the {self.peer_role} ({spec.ref})"
        if phase not in spec.phases:
            if phase == "security":
                return f"{spec.name} is not a security negotiation key (RFC 7143 §12)"
            return f"{spec.name} may not be sent in the {phase} phase ({spec.ref})"
        if spec.leading_only and not self.leading and spec.kind is not Kind.DECLARATIVE:
            return f"{spec.name} may only be negotiated on the leading connection ({spec.ref})"
        return None

    def _answer(self, spec: KeySpec, value: str) -> str | None:
        kind = spec.kind
        if kind is Kind.AUTH:
            return None
        if kind is Kind.REQUEST:
            self.send_targets = value
            return None
        if kind is Kind.DECLARATIVE:
            self._record_declaration(spec, value)
            return None
        if kind is Kind.OBSOLETE:
            # §13.25: IFMarkInt/OFMarkInt MUST be answered Reject; IFMarker/OFMarker
            # SHOULD be Reject and MAY be No.  No is what an RFC 3720 peer expects
            # and the AND of any boolean offer with our No.
            if spec.name in ("IFMarker", "OFMarker") and value in ("Yes", "No"):
                return "No"
            return REJECT
        if not self._relevant(spec):
            return IRRELEVANT
        mine = self.local.get(spec.name, spec.default or "")
        if kind is Kind.LIST:
            offered = _split_list(value)
            supported = _split_list(mine)
            for item in offered:
                if item in supported:
                    self._values[spec.name] = item
                    return item
            current = self._values.get(spec.name, spec.default or "")
            if self._acceptable(spec, current):
                return REJECT
            raise NegotiationError(
                f"{spec.name}: none of the offered values is acceptable (we support {mine})",
                key=spec.name)
        if kind in (Kind.MIN, Kind.MAX):
            try:
                number = parse_number(value)
            except ProtocolError:
                return REJECT
            if not spec.low <= number <= spec.high:
                return REJECT
            result = min(number, int(mine)) if kind is Kind.MIN else max(number, int(mine))
            self._values[spec.name] = str(result)
            return str(result)
        # booleans: answer even where §6.2.2 makes it optional; initiators expect it
        if value not in ("Yes", "No"):
            return REJECT
        if kind is Kind.AND:
            result = "Yes" if value == "Yes" and mine == "Yes" else "No"
        else:
            result = "Yes" if value == "Yes" or mine == "Yes" else "No"
        self._values[spec.name] = result
        return result

    def _record_declaration(self, spec: KeySpec, value: str) -> None:
        problem = None
        if spec.high:
            try:
                number = parse_number(value)
            except ProtocolError:
                number = -1
            if not spec.low <= number <= spec.high:
                problem = f"{spec.name}={value[:32]!r} outside {spec.low}..{spec.high} ({spec.ref})"
            else:
                value = str(number)
        elif spec.values and value not in spec.values:
            status = (LoginStatus.SESSION_TYPE_NOT_SUPPORTED if spec.name == "SessionType"
                      else LoginStatus.INITIATOR_ERROR)
            raise NegotiationError(f"{spec.name}={value[:32]!r} is not one of {spec.values}",
                                   status, spec.name)
        elif spec.name in ("InitiatorName", "TargetName"):
            raw = value.encode("utf-8")
            if not raw or len(raw) > MAX_ISCSI_NAME_LEN or any(c <= 0x20 or c == 0x7F for c in raw):
                problem = f"{spec.name} is not a valid iSCSI name (RFC 7143 §4.2.7.1)"
        if problem:
            raise NegotiationError(problem, key=spec.name)
        self.peer_declared[spec.name] = value   # repeatable keys: the last one

    def _absorb_answer(self, key: str, value: str) -> None:
        """Check and apply the peer's answer to our offer (§6.2.1, §6.2.2)."""
        offered = self._offered.pop(key)
        self._optional.discard(key)
        self._answered.add(key)
        spec = KEYS.get(key)
        if spec is None:
            return
        if value in (REJECT, IRRELEVANT, NOT_UNDERSTOOD):
            # "the negotiated key is left at its current value"; if that is not
            # acceptable to us we end the negotiation (§6.2).
            current = self._values.get(key, spec.default or "")
            if not self._acceptable(spec, current):
                raise NegotiationError(f"{key}: peer answered {value}, and {current} is not "
                                       "acceptable", key=key)
            return
        kind = spec.kind
        if kind is Kind.LIST:
            if "," in value or value not in _split_list(offered):
                raise NegotiationError(f"{key}: answer {value[:32]!r} was not offered "
                                       "(RFC 7143 §6.2.1)", key=key)
            self._values[key] = value
        elif kind in (Kind.MIN, Kind.MAX):
            try:
                number = parse_number(value)
            except ProtocolError:
                raise NegotiationError(f"{key}: answer {value[:32]!r} is not a number",
                                       key=key) from None
            if not spec.low <= number <= spec.high:
                raise NegotiationError(f"{key}: answer {number} out of range", key=key)
            mine = int(offered)
            if (kind is Kind.MIN and number > mine) or (kind is Kind.MAX and number < mine):
                raise NegotiationError(f"{key}: answer {number} breaks the "
                                       f"{'minimum' if kind is Kind.MIN else 'maximum'} rule "
                                       f"for our offer {mine} (RFC 7143 §6.2.2)", key=key)
            self._values[key] = str(number)
        elif kind in (Kind.AND, Kind.OR):
            if value not in ("Yes", "No"):
                raise NegotiationError(f"{key}: answer {value[:32]!r} is not boolean", key=key)
            forced = "No" if kind is Kind.AND else "Yes"
            if offered == forced and value != forced:
                raise NegotiationError(f"{key}: answer {value} contradicts our {offered} "
                                       "(RFC 7143 §6.2.2)", key=key)
            self._values[key] = value
        if not self._acceptable(spec, self._values.get(key, "")):
            raise NegotiationError(f"{key}: result {self._values[key]} is not acceptable", key=key)

    def _fix_first_burst(self, answers: list[tuple[str, str]]) -> None:
        """FirstBurstLength MUST NOT exceed MaxBurstLength (RFC 7143 §13.14)."""
        for i, (key, value) in enumerate(answers):
            if key == "FirstBurstLength" and value.isdigit():
                limit = int(self._values.get("MaxBurstLength", "262144"))
                if int(value) > limit:
                    answers[i] = (key, str(limit))
                    self._values[key] = str(limit)

    # ------------------------------------------------------------------ sending

    def offer(self, keys: Mapping[str, str] | Iterable[tuple[str, str]],
              phase: Phase = "operational") -> list[tuple[str, str]]:
        """Propose keys (or declare them); returns the pairs to send.

        Negotiated keys wait in ``outstanding`` for their answer, except booleans
        whose outcome our offer already decides (AND with No, OR with Yes), for
        which §6.2.2 makes the answer optional.
        """
        _phase_ok(phase)
        items = list(keys.items()) if isinstance(keys, Mapping) else list(keys)
        out: list[tuple[str, str]] = []
        for key, value in items:
            spec = KEYS.get(key)
            if spec is None:
                if not key.startswith("X"):
                    raise ValueError(f"unknown key {key!r}")
                self._offered[key] = value
                out.append((key, value))
                continue
            if self.role not in spec.senders or phase not in spec.phases:
                raise ValueError(f"the {self.role} may not send {key} in the {phase} phase")
            if spec.kind in (Kind.AUTH, Kind.REQUEST):
                out.append((key, value))          # the caller's business
                continue
            if spec.kind is Kind.DECLARATIVE:
                self._sent_declarations[key] = value
                out.append((key, value))
                continue
            if key in self._offered or key in self._answered or key in self._received:
                raise ValueError(f"{key} was already negotiated in this exchange")
            self._offered[key] = value
            if spec.kind in (Kind.AND, Kind.OR) and value == ("No" if spec.kind is Kind.AND else "Yes"):
                self._values[key] = value     # our offer alone decides the outcome
                self._optional.add(key)
            out.append((key, value))
        return out

    @property
    def outstanding(self) -> frozenset[str]:
        """Our offers still waiting for an answer (do not leave the stage yet)."""
        return frozenset(self._offered.keys() - self._optional)

    def pending_declarations(self, phase: Phase) -> list[tuple[str, str]]:
        """Keys this side must send unasked, each returned once per negotiation.

        Target: TargetPortalGroupTag and TargetAlias in the first Login Response of
        a Normal session (§13.9, §13.6), in whatever stage it is; in the
        operational stage its MaxRecvDataSegmentLength (§13.12) and offers of keys
        whose current value it cannot accept (e.g. ImmediateData=No, or
        HeaderDigest=CRC32C when digests are required).  Nothing else goes into
        the security stage: open-iscsi refuses operational keys there.

        Initiator: InitiatorName, InitiatorAlias, SessionType and TargetName in the
        first Login Request; in the operational stage its MaxRecvDataSegmentLength
        and an offer of every operational key relevant to the session.
        """
        _phase_ok(phase)
        out: list[tuple[str, str]] = []
        if phase == "ffp":
            return out
        if not self._identity_sent:
            self._identity_sent = True
            if self.role == "target":
                if self.session_type == "Normal":
                    for key in ("TargetPortalGroupTag", "TargetAlias"):
                        if key in self.local:
                            out += self.offer({key: self.local[key]}, phase)
            else:
                idents = [("InitiatorName", self.local.get("InitiatorName")),
                          ("InitiatorAlias", self.local.get("InitiatorAlias"))]
                if self.leading:
                    idents.append(("SessionType", self.session_type))
                if self.session_type == "Normal":
                    idents.append(("TargetName", self.local.get("TargetName")))
                out += self.offer([(k, v) for k, v in idents if v is not None], phase)
        if phase == "operational" and not self._operational_sent:
            self._operational_sent = True
            mrdsl = "MaxRecvDataSegmentLength"
            if mrdsl not in self._sent_declarations:
                out += self.offer({mrdsl: self.local[mrdsl]}, phase)
            out += self.offer(self._operational_offers(), phase)
        return out

    def operational_offers_pending(self) -> bool:
        """Whether our operational-stage declarations would include offers needing an answer
        (e.g. HeaderDigest=CRC32C when digests are required) — then the stage cannot be skipped."""
        return not self._operational_sent and bool(self._operational_offers())

    def _operational_offers(self) -> list[tuple[str, str]]:
        if self.role == "initiator":
            # Everything open-iscsi offers, plus the newer keys only when the caller
            # asked for them: RFC 3720 targets answer those NotUnderstood.
            names = list(_INITIATOR_OFFER_ORDER) + [
                k for k in ("TaskReporting", "iSCSIProtocolLevel") if k in self._explicit]
        else:
            # A target offers only what it cannot leave at the current value.
            names = [s.name for s in _TABLE if s.kind in _NEGOTIATED_KINDS
                     and not self._acceptable(s, self._values.get(s.name, s.default or ""))]
        return [(name, self.local[name]) for name in names
                if self._relevant(KEYS[name]) and name in self.local
                and name not in self._received and name not in self._offered
                and name not in self._answered]

    # ------------------------------------------------------------------ results

    def missing_declarations(self) -> list[str]:
        """Keys the peer must have declared by now (after its first login PDU).

        The target needs InitiatorName, and TargetName for a Normal session
        (§13.4, §13.5; reject with MISSING_PARAMETER).  The initiator expects
        the TargetPortalGroupTag of a Normal session (§13.9).
        """
        if self.role == "target":
            needed = ["InitiatorName"] + (["TargetName"] if self.session_type == "Normal" else [])
        else:
            needed = ["TargetPortalGroupTag"] if self.session_type == "Normal" else []
        return [k for k in needed if k not in self.peer_declared]

    def negotiated(self) -> Negotiated:
        """The parameters in force: RFC defaults (or ``initial``) plus what was agreed."""
        v = self._values
        base = self._initial

        def declared(key: str, declarer: str, default: str | None) -> str | None:
            source = self._sent_declarations if declarer == self.role else self.peer_declared
            return source.get(key, default)

        max_burst = int(v["MaxBurstLength"])
        tpgt = declared("TargetPortalGroupTag", "target", None)
        session = replace(
            base.session,
            session_type=self.session_type,
            initiator_name=declared("InitiatorName", "initiator", base.session.initiator_name),
            # at login the initiator names the target it wants (§13.4)
            target_name=declared("TargetName", "initiator", base.session.target_name),
            initiator_alias=declared("InitiatorAlias", "initiator", base.session.initiator_alias),
            target_alias=declared("TargetAlias", "target", base.session.target_alias),
            target_portal_group_tag=(int(tpgt) if tpgt is not None
                                     else base.session.target_portal_group_tag),
            max_connections=int(v["MaxConnections"]),
            initial_r2t=v["InitialR2T"] == "Yes",
            immediate_data=v["ImmediateData"] == "Yes",
            max_burst_length=max_burst,
            first_burst_length=min(int(v["FirstBurstLength"]), max_burst),
            default_time2wait=int(v["DefaultTime2Wait"]),
            default_time2retain=int(v["DefaultTime2Retain"]),
            max_outstanding_r2t=int(v["MaxOutstandingR2T"]),
            data_pdu_in_order=v["DataPDUInOrder"] == "Yes",
            data_sequence_in_order=v["DataSequenceInOrder"] == "Yes",
            error_recovery_level=int(v["ErrorRecoveryLevel"]),
            task_reporting=v["TaskReporting"],
            iscsi_protocol_level=int(v["iSCSIProtocolLevel"]),
        )
        mrdsl = "MaxRecvDataSegmentLength"
        connection = ConnectionParams(
            header_digest=v["HeaderDigest"] == "CRC32C",
            data_digest=v["DataDigest"] == "CRC32C",
            max_recv_data_segment_length=int(self._sent_declarations.get(
                mrdsl, base.connection.max_recv_data_segment_length)),
            max_send_data_segment_length=int(self.peer_declared.get(
                mrdsl, base.connection.max_send_data_segment_length)),
        )
        return Negotiated(session=session, connection=connection)
