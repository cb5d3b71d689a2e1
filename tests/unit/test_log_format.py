"""logfmt rendering of structured events (iscsi/log.py): peer input never breaks a log line."""
import logging

from iscsi.log import event, format_fields


def test_plain_values_stay_bare_and_others_are_quoted():
    assert format_fields({"a": "plain", "n": 5, "skip": None}) == "a=plain n=5"
    assert format_fields({"b": "two words", "d": "", "e": "k=v"}) == 'b="two words" d="" e="k=v"'
    assert format_fields({"c": 'q"x\\y'}) == 'c="q\\"x\\\\y"'


def test_control_characters_are_escaped_not_written():
    line = format_fields({"initiator": "iqn.x:evil\x1b[2J\rforged\x00\x7f\x9b\u2028", "t": "a\tb\nc"})
    assert line == ('initiator="iqn.x:evil\\x1b[2J\\rforged\\x00\\x7f\\x9b\\u2028" t="a\\tb\\nc"')
    assert line.isprintable()


def test_printable_unicode_is_kept():
    assert format_fields({"alias": "café"}) == "alias=café"


def test_secrets_are_masked(caplog):
    log = logging.getLogger("test.log_format")
    with caplog.at_level(logging.INFO, logger="test.log_format"):
        event(log, "chap.set", user="alice", secret="hunter2hunter2", chap_secret="s3cr3ts3cr3t")
    text = caplog.text
    assert "user=alice" in text and "hunter2" not in text and "s3cr3t" not in text
