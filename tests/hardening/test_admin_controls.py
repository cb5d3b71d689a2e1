"""Admin controls against a real daemon driven by raw sessions whose every command and byte
the test knows: the counters of ``status`` and the rates of ``stats`` (per session, per LUN),
``session drop``, and the target-reset policy of ``target set``."""
from __future__ import annotations

import json

import pytest

from iscsi import pdu as P

from .conftest import running_daemon
from .raw import Closed, RawSession

KIB = 1024
WRITES, WRITE_SIZE = 5, 64 * KIB
READS, READ_SIZE = 7, 128 * KIB


def _session_row(daemon, tsih: int) -> dict:
    res = daemon.admin("status", "--json")
    assert res.returncode == 0, res.stderr
    rows = [s for s in json.loads(res.stdout)["sessions"] if s["tsih"] == tsih]
    assert len(rows) == 1, rows
    return rows[0]


def test_status_counts_commands_and_bytes_of_a_session(tmp_path):
    with running_daemon(tmp_path) as daemon:
        raw = RawSession(daemon.portals[0].host, daemon.portals[0].port)
        first_cmdsn = raw.cmdsn
        assert raw.login(daemon.iqn).status_class == 0
        before = _session_row(daemon, raw.tsih)["stats"]
        assert before["commands"] == (raw.cmdsn - first_cmdsn) & 0xFFFFFFFF  # the TEST UNIT READYs
        payload = bytes(range(256)) * (WRITE_SIZE // 256)
        for i in range(WRITES):
            assert raw.write(i * (WRITE_SIZE // 512), payload) == 0
        for i in range(READS):
            status, data = raw.read(i * (READ_SIZE // 512), READ_SIZE)
            assert status == 0 and len(data) == READ_SIZE
        after = _session_row(daemon, raw.tsih)["stats"]
        assert after["commands"] - before["commands"] == WRITES + READS
        # Headers, solicited Data-Out and responses come on top of the payloads, but not more
        # than a 48-byte header per 8 KiB segment and a few PDUs per command.
        received = after["rx_bytes"] - before["rx_bytes"]
        sent = after["tx_bytes"] - before["tx_bytes"]
        assert WRITES * WRITE_SIZE <= received <= WRITES * WRITE_SIZE * 1.02 + 4 * 48 * (WRITES + READS)
        assert READS * READ_SIZE <= sent <= READS * READ_SIZE * 1.02 + 4 * 48 * (WRITES + READS)
        assert after["data_digest_errors"] == 0 and after["seconds"] > 0
        table = daemon.admin("status")
        assert "CMDS" in table.stdout and "RECEIVED" in table.stdout and "SENT" in table.stdout
        # Per LU: exactly these READs and WRITEs, with the bytes their CDBs asked for.
        (lu,) = json.loads(daemon.admin("status", "--json").stdout)["lun_io"]
        assert (lu["reads"], lu["read_bytes"]) == (READS, READS * READ_SIZE)
        assert (lu["writes"], lu["written_bytes"]) == (WRITES, WRITES * WRITE_SIZE)
        assert lu["other_commands"] >= 1  # the TEST UNIT READYs of the login

        # stats: one report per interval; this idle session is listed, at zero.
        res = daemon.admin("stats", "--interval", "0.2", "--count", "2", "--json")
        assert res.returncode == 0, res.stderr
        reports = [json.loads(line) for line in res.stdout.splitlines()]
        assert len(reports) == 2
        for report in reports:
            (row,) = [r for r in report["sessions"] if r["tsih"] == raw.tsih]
            assert row["cmds_per_s"] == 0 and row["rx_mb_per_s"] == 0 and row["tx_mb_per_s"] == 0
        res = daemon.admin("stats", "--luns", "--interval", "0.2", "--json")
        assert res.returncode == 0, res.stderr
        (row,) = json.loads(res.stdout)["luns"]
        assert row["lun"] == 0 and row["reads_per_s"] == 0 and row["write_mb_per_s"] == 0
        assert "READ MB/s" in daemon.admin("stats", "--luns", "--interval", "0.1").stdout
        raw.logout()
        raw.close()
        res = daemon.admin("stats", "--interval", "0.1")
        assert res.returncode == 0 and res.stdout.strip() == "no sessions", res.stdout


def test_session_drop_ends_only_the_named_session(tmp_path):
    """`iscsi-target session drop --tsih N`: that session hears Async Message event 3
    (RFC 7143 §11.9.1) and is closed; another session of the same initiator goes on."""
    with running_daemon(tmp_path) as daemon:
        doomed = RawSession(daemon.portals[0].host, daemon.portals[0].port)
        other = RawSession(daemon.portals[0].host, daemon.portals[0].port)
        assert doomed.login(daemon.iqn).status_class == 0
        assert other.login(daemon.iqn).status_class == 0
        assert doomed.tsih != other.tsih

        refused = daemon.admin("session", "drop", daemon.iqn)
        assert refused.returncode == 1 and "--tsih" in refused.stderr
        missing = daemon.admin("session", "drop", daemon.iqn, "--tsih", "999")
        assert missing.returncode == 1 and "no session of TSIH 999" in missing.stderr

        res = daemon.admin("session", "drop", daemon.iqn, "--tsih", str(doomed.tsih))
        assert res.returncode == 0 and "1 session(s) dropped" in res.stdout, res.stdout + res.stderr
        message = doomed.recv(timeout=5)
        assert isinstance(message, P.AsyncMessage) and message.event == P.AsyncEvent.SESSION_DROP, message
        with pytest.raises(Closed):
            doomed.recv(timeout=5)
        doomed.close()

        assert other.write(0, b"\x5a" * 4096) == 0
        status, data = other.read(0, 4096)
        assert status == 0 and data == b"\x5a" * 4096
        listed = json.loads(daemon.admin("session", "list", "--json").stdout)
        assert [s["tsih"] for s in listed] == [other.tsih]
        other.logout()
        other.close()


def _target_reset(s: RawSession) -> P.TaskMgmtResponse:
    s.send(P.TaskMgmtRequest(function=P.TmfFunction.TARGET_WARM_RESET, itt=s.next_itt(), cmdsn=s.cmdsn,
                             expstatsn=s.expstatsn, immediate=True))
    resp = s.recv(timeout=5)
    assert isinstance(resp, P.TaskMgmtResponse), resp
    return resp


def _test_unit_ready_sense(s: RawSession) -> tuple[int, bytes]:
    status, _ = s.wait_status(s.command(bytes(16)))
    return status.status, bytes(status.data)


def test_target_reset_policy(tmp_path):
    """`target set --no-target-reset`: TARGET WARM RESET from an initiator gets Task
    Management Response 6 (RFC 7143 §11.6.1, not authorized) and resets nothing, so another
    initiator sees no unit attention; with resets allowed (the default) it is done."""
    with running_daemon(tmp_path) as daemon:
        port = daemon.portals[0]
        a, b = RawSession(port.host, port.port), RawSession(port.host, port.port)
        assert a.login(daemon.iqn, initiator="iqn.2026-11.org.example:reset-a").status_class == 0
        assert b.login(daemon.iqn, initiator="iqn.2026-11.org.example:reset-b").status_class == 0

        res = daemon.admin("target", "set", daemon.iqn, "--no-target-reset")
        assert res.returncode == 0 and "target_reset=no" in res.stdout, res.stdout + res.stderr
        assert json.loads(daemon.admin("target", "list", "--json").stdout)[0]["target_reset"] is False
        assert _target_reset(a).response == P.TmfResponse.AUTHORIZATION_FAILED
        assert _test_unit_ready_sense(b)[0] == 0  # nothing was reset: no unit attention for b
        assert b.write(0, b"\x11" * 4096) == 0

        assert daemon.admin("target", "set", daemon.iqn, "--target-reset").returncode == 0
        assert _target_reset(a).response == P.TmfResponse.COMPLETE
        status, sense = _test_unit_ready_sense(b)
        assert status == 2 and sense[2 + 12] == 0x29, sense.hex()  # CHECK CONDITION, POWER ON / RESET
        a.close()
        b.close()
