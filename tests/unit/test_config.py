"""Target configuration: names, sizes, portals, validation, round trip, atomic save, loud loads."""
from __future__ import annotations

import json
import os
import stat

import pytest

from iscsi.target import config as C
from iscsi.target.config import Acl, ChapConfig, Config, ConfigError, Lun, PortalGroup, Target

SECRET = "s3cret-0123456789"  # 17 bytes
MUTUAL = "mutual-9876543210"


def make_config(tmp_path) -> Config:
    return Config(
        data_dir=str(tmp_path),
        discovery_auth=ChapConfig("disc", SECRET),
        targets=[
            Target(
                iqn="iqn.2026-11.org.example:t1",
                alias="first",
                portal_groups=[PortalGroup(1, ["127.0.0.1:3260"]), PortalGroup(2, ["[::1]:3260"])],
                luns=[Lun(0, "a.img", 1 << 20), Lun(1, "b.img", 1 << 20, block_size=4096, read_only=True,
                                                     removable=True, serial="ABC-1", vendor="SANSTACK",
                                                     product="DISK")],
                acls=[
                    Acl("iqn.1994-05.com.redhat:host1", {0: 1}, ChapConfig("u1", SECRET, "m1", MUTUAL),
                        {"HeaderDigest": "CRC32C"}),
                    Acl("iqn.1994-05.com.redhat:host2"),
                ],
                chap=ChapConfig("tuser", SECRET),
                params={"DataDigest": "CRC32C,None", "MaxRecvDataSegmentLength": "65536"},
            )
        ],
    )


# ------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "name",
    [
        "iqn.2026-11.org.example:t1",
        "iqn.1994-05.com.redhat:5a3b9e8f2c1",
        "iqn.2001-04.com.example",
        "iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",
        "eui.02004567a425678d",
        "naa.52004567ba64678d",
        "naa.62004567ba64678d0123456789abcdef",
    ],
)
def test_valid_iscsi_names(name):
    assert C.canonical_iscsi_name(name) == name


def test_uppercase_is_mapped_to_lowercase_as_stringprep_does():
    assert C.canonical_iscsi_name("IQN.2026-11.Org.Example:T1") == "iqn.2026-11.org.example:t1"
    assert C.canonical_iscsi_name("eui.02004567A425678D") == "eui.02004567a425678d"


@pytest.mark.parametrize(
    "name, words",
    [
        ("iqn.2026-13.org.example:t1", "month"),
        ("iqn.26-11.org.example:t1", "iqn.YYYY-MM"),
        ("iqn.2026-11.org.example:t_1", "'_'"),
        ("iqn.2026-11.org.example:t 1", "' '"),
        ("iqn.2026-11:t1", "iqn.YYYY-MM"),
        ("eui.0200", "16 hex"),
        ("naa.0123456789abcdef0123", "16 or 32"),
        ("target1", "iqn., eui. or naa."),
        ("", "non-empty"),
        ("iqn.2026-11.org.example:" + "x" * 200, "223"),
        ("iqn.2026-11.org.example:dísk", "ASCII"),
    ],
)
def test_invalid_iscsi_names_say_why(name, words):
    with pytest.raises(ConfigError) as e:
        C.canonical_iscsi_name(name)
    assert words in str(e.value)


def test_name_of_exactly_223_bytes_is_accepted():
    prefix = "iqn.2026-11.org.example:"
    name = prefix + "x" * (223 - len(prefix))
    assert C.canonical_iscsi_name(name) == name
    with pytest.raises(ConfigError):
        C.canonical_iscsi_name(name + "x")


# ------------------------------------------------------------------ sizes, portals, params


@pytest.mark.parametrize(
    "text, size",
    [("4096", 4096), ("512M", 512 << 20), ("1G", 1 << 30), ("10GiB", 10 << 30), ("1g", 1 << 30),
     ("1GB", 10**9), ("2T", 2 << 40), ("1.5K", 1536), ("64KiB", 65536), (8192, 8192)],
)
def test_parse_size(text, size):
    assert C.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1X", "-1G", "1.3", "1Gi", "one"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        C.parse_size(text)


def test_format_size_is_exact():
    assert C.format_size(1 << 30) == "1GiB"
    assert C.format_size(1536 << 20) == "1536MiB"
    assert C.format_size(1000) == "1000"


@pytest.mark.parametrize(
    "text, parsed",
    [("127.0.0.1:3261", ("127.0.0.1", 3261)), ("127.0.0.1", ("127.0.0.1", 3260)),
     ("[::1]:3260", ("::1", 3260)), ("[0:0::1]", ("::1", 3260)), ("0.0.0.0:3260", ("0.0.0.0", 3260))],
)
def test_parse_portal(text, parsed):
    assert C.parse_portal(text) == parsed


@pytest.mark.parametrize("text", ["::1:3260", "localhost:3260", "127.0.0.1:0", "127.0.0.1:70000", "[::1", "[::1]x"])
def test_parse_portal_rejects(text):
    with pytest.raises(ConfigError):
        C.parse_portal(text)


def test_format_portal_brackets_v6():
    assert C.format_portal("::1", 3260) == "[::1]:3260"
    assert C.canonical_portal("[0::1]:3260") == "[::1]:3260"


@pytest.mark.parametrize(
    "key, value, expected",
    [("HeaderDigest", "crc32c,none", ("HeaderDigest", "CRC32C,None")),
     ("header_digest", "CRC32C", ("HeaderDigest", "CRC32C")),
     ("DataDigest", "None", ("DataDigest", "None")),
     ("MaxRecvDataSegmentLength", 262144, ("MaxRecvDataSegmentLength", "262144")),
     ("ImmediateData", False, ("ImmediateData", "No"))],
)
def test_params(key, value, expected):
    assert C.canonical_param(key, value) == expected


@pytest.mark.parametrize(
    "key, value",
    [("HeaderDigest", "MD5"), ("HeaderDigest", "CRC32C,CRC32C"), ("MaxRecvDataSegmentLength", "511"),
     ("MaxRecvDataSegmentLength", str(1 << 24)), ("ErrorRecoveryLevel", "3"), ("Frobnicate", "1"),
     ("InitialR2T", "maybe")],
)
def test_params_reject(key, value):
    with pytest.raises(ConfigError):
        C.canonical_param(key, value)


# ------------------------------------------------------------------ LUN specs


def test_lun_spec_plain_and_sized():
    assert C.parse_lun_spec("/x/disk.img") == Lun(-1, "/x/disk.img")
    assert C.parse_lun_spec("/x/disk.img:1G") == Lun(-1, "/x/disk.img", 1 << 30)


def test_lun_spec_options_in_any_order_and_colons_in_path():
    lun = C.parse_lun_spec("/x/a:b.img:512M:ro:removable:bs=4096:serial=S1:lun=7")
    assert lun == Lun(7, "/x/a:b.img", 512 << 20, 4096, True, True, "S1")
    lun = C.parse_lun_spec("/x/disk.img:bs=4k:10GiB")
    assert (lun.size, lun.block_size) == (10 << 30, 4096)


def test_lun_spec_an_existing_image_with_a_colon_and_a_bare_word_in_its_name(tmp_path):
    """'/srv/vm:disk:1G' reads like a mistyped option ('disk') after the path '/srv/vm'; when
    the image '/srv/vm:disk' exists it is what was meant. A new one is still refused, with
    the way out in the message."""
    (tmp_path / "vm:disk").write_bytes(b"")
    assert C.parse_lun_spec(f"{tmp_path}/vm:disk:1G") == Lun(-1, f"{tmp_path}/vm:disk", 1 << 30)
    with pytest.raises(ConfigError, match="'other' is not a LUN option.*lun add --size"):
        C.parse_lun_spec(f"{tmp_path}/vm:other:1G")


def test_lun_spec_errors():
    with pytest.raises(ConfigError):
        C.parse_lun_spec(":1G")
    with pytest.raises(ConfigError):
        C.parse_lun_spec("/x:lun=a")


# ------------------------------------------------------------------ validation


def test_valid_config_passes(tmp_path):
    make_config(tmp_path).validate()


def _error(cfg: Config) -> str:
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    return str(e.value)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda c: c.targets[0].luns.append(Lun(0, "c.img", 4096)), ["targets[0]", "LUN 0", "twice"]),
        (lambda c: setattr(c.targets[0].luns[0], "block_size", 1024), ["luns[0]", "block_size", "1024"]),
        (lambda c: setattr(c.targets[0].luns[0], "size", 1000), ["luns[0]", "multiple", "512"]),
        (lambda c: setattr(c.targets[0].luns[1], "size", 6144), ["luns[1]", "4096"]),
        (lambda c: setattr(c.targets[0].luns[0], "number", 16384), ["number", "16383"]),
        (lambda c: setattr(c.targets[0].portal_groups[0], "tag", 0), ["portal_groups[0].tag", "1..65535"]),
        (lambda c: setattr(c.targets[0].portal_groups[1], "tag", 1), ["portal_groups[1].tag", "twice"]),
        (lambda c: c.targets[0].portal_groups[1].portals.append("127.0.0.1:3260"), ["portals[1]", "already"]),
        (lambda c: c.targets[0].portal_groups[0].portals.append("host:3260"), ["portals[1]", "not an IP"]),
        (lambda c: setattr(c.targets[0].acls[0], "lun_map", {0: 5}), ["acls[0]", "no LUN 5"]),
        (lambda c: setattr(c.targets[0].acls[0], "lun_map", {0: 1, 1: 1}), ["mapped twice"]),
        (lambda c: setattr(c.targets[0].acls[1], "initiator", "IQN.1994-05.com.redhat:HOST1"), ["acls[1]", "already"]),
        (lambda c: setattr(c.targets[0].chap, "secret", "x" * 11), ["targets[0]", "chap.secret", "11 bytes", "12"]),
        (lambda c: setattr(c.discovery_auth, "secret", "short"), ["discovery_auth.secret"]),
        (lambda c: setattr(c.targets[0].acls[0].chap, "mutual_secret", SECRET), ["mutual_secret must differ"]),
        (lambda c: setattr(c.targets[0].acls[0].chap, "mutual_secret", None), ["both mutual_username"]),
        (lambda c: setattr(c.targets[0], "params", {"HeaderDigest": "MD5"}), ["targets[0]", "params", "HeaderDigest"]),
        (lambda c: c.targets.append(Target("iqn.2026-11.org.example:T1")), ["targets[1]", "already defined"]),
        (lambda c: c.targets.append(Target("iqn.2026-11.org.example:t2", luns=[Lun(0, "a.img", 4096)])),
         ["targets[1]", "already used by iqn.2026-11.org.example:t1 LUN 0"]),
        (lambda c: setattr(c.targets[0].luns[1], "vendor", "TOO-LONG-VENDOR"), ["vendor", "8"]),
        (lambda c: setattr(c.targets[0].luns[1], "serial", "has space"), ["serial"]),
        (lambda c: setattr(c, "version", 2), ["version"]),
    ],
)
def test_validation_names_the_entry(tmp_path, mutate, words):
    cfg = make_config(tmp_path)
    mutate(cfg)
    message = _error(cfg)
    for w in words:
        assert w in message, message


def test_chap_secret_legal_lengths():
    C.validate_chap_secret("x" * 12)
    C.validate_chap_secret("x" * 16)
    C.validate_chap_secret("x" * 255)
    for bad in ("x" * 11, "x" * 256, "abcdefghijk\n"):
        with pytest.raises(ConfigError):
            C.validate_chap_secret(bad)
    # bytes, not characters: 6 two-byte characters are 12 bytes
    C.validate_chap_secret("é" * 6)


def test_acl_mapping_default_is_every_lun(tmp_path):
    cfg = make_config(tmp_path)
    t = cfg.targets[0]
    assert t.acls[1].mapping(t) == {0: 0, 1: 1}
    assert t.acls[0].mapping(t) == {0: 1}


def test_relative_paths_live_in_data_dir(tmp_path):
    cfg = make_config(tmp_path)
    assert cfg.resolve_path("a.img") == tmp_path / "a.img"
    assert cfg.resolve_path("/abs/x.img") == C.Path("/abs/x.img")


def test_default_serial_is_stable_and_distinct_in_first_8_chars():
    a = C.default_serial("iqn.2026-11.org.example:t1", 0, "/x/a.img")
    assert a == C.default_serial("iqn.2026-11.org.example:t1", 0, "/x/a.img")
    others = [C.default_serial("iqn.2026-11.org.example:t1", n, "/x/a.img") for n in range(1, 50)]
    assert len({s[:8] for s in others + [a]}) == 50
    assert C.SERIAL_RE.match(a)


# ------------------------------------------------------------------ round trip and masking


def test_round_trip(tmp_path):
    cfg = make_config(tmp_path)
    cfg.validate()
    again = C.loads(C.dumps(cfg))
    assert again == cfg
    assert again.targets[0].acls[0].lun_map == {0: 1}


def test_file_is_readable_json_in_field_order(tmp_path):
    text = C.dumps(make_config(tmp_path))
    data = json.loads(text)
    assert list(data) == ["version", "data_dir", "discovery_auth", "targets"]
    assert list(data["targets"][0])[0] == "iqn"
    assert text.count("\n") > 40  # indented, one field per line: diffable


def test_masked_output_and_reprs_hold_no_secret(tmp_path):
    cfg = make_config(tmp_path)
    shown = C.dumps(cfg, mask_secrets=True)
    assert SECRET not in shown and MUTUAL not in shown
    assert '"secret": "***"' in shown
    assert SECRET not in repr(cfg) and MUTUAL not in repr(cfg)
    assert SECRET in C.dumps(cfg)  # the file itself keeps them


def test_sizes_in_the_file_may_be_human(tmp_path):
    data = C.to_dict(make_config(tmp_path))
    data["targets"][0]["luns"][0]["size"] = "2M"
    assert C.from_dict(data).targets[0].luns[0].size == 2 << 20


# ------------------------------------------------------------------ loading is loud


def _write(path, data):
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


def test_load_errors_name_file_and_entry(tmp_path):
    good = C.to_dict(make_config(tmp_path))
    path = tmp_path / "target.json"

    bad = json.loads(json.dumps(good))
    bad["targets"][0]["luns"][1]["blocksize"] = 4096
    _write(path, bad)
    with pytest.raises(ConfigError) as e:
        C.load_config(path)
    assert str(path) in str(e.value)
    assert "targets[0] (iqn.2026-11.org.example:t1).luns[1]" in str(e.value)
    assert "blocksize" in str(e.value)

    bad = json.loads(json.dumps(good))
    del bad["targets"][0]["acls"][1]["initiator"]
    _write(path, bad)
    with pytest.raises(ConfigError, match=r"acls\[1\]: missing initiator"):
        C.load_config(path)

    _write(path, '{"version": 1,\n "targets": [}')
    with pytest.raises(ConfigError, match="line 2 column"):
        C.load_config(path)

    with pytest.raises(ConfigError, match="no such config file"):
        C.load_config(tmp_path / "missing.json")


def test_load_is_all_or_nothing(tmp_path):
    data = C.to_dict(make_config(tmp_path))
    second = json.loads(json.dumps(data["targets"][0]))
    second["iqn"] = "iqn.2026-11.org.example:t2"
    second["luns"] = [{"number": 0, "path": "c.img", "size": 4096, "block_size": 4096 * 3}]
    second["acls"] = []
    data["targets"].append(second)
    with pytest.raises(ConfigError, match=r"targets\[1\] \(iqn.2026-11.org.example:t2\).luns\[0\]"):
        C.from_dict(data)


# ------------------------------------------------------------------ atomic save


def test_save_is_private_and_loads_back(tmp_path):
    path = tmp_path / "conf" / "target.json"
    cfg = make_config(tmp_path)
    C.save_config(cfg, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert C.file_is_private(path)
    assert C.load_config(path) == cfg


def test_crash_before_rename_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "target.json"
    old = make_config(tmp_path)
    C.save_config(old, path)
    before = path.read_bytes()
    new = make_config(tmp_path)
    new.targets[0].alias = "changed"

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.os, "replace", boom)
    with pytest.raises(OSError):
        C.save_config(new, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_crash_during_fsync_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "target.json"
    C.save_config(make_config(tmp_path), path)
    before = path.read_bytes()
    monkeypatch.setattr(C.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "I/O error")))
    new = make_config(tmp_path)
    new.targets.clear()
    with pytest.raises(OSError):
        C.save_config(new, path)
    assert path.read_bytes() == before


def test_leftover_temp_from_a_killed_save_is_ignored_then_cleaned(tmp_path):
    path = tmp_path / "target.json"
    cfg = make_config(tmp_path)
    C.save_config(cfg, path)
    torn = tmp_path / ".target.json.abc123.tmp"
    torn.write_text('{"version": 1, "targets": [{"iqn": "iqn.20')  # what SIGKILL mid-write leaves
    assert C.load_config(path) == cfg
    C.save_config(cfg, path)
    assert not torn.exists()


def test_invalid_config_is_never_written(tmp_path):
    path = tmp_path / "target.json"
    cfg = make_config(tmp_path)
    C.save_config(cfg, path)
    before = path.read_bytes()
    cfg.targets[0].luns[0].block_size = 1000
    with pytest.raises(ConfigError):
        C.save_config(cfg, path)
    assert path.read_bytes() == before


def test_save_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(C.os, "fsync", spy)
    C.save_config(make_config(tmp_path), tmp_path / "target.json")
    assert synced == [False, True]


def test_relative_images_live_beside_a_file_without_data_dir(tmp_path, monkeypatch):
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "t.json"
    path.write_text(json.dumps({"version": 1, "targets": [
        {"iqn": "iqn.2026-11.org.example:t1", "luns": [{"number": 0, "path": "d.img", "size": "1M"}]}]}))
    monkeypatch.chdir("/")
    cfg = C.load_config(path)
    assert cfg.resolve_path("d.img") == tmp_path / "etc" / "d.img"


def test_lun_spec_physical_block_size_round_trip(tmp_path):
    from iscsi.target import config as C

    lun = C.parse_lun_spec("/tmp/x.img:1G:pbs=4096")
    assert lun.physical_block_size == 4096 and lun.block_size == 512 and lun.size == 1 << 30


def test_physical_block_below_logical_refused():
    import pytest

    from iscsi.target import config as C

    with pytest.raises(C.ConfigError, match="physical_block_size"):
        cfg = C.Config(targets=[C.Target(iqn="iqn.2026-11.org.x:t", luns=[
            C.Lun(number=0, path="/tmp/a.img", size=1 << 20, block_size=4096, physical_block_size=512)])])
        cfg.validate()


def test_target_reset_policy_round_trips_and_defaults_to_allowed(tmp_path):
    cfg = Config(targets=[Target(iqn="iqn.2026-11.org.example:t", target_reset=False,
                                 portal_groups=[PortalGroup(1, ["127.0.0.1:3260"])])])
    cfg.validate()
    again = C.from_dict(json.loads(json.dumps(C.to_dict(cfg))))
    assert again.targets[0].target_reset is False
    older = C.to_dict(cfg)
    del older["targets"][0]["target_reset"]  # a config written before the setting existed
    assert C.from_dict(older).targets[0].target_reset is True


def test_target_reset_must_be_a_boolean():
    cfg = Config(targets=[Target(iqn="iqn.2026-11.org.example:t", target_reset="no",  # type: ignore[arg-type]
                                 portal_groups=[PortalGroup(1, ["127.0.0.1:3260"])])])
    with pytest.raises(ConfigError, match="target_reset: must be true or false"):
        cfg.validate()
