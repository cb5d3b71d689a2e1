"""A real TargetDaemon running a saved config in its own thread and loop, for admin-CLI tests.

The control socket lives in a short temp dir under /tmp (AF_UNIX paths are limited to ~100
bytes, pytest's tmp_path is longer); ``provider`` and ``server_factory`` let a test swap the
SCSI core or the iSCSI server for fakes.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from iscsi.target import config as C
from iscsi.target.daemon import TargetDaemon

START_TIMEOUT = 10.0


class ThreadedDaemon:
    def __init__(self, config: C.Config, config_path: Path, *, prefix: str, provider: Any = None,
                 server_factory: Callable[[Any], Any] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.ctl = self.dir / "c.sock"
        self.path = config_path
        C.save_config(config, self.path)
        self._provider = provider
        self._server_factory = server_factory
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.daemon = TargetDaemon(C.load_config(self.path), self.path, provider=self._provider,
                                   server_factory=self._server_factory, control_path=self.ctl)
        try:
            self.loop.run_until_complete(self.daemon.start())
        except BaseException as e:  # pragma: no cover - raised again by __enter__
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_until_complete(self.daemon._stop.wait())
        self.loop.run_until_complete(self.daemon.stop())

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(START_TIMEOUT)
        if self.error:
            raise self.error
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.daemon._stop.set)
        self.thread.join(START_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)

    def raw(self, request: dict) -> dict:
        """One hand-written control request, as any local root process may send."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.ctl))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf)
