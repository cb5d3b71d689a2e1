"""libiscsi-style URLs: ``iscsi://[user[%password]@]host[:port][/target-iqn[/lun]][?args]``.

The same syntax as libiscsi (lib/init.c, iscsi_parse_url) so a URL that works with
``iscsi-inq`` works here too.  Arguments understood:

* ``target_user`` / ``target_password`` — mutual CHAP (the target's name and secret);
* ``header_digest`` / ``data_digest`` — ``none``, ``crc32c``, ``none-crc32c``, ``crc32c-none``
  (preference order, libiscsi's spelling);
* ``initiator_name`` — our IQN for this URL.

User name and password are percent-decoded, so a secret may contain ``@`` or ``%`` as ``%40``/``%25``.
"""
from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field, replace

DEFAULT_PORT = 3260  # RFC 7143 §13.11 well-known port

_DIGEST_SPELLINGS = {
    "none": "None",
    "crc32c": "CRC32C",
    "none-crc32c": "None,CRC32C",
    "none,crc32c": "None,CRC32C",
    "crc32c-none": "CRC32C,None",
    "crc32c,none": "CRC32C,None",
}


class UrlError(ValueError):
    pass


@dataclass(frozen=True)
class IscsiUrl:
    host: str
    port: int = DEFAULT_PORT
    target: str | None = None
    lun: int = 0
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    target_user: str | None = None
    target_password: str | None = field(default=None, repr=False)
    header_digest: str | None = None   # RFC key value list, e.g. "None,CRC32C"
    data_digest: str | None = None
    initiator_name: str | None = None

    @property
    def portal(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def with_portal(self, host: str, port: int) -> "IscsiUrl":
        return replace(self, host=host, port=port)

    def to_string(self, *, secrets: bool = False) -> str:
        """Render back; secrets are replaced by ``***`` unless ``secrets``."""
        q = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
        auth = ""
        if self.user:
            auth = q(self.user)
            if self.password is not None:
                auth += "%" + (q(self.password) if secrets else "***")
            auth += "@"
        url = f"iscsi://{auth}{self.portal}"
        if self.target:
            url += f"/{self.target}/{self.lun}"
        args = []
        if self.target_user:
            args.append(f"target_user={q(self.target_user)}")
        if self.target_password is not None:
            args.append(f"target_password={q(self.target_password) if secrets else '***'}")
        if self.header_digest:
            args.append(f"header_digest={self.header_digest.lower().replace(',', '-')}")
        if self.data_digest:
            args.append(f"data_digest={self.data_digest.lower().replace(',', '-')}")
        if self.initiator_name:
            args.append(f"initiator_name={self.initiator_name}")
        return url + ("?" + "&".join(args) if args else "")

    def __str__(self) -> str:
        return self.to_string()


_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:/\[\]]+))(?::(?P<port>\d+))?$")


def parse_portal(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` → (host, port); also accepts a trailing ``,tpgt``."""
    text = text.strip().split(",", 1)[0]
    if text.count(":") >= 2 and "[" not in text:
        # A bare IPv6 address ("::1"): the port cannot be told from the address without
        # brackets (RFC 3986 §3.2.2), so it is the default one.
        try:
            return str(ipaddress.IPv6Address(text)), default_port
        except ValueError:
            raise UrlError(f"not a portal: {text!r} (write IPv6 as [addr]:port)") from None
    m = _HOSTPORT.match(text)
    if not m:
        raise UrlError(f"not a portal: {text!r}")
    host = m.group("v6") or m.group("host")
    port = int(m.group("port")) if m.group("port") else default_port
    if not 0 < port < 65536:
        raise UrlError(f"port out of range in {text!r}")
    return host, port


# user, separator, then anything up to the LAST '@': a secret typed with a raw '@', '/' or '?'
# is still hidden (over-redacting a malformed URL costs nothing).
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_AUTH = re.compile(r"^([^/@?%:]*)([%:]).*@", re.S)
_PASSWORD_ARG = re.compile(r"([?&]target_password=)[^&]*")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def redact(text: str) -> str:
    """``text`` (a URL, well-formed or not) with the CHAP secrets replaced by ``***``, for
    error messages and logs: a URL that fails to parse must not print its password."""
    m = _SCHEME.match(text)
    scheme, rest = (m.group(0), text[m.end():]) if m else ("", text)
    rest = _AUTH.sub(lambda a: f"{a.group(1)}{a.group(2)}***@", rest, count=1)
    return scheme + _PASSWORD_ARG.sub(r"\1***", rest)


def parse_url(text: str, *, require_target: bool = True) -> IscsiUrl:
    """Parse a libiscsi URL.  ``require_target=False`` allows ``iscsi://host[:port]`` (discovery)."""
    try:
        return _parse_url(text, require_target)
    except UrlError as exc:
        if redact(text) == text:
            raise
        # The URL carries a secret and a piece of it may be what failed to parse (a raw '/'
        # or '?' in the password moves the split): quote no fragment back.
        msg = _QUOTED.sub("'…'", str(exc))
        raise UrlError(f"{msg} in {redact(text)!r} (percent-encode '@', '/', '?' and '%' in a "
                       f"secret as %40, %2F, %3F, %25)") from None


def _parse_url(text: str, require_target: bool) -> IscsiUrl:
    if not text.startswith("iscsi://"):
        raise UrlError(f"URL must start with iscsi://: {redact(text)!r}")
    rest = text[len("iscsi://"):]
    query = ""
    if "?" in rest:
        rest, query = rest.split("?", 1)
    user = password = None
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        # The last '@' of the authority ends the user info, so a raw '@' in a secret works too.
        auth, _, host_part = authority.rpartition("@")
        rest = host_part + slash + path
        # libiscsi (lib/init.c iscsi_parse_url) splits user and password at the first '%',
        # or at the first ':' when there is no '%'; each part is then percent-decoded, so a
        # secret may carry "%40" for '@' (the user name cannot hold '%' or ':').
        sep = "%" if "%" in auth else (":" if ":" in auth else None)
        if sep:
            raw_user, raw_pw = auth.split(sep, 1)
            user = urllib.parse.unquote(raw_user)
            password = urllib.parse.unquote(raw_pw)
        else:
            user = urllib.parse.unquote(auth)
    parts = rest.split("/")
    host, port = parse_portal(parts[0])
    target = None
    lun = 0
    if len(parts) >= 2 and parts[1]:
        target = urllib.parse.unquote(parts[1])
        if len(parts) >= 3 and parts[2]:
            try:
                lun = int(parts[2])
            except ValueError:
                raise UrlError(f"LUN must be a number: {parts[2]!r}") from None
            if not 0 <= lun < 0x4000:
                raise UrlError(f"LUN {lun} out of range (0..16383)")
        if len(parts) > 3 and any(parts[3:]):
            raise UrlError(f"unexpected path after the LUN in {redact(text)!r}")
    if require_target and not target:
        raise UrlError(f"URL names no target: {redact(text)!r} (iscsi://host[:port]/iqn/lun)")
    args = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = set(args) - {"target_user", "target_password", "header_digest", "data_digest",
                           "initiator_name"}
    if unknown:
        raise UrlError(f"unknown URL argument(s): {', '.join(repr(k) for k in sorted(unknown))}")

    def digest(name: str) -> str | None:
        value = args.get(name)
        if value is None:
            return None
        try:
            return _DIGEST_SPELLINGS[value.lower()]
        except KeyError:
            raise UrlError(f"{name}={value!r}: use none, crc32c, none-crc32c or crc32c-none") from None

    return IscsiUrl(
        host=host, port=port, target=target, lun=lun, user=user, password=password,
        target_user=args.get("target_user"), target_password=args.get("target_password"),
        header_digest=digest("header_digest"), data_digest=digest("data_digest"),
        initiator_name=args.get("initiator_name"),
    )
