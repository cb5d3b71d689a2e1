"""What the iSCSI server asks the daemon during discovery and login.

The server (iscsi/target/server.py) knows sockets, PDUs and sessions; the daemon
knows the configuration.  These few calls are the whole contract between them, so
the server can be tested with a fake registry and the daemon with a fake server.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ChapCredentials:
    """CHAP secrets for one login (RFC 7143 §12.1.3).

    ``username``/``secret``: what the initiator must prove it knows (CHAP_N / CHAP_R).
    ``mutual_username``/``mutual_secret``: what the target answers with when the
    initiator sends its own CHAP_I/CHAP_C (mutual CHAP); None = mutual not offered.
    """

    username: str
    secret: str = field(repr=False)
    mutual_username: str | None = None
    mutual_secret: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # never a secret in a log line or a traceback
        mutual = "'***'" if self.mutual_secret is not None else "None"
        return (
            f"ChapCredentials(username={self.username!r}, secret='***', "
            f"mutual_username={self.mutual_username!r}, mutual_secret={mutual})"
        )

    __str__ = __repr__


@dataclass
class AccessGrant:
    """What one initiator gets from one target once it is allowed in.

    ``luns``: the LunMap this initiator sees (its ACL's LUN mapping); the daemon
    updates it in place on runtime changes, so sessions keep the same object.
    ``chap``: credentials the login must pass, or None for no authentication.
    ``params``: target-side key preferences (RFC 7143 §13 names), e.g.
    ``{"HeaderDigest": "CRC32C"}`` to require digests.
    """

    luns: Any
    chap: ChapCredentials | None = None
    params: dict[str, str] = field(default_factory=dict)


class TargetAccess(Protocol):
    name: str
    alias: str | None

    def portal_group_tag(self, local_host: str, local_port: int) -> int | None:
        """TPGT of the portal a connection arrived on; None = target not offered there."""
        ...

    def authorize(self, initiator_name: str) -> AccessGrant | None:
        """None = refused (login status 0x0202, authorization failure)."""
        ...


class TargetRegistry(Protocol):
    """Implemented by :class:`iscsi.target.daemon.TargetDaemon`."""

    def discovery_auth(self) -> ChapCredentials | None:
        """CHAP for discovery sessions; None = SendTargets needs no authentication."""
        ...

    def discovery_targets(self, initiator_name: str, local_host: str, local_port: int) -> list[tuple[str, list[str]]]:
        """SendTargets=All answer: ``[(iqn, ["127.0.0.1:3260,1", "[::1]:3260,2"])]``.

        Only targets this initiator may log in to, and only those offered on the portal
        the discovery connection arrived on (RFC 7143 §4.3, Appendix C).
        """
        ...

    def find_target(self, name: str) -> TargetAccess | None:
        ...
