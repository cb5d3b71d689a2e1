"""The target daemon's configuration: one data model, validated, saved atomically.

The file is JSON, indented, keys in a fixed order (the order of the dataclass
fields), so a person can read it and ``diff`` two versions.  It holds CHAP
secrets, so it is written with mode 0600.

Field notes this module answers:
- "config lost or partly restored at boot" (targetcli-fb #5, #39): saving is
  write-to-temp + fsync + rename + fsync(dir), so a crash leaves either the old
  or the new file, never half of one; loading is all-or-nothing and every error
  names the entry it is about (``targets[0] (iqn...).luns[1]: ...``).
"""
from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import os
import re
import stat
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..keys import TARGET_DEFAULTS
from ..keys import format_portal  # noqa: F401  (also the admin side's C.format_portal)

CONFIG_VERSION = 1
CONFIG_FILENAME = "target.json"

# RFC 7143 §4.2.7.1: "iSCSI names ... are limited to 223 bytes" (UTF-8 encoded).
MAX_ISCSI_NAME_BYTES = 223
# RFC 7143 §13.6: TargetAlias is a UTF-8 text value; text values are at most 255 bytes (§6.1).
MAX_ALIAS_BYTES = 255
# RFC 7143 §13.9: TargetPortalGroupTag is a 16-bit value. LIO and tgt number portal groups
# from 1 and ESXi takes 0 or 1 alike (field notes); we use 1..65535.
MIN_TPGT, MAX_TPGT = 1, 65535
# SAM-5 §4.7.7 flat space addressing carries a 14-bit LUN; REPORT LUNS encodes it as such.
MAX_LUN = 16383
BLOCK_SIZES = (512, 4096)
# The largest image a LUN can have: Linux file offsets are a signed 64-bit off_t (ftruncate
# and pread refuse more), so 8 EiB less one 4 KiB block keeps every LUN whole blocks of any
# supported size. Filesystems stop earlier (ext4: 16 TiB); that is the OS's error, reported.
MAX_LUN_BYTES = (1 << 63) - 4096
# SPC-4 §6.4.2 standard INQUIRY: T10 VENDOR IDENTIFICATION 8 bytes, PRODUCT IDENTIFICATION 16.
MAX_VENDOR_LEN, MAX_PRODUCT_LEN = 8, 16
# VPD 0x80 unit serial number: ASCII; 64 chars is ample and keeps VPD 0x83 T10 ids short.
MAX_SERIAL_LEN = 64
SERIAL_RE = re.compile(r"^[A-Za-z0-9._-]{1,%d}$" % MAX_SERIAL_LEN)
# RFC 7143 §12.1.3: an implementation SHOULD NOT answer CHAP unless the secret is at least
# 96 bits (or IPsec protects the connection; we never have IPsec). §9.2.1: secrets of at
# least 128 bits MUST be supported. The upper bound is only a sanity limit (open-iscsi
# stores up to 256 characters including the terminator).
MIN_CHAP_SECRET_BYTES = 12
MAX_CHAP_SECRET_BYTES = 255
# RFC 7143 §12.1.3 / RFC 1994: CHAP_N is a text value (at most 255 bytes, §6.1).
MAX_CHAP_NAME_BYTES = 255
DEFAULT_PORT = 3260  # RFC 7143 §4.2.4 / IANA well-known iSCSI port

LOOPBACK_V4 = "127.0.0.1"


class ConfigError(ValueError):
    """A configuration is invalid; the message names the entry and the rule."""


# --------------------------------------------------------------------------- names

# RFC 3722 §6 (stringprep profile for iSCSI names): after mapping, only letters, digits,
# '-', '.', ':' are allowed from ASCII (plus non-ASCII Unicode we do not accept here);
# uppercase is mapped to lowercase (§4), so the canonical form is lowercase.
_IQN_RE = re.compile(
    r"^iqn\.(?P<year>\d{4})-(?P<month>\d{2})"
    r"\.(?P<authority>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*)"
    r"(?::(?P<unique>[a-z0-9.:-]+))?$"
)
# RFC 7143 §4.2.7.6 (eui): "eui." + 16 hex digits (EUI-64).
_EUI_RE = re.compile(r"^eui\.[0-9a-f]{16}$")
# RFC 7143 §4.2.7.7 (naa, from RFC 3980): "naa." + 16 or 32 hex digits.
_NAA_RE = re.compile(r"^naa\.(?:[0-9a-f]{16}|[0-9a-f]{32})$")


def canonical_iscsi_name(name: str) -> str:
    """Validate an iSCSI name (iqn./eui./naa.) and return its canonical (lowercase) form.

    RFC 7143 §4.2.7 / RFC 3722: names are compared after stringprep, which maps
    uppercase to lowercase; we accept ASCII names only ("stringprep-lite").
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("an iSCSI name must be a non-empty string")
    if len(name.encode("utf-8")) > MAX_ISCSI_NAME_BYTES:
        raise ConfigError(
            f"iSCSI name {name!r} is {len(name.encode())} bytes; RFC 7143 §4.2.7.1 allows at most "
            f"{MAX_ISCSI_NAME_BYTES}"
        )
    lowered = name.lower()
    if not lowered.isascii():
        raise ConfigError(f"iSCSI name {name!r}: only ASCII names are supported")
    bad = sorted({c for c in lowered if not (c.isalnum() or c in "-.:")})
    if bad:
        raise ConfigError(
            f"iSCSI name {name!r} contains {''.join(bad)!r}; RFC 3722 allows only letters, "
            "digits, '-', '.' and ':'"
        )
    if lowered.startswith("iqn."):
        m = _IQN_RE.match(lowered)
        if not m:
            raise ConfigError(
                f"iSCSI name {name!r} is not of the form iqn.YYYY-MM.reversed.domain[:unique] "
                "(RFC 7143 §4.2.7.5), e.g. iqn.2026-11.org.example:disk1"
            )
        if not 1 <= int(m.group("month")) <= 12:
            raise ConfigError(f"iSCSI name {name!r}: month {m.group('month')} is not 01..12")
        return lowered
    if lowered.startswith("eui."):
        if not _EUI_RE.match(lowered):
            raise ConfigError(f"iSCSI name {name!r}: eui. must be followed by 16 hex digits (RFC 7143 §4.2.7.6)")
        return lowered
    if lowered.startswith("naa."):
        if not _NAA_RE.match(lowered):
            raise ConfigError(
                f"iSCSI name {name!r}: naa. must be followed by 16 or 32 hex digits (RFC 3980, RFC 7143 §4.2.7.7)"
            )
        return lowered
    raise ConfigError(f"iSCSI name {name!r} must start with iqn., eui. or naa. (RFC 7143 §4.2.7)")


# --------------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str | int) -> int:
    """Parse a size in bytes: ``4096``, ``512M``, ``1G``, ``10GiB`` (binary), ``1GB`` (decimal).

    ``K/M/G/T`` and ``KiB/MiB/GiB/TiB`` are powers of 1024 (as qemu-img reads them);
    ``KB/MB/GB/TB`` are powers of 1000, as the SI prefix says.
    """
    if isinstance(text, bool):
        raise ConfigError(f"size {text!r} is not a number")
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size {text} is negative")
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"size {text!r} is not understood (examples: 1073741824, 512M, 1G, 10GiB)")
    number, prefix, suffix = m.group(1), m.group(2).lower(), m.group(3).lower()
    if suffix == "i":
        raise ConfigError(f"size {text!r}: write {prefix.upper()}iB or {prefix.upper()}")
    base = 1000 if (suffix == "b" and prefix) else 1024
    multiplier = base ** _POWERS[prefix]
    if "." in number:
        value = float(number) * multiplier
        if value != int(value):
            raise ConfigError(f"size {text!r} is not a whole number of bytes")
        return int(value)
    return int(number) * multiplier


def format_size(size: int) -> str:
    """Render a byte count compactly and exactly: 1073741824 -> '1GiB', 1000 -> '1000'."""
    for unit, power in (("EiB", 6), ("PiB", 5), ("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if size and size % (1024**power) == 0:
            return f"{size // 1024 ** power}{unit}"
    return str(size)


# --------------------------------------------------------------------------- portals


def parse_portal(text: str) -> tuple[str, int]:
    """Parse ``host:port`` / ``[v6]:port`` / ``host`` into (canonical host, port).

    Hosts must be IP addresses (we bind to them; resolving names at load time would make
    the config depend on DNS).  Port defaults to 3260 (RFC 7143 §4.2.4 / IANA).
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("a portal must be a non-empty 'host:port' string")
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"portal {text!r}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"portal {text!r}: expected ':port' after ']'")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") == 0:
        host, port_text = text, ""
    else:
        raise ConfigError(f"portal {text!r}: write IPv6 addresses in brackets, e.g. [::1]:3260")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"portal {text!r}: {host!r} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        # [::ffff:a.b.c.d] cannot be bound (IPv6 sockets here are V6ONLY) and names the IPv4 portal.
        addr = addr.ipv4_mapped
    if port_text == "" and text.endswith(":"):
        # "127.0.0.1:$PORT" with PORT unset: listening on 3260 instead would be a surprise.
        raise ConfigError(f"portal {text!r}: no port after ':' (write {text}3260, or leave out the ':')")
    if port_text == "":
        port = DEFAULT_PORT
    else:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ConfigError(f"portal {text!r}: port {port_text!r} is not 1..65535")
        port = int(port_text)
    return str(addr), port


def canonical_portal(text: str) -> str:
    return format_portal(*parse_portal(text))


def is_wildcard(host: str) -> bool:
    return ipaddress.ip_address(host).is_unspecified


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


# --------------------------------------------------------------------------- params

_BOOL = ("Yes", "No")


def _digest_ok(value: str) -> bool:
    parts = value.split(",")
    return bool(parts) and len(set(parts)) == len(parts) and all(p in ("None", "CRC32C") for p in parts)


def _num(lo: int, hi: int):
    def check(value: str) -> bool:
        return value.isdigit() and lo <= int(value) <= hi

    check.__doc__ = f"a number {lo}..{hi}"
    return check


def _one_of(*choices: str):
    def check(value: str) -> bool:
        return value in choices

    check.__doc__ = " or ".join(choices)
    return check


_digest_ok.__doc__ = "a list of None and CRC32C, e.g. 'CRC32C,None' (offer) or 'CRC32C' (require)"

# Target-side preferences for RFC 7143 §13 keys an administrator may want to pin.
# Ranges are the RFC's own (§13.12 MaxRecvDataSegmentLength 512..2^24-1, §13.13/14 bursts,
# §13.17/18 times 0..3600, §13.20 ErrorRecoveryLevel 0..2, §13.2 MaxConnections 1..65535).
PARAM_RULES: dict[str, Any] = {
    "HeaderDigest": _digest_ok,
    "DataDigest": _digest_ok,
    "MaxConnections": _num(1, 65535),
    "InitialR2T": _one_of(*_BOOL),
    "ImmediateData": _one_of(*_BOOL),
    "MaxRecvDataSegmentLength": _num(512, 2**24 - 1),
    "MaxBurstLength": _num(512, 2**24 - 1),
    "FirstBurstLength": _num(512, 2**24 - 1),
    "DefaultTime2Wait": _num(0, 3600),
    "DefaultTime2Retain": _num(0, 3600),
    "MaxOutstandingR2T": _num(1, 65535),
    "DataPDUInOrder": _one_of(*_BOOL),
    "DataSequenceInOrder": _one_of(*_BOOL),
    "ErrorRecoveryLevel": _num(0, 2),
}
_PARAM_ALIASES = {"header_digest": "HeaderDigest", "data_digest": "DataDigest"}


def param_name(key: str) -> str:
    """The RFC 7143 §13 name of a key an administrator may pin; ConfigError when unknown."""
    name = _PARAM_ALIASES.get(key, key)
    if name not in PARAM_RULES:
        raise ConfigError(f"unknown iSCSI parameter {key!r}; known: {', '.join(sorted(PARAM_RULES))}")
    return name


def canonical_param(key: str, value: Any) -> tuple[str, str]:
    """Validate one key preference; returns (RFC key name, value as text)."""
    name = param_name(key)
    if value is None or isinstance(value, (list, dict)):
        # null read as the text "None" would silently mean "no digest" for HeaderDigest.
        raise ConfigError(f"parameter {name}={json.dumps(value)}: expected a text or number value")
    if isinstance(value, bool):
        text = "Yes" if value else "No"
    else:
        text = str(value).strip()
    if name in ("HeaderDigest", "DataDigest"):
        text = ",".join("CRC32C" if p.strip().upper() == "CRC32C" else p.strip().capitalize() for p in text.split(","))
    rule = PARAM_RULES[name]
    if not rule(text):
        raise ConfigError(f"parameter {name}={value!r}: expected {rule.__doc__}")
    return name, text


# --------------------------------------------------------------------------- model


def _mask(value: str | None) -> str | None:
    return None if value is None else "***"


@dataclass
class ChapConfig:
    """CHAP credentials (RFC 7143 §12.1.3). ``username``/``secret`` authenticate the
    initiator; ``mutual_*`` are what the target answers with when the initiator asks
    for mutual authentication."""

    username: str
    secret: str = field(repr=False)
    mutual_username: str | None = None
    mutual_secret: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return (
            f"ChapConfig(username={self.username!r}, secret='***', "
            f"mutual_username={self.mutual_username!r}, mutual_secret={_mask(self.mutual_secret)!r})"
        )

    @property
    def mutual(self) -> bool:
        return self.mutual_username is not None


@dataclass
class Lun:
    number: int
    path: str
    size: int | None = None  # bytes; None = use the existing image's size
    block_size: int = 512
    read_only: bool = False
    removable: bool = False
    serial: str | None = None  # None = derived stably from target, LUN and path
    # Reported physical block (READ CAPACITY 16 LBPPBE); None = the logical block size.
    # 4096 on a 512-byte LUN tells initiators to align to 4 KiB (as 512e disks do).
    physical_block_size: int | None = None
    vendor: str | None = None
    product: str | None = None


@dataclass
class Acl:
    initiator: str
    # ACL LUN -> target LUN; None means every target LUN under its own number.
    lun_map: dict[int, int] | None = None
    chap: ChapConfig | None = None  # None = the target's CHAP (if any)
    params: dict[str, str] = field(default_factory=dict)

    def mapping(self, target: "Target") -> dict[int, int]:
        """Effective ACL LUN -> target LUN mapping against the target's current LUNs."""
        numbers = {lun.number for lun in target.luns}
        if self.lun_map is None:
            return {n: n for n in sorted(numbers)}
        return {a: t for a, t in sorted(self.lun_map.items()) if t in numbers}


@dataclass
class PortalGroup:
    tag: int
    portals: list[str] = field(default_factory=list)


@dataclass
class Target:
    iqn: str
    alias: str | None = None
    portal_groups: list[PortalGroup] = field(default_factory=list)
    luns: list[Lun] = field(default_factory=list)
    acls: list[Acl] = field(default_factory=list)
    open_access: bool = False  # demo mode: any initiator may log in, every LUN visible
    chap: ChapConfig | None = None  # applies to open access and to ACLs without their own
    params: dict[str, str] = field(default_factory=dict)
    # Whether an initiator may send TARGET WARM / COLD RESET (RFC 7143 §11.5.1): either resets
    # every LU of the target for every initiator, and a cold reset also ends all their
    # sessions.  Refused (Task Management Response 6, not authorized) when False, as LIO does
    # by default; allowed by default here because libiscsi's conformance suite and the Linux
    # SCSI error handler's target reset use it.
    target_reset: bool = True

    def lun(self, number: int) -> Lun | None:
        return next((l for l in self.luns if l.number == number), None)

    def acl(self, initiator: str) -> Acl | None:
        wanted = initiator.lower()
        return next((a for a in self.acls if a.initiator.lower() == wanted), None)

    def portal_group(self, tag: int) -> PortalGroup | None:
        return next((g for g in self.portal_groups if g.tag == tag), None)

    def portals(self) -> Iterator[tuple[int, str]]:
        for group in self.portal_groups:
            for portal in group.portals:
                yield group.tag, portal


@dataclass
class Config:
    version: int = CONFIG_VERSION
    data_dir: str | None = None  # relative LUN paths are resolved against it
    discovery_auth: ChapConfig | None = None  # None = SendTargets needs no CHAP
    targets: list[Target] = field(default_factory=list)

    def target(self, iqn: str) -> Target | None:
        wanted = iqn.lower()
        return next((t for t in self.targets if t.iqn == wanted), None)

    def resolve_path(self, path: str) -> Path:
        """Absolute image path; relative paths live under ``data_dir``."""
        p = Path(path).expanduser()
        if not p.is_absolute():
            p = Path(self.data_dir or ".").expanduser() / p
        return Path(os.path.abspath(p))

    def serial_for(self, target: Target, lun: Lun) -> str:
        return lun.serial or default_serial(target.iqn, lun.number, str(self.resolve_path(lun.path)))

    def all_portals(self) -> set[tuple[str, int]]:
        """Every (host, port) some target is offered on: the listener set."""
        return {parse_portal(p) for t in self.targets for _, p in t.portals()}

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    # ---- validation

    def validate(self) -> None:
        """Check every rule; raises ConfigError naming the first bad entry."""
        if isinstance(self.version, bool) or self.version != CONFIG_VERSION:  # true == 1 in Python
            raise ConfigError(f"version: {self.version!r} is not supported (this daemon reads version {CONFIG_VERSION})")
        if self.data_dir is not None and not (isinstance(self.data_dir, str) and self.data_dir.strip()):
            raise ConfigError(f"data_dir: {self.data_dir!r} must be a directory path (a non-empty string) or null")
        if isinstance(self.data_dir, str) and "\x00" in self.data_dir:
            raise ConfigError(f"data_dir: {self.data_dir!r} contains a NUL character")
        if self.discovery_auth is not None:
            _validate_chap(self.discovery_auth, "discovery_auth")
        seen_targets: set[str] = set()
        seen_images: dict[Path, str] = {}
        for ti, target in enumerate(self.targets):
            where = f"targets[{ti}]"
            try:
                target.iqn = canonical_iscsi_name(target.iqn)
            except ConfigError as e:
                raise ConfigError(f"{where}.iqn: {e}") from None
            where = f"targets[{ti}] ({target.iqn})"
            if target.iqn in seen_targets:
                raise ConfigError(f"{where}: a target with this name is already defined")
            seen_targets.add(target.iqn)
            _validate_target(self, target, where, seen_images)
        self._check_serials_unique()
        self._check_secret_reuse()

    def _check_serials_unique(self) -> None:
        """The serial is what VPD 0x80 reports and what the LU's NAA and T10 designators in VPD
        0x83 derive from (SPC-4 §7.8.6: they identify one logical unit). Two LUs with one
        serial look like two paths to one disk: dm-multipath and ESXi merge them and spread
        writes meant for one image over both."""
        seen: dict[str, str] = {}
        for ti, target in enumerate(self.targets):
            for li, lun in enumerate(target.luns):
                serial = self.serial_for(target, lun)
                where = f"targets[{ti}] ({target.iqn}).luns[{li}] (LUN {lun.number})"
                if serial in seen:
                    raise ConfigError(
                        f"{where}.serial: {serial} is already the serial of {seen[serial]}; initiators "
                        "(multipath, ESXi) would take the two LUs for paths to one disk. Give each its own")
                seen[serial] = f"{target.iqn} LUN {lun.number}"

    def _chap_places(self) -> Iterator[tuple[str, ChapConfig]]:
        if self.discovery_auth is not None:
            yield "discovery_auth", self.discovery_auth
        for ti, t in enumerate(self.targets):
            if t.chap is not None:
                yield f"targets[{ti}] ({t.iqn}).chap", t.chap
            for ai, a in enumerate(t.acls):
                if a.chap is not None:
                    yield f"targets[{ti}] ({t.iqn}).acls[{ai}] ({a.initiator}).chap", a.chap

    def _check_secret_reuse(self) -> None:
        """RFC 7143 §12.1.3: a secret used to authenticate initiators MUST NOT be configured
        for authenticating a target (mutual CHAP) anywhere: a target answering challenges
        with it is an oracle for that secret. Messages name the places, never the secret."""
        initiator_secrets = {chap.secret: where for where, chap in self._chap_places()}
        for where, chap in self._chap_places():
            if chap.mutual_secret is not None and chap.mutual_secret in initiator_secrets:
                raise ConfigError(
                    f"{where}.mutual_secret: the same secret authenticates initiators at "
                    f"{initiator_secrets[chap.mutual_secret]}.secret; RFC 7143 §12.1.3 forbids that"
                )


def default_serial(target_iqn: str, lun: int, path: str) -> str:
    """A serial that is stable across restarts and unique per (target, LUN, image).

    ESXi reads only the first 8 characters of the T10 vendor-specific id (field notes),
    which the SCSI core builds from the serial, so every character here is hash output.
    """
    digest = hashlib.sha256(f"{target_iqn}\0{lun}\0{path}".encode()).hexdigest()
    return digest[:16]


def _check_text(value: Any, where: str, max_bytes: int) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: must be a non-empty string")
    if len(value.encode("utf-8")) > max_bytes:
        raise ConfigError(f"{where}: longer than {max_bytes} bytes")
    # Cc = C0, DEL and C1 (U+0080..U+009F; U+009B is a terminal CSI): names end up in
    # status tables, logs and the initiator's TargetAlias display.
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ConfigError(f"{where}: contains control characters")


def _validate_chap(chap: ChapConfig, where: str) -> None:
    _check_text(chap.username, f"{where}.username", MAX_CHAP_NAME_BYTES)
    validate_chap_secret(chap.secret, f"{where}.secret")
    if (chap.mutual_username is None) != (chap.mutual_secret is None):
        raise ConfigError(f"{where}: mutual CHAP needs both mutual_username and mutual_secret")
    if chap.mutual_username is not None:
        _check_text(chap.mutual_username, f"{where}.mutual_username", MAX_CHAP_NAME_BYTES)
        validate_chap_secret(chap.mutual_secret, f"{where}.mutual_secret")
        # A target that answers challenges with the initiator's own secret can be
        # used as an oracle against itself (reflection, RFC 7143 §9.2.1 / §12.1.3).
        if chap.mutual_secret == chap.secret:
            raise ConfigError(f"{where}: mutual_secret must differ from secret")


def validate_chap_secret(secret: Any, where: str = "secret") -> None:
    """RFC 7143 §12.1.3: at least 96 bits (12 bytes) without IPsec; whole bytes."""
    if not isinstance(secret, str):
        raise ConfigError(f"{where}: must be a string")
    n = len(secret.encode("utf-8"))
    if n < MIN_CHAP_SECRET_BYTES:
        raise ConfigError(
            f"{where}: {n} bytes is too short; RFC 7143 §12.1.3 requires at least "
            f"{MIN_CHAP_SECRET_BYTES} bytes (96 bits) without IPsec"
        )
    if n > MAX_CHAP_SECRET_BYTES:
        raise ConfigError(f"{where}: {n} bytes is too long; at most {MAX_CHAP_SECRET_BYTES} are accepted")
    if any(ord(c) < 0x20 or c == "\x7f" for c in secret):
        raise ConfigError(f"{where}: contains control characters (a stray newline or tab?)")


def _validate_params(params: dict, where: str) -> dict[str, str]:
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: must be an object of key: value")
    out: dict[str, str] = {}
    for key, value in params.items():
        try:
            name, text = canonical_param(key, value)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        out[name] = text
    return out


def _check_bursts(params: dict[str, str], where: str) -> None:
    """RFC 7143 §13.14: FirstBurstLength MUST NOT exceed MaxBurstLength. A pinned
    FirstBurstLength above the pinned (or default) MaxBurstLength is refused here rather than
    failing every login; a MaxBurstLength pinned alone lowers the default FirstBurstLength
    with it (iscsi/keys.py Negotiator)."""
    first = params.get("FirstBurstLength")
    if first is None:
        return
    most = params.get("MaxBurstLength", TARGET_DEFAULTS["MaxBurstLength"])
    if int(first) > int(most):
        raise ConfigError(f"{where}: FirstBurstLength={first} exceeds MaxBurstLength={most} (RFC 7143 §13.14)")


def _validate_target(cfg: Config, target: Target, where: str, seen_images: dict[Path, str]) -> None:
    if target.alias is not None:
        _check_text(target.alias, f"{where}.alias", MAX_ALIAS_BYTES)
    if not isinstance(target.open_access, bool):
        raise ConfigError(f"{where}.open_access: must be true or false")
    if not isinstance(target.target_reset, bool):
        raise ConfigError(f"{where}.target_reset: must be true or false")
    if target.chap is not None:
        _validate_chap(target.chap, f"{where}.chap")
    target.params = _validate_params(target.params, f"{where}.params")
    _check_bursts(target.params, f"{where}.params")

    tags: set[int] = set()
    portals: set[tuple[str, int]] = set()
    for gi, group in enumerate(target.portal_groups):
        gw = f"{where}.portal_groups[{gi}]"
        if isinstance(group.tag, bool) or not isinstance(group.tag, int) or not MIN_TPGT <= group.tag <= MAX_TPGT:
            raise ConfigError(f"{gw}.tag: {group.tag!r} is not {MIN_TPGT}..{MAX_TPGT} (RFC 7143 §13.9 TPGT)")
        if group.tag in tags:
            raise ConfigError(f"{gw}.tag: portal group {group.tag} is defined twice")
        tags.add(group.tag)
        canon = []
        for pi, portal in enumerate(group.portals):
            try:
                addr = parse_portal(portal)
            except ConfigError as e:
                raise ConfigError(f"{gw}.portals[{pi}]: {e}") from None
            # RFC 7143 §4.1 (portal groups): a network portal belongs to one group of a target.
            if addr in portals:
                raise ConfigError(f"{gw}.portals[{pi}]: {portal} is already in a portal group of this target")
            portals.add(addr)
            canon.append(format_portal(*addr))
        group.portals = canon

    numbers: set[int] = set()
    for li, lun in enumerate(target.luns):
        lw = f"{where}.luns[{li}]"
        if isinstance(lun.number, bool) or not isinstance(lun.number, int) or not 0 <= lun.number <= MAX_LUN:
            raise ConfigError(f"{lw}.number: {lun.number!r} is not 0..{MAX_LUN}")
        lw = f"{where}.luns[{li}] (LUN {lun.number})"
        if lun.number in numbers:
            raise ConfigError(f"{lw}: LUN {lun.number} is defined twice")
        numbers.add(lun.number)
        if not isinstance(lun.path, str) or not lun.path:
            raise ConfigError(f"{lw}.path: must be a non-empty string")
        if "\x00" in lun.path:  # no file name can hold one; os calls raise ValueError on it
            raise ConfigError(f"{lw}.path: {lun.path!r} contains a NUL character")
        image = cfg.resolve_path(lun.path)
        # Compared after symlinks are resolved: two LUNs on one file (each with its own cache
        # and write gathering) corrupt it whatever names lead there.
        real = Path(os.path.realpath(image))
        if real in seen_images:
            via = "" if real == image else f" (through the symlink {image})"
            raise ConfigError(f"{lw}.path: {real}{via} is already used by {seen_images[real]}")
        seen_images[real] = f"{target.iqn} LUN {lun.number}"
        if lun.block_size not in BLOCK_SIZES:
            raise ConfigError(f"{lw}.block_size: {lun.block_size!r} is not 512 or 4096")
        if lun.physical_block_size is not None and (
                lun.physical_block_size not in BLOCK_SIZES or lun.physical_block_size < lun.block_size
        ):
            raise ConfigError(f"{lw}.physical_block_size: {lun.physical_block_size!r} must be 512 or 4096 "
                              f"and not below the block size {lun.block_size}")
        if lun.size is not None:
            if isinstance(lun.size, bool) or not isinstance(lun.size, int) or lun.size <= 0:
                raise ConfigError(f"{lw}.size: {lun.size!r} is not a positive number of bytes")
            if lun.size % lun.block_size:
                raise ConfigError(f"{lw}.size: {lun.size} is not a multiple of the block size {lun.block_size}")
            if lun.size > MAX_LUN_BYTES:
                raise ConfigError(f"{lw}.size: {format_size(lun.size)} is more than a file can hold "
                                  f"(Linux offsets stop below 8EiB: at most {MAX_LUN_BYTES} bytes)")
        for name in ("read_only", "removable"):
            if not isinstance(getattr(lun, name), bool):
                raise ConfigError(f"{lw}.{name}: must be true or false")
        if lun.serial is not None and not (isinstance(lun.serial, str) and SERIAL_RE.match(lun.serial)):
            raise ConfigError(f"{lw}.serial: {lun.serial!r} must be 1..{MAX_SERIAL_LEN} of A-Z a-z 0-9 . _ -")
        for name, limit in (("vendor", MAX_VENDOR_LEN), ("product", MAX_PRODUCT_LEN)):
            value = getattr(lun, name)
            if value is not None and not (
                isinstance(value, str) and value.isascii() and value.isprintable() and 0 < len(value) <= limit
            ):
                raise ConfigError(f"{lw}.{name}: {value!r} must be 1..{limit} printable ASCII characters (SPC-4 §6.4.2)")

    initiators: set[str] = set()
    for ai, acl in enumerate(target.acls):
        aw = f"{where}.acls[{ai}]"
        try:
            acl.initiator = canonical_iscsi_name(acl.initiator)
        except ConfigError as e:
            raise ConfigError(f"{aw}.initiator: {e}") from None
        aw = f"{where}.acls[{ai}] ({acl.initiator})"
        if acl.initiator in initiators:
            raise ConfigError(f"{aw}: an ACL for this initiator is already defined")
        initiators.add(acl.initiator)
        if acl.chap is not None:
            _validate_chap(acl.chap, f"{aw}.chap")
        acl.params = _validate_params(acl.params, f"{aw}.params")
        _check_bursts({**target.params, **acl.params}, f"{aw}.params (with the target's)")  # as merged at login
        if acl.lun_map is not None:
            used: dict[int, int] = {}
            for acl_lun, target_lun in acl.lun_map.items():
                for value, what in ((acl_lun, "ACL LUN"), (target_lun, "target LUN")):
                    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LUN:
                        raise ConfigError(f"{aw}.lun_map: {what} {value!r} is not 0..{MAX_LUN}")
                if target_lun not in numbers:
                    raise ConfigError(f"{aw}.lun_map: {acl_lun} -> {target_lun}: the target has no LUN {target_lun}")
                if target_lun in used:
                    raise ConfigError(
                        f"{aw}.lun_map: target LUN {target_lun} is mapped twice (as {used[target_lun]} and {acl_lun})"
                    )
                used[target_lun] = acl_lun


# --------------------------------------------------------------------------- (de)serialisation


def _chap_to_dict(chap: ChapConfig | None, mask: bool) -> dict | None:
    if chap is None:
        return None
    return {
        "username": chap.username,
        "secret": "***" if mask else chap.secret,
        "mutual_username": chap.mutual_username,
        "mutual_secret": (_mask(chap.mutual_secret) if mask else chap.mutual_secret),
    }


def to_dict(cfg: Config, mask_secrets: bool = False) -> dict:
    """The file's content as plain data; ``mask_secrets`` for anything shown to a person."""
    return {
        "version": cfg.version,
        "data_dir": cfg.data_dir,
        "discovery_auth": _chap_to_dict(cfg.discovery_auth, mask_secrets),
        "targets": [
            {
                "iqn": t.iqn,
                "alias": t.alias,
                "open_access": t.open_access,
                "target_reset": t.target_reset,
                "chap": _chap_to_dict(t.chap, mask_secrets),
                "params": dict(sorted(t.params.items())),
                "portal_groups": [{"tag": g.tag, "portals": list(g.portals)} for g in t.portal_groups],
                "luns": [
                    {
                        "number": l.number,
                        "path": l.path,
                        "size": l.size,
                        "block_size": l.block_size,
                        "read_only": l.read_only,
                        "removable": l.removable,
                        "physical_block_size": l.physical_block_size,
                        "serial": l.serial,
                        "vendor": l.vendor,
                        "product": l.product,
                    }
                    for l in t.luns
                ],
                "acls": [
                    {
                        "initiator": a.initiator,
                        "lun_map": None if a.lun_map is None else {str(k): v for k, v in sorted(a.lun_map.items())},
                        "chap": _chap_to_dict(a.chap, mask_secrets),
                        "params": dict(sorted(a.params.items())),
                    }
                    for a in t.acls
                ],
            }
            for t in cfg.targets
        ],
    }


def dumps(cfg: Config, mask_secrets: bool = False) -> str:
    return json.dumps(to_dict(cfg, mask_secrets), indent=2, ensure_ascii=False) + "\n"


def _take(obj: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    """Check an object's keys: every required one present, nothing unknown (typos are loud)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected an object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return obj


def _list(obj: Any, where: str) -> list:
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise ConfigError(f"{where}: expected a list, got {type(obj).__name__}")
    return obj


def _chap_from(obj: Any, where: str) -> ChapConfig | None:
    if obj is None:
        return None
    d = _take(obj, where, ("username", "secret"), ("mutual_username", "mutual_secret"))
    return ChapConfig(d["username"], d["secret"], d.get("mutual_username"), d.get("mutual_secret"))


def _size_from(value: Any, where: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def from_dict(data: Any) -> Config:
    """Build and validate a Config; raises ConfigError naming the bad entry."""
    d = _take(data, "config", ("version",), ("data_dir", "discovery_auth", "targets"))
    cfg = Config(version=d["version"], data_dir=d.get("data_dir"))
    cfg.discovery_auth = _chap_from(d.get("discovery_auth"), "discovery_auth")
    for ti, t in enumerate(_list(d.get("targets"), "targets")):
        tw = f"targets[{ti}]"
        td = _take(t, tw, ("iqn",), ("alias", "open_access", "target_reset", "chap", "params", "portal_groups",
                                     "luns", "acls"))
        tw = f"targets[{ti}] ({td['iqn']})"
        target = Target(
            iqn=td["iqn"],
            alias=td.get("alias"),
            open_access=td.get("open_access", False),
            target_reset=td.get("target_reset", True),
            chap=_chap_from(td.get("chap"), f"{tw}.chap"),
            params=td.get("params") or {},
        )
        for gi, g in enumerate(_list(td.get("portal_groups"), f"{tw}.portal_groups")):
            gd = _take(g, f"{tw}.portal_groups[{gi}]", ("tag",), ("portals",))
            target.portal_groups.append(
                PortalGroup(gd["tag"], list(_list(gd.get("portals"), f"{tw}.portal_groups[{gi}].portals")))
            )
        for li, l in enumerate(_list(td.get("luns"), f"{tw}.luns")):
            lw = f"{tw}.luns[{li}]"
            ld = _take(
                l, lw, ("number", "path"),
                ("size", "block_size", "read_only", "removable", "serial", "vendor", "product",
                 "physical_block_size"),
            )
            target.luns.append(
                Lun(
                    number=ld["number"],
                    path=ld["path"],
                    size=_size_from(ld.get("size"), f"{lw}.size"),
                    block_size=ld.get("block_size", 512),
                    read_only=ld.get("read_only", False),
                    removable=ld.get("removable", False),
                    physical_block_size=ld.get("physical_block_size"),
                    serial=ld.get("serial"),
                    vendor=ld.get("vendor"),
                    product=ld.get("product"),
                )
            )
        for ai, a in enumerate(_list(td.get("acls"), f"{tw}.acls")):
            aw = f"{tw}.acls[{ai}]"
            ad = _take(a, aw, ("initiator",), ("lun_map", "chap", "params"))
            lun_map = ad.get("lun_map")
            if lun_map is not None:
                if not isinstance(lun_map, dict):
                    raise ConfigError(f"{aw}.lun_map: expected an object of \"acl_lun\": target_lun")
                try:
                    lun_map_in = lun_map
                    lun_map = {int(k): v for k, v in lun_map.items()}
                except ValueError:
                    raise ConfigError(f"{aw}.lun_map: keys must be LUN numbers") from None
                if len(lun_map) != len(lun_map_in):  # "0" and "00"
                    raise ConfigError(f"{aw}.lun_map: one ACL LUN is given twice")
            target.acls.append(
                Acl(ad["initiator"], lun_map, _chap_from(ad.get("chap"), f"{aw}.chap"), ad.get("params") or {})
            )
        cfg.targets.append(target)
    cfg.validate()
    return cfg


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys: in a hand-edited config the first
    (``"read_only": true`` ... ``"read_only": false``) would be ignored without a word."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"key {key!r} appears twice in one object; JSON would keep only the last: "
                              "say it once")
        out[key] = value
    return out


def loads(text: str) -> Config:
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # "[[[[...": no config nests more than a few levels
        raise ConfigError("not a config: JSON nested too deeply") from None
    return from_dict(data)


# --------------------------------------------------------------------------- files


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_digest(text: str) -> str:
    """The :func:`file_digest` of a file holding ``text`` (written as UTF-8, as saved)."""
    return _digest(text.encode("utf-8"))


def file_digest(path: str | os.PathLike) -> str | None:
    """The digest of the file's bytes now, or None when there is no file.

    The daemon keeps the digest of what it last read or wrote, so it can tell that someone
    edited the file since and refuse to save over the edit (a hand edit not yet reloaded
    would otherwise be lost without a word at the next admin command).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return _digest(data)


def load_config(path: str | os.PathLike) -> Config:
    """Load a config file, all or nothing.  Errors name the file and the bad entry.

    Without a ``data_dir`` in the file, relative image paths are taken from the
    file's own directory, and so is a relative ``data_dir`` (never from the daemon's
    working directory).
    """
    return read_config(path)[0]


def read_config(path: str | os.PathLike) -> tuple[Config, str]:
    """:func:`load_config`, and the :func:`file_digest` of the bytes it was built from."""
    path = Path(path)
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        cfg = loads(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.data_dir is None:  # relative image paths then live beside the file
        cfg.data_dir = str(path.absolute().parent)
    elif not Path(cfg.data_dir).expanduser().is_absolute():
        # A relative data_dir is taken from the file's directory too: the daemon's working
        # directory (/ under systemd) must not decide where images are created.
        cfg.data_dir = str(path.absolute().parent / cfg.data_dir)
    return cfg, _digest(data)


def check_not_writable_by_others(path: str | os.PathLike) -> None:
    """Refuse a config file that group or others may write: it names the files the daemon
    serves (any image, /etc/shadow too) and the CHAP secrets, so whoever may write it
    controls what the daemon (often root) exposes on the network."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o022:
        raise ConfigError(f"{path} is writable by group or others (mode {mode:04o}); "
                          "anyone who can write it chooses what is served; chmod 600 it")


def file_is_private(path: str | os.PathLike) -> bool:
    """True when group and others have no access (the file holds CHAP secrets)."""
    return stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0


def save_config(cfg: Config, path: str | os.PathLike) -> str:
    """Validate, then write atomically: temp file in the same directory, fsync, rename, fsync dir.

    A crash at any point leaves either the previous file or the new one; a leftover
    temp file is ignored by :func:`load_config` and removed by the next save.
    Returns the :func:`text_digest` of what was written.
    """
    cfg.validate()
    text = dumps(cfg)
    # Write through a symlink (config management often links /etc/... to the real file):
    # renaming over the link itself would turn it into a file and leave the real one stale.
    path = Path(os.path.realpath(path))
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in directory.glob(f".{path.name}.*.tmp"):
        try:
            stale.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return text_digest(text)


# --------------------------------------------------------------------------- LUN specs

# A last component that starts like a number ("-1", "1,5G", "10XB") was meant as a size, not
# as part of the file name: refuse it rather than create "disk.img:-1".
_LOOKS_LIKE_SIZE = re.compile(r"^\s*[-+]?[\d.,]*\d[\d.,]*\s*[A-Za-z]{0,3}\s*$")
LUN_SPEC_OPTIONS = "SIZE (e.g. 1G), ro, rw, removable, bs=N, pbs=N, serial=S, lun=N"

_FLAG_TOKENS = {"ro": ("read_only", True), "rw": ("read_only", False), "removable": ("removable", True)}


_OPTION_PREFIXES = ("bs=", "pbs=", "serial=", "lun=")
# "size=1G", "blocksize=4096": option syntax with a key we do not know.
_KEY_VALUE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*=[^/]*$")
# "readonly", "thin": a bare word, nothing like a file name (no '.', no '/').
_BARE_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def _is_option(token: str) -> bool:
    low = token.lower()
    return low in _FLAG_TOKENS or low.startswith(_OPTION_PREFIXES) or bool(_SIZE_RE.match(token))


def _misplaced_option(token: str, peeled: dict, inner: list[str]) -> bool:
    """Whether the component the option scan stopped at is a mistyped option, not part of the path.

    Without this, ``disk.img:readonly:1G`` serves a writable "disk.img:readonly" and
    ``disk.img:1G:readonly`` looks for an image of that name.
    """
    if _KEY_VALUE.match(token):
        return True
    if peeled and _BARE_WORD.match(token):
        return True
    return any(_is_option(part) for part in inner)


def parse_lun_spec(spec: str) -> Lun:
    """Parse the command-line LUN form ``PATH[:SIZE][:ro][:removable][:bs=4096][:pbs=4096][:serial=X][:lun=N]``.

    Options are peeled off the right end, so a path may itself contain ':' as long as
    its last component does not look like an option.  The LUN number is -1 when not
    given (the caller numbers LUNs in order).
    """
    parts = spec.split(":")
    opts: dict[str, Any] = {}
    while len(parts) > 1:
        token = parts[-1]
        low = token.lower()
        if low in _FLAG_TOKENS:
            key, value = _FLAG_TOKENS[low]
            opts[key] = value
        elif low.startswith("bs="):
            try:
                opts["block_size"] = parse_size(token[3:])
            except ConfigError:
                raise ConfigError(f"LUN spec {spec!r}: block size {token[3:]!r} is not a number") from None
        elif low.startswith("pbs="):
            try:
                opts["physical_block_size"] = parse_size(token[4:])
            except ConfigError:
                raise ConfigError(f"LUN spec {spec!r}: physical block size {token[4:]!r} is not a number") from None
        elif low.startswith("serial="):
            opts["serial"] = token[7:]
        elif low.startswith("lun="):
            if not token[4:].isdigit():
                raise ConfigError(f"LUN spec {spec!r}: {token!r} is not lun=NUMBER")
            opts["number"] = int(token[4:])
        elif _SIZE_RE.match(token):
            if "size" in opts:
                raise ConfigError(f"LUN spec {spec!r}: two sizes ({token} and {format_size(opts['size'])})")
            opts["size"] = parse_size(token)
        elif _LOOKS_LIKE_SIZE.match(token):
            if token.strip().startswith("-"):
                raise ConfigError(f"LUN spec {spec!r}: size {token!r} is negative")
            raise ConfigError(f"LUN spec {spec!r}: size {token!r} is not understood (examples: 512M, 1G, 10GiB)")
        else:
            if len(parts) > 1 and _misplaced_option(token, opts, parts[1:-1]) \
                    and not os.path.exists(":".join(parts)):  # an existing image named "vm:disk" is a path
                raise ConfigError(f"LUN spec {spec!r}: {token!r} is not a LUN option (options: {LUN_SPEC_OPTIONS}); "
                                  f"an image whose name has ':' in it must exist already, or be added with "
                                  f"'lun add --size'")
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise ConfigError(f"LUN spec {spec!r}: no image path")
    return Lun(
        number=opts.pop("number", -1),
        path=path,
        size=opts.pop("size", None),
        **opts,
    )


def next_free(numbers: set[int], start: int = 0) -> int:
    n = start
    while n in numbers:
        n += 1
    return n
