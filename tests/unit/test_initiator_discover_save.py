"""`iscsi-initiator discover --save`: discovery CHAP credentials are saved only for portals at
the address they were given for.  A portal elsewhere, named by the discovery answer alone,
gets a record without them (and a note saying so): otherwise logging in there would answer
that host's CHAP challenges with our secret, enough for an offline guess of it."""
from __future__ import annotations

import json

from click.testing import CliRunner

from iscsi.initiator import cli as CLI
from iscsi.initiator.client import DiscoveredTarget

SECRET = "discovery-secret-42"
T1, T2 = "iqn.2026-11.org.example:one", "iqn.2026-11.org.example:two"


def test_credentials_stay_with_the_discovery_address(tmp_path, monkeypatch):
    answer = [DiscoveredTarget(T1, (("127.0.0.1", 3260, 1), ("10.9.9.9", 3260, 2))),
              DiscoveredTarget(T2, (("::1", 3261, 1),))]
    asked = []

    async def fake_discover(host, port, **kw):  # no network: the answer a target could give
        asked.append((host, port))
        return answer

    monkeypatch.setattr(CLI, "do_discover", fake_discover)
    monkeypatch.setenv("SANSTACK_INITIATOR_DIR", str(tmp_path))
    r = CliRunner().invoke(CLI.main, ["-i", "iqn.2026-11.org.sanstack:t", "discover", "--save",
                                      f"iscsi://alice%{SECRET}@127.0.0.1:3260"])
    assert r.exit_code == 0, r.output
    assert asked == [("127.0.0.1", 3260)]
    records = {(n["host"], n["target"]): n for n in json.loads((tmp_path / "nodes.json").read_text())["nodes"]}
    assert records[("127.0.0.1", T1)]["user"] == "alice" and records[("127.0.0.1", T1)]["password"] == SECRET
    for elsewhere in (("10.9.9.9", T1), ("::1", T2)):
        assert records[elsewhere]["user"] is None and records[elsewhere]["password"] is None
    notes = [line for line in r.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and any("10.9.9.9:3260" in n for n in notes) and any("[::1]:3261" in n for n in notes)
    assert SECRET not in r.output


def test_same_address_spelled_differently_keeps_them(tmp_path, monkeypatch):
    async def fake_discover(host, port, **kw):
        return [DiscoveredTarget(T1, (("0:0:0:0:0:0:0:1", 3260, 1),))]

    monkeypatch.setattr(CLI, "do_discover", fake_discover)
    monkeypatch.setenv("SANSTACK_INITIATOR_DIR", str(tmp_path))
    r = CliRunner().invoke(CLI.main, ["-i", "iqn.2026-11.org.sanstack:t", "discover", "--save",
                                      f"iscsi://alice%{SECRET}@[::1]:3260"])
    assert r.exit_code == 0, r.output
    (node,) = json.loads((tmp_path / "nodes.json").read_text())["nodes"]
    assert node["user"] == "alice" and "note:" not in r.output
