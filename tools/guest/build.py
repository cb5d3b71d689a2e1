"""Build (and cache) the interop guest: a Debian kernel plus an initramfs with open-iscsi.

Nothing is installed on the host. The kernel and busybox-static come from Debian's archive with
``apt-get download`` and are unpacked with ``dpkg -x`` into the cache; open-iscsi, e2fsprogs and
dmsetup are the host's own binaries (Debian packages ``open-iscsi``, ``e2fsprogs``, ``dmsetup``),
copied into the initramfs with the shared libraries ``ldd`` names.

The kernel modules are loaded by ``/init`` with busybox ``insmod`` in an order computed here from
each module's ``.modinfo`` ``depends=`` field (the .deb ships no modules.dep and the guest has no
kmod). ``crc32c_generic`` is loaded explicitly: iscsi_tcp allocates a crc32c transform for every
connection even with digests off, and nothing in the guest would load it on demand.

Cache layout (``$SANSTACK_GUEST_CACHE`` or ``~/.cache/sanstack-guest``)::

    debs/                 downloaded .deb files
    pkg/<deb stem>/       their unpacked trees
    images/<key>/         vmlinuz, initrd.img, manifest.json  (key = hash of every input)

    python -m tools.guest.build            # build if needed, print the image paths
    python -m tools.guest.build --force    # rebuild
"""
from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"

#: Bump when the layout of the initramfs changes in a way the inputs hash cannot see.
FORMAT_VERSION = 3

#: The kernel the guest boots: bookworm's 6.1 (the metapackage names the current ABI package).
KERNEL_META = "linux-image-amd64"
KERNEL_PKG_RE = re.compile(r"^linux-image-6\.1\.\d+-\d+-amd64$")
BUSYBOX_PKG = "busybox-static"

#: Modules the guest needs; their dependencies are added from .modinfo.
#: iSCSI over TCP + SCSI disk; virtio NIC (slirp) and virtio disk (boot from SAN); ext4 with the
#: crc32c it checksums metadata with; device-mapper multipath with the round-robin selector.
ROOT_MODULES = (
    "crc32c_generic",
    "scsi_transport_iscsi", "libiscsi", "libiscsi_tcp", "iscsi_tcp",
    "sd_mod",
    "virtio_pci", "virtio_net", "virtio_blk",
    "ext4",
    "dm_mod", "dm_multipath", "dm_round_robin",
)

#: Host programs copied into the guest (absolute paths; symlinks are followed).
HOST_PROGRAMS = (
    "/usr/sbin/iscsid", "/usr/sbin/iscsiadm", "/usr/sbin/iscsistart",
    "/usr/sbin/mke2fs", "/usr/sbin/e2fsck", "/usr/sbin/dmsetup",
)
#: Extra names for programs already copied: (link, target).
PROGRAM_LINKS = (("/usr/sbin/mkfs.ext4", "mke2fs"), ("/usr/sbin/fsck.ext4", "e2fsck"))
#: Host data files the programs read (copied when present).
HOST_FILES = ("/etc/mke2fs.conf",)
#: Debian package that provides each host program (for the error message and for CI).
HOST_PACKAGES = {"iscsid": "open-iscsi", "iscsiadm": "open-iscsi", "iscsistart": "open-iscsi",
                 "mke2fs": "e2fsprogs", "e2fsck": "e2fsprogs", "dmsetup": "dmsetup"}

#: apt-get download of a ~70 MB kernel takes seconds here; bound it generously.
DOWNLOAD_TIMEOUT = 600
#: One ldd / dpkg -x call.
TOOL_TIMEOUT = 120
#: Age after which an image built from other inputs is deleted.
STALE_IMAGE_AGE = 3600
#: Seconds to wait for another process building the same cache.
LOCK_TIMEOUT = 900


class BuildError(RuntimeError):
    """The guest cannot be built; the message says what is missing."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str
    key: str
    modules: tuple[str, ...]
    #: busybox-static, for the root filesystem of the boot-from-SAN guest
    busybox: Path

    def as_dict(self) -> dict:
        return {"kernel": str(self.kernel), "initrd": str(self.initrd), "busybox": str(self.busybox),
                "kernel_version": self.kernel_version, "key": self.key, "modules": list(self.modules)}


def cache_dir() -> Path:
    env = os.environ.get("SANSTACK_GUEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sanstack-guest"


def _run(cmd: list[str], *, cwd: Path | None = None, timeout: float = TOOL_TIMEOUT) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise BuildError(f"{cmd[0]} not found: {exc}") from None
    if res.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


# --------------------------------------------------------------------------- Debian packages


def kernel_package() -> str:
    """The bookworm 6.1 kernel package to boot (env ``SANSTACK_GUEST_KERNEL_PKG`` overrides)."""
    env = os.environ.get("SANSTACK_GUEST_KERNEL_PKG")
    if env:
        return env
    try:
        out = _run(["apt-cache", "depends", KERNEL_META])
    except BuildError:
        out = ""
    for line in out.splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and KERNEL_PKG_RE.match(name):
            return name
    # No package lists (apt-get update not run): fall back to a kernel already in the cache.
    cached = sorted((cache_dir() / "debs").glob("linux-image-6.1.*-amd64_*.deb"))
    if cached:
        return cached[-1].name.split("_", 1)[0]
    raise BuildError(f"cannot find the kernel package: `apt-cache depends {KERNEL_META}` names no "
                     "linux-image-6.1.*-amd64 (run apt-get update) and none is cached")


def fetch_deb(package: str) -> Path:
    """``apt-get download`` once into the cache; returns the .deb."""
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    _run(["apt-get", "download", package], cwd=debs, timeout=DOWNLOAD_TIMEOUT)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise BuildError(f"apt-get download {package} left no .deb in {debs}")
    return found[-1]


def unpack_deb(deb: Path) -> Path:
    """``dpkg -x`` once into ``pkg/<stem>``."""
    dest = cache_dir() / "pkg" / deb.stem
    if (dest / ".done").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    _run(["dpkg", "-x", str(deb), str(dest)])
    (dest / ".done").touch()
    return dest


# --------------------------------------------------------------------------- kernel modules


_ELF_HDR = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF_SHDR = struct.Struct("<IIQQQQIIQQ")


def modinfo(path: Path) -> dict[str, list[str]]:
    """The ``.modinfo`` section of an ELF64 little-endian .ko as ``{key: [values]}``."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path}: not an ELF64 little-endian module")
    (_, _, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx) = _ELF_HDR.unpack_from(data)
    sections = [_ELF_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx]
    names = data[strtab[4]:strtab[4] + strtab[5]]
    info: dict[str, list[str]] = {}
    for sh in sections:
        name = names[sh[0]:names.index(b"\0", sh[0])]
        if name == b".modinfo":
            for entry in data[sh[4]:sh[4] + sh[5]].split(b"\0"):
                if b"=" in entry:
                    k, v = entry.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


def module_index(moddir: Path) -> dict[str, Path]:
    """Module name (``-`` folded to ``_``) -> .ko path."""
    index = {}
    for ko in moddir.rglob("*.ko"):
        index[ko.name[:-3].replace("-", "_")] = ko
    return index


def builtin_modules(moddir: Path) -> set[str]:
    path = moddir / "modules.builtin"
    if not path.exists():
        return set()
    return {Path(line.strip()).name.removesuffix(".ko").replace("-", "_")
            for line in path.read_text().splitlines() if line.strip()}


def load_order(roots: Iterable[str], index: dict[str, Path], builtin: set[str]) -> list[str]:
    """Modules to insmod, each after everything it depends on (depth-first post-order)."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in builtin or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise BuildError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in index:
            raise BuildError(f"module {name} not in the kernel package (needed by {' -> '.join(chain) or 'root'})")
        state[name] = "visiting"
        for dep in modinfo(index[name]).get("depends", [""])[0].split(","):
            if dep:
                visit(dep.replace("-", "_"), chain + (name,))
        state[name] = "done"
        order.append(name)

    for root in roots:
        visit(root, ())
    return order


# --------------------------------------------------------------------------- host programs


def _usr_path(path: str) -> str:
    """Debian is merged-/usr: store /lib/x, /bin/x under /usr (the initramfs links them back)."""
    for top in ("/lib64/", "/lib/", "/bin/", "/sbin/"):
        if path.startswith(top):
            return "/usr" + path
    return path


def shared_libraries(program: str) -> list[str]:
    """The libraries (and the dynamic loader) ``ldd`` lists for ``program``."""
    out = _run(["ldd", program])
    libs = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def host_files() -> dict[str, Path]:
    """Guest path -> host file for the programs, their libraries and data files."""
    files: dict[str, Path] = {}
    missing = []
    for prog in HOST_PROGRAMS:
        if not os.path.exists(prog):
            missing.append(f"{prog} (Debian package {HOST_PACKAGES.get(Path(prog).name, '?')})")
            continue
        files[_usr_path(prog)] = Path(prog).resolve()
        for lib in shared_libraries(prog):
            files[_usr_path(lib)] = Path(lib).resolve()
    if missing:
        raise BuildError("host programs missing: " + ", ".join(missing))
    for extra in HOST_FILES:
        if os.path.exists(extra):
            files[extra] = Path(extra)
    return files


# --------------------------------------------------------------------------- cpio (newc)


class Cpio:
    """A minimal writer of the ``newc`` cpio format the kernel unpacks as initramfs.

    Reference: the kernel's Documentation/driver-api/early-userspace/buffer-format.rst.
    Written here so the build needs neither the cpio tool nor root (device nodes included).
    """

    _HDR = "070701" + "%08X" * 13

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1000
        self.names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        self.ino += 1
        raw = name.encode() + b"\0"
        hdr = self._HDR % (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.buf.write(hdr.encode() + raw)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def mkdir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | 0o755)

    def _parent(self, name: str) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.mkdir(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


# --------------------------------------------------------------------------- the build


def _digest_files(h: "hashlib._Hash", items: Iterable[tuple[str, Path]]) -> None:
    for name, path in sorted(items):
        h.update(name.encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())


def _inputs() -> tuple[str, Path, Path, dict[str, Path]]:
    kpkg = kernel_package()
    kdeb = fetch_deb(kpkg)
    bdeb = fetch_deb(BUSYBOX_PKG)
    return kpkg, kdeb, bdeb, host_files()


def cache_key(kdeb: Path, bdeb: Path, files: dict[str, Path]) -> str:
    h = hashlib.sha256()
    h.update(f"format={FORMAT_VERSION}\0kernel={kdeb.name}\0busybox={bdeb.name}\0".encode())
    h.update(("modules=" + ",".join(ROOT_MODULES) + "\0").encode())
    h.update(Path(__file__).read_bytes())
    _digest_files(h, [("/init", INIT_SCRIPT), *files.items()])
    return h.hexdigest()[:16]


def build_initrd(kroot: Path, bbroot: Path, files: dict[str, Path]) -> tuple[bytes, str, list[str]]:
    """The gzip'ed initramfs, the kernel version and the module load order."""
    versions = sorted(p.name for p in (kroot / "lib" / "modules").iterdir())
    if len(versions) != 1:
        raise BuildError(f"expected one kernel version in {kroot}, found {versions}")
    kver = versions[0]
    moddir = kroot / "lib" / "modules" / kver
    order = load_order(ROOT_MODULES, module_index(moddir), builtin_modules(moddir))
    index = module_index(moddir)

    c = Cpio()
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "run", "tmp",
              "etc/iscsi", "mnt", "newroot", "var/lock", "bb"):
        c.mkdir(d)
    for top in ("bin", "sbin", "lib", "lib64"):
        c.symlink(top, f"usr/{top}")
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.chardev("dev/ttyS0", 4, 64)
    c.file("usr/bin/busybox", (bbroot / "bin" / "busybox").read_bytes(), 0o755)
    for guest_path, host_path in sorted(files.items()):
        mode = 0o755 if os.access(host_path, os.X_OK) and not guest_path.startswith("/etc") else 0o644
        c.file(guest_path, host_path.read_bytes(), mode)
    for link, target in PROGRAM_LINKS:
        c.symlink(link, target)
    for name in order:
        c.file(f"lib/modules/{name}.ko", index[name].read_bytes())
    c.file("lib/modules/load.order", ("\n".join(order) + "\n").encode())
    c.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    # iscsid resolves the uid of every iscsiadm peer (peeruser_unix) and refuses unknown ones.
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    c.file("etc/group", b"root:x:0:\n")
    c.file("etc/sanstack-kernel", (kver + "\n").encode())
    raw = c.finish()
    return gzip.compress(raw, compresslevel=6, mtime=0), kver, order


class _Lock:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)

    def __enter__(self) -> "_Lock":
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildError("another build holds the guest cache lock for too long")
                time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def ensure(force: bool = False, log=None) -> GuestImage:
    """The cached guest image for the current inputs, built if missing."""
    say = log or (lambda msg: None)
    with _Lock(cache_dir() / "lock"):
        kpkg, kdeb, bdeb, files = _inputs()
        key = cache_key(kdeb, bdeb, files)
        out = cache_dir() / "images" / key
        manifest = out / "manifest.json"
        bbroot = unpack_deb(bdeb)
        busybox = bbroot / "bin" / "busybox"
        if manifest.exists() and not force:
            m = json.loads(manifest.read_text())
            return GuestImage(out / "vmlinuz", out / "initrd.img", m["kernel_version"], key, tuple(m["modules"]), busybox)
        t0 = time.monotonic()
        say(f"building guest image {key} from {kdeb.name}, {bdeb.name}")
        kroot = unpack_deb(kdeb)
        initrd, kver, order = build_initrd(kroot, bbroot, files)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=out.parent))
        shutil.copyfile(kroot / "boot" / f"vmlinuz-{kver}", tmp / "vmlinuz")
        (tmp / "initrd.img").write_bytes(initrd)
        (tmp / "manifest.json").write_text(json.dumps({
            "key": key, "kernel_package": kpkg, "kernel_deb": kdeb.name, "busybox_deb": bdeb.name,
            "kernel_version": kver, "modules": order, "host_files": sorted(files),
            "initrd_bytes": len(initrd), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        for old in out.parent.iterdir():  # images of earlier inputs are not used again...
            # ...except by a run that started just before the inputs changed: leave it a while.
            if old != out and time.time() - old.stat().st_mtime > STALE_IMAGE_AGE:
                shutil.rmtree(old, ignore_errors=True)
        say(f"built in {time.monotonic() - t0:.1f}s: initrd {len(initrd) / 1e6:.1f} MB, {len(order)} modules")
        return GuestImage(out / "vmlinuz", out / "initrd.img", kver, key, tuple(order), busybox)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    try:
        img = ensure(force=args.force, log=lambda m: print(m, file=sys.stderr))
    except BuildError as exc:
        print(f"build: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(img.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
