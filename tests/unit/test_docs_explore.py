"""The docs' command lines parse with the real CLIs, so the docs cannot drift from them.

Every ``iscsi-target ...`` / ``iscsi-initiator ...`` line in a fenced block of README.md is
parsed in full (options, arguments, types) with click, nothing run; every such command in an
inline code span of README.md, docs/target.md and docs/reliability.md must name existing
subcommands and options. No daemon, no network.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from iscsi.initiator import cli as ICLI
from iscsi.target import cli as TCLI

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/target.md", "docs/reliability.md"]
PROGRAMS = {"iscsi-target": TCLI.main, "iscsi-initiator": ICLI.main}

#: Placeholders the docs use, and a value of the right type to parse in their place.
PLACEHOLDERS = {
    "IQN": "iqn.2026-11.org.example:t1", "NAME": "iqn.2026-11.org.example:h1", "N": "1",
    "SECONDS": "2", "COUNT": "5", "FILE": "/etc/hostname", "HOST:PORT": "127.0.0.1:3262",
    "KEY=VALUE": "HeaderDigest=CRC32C", "KEY": "HeaderDigest", "INITIATOR": "iqn.2026-11.org.example:h1",
}


def _commands(line: str) -> list[str]:
    """The CLI commands on one shell line (``a && b``, comments and continuations dropped)."""
    line = re.sub(r"\s+#.*$", "", line).rstrip(" \\")
    out = []
    for part in line.split("&&"):
        part = part.strip()
        part = re.sub(r"^python -m iscsi\.target\b", "iscsi-target", part)
        if part.split(" ", 1)[0] in PROGRAMS:
            out.append(part)
    return out


def _fenced(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if inside:
            lines.extend(_commands(line))
    return lines


def _inline(text: str) -> list[str]:
    return [c for span in re.findall(r"`([^`\n]+)`", text) for c in _commands(span)]


def _walk(argv: list[str]) -> tuple[click.Command, click.Context, list[str]]:
    """Follow the subcommands of ``argv``; the leaf command, its parent context and its args."""
    prog, *rest = argv
    cmd: click.Command = PROGRAMS[prog]
    ctx = click.Context(cmd, info_name=prog)
    while isinstance(cmd, click.Group):
        # Group options first (e.g. iscsi-initiator -i NAME ls URL).
        while rest and rest[0].startswith("-"):
            opt = next((p for p in cmd.params if rest[0] in p.opts), None)
            assert opt is not None, f"{' '.join(argv)}: {cmd.name} has no option {rest[0]}"
            rest = rest[1:] if getattr(opt, "is_flag", False) else rest[2:]
        if not rest:
            break
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"{' '.join(argv)}: no subcommand {rest[0]!r} (has {sorted(cmd.commands)})"
        ctx = click.Context(sub, info_name=rest[0], parent=ctx)
        cmd, rest = sub, rest[1:]
    return cmd, ctx, rest


def _fill(argv: list[str]) -> list[str]:
    return [PLACEHOLDERS.get(a, a) for a in argv]


def _doc_commands(kind) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        out += [(doc, c) for c in kind(text)]
    return out


FENCED = [c for d, c in _doc_commands(_fenced) if d == "README.md"]
INLINE = _doc_commands(_inline)


def test_the_docs_show_commands_of_both_clis():
    progs = {c.split()[0] for c in FENCED}
    assert progs == set(PROGRAMS), progs
    assert len(FENCED) >= 20 and len(INLINE) >= 15


@pytest.mark.parametrize("line", FENCED)
def test_fenced_command_parses(line):
    cmd, parent, rest = _walk(_fill(shlex.split(line)))
    if isinstance(cmd, click.Group):
        assert not rest, line
        return
    try:
        cmd.make_context(parent.info_name, list(rest), parent=parent.parent)
    except click.UsageError as e:   # BadParameter, NoSuchOption, MissingParameter...
        pytest.fail(f"README.md: `{line}` does not parse: {e.format_message()}")


@pytest.mark.parametrize("doc,span", INLINE)
def test_inline_command_names_real_options(doc, span):
    words = [w for w in _fill(span.replace("|", " ").replace("[", " ").replace("]", " ").split()) if w]
    cmd, ctx, rest = _walk([w for w in words if w != "..."][:1] + _until_options(words[1:]))
    known = {o for c in _chain(ctx) for p in c.command.get_params(c) for o in p.opts + p.secondary_opts}
    for w in words:
        if w.startswith("-") and not w.lstrip("-").isdigit():
            assert w.split("=", 1)[0] in known, f"{doc}: `{span}`: {cmd.name} has no option {w}"


def _until_options(words: list[str]) -> list[str]:
    """The subcommand words of an inline span: up to the first option or placeholder."""
    out = []
    for w in words:
        if w.startswith("-") or w.isupper() or "." in w or ":" in w or "/" in w or w.isdigit():
            break
        out.append(w)
    return out


def _chain(ctx: click.Context):
    while ctx is not None:
        yield ctx
        ctx = ctx.parent


def test_help_examples_parse():
    """The examples in ``iscsi-target --help`` are commands too."""
    examples = [l.strip().split("  ")[0] for l in (TCLI.main.help or "").splitlines()
                if l.strip().startswith("iscsi-target ")]
    assert len(examples) >= 4
    for line in examples:
        test_fenced_command_parses(line)


def test_readme_stats_example_matches_the_real_table():
    """The sample `iscsi-target stats` output has the columns and TOTAL row the command prints."""
    text = (ROOT / "README.md").read_text()
    sample = re.search(r"```\n(TARGET +INITIATOR +TSIH.*?)```", text, re.S).group(1).splitlines()

    def session(tsih, commands, rx, tx, seconds):
        return {"target": "iqn.2026-11.org.sanstack:default", "initiator": f"iqn.2026-11.org.example:h{tsih}",
                "isid": f"00023d00000{tsih}", "tsih": tsih, "type": "Normal",
                "stats": {"commands": commands, "rx_bytes": rx, "tx_bytes": tx, "seconds": seconds}}

    before = {"clock": 100.0, "sessions": [session(1, 0, 0, 0, 10.0), session(2, 0, 0, 0, 10.0)]}
    after = {"clock": 102.0, "sessions": [session(1, 600, 10**6, 10**7, 12.0), session(2, 60, 0, 10**6, 12.0)]}
    real = TCLI._session_rates_table(before, after).splitlines()
    cols = lambda l: re.split(r"\s{2,}", l.strip())  # noqa: E731
    assert cols(sample[0]) == cols(real[0])
    assert cols(sample[-1])[0] == cols(real[-1])[0] == "TOTAL"
    assert re.fullmatch(r"\d+ session\(s\)", cols(sample[-1])[1]) and cols(real[-1])[1] == "2 session(s)"
    assert len(cols(sample[1])) == len(cols(real[1])) == len(cols(real[0]))


def test_readme_config_example_loads(tmp_path):
    """The hand-written config file in README.md is one the daemon accepts."""
    from iscsi.target import config as C

    text = (ROOT / "README.md").read_text()
    body = re.search(r"```json\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "target.json"
    path.write_text(body)
    path.chmod(0o600)
    cfg = C.load_config(path)
    assert cfg.targets and cfg.targets[0].luns and cfg.targets[0].acls
