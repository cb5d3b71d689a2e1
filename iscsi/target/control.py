"""The daemon's local control socket: JSON lines over AF_UNIX, for root (or the daemon's user) only.

Request:  ``{"op": "lun.add", "args": {...}}\\n``
Response: ``{"ok": true, "result": ...}\\n`` or ``{"ok": false, "error": "clear message"}\\n``

Access control is twofold (issue 7, "control socket only for root"): the socket
file is created 0600 (a umask around bind, so there is no window where it is
wider), and every connection's peer credentials (SO_PEERCRED) are checked:
only uid 0 and the daemon's own uid are served.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Awaitable, Callable

from ..log import event
from .config import ConfigError

log = logging.getLogger("iscsi.target.control")

# A request carries at most a few names and a CHAP secret; 1 MiB bounds memory per client.
MAX_LINE = 1 << 20
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
# The client waits this long for an answer: creating or resizing an image is quick
# (sparse), but a change may wait behind another admin command holding the lock.
DEFAULT_TIMEOUT = 60.0
# How long an idle admin connection may stay open before the daemon closes it.
IDLE_TIMEOUT = 300.0
# How long a refused peer may take to send the request we discard.
DENY_READ_TIMEOUT = 1.0
SYSTEM_SOCKET = "/run/sanstack/iscsi-target.sock"

_PEERCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }

Handler = Callable[[str, dict], Awaitable[Any]]


class OperationFailed(Exception):
    """A request failed for a reason the user can act on (the message says which)."""


class ControlSocketBusy(ConfigError):
    """Another live daemon already serves this control socket path."""


class ControlError(Exception):
    """The daemon refused or failed a request; the message is for the user."""


class DaemonNotRunning(ControlError):
    """Nothing is listening on the control socket."""


def peer_uid(sock: socket.socket) -> int | None:
    try:
        _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (OSError, AttributeError):
        return None
    return uid


def _check_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ConfigError(f"control socket path {path} is longer than {MAX_SOCKET_PATH} bytes (AF_UNIX limit)")


def _someone_listening(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlServer:
    """asyncio side of the control socket; ``handler(op, args)`` does the work."""

    def __init__(self, path: str | os.PathLike, handler: Handler, allowed_uids: set[int] | None = None) -> None:
        self.path = Path(path)
        self.handler = handler
        self.allowed_uids = allowed_uids if allowed_uids is not None else {0, os.geteuid()}
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        _check_path(self.path)
        parent = self.path.parent
        if (parent.exists() or parent.is_symlink()) and not parent.is_dir():
            raise ConfigError(f"control socket path {self.path}: {parent} is not a directory")
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ConfigError(f"control socket path {self.path} exists and is not a socket")
            if _someone_listening(self.path):
                raise ControlSocketBusy(
                    f"another iscsi-target daemon is already listening on {self.path} "
                    "(stop it, or give this one another --control path)"
                )
            self.path.unlink()  # stale socket from a daemon that died
        try:
            if not parent.exists():
                parent.mkdir(parents=True, mode=0o700)
        except OSError as e:
            raise ConfigError(f"cannot create the control socket's directory {parent}: {e.strerror or e}") from None
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path), limit=MAX_LINE)
        except OSError as e:  # e.g. a read-only or missing /proc-like parent: say which path
            raise ConfigError(f"cannot create the control socket {self.path}: {e.strerror or e}") from None
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        st = self.path.stat()
        self._inode = (st.st_dev, st.st_ino)
        event(log, "control.listening", path=self.path)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None
        with contextlib.suppress(OSError):
            st = self.path.stat()
            if (st.st_dev, st.st_ino) == self._inode:  # never unlink a successor's socket
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock) if sock is not None else None
            if uid is None or uid not in self.allowed_uids:
                event(log, "control.denied", logging.WARNING, uid=uid)
                # Read (and ignore) the request first: closing with unread data makes the
                # kernel send RST, and the client could lose this answer.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.readline(), DENY_READ_TIMEOUT)
                await self._send(writer, {"ok": False, "error": "permission denied: the control socket is for root only"})
                return
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except (asyncio.LimitOverrunError, ValueError):
                    await self._send(writer, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    return
                except asyncio.TimeoutError:
                    return
                if not line:
                    return
                await self._send(writer, await self._answer(line, uid))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes, uid: int) -> dict:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"ok": False, "error": "request is not a JSON object"}
        except RecursionError:  # "[[[[..." within MAX_LINE: refuse it, keep the connection's answer
            return {"ok": False, "error": "request nested too deeply"}
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": 'request must be {"op": "...", "args": {...}}'}
        op, args = request["op"], request.get("args") or {}
        event(log, "control.request", op=op, uid=uid)  # args may hold a CHAP secret: never logged
        try:
            result = await self.handler(op, args)
        except ConfigError as e:
            event(log, "control.refused", op=op, reason=str(e))
            return {"ok": False, "error": str(e)}
        except (OperationFailed, OSError) as e:
            event(log, "control.failed", logging.ERROR, op=op, reason=str(e))
            return {"ok": False, "error": str(e)}
        except Exception as e:
            log.exception("control.internal_error op=%s", op)
            return {"ok": False, "error": f"internal error in {op}: {type(e).__name__}: {e}"}
        return {"ok": True, "result": result}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: dict) -> None:
        writer.write(json.dumps(response, default=str).encode() + b"\n")
        await writer.drain()


class ControlClient:
    """Small synchronous client for the CLI: one connection, one request at a time."""

    def __init__(self, path: str | os.PathLike, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def call(self, op: str, /, **args: Any) -> Any:
        request = json.dumps({"op": op, "args": args}).encode() + b"\n"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            try:
                s.connect(str(self.path))
            except FileNotFoundError:
                raise DaemonNotRunning(f"no iscsi-target daemon: {self.path} does not exist") from None
            except ConnectionRefusedError:
                if self.path.exists() and not stat.S_ISSOCK(self.path.stat().st_mode):
                    raise ControlError(f"{self.path} is not a control socket (wrong --control path?)") from None
                raise DaemonNotRunning(f"no iscsi-target daemon is listening on {self.path} (stale socket)") from None
            except PermissionError:
                raise ControlError(f"permission denied on {self.path}: the control socket is for root only") from None
            except OSError as e:
                raise DaemonNotRunning(f"cannot reach the daemon on {self.path}: {e.strerror or e}") from None
            s.sendall(request)
            buf = bytearray()
            while not buf.endswith(b"\n"):
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    raise ControlError(f"the daemon did not answer {op} within {self.timeout:.0f} s") from None
                except ConnectionResetError:
                    raise ControlError("the daemon closed the connection without answering") from None
                if not chunk:
                    break
                buf += chunk
                if len(buf) > 64 * MAX_LINE:
                    raise ControlError("answer too large")
        finally:
            s.close()
        if not buf:
            raise ControlError("the daemon closed the connection without answering")
        try:
            response = json.loads(buf)
        except json.JSONDecodeError:
            raise ControlError("the daemon sent an answer that is not JSON") from None
        if not response.get("ok"):
            raise ControlError(str(response.get("error", "unknown error")))
        return response.get("result")
