"""A registry and LUN map small enough to read, for target tests without the daemon."""
from __future__ import annotations

from dataclasses import dataclass, field

from iscsi.target.registry import AccessGrant, ChapCredentials


@dataclass
class FakeTarget:
    name: str
    alias: str | None = None
    tpgt: int = 1
    allowed: set[str] | None = None  # None = open ACL
    chap: ChapCredentials | None = None
    params: dict[str, str] = field(default_factory=dict)
    luns: object = None

    def portal_group_tag(self, host: str, port: int) -> int | None:
        return self.tpgt

    def authorize(self, initiator: str) -> AccessGrant | None:
        if self.allowed is not None and initiator not in self.allowed:
            return None
        return AccessGrant(luns=self.luns, chap=self.chap, params=dict(self.params))


@dataclass
class FakeRegistry:
    targets: dict[str, FakeTarget] = field(default_factory=dict)
    discovery_chap: ChapCredentials | None = None
    portal: str = "127.0.0.1:3260"

    def discovery_auth(self):
        return self.discovery_chap

    def discovery_targets(self, initiator, host, port):
        return [(t.name, [f"{host}:{port},{t.tpgt}"]) for t in self.targets.values()
                if t.allowed is None or initiator in t.allowed]

    def find_target(self, name):
        return self.targets.get(name)
