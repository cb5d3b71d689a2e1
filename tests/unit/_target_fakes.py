"""Fakes for the target daemon's collaborators: the SCSI core (units, LUN maps) and the server."""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from iscsi.target.config import Config, Lun, Target
from iscsi.target.daemon import Unit


class FakeBackstore:
    def __init__(self, size: int) -> None:
        self.size = size
        self.flushed = 0
        self.closed = False

    def flush(self) -> None:
        self.flushed += 1

    def close(self) -> None:
        self.closed = True

    def resize(self, size: int) -> None:
        self.size = size


class FakeLU:
    def __init__(self, backstore: FakeBackstore, serial: str, number: int) -> None:
        self.backstore = backstore
        self.serial = serial
        self.number = number
        self.capacity_changed = 0

    def resize(self, size: int) -> None:
        self.backstore.resize(size)
        self.capacity_changed += 1


class FakeLunMap(dict):
    def __init__(self, luns: dict[int, Any]) -> None:
        super().__init__(luns)
        self.changed = 0

    def report_luns_changed(self) -> None:
        self.changed += 1


class FakeProvider:
    """Opens "images" without touching the SCSI core; files are still created so paths are real."""

    def __init__(self) -> None:
        self.opened: list[Unit] = []
        self.closed: list[Unit] = []
        self.fail_paths: set[str] = set()

    def open(self, cfg: Config, target: Target, lun: Lun) -> Unit:
        image = cfg.resolve_path(lun.path)
        if str(image) in self.fail_paths or image.name in self.fail_paths:
            raise OSError(errno.EACCES, "Permission denied", str(image))
        size = lun.size if lun.size is not None else (image.stat().st_size if image.exists() else 0)
        if size == 0:
            raise FileNotFoundError(errno.ENOENT, "No such file", str(image))
        image.parent.mkdir(parents=True, exist_ok=True)
        with open(image, "ab") as f:
            if f.tell() < size:
                f.truncate(size)
        backstore = FakeBackstore(size)
        unit = Unit(lu=FakeLU(backstore, cfg.serial_for(target, lun), lun.number), backstore=backstore,
                    lun=lun, image=Path(image))
        self.opened.append(unit)
        return unit

    def new_map(self, luns: dict[int, Any]) -> FakeLunMap:
        return FakeLunMap(luns)

    def update_map(self, lun_map: FakeLunMap, luns: dict[int, Any]) -> None:
        lun_map.clear()
        lun_map.update(luns)
        lun_map.report_luns_changed()

    def resize(self, unit: Unit, new_size: int) -> None:
        unit.lu.resize(new_size)

    def close(self, unit: Unit) -> None:
        unit.backstore.flush()
        unit.backstore.close()
        self.closed.append(unit)


class FakeServer:
    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.portals: set[tuple[str, int]] = set()
        self.busy_ports: set[int] = set()
        self.session_rows: list[dict] = []
        self.dropped: list[tuple[str | None, str | None]] = []
        self.notified: list[str] = []
        self.shut_down = False

    async def add_portal(self, host: str, port: int) -> tuple[str, int]:
        if port in self.busy_ports:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.portals.add((host, port))
        return host, port

    async def remove_portal(self, host: str, port: int) -> None:
        self.portals.remove((host, port))

    def sessions(self) -> list[dict]:
        return [dict(r) for r in self.session_rows]

    async def drop_sessions(self, target: str | None = None, initiator: str | None = None,
                            tsih: int | None = None) -> int:
        self.dropped.append((target, initiator) if tsih is None else (target, initiator, tsih))
        before = len(self.session_rows)
        self.session_rows = [
            r for r in self.session_rows
            if not ((target is None or r["target"] == target) and (initiator is None or r["initiator"] == initiator)
                    and (tsih is None or r.get("tsih") == tsih))
        ]
        return before - len(self.session_rows)

    def notify_luns_changed(self, target: str) -> None:
        self.notified.append(target)

    async def shutdown(self) -> None:
        self.shut_down = True
        self.portals.clear()
