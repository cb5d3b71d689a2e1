"""What every managed iSCSI target process has in common: portals, LUNs, URLs, bounded waits.

A *peer* is a target daemon started for one test or benchmark on free loopback ports, with its
own scratch image files, and stopped afterwards. ``tgt.py`` drives tgtd (the yardstick nobody
here wrote); ``sanstack.py`` drives our own daemon. Both expose the same small surface so a test
can be parametrized over them.
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

#: How long a daemon may take to start listening. tgtd takes ~0.1 s, a Python daemon ~1 s on a
#: loaded 2-core CI machine; 20 s leaves room without hiding a hang.
START_TIMEOUT = 20.0
#: How long a clean stop (SIGTERM: finish in-flight commands, flush) may take before SIGKILL.
STOP_TIMEOUT = 10.0
#: Poll interval while waiting for a port or a process.
POLL_INTERVAL = 0.05

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``'1G'`` -> 1073741824; accepts K/M/G/T with optional ``iB``/``B`` (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def format_size(size: int) -> str:
    """Inverse of :func:`parse_size` for exact multiples (used to build ``--lun PATH:SIZE``)."""
    for unit in ("T", "G", "M", "K"):
        if size % _SIZE_UNITS[unit] == 0 and size >= _SIZE_UNITS[unit]:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


@dataclass(frozen=True)
class Portal:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Chap:
    """CHAP credentials. ``target_user``/``target_secret`` make it mutual (RFC 7143 §12.1.3)."""

    user: str
    secret: str
    target_user: str | None = None
    target_secret: str | None = None

    @property
    def mutual(self) -> bool:
        return bool(self.target_user and self.target_secret)


@dataclass
class LunSpec:
    """A disk LUN backed by a sparse image file (created if missing)."""

    path: Path
    size: int
    block_size: int = 512
    read_only: bool = False  # write-protected LU (SBC-4 §4.11): writes fail DATA PROTECT
    removable: bool = False  # RMB=1 medium: START STOP UNIT LOEJ ejects/loads (SBC-4 §5.25)
    physical_block_size: int | None = None  # e.g. 4096 on a 512-byte LUN (512e): LBPPBE=3


def lun_specs(workdir: Path, prefix: str, size: int | str, luns: int,
              sizes: list[int | str] | None = None, block_size: int = 512,
              read_only: bool = False, removable: bool = False,
              physical_block_size: int | None = None) -> list[LunSpec]:
    """Image files ``<workdir>/<prefix>-lun<N>.img``: ``luns`` of ``size``, or one per ``sizes``."""
    all_sizes = sizes if sizes is not None else [size] * luns
    return [
        LunSpec(Path(workdir) / f"{prefix}-lun{i}.img", parse_size(s) if isinstance(s, str) else s, block_size,
                read_only, removable, physical_block_size)
        for i, s in enumerate(all_sizes)
    ]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick; tiny race accepted)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_portals(count: int, host: str = "127.0.0.1") -> list[Portal]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port(host))
    return [Portal(host, p) for p in sorted(ports)]


def port_open(portal: Portal, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((portal.host, portal.port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_listening(
    portals: Iterable[Portal], proc: subprocess.Popen | None, timeout: float, log: Path | None = None
) -> None:
    """Wait until every portal accepts TCP; fail early (with the log tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    pending = list(portals)
    while pending:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"target exited with status {proc.returncode} before listening on "
                f"{', '.join(map(str, pending))}{log_tail(log)}"
            )
        if port_open(pending[0]):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {pending[0]} after {timeout:.0f}s{log_tail(log)}")
        time.sleep(POLL_INTERVAL)


def log_tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- log tail ---\n" + "\n".join(text)


def process_cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process, all threads (proc(5) stat fields 14 and 15).

    Raises OSError when the process is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User+system CPU time of this process's finished children (the client runs)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@contextlib.contextmanager
def work_dir(given: Path | None, prefix: str) -> Iterator[Path]:
    """The directory a tool keeps images and logs in: ``given`` (created if needed, kept), or
    a new temporary one that is removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def create_sparse(path: Path, size: int) -> None:
    """Create (or extend) an image file without allocating blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        if os.fstat(f.fileno()).st_size < size:
            f.truncate(size)


def iscsi_url(
    portal: Portal,
    iqn: str | None = None,
    lun: int | None = None,
    *,
    chap: Chap | None = None,
    **params: str,
) -> str:
    """A libiscsi URL: ``iscsi://[user%secret@]host:port[/iqn/lun][?k=v&...]``.

    Mutual CHAP goes in the ``target_user``/``target_password`` URL arguments (libiscsi
    lib/init.c parses those, and the environment variables LIBISCSI_CHAP_TARGET_*).
    """
    quote = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
    auth = f"{quote(chap.user)}%{quote(chap.secret)}@" if chap else ""
    url = f"iscsi://{auth}{portal}"
    if iqn is not None:
        url += f"/{iqn}/{0 if lun is None else lun}"
    args = dict(params)
    if chap and chap.mutual:
        args.setdefault("target_user", chap.target_user)
        args.setdefault("target_password", chap.target_secret)
    if args:
        url += "?" + "&".join(f"{k}={v}" for k, v in args.items())
    return url


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
    """Send ``sig`` to the process group, wait up to ``timeout``, then SIGKILL. Returns exit status."""
    if proc.poll() is None:
        _signal_group(proc, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # not our group (should not happen with start_new_session)
        proc.send_signal(sig)


@dataclass
class TargetPeer:
    """A running target daemon as a test sees it. Subclasses start and stop the process."""

    kind = "abstract"

    iqn: str
    portals: list[Portal]
    luns: list[LunSpec]
    workdir: Path
    #: SCSI LUN numbers as initiators see them, parallel to ``luns`` (tgt reserves LUN 0).
    lun_ids: list[int] = field(default_factory=list)
    chap: Chap | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    # -- URLs -------------------------------------------------------------------------------
    def url(self, index: int = 0, *, portal: int = 0, chap: Chap | None = None, **params: str) -> str:
        """URL of the ``index``-th disk LUN through portal ``portal`` (CHAP from the peer unless given)."""
        return iscsi_url(self.portals[portal], self.iqn, self.lun_ids[index], chap=chap or self.chap, **params)

    def portal_url(self, portal: int = 0, *, chap: Chap | None = None) -> str:
        return iscsi_url(self.portals[portal], chap=chap or self.chap)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "TargetPeer":
        raise NotImplementedError

    def stop(self) -> int | None:
        """Clean stop; returns the daemon's exit status (None if never started)."""
        raise NotImplementedError

    def kill(self) -> int | None:
        """SIGKILL: no chance to flush (crash tests)."""
        if self.proc is None:
            return None
        return stop_process(self.proc, signal.SIGKILL)

    def restart(self) -> "TargetPeer":
        """Start again with the same images, portals and configuration (after stop/kill)."""
        if self.alive():
            raise RuntimeError("restart() while the daemon still runs; stop() or kill() it first")
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def __enter__(self) -> "TargetPeer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_until_signal(peer: "TargetPeer") -> None:
    """CLI helper: start ``peer``, print its URLs, run until Ctrl-C/SIGTERM/SIGHUP, then stop it.

    SIGTERM must unwind through the ``with`` block, or the daemon (in its own session) would
    outlive its wrapper.
    """

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    try:
        with peer:
            for i in range(len(peer.luns)):
                for p in range(len(peer.portals)):
                    print(peer.url(i, portal=p), flush=True)
            while peer.alive():
                time.sleep(0.5)
            print(f"{peer.kind} exited with status {peer.proc.returncode}{log_tail(peer.log_path)}", flush=True)
    except KeyboardInterrupt:
        pass
