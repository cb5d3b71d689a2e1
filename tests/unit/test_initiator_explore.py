"""The initiator CLI's usage mistakes and node records, no target needed: a bad portal is a
usage error, node records that are not there or cannot be used are refused, a damaged records
file is named in one line, dd's queue depth and buffer size cannot exhaust memory."""
from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from iscsi.initiator import cli as CLI
from iscsi.initiator.nodes import NodeRecord, NodeStore, NodeStoreError

INITIATOR = "iqn.2026-11.org.sanstack:explore"
TARGET = "iqn.2026-11.org.example:disk"


@pytest.fixture
def node_dir(tmp_path, monkeypatch):
    d = tmp_path / "cfg"
    monkeypatch.setenv("SANSTACK_INITIATOR_DIR", str(d))
    return d


def run_cli(*args: str):
    r = CliRunner().invoke(CLI.main, ["-i", INITIATOR, *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"traceback instead of an error line: {r.exception!r}\n{r.output}")
    return r


@pytest.mark.parametrize("portal", ["127.0.0.1:0", "127.0.0.1:abc", "[::1", "::1:zz"])
def test_discover_bad_portal_is_a_usage_error(portal):
    # was exit status 1, as if the portal had been tried (a bad URL is already status 2)
    r = run_cli("discover", portal)
    assert r.exit_code == 2, r.output
    assert "PORTAL" in r.output and "refused" not in r.output


def test_node_delete_of_nothing_fails(node_dir):
    # was "deleted 0 record(s)", status 0 (iscsiadm: "No records found", non-zero)
    r = run_cli("node", "delete", TARGET)
    assert r.exit_code == 1 and f"no node record for {TARGET}" in r.output, r.output
    assert not (node_dir / "nodes.json").exists()        # nothing written either
    NodeStore().upsert(NodeRecord(target=TARGET, host="127.0.0.1", port=3260))
    r = run_cli("node", "delete", TARGET, "--portal", "127.0.0.2:3260")
    assert r.exit_code == 1 and "at 127.0.0.2:3260" in r.output, r.output
    r = run_cli("node", "delete", TARGET)
    assert r.exit_code == 0 and "deleted 1 record(s)" in r.output
    assert NodeStore().load() == []


@pytest.mark.parametrize("name", ["bad", "my%20disk"])
def test_node_add_refuses_a_target_that_is_no_iscsi_name(node_dir, name):
    # was saved, and every login of it then failed "target not found"
    r = run_cli("node", "add", f"iscsi://127.0.0.1/{name}")
    assert r.exit_code == 2 and "is not an iSCSI name" in r.output, r.output
    assert NodeStore().load() == []


@pytest.mark.parametrize("content", [
    "garbage{",
    "[]",
    json.dumps({"version": 1, "nodes": [{"target": TARGET, "bogus": 1}]}),
    json.dumps({"version": 7, "nodes": []}),
])
def test_damaged_node_file_is_one_line(node_dir, content):
    node_dir.mkdir()
    path = node_dir / "nodes.json"
    path.write_text(content)
    with pytest.raises(NodeStoreError, match=str(path)):
        NodeStore().load()
    for args in (["node", "list"], ["node", "add", f"iscsi://127.0.0.1/{TARGET}"], ["node", "delete", TARGET],
                 ["login", TARGET]):
        r = run_cli(*args)          # node list/add/delete used to print a traceback
        assert r.exit_code == 1, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), (args, r.output)
    assert path.read_text() == content            # left as it was for the admin to look at


def test_node_file_not_utf8(node_dir):
    node_dir.mkdir()
    (node_dir / "nodes.json").write_bytes(b"\xff\xfe")
    r = run_cli("node", "list")
    assert r.exit_code == 1 and "not a node record file" in r.output, r.output


def test_dd_queue_depth_is_bounded(tmp_path):
    # qd=100000 with bs=1M could hold 100 GB of chunks in flight
    r = run_cli("dd", "if=/dev/zero", f"of={tmp_path / 'o'}", "count=1", "qd=100000")
    assert r.exit_code == 2 and "qd='100000' must be at most 1024" in r.output, r.output
    r = run_cli("dd", "if=/dev/zero", f"of={tmp_path / 'o'}", "bs=4k", "count=1", "qd=1024")
    assert r.exit_code == 0, r.output


def test_dd_buffer_larger_than_memory_is_one_line(tmp_path):
    # 2**60 bytes cannot be allocated anywhere (more than the address space): MemoryError
    # used to come out as a traceback
    r = run_cli("dd", "if=/dev/zero", f"of={tmp_path / 'o'}", "bs=1048576T", "count=1")
    assert r.exit_code == 1, r.output
    assert r.output.strip() == "error: out of memory (is bs= or --bs too large?)", r.output


# --------------------------------------------------------------------------------------------
# Connect errors name the portal as TargetAddress writes it, and the real reason
# --------------------------------------------------------------------------------------------
async def test_connect_error_names_a_bracketed_ipv6_portal():
    from iscsi.initiator.connection import open_connection
    from iscsi.initiator.errors import ConnectionLost

    with socket.socket(socket.AF_INET6) as s:   # a port nobody listens on: bound, not listening
        s.bind(("::1", 0))
        port = s.getsockname()[1]
        with pytest.raises(ConnectionLost, match=rf"^connect to \[::1\]:{port}: Connection refused$"):
            await open_connection("::1", port, timeout=5)


async def test_connect_error_of_a_name_lookup_says_so():
    # A resolver failure carries a getaddrinfo code (-2), not an errno: os.strerror(-2) read
    # it as "Unknown error -2".  ".invalid" never resolves (RFC 6761 §6.4), so no traffic leaves.
    from iscsi.initiator.connection import _connect_reason

    err = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert _connect_reason(err) == "Name or service not known"
    assert _connect_reason(ConnectionRefusedError(111, "Connect call failed")) == "Connection refused"


def test_write_refuses_a_count_it_would_ignore(tmp_path):
    # --count sizes a --pattern write; with --input it used to be dropped without a word.
    data = tmp_path / "d.bin"
    data.write_bytes(b"x" * 512)
    r = run_cli("write", "iscsi://127.0.0.1:1/iqn.2026-11.org.example:disk/0", "--input", str(data), "-n", "4")
    assert r.exit_code == 2
    assert "--count goes with --pattern" in r.output
