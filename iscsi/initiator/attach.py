"""Expose a LUN as a local block device without the kernel iSCSI initiator.

The attach daemon (``python -m iscsi.initiator.attach``, started by ``iscsi-initiator attach``)
logs in, serves the LUN as a single file ``disk`` on a private FUSE mount (pyfuse3 on
libfuse3, asyncio mode) and binds that file to a loop device (``losetup``) with the LUN's
block size.  The kernel then sees an ordinary ``/dev/loopN``: mkfs, mount, dd all work,
and every block I/O becomes a SCSI command on our session (reconnecting on its own if
the target goes away, like a kernel session would).

The FUSE file is opened with ``direct_io`` so the page cache sits only above the loop
device, never twice; fsync on the loop device becomes SYNCHRONIZE CACHE.

State lives in ``STATE_DIR/<id>.json`` (pid, loop device, mount point, URL without secrets)
so ``detach`` and ``list`` work from any process.  Needs root, /dev/fuse and loop devices.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from ..log import event, setup as log_setup
from .client import open_device
from .device import BlockDevice
from .session import SessionOptions
from .url import parse_url

log = logging.getLogger("iscsi.initiator.attach")

STATE_DIR = Path(os.environ.get("SANSTACK_INITIATOR_RUN", "/run/sanstack-initiator"))
DISK_NAME = b"disk"
DISK_INODE = 2
#: Largest FUSE request we ask for (the kernel caps it at 1 MiB since 4.20, 128 KiB before).
FUSE_MAX_WRITE = 1 << 20
#: How long ``attach`` waits for the daemon to log in and set up the loop device.
ATTACH_TIMEOUT = 60.0
#: How long ``detach`` waits for the daemon to flush, unmount and log out.
DETACH_TIMEOUT = 30.0


def fuse_problem() -> str | None:
    """Why attach cannot work here, or None."""
    try:
        import pyfuse3  # noqa: F401
    except ImportError:
        return "pyfuse3 is not installed (pip install pyfuse3; Debian: fuse3 libfuse3-dev)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "attach needs root (FUSE mount + losetup)"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing (no loop driver)"
    return None


# ---------------------------------------------------------------------------
# FUSE file system with one file
# ---------------------------------------------------------------------------

def _make_ops(dev: BlockDevice):
    import pyfuse3

    class DiskFs(pyfuse3.Operations):
        """A directory holding one regular file whose bytes are the LUN."""

        def __init__(self) -> None:
            super().__init__()
            self.dev = dev
            self._lock = asyncio.Lock()   # serializes read-modify-write of partial blocks

        def _attr(self, inode: int) -> "pyfuse3.EntryAttributes":
            a = pyfuse3.EntryAttributes()
            now = int(time.time() * 1e9)
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now
            a.st_uid, a.st_gid = os.getuid(), os.getgid()
            a.entry_timeout = a.attr_timeout = 3600
            if inode == pyfuse3.ROOT_INODE:
                a.st_mode = stat.S_IFDIR | 0o700
                a.st_size = 0
                a.st_nlink = 2
            else:
                a.st_mode = stat.S_IFREG | 0o600
                a.st_size = self.dev.size
                a.st_blksize = self.dev.block_size
                a.st_blocks = self.dev.size // 512
                a.st_nlink = 1
            a.st_ino = inode
            return a

        async def getattr(self, inode, ctx=None):
            if inode not in (pyfuse3.ROOT_INODE, DISK_INODE):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(inode)

        async def lookup(self, parent_inode, name, ctx=None):
            if parent_inode != pyfuse3.ROOT_INODE or name != DISK_NAME:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(DISK_INODE)

        async def opendir(self, inode, ctx):
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):
            if start_id == 0:
                pyfuse3.readdir_reply(token, DISK_NAME, self._attr(DISK_INODE), 1)

        async def open(self, inode, flags, ctx):
            if inode != DISK_INODE:
                raise pyfuse3.FUSEError(errno.EISDIR)
            fi = pyfuse3.FileInfo(fh=inode)
            fi.direct_io = True
            fi.keep_cache = False
            return fi

        async def read(self, fh, off, size):
            dev = self.dev
            bs = dev.block_size
            end = min(off + size, dev.size)
            if off >= end:
                return b""
            first, last = off // bs, (end + bs - 1) // bs
            try:
                data = await dev.read(first, last - first)
            except Exception as exc:
                event(log, "attach.read_error", logging.ERROR, offset=off, size=size, error=exc)
                raise pyfuse3.FUSEError(errno.EIO)
            skip = off - first * bs
            return data[skip:skip + (end - off)]

        async def write(self, fh, off, buf):
            dev = self.dev
            bs = dev.block_size
            n = len(buf)
            if off + n > dev.size:
                raise pyfuse3.FUSEError(errno.ENOSPC)
            try:
                if off % bs == 0 and n % bs == 0:
                    await dev.write(off // bs, buf)
                else:
                    # Partial blocks: read-modify-write under a lock so two writers to the
                    # same block do not lose each other's bytes.
                    async with self._lock:
                        first, last = off // bs, (off + n + bs - 1) // bs
                        block = bytearray(await dev.read(first, last - first))
                        skip = off - first * bs
                        block[skip:skip + n] = buf
                        await dev.write(first, block)
            except Exception as exc:
                event(log, "attach.write_error", logging.ERROR, offset=off, size=n, error=exc)
                raise pyfuse3.FUSEError(errno.EIO)
            return n

        async def fsync(self, fh, datasync):
            try:
                await self.dev.flush()
            except Exception as exc:
                event(log, "attach.flush_error", logging.ERROR, error=exc)
                raise pyfuse3.FUSEError(errno.EIO)

        async def flush(self, fh):
            return None

        async def release(self, fh):
            return None

        async def releasedir(self, fh):
            return None

        async def setattr(self, inode, attr, fields, fh, ctx):
            if fields.update_size and attr.st_size != self.dev.size:
                raise pyfuse3.FUSEError(errno.EPERM)
            return self._attr(inode)

        async def statfs(self, ctx):
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = self.dev.block_size
            s.f_blocks = self.dev.blocks
            s.f_namemax = 255
            return s

    return DiskFs()


# ---------------------------------------------------------------------------
# State files
# ---------------------------------------------------------------------------

def state_files() -> list[Path]:
    if not STATE_DIR.is_dir():
        return []
    return sorted(STATE_DIR.glob("*.json"))


def load_states(prune: bool = True) -> list[dict]:
    """Attachments whose daemon is alive (stale files of dead daemons are removed)."""
    out = []
    for path in state_files():
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = st.get("pid", 0)
        alive = pid > 0 and _alive(pid)
        if not alive and prune:
            path.unlink(missing_ok=True)
            continue
        st["state_file"] = str(path)
        st["alive"] = alive
        out.append(st)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _write_state(path: Path, st: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(st, indent=2) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _losetup_attach(file: Path, block_size: int, read_only: bool = False) -> str:
    ro = ["--read-only"] if read_only else []
    cmd = ["losetup", "--find", "--show", *ro, f"--sector-size={block_size}", str(file)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0 and "sector-size" in res.stderr:
        res = subprocess.run(["losetup", "--find", "--show", *ro, str(file)], capture_output=True,
                             text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"losetup failed: {res.stderr.strip()}")
    return res.stdout.strip()


def _losetup_grow(loopdev: str) -> None:
    """``losetup --set-capacity``: the loop device takes the backing file's new size."""
    res = subprocess.run(["losetup", "--set-capacity", loopdev], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"losetup --set-capacity failed: {res.stderr.strip()}")


def _follow_capacity(dev: BlockDevice, executor, loopdev: str) -> None:
    """When the LU is resized online (CAPACITY DATA HAS CHANGED, seen on the next command and
    re-read by BlockDevice), give the loop device the new size: the FUSE file's cached
    attributes are dropped (the kernel caches them for an hour) and the loop capacity set
    again, as ``iscsiadm -m session --rescan`` makes sd re-read it.  A mounted file system
    can then be grown (resize2fs)."""
    import pyfuse3

    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task] = set()

    async def grow(size: int) -> None:
        try:
            # Not from inside the FUSE request that got the UA (invalidation may block).
            await asyncio.to_thread(pyfuse3.invalidate_inode, DISK_INODE, True)
            await asyncio.to_thread(_losetup_grow, loopdev)
            event(log, "attach.resized", loop=loopdev, size=size)
        except (OSError, RuntimeError) as exc:
            event(log, "attach.resize_failed", logging.WARNING, loop=loopdev, size=size, error=exc)

    def on_event(name: str, info: dict) -> None:
        if name == "capacity_changed":
            t = loop.create_task(grow(dev.size))
            pending.add(t)
            t.add_done_callback(pending.discard)

    executor.listeners.append(on_event)


def _losetup_detach(loopdev: str) -> None:
    subprocess.run(["losetup", "--detach", loopdev], capture_output=True, text=True, timeout=30)


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------

async def serve(urls: list[str], *, ident: str, report_fd: int | None, replacement_timeout: float,
                policy: str = "round-robin", keys: dict[str, str] | None = None) -> int:
    import pyfuse3
    import pyfuse3.asyncio as fuse_asyncio

    fuse_asyncio.enable()
    u = parse_url(urls[0])
    mnt = STATE_DIR / ident / "mnt"
    mnt.mkdir(parents=True, exist_ok=True, mode=0o700)
    state_path = STATE_DIR / f"{ident}.json"
    session = None   # a Session, or a MultipathExecutor over several
    loopdev = None
    fuse_up = False

    def report(line: str) -> None:
        if report_fd is not None:
            try:
                os.write(report_fd, (line + "\n").encode())
            except OSError:
                pass

    try:
        options = SessionOptions(replacement_timeout=replacement_timeout)
        if len(urls) > 1:
            from .multipath import open_multipath
            session, dev = await open_multipath(urls, policy=policy, options=options, keys=keys,
                                                no_path_timeout=replacement_timeout)
        else:
            session, dev = await open_device(u, options=options, keys=keys)
        ops = _make_ops(dev)
        options = set(pyfuse3.default_options)
        options |= {"fsname=sanstack-iscsi"}
        options.discard("default_permissions")
        pyfuse3.init(ops, str(mnt), options)
        fuse_up = True
        main = asyncio.ensure_future(pyfuse3.main(min_tasks=4, max_tasks=64))
        # losetup opens the FUSE file, which is served by pyfuse3.main in this loop: run it
        # in a thread so the loop keeps answering.
        # A write-protected LU becomes a read-only loop device, as sd makes the disk read-only
        # (writes would only fail with EIO otherwise).
        read_only = await dev.write_protected()
        loopdev = await asyncio.to_thread(_losetup_attach, mnt / DISK_NAME.decode(), dev.block_size,
                                          read_only)
        st = {"id": ident, "pid": os.getpid(), "url": u.to_string(), "target": u.target, "lun": u.lun,
              "portal": u.portal, "loop": loopdev, "mountpoint": str(mnt), "size": dev.size,
              "block_size": dev.block_size, "identity": dev.identity, "started": time.time(),
              "read_only": read_only,
              "paths": [parse_url(x).portal for x in urls]}
        _write_state(state_path, st)
        _follow_capacity(dev, session, loopdev)
        event(log, "attach.ready", loop=loopdev, url=u.to_string(), size=dev.size)
        report(f"ok {loopdev}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        return 0
    except Exception as exc:
        event(log, "attach.failed", logging.ERROR, url=u.to_string(), error=exc)
        report(f"error {exc}")
        return 1
    finally:
        if loopdev:
            await asyncio.to_thread(_losetup_detach, loopdev)
        if fuse_up:
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=30)
        if session is not None:
            try:
                await session.close()
            except Exception:
                pass
        state_path.unlink(missing_ok=True)
        try:
            mnt.rmdir()
            mnt.parent.rmdir()
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="attach daemon (started by iscsi-initiator attach)")
    ap.add_argument("--id", required=True)
    ap.add_argument("--report-fd", type=int)
    ap.add_argument("--replacement-timeout", type=float, default=120.0)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--policy", default="round-robin")
    ap.add_argument("--key", action="append", default=[], metavar="NAME=VALUE",
                    help="login key preference (iscsi-initiator -k)")
    args = ap.parse_args(argv)
    keys = dict(k.split("=", 1) for k in args.key if "=" in k) or None
    log_setup(args.log_level)
    # URLs (with secrets) come on stdin, one per line (several = multipath): never in argv.
    urls = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass
    return asyncio.run(serve(urls, ident=args.id, report_fd=args.report_fd,
                             replacement_timeout=args.replacement_timeout, policy=args.policy,
                             keys=keys))


# ---------------------------------------------------------------------------
# Client side: start / stop daemons
# ---------------------------------------------------------------------------

def start_daemon(url: str | list[str], *, log_file: Path | None = None, replacement_timeout: float = 120.0,
                 timeout: float = ATTACH_TIMEOUT, policy: str = "round-robin",
                 keys: dict[str, str] | None = None) -> dict:
    """Start an attach daemon for ``url`` (several URLs of one LU = multipath); returns its
    state (with ``loop``) once it is ready.  ``keys``: login key preferences (not secret, so
    they go in argv; the initiator name travels in the URL's ``initiator_name=``)."""
    urls = [url] if isinstance(url, str) else list(url)
    problem = fuse_problem()
    if problem:
        raise RuntimeError(problem)
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    ident = f"a{int(time.time() * 1000) % 10**10}-{os.getpid()}"
    log_file = log_file or STATE_DIR / f"{ident}.log"
    r, w = os.pipe()
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iscsi.initiator.attach", "--id", ident, "--report-fd", str(w),
             "--replacement-timeout", str(replacement_timeout), "--policy", policy,
             *(arg for k, v in (keys or {}).items() for arg in ("--key", f"{k}={v}"))],
            stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT, pass_fds=(w,),
            start_new_session=True, env=env)
    os.close(w)
    assert proc.stdin is not None
    proc.stdin.write("".join(u + "\n" for u in urls).encode())
    proc.stdin.close()
    deadline = time.monotonic() + timeout
    line = b""
    try:
        import select
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise TimeoutError(f"attach daemon not ready after {timeout:.0f}s (log: {log_file})")
            ready, _, _ = select.select([r], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                line += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(r)
    text = line.decode().strip()
    if text.startswith("error "):
        # The daemon said why (login refused, no such LUN...): that one line is the message;
        # its log holds nothing more, so it does not pile up in STATE_DIR.
        _reap(proc)
        log_file.unlink(missing_ok=True)
        raise RuntimeError(f"attach failed: {text[6:]}")
    if not text.startswith("ok "):
        tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise RuntimeError(f"attach failed: daemon exited (log: {log_file})\n{tail}")
    loopdev = text[3:]
    for st in load_states():
        if st.get("id") == ident:
            return st
    return {"id": ident, "loop": loopdev, "pid": proc.pid}


def _reap(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Wait for a daemon that reported failure to exit (it logs out first), so no zombie is left."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def find_attachment(what: str) -> dict | None:
    """By loop device, id, or URL (of any path of a multipath attachment)."""
    for st in load_states():
        if what in (st.get("loop"), st.get("id"), st.get("url")):
            return st
        try:
            u = parse_url(what)
        except ValueError:
            continue
        if (u.target, u.lun) == (st.get("target"), st.get("lun")) and \
                u.portal in (st.get("paths") or [st.get("portal")]):
            return st
    return None


def stop_daemon(st: dict, timeout: float = DETACH_TIMEOUT) -> None:
    """Ask the daemon to detach the loop device, unmount, log out and exit."""
    pid = st["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
        try:  # reap if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
        loop = st.get("loop")
        if loop:
            _losetup_detach(loop)
        mnt = st.get("mountpoint")
        if mnt:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, timeout=30)
    Path(st.get("state_file", STATE_DIR / f"{st['id']}.json")).unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
