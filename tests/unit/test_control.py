"""Control socket: JSON-lines round trip, 0600 + SO_PEERCRED, stale sockets, errors; daemon through it."""
from __future__ import annotations

import asyncio
import functools
import json
import os
import shutil
import socket
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from iscsi.target import config as C
from iscsi.target.config import ConfigError
from iscsi.target.control import ControlClient, ControlError, ControlServer, DaemonNotRunning, OperationFailed
from iscsi.target.daemon import TargetDaemon

from ._target_fakes import FakeProvider, FakeServer
from .test_target_daemon import T1, T2, base_config


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="ctl", dir="/tmp"))  # AF_UNIX paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def echo_handler(op: str, args: dict):
    if op == "echo":
        return args
    if op == "bad":
        raise ConfigError("targets[0]: you did it wrong")
    if op == "io":
        raise OperationFailed("disk on fire")
    if op == "bug":
        raise KeyError("oops")
    raise ConfigError(f"unknown operation {op!r}")


# Clients get their own threads: sharing the loop's default executor with the daemon's
# to_thread() work could starve the daemon and make the test wait on itself.
_CLIENTS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ctl-client")


async def call(path, op, /, **args):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_CLIENTS, functools.partial(ControlClient(path, timeout=5).call, op, **args))


async def test_round_trip_and_mode_0600(sockdir):
    path = sockdir / "c.sock"
    server = ControlServer(path, echo_handler)
    await server.start()
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert await call(path, "echo", a=1, b=[1, "x"]) == {"a": 1, "b": [1, "x"]}
    finally:
        await server.close()
    assert not path.exists()


async def test_errors_are_one_clear_message(sockdir):
    path = sockdir / "c.sock"
    server = ControlServer(path, echo_handler)
    await server.start()
    try:
        with pytest.raises(ControlError, match=r"^targets\[0\]: you did it wrong$"):
            await call(path, "bad")
        with pytest.raises(ControlError, match="^disk on fire$"):
            await call(path, "io")
        with pytest.raises(ControlError, match="internal error in bug: KeyError"):
            await call(path, "bug")
    finally:
        await server.close()


async def test_malformed_requests_get_answers_and_the_server_survives(sockdir):
    path = sockdir / "c.sock"
    server = ControlServer(path, echo_handler)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        for line in (b"not json\n", b"[1,2]\n", b'{"args": {}}\n'):
            writer.write(line)
            answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert answer["ok"] is False and answer["error"]
        writer.write(b'{"op": "echo", "args": {"x": 2}}\n')
        assert json.loads(await asyncio.wait_for(reader.readline(), 5)) == {"ok": True, "result": {"x": 2}}
        writer.close()
    finally:
        await server.close()


async def test_peers_other_than_root_and_owner_are_refused(sockdir):
    path = sockdir / "c.sock"
    server = ControlServer(path, echo_handler, allowed_uids={424242})  # nobody we are
    await server.start()
    try:
        with pytest.raises(ControlError, match="permission denied"):
            await call(path, "echo", a=1)
    finally:
        await server.close()


def test_client_says_when_no_daemon_runs(sockdir):
    with pytest.raises(DaemonNotRunning, match="does not exist"):
        ControlClient(sockdir / "none.sock").call("ping")
    stale = sockdir / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: what a killed daemon leaves
    with pytest.raises(DaemonNotRunning, match="stale"):
        ControlClient(stale).call("ping")


async def test_stale_socket_is_replaced_but_a_live_one_is_not(sockdir):
    path = sockdir / "c.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    first = ControlServer(path, echo_handler)
    await first.start()  # stale one removed
    try:
        second = ControlServer(path, echo_handler)
        with pytest.raises(ConfigError, match="already listening"):
            await second.start()
        assert await call(path, "echo", still="first") == {"still": "first"}
    finally:
        await first.close()


async def test_refuses_a_path_that_is_not_a_socket_or_too_long(sockdir):
    plain = sockdir / "file"
    plain.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        await ControlServer(plain, echo_handler).start()
    with pytest.raises(ConfigError, match="AF_UNIX"):
        await ControlServer(sockdir / ("x" * 120), echo_handler).start()


async def test_oversized_request_is_refused(sockdir):
    path = sockdir / "c.sock"
    server = ControlServer(path, echo_handler)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"op": "echo", "args": {"x": "' + b"a" * (2 << 20) + b'"}}\n')
        answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert answer["ok"] is False and "longer than" in answer["error"]
        writer.close()
    finally:
        await server.close()


async def test_daemon_over_the_control_socket(tmp_path, sockdir):
    path = tmp_path / "target.json"
    C.save_config(base_config(tmp_path), path)
    ctl = sockdir / "d.sock"
    daemon = TargetDaemon(C.load_config(path), path, provider=FakeProvider(), server_factory=FakeServer,
                          control_path=ctl)
    await daemon.start()
    try:
        assert (await call(ctl, "ping"))["config"] == str(path)
        res = await call(ctl, "lun.add", iqn=T2, path=str(tmp_path / "x.img"), size=1 << 20)
        assert res["lun"] == 1
        assert [r["lun"] for r in await call(ctl, "lun.list", iqn=T2)] == [0, 1]
        with pytest.raises(ControlError, match="no target"):
            await call(ctl, "lun.add", iqn="iqn.2026-11.org.example:zz", path="/x", size=4096)
        with pytest.raises(ControlError, match="unexpected keyword"):
            await call(ctl, "lun.add", iqn=T2, path="/x", colour="red")
        # concurrent admin clients: every change lands, none is lost
        results = await asyncio.gather(
            *(call(ctl, "lun.add", iqn=T2, path=str(tmp_path / f"p{i}.img"), size=1 << 20) for i in range(8))
        )
        assert sorted(r["lun"] for r in results) == list(range(2, 10))
        assert len(C.load_config(path).target(T2).luns) == 10
        shown = await call(ctl, "config.show")
        assert shown["targets"][0]["chap"]["secret"] == "***"
    finally:
        await daemon.stop()
    assert not ctl.exists()


async def test_quick_start_daemon_runs_without_a_busy_control_socket(tmp_path, sockdir):
    ctl = sockdir / "busy.sock"
    holder = ControlServer(ctl, echo_handler)
    await holder.start()
    try:
        strict = TargetDaemon(base_config(tmp_path), None, provider=FakeProvider(), server_factory=FakeServer,
                              control_path=ctl)
        with pytest.raises(ConfigError, match="already listening"):
            await strict.start()
        quick = TargetDaemon(base_config(tmp_path), None, provider=FakeProvider(), server_factory=FakeServer,
                             control_path=ctl, control_optional=True)
        await quick.start()
        assert quick.control_path is None and quick.find_target(T1) is not None
        await quick.stop()
        assert await call(ctl, "echo", alive=True) == {"alive": True}  # the first owner keeps it
    finally:
        await holder.close()
