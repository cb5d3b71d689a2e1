"""Run the Linux kernel initiator (open-iscsi in a qemu guest) against a target, in a private netns.

    python -m tools.guest.run                      # our target, every step
    python -m tools.guest.run --target tgt         # the same steps against tgtd (the yardstick)
    python -m tools.guest.run --steps discovery,io,ext4,logout --quick   # quick-start daemon form
    python -m tools.guest.run --sanboot            # qemu itself as the client: boot from SAN
    python -m tools.guest.run -v ...               # also stream the guest console

What happens (root is needed for the namespace):

1. ``tools.guest.build`` makes or reuses the guest kernel + initramfs (needs Debian's archive the
   first time only);
2. a fresh network namespace ``sanstack-<pid>-<hex>`` with only ``lo`` up; this program re-runs
   itself inside it (``ip netns exec``), so the target, qemu and every packet stay there;
3. the target (ours: ``python -m iscsi.target serve``; or tgtd) listens on 127.0.0.1:3260 and
   :3261 (tools/guest/targets.py);
4. qemu-system-x86_64 boots the guest under TCG with user-mode networking: slirp's 10.0.2.2 is
   the namespace's own loopback, so the guest reaches the target there and nowhere else;
5. the guest's /init (tools/guest/init.sh) runs the steps and prints one marker per step on the
   serial console, which is captured to ``console.log``; when a step needs the host (stop or
   start the target) it prints ``@@SANSTACK REQ <n> <action>`` and waits for ``ACK <n> ok`` on
   the console's input;
6. a hard timeout kills qemu; the namespace and everything still running in it are removed
   whatever happened.

Exit status 0 only when every requested step printed PASS and the guest printed RESULT PASS.
The login keys each side sent (read off the namespace's loopback, tools/guest/logincap.py) and
the negotiated parameters (``iscsiadm -m session -P 3`` in the guest) go to the output and to
``login-keys.txt`` / ``report.txt`` in the work directory.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import build
from tools.peers.base import create_sparse

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

#: Steps in the order the guest runs them: (keyword, marker id).
STEPS = (
    ("discovery", "1"), ("io", "2"), ("ext4", "3"), ("logout", "4"),
    ("chap", "5a"), ("mutual", "5b"), ("digest", "5c"),
    ("iscsistart", "6"), ("restart", "7"), ("multipath", "8"),
)
STEP_IDS = dict(STEPS)
CHAP_STEPS = {"chap", "mutual"}
SANBOOT_STEP = "9"

#: Whole guest run, boot to power-off. Every step here took 30-90 s under TCG on a 2-core
#: machine; the restart step alone may wait DefaultTime2Wait + a few login retries. A hang
#: must not cost more than a few minutes.
GUEST_TIMEOUT = 420.0
SANBOOT_TIMEOUT = 240.0
#: Extra time the outer process allows the inner one (target start/stop, checks) before killing.
OUTER_SLACK = 120.0
#: How long the target stays down in the restart step before it is started again. Longer than
#: open-iscsi's NOP-Out interval + timeout (5 + 5 s) would also exercise the ping path; a few
#: seconds is enough for the kernel to see the connection close and retry.
RESTART_DOWNTIME = 4.0
QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
#: /dev/kvm here is a software KVM without vmx/svm (``-cpu host`` aborts): TCG with ``-cpu max``.
QEMU_BASE = ("-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "1", "-nographic", "-no-reboot")
GUEST_INITIATOR = "iqn.2026-11.org.sanstack:guest"
QEMU_INITIATOR = "iqn.2026-11.org.sanstack:qemu"
MARKER = re.compile(r"@@SANSTACK (\S+)(?: (.*))?$")
SANBOOT_SIZE = 64 << 20


def _now() -> str:
    return time.strftime("%H:%M:%S")


def say(msg: str) -> None:
    print(f"[{_now()}] {msg}", flush=True)


# --------------------------------------------------------------------------- the guest


@dataclass
class GuestResult:
    steps: dict[str, list[str]] = field(default_factory=dict)  # id -> [name, status, detail]
    order: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    blocks: dict[str, list[str]] = field(default_factory=dict)
    result: str | None = None
    timed_out: bool = False
    qemu_status: int | None = None
    seconds: float = 0.0


class Guest:
    """qemu with the console on stdin/stdout: log it, parse markers, answer REQ lines."""

    def __init__(self, image: build.GuestImage, append: str, console: Path, extra: list[str],
                 on_request: Callable[[str], str] | None = None, echo: bool = False) -> None:
        self.cmd = [QEMU, *QEMU_BASE, "-kernel", str(image.kernel), "-initrd", str(image.initrd),
                    "-append", append, *extra]
        self.console = console
        self.on_request = on_request
        self.echo = echo
        self.res = GuestResult()
        self._block: str | None = None

    def run(self, timeout: float) -> GuestResult:
        t0 = time.monotonic()
        with open(self.console, "w") as log:
            log.write("### " + " ".join(self.cmd) + "\n")
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT)
            reader = threading.Thread(target=self._read, args=(log,), name="console", daemon=True)
            reader.start()
            try:
                self.res.qemu_status = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.res.timed_out = True
                self.proc.kill()
                self.res.qemu_status = self.proc.wait()
            reader.join(timeout=10)
        self.res.seconds = time.monotonic() - t0
        return self.res

    def _read(self, log) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\r\n")
            log.write(line + "\n")
            log.flush()
            if self.echo:
                print("  guest| " + line, flush=True)
            self._line(line)

    def _line(self, line: str) -> None:
        m = MARKER.search(line)
        if self._block is not None:
            if m and m.group(1).startswith("END-"):
                self._block = None
            else:
                self.res.blocks[self._block].append(line)
            return
        if not m:
            return
        kind, rest = m.group(1), (m.group(2) or "")
        if kind == "STEP":
            parts = rest.split(" ", 3)
            if len(parts) >= 3:
                sid, name, status = parts[:3]
                detail = parts[3] if len(parts) > 3 else ""
                if sid not in self.res.steps:
                    self.res.order.append(sid)
                self.res.steps[sid] = [name, status, detail]
                if not self.echo and status != "BEGIN":
                    say(f"guest step {sid} {name}: {status} {detail}".rstrip())
        elif kind == "INFO":
            self.res.infos.append(rest)
        elif kind == "RESULT":
            self.res.result = rest.strip()
        elif kind.startswith("BEGIN-"):
            self._block = f"{kind[6:].lower()} {rest}".strip()
            self.res.blocks[self._block] = []
        elif kind == "REQ":
            num, _, action = rest.partition(" ")
            status = "ok"
            if self.on_request is None:
                status = "no-handler"
            else:
                try:
                    status = self.on_request(action.strip())
                except Exception as exc:  # report to the guest, which fails its step
                    status = f"error:{type(exc).__name__}:{exc}".replace(" ", "_")[:200]
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write(f"ACK {num} {status}\n".encode())
                self.proc.stdin.flush()
            except OSError:
                pass


# --------------------------------------------------------------------------- namespace (outer)


def _netns_pids(ns: str) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def remove_netns(ns: str) -> None:
    """Kill what still runs in ``ns`` (only processes this run started live there), delete it."""
    for _ in range(50):
        pids = _netns_pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


NETNS_RE = re.compile(r"sanstack-(\d+)-[0-9a-f]{4}")


def remove_stale_netns() -> None:
    """Namespaces of earlier runs whose process died without cleaning up (e.g. SIGKILL)."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    for line in res.stdout.splitlines():
        name = line.split(" ", 1)[0]
        m = NETNS_RE.fullmatch(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            say(f"removing stale namespace {name}")
            remove_netns(name)


def outer(args: argparse.Namespace, argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("run: needs root (network namespace)", file=sys.stderr)
        return 2
    for prog in (QEMU, "ip") + ((QEMU_IMG,) if args.sanboot else ()):
        if shutil.which(prog) is None:
            print(f"run: {prog} not found (Debian: qemu-system-x86 / qemu-utils / iproute2)", file=sys.stderr)
            return 2
    t0 = time.monotonic()
    try:
        img = build.ensure(log=say)
    except build.BuildError as exc:
        print(f"run: cannot build the guest: {exc}", file=sys.stderr)
        return 2
    say(f"guest image {img.key}: kernel {img.kernel_version} ({time.monotonic() - t0:.1f}s)")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sanstack-guest-"))
    workdir.mkdir(parents=True, exist_ok=True)
    remove_stale_netns()
    ns = f"sanstack-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    rc = 1
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=10)
        say(f"network namespace {ns}; work directory {workdir}")
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "tools.guest.run", *argv,
               "--inner", "--workdir", str(workdir), "--kernel", str(img.kernel), "--initrd", str(img.initrd),
               "--busybox", str(img.busybox), "--kernel-version", img.kernel_version, "--image-key", img.key]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, start_new_session=True)
        limit = (SANBOOT_TIMEOUT if args.sanboot else args.timeout) + OUTER_SLACK
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            say(f"inner run exceeded {limit:.0f}s: killed")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    finally:
        remove_netns(ns)
    if not args.keep and rc == 0 and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"done in {time.monotonic() - t0:.1f}s, exit {rc}")
    return rc


# --------------------------------------------------------------------------- inside the namespace


def _image_from_args(args: argparse.Namespace) -> build.GuestImage:
    return build.GuestImage(Path(args.kernel), Path(args.initrd), args.kernel_version, args.image_key, (),
                            Path(args.busybox))


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(none)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _login_lines(target) -> list[str]:
    """Our daemon's structured login log lines (``login.ok ... params=...``)."""
    return [l for l in target.log_text().splitlines() if "login." in l]


def _mask_volatile(text: str) -> str:
    return re.sub(r"(CHAP_[ICR]|TargetSessionIdentifyingHandle)=\S+", r"\1=...", text)


def login_report(cap) -> str:
    """All logins, an exchange identical to an earlier one (challenges aside) only referenced."""
    out, seen = [], {}
    if cap.error:
        return f"(login capture unavailable: {cap.error})\n"
    for n, flow in enumerate(cap.flows, 1):
        if not flow.pdus:
            continue
        body = "".join("    " + p.describe() for p in flow.pdus)
        head = f"connection {n}: {flow.client[0]}:{flow.client[1]} -> port {flow.port}"
        key = _mask_volatile(body)
        if key in seen:
            out.append(f"{head}: same keys as connection {seen[key]}\n")
        else:
            seen[key] = n
            out.append(head + "\n" + body)
    return "".join(out) or "(no login seen)\n"


def negotiated(res: GuestResult) -> str:
    out = []
    for name, lines in res.blocks.items():
        if not name.startswith("session-info"):
            continue
        keep, grab = [], False
        for line in lines:
            s = line.strip()
            if s.startswith("Negotiated iSCSI params") or s.startswith("CHAP:"):
                grab = True
            elif s.startswith("Attached SCSI devices") or s.startswith("Attached scsi disk"):
                grab = False
            if grab or s.startswith(("Iface Initiatorname", "Current Portal", "Persistent Portal", "Target:")):
                keep.append("    " + s)
        out.append(f"  {name.split(' ', 1)[-1]}:\n" + "\n".join(keep))
    return "\n".join(out)


def summarize(res: GuestResult, wanted: list[str]) -> tuple[bool, list[str]]:
    ok, lines = True, []
    for sid in wanted:
        got = res.steps.get(sid)
        if got is None:
            ok = False
            lines.append(f"  step {sid:3} -        NOT RUN")
            continue
        name, status, detail = got
        if status == "BEGIN":
            status, detail = "HUNG", "started but never finished" + (" (guest timed out)" if res.timed_out else "")
        if status != "PASS":
            ok = False
        lines.append(f"  step {sid:3} {name:20} {status} {detail}".rstrip())
    if res.result != "PASS":
        ok = False
    if res.timed_out:
        ok = False
    return ok, lines


def inner_initiator(args: argparse.Namespace) -> int:
    from . import targets as T
    from .logincap import LoginCapture

    workdir = Path(args.workdir)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEP_IDS]
    if unknown:
        print(f"run: unknown steps {unknown}; choose from {', '.join(STEP_IDS)}", file=sys.stderr)
        return 2
    with_chap = bool(CHAP_STEPS & set(steps))
    if args.quick and with_chap:
        print("run: --quick (one target, no config file) cannot serve the CHAP steps", file=sys.stderr)
        return 2
    defs = T.layout(with_chap=with_chap)
    target = T.make_target(args.target, workdir / "target", defs, quick=args.quick)
    for d in defs:
        create_sparse(target.image(d.name), d.size)
    say(f"starting {args.target} target: " + ", ".join(d.iqn for d in defs) + f" on ports {T.PORTS}")
    try:
        target.start()
    except Exception as exc:
        print(f"run: the target did not start: {exc}", file=sys.stderr)
        return 1
    params = {
        "steps": ",".join(steps), "host": "10.0.2.2", "port": T.PORTS[0], "port2": T.PORTS[1],
        "tpgt": target.tpgt(0), "tpgt2": target.tpgt(1), "iqn": defs[0].iqn, "lun": T.disk_lun(args.target),
        "initiator": GUEST_INITIATOR,
    }
    if with_chap:
        chap, mutual = defs[1], defs[2]
        params.update(chap_iqn=chap.iqn, chap_user=chap.chap.user, chap_secret=chap.chap.secret,
                      mutual_iqn=mutual.iqn, mutual_user=mutual.chap.user, mutual_secret=mutual.chap.secret,
                      mutual_tuser=mutual.chap.target_user, mutual_tsecret=mutual.chap.target_secret)
    append = "console=ttyS0 panic=-1 " + " ".join(f"sanstack.{k}={v}" for k, v in params.items())

    def on_request(action: str) -> str:
        if action == "stop-target":
            say(f"guest asks: stop the target ({args.target})")
            target.stop()
            time.sleep(RESTART_DOWNTIME)
            return "ok"
        if action == "start-target":
            say("guest asks: start the target again")
            target.start()
            return "ok"
        return f"unknown-action:{action}"

    cap = LoginCapture(T.PORTS).start()
    console = workdir / "console.log"
    guest = Guest(_image_from_args(args), append, console,
                  ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"], on_request, args.verbose)
    say(f"booting the guest (TCG), steps {','.join(steps)}; console -> {console}")
    try:
        res = guest.run(args.timeout)
    finally:
        cap.stop()
        target.stop()
        if hasattr(target, "cleanup"):
            target.cleanup()
    wanted = [STEP_IDS[s] for s in steps]
    ok, lines = summarize(res, wanted)
    keys = login_report(cap)
    (workdir / "login-keys.txt").write_text(keys)
    report = [
        f"target: {args.target}{' (quick start)' if args.quick else ''}; guest kernel {args.kernel_version}; "
        f"{res.seconds:.0f}s in the guest" + ("; TIMED OUT" if res.timed_out else ""),
        "steps:", *lines, f"guest result: {res.result or 'none'}",
        "", "negotiated (iscsiadm -m session -P 3 in the guest):", negotiated(res),
        "", "login keys on the wire:", keys,
    ]
    if args.target == "sanstack":
        report += ["target log, login events:", *("  " + l for l in _login_lines(target)[:40]), ""]
    if not ok:
        report += ["", "--- console tail ---", _tail(console, 60),
                   "", f"--- {args.target} log tail ---", _tail(target.log_path, 40)]
    text = "\n".join(report) + "\n"
    (workdir / "report.txt").write_text(text)
    print(text, flush=True)
    say(("PASS" if ok else "FAIL") + f": interop with the kernel initiator against {args.target}")
    return 0 if ok else 1


# --------------------------------------------------------------------------- boot from SAN


def make_root_image(workdir: Path, busybox: Path, size: int) -> Path:
    """An ext4 image holding a busybox root whose /sbin/init is sanroot-init.sh."""
    root = workdir / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "var/lib", "etc", "mnt", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(busybox, root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True, timeout=30)
    for applet in listing.stdout.split():
        link = root / applet
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    init = root / "sbin" / "init"
    if init.exists() or init.is_symlink():
        init.unlink()
    shutil.copyfile(HERE / "sanroot-init.sh", init)
    os.chmod(init, 0o755)
    payload = os.urandom(1 << 20)
    (root / "etc" / "payload").write_bytes(payload)
    (root / "etc" / "payload.md5").write_text(hashlib.md5(payload).hexdigest() + "\n")
    image = workdir / "root.img"
    image.unlink(missing_ok=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "sanroot", "-d", str(root), str(image),
                    str(size // 1024)], check=True, capture_output=True, timeout=120)
    return image


def _check_root_image(image: Path, token: str) -> list[str]:
    """What is wrong with the LUN's filesystem after the guest shut down (empty = fine)."""
    problems = []
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, timeout=120)
    if fsck.returncode != 0:
        problems.append(f"e2fsck -fn exited {fsck.returncode}: {fsck.stdout[-500:]}")
    head = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, timeout=60).stdout
    state = re.search(r"Filesystem state:\s*(.*)", head)
    if not state or state.group(1).strip() != "clean":
        problems.append(f"filesystem state {state.group(1).strip() if state else '?'} (expected clean)")

    def cat(path: str) -> bytes:
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True,
                              timeout=60).stdout

    if cat("/var/lib/booted").decode(errors="replace").strip() != token:
        problems.append("/var/lib/booted does not hold this boot's token: the guest's write did not reach the LUN")
    written = cat("/var/lib/written")
    if not written or hashlib.md5(written).hexdigest() != cat("/var/lib/written.md5").decode().strip():
        problems.append("/var/lib/written differs from its checksum")
    return problems


def inner_sanboot(args: argparse.Namespace) -> int:
    from . import targets as T

    workdir = Path(args.workdir)
    d = T.TargetDef("boot", f"{T.IQN_PREFIX}:boot", SANBOOT_SIZE, None, (0,))
    target = T.make_target(args.target, workdir / "target", [d], quick=(args.target == "sanstack"))
    create_sparse(target.image(d.name), d.size)
    image = make_root_image(workdir, Path(args.busybox), SANBOOT_SIZE)
    say(f"root filesystem image {image} ({SANBOOT_SIZE >> 20} MiB, busybox root)")
    try:
        target.start()
    except Exception as exc:
        print(f"run: the target did not start: {exc}", file=sys.stderr)
        return 1
    url = f"iscsi://{T.HOST}:{T.PORTS[0]}/{d.iqn}/{T.disk_lun(args.target)}"
    token = secrets.token_hex(8)
    ok, problems = False, []
    from .logincap import LoginCapture

    cap = LoginCapture(T.PORTS).start()
    try:
        t0 = time.monotonic()
        cp = subprocess.run([QEMU_IMG, "convert", "-n", "-f", "raw", "-O", "raw", str(image), url],
                            capture_output=True, text=True, timeout=180)
        if cp.returncode != 0:
            problems.append(f"qemu-img convert to {url} failed: {cp.stderr.strip()}")
        else:
            say(f"root image written to {url} with qemu-img ({time.monotonic() - t0:.1f}s)")
            append = f"console=ttyS0 panic=-1 sanstack.mode=sanboot sanstack.token={token}"
            extra = ["-drive", f"file={url},format=raw,if=none,id=san", "-device", "virtio-blk-pci,drive=san",
                     "-iscsi", f"initiator-name={QEMU_INITIATOR}", "-nic", "none"]
            console = workdir / "console.log"
            say(f"booting from {url} (TCG); console -> {console}")
            res = Guest(_image_from_args(args), append, console, extra, None, args.verbose).run(SANBOOT_TIMEOUT)
            ok, lines = summarize(res, [SANBOOT_STEP])
            print("\n".join(lines), flush=True)
            if res.qemu_status != 0:
                problems.append(f"qemu exited {res.qemu_status}")
            if not ok:
                problems.append("guest did not report PASS\n--- console tail ---\n" + _tail(console, 40))
    finally:
        cap.stop()
        target.stop()
        if hasattr(target, "cleanup"):
            target.cleanup()
    keys = login_report(cap)
    (workdir / "login-keys.txt").write_text(keys)
    print("login keys on the wire (qemu-img, then qemu's libiscsi):\n" + keys, flush=True)
    if ok:
        problems += _check_root_image(target.image(d.name), token)
    if args.target == "sanstack":
        print("target log, login events:\n" + "\n".join("  " + l for l in _login_lines(target)[:10]))
    for p in problems:
        print(f"problem: {p}", flush=True)
    passed = ok and not problems
    if passed:
        say("boot from SAN: the LUN's filesystem is clean and holds what the guest wrote")
    say(("PASS" if passed else "FAIL") + f": qemu iscsi:// client booting from a LUN on {args.target}")
    return 0 if passed else 1


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tools.guest.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=("sanstack", "tgt"), default="sanstack")
    ap.add_argument("--steps", default=",".join(s for s, _ in STEPS),
                    help=f"comma-separated, from: {', '.join(s for s, _ in STEPS)} [default: all]")
    ap.add_argument("--quick", action="store_true",
                    help="our target in the quick-start form (serve --portal --target --lun); no CHAP steps")
    ap.add_argument("--sanboot", action="store_true", help="boot from SAN with qemu's iscsi:// driver instead")
    ap.add_argument("--timeout", type=float, default=GUEST_TIMEOUT, help="hard limit for the guest, seconds")
    ap.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed on PASS)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="stream the guest console")
    # Internal: the second half runs inside the namespace.
    for name in ("--kernel", "--initrd", "--busybox", "--kernel-version", "--image-key"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.inner:
        return outer(args, argv)
    return inner_sanboot(args) if args.sanboot else inner_initiator(args)


if __name__ == "__main__":
    raise SystemExit(main())
