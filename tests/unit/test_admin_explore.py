"""Defects found by driving ``iscsi-target`` as a new (or careless) storage admin would.

- a hand edit of the config file that was not reloaded yet was overwritten, without a word,
  by the next admin command (the daemon saved its running config over it);
- ``session list TYPO`` said "no sessions" instead of naming the unknown target;
- config values that only looked right: ``"version": true``, a ``null`` iSCSI parameter
  (read as the text "None", i.e. "no digest"), and a portal ``127.0.0.1:`` with the port
  left out (served on 3260).
"""
from __future__ import annotations

import json

import pytest

from iscsi.target import config as C
from iscsi.target.config import ConfigError
from iscsi.target.daemon import TargetDaemon
from tests.cli_checks import one_line_error

from .test_cli import LiveDaemon, run
from .test_target_daemon import T1, T2

NEW_INITIATOR = "iqn.2026-11.org.example:newhost"


@pytest.fixture
def live(tmp_path):
    with LiveDaemon(tmp_path) as d:
        yield d


def _hand_edit(path, edit) -> str:
    """Change the saved config the way an admin with an editor would; returns the new text."""
    data = json.loads(path.read_text())
    edit(data)
    text = json.dumps(data, indent=4)
    path.write_text(text)
    return text



# --------------------------------------------------------------------------- hand edits


def _set_alias(alias: str):
    def edit(data: dict) -> None:
        data["targets"][0]["alias"] = alias
    return edit


def test_an_admin_change_never_saves_over_a_hand_edit_not_yet_reloaded(live):
    edited = _hand_edit(live.path, _set_alias("edited by hand"))

    r = live.cli("acl", "add", T1, NEW_INITIATOR)

    assert r.exit_code == 1
    one_line_error(r.output, str(live.path), "config reload", "nothing was changed")
    assert live.path.read_text() == edited  # the edit is still there
    acls = json.loads(live.cli("acl", "list", T1, "--json").output)
    assert NEW_INITIATOR not in [a["initiator"] for a in acls]  # and nothing half-applied


def test_after_a_reload_the_edit_and_the_next_change_are_both_kept(live):
    _hand_edit(live.path, _set_alias("edited by hand"))
    assert live.cli("config", "reload").exit_code == 0

    r = live.cli("acl", "add", T1, NEW_INITIATOR)

    assert r.exit_code == 0, r.output
    saved = json.loads(live.path.read_text())
    assert saved["targets"][0]["alias"] == "edited by hand"
    assert NEW_INITIATOR in [a["initiator"] for a in saved["targets"][0]["acls"]]


def test_a_reload_refused_for_a_broken_edit_keeps_the_edit_safe_from_the_next_change(live):
    live.path.write_text('{"version": 1, "targets": [')  # half-way through an edit
    assert live.cli("config", "reload").exit_code == 1

    r = live.cli("lun", "resize", T2, "0", "4M")

    assert r.exit_code == 1
    one_line_error(r.output, "config reload")
    assert live.path.read_text() == '{"version": 1, "targets": ['


def test_changes_in_a_row_and_an_undone_edit_are_saved_as_usual(live):
    before = live.path.read_text()
    _hand_edit(live.path, _set_alias("tried something"))
    live.path.write_text(before)  # ... and put it back

    for initiator in ("iqn.2026-11.org.example:a", "iqn.2026-11.org.example:b"):
        r = live.cli("acl", "add", T1, initiator)
        assert r.exit_code == 0, r.output
    saved = [a["initiator"] for a in json.loads(live.path.read_text())["targets"][0]["acls"]]
    assert saved[-2:] == ["iqn.2026-11.org.example:a", "iqn.2026-11.org.example:b"]


def test_a_deleted_config_file_is_written_again(live):
    live.path.unlink()
    assert live.cli("acl", "add", T1, NEW_INITIATOR).exit_code == 0
    assert NEW_INITIATOR in live.path.read_text()


# --------------------------------------------------------------------------- session list


def test_session_list_of_an_unknown_target_names_it(live):
    r = live.cli("session", "list", "iqn.2026-11.org.example:typo")
    assert r.exit_code == 1
    one_line_error(r.output, "no target iqn.2026-11.org.example:typo", T1)


def test_session_list_of_a_malformed_name_says_why(live):
    r = live.cli("session", "list", "t1")
    assert r.exit_code == 1
    one_line_error(r.output, "must start with iqn.")


def test_session_list_of_a_known_target_in_other_case_is_fine(live):
    r = live.cli("session", "list", T1.upper().replace("IQN", "iqn"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == []


# --------------------------------------------------------------------------- config values


def _saved_dict(tmp_path) -> dict:
    cfg = C.Config(data_dir=str(tmp_path), targets=[C.Target(iqn=T1, portal_groups=[C.PortalGroup(1, ["127.0.0.1:3260"])])])
    return C.to_dict(cfg)


def test_version_true_is_not_version_1(tmp_path):
    data = _saved_dict(tmp_path)
    data["version"] = True
    with pytest.raises(ConfigError, match="version: True is not supported"):
        C.from_dict(data)


@pytest.mark.parametrize("value", [None, ["CRC32C"], {"x": 1}])
def test_a_parameter_that_is_not_text_or_a_number_is_refused(tmp_path, value):
    data = _saved_dict(tmp_path)
    data["targets"][0]["params"] = {"HeaderDigest": value}
    with pytest.raises(ConfigError, match=r"params: parameter HeaderDigest=.*expected a text or number value"):
        C.from_dict(data)


def test_parameter_values_of_the_right_types_still_load(tmp_path):
    data = _saved_dict(tmp_path)
    data["targets"][0]["params"] = {"HeaderDigest": "None", "MaxConnections": 1, "InitialR2T": True}
    assert C.from_dict(data).targets[0].params == {"HeaderDigest": "None", "MaxConnections": "1", "InitialR2T": "Yes"}


@pytest.mark.parametrize("portal", ["127.0.0.1:", "[::1]:"])
def test_a_portal_with_the_port_left_out_after_the_colon_is_refused(portal):
    with pytest.raises(ConfigError, match="no port after ':'"):
        C.canonical_portal(portal)


@pytest.mark.parametrize("portal, canon", [("127.0.0.1", "127.0.0.1:3260"), ("[::1]", "[::1]:3260"),
                                           ("[::1]:3261", "[::1]:3261")])
def test_a_portal_without_a_port_still_means_3260(portal, canon):
    assert C.canonical_portal(portal) == canon


def test_serve_with_an_empty_port_is_a_one_line_usage_error(tmp_path, monkeypatch):
    async def never_serve(self) -> None:  # the old code went on to listen on 3260
        raise AssertionError("serve accepted the portal")

    monkeypatch.setattr(TargetDaemon, "run", never_serve)
    r = run("serve", "--target", T1, "--lun", f"{tmp_path}/d.img:1M", "--portal", "127.0.0.1:",
            "--control", str(tmp_path / "c.sock"))
    assert r.exit_code == 1
    one_line_error(r.output, "127.0.0.1:", "no port")
    assert not (tmp_path / "d.img").exists()


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("field", ["secret", "mutual_secret"])
def test_a_secret_of_the_wrong_type_is_not_quoted_in_the_refusal_or_the_log(live, field, caplog):
    secret = "never-show-this-secret"
    args = {"scope": "discovery", "username": "u", "secret": "a-good-secret-1", "mutual_username": "m",
            field: [secret]}

    with caplog.at_level("DEBUG"):
        answer = live.raw({"op": "chap.set", "args": args})

    assert answer["ok"] is False
    assert f"{field} must be a string" in answer["error"]
    assert secret not in answer["error"]
    assert secret not in caplog.text
    assert "control.refused" in caplog.text  # the refusal was logged, without it


def test_a_wrong_type_in_a_field_that_is_no_secret_is_still_quoted(live):
    answer = live.raw({"op": "lun.remove", "args": {"iqn": T1, "number": "zero"}})
    assert answer == {"ok": False, "error": 'lun.remove: number must be a number, not "zero"'}


def test_acl_list_warns_when_one_target_secret_admits_acls_with_different_luns():
    # RFC 7143 §12.1.3: one secret for several initiators lets any of them log in as another.
    from iscsi.target.cli import _shared_chap_warnings

    def row(ini, lun_map, chap="target"):
        return {"target": "iqn.2026-11.org.example:t", "initiator": ini, "lun_map": lun_map, "chap": chap}

    same = [row("iqn.2026-11.org.example:a", {"0": 0}), row("iqn.2026-11.org.example:b", {"0": 0})]
    assert _shared_chap_warnings(same) == []
    own = [row("iqn.2026-11.org.example:a", {"0": 0}), row("iqn.2026-11.org.example:b", {"0": 1}, chap="own")]
    assert _shared_chap_warnings(own) == []
    apart = [row("iqn.2026-11.org.example:a", {"0": 0}), row("iqn.2026-11.org.example:b", {"0": 1})]
    (warning,) = _shared_chap_warnings(apart)
    assert "iqn.2026-11.org.example:a, iqn.2026-11.org.example:b" in warning and "chap set" in warning


# --------------------------------------------------------------------------- default serve, --portal

def test_default_serve_takes_its_portals_on_its_first_run(tmp_path):
    """`iscsi-target serve --portal H:P` without --target/--lun: the default target's config
    is created with those portals (it was refused, so the default target could not be put on
    a real address from the command line)."""
    import signal
    import subprocess
    import sys

    from tools.peers.base import free_portals, stop_process, wait_listening

    portals = free_portals(2)
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "iscsi.target", "serve", "--data-dir", str(data),
           "--control", str(tmp_path / "ctl.sock"), *(a for p in portals for a in ("--portal", str(p)))]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_listening(portals, proc, 30, log)
        cfg = C.load_config(data / C.CONFIG_FILENAME)
        (target,) = cfg.targets
        assert [p for _, p in target.portals()] == [str(p) for p in portals]
        assert [g.tag for g in target.portal_groups] == [1, 2]
    finally:
        stop_process(proc, signal.SIGTERM)
    # The config exists now: --portal would be a second place to say where it listens.
    r = run("serve", "--data-dir", str(data), "--portal", str(portals[0]))
    assert r.exit_code == 2 and "portal add" in r.output and str(data / C.CONFIG_FILENAME) in r.output, r.output
