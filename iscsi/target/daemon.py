"""The target daemon: owns the configuration, the logical units and the listener.

Every runtime change goes through one path (:meth:`TargetDaemon.change`):

1. under one asyncio.Lock (concurrent admin commands must not race each other,
   targetcli-fb PR #161), copy the config and let the operation edit the copy;
2. validate the copy;
3. *prepare* what can fail: open new images, resize, bind new portals;
4. save the copy atomically (if the daemon has a config file; refused when the
   file was edited since the daemon read or wrote it, so a hand edit is never lost);
5. *commit* what cannot fail: swap LUN maps in place (REPORTED LUNS DATA HAS
   CHANGED goes out), drop sessions that lost their access, unbind old portals,
   close images nobody uses any more.

A failure in 2-4 undoes 3 and leaves the running daemon and the file exactly as
they were.  SIGHUP re-reads the file and goes through 2-5 with the file's
content; SIGTERM stops the listener, lets in-flight commands finish, then
flushes and closes every image.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import inspect
import json
import ipaddress
import logging
import os
import resource
import signal
import stat
import tempfile
import threading
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from ..digest import IMPLEMENTATION as CRC32C_IMPLEMENTATION
from ..log import event
from . import config as C
from .control import OperationFailed
from .config import Acl, ChapConfig, Config, ConfigError, Lun, PortalGroup, Target
from .registry import AccessGrant, ChapCredentials

log = logging.getLogger("iscsi.target.daemon")

# At SIGTERM, how long to wait for an admin change in progress before closing anyway.
STOP_CHANGE_TIMEOUT = 30.0
# Secret-looking keys removed from anything the daemon reports (status, lists).
_SECRET_WORDS = ("secret", "password", "passwd", "chap_r", "chap_c")


class AdminError(ConfigError):
    """An admin request that cannot be done as asked; the message says why."""


def _same_portal(text: Any, wanted: tuple[str, int]) -> bool:
    try:
        return isinstance(text, str) and C.parse_portal(text) == wanted
    except ConfigError:
        return False


def _bind_error(e: OSError) -> str:
    """Why a portal cannot be bound, in the admin's terms (asyncio's text repeats the address
    as a Python tuple: "error while attempting to bind on address ('::1', 3260): ...")."""
    if e.errno == errno.EADDRINUSE:
        return ("address already in use (another iscsi-target on this config or data directory, "
                "tgtd or LIO? `ss -ltnp` shows who listens there)")
    if e.errno == errno.EADDRNOTAVAIL:
        return "no network interface of this host has that address"
    if e.errno is not None:
        return os.strerror(e.errno)
    return str(e)


class DaemonError(OperationFailed):
    """The daemon cannot start or apply its configuration."""


# --------------------------------------------------------------------------- collaborators


class Server(Protocol):
    """What the daemon needs from iscsi.target.server.IscsiServer."""

    async def add_portal(self, host: str, port: int) -> None: ...
    async def remove_portal(self, host: str, port: int) -> None: ...
    def sessions(self) -> list[dict]: ...
    async def drop_sessions(self, target: str | None = None, initiator: str | None = None,
                            tsih: int | None = None) -> int: ...
    async def shutdown(self) -> None: ...


@dataclass
class Unit:
    """One opened LUN: the SCSI logical unit and the backstore under it."""

    lu: Any
    backstore: Any
    lun: Lun
    image: Path
    # This open created the image file: a change that fails later removes it again,
    # so "nothing was changed" holds for the disk too.
    created: bool = False
    lock: Any = None  # the provider's hold on the image (ImageLocks key), released at close
    in_use_elsewhere: bool = False  # another process holds the image's lock (see ImageLocks)
    # The note that this image was served (see ScsiUnitProvider.open), and whether this open
    # wrote it: a change that fails takes it back with the image.
    served_marker: Path | None = None
    marker_written: bool = False

    @property
    def size(self) -> int:
        return int(self.backstore.size)


class UnitProvider(Protocol):
    """Builds logical units and LUN maps (the SCSI core); replaceable in tests."""

    def open(self, cfg: Config, target: Target, lun: Lun) -> Unit: ...
    def new_map(self, luns: dict[int, Any]) -> Any: ...
    def update_map(self, lun_map: Any, luns: dict[int, Any]) -> None: ...
    def resize(self, unit: Unit, new_size: int) -> None: ...
    def close(self, unit: Unit) -> None: ...


def _accepted_kwargs(fn: Callable, **kwargs: Any) -> dict:
    """Keep only the keyword arguments ``fn`` accepts (the SCSI core grows options over time)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


class ImageLocks:
    """One advisory lock (flock, LOCK_EX) per image file this process serves.

    Two daemons writing one image (a second ``serve --lun disk.img``, or one image in two
    configs) each cache and gather writes of their own: the image ends up corrupt. The lock
    lives on a descriptor of its own, counted per inode, because a LUN that is reopened
    (block size, serial ... changed) opens its new unit before the old one is closed.
    A process that dies releases its locks with its descriptors.

    A lock held elsewhere is a loud WARNING, not a refusal: tools/bench_all.py serves one
    prefilled image from several daemons on purpose (one measured at a time).
    """

    def __init__(self) -> None:
        self._held: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [fd, count]
        self._mutex = threading.Lock()

    def acquire(self, image: Path, where: str) -> tuple[tuple[int, int] | None, bool]:
        """(key to release, or None; True when another process holds the image)."""
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        keep = False
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            with self._mutex:
                held = self._held.get(key)
                if held is not None:  # this daemon serves it already (a LUN being reopened)
                    held[1] += 1
                    return key, False
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    event(log, "lun.image_in_use", logging.WARNING, lun=where, image=image,
                          note="another process (an iscsi-target daemon?) serves this image too; "
                               "writes through both corrupt it")
                    return None, True
                except OSError as e:  # ENOLCK/EINVAL: a filesystem without flock; serve unlocked
                    event(log, "lun.image_unlocked", logging.WARNING, lun=where, image=image, error=e.strerror)
                    return None, False
                self._held[key] = [fd, 1]
                keep = True
                return key, False
        finally:
            if not keep:
                os.close(fd)

    def release(self, key: tuple[int, int] | None) -> None:
        if key is None:
            return
        with self._mutex:
            held = self._held.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] <= 0:
                del self._held[key]
                os.close(held[0])  # closing the descriptor drops the flock


class ScsiUnitProvider:
    """The real provider: sparse image files (iscsi.backstore.file) under iscsi.scsi LUs.

    ``remember_images``: note each image served (a small file beside the LU's other saved
    state) and refuse to create a new, empty one where a served image has gone missing.  A
    daemon run from a config file does (its LUNs outlive it); a quick start, whose
    ``--lun PATH:SIZE`` asks for a missing image to be created, does not.
    """

    def __init__(self, remember_images: bool = False) -> None:
        self.locks = ImageLocks()
        self.remember_images = remember_images

    def open(self, cfg: Config, target: Target, lun: Lun) -> Unit:
        from ..backstore.file import FileBackstore
        from ..scsi.lu import LogicalUnit

        where = f"{target.iqn} LUN {lun.number}"
        image = cfg.resolve_path(lun.path)
        exists = image.exists()
        marker = self.state_path(cfg, cfg.serial_for(target, lun), image, "served") if self.remember_images else None
        served = marker is not None and _served_before(marker, image)
        if not exists and served:
            # Created anew, the LU would come back blank under the same identity: initiators
            # would see their data gone without an error (a deleted or moved image, a disk not
            # mounted yet).  The admin decides.
            raise AdminError(
                f"{where}: image {image} is missing, but this daemon served it before (noted in {marker}); "
                f"restore the file (or mount its filesystem), or, to start the LUN over with a new empty "
                f"image, delete {marker}")
        if not exists and lun.size is None:
            raise AdminError(f"{where}: image {image} does not exist; give a size to create it")
        if not exists and lun.read_only:
            raise AdminError(f"{where}: read-only image {image} does not exist")
        if exists:
            # An empty file with a size given is grown to it, like a missing one is created.
            empty = _check_existing_image(image, lun, where) == 0
        else:
            empty = False
            image.parent.mkdir(parents=True, exist_ok=True)
        backstore = FileBackstore(
            str(image),
            size=lun.size if (empty or not exists) else None,
            block_size=lun.block_size,
            read_only=lun.read_only,
            create=not exists,
            gather_writes=True,  # the connection drains before it answers (backstore/gather.py)
        )
        lock = None
        try:
            lock, in_use = self.locks.acquire(image, where)
            actual = int(backstore.size)
            if lun.size is not None and actual < lun.size and not lun.read_only:
                # The config says bigger: an interrupted resize or a copied image. Growing
                # never loses data; shrinking at start would, so a bigger file is served as is.
                backstore.resize(lun.size)
                event(log, "lun.grown", target=target.iqn, lun=lun.number, size=lun.size, was=actual)
            elif lun.size is not None and actual != lun.size:
                event(log, "lun.size_differs", logging.WARNING, target=target.iqn, lun=lun.number,
                      configured=lun.size, image=actual)
            serial = cfg.serial_for(target, lun)
            pr_file = self.state_path(cfg, serial, image, "pr")
            mode_file = self.state_path(cfg, serial, image, "mode")
            options = dict(
                serial=serial,
                lun_id=lun.number,
                read_only=lun.read_only,
                removable=lun.removable,
                physical_block_size=lun.physical_block_size,
                vendor=lun.vendor,
                product=lun.product,
                pr_state=_load_state(pr_file, "reservation state"),
                pr_persist=lambda state, path=pr_file: _save_json_atomically(path, state),
                # MODE SELECT with SP=1 saves pages (SPC-4 §6.9): they outlive a restart too.
                mode_state=_load_mode_state(mode_file, where),
                mode_persist=lambda state, path=mode_file: _save_json_atomically(path, state),
            )
            options = {k: v for k, v in options.items() if v is not None}  # keep the core's defaults
            try:
                lu = LogicalUnit(backstore, **_accepted_kwargs(LogicalUnit, **options))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                if options.get("pr_state") is None:
                    raise
                # A damaged APTPL file stops the start (SPC-4 §5.13.5: reservations must not be
                # lost silently); the admin needs its name to repair or move it.
                raise _unrestorable(where, "saved reservations", pr_file, e) from None
        except BaseException:
            backstore.close()
            self.locks.release(lock)
            raise
        unit = Unit(lu=lu, backstore=backstore, lun=lun, image=image, created=not exists)
        unit.lock, unit.in_use_elsewhere = lock, in_use
        if marker is not None and not served:
            try:
                _save_json_atomically(marker, {"image": str(image), "first_served": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                unit.served_marker, unit.marker_written = marker, True
            except OSError as e:  # serving goes on; only the guard against re-creation is lost
                event(log, "lun.served_note_failed", logging.WARNING, target=target.iqn, lun=lun.number,
                      path=marker, error=e.strerror or str(e))
        else:
            unit.served_marker = marker
        return unit

    @staticmethod
    def forget(unit: Unit) -> None:
        """The LUN is gone from the config (or its adding was undone): a new image may be
        created at its path again."""
        if unit.served_marker is not None:
            with contextlib.suppress(FileNotFoundError):
                unit.served_marker.unlink()

    @staticmethod
    def state_path(cfg: Config, serial: str, image: Path, kind: str) -> Path:
        """Where one LU's ``kind`` of saved state survives restarts, keyed by serial: "pr" for
        APTPL reservations (SPC-4 §5.13.5), "mode" for saved mode pages (SPC-4 §6.9)."""
        if cfg.data_dir:
            return Path(cfg.data_dir).expanduser().absolute() / kind / f"{serial}.json"
        return image.with_name(f".{image.name}.{kind}.json")

    def new_map(self, luns: dict[int, Any]) -> Any:
        from ..scsi.target import LunMap

        return LunMap(dict(luns))

    def update_map(self, lun_map: Any, luns: dict[int, Any]) -> None:
        """Change a map in place (sessions hold it) and raise REPORTED LUNS DATA HAS CHANGED."""
        if hasattr(lun_map, "add") and hasattr(lun_map, "remove"):  # iscsi.scsi.target.LunMap
            for number, lu in list(lun_map.items()):
                if luns.get(number) is not lu:
                    lun_map.remove(number)
            for number, lu in sorted(luns.items()):
                if lun_map.get(number) is not lu:
                    lun_map.add(number, lu)
        else:  # a plain mapping
            for key in list(lun_map.keys()):
                if key not in luns:
                    del lun_map[key]
            for key, lu in luns.items():
                lun_map[key] = lu
        lun_map.report_luns_changed()

    def resize(self, unit: Unit, new_size: int) -> None:
        resize = getattr(unit.lu, "resize", None)
        if resize is not None:
            resize(new_size)  # CAPACITY DATA HAS CHANGED on every nexus (SBC-4 §4.6)
        else:
            unit.backstore.resize(new_size)

    def close(self, unit: Unit) -> None:
        """Flush (the image really holds every acknowledged write), then close."""
        try:
            if not unit.lun.read_only:
                unit.backstore.flush()
        finally:
            try:
                close = getattr(unit.lu, "close", None)
                if close is not None:
                    close()  # closes the backstore too
                else:
                    unit.backstore.close()
            finally:
                self.locks.release(unit.lock)


def _check_existing_image(image: Path, lun: Lun, where: str) -> int | None:
    """Refuse, with a message naming the LUN, an image the file backstore cannot serve.

    The backstore takes the size from st_size, so only a regular file can be served
    (a block device or /dev/null has st_size 0), and the LU has whole blocks only
    (SBC-4 §4.5: the capacity is a number of logical blocks).
    """
    try:
        st = image.stat()
    except OSError:
        return None  # the open below reports it with its errno
    if stat.S_ISDIR(st.st_mode):
        raise AdminError(f"{where}: {image} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise AdminError(f"{where}: {image} is not a regular file (only image files can be served)")
    if st.st_size == 0 and lun.size is None:
        raise AdminError(f"{where}: image {image} is empty; give a size to grow it, e.g. {image}:1G")
    if st.st_size % lun.block_size:
        raise AdminError(
            f"{where}: image {image} is {st.st_size} bytes, not a whole number of "
            f"{lun.block_size}-byte blocks; truncate or grow it to a multiple of {lun.block_size}"
        )
    return st.st_size


#: Descriptors the daemon wants: two per connection (its socket and the duplicate that
#: zero-copy READs send from) for server.MAX_SESSIONS sessions, plus images, control and logs.
#: The usual soft limit of 1024 would refuse logins after ~500 connections.
WANTED_OPEN_FILES = 2 * 4096 + 1024
#: Below this the daemon warns at start: a few hundred sessions would exhaust it.
LOW_OPEN_FILES = 4096


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Lift the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit, never
    lower than it is); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def _load_state(path: Path, what: str) -> dict | None:
    """State an LU saved (reservations, mode pages), or None; a damaged file stops the start
    (better than state lost silently)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DaemonError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ConfigError(f"{path}: {what} is not valid (JSON nested too deeply)") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: {what} must be a JSON object")
    return state


def _load_mode_state(path: Path, where: str) -> dict | None:
    """Saved mode pages, checked against the pages an LU has before it is built, so a damaged
    file is named as such (the LU raises the same errors for its other arguments)."""
    from ..scsi.modepages import ModePages

    state = _load_state(path, "saved mode pages")
    if state is not None:
        try:
            ModePages().import_saved(state)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _unrestorable(where, "saved mode pages", path, e) from None
    return state


def _unrestorable(where: str, what: str, path: Path, e: Exception) -> AdminError:
    return AdminError(f"{where}: {what} {path} cannot be restored ({type(e).__name__}: {e}); "
                      "repair it, or move it aside to start without them")


def _served_before(marker: Path, image: Path) -> bool:
    """The note says this image (this path) was served by a daemon with this config."""
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("image") == str(image)
    except (OSError, ValueError, AttributeError):
        return False


def _save_json_atomically(path: Path, data: Any) -> None:
    """Temp file, fsync, rename, fsync dir: the same discipline as the config file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _default_server(registry: "TargetDaemon") -> Server:
    from .server import IscsiServer

    return IscsiServer(registry)


# --------------------------------------------------------------------------- address helpers


def _normal_host(host: str) -> str:
    """Local address of a connection as a comparable string (no zone, v4-mapped unwrapped)."""
    host = host.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def _portal_match(portal: str, local_host: str, local_port: int) -> int:
    """2 = exact address match, 1 = wildcard portal on that port, 0 = no match."""
    host, port = C.parse_portal(portal)
    if port != local_port:
        return 0
    if host == local_host:
        return 2
    if C.is_wildcard(host):
        # Same family only: asyncio binds IPv6 sockets with IPV6_V6ONLY, so [::] never
        # receives IPv4 connections (and 0.0.0.0 never IPv6 ones).
        return 1 if (":" in host) == (":" in local_host) else 0
    return 0


def _scrub(value: Any) -> Any:
    """Replace any secret-looking field in reported data (defence in depth)."""
    if isinstance(value, dict):
        return {
            k: ("***" if isinstance(k, str) and any(w in k.lower() for w in _SECRET_WORDS) and v is not None else _scrub(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def _space_of(path: Path) -> dict[str, int | None]:
    """Thin provisioning at a glance: bytes the image file has allocated, and the free bytes
    (for an unprivileged writer) and identity of the filesystem under it; None where the
    image cannot be looked at (not created yet, a permission problem)."""
    try:
        st = os.stat(path)
        fs = os.statvfs(path)
    except OSError:
        return {"allocated": None, "fs_free": None, "fs_id": None}
    return {"allocated": st.st_blocks * 512, "fs_free": fs.f_bavail * fs.f_frsize, "fs_id": st.st_dev}


def _creds(chap: ChapConfig | None) -> ChapCredentials | None:
    if chap is None:
        return None
    return ChapCredentials(chap.username, chap.secret, chap.mutual_username, chap.mutual_secret)


# --------------------------------------------------------------------------- per-target runtime


class TargetRuntime:
    """One target as the server sees it (TargetAccess): portals, LUN maps, authorization."""

    def __init__(self, target: Target) -> None:
        self.cfg = target
        self.name = target.iqn
        self.units: dict[int, Unit] = {}
        # initiator IQN (lowercase) -> LunMap of its ACL; None -> the open-access map.
        self.maps: dict[str | None, Any] = {}

    @property
    def alias(self) -> str | None:
        return self.cfg.alias

    @property
    def target_reset(self) -> bool:
        """May initiators send TARGET WARM / COLD RESET (config ``target_reset``)?"""
        return self.cfg.target_reset

    def portal_group_tag(self, local_host: str, local_port: int) -> int | None:
        host = _normal_host(local_host)
        best, best_tag = 0, None
        for tag, portal in self.cfg.portals():
            score = _portal_match(portal, host, local_port)
            if score > best:
                best, best_tag = score, tag
        return best_tag

    def authorize(self, initiator_name: str) -> AccessGrant | None:
        try:
            initiator = C.canonical_iscsi_name(initiator_name)
        except ConfigError:
            return None
        acl = self.cfg.acl(initiator)
        if acl is not None and initiator in self.maps:
            params = {**self.cfg.params, **acl.params}
            return AccessGrant(self.maps[initiator], _creds(acl.chap or self.cfg.chap), params)
        if self.cfg.open_access and None in self.maps:
            return AccessGrant(self.maps[None], _creds(self.cfg.chap), dict(self.cfg.params))
        return None

    def port_groups(self, nexus: Any) -> list[tuple[int, int, list[int]]]:
        """REPORT TARGET PORT GROUPS (SPC-4 §6.37) for this target's LUs: each portal group
        is a target port group holding one target port, numbered by its TPGT as the server
        numbers nexuses; all active/optimized (implicit ALUA, one LU state on every path)."""
        groups = [(g.tag, 0, [g.tag]) for g in self.cfg.portal_groups]
        return groups or [(nexus.target_port_group, 0, [nexus.relative_port_id])]

    def addresses(self, local_host: str) -> list[str]:
        """TargetAddress values (RFC 7143 §13.8): ``addr:port,tpgt``; wildcards become ``local_host``.

        Only wildcards of ``local_host``'s family: [::] listens with IPV6_V6ONLY and 0.0.0.0
        takes no IPv6, so 127.0.0.1 on the port of a [::] portal (or [::1] on a 0.0.0.0 one)
        is an address nobody answers at, and multipath initiators log in to every address."""
        out: list[str] = []
        for tag, portal in self.cfg.portals():
            host, port = C.parse_portal(portal)
            if C.is_wildcard(host):
                if (":" in host) != (":" in local_host):
                    continue
                host = local_host
            text = f"{C.format_portal(host, port)},{tag}"
            if text not in out:
                out.append(text)
        return out

    def wanted_maps(self) -> dict[str | None, dict[int, Any]]:
        """What every LUN map of this target must contain under the current config."""
        wanted: dict[str | None, dict[int, Any]] = {}
        for acl in self.cfg.acls:
            wanted[acl.initiator] = {a: self.units[t].lu for a, t in acl.mapping(self.cfg).items()}
        if self.cfg.open_access:
            wanted[None] = {n: u.lu for n, u in sorted(self.units.items())}
        return wanted


# --------------------------------------------------------------------------- the daemon


def _needs_reopen(old: Lun, new: Lun, old_cfg: Config, new_cfg: Config) -> bool:
    """A LUN whose image or identity changed is closed and opened again (not just resized)."""
    return (
        old_cfg.resolve_path(old.path) != new_cfg.resolve_path(new.path)
        or old.block_size != new.block_size
        or old.read_only != new.read_only
        or old.removable != new.removable
        or old.physical_block_size != new.physical_block_size
        or old.serial != new.serial
        or old.vendor != new.vendor
        or old.product != new.product
    )


class TargetDaemon:
    """Implements :class:`iscsi.target.registry.TargetRegistry` for the server."""

    def __init__(
        self,
        config: Config,
        config_path: str | os.PathLike | None = None,
        *,
        provider: UnitProvider | None = None,
        server_factory: Callable[["TargetDaemon"], Server] | None = None,
        control_path: str | os.PathLike | None = None,
        control_optional: bool = False,
    ) -> None:
        config.validate()
        self.config = config
        # None = quick start: changes apply to the running daemon only and are not saved.
        self.config_path = Path(config_path) if config_path is not None else None
        # What the file held when this daemon last read or wrote it (see _check_file_unchanged).
        self._file_digest = C.file_digest(self.config_path) if self.config_path is not None else None
        self.control_path = Path(control_path) if control_path is not None else None
        self.open_files = 0  # the descriptor limit in force, set by start()
        # Quick start: when another daemon already owns the control socket, serve anyway
        # (without runtime administration) instead of refusing to start.
        self.control_optional = control_optional
        self.provider: UnitProvider = provider or ScsiUnitProvider(remember_images=self.config_path is not None)
        self._server_factory = server_factory or _default_server
        self.server: Server | None = None
        self._control: Any = None
        self._targets: dict[str, TargetRuntime] = {}
        self._listening: set[tuple[str, int]] = set()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._running = False

    # ------------------------------------------------------------------ registry (server-facing)

    def discovery_auth(self) -> ChapCredentials | None:
        return _creds(self.config.discovery_auth)

    def discovery_targets(self, initiator_name: str, local_host: str, local_port: int) -> list[tuple[str, list[str]]]:
        host = _normal_host(local_host)
        out = []
        for rt in self._targets.values():
            if rt.portal_group_tag(host, local_port) is None:
                continue
            if rt.authorize(initiator_name) is None:
                continue
            out.append((rt.name, rt.addresses(host)))
        return out

    def find_target(self, name: str) -> TargetRuntime | None:
        return self._targets.get(name.lower())

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open every LUN and bind every portal, all or nothing."""
        if self._running:
            raise DaemonError("daemon already started")
        self.open_files = raise_open_file_limit()
        empty = Config(data_dir=self.config.data_dir)
        target_cfg, self.config = self.config, empty
        self.server = self._server_factory(self)
        try:
            async with self._lock:
                await self._apply(target_cfg, save=False)
            if self.control_path is not None:
                from .control import ControlServer, ControlSocketBusy

                control = ControlServer(self.control_path, self.handle_request)
                try:
                    await control.start()
                    self._control = control
                except ControlSocketBusy as e:
                    if not self.control_optional:
                        raise
                    event(log, "control.unavailable", logging.WARNING, reason=str(e))
                    self.control_path = None
        except BaseException:
            await self._close_all()
            self.config = target_cfg
            raise
        self._running = True
        for target in self.config.targets:
            if not target.portal_groups:
                event(log, "target.unreachable", logging.WARNING, target=target.iqn,
                      note=f"no portal: add one with iscsi-target portal add {target.iqn} HOST:PORT")
        event(log, "daemon.started", targets=len(self.config.targets),
              portals=",".join(C.format_portal(h, p) for h, p in sorted(self._listening)),
              config=self.config_path, control=self.control_path, crc32c=CRC32C_IMPLEMENTATION,
              open_files=self.open_files)
        if self.open_files < LOW_OPEN_FILES:
            event(log, "daemon.open_files_low", logging.WARNING, limit=self.open_files,
                  hint="raise the hard limit (ulimit -Hn, LimitNOFILE=) or fewer sessions can log in")

    async def stop(self) -> None:
        """SIGTERM path: stop the listener, let in-flight commands finish, flush and close."""
        self._stop.set()
        if not self._running:
            return
        self._running = False
        # Let an admin change that is half way finish first (it holds the lock), bounded.
        try:
            await asyncio.wait_for(self._lock.acquire(), STOP_CHANGE_TIMEOUT)
            locked = True
        except asyncio.TimeoutError:
            event(log, "daemon.stop_while_changing", logging.WARNING)
            locked = False
        try:
            await self._close_all()
        finally:
            if locked:
                self._lock.release()
        event(log, "daemon.stopped")

    async def _close_all(self) -> None:
        if self._control is not None:
            await self._control.close()
            self._control = None
        if self.server is not None:
            try:
                await self.server.shutdown()
            except Exception as e:  # still flush the images below
                event(log, "server.shutdown_failed", logging.ERROR, error=repr(e))
        self._listening.clear()
        for rt in list(self._targets.values()):
            for unit in rt.units.values():
                await self._close_unit(rt.name, unit)
        self._targets.clear()

    async def _close_unit(self, target: str, unit: Unit) -> None:
        try:
            await asyncio.to_thread(self.provider.close, unit)
            event(log, "lun.closed", target=target, lun=unit.lun.number, image=unit.image)
        except Exception as e:
            event(log, "lun.close_failed", logging.ERROR, target=target, lun=unit.lun.number, error=repr(e))

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), then stop cleanly."""
        loop = asyncio.get_running_loop()
        installed = []
        def stop_on(sig: signal.Signals) -> Callable[[], None]:
            def handler() -> None:
                if not self._stop.is_set():
                    # Why the daemon goes away, and what it takes with it: the log otherwise shows
                    # sessions ending with "connection lost" and then "daemon.stopped".
                    event(log, "daemon.stopping", signal=sig.name, sessions=len(self._sessions()))
                self._stop.set()
            return handler

        for sig, handler in (
            (signal.SIGTERM, stop_on(signal.SIGTERM)),
            (signal.SIGINT, stop_on(signal.SIGINT)),
            (signal.SIGHUP, lambda: asyncio.ensure_future(self.reload_quietly())),
        ):
            try:
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        try:
            await self.start()  # a SIGTERM during start is honoured right after it
            await self._stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self.stop()

    def request_stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ changes

    async def change(self, mutate: Callable[[Config], Any], what: str = "change") -> Any:
        """Apply one admin change: serialized, validated, persisted, rolled back on failure."""
        async with self._lock:
            new = self.config.copy()
            result = mutate(new)
            if inspect.isawaitable(result):
                result = await result
            await self._apply(new, save=True)
        event(log, "config.changed", op=what, persisted=self.config_path is not None)
        if self.config_path is None and isinstance(result, dict):
            result["not_saved"] = True  # quick start: the admin is told the change ends with the daemon
        return result

    async def reload(self) -> dict:
        """SIGHUP: read the file again and apply the difference; the old config stays on error."""
        if self.config_path is None:
            raise AdminError("this daemon was started without a config file (quick start); nothing to reload")
        async with self._lock:
            new, digest = await asyncio.to_thread(C.read_config, self.config_path)
            C.check_not_writable_by_others(self.config_path)
            await self._apply(new, save=False)
            self._file_digest = digest
        event(log, "config.reloaded", path=self.config_path, targets=len(self.config.targets))
        return {"targets": len(self.config.targets)}

    async def reload_quietly(self) -> None:
        try:
            await self.reload()
        except Exception as e:
            event(log, "config.reload_failed", logging.ERROR, path=self.config_path, error=str(e))

    def _check_file_unchanged(self) -> None:
        """Refuse to save over an edit made to the config file since this daemon last read or
        wrote it: the next admin command would otherwise throw a hand edit (not yet reloaded,
        or refused by a reload) away without a word."""
        try:
            now = C.file_digest(self.config_path)
        except OSError as e:
            raise DaemonError(f"cannot read {self.config_path}: {e.strerror or e}; nothing was changed") from None
        if now is not None and now != self._file_digest:
            raise AdminError(
                f"{self.config_path} was changed since the daemon last read or wrote it (edited by hand?) and "
                "saving would throw that edit away; apply it with `iscsi-target config reload` (or undo it), "
                "then try again; nothing was changed")

    async def _apply(self, new: Config, save: bool) -> None:
        """Move the running daemon from self.config to ``new`` (see module docstring)."""
        new.validate()
        old = self.config
        opened: dict[tuple[str, int], Unit] = {}
        resized: list[tuple[Unit, int, int]] = []
        bound: list[tuple[str, int]] = []
        try:
            # ---- prepare: everything that can fail
            for target in new.targets:
                rt = self._targets.get(target.iqn)
                old_target = old.target(target.iqn)
                for lun in target.luns:
                    unit = rt.units.get(lun.number) if rt else None
                    old_lun = old_target.lun(lun.number) if old_target else None
                    if unit is None or old_lun is None or _needs_reopen(old_lun, lun, old, new):
                        unit = opened[(target.iqn, lun.number)] = await self._open(new, target, lun)
                        if lun.size is not None and unit.size != lun.size:
                            # Served as found (bigger, or read-only and smaller): the running config
                            # says so, so only a resize changes the size from here on.
                            lun.size = unit.size
                    elif lun.size is not None and lun.size != old_lun.size and lun.size != unit.size:
                        # Only a change of the configured size resizes: an image found bigger than
                        # its configured size at start is served as is, and an unrelated change
                        # (acl add, SIGHUP) must not shrink it afterwards and destroy its end.
                        before = unit.size
                        if lun.size < before and not save:
                            event(log, "lun.size_differs", logging.WARNING, target=target.iqn, lun=lun.number,
                                  configured=lun.size, image=before,
                                  note="a reload does not shrink an image; use lun resize --force")
                            lun.size = before
                            continue
                        try:
                            self.provider.resize(unit, lun.size)
                        except (OSError, ValueError) as e:  # e.g. EFBIG: past the filesystem's file size limit
                            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
                            raise DaemonError(
                                f"{target.iqn} LUN {lun.number}: cannot resize {unit.image} to "
                                f"{C.format_size(lun.size)}: {reason}"
                            ) from None
                        resized.append((unit, before, lun.size))
                        event(log, "lun.resized", target=target.iqn, lun=lun.number, size=lun.size, was=before)
            for host, port in sorted(new.all_portals() - self._listening):
                try:
                    await self.server.add_portal(host, port)
                except OSError as e:
                    raise DaemonError(f"cannot listen on {C.format_portal(host, port)}: {_bind_error(e)}") from None
                bound.append((host, port))
                event(log, "portal.listening", portal=C.format_portal(host, port))
                if not C.is_loopback(host):
                    # issue 7: loopback unless told otherwise; this config told otherwise.
                    event(log, "portal.exposed", logging.WARNING, portal=C.format_portal(host, port),
                          note="reachable from other hosts")
            # ---- persist
            if save and self.config_path is not None:
                await asyncio.to_thread(self._check_file_unchanged)
                try:
                    digest = await asyncio.to_thread(C.save_config, new, self.config_path)
                except OSError as e:
                    raise DaemonError(f"cannot save {self.config_path}: {e.strerror or e}; nothing was changed") from None
                self._file_digest = digest
        except BaseException:
            await self._undo(opened, resized, bound)
            raise
        await self._commit(old, new, opened, bound)

    async def _open(self, cfg: Config, target: Target, lun: Lun) -> Unit:
        try:
            unit = await asyncio.to_thread(self.provider.open, cfg, target, lun)
        except ConfigError:
            raise
        except OSError as e:
            image = cfg.resolve_path(lun.path)
            where = f"{target.iqn} LUN {lun.number}"
            if e.errno == errno.EFBIG and lun.size is not None:
                raise DaemonError(f"{where}: cannot make {image} {C.format_size(lun.size)}: "
                                  f"{e.strerror or e} (more than its filesystem can hold)") from None
            if not image.exists() and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                # Creating it failed: the directory is the problem, and :ro needs an image.
                raise DaemonError(f"{where}: cannot open {image}: {e.strerror or e} "
                                  f"(it does not exist and cannot be created: is {image.parent} writable?)") from None
            hint = ""
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and not lun.read_only:
                hint = " (to serve it read-only, add :ro to the LUN, or --read-only to lun add)"
            raise DaemonError(f"{where}: cannot open {image}: {e.strerror or e}{hint}") from None
        except ValueError as e:  # the backstore's own checks (size, block size): the image, not us
            raise DaemonError(f"{target.iqn} LUN {lun.number}: cannot serve {cfg.resolve_path(lun.path)}: {e}") from None
        event(log, "lun.opened", target=target.iqn, lun=lun.number, image=unit.image, size=unit.size,
              block_size=lun.block_size, read_only=lun.read_only, removable=lun.removable)
        return unit

    async def _undo(self, opened: dict, resized: list, bound: list) -> None:
        for unit, before, _after in reversed(resized):
            try:
                self.provider.resize(unit, before)
            except Exception as e:
                event(log, "lun.resize_undo_failed", logging.ERROR, lun=unit.lun.number, error=repr(e))
        for (iqn, _n), unit in opened.items():
            await self._close_unit(iqn, unit)
            if getattr(unit, "marker_written", False):
                self._forget(unit)
            if getattr(unit, "created", False):
                try:
                    unit.image.unlink()
                    event(log, "lun.image_removed", target=iqn, image=unit.image, note="change undone")
                except OSError as e:
                    event(log, "lun.image_remove_failed", logging.ERROR, image=unit.image, error=repr(e))
        for host, port in bound:
            try:
                await self.server.remove_portal(host, port)
            except Exception as e:
                event(log, "portal.undo_failed", logging.ERROR, portal=C.format_portal(host, port), error=repr(e))

    async def _commit(self, old: Config, new: Config, opened: dict, bound: list) -> None:
        to_close: list[tuple[str, Unit]] = []
        # (target, initiator in lowercase or None for every initiator) whose sessions must go
        drops: list[tuple[str, str | None]] = []
        notify_targets: list[tuple[str, list]] = []
        self._listening.update(bound)
        new_names = {t.iqn for t in new.targets}
        for iqn in list(self._targets):
            if iqn not in new_names:
                rt = self._targets.pop(iqn)
                to_close.extend((iqn, u) for u in rt.units.values())
                drops.append((iqn, None))
                event(log, "target.removed", target=iqn)
        for target in new.targets:
            rt = self._targets.get(target.iqn)
            if rt is None:
                rt = self._targets[target.iqn] = TargetRuntime(target)
                event(log, "target.added", target=target.iqn, alias=target.alias)
            old_target = rt.cfg
            rt.cfg = target
            numbers = {l.number for l in target.luns}
            for number in list(rt.units):
                if number not in numbers or (target.iqn, number) in opened:
                    to_close.append((target.iqn, rt.units.pop(number)))
            for (iqn, number), unit in opened.items():
                if iqn == target.iqn:
                    rt.units[number] = unit
            for number, unit in rt.units.items():
                unit.lun = target.lun(number)
                if hasattr(unit.lu, "port_groups"):
                    unit.lu.port_groups = rt.port_groups
            wanted = rt.wanted_maps()
            for key in list(rt.maps):
                if key not in wanted:
                    del rt.maps[key]
                    if key is not None:
                        drops.append((target.iqn, key))
            changed_maps: list = []
            for key, luns in wanted.items():
                contents = {n: id(lu) for n, lu in luns.items()}
                if key in rt.maps:
                    if self._map_contents(rt.maps[key]) != contents:
                        self.provider.update_map(rt.maps[key], luns)
                        changed_maps.append(rt.maps[key])
                else:
                    open_map = rt.maps.get(None)
                    if key is not None and open_map is not None and self._map_contents(open_map) != contents:
                        # A new ACL for an initiator that may be logged in through open access:
                        # its session still sees the open-access LUNs.  It logs in again, onto
                        # what the ACL maps (an ACL narrows access at once, not at the next login).
                        drops.append((target.iqn, key))
                    rt.maps[key] = self.provider.new_map(luns)
            if old_target.open_access and not target.open_access:
                # Initiators that came in through open access and have no ACL lose access.
                allowed = {a.initiator for a in target.acls}
                for row in self._sessions():
                    who = str(row.get("initiator", "")).lower()
                    if str(row.get("target", "")).lower() == target.iqn and who not in allowed:
                        drops.append((target.iqn, who))
            if changed_maps:
                notify_targets.append((target.iqn, changed_maps))
        self.config = new
        for host, port in sorted(self._listening - new.all_portals()):
            self._listening.discard((host, port))
            try:
                await self.server.remove_portal(host, port)
                event(log, "portal.closed", portal=C.format_portal(host, port))
            except Exception as e:
                event(log, "portal.close_failed", logging.ERROR, portal=C.format_portal(host, port), error=repr(e))
        await self._drop(drops)
        notify = getattr(self.server, "notify_luns_changed", None)
        for iqn, maps in notify_targets if notify is not None else ():
            try:
                # RFC 7143 §11.9.1 AsyncEvent 0 carrying REPORTED LUNS DATA HAS CHANGED, to the
                # sessions whose LUN inventory changed.
                notify(iqn, **_accepted_kwargs(notify, maps=maps))
            except Exception as e:
                event(log, "luns.notify_failed", logging.ERROR, target=iqn, error=repr(e))
        kept = {(t.iqn, l.number) for t in new.targets for l in t.luns}
        for iqn, unit in to_close:
            await self._close_unit(iqn, unit)
            if (iqn, unit.lun.number) not in kept:
                self._forget(unit)

    def _forget(self, unit: Unit) -> None:
        forget = getattr(self.provider, "forget", None)
        if forget is not None:
            try:
                forget(unit)
            except OSError as e:
                event(log, "lun.served_note_remove_failed", logging.WARNING, image=unit.image, error=e.strerror or str(e))

    async def _drop(self, drops: list[tuple[str, str | None]]) -> None:
        """Log out sessions that lost their access; initiator names match case-insensitively."""
        if not drops or self.server is None:
            return
        rows = self._sessions()
        calls: dict[tuple[str, str | None], None] = {}
        for iqn, who in drops:
            if who is None:
                calls[(iqn, None)] = None
                continue
            for row in rows:
                name = str(row.get("initiator", ""))
                if str(row.get("target", "")).lower() == iqn and name.lower() == who:
                    calls[(iqn, name)] = None
        for iqn, initiator in calls:
            try:
                await self.server.drop_sessions(target=iqn, initiator=initiator)
                event(log, "sessions.dropped", target=iqn, initiator=initiator)
            except Exception as e:
                event(log, "sessions.drop_failed", logging.ERROR, target=iqn, error=repr(e))

    @staticmethod
    def _map_contents(lun_map: Any) -> dict[int, int]:
        items = lun_map.items() if hasattr(lun_map, "items") else getattr(lun_map, "luns", {}).items()
        return {n: id(lu) for n, lu in items}

    def _sessions(self) -> list[dict]:
        if self.server is None:
            return []
        try:
            return list(self.server.sessions())
        except Exception as e:
            event(log, "sessions.list_failed", logging.ERROR, error=repr(e))
            return []

    # ------------------------------------------------------------------ admin operations

    def _target(self, cfg: Config, iqn: str) -> Target:
        try:
            name = C.canonical_iscsi_name(iqn)
        except ConfigError as e:
            raise AdminError(str(e)) from None
        target = cfg.target(name)
        if target is None:
            known = ", ".join(t.iqn for t in cfg.targets) or "none"
            raise AdminError(f"no target {name} (targets: {known})")
        return target

    async def target_add(self, iqn: str, alias: str | None = None, portals: list[str] | None = None,
                         open_access: bool = False) -> dict:
        name = C.canonical_iscsi_name(iqn)

        def mutate(cfg: Config) -> dict:
            if cfg.target(name) is not None:
                raise AdminError(f"target {name} already exists")
            groups = [PortalGroup(tag, [C.canonical_portal(p)]) for tag, p in enumerate(portals or [f"{C.LOOPBACK_V4}:{C.DEFAULT_PORT}"], 1)]
            cfg.targets.append(Target(iqn=name, alias=alias, portal_groups=groups, open_access=open_access))
            return {"target": name}

        return await self.change(mutate, "target.add")

    async def target_remove(self, iqn: str, force: bool = False) -> dict:
        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            busy = [r for r in self._sessions() if str(r.get("target", "")).lower() == target.iqn]
            if busy and not force:
                raise AdminError(f"target {target.iqn} has {len(busy)} session(s); use --force to log them out")
            cfg.targets.remove(target)
            return {"target": target.iqn}

        return await self.change(mutate, "target.remove")

    async def target_set(self, iqn: str, alias: str | None = None, clear_alias: bool = False,
                         open_access: bool | None = None, params: dict[str, str] | None = None,
                         clear_params: list[str] | None = None, target_reset: bool | None = None) -> dict:
        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            was_open, old_params = target.open_access, dict(target.params)
            if alias is not None:
                target.alias = alias
            if clear_alias:
                target.alias = None
            if open_access is not None:
                target.open_access = bool(open_access)
            if target_reset is not None:
                target.target_reset = bool(target_reset)
            for key in clear_params or []:
                target.params.pop(C.param_name(key), None)  # a typo is refused, not ignored
            for key, value in (params or {}).items():
                k, v = C.canonical_param(key, value)
                target.params[k] = v
            row = self._target_row(target)
            # What the change does to sessions already logged in, for the admin's note:
            # closing open access logs out initiators without an ACL (_commit drops them);
            # key preferences were negotiated at login and hold until the next one.
            allowed = {a.initiator.lower() for a in target.acls}
            rows = [r for r in self._sessions() if str(r.get("target", "")).lower() == target.iqn]
            if was_open and not target.open_access:
                row["logged_out"] = sum(1 for r in rows if str(r.get("initiator", "")).lower() not in allowed)
            if target.params != old_params:
                row["keep_params"] = len(rows) - row.get("logged_out", 0)
            return row

        return await self.change(mutate, "target.set")

    def _lun_io(self) -> list[dict]:
        """Each open LU's I/O counters since it was opened (``LogicalUnit.reads`` ...), for
        ``iscsi-target stats --luns``."""
        rows = []
        for target in self.config.targets:
            rt = self._targets.get(target.iqn)
            for number, unit in sorted(rt.units.items()) if rt else ():
                lu = getattr(unit, "lu", None)
                if lu is None or not hasattr(lu, "reads"):
                    continue
                rows.append({"target": target.iqn, "lun": number, "reads": lu.reads, "read_bytes": lu.read_bytes,
                             "writes": lu.writes, "written_bytes": lu.written_bytes,
                             "other_commands": lu.other_commands})
        return rows

    def _target_row(self, target: Target) -> dict:
        rt = self._targets.get(target.iqn)
        return {
            "iqn": target.iqn,
            "alias": target.alias,
            "open_access": target.open_access,
            "target_reset": target.target_reset,
            "chap": target.chap is not None,
            "mutual_chap": bool(target.chap and target.chap.mutual),
            "params": dict(target.params),
            "portal_groups": [{"tag": g.tag, "portals": list(g.portals)} for g in target.portal_groups],
            "luns": [l.number for l in target.luns],
            "acls": [a.initiator for a in target.acls],
            "sessions": sum(1 for r in self._sessions() if str(r.get("target", "")).lower() == target.iqn)
            if rt else 0,
        }

    async def target_list(self) -> list[dict]:
        return [self._target_row(t) for t in self.config.targets]

    async def lun_add(self, iqn: str, path: str, number: int | None = None, size: int | str | None = None,
                      block_size: int = 512, read_only: bool = False, removable: bool = False,
                      serial: str | None = None, vendor: str | None = None, product: str | None = None) -> dict:
        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            used = {l.number for l in target.luns}
            n = C.next_free(used) if number is None or number < 0 else int(number)
            if n in used:
                raise AdminError(f"target {target.iqn} already has LUN {n}")
            lun = Lun(number=n, path=path, size=None if size is None else C.parse_size(size),
                      block_size=int(block_size), read_only=bool(read_only), removable=bool(removable),
                      serial=serial, vendor=vendor, product=product)
            if lun.serial is None:  # fixed now, so moving the image later keeps the LU's identity
                lun.serial = C.default_serial(target.iqn, n, str(cfg.resolve_path(path)))
            target.luns.append(lun)
            target.luns.sort(key=lambda l: l.number)
            return {"target": target.iqn, "lun": n, "serial": lun.serial}

        result = await self.change(mutate, "lun.add")
        rt = self._targets.get(result["target"])
        unit = rt.units.get(result["lun"]) if rt else None
        if unit is not None and getattr(unit, "in_use_elsewhere", False):
            result["warning"] = (f"image {unit.image} is also served by another process; "
                                 "writes through both corrupt it")
        return result

    async def lun_remove(self, iqn: str, number: int) -> dict:
        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            lun = target.lun(int(number))
            if lun is None:
                raise AdminError(f"target {target.iqn} has no LUN {number}")
            target.luns.remove(lun)
            for acl in target.acls:  # a removed LUN leaves every explicit mapping too
                if acl.lun_map is not None:
                    acl.lun_map = {a: t for a, t in acl.lun_map.items() if t != lun.number}
            # Allowed with sessions (they get REPORTED LUNS DATA HAS CHANGED, then LOGICAL UNIT
            # NOT SUPPORTED), as LIO does; the admin is told how many were logged in.
            sessions = sum(1 for r in self._sessions() if str(r.get("target", "")).lower() == target.iqn)
            return {"target": target.iqn, "lun": lun.number, "sessions": sessions}

        return await self.change(mutate, "lun.remove")

    async def lun_resize(self, iqn: str, number: int, size: int | str, force: bool = False) -> dict:
        new_size = C.parse_size(size)

        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            lun = target.lun(int(number))
            if lun is None:
                raise AdminError(f"target {target.iqn} has no LUN {number}")
            if lun.read_only:
                raise AdminError(f"{target.iqn} LUN {lun.number} is read-only; it cannot be resized")
            rt = self._targets.get(target.iqn)
            unit = rt.units.get(lun.number) if rt else None
            current = unit.size if unit is not None else (lun.size or 0)
            # What no --force can make valid is said first (a 0 or odd size was met with
            # "use --force", and --force then with the config path's own complaint).
            where = f"{target.iqn} LUN {lun.number}"
            if new_size <= 0:
                raise AdminError(f"{where}: a LUN needs a size above 0 (e.g. 1G); to drop it: iscsi-target lun remove")
            if new_size % lun.block_size:
                down = new_size - new_size % lun.block_size
                raise AdminError(f"{where}: {new_size} bytes is not whole {lun.block_size}-byte blocks "
                                 f"(nearest below: {C.format_size(down)}, above: "
                                 f"{C.format_size(down + lun.block_size)})")
            if new_size < current and not force:
                raise AdminError(
                    f"{target.iqn} LUN {lun.number}: shrinking from {C.format_size(current)} to "
                    f"{C.format_size(new_size)} destroys the data at the end; use --force"
                )
            lun.size = new_size
            return {"target": target.iqn, "lun": lun.number, "size": new_size, "was": current}

        return await self.change(mutate, "lun.resize")

    def _lun_row(self, target: Target, lun: Lun) -> dict:
        rt = self._targets.get(target.iqn)
        unit = rt.units.get(lun.number) if rt else None
        return {
            "target": target.iqn,
            "lun": lun.number,
            "path": str(self.config.resolve_path(lun.path)),
            "size": unit.size if unit is not None else lun.size,
            "block_size": lun.block_size,
            "read_only": lun.read_only,
            "removable": lun.removable,
            # SPC-4 §7.5.8 Control mode page SWP: an initiator write-protected the LU (iscsi-swp,
            # sg_wr_mode); every write gets DATA PROTECT although the config says rw.
            "swp": bool(getattr(getattr(getattr(unit, "lu", None), "mode", None), "swp", False)),
            # SBC-4 §4.4: an initiator ejected a removable LU's medium (START STOP UNIT LOEJ=1):
            # every medium access gets NOT READY, MEDIUM NOT PRESENT until one loads it.
            "ejected": not getattr(getattr(unit, "lu", None), "medium_present", True),
            **_io_health(getattr(unit, "lu", None)),
            "image_deleted": _deleted_while_open(unit),
            "serial": self.config.serial_for(target, lun),
            **_space_of(self.config.resolve_path(lun.path)),
        }

    async def session_drop(self, iqn: str, initiator: str | None = None, tsih: int | None = None,
                           all_sessions: bool = False) -> dict:
        """End sessions of a target now (RFC 7143 §11.9.1 AsyncEvent 3 first): one by TSIH,
        an initiator's, or with ``all_sessions`` every one.  Access is unchanged, so an
        initiator may log in again (open-iscsi does at once): removing its ACL keeps it out."""
        target = self._target(self.config, iqn)
        if initiator is None and tsih is None and not all_sessions:
            raise AdminError("name the session(s): --initiator NAME, --tsih N, or --all for every session of the target")
        wanted = initiator.lower() if initiator is not None else None
        rows = [r for r in self._sessions()
                if str(r.get("target", "")).lower() == target.iqn
                and (wanted is None or str(r.get("initiator", "")).lower() == wanted)
                and (tsih is None or r.get("tsih") == tsih)]
        if not rows:
            named = ([f"initiator {initiator}"] if initiator is not None else []) + \
                    ([f"TSIH {tsih}"] if tsih is not None else [])
            raise AdminError(f"target {target.iqn} has no session of {' and '.join(named) or 'any initiator'}")
        dropped = 0
        if self.server is not None:
            for name, number in sorted({(str(r.get("initiator")), r.get("tsih")) for r in rows}, key=str):
                dropped += await self.server.drop_sessions(target=target.iqn, initiator=name, tsih=number) or 0
        event(log, "sessions.dropped", target=target.iqn, initiator=initiator, tsih=tsih, sessions=dropped,
              by="admin")
        return {"target": target.iqn, "dropped": dropped}

    async def lun_list(self, iqn: str | None = None) -> list[dict]:
        targets = [self._target(self.config, iqn)] if iqn else self.config.targets
        return [self._lun_row(t, l) for t in targets for l in t.luns]

    async def acl_add(self, iqn: str, initiator: str, lun_map: dict | None = None,
                      params: dict[str, str] | None = None) -> dict:
        name = C.canonical_iscsi_name(initiator)

        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            if target.acl(name) is not None:
                raise AdminError(f"target {target.iqn} already has an ACL for {name}")
            try:
                mapping = None if lun_map is None else {int(k): int(v) for k, v in lun_map.items()}
            except (TypeError, ValueError):
                raise AdminError("lun_map must map ACL LUN numbers to target LUN numbers") from None
            if mapping is not None and len(mapping) != len(lun_map):  # "0" and "00": one ACL LUN
                raise AdminError("lun_map names one ACL LUN twice")
            target.acls.append(Acl(initiator=name, lun_map=mapping, params=dict(params or {})))
            return {"target": target.iqn, "initiator": name, "open_access": target.open_access}

        return await self.change(mutate, "acl.add")

    async def acl_remove(self, iqn: str, initiator: str) -> dict:
        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            acl = target.acl(initiator)
            if acl is None:
                raise AdminError(f"target {target.iqn} has no ACL for {initiator}")
            target.acls.remove(acl)
            return {"target": target.iqn, "initiator": acl.initiator}

        return await self.change(mutate, "acl.remove")

    async def acl_list(self, iqn: str | None = None) -> list[dict]:
        targets = [self._target(self.config, iqn)] if iqn else self.config.targets
        return [
            {
                "target": t.iqn,
                "initiator": a.initiator,
                "lun_map": {str(k): v for k, v in a.mapping(t).items()},
                "chap": "own" if a.chap else ("target" if t.chap else "none"),
                "mutual_chap": bool((a.chap or t.chap) and (a.chap or t.chap).mutual),
                "params": dict(a.params),
            }
            for t in targets
            for a in t.acls
        ]

    def _chap_holder(self, cfg: Config, scope: str, iqn: str | None, initiator: str | None) -> tuple[Any, str, str]:
        if scope == "discovery":
            return cfg, "discovery_auth", "discovery"
        if not iqn:
            raise AdminError(f"CHAP scope {scope!r} needs a target")
        target = self._target(cfg, iqn)
        if scope == "target":
            return target, "chap", f"target {target.iqn}"
        if scope == "acl":
            if not initiator:
                raise AdminError("CHAP for an ACL needs the initiator name")
            acl = target.acl(initiator)
            if acl is None:
                raise AdminError(f"target {target.iqn} has no ACL for {initiator}; add one first: "
                                 f"iscsi-target acl add {target.iqn} {initiator}")
            return acl, "chap", f"ACL {acl.initiator} of {target.iqn}"
        raise AdminError(f"unknown CHAP scope {scope!r} (discovery, target or acl)")

    async def chap_set(self, scope: str, username: str, secret: str, iqn: str | None = None,
                       initiator: str | None = None, mutual_username: str | None = None,
                       mutual_secret: str | None = None) -> dict:
        def mutate(cfg: Config) -> dict:
            holder, attr, label = self._chap_holder(cfg, scope, iqn, initiator)
            setattr(holder, attr, ChapConfig(username, secret, mutual_username, mutual_secret))
            # Sessions logged in before were never asked for these credentials and go on.
            target = None if scope == "discovery" or iqn is None else self._target(cfg, iqn)
            who = None if initiator is None else initiator.lower()
            before = 0 if target is None else sum(
                1 for r in self._sessions() if str(r.get("target", "")).lower() == target.iqn
                and (who is None or str(r.get("initiator", "")).lower() == who))
            return {"scope": label, "username": username, "mutual": mutual_username is not None,
                    "sessions": before}

        return await self.change(mutate, "chap.set")

    async def chap_clear(self, scope: str, iqn: str | None = None, initiator: str | None = None) -> dict:
        def mutate(cfg: Config) -> dict:
            holder, attr, label = self._chap_holder(cfg, scope, iqn, initiator)
            setattr(holder, attr, None)
            return {"scope": label}

        return await self.change(mutate, "chap.clear")

    async def portal_add(self, iqn: str, portal: str, tag: int | None = None) -> dict:
        canon = C.canonical_portal(portal)

        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            if any(C.parse_portal(p) == C.parse_portal(canon) for _, p in target.portals()):
                raise AdminError(f"target {target.iqn} already has portal {canon}")
            group_tag = tag if tag is not None else C.next_free({g.tag for g in target.portal_groups}, C.MIN_TPGT)
            group = target.portal_group(int(group_tag))
            if group is None:
                group = PortalGroup(int(group_tag), [])
                target.portal_groups.append(group)
                target.portal_groups.sort(key=lambda g: g.tag)
            group.portals.append(canon)
            return {"target": target.iqn, "portal": canon, "tag": group.tag}

        return await self.change(mutate, "portal.add")

    async def portal_remove(self, iqn: str, portal: str) -> dict:
        wanted = C.parse_portal(portal)

        def mutate(cfg: Config) -> dict:
            target = self._target(cfg, iqn)
            for group in target.portal_groups:
                for p in group.portals:
                    if C.parse_portal(p) == wanted:
                        group.portals.remove(p)
                        if not group.portals:
                            target.portal_groups.remove(group)
                        return {"target": target.iqn, "portal": p, "tag": group.tag,
                                "portals_left": sum(1 for _ in target.portals())}
            raise AdminError(f"target {target.iqn} has no portal {C.format_portal(*wanted)}")

        res = await self.change(mutate, "portal.remove")
        # The portal stops taking logins; connections made through it go on (as with LIO).
        res["connections"] = sum(
            1 for row in self._sessions() if str(row.get("target", "")).lower() == res["target"]
            for conn in row.get("connections") or () if _same_portal(conn.get("local"), wanted))
        return res

    async def portal_list(self, iqn: str | None = None) -> list[dict]:
        targets = [self._target(self.config, iqn)] if iqn else self.config.targets
        return [
            {"target": t.iqn, "portal": p, "tag": tag,
             "listening": C.parse_portal(p) in self._listening}
            for t in targets
            for tag, p in t.portals()
        ]

    async def status(self) -> dict:
        return _scrub(
            {
                "config": str(self.config_path) if self.config_path else None,
                "persistent": self.config_path is not None,
                "portals": [C.format_portal(h, p) for h, p in sorted(self._listening)],
                "discovery_chap": self.config.discovery_auth is not None,
                "targets": [self._target_row(t) for t in self.config.targets],
                "sessions": self._sessions(),
                "lun_io": self._lun_io(),
                # The daemon's monotonic clock when sampled: `iscsi-target stats` divides
                # counter differences by the difference of these.
                "clock": round(time.monotonic(), 6),
            }
        )

    async def config_show(self) -> dict:
        return C.to_dict(self.config, mask_secrets=True)

    async def ping(self) -> dict:
        return {"pid": os.getpid(), "config": str(self.config_path) if self.config_path else None}

    # ------------------------------------------------------------------ control socket dispatch

    OPS: dict[str, str] = {
        "ping": "ping",
        "status": "status",
        "config.show": "config_show",
        "config.reload": "reload",
        "target.add": "target_add",
        "target.remove": "target_remove",
        "target.set": "target_set",
        "target.list": "target_list",
        "lun.add": "lun_add",
        "lun.remove": "lun_remove",
        "lun.resize": "lun_resize",
        "lun.list": "lun_list",
        "acl.add": "acl_add",
        "acl.remove": "acl_remove",
        "acl.list": "acl_list",
        "chap.set": "chap_set",
        "chap.clear": "chap_clear",
        "portal.add": "portal_add",
        "portal.remove": "portal_remove",
        "portal.list": "portal_list",
        "session.drop": "session_drop",
    }

    async def handle_request(self, op: str, args: dict) -> Any:
        """Run one control request; raises AdminError/ConfigError for the caller's mistakes."""
        name = self.OPS.get(op)
        if name is None:
            raise AdminError(f"unknown operation {op!r}")
        method = getattr(self, name)
        if not isinstance(args, dict):
            raise AdminError("args must be an object")
        try:
            inspect.signature(method).bind(**args)
        except TypeError as e:
            raise AdminError(f"{op}: {e}") from None
        _check_arg_types(op, method, args)
        return await method(**args)


def _type_ok(value: Any, hint: Any) -> bool:
    """Does a JSON value fit an operation's annotation (str, int, bool, None, list[X], dict[K, V], unions)?"""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is int:  # JSON true/false are not numbers
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list or hint is list:
        inner = typing.get_args(hint)
        if not isinstance(value, list):
            return False
        return all(_type_ok(v, inner[0]) for v in value) if inner else True
    if origin is dict or hint is dict:
        inner = typing.get_args(hint)
        if not isinstance(value, dict):
            return False
        return all(_type_ok(k, inner[0]) and _type_ok(v, inner[1]) for k, v in value.items()) if inner else True
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list or hint is list:
        return "a list"
    if typing.get_origin(hint) is dict or hint is dict:
        return "an object"
    return {str: "a string", int: "a number", bool: "true/false"}.get(hint, getattr(hint, "__name__", str(hint)))


def _deleted_while_open(unit: Unit | None) -> str | None:
    """Where the data of an image deleted while served still is (``/proc/PID/fd/N``: readable
    until the daemon closes it), or None while the image has a name."""
    fd = getattr(getattr(unit, "backstore", None), "fileno", None)
    if not isinstance(fd, int) or fd < 0:
        return None
    try:
        deleted = os.fstat(fd).st_nlink == 0
    except OSError:
        return None
    return f"/proc/{os.getpid()}/fd/{fd}" if deleted else None


def _io_health(lu: object) -> dict:
    """Backstore errors an LU answered (MEDIUM ERROR / DATA PROTECT) since its image was
    opened, the latest in words, and a write-back failure that makes every later flush fail
    until the image is opened again (lun remove + add, or a restart)."""
    write_error = getattr(getattr(lu, "backstore", None), "write_error", None)
    return {"io_errors": getattr(lu, "io_errors", 0),
            "last_io_error": getattr(lu, "last_io_error", None),
            "write_back_failed": None if write_error is None else (write_error.strerror or str(write_error))}


def _check_arg_types(op: str, method: Callable, args: dict) -> None:
    """A control request's arguments must have the types the operation declares.

    The CLI always sends the right types; a hand-written request (the socket speaks plain
    JSON) with, say, ``"number": "x"`` gets a clear refusal instead of an internal error.
    """
    try:
        hints = typing.get_type_hints(method)
    except (NameError, TypeError):  # an annotation that does not resolve: skip the check, not the request
        return
    for name, value in args.items():
        hint = hints.get(name)
        if hint is not None and not _type_ok(value, hint):
            # The refusal is logged too: a secret sent as, say, a list must not be quoted.
            shown = "***" if any(w in name.lower() for w in _SECRET_WORDS) else json.dumps(value)[:40]
            raise AdminError(f"{op}: {name} must be {_type_name(hint)}, not {shown}")
