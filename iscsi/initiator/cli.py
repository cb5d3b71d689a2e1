"""``iscsi-initiator``: the command line of the software initiator.

URLs are libiscsi's: ``iscsi://[user[%password]@]host[:port]/target-iqn/lun`` (see
:mod:`iscsi.initiator.url`).  A password can also come from ``ISCSI_PASSWORD`` /
``ISCSI_TARGET_PASSWORD`` so it stays out of the process list.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import os
import re
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from ..keys import format_portal
from ..log import setup as log_setup
from . import attach as attach_mod
from . import bench as bench_mod
from .client import check_iscsi_name, discover as do_discover, open_device, open_session, validate_keys
from .device import BlockDevice, check_lu_present
from .errors import ConfigError, IscsiError, ScsiError
from .nodes import NodeRecord, NodeStore
from .session import LOGIN_TIMEOUT, SessionOptions
from .url import IscsiUrl, UrlError, parse_portal, parse_url, redact

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: dd keeps this many chunks in flight (each of ``bs`` bytes).
DD_QUEUE_DEPTH = 8
#: Most commands dd and bench keep in flight.
MAX_QUEUE_DEPTH = 1024


def parse_size(text: str, *, what: str = "size", minimum: int = 0) -> int:
    m = _SIZE.match(str(text))
    if not m:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 4k, 1M)", param_hint=what)
    n = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if n < minimum:
        raise click.BadParameter(f"{text!r} is less than {minimum}", param_hint=what)
    return n


def _byte_value(text: str, what: str, high: int) -> int:
    """A number in C notation (0xab, 171, 0o253) from 0 to ``high``, or a usage error."""
    try:
        n = int(text, 0)
    except ValueError:
        raise click.BadParameter(f"not a number: {text!r} (e.g. 0xab)", param_hint=what) from None
    if not 0 <= n <= high:
        raise click.BadParameter(f"{text!r} is outside 0..{high} (0x{high:x})", param_hint=what)
    return n


def _count(ops: dict[str, str], key: str, default: int | None, minimum: int = 0,
           maximum: int | None = None) -> int | None:
    """A dd operand that must be a whole number from ``minimum`` to ``maximum``."""
    if key not in ops:
        return default
    text = ops[key]
    if not text.isdigit() or int(text) < minimum:
        raise click.UsageError(f"dd: {key}={text!r} must be a whole number >= {minimum}")
    if maximum is not None and int(text) > maximum:
        raise click.UsageError(f"dd: {key}={text!r} must be at most {maximum}")
    return int(text)


def _run(coro):
    try:
        import uvloop
        return uvloop.run(coro) if hasattr(uvloop, "run") else asyncio.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _url(text: str, *, require_target: bool = True) -> IscsiUrl:
    try:
        u = parse_url(text, require_target=require_target)
    except UrlError as exc:
        raise click.BadParameter(str(exc)) from None
    if u.user and u.password is None and os.environ.get("ISCSI_PASSWORD"):
        u = replace(u, password=os.environ["ISCSI_PASSWORD"])
    if u.target_user and u.target_password is None and os.environ.get("ISCSI_TARGET_PASSWORD"):
        u = replace(u, target_password=os.environ["ISCSI_TARGET_PASSWORD"])
    return u


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def _shown(value: Any) -> Any:
    """A string from the target (INQUIRY text, designators) as printed: SPC-4 §4.3.1 allows
    only printable ASCII there; anything else is escaped so it cannot drive the terminal."""
    if isinstance(value, str) and not value.isprintable():
        return ascii(value)[1:-1]
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


#: How long a one-shot command waits for a lost session to come back (``--timeout``): the
#: 120 s of open-iscsi's replacement_timeout suits a mounted disk, not a command at a prompt.
CLI_TIMEOUT = 30.0


class _Ctx:
    initiator_name: str | None = None
    keys: dict[str, str] | None = None
    timeout: float = CLI_TIMEOUT

    def login_kw(self) -> dict[str, Any]:
        """open_session/open_device arguments: our name, keys, and timers bounded by --timeout."""
        opts = SessionOptions(login_timeout=min(LOGIN_TIMEOUT, self.timeout),
                              replacement_timeout=self.timeout)
        return {"initiator_name": self.initiator_name, "keys": self.keys, "options": opts}


async def _close(session, timeout: float) -> None:
    """Log out, but give up on the Logout Response after ``timeout`` (a target that stopped
    answering after the last command would hold the prompt for the session's 30 s)."""
    try:
        await asyncio.wait_for(session.close(), timeout)
    except (asyncio.TimeoutError, IscsiError):
        await session.close(logout=False)


def _with_name(u: IscsiUrl, obj: _Ctx) -> IscsiUrl:
    """``u`` carrying ``-i NAME`` (the attach daemon is another process: it learns our name
    from the URL, as the other commands learn it from ``-i``)."""
    return replace(u, initiator_name=obj.initiator_name) if obj.initiator_name else u


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--initiator-name", "-i", envvar="ISCSI_INITIATOR_NAME",
              help="our IQN [default: $ISCSI_INITIATOR_NAME, else InitiatorName in /etc/iscsi/initiatorname.iscsi]")
@click.option("--key", "-k", "keys", multiple=True, metavar="NAME=VALUE",
              help="login key preference, e.g. -k MaxBurstLength=262144 -k HeaderDigest=CRC32C")
@click.option("--log-level", default="WARNING", show_default=True, help="debug, info, warning or error")
@click.option("--timeout", type=click.FloatRange(min=1, max=3600), default=CLI_TIMEOUT, show_default=True,
              help="seconds to wait for a portal, or for a lost session to come back, before failing")
@click.pass_context
def main(ctx: click.Context, initiator_name: str | None, keys: tuple[str, ...], log_level: str,
         timeout: float) -> None:
    """Software iSCSI initiator (RFC 7143): discovery, I/O, benchmarks, attach as /dev/loopN."""
    log_setup(log_level)
    ctx.obj = _Ctx()
    ctx.obj.initiator_name = initiator_name
    ctx.obj.timeout = timeout
    parsed = {}
    for item in keys:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--key")
        parsed[name] = value
    try:
        # Checked here so a bad key is named before any connection (and not as "refused").
        validate_keys(parsed)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--key") from None
    ctx.obj.keys = parsed or None


def _guard(fn):
    """Turn iSCSI/SCSI failures into one line on stderr and exit status 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except BrokenPipeError:
            # The reader went away (``| head``): stop quietly, as cat(1) does on SIGPIPE.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)   # 128 + SIGPIPE
        except (IscsiError, ScsiError, OSError, EOFError, asyncio.TimeoutError, ValueError,
                RuntimeError) as exc:
            _fail(str(exc) or type(exc).__name__)
        except MemoryError:
            _fail("out of memory (is bs= or --bs too large?)")
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)   # 128 + SIGINT, as shells report it
    return wrapper


# ---------------------------------------------------------------------------
# discovery and inventory
# ---------------------------------------------------------------------------

@main.command()
@click.argument("portal")
@click.option("--save", is_flag=True, help="save a node record per target and portal")
@click.pass_obj
@_guard
def discover(obj: _Ctx, portal: str, save: bool) -> None:
    """SendTargets discovery: PORTAL is host[:port] or iscsi://[user%pw@]host[:port]."""
    if portal.startswith("iscsi://"):
        u = _url(portal, require_target=False)
    else:
        try:
            host, port = parse_portal(portal)
        except UrlError as exc:      # a usage error, as a bad URL is
            raise click.BadParameter(str(exc), param_hint="PORTAL") from None
        u = IscsiUrl(host=host, port=port)
    targets = _run(do_discover(u.host, u.port, url=u, initiator_name=obj.initiator_name, keys=obj.keys,
                               timeout=min(LOGIN_TIMEOUT, obj.timeout)))
    store = NodeStore() if save else None
    withheld = []
    for t in targets:
        for host, port, tpgt in t.portals:
            click.echo(f"{format_portal(host, port)},{tpgt} {t.name}")
            if store is None:
                continue
            # The CHAP credentials given for discovery go only to portals at the address they
            # were given for: a portal elsewhere (which the discovery answer alone names) would
            # otherwise be sent responses to its own challenges, enough for an offline guess.
            same_host = _same_address(host, u.host)
            if u.user and not same_host:
                withheld.append(f"{format_portal(host, port)} {t.name}")
            store.upsert(NodeRecord(target=t.name, host=host, port=port, tpgt=tpgt,
                                    user=u.user if same_host else None,
                                    password=u.password if same_host else None,
                                    target_user=u.target_user if same_host else None,
                                    target_password=u.target_password if same_host else None))
    for where in withheld:
        click.echo(f"note: saved {where} without the discovery CHAP credentials (another address); "
                   "give them with: node add iscsi://USER%SECRET@HOST:PORT/TARGET", err=True)


def _same_address(a: str, b: str) -> bool:
    """Do two portal hosts name the same address (case and IPv6 spelling aside)?"""
    try:
        return ipaddress.ip_address(a.strip("[]")) == ipaddress.ip_address(b.strip("[]"))
    except ValueError:
        return a.strip("[]").lower() == b.strip("[]").lower()


async def _report_luns(session, lun: int) -> list[int] | None:
    """REPORT LUNS sent to ``lun``, then to LUN 0 (tgtd refuses it at a LUN that is not
    there; SPC-4 §6.33 requires LUN 0 to answer it); None when neither answers."""
    for probe in dict.fromkeys((lun, 0)):
        try:
            return await BlockDevice(session, probe).report_luns()
        except ScsiError:
            continue
    return None


async def _lun_table(u: IscsiUrl, obj: _Ctx) -> list[dict]:
    session = await open_session(u, **obj.login_kw())
    rows = []
    try:
        reported = await _report_luns(session, u.lun)
        for lun in reported if reported is not None else [u.lun]:
            dev = BlockDevice(session, lun)
            inq = await dev.inquiry()
            if reported is None:
                check_lu_present(lun, inq)     # not a row for a LUN that is not there
            row: dict[str, Any] = {"lun": lun, "type": inq.device_type, "vendor": inq.vendor,
                                   "product": inq.product}
            if inq.device_type == 0 and inq.peripheral_qualifier == 0:
                try:
                    await dev.refresh()
                    row.update(size=dev.size, block_size=dev.block_size, identity=dev.identity)
                except ScsiError as exc:
                    row["error"] = str(exc)
            rows.append(row)
    finally:
        await _close(session, obj.timeout)
    return rows


@main.command("ls")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def ls_cmd(obj: _Ctx, url: str, as_json: bool) -> None:
    """List targets (portal URL) or LUNs with sizes (target URL)."""
    u = _url(url, require_target=False)

    async def go():
        targets = [u.target] if u.target else [t.name for t in await do_discover(
            u.host, u.port, url=u, initiator_name=obj.initiator_name, keys=obj.keys,
            timeout=min(LOGIN_TIMEOUT, obj.timeout))]
        out = {}
        for name in targets:
            out[name] = await _lun_table(replace(u, target=name), obj)
        return out

    result = _run(go())
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for target, rows in result.items():
        click.echo(f"Target: {target}")
        for r in rows:
            size = f"{_human(r['size'])} ({r['size'] // r['block_size']} x {r['block_size']})" if "size" in r else ""
            click.echo(f"  Lun:{r['lun']:<3} Type:{r['type']:<2} {_shown(r['vendor'])} {_shown(r['product'])} "
                       f"{size}{'  ' + _shown(r['identity']) if r.get('identity') else ''}")


@main.command()
@click.argument("url")
@click.option("--page", "-e", type=str, default=None, help="VPD page (hex, e.g. 0x83)")
@click.pass_obj
@_guard
def inquiry(obj: _Ctx, url: str, page: str | None) -> None:
    """Standard INQUIRY data, or a VPD page."""
    u = _url(url)
    vpd_page = _byte_value(page, "--page", 0xFF) if page is not None else None  # SPC-4 §6.6.1

    async def go():
        session = await open_session(u, **obj.login_kw())
        try:
            dev = BlockDevice(session, u.lun)
            if vpd_page is not None:
                return (await dev.vpd(vpd_page)).hex()
            inq = await dev.inquiry()
            return "\n".join(f"{k}: {_shown(v)}" for k, v in vars(inq).items() if k != "raw")
        finally:
            await _close(session, obj.timeout)

    click.echo(_run(go()))


@main.command()
@click.argument("url")
@click.pass_obj
@_guard
def readcap(obj: _Ctx, url: str) -> None:
    """READ CAPACITY (16)."""
    u = _url(url)

    async def go():
        # Through open_device: a LUN that is not there, or is not a block device (tgtd's
        # LUN 0 controller), is named as such instead of failing READ CAPACITY (10).
        session, dev = await open_device(u, **obj.login_kw())
        try:
            assert dev.info is not None
            return dev.info.capacity
        finally:
            await _close(session, obj.timeout)

    cap = _run(go())
    click.echo(f"Block size: {cap.block_size}\nBlocks: {cap.blocks}\nSize: {cap.size} ({_human(cap.size)})\n"
               f"Thin provisioning: {'yes' if cap.lbpme else 'no'}")


# ---------------------------------------------------------------------------
# block I/O
# ---------------------------------------------------------------------------

@main.command()
@click.argument("url")
@click.option("--lba", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--count", "-n", type=click.IntRange(min=1), default=1, show_default=True, help="blocks")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="file (default: hex dump)")
@click.pass_obj
@_guard
def read(obj: _Ctx, url: str, lba: int, count: int, output: str | None) -> None:
    """READ (16) COUNT blocks at LBA."""
    u = _url(url)

    async def go():
        session, dev = await open_device(u, **obj.login_kw())
        try:
            return await dev.read(lba, count)
        finally:
            await _close(session, obj.timeout)

    data = _run(go())
    if output:
        Path(output).write_bytes(data)
    else:
        for off in range(0, len(data), 16):
            chunk = data[off:off + 16]
            text = "".join(chr(c) if 32 <= c < 127 else "." for c in chunk)
            click.echo(f"{off:08x}  {chunk.hex(' '):<47}  {text}")


@main.command()
@click.argument("url")
@click.option("--lba", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--input", "-i", "input_", type=click.Path(exists=True, dir_okay=False), help="data file")
@click.option("--pattern", type=str, help="fill with this byte (e.g. 0xab) instead of a file")
@click.option("--count", "-n", type=click.IntRange(min=1), default=None,
              help="blocks to write with --pattern [default: 1]")
@click.option("--fua", is_flag=True, help="force unit access (durable on return)")
@click.pass_obj
@_guard
def write(obj: _Ctx, url: str, lba: int, input_: str | None, pattern: str | None, count: int | None,
          fua: bool) -> None:
    """WRITE (16) at LBA from a file (zero-padded to whole blocks) or a byte pattern."""
    u = _url(url)
    if (input_ is None) == (pattern is None):
        raise click.UsageError("give exactly one of --input or --pattern")
    if input_ is not None and count is not None:
        raise click.UsageError("--count goes with --pattern: --input writes the whole file")
    count = count or 1
    fill = _byte_value(pattern, "--pattern", 0xFF) if pattern is not None else 0

    async def go():
        session, dev = await open_device(u, **obj.login_kw())
        try:
            bs = dev.block_size
            if input_:
                data = Path(input_).read_bytes()
                if not data:
                    raise ValueError(f"{input_} is empty: nothing to write")
                data += b"\0" * (-len(data) % bs)
            else:
                data = bytes([fill]) * (count * bs)
            await dev.write(lba, data, fua=fua)
            return len(data) // bs
        finally:
            await _close(session, obj.timeout)

    n = _run(go())
    click.echo(f"wrote {n} blocks at LBA {lba}")


class _FileSide:
    def __init__(self, path: str, writing: bool, *, truncate_at: int = 0) -> None:
        self.path = path
        self.writing = writing
        flags = (os.O_WRONLY | os.O_CREAT) if writing else os.O_RDONLY
        self.fd = os.open(path, flags, 0o644)
        st = os.fstat(self.fd)
        regular = stat.S_ISREG(st.st_mode)
        # Only a regular file's st_size is its length (a device or pipe reports 0): anything
        # else is read for count= blocks.
        self.size = st.st_size if regular and not writing else None
        if writing and regular and st.st_size > truncate_at:
            os.ftruncate(self.fd, truncate_at)   # dd(1) without conv=notrunc
        try:
            os.lseek(self.fd, 0, os.SEEK_CUR)
            self.seekable = True
        except OSError:
            # A pipe, socket or terminal: read and written in order (dd runs with qd=1).
            self.seekable = False

    async def read(self, off: int, n: int) -> bytes:
        if self.seekable:
            return os.pread(self.fd, n, off)
        parts, left = [], n
        while left:
            chunk = os.read(self.fd, left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    async def write(self, off: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            k = os.pwrite(self.fd, view, off) if self.seekable else os.write(self.fd, view)
            view, off = view[k:], off + k

    async def close(self) -> None:
        try:
            if self.writing:
                os.fsync(self.fd)
        except OSError:
            pass            # a pipe or character device cannot be synced
        finally:
            os.close(self.fd)


class _LunSide:
    def __init__(self, session, dev: BlockDevice, timeout: float = CLI_TIMEOUT) -> None:
        self.session, self.dev = session, dev
        self.timeout = timeout
        self.size = dev.size

    async def read(self, off: int, n: int) -> bytes:
        bs = self.dev.block_size
        n = min(n, self.size - off)
        if n <= 0:
            return b""
        blocks = (n + bs - 1) // bs
        data = await self.dev.read(off // bs, blocks)
        return data[:n]

    async def write(self, off: int, data: bytes) -> None:
        bs = self.dev.block_size
        if len(data) % bs:
            data = bytes(data) + b"\0" * (-len(data) % bs)  # dd conv=sync for the last block
        await self.dev.write(off // bs, data)

    async def close(self) -> None:
        try:
            await self.dev.flush()
        finally:
            await _close(self.session, self.timeout)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("operands", nargs=-1)
@click.option("--progress/--no-progress", default=None,
              help="progress bar on stderr (default: when stderr is a terminal)")
@click.pass_obj
@_guard
def dd(obj: _Ctx, operands: tuple[str, ...], progress: bool | None) -> None:
    """Copy between files and LUNs: if=SRC of=DST [bs=1M] [count=N] [skip=N] [seek=N] [qd=8].

    SRC/DST are paths or iscsi:// URLs; skip/seek/count are in bs units, as in dd(1).
    """
    ops: dict[str, str] = {}
    for op in operands:
        if "=" not in op:
            raise click.UsageError(f"operand {op!r} is not KEY=VALUE")
        k, v = op.split("=", 1)
        ops[k] = v
    unknown = set(ops) - {"if", "of", "bs", "count", "skip", "seek", "qd"}
    if unknown or "if" not in ops or "of" not in ops:
        raise click.UsageError("dd if=SRC of=DST [bs=] [count=] [skip=] [seek=] [qd=]")
    bs = parse_size(ops.get("bs", "1M"), what="bs", minimum=1)
    count = _count(ops, "count", None)
    skip, seek = _count(ops, "skip", 0), _count(ops, "seek", 0)
    # Each chunk in flight holds bs bytes: bounded as bench's --qd is.
    qd = _count(ops, "qd", DD_QUEUE_DEPTH, minimum=1, maximum=MAX_QUEUE_DEPTH)
    assert skip is not None and seek is not None and qd is not None
    if progress is None:
        progress = sys.stderr.isatty()

    async def side(spec: str, writing: bool):
        if spec.startswith("iscsi://"):
            session, dev = await open_device(_url(spec), **obj.login_kw())
            if bs % dev.block_size:
                await _close(session, obj.timeout)
                raise ValueError(f"bs={bs} is not a multiple of the LUN block size {dev.block_size}")
            return _LunSide(session, dev, obj.timeout)
        return _FileSide(spec, writing, truncate_at=seek * bs)

    async def go():
        src = await side(ops["if"], False)
        try:
            dst = await side(ops["of"], True)
        except BaseException:
            await src.close()
            raise
        try:
            streams = [s for s in (src, dst) if isinstance(s, _FileSide) and not s.seekable]
            if any(s is src for s in streams) and skip:
                raise ValueError(f"skip= needs a seekable input; {ops['if']} is a pipe")
            if any(s is dst for s in streams) and seek:
                raise ValueError(f"seek= needs a seekable output; {ops['of']} is a pipe")
            depth = 1 if streams else qd     # a pipe takes its chunks in order
            avail = (src.size - skip * bs) if src.size is not None else None
            if avail is not None and avail < 0:
                raise ValueError(f"skip={skip} starts past the end of {redact(ops['if'])} ({src.size} bytes)")
            total = count * bs if count is not None else avail
            if avail is not None and total is not None:
                total = min(total, avail)
            if total is None:
                raise ValueError(f"cannot tell the size of {redact(ops['if'])}: give count=")
            if isinstance(dst, _LunSide) and seek * bs + total > dst.size:
                raise ValueError(f"{total} bytes at seek={seek} do not fit in {redact(ops['of'])} "
                                 f"({dst.size} bytes)")
            done = 0
            t0 = time.monotonic()
            last_print = 0.0
            sem = asyncio.Semaphore(depth)
            errors: list[BaseException] = []
            eof = False
            src_is_stream = isinstance(src, _FileSide) and not src.seekable

            async def chunk(i: int) -> None:
                nonlocal done, last_print, eof
                try:
                    n = min(bs, total - i * bs)
                    data = await src.read((skip + i) * bs, n)
                    if len(data) < n:
                        if not src_is_stream:
                            raise ValueError(f"short read at chunk {i}")
                        eof = True       # a pipe ended before count=: copy what came, as dd(1)
                        if not data:
                            return
                    await dst.write((seek + i) * bs, data)
                    done += len(data)
                    now = time.monotonic()
                    if progress and now - last_print > 0.2:
                        last_print = now
                        _progress(done, total, now - t0)
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    sem.release()

            tasks = []
            nchunks = (total + bs - 1) // bs
            for i in range(nchunks):
                await sem.acquire()
                if errors or eof:
                    break
                tasks.append(asyncio.ensure_future(chunk(i)))
            await asyncio.gather(*tasks)
            if errors:
                raise errors[0]
            return done, time.monotonic() - t0
        finally:
            for s in (src, dst):
                await s.close()

    done, secs = _run(go())
    if progress:
        click.echo("", err=True)
    rate = done / secs if secs else 0
    click.echo(f"{done} bytes ({_human(done)}) copied, {secs:.3f} s, {_human(rate)}/s", err=True)


def _progress(done: int, total: int, secs: float) -> None:
    width = 30
    frac = done / total if total else 1.0
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    rate = done / secs if secs else 0
    click.echo(f"\r[{bar}] {frac * 100:5.1f}% {_human(done)} {_human(rate)}/s", err=True, nl=False)


# ---------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------

_RW = {"randread": ("random", 100), "randwrite": ("random", 0), "randrw": ("random", None),
       "read": ("sequential", 100), "write": ("sequential", 0), "rw": ("sequential", None)}


@main.command()
@click.argument("url")
@click.option("--rw", type=click.Choice(sorted(_RW)), default="randread", show_default=True)
@click.option("--rwmixread", type=click.IntRange(0, 100), default=70, show_default=True,
              help="read percentage for randrw/rw")
@click.option("--bs", default="4k", show_default=True, help="bytes per command (e.g. 4k, 128k, 1M)")
@click.option("--qd", "--iodepth", type=click.IntRange(1, MAX_QUEUE_DEPTH), default=32, show_default=True,
              help="commands in flight")
@click.option("--runtime", "-t", type=float, default=10.0, show_default=True, help="seconds")
@click.option("--size", default=None, help="limit the region used (e.g. 1G)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
@_guard
def bench(obj: _Ctx, url: str, rw: str, rwmixread: int, bs: str, qd: int, runtime: float,
          size: str | None, as_json: bool) -> None:
    """I/O benchmark: IOPS, MB/s and latency percentiles (writes destroy data!)."""
    u = _url(url)
    pattern, read_pct = _RW[rw]
    read_pct = rwmixread if read_pct is None else read_pct
    nbytes = parse_size(bs, what="--bs", minimum=1)
    if not (math.isfinite(runtime) and runtime > 0):
        raise click.BadParameter(f"{runtime} is not a positive number of seconds", param_hint="--runtime")
    region_bytes = parse_size(size, what="--size", minimum=nbytes) if size is not None else None

    async def go():
        session, dev = await open_device(u, **obj.login_kw())
        try:
            region = None
            if nbytes > dev.size:
                raise ValueError(f"--bs {bs} is larger than the LUN ({dev.size} bytes, {_human(dev.size)})")
            if region_bytes is not None:
                if region_bytes > dev.size:
                    raise ValueError(f"--size {size} is larger than the LUN ({dev.size} bytes, "
                                     f"{_human(dev.size)})")
                region = region_bytes // dev.block_size
            return await bench_mod.run(session, dev.lun, block_size=dev.block_size, blocks=dev.blocks,
                                       bs=nbytes, qd=qd, duration=runtime, pattern=pattern,
                                       read_pct=read_pct, region_blocks=region)
        finally:
            await _close(session, obj.timeout)

    r = _run(go())
    s = r.summary()
    if as_json:
        click.echo(json.dumps({"rw": rw, "bs": nbytes, "qd": qd} | s))
        if r.errors:
            _fail(f"{r.errors} I/O error(s): the run stopped at the first one: {r.first_error}")
        return
    lat = s["lat_us"]
    click.echo(f"{rw} bs={nbytes} qd={qd}: {s['iops']:.0f} IOPS, {s['MB/s']:.1f} MB/s "
               f"({r.reads} reads, {r.writes} writes, {r.errors} errors in {s['seconds']:.1f} s)")
    click.echo(f"latency us: mean {lat['mean']}  p50 {lat['p50']}  p90 {lat['p90']}  "
               f"p99 {lat['p99']}  p99.9 {lat['p99.9']}")
    if r.errors:
        _fail(f"{r.errors} I/O error(s): the run stopped at the first one: {r.first_error}")


# ---------------------------------------------------------------------------
# attach / detach / list
# ---------------------------------------------------------------------------

@main.command("attach")
@click.argument("urls", nargs=-1, required=True)
@click.option("--replacement-timeout", type=float, default=120.0, show_default=True,
              help="seconds I/O waits for a lost session (or every path) to come back")
@click.option("--policy", type=click.Choice(["round-robin", "least-queue"]), default="round-robin",
              show_default=True, help="path selection when several URLs (multipath) are given")
@click.pass_obj
@_guard
def attach_cmd(obj: _Ctx, urls: tuple[str, ...], replacement_timeout: float, policy: str) -> None:
    """Expose the LUN as /dev/loopN (FUSE file + loop device; needs root).

    Several URLs (portals of the same LU) attach it once through multipath."""
    parsed = [_with_name(_url(u), obj) for u in urls]
    for u in parsed:
        # A second loop device over the same LU would be a second writer with its own cache
        # (open-iscsi refuses a second login to a node the same way: "session exists").
        held = attach_mod.find_attachment(u.to_string())
        if held is not None:
            _fail(f"{u} is already attached as {held.get('loop')} (detach it first)")
    st = attach_mod.start_daemon([u.to_string(secrets=True) for u in parsed],
                                 replacement_timeout=replacement_timeout, policy=policy, keys=obj.keys)
    click.echo(st["loop"])


@main.command()
@click.argument("what", required=False)
@click.option("--all", "all_", is_flag=True, help="every attached LUN")
@_guard
def detach(what: str | None, all_: bool) -> None:
    """Detach /dev/loopN (or an attachment id or URL); --all detaches everything."""
    if all_:
        states = attach_mod.load_states()
    else:
        if not what:
            raise click.UsageError("give a loop device, id or URL, or --all")
        st = attach_mod.find_attachment(what)
        if st is None:
            _fail(f"nothing attached as {what}")
        states = [st]
    for st in states:
        attach_mod.stop_daemon(st)
        click.echo(f"detached {st.get('loop')}")


@main.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_cmd(as_json: bool) -> None:
    """Attached LUNs."""
    states = attach_mod.load_states()
    if as_json:
        click.echo(json.dumps(states, indent=2))
        return
    for st in states:
        click.echo(f"{st.get('loop')}  {st.get('url')}  {_human(st.get('size', 0))}  pid {st.get('pid')}")


# ---------------------------------------------------------------------------
# node records: node / login / logout / session
# ---------------------------------------------------------------------------

@main.group()
def node() -> None:
    """Saved node records (like iscsiadm -m node)."""


@node.command("list")
@click.option("--json", "as_json", is_flag=True)
@_guard
def node_list(as_json: bool) -> None:
    """Saved node records: PORTAL,TPGT TARGET."""
    nodes = NodeStore().load()
    if as_json:
        click.echo(json.dumps([n.public() for n in nodes], indent=2))
        return
    for n in nodes:
        click.echo(f"{n.portal},{n.tpgt} {n.target}{'  (chap)' if n.user else ''}")


@node.command("add")
@click.argument("url")
@click.option("--startup", type=click.Choice(["manual", "automatic"]), default="manual")
@_guard
def node_add(url: str, startup: str) -> None:
    """Save URL (iscsi://[user%pw@]host[:port]/iqn[/lun]) as a node record."""
    u = _url(url)
    try:
        # A record no login could use (the target would only answer "not found") is not saved.
        check_iscsi_name(u.target or "", "target name")
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None
    NodeStore().upsert(NodeRecord(target=u.target or "", host=u.host, port=u.port,
                                  luns=[u.lun] if url.split("?", 1)[0].rstrip("/").count("/") >= 4 else None,
                                  user=u.user, password=u.password, target_user=u.target_user,
                                  target_password=u.target_password, header_digest=u.header_digest,
                                  data_digest=u.data_digest, startup=startup))
    click.echo(f"saved {u.target} at {u.portal}")


@node.command("delete")
@click.argument("target")
@click.option("--portal", metavar="HOST:PORT", help="only the record for this portal (as `node list` shows it)")
@_guard
def node_delete(target: str, portal: str | None) -> None:
    """Delete the saved node record(s) of TARGET."""
    n = NodeStore().delete(target, portal)
    if not n:
        _fail(f"no node record for {target}" + (f" at {portal}" if portal else ""))
    click.echo(f"deleted {n} record(s)")


def _select_nodes(target: str | None, portal: str | None, all_: bool) -> list[NodeRecord]:
    store = NodeStore()
    if all_:
        return [n for n in store.load() if n.startup == "automatic" or target is None]
    if not target:
        raise click.UsageError("give a target name or --all")
    nodes = store.find(target, portal)
    if not nodes:
        _fail(f"no node record for {target}")
    return nodes


@main.command()
@click.argument("target", required=False)
@click.option("--portal", metavar="HOST:PORT", help="only the record for this portal (as `node list` shows it)")
@click.option("--all", "all_", is_flag=True, help="every record")
@click.pass_obj
@_guard
def login(obj: _Ctx, target: str | None, portal: str | None, all_: bool) -> None:
    """Log in to saved node(s): attach each of their disk LUNs as /dev/loopN.

    The records of one target at several portals are paths to the same LUs: each LU is
    attached once, as one multipath device over all of them (as `attach URL1 URL2`), never
    once per path -- two loop devices of one LU invite mounting its filesystem twice."""
    for paths in _by_target(_select_nodes(target, portal, all_)):
        for lun in _disk_luns(paths, obj):
            urls = [n.url(lun) for n in paths if n.luns is None or lun in n.luns]
            if any(attach_mod.find_attachment(u.to_string()) for u in urls):
                click.echo(f"{urls[0]} already logged in")
                continue
            named = [_with_name(u, obj).to_string(secrets=True) for u in urls]
            st = attach_mod.start_daemon(named if len(named) > 1 else named[0], keys=obj.keys)
            click.echo(f"{st['loop']} {urls[0]}" + (f" ({len(urls)} paths)" if len(urls) > 1 else ""))


def _by_target(nodes: list[NodeRecord]) -> list[list[NodeRecord]]:
    """Node records grouped by target name (iSCSI names compare without case, RFC 3722)."""
    groups: dict[str, list[NodeRecord]] = {}
    for n in nodes:
        groups.setdefault(n.target.lower(), []).append(n)
    return list(groups.values())


def _disk_luns(paths: list[NodeRecord], obj: _Ctx) -> list[int]:
    """The LUNs to attach through these records of one target: those they name, and for a
    record that names none, the disk LUNs the target reports (asked through the first
    portal that answers)."""
    luns = sorted({lun for n in paths for lun in n.luns or ()})
    if any(n.luns is None for n in paths):
        problem: Exception | None = None
        for n in (n for n in paths if n.luns is None):
            try:
                rows = _run(_lun_table(n.url(0), obj))
            except (IscsiError, OSError) as exc:
                problem = exc
                continue
            return sorted(set(luns) | {r["lun"] for r in rows if r["type"] == 0 and "size" in r})
        if problem is not None:
            raise problem
    return luns

@main.command()
@click.argument("target", required=False)
@click.option("--portal", metavar="HOST:PORT", help="only the record for this portal (as `node list` shows it)")
@click.option("--all", "all_", is_flag=True, help="every record")
@_guard
def logout(target: str | None, portal: str | None, all_: bool) -> None:
    """Log out of node(s): detach their LUNs."""
    if not all_ and not target:
        raise click.UsageError("give a target name or --all")
    found = 0
    for st in attach_mod.load_states():
        if all_ or (st.get("target") == target
                    and (portal is None or portal in (st.get("paths") or [st.get("portal")]))):
            attach_mod.stop_daemon(st)
            found += 1
            click.echo(f"logged out {st.get('url')} ({st.get('loop')})")
    if not found and not all_:
        _fail(f"not logged in to {target}" + (f" at {portal}" if portal else ""))


@main.command()
def session() -> None:
    """Active sessions (one per attached LUN)."""
    for st in attach_mod.load_states():
        click.echo(f"{st.get('portal')} {st.get('target')} lun {st.get('lun')} -> {st.get('loop')}")


if __name__ == "__main__":
    main()
