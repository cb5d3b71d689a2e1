"""Running tools/guest/run.py from a test: availability checks and one subprocess call.

The harness needs root (a network namespace), qemu-system-x86_64 (TCG), the host's open-iscsi,
e2fsprogs and dmsetup binaries, and Debian's archive once (kernel and busybox-static .debs,
cached afterwards). Outside CI a missing piece skips the test; under CI (``CI`` set) it fails,
so a CI machine that lost an install step cannot pass by skipping.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The harness's own limits (guest 420 s + slack) are inside this; it only guards pytest.
RUN_TIMEOUT = 900
NEEDED = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "iscsiadm": "open-iscsi",
    "iscsid": "open-iscsi",
    "iscsistart": "open-iscsi",
    "mke2fs": "e2fsprogs",
    "dmsetup": "dmsetup",
    "ip": "iproute2",
    "apt-get": "apt",
    "dpkg": "dpkg",
}
QEMU_ISCSI_MODULE = "/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so"  # Debian: qemu-block-extra


def missing(*, iscsi_block: bool = False, tgt: bool = False) -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace)"
    lacking = [f"{prog} ({pkg})" for prog, pkg in NEEDED.items()
               if shutil.which(prog) is None and not os.path.exists(f"/usr/sbin/{prog}")]
    if tgt and shutil.which("tgtd") is None:
        lacking.append("tgtd (tgt)")
    if iscsi_block and not os.path.exists(QEMU_ISCSI_MODULE):
        lacking.append(f"{QEMU_ISCSI_MODULE} (qemu-block-extra)")
    return ("missing: " + ", ".join(lacking)) if lacking else None


def require(**kw) -> None:
    reason = missing(**kw)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"interop harness cannot run on this CI machine: {reason}")
    pytest.skip(reason)


def run(*args: str, workdir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "tools.guest.run", *args, "--workdir", str(workdir)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def step_outcomes(stdout: str) -> dict[str, str]:
    """``{'1': 'PASS', '5a': 'FAIL', ...}`` from the harness's summary lines."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^  step (\S+)\s+\S+\s+(PASS|FAIL|HUNG|NOT RUN)", stdout, re.M)}


def explain(res: subprocess.CompletedProcess, workdir: Path) -> str:
    return (f"harness exited {res.returncode}\n--- stdout ---\n{res.stdout[-12000:]}\n--- stderr ---\n"
            f"{res.stderr[-4000:]}\n(console and target log under {workdir})")
