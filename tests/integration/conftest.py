"""Fixtures for tests against real target processes (ours and tgtd) with real clients.

Every test starts its own target on free loopback ports with scratch sparse images in its
tmp_path (tools/peers), and stops it afterwards. Tests parametrized with ``peer_kind`` run
against both our target and tgtd: tgtd is the yardstick nobody here wrote, so a test that
fails against tgtd is a broken test, not a broken target.

A test skips only when a Debian tool it drives is missing (CI installs them all: .ci/run).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from tools.peers import PEER_KINDS, TargetPeer, make_peer
from tools.peers.base import log_tail

#: Bound on any one client command (iscsi-inq, qemu-img convert of 256 MiB, ...): a hung
#: target fails the test instead of hanging CI.
CLIENT_TIMEOUT = 300

#: Debian package that ships each tool, for skip messages.
PACKAGES = {
    "iscsi-ls": "libiscsi-bin", "iscsi-inq": "libiscsi-bin", "iscsi-readcapacity16": "libiscsi-bin",
    "iscsi-test-cu": "libiscsi-bin", "iscsi-perf": "libiscsi-bin", "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils", "tgtd": "tgt", "tgtadm": "tgt", "strace": "strace",
}


def require(*tools: str) -> None:
    """Skip (with the package to install) when a client tool is not installed."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pkgs = sorted({PACKAGES.get(t, t) for t in missing})
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install {' '.join(pkgs)})")


def require_qemu_iscsi() -> None:
    """qemu-img speaks iscsi:// only with the libiscsi block module (qemu-block-extra)."""
    require("qemu-img")
    out = subprocess.run(["qemu-img", "--help"], capture_output=True, text=True, timeout=30).stdout
    if " iscsi " not in out.replace("\n", " ") + " ":
        pytest.skip("qemu-img has no iscsi block driver (apt-get install qemu-block-extra)")


def run(cmd: list[str], *, timeout: float = CLIENT_TIMEOUT, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a client command, bounded; on failure the message carries its output."""
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                         stdin=subprocess.DEVNULL, **kw)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
        )
    return res


def selected_peers(config) -> list[str]:
    wanted = [p.strip() for p in config.getoption("--peers").split(",") if p.strip()]
    unknown = set(wanted) - set(PEER_KINDS)
    if unknown:
        raise pytest.UsageError(f"--peers: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PEER_KINDS)}")
    return wanted


def pytest_generate_tests(metafunc) -> None:
    """``peer_kind`` runs over the --peers selection; ``@pytest.mark.peers("sanstack")``
    narrows a test to the peers a requirement applies to (e.g. SIGTERM semantics)."""
    if "peer_kind" in metafunc.fixturenames:
        kinds = selected_peers(metafunc.config)
        marker = metafunc.definition.get_closest_marker("peers")
        if marker is not None:
            kinds = [k for k in kinds if k in marker.args]
        metafunc.parametrize("peer_kind", kinds)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "peers(*kinds): run this peer_kind test only against these targets")


@pytest.fixture
def peer_factory(tmp_path: Path, request) -> Callable[..., TargetPeer]:
    """``peer_factory(kind, **kw)`` starts a target (see tools.peers.make_peer); all are stopped
    at teardown, and a failing test shows their log tails."""
    started: list[TargetPeer] = []

    def factory(kind: str, *, start: bool = True, **kwargs) -> TargetPeer:
        if kind == "tgt":
            require("tgtd", "tgtadm")
        workdir = tmp_path / f"{kind}{len(started)}"
        peer = make_peer(kind, workdir, **kwargs)
        started.append(peer)
        if start:
            peer.start()
        return peer

    yield factory
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for peer in started:
        try:
            if peer.alive():
                status = peer.stop()
                if peer.kind == "sanstack" and status not in (0, None):
                    print(f"note: {peer.kind} exited with status {status} on SIGTERM")
        finally:
            if hasattr(peer, "cleanup"):
                peer.cleanup()
        if failed:
            print(f"--- {peer.kind} log ({peer.log_path}) ---{log_tail(peer.log_path, 60)}")


@pytest.fixture
def peer(peer_kind: str, peer_factory) -> TargetPeer:
    """A started target of the parametrized kind with one 1 GiB sparse LUN."""
    return peer_factory(peer_kind)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Expose the call-phase report to fixtures (peer_factory prints logs of failed tests).
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def known_gap(request, peer_kind: str, kind: str, reason: str) -> None:
    """Expect failure (strict) for a requirement ``kind`` is known not to meet, e.g. tgtd's gaps:
    the test still runs, and an unexpected pass fails so the note gets removed."""
    if peer_kind == kind:
        request.applymarker(pytest.mark.xfail(reason=f"{kind}: {reason}", strict=True))


@pytest.fixture
def own_target(tmp_path):
    """Our target of this test's own, to kill or stop (SIGSTOP): one 8 MiB LUN.  It is
    continued (SIGCONT) and stopped afterwards if it still runs."""
    peer = make_peer("sanstack", tmp_path / "own", size="8M")
    peer.start()
    yield peer
    if peer.proc is not None and peer.proc.poll() is None:
        os.kill(peer.proc.pid, signal.SIGCONT)
        peer.stop()
