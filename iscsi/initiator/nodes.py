"""Saved node records, like ``iscsiadm -m node``: one record per (target, portal).

Records live in one JSON file (``$SANSTACK_INITIATOR_DIR/nodes.json``, default
``~/.config/sanstack-initiator``) written atomically with mode 0600 because it holds CHAP
secrets; the directory is 0700.  ``discover --save`` fills it, ``login``/``logout`` act on it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .url import IscsiUrl

FORMAT_VERSION = 1


def config_dir() -> Path:
    env = os.environ.get("SANSTACK_INITIATOR_DIR")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~/.config/sanstack-initiator"))


@dataclass
class NodeRecord:
    target: str
    host: str
    port: int
    tpgt: int = 1
    luns: list[int] | None = None        # None = every disk LUN the target reports
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    target_user: str | None = None
    target_password: str | None = field(default=None, repr=False)
    header_digest: str | None = None
    data_digest: str | None = None
    startup: str = "manual"              # "automatic": ``login --all`` includes it

    @property
    def key(self) -> str:
        return f"{self.target},{self.portal}"

    @property
    def portal(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self, lun: int = 0) -> IscsiUrl:
        return IscsiUrl(host=self.host, port=self.port, target=self.target, lun=lun, user=self.user,
                        password=self.password, target_user=self.target_user,
                        target_password=self.target_password, header_digest=self.header_digest,
                        data_digest=self.data_digest)

    def public(self) -> dict:
        d = asdict(self)
        for k in ("password", "target_password"):
            if d[k] is not None:
                d[k] = "***"
        return d


class NodeStoreError(ValueError):
    """The records file exists but cannot be read as one (hand-edited, truncated...)."""


class NodeStore:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_dir() / "nodes.json"

    def load(self) -> list[NodeRecord]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except ValueError as exc:          # not JSON, or not UTF-8
            raise NodeStoreError(f"{self.path}: not a node record file ({exc})") from None
        version = raw.get("version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise NodeStoreError(f"{self.path}: unknown format version {version!r}")
        try:
            return [NodeRecord(**r) for r in raw.get("nodes", [])]
        except TypeError as exc:           # a record with missing or unknown fields
            raise NodeStoreError(f"{self.path}: bad node record ({exc})") from None

    def save(self, nodes: list[NodeRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": FORMAT_VERSION, "nodes": [asdict(n) for n in nodes]}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def upsert(self, record: NodeRecord) -> None:
        nodes = [n for n in self.load() if n.key != record.key]
        nodes.append(record)
        self.save(nodes)

    def delete(self, target: str, portal: str | None = None) -> int:
        nodes = self.load()
        keep = [n for n in nodes if not (n.target == target and (portal is None or n.portal == portal))]
        if len(keep) != len(nodes):
            self.save(keep)
        return len(nodes) - len(keep)

    def find(self, target: str | None = None, portal: str | None = None) -> list[NodeRecord]:
        return [n for n in self.load()
                if (target is None or n.target == target) and (portal is None or n.portal == portal)]
